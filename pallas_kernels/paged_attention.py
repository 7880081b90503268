"""Paged grouped-query attention (decode and chunked prefill) as a Pallas GPU kernel.

Three parts, as in jax's `pallas/ops/gpu/decode_attention.py`: the kernel body
(`_paged_attention_kernel`), the jitted wrapper `paged_attention` with its `TuningConfig`,
and the float32 `paged_attention_reference`.

Layout (hq_jax.kv.paged): one layer's pool `[num_blocks, block_size, K, D]`, per-request
block tables `[B, MB]`, query positions `[B, T]`, lengths `kv_lens [B]`.

One program handles one request, one kv head, one tile of `block_q` query rows and one
split of the key sequence. Its query rows are the (token, head) pairs of the kv head's
group, row r = t * G + g, so each K/V tile is loaded once for all G query heads and all
T tokens of a prefill chunk. Each row carries its own position, so one kernel does decode
(T = 1), chunked prefill (causal within the chunk, cached blocks before it) and mixes.

Exactness: a program reduces over keys in logical order in tiles of `block_k` tokens that
start at fixed logical offsets; splits cover fixed logical ranges `[s * kv_split, (s + 1) *
kv_split)` and are merged in split order by an exact log-sum-exp (no epsilon). Nothing
depends on where blocks live, on the table width, or on other requests, so dense and
deduplicated caches give bit-identical outputs.

Backend: the Triton lowering of Pallas (`pl.pallas_call` with `plgpu_triton.CompilerParams`),
deprecated since JAX 0.11, chosen as the direct way to a correct kernel with per-key
block-table gathers; a Mosaic GPU (TMA, wgmma) port was not attempted yet and is the next
step (docs/benchmarks.md has the measured gaps).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu_triton

from hq_jax.kv.paged import AttentionView, gather


def _is_pow2(x: int) -> bool:
  return x > 0 and x & (x - 1) == 0


@dataclasses.dataclass(frozen=True)
class TuningConfig:
  """Tile sizes and launch parameters; the reduction order depends on block_k and kv_split.

  block_q: query rows ((token, head) pairs of one kv-head group) per program.
  block_k: keys per inner step (any power of two: each key finds its own block).
  kv_split: keys per split of the sequence (a multiple of block_k), or None for no split.
    Splits are at fixed logical boundaries, so the bits do not depend on the batch.
  """

  block_q: int = 16
  block_k: int = 128
  kv_split: int | None = 1024
  num_warps: int = 4
  num_stages: int = 3

  def __post_init__(self):
    for name in ("block_q", "block_k"):
      v = getattr(self, name)
      if not _is_pow2(v) or v < 16:
        raise ValueError(f"{name} must be a power of two >= 16 (a Triton dot needs 16), "
                         f"got {v}")
    if self.kv_split is not None and (self.kv_split <= 0 or self.kv_split % self.block_k):
      raise ValueError(f"kv_split must be None or a positive multiple of block_k="
                       f"{self.block_k}, got {self.kv_split}")
    if self.num_warps not in (1, 2, 4, 8, 16):
      raise ValueError(f"num_warps must be one of 1, 2, 4, 8, 16, got {self.num_warps}")
    if self.num_stages < 1:
      raise ValueError(f"num_stages must be >= 1, got {self.num_stages}")


DEFAULT_DECODE = TuningConfig(block_q=16, block_k=128, kv_split=1024, num_warps=4,
                              num_stages=3)  # best on the H200 at 64x4k and 8x32k
DEFAULT_PREFILL = TuningConfig(block_q=64, block_k=64, kv_split=None, num_warps=4,
                               num_stages=3)


def default_config(num_query_rows: int) -> TuningConfig:
  """Decode-sized tiles for a few rows (T * G), prefill-sized tiles for a chunk."""
  return DEFAULT_DECODE if num_query_rows <= 16 else DEFAULT_PREFILL


# ----------------------------------------------------------------------------- kernel
def _paged_attention_kernel(
    kv_lens_ref,  # [B] int32
    tables_ref,  # [B, MB] int32
    positions_ref,  # [B, T] int32
    q_ref,  # [B, T * H, D]
    k_ref,  # [num_blocks, block_size, D] (this program's kv head)
    v_ref,  # [num_blocks, block_size, D]
    *out_refs,  # unsplit: o [B, T * H, D]; split: acc [block_q, D], m [block_q], l [block_q]
    block_q: int, block_k: int, kv_split: int | None, num_heads: int, group: int,
    scale: float, precision):
  b, h, r, s = (pl.program_id(i) for i in range(4))
  num_tables = tables_ref.shape[1]
  num_tokens = positions_ref.shape[1]
  block_size, head_dim = k_ref.shape[1], k_ref.shape[2]

  # Query rows of this tile: row = t * G + g is token t, query head h * G + g.
  rows = r * block_q + jnp.arange(block_q, dtype=jnp.int32)  # [block_q]
  row_ok = rows < num_tokens * group
  t, g = rows // group, rows % group
  q_rows = (t * num_heads + h * group + g)[:, None]  # [bq, 1] rows of q_ref[b]
  cols = jnp.arange(head_dim, dtype=jnp.int32)[None, :]  # [1, D]
  # Gathers index every dimension with arrays (what both Triton and the interpreter take).
  q = plgpu_triton.load(q_ref.at[b, q_rows, cols], mask=row_ok[:, None], other=0)  # [bq, D]
  pos = plgpu_triton.load(positions_ref.at[b, t], mask=row_ok, other=-1)  # [bq]
  kv_len = kv_lens_ref[b]

  # Keys this program reduces over: its split, cut at the last key any row may see.
  lo = 0 if kv_split is None else s * kv_split
  hi = jnp.minimum(kv_len, jnp.max(pos) + 1)
  if kv_split is not None:
    hi = jnp.minimum(hi, lo + kv_split)
  num_steps = pl.cdiv(jnp.maximum(hi - lo, 0), block_k)

  def step(i, carry):
    # carry = (acc [bq, D], m [bq], l [bq]) float32
    keys = lo + i * block_k + jnp.arange(block_k, dtype=jnp.int32)  # [bk] logical keys
    key_ok = keys < kv_len  # entries past the request's blocks hold garbage (even NaN)
    logical = keys // block_size
    pages = plgpu_triton.load(tables_ref.at[b, logical], mask=logical < num_tables,
                              other=0)  # [bk] physical block of each key
    kv_idx = (pages[:, None], (keys % block_size)[:, None], cols)
    k = plgpu_triton.load(k_ref.at[kv_idx], mask=key_ok[:, None], other=0)  # [bk, D]
    v = plgpu_triton.load(v_ref.at[kv_idx], mask=key_ok[:, None], other=0)
    visible = key_ok[None, :] & (keys[None, :] <= pos[:, None])
    return online_softmax_step(carry, q, k, v, visible, scale=scale, precision=precision)

  init = (jnp.zeros((block_q, head_dim), jnp.float32),
          jnp.full((block_q,), -jnp.inf, jnp.float32), jnp.zeros((block_q,), jnp.float32))
  acc, m, l = jax.lax.fori_loop(0, num_steps, step, init)

  if kv_split is None:
    (o_ref,) = out_refs
    out = jnp.where(l[:, None] > 0, acc / l[:, None], 0.0)
    plgpu_triton.store(o_ref.at[b, q_rows, cols], out.astype(o_ref.dtype),
                       mask=row_ok[:, None])
  else:
    acc_ref, m_ref, l_ref = out_refs
    acc_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l


def check_inputs(q: jax.Array, k_pool: jax.Array, v_pool: jax.Array) -> None:
  """q [B, T, H, D] and one layer's pools [num_blocks, block_size, K, D] must fit."""
  nh, d = q.shape[2:]
  nk, dk = k_pool.shape[2:]
  if k_pool.shape != v_pool.shape or dk != d:
    raise ValueError(f"k_pool {k_pool.shape} / v_pool {v_pool.shape} do not fit q {q.shape}")
  if nh % nk:
    raise ValueError(f"{nh} query heads are not a multiple of {nk} kv heads")


def online_softmax_step(carry, q, k, v, visible, *, scale: float, precision):
  """One key tile of the online softmax (shared by the paged and the dedup kernels).

  carry = (acc [bq, D], m [bq], l [bq]) float32; q [bq, D], k and v [bk, D]; visible
  [bq, bk]. Scores are in log2 units (`scale` has log2(e) folded in): exp2 is one fast
  instruction. A row with no visible key yet keeps m = -inf, l = 0, acc = 0 exactly.
  """
  acc, m, l = carry
  scores = plgpu_triton.dot(q, k, trans_b=True, precision=precision) * scale  # [bq, bk] f32
  scores = jnp.where(visible, scores, -jnp.inf)
  m_new = jnp.maximum(m, jnp.max(scores, axis=1))
  m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
  alpha = jnp.exp2(m - m_safe)
  p = jnp.exp2(scores - m_safe[:, None])
  l = alpha * l + jnp.sum(p, axis=1)
  acc = alpha[:, None] * acc + plgpu_triton.dot(p.astype(v.dtype), v, precision=precision)
  return acc, m_new, l


def _merge_splits(acc, m, l):
  """Exact log-sum-exp merge of splits in split order (m in log2 units).

  acc [B, K, S, R, D], m and l [B, K, S, R] -> [B, K, R, D]. The sums are an unrolled
  chain, so their order is fixed; an empty split (m = -inf, l = 0, acc = 0) adds exact zeros.
  """
  m_max = jnp.max(m, axis=2)  # [B, K, R] (max is exact in any order)
  m_max = jnp.where(m_max == -jnp.inf, 0.0, m_max)
  w = jnp.exp2(m - m_max[:, :, None])  # [B, K, S, R]
  num, den = acc[:, :, 0] * w[:, :, 0, :, None], l[:, :, 0] * w[:, :, 0]
  for s in range(1, m.shape[2]):
    num = num + acc[:, :, s] * w[:, :, s, :, None]
    den = den + l[:, :, s] * w[:, :, s]
  return jnp.where(den[..., None] > 0, num / den[..., None], 0.0)


# ---------------------------------------------------------------------------- wrapper
@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def paged_attention(q: jax.Array, k_pool: jax.Array, v_pool: jax.Array, view: AttentionView,
                    *, config: TuningConfig | None = None, interpret: bool = False) -> jax.Array:
  """Attention of q [B, T, H, D] over one layer's pools [num_blocks, block_size, K, D].

  Query t of request b attends to logical keys j <= positions[b, t] and j < kv_lens[b].
  Returns [B, T, H, D] in q's dtype; softmax and accumulation in float32.
  """
  check_inputs(q, k_pool, v_pool)
  b, t, nh, d = q.shape
  nb, bs, nk, _ = k_pool.shape
  group = nh // nk
  config = config or default_config(t * group)
  mb = view.block_tables.shape[1]
  num_row_tiles = pl.cdiv(t * group, config.block_q)
  num_splits = 1 if config.kv_split is None else pl.cdiv(mb * bs, config.kv_split)
  grid = (b, nk, num_row_tiles, num_splits)

  full = lambda shape: pl.BlockSpec(shape, lambda *_: (0,) * len(shape))
  kv_spec = pl.BlockSpec((nb, bs, None, d), lambda b_, h, r, s: (0, 0, h, 0))
  in_specs = [full((b,)), full((b, mb)), full((b, t)), full((b, t * nh, d)), kv_spec, kv_spec]
  if config.kv_split is None:
    out_shape = [jax.ShapeDtypeStruct((b, t * nh, d), q.dtype)]
    out_specs = [full((b, t * nh, d))]
  else:
    rows = num_row_tiles * config.block_q
    out_shape = [jax.ShapeDtypeStruct((b, nk, num_splits, rows, d), jnp.float32),
                 jax.ShapeDtypeStruct((b, nk, num_splits, rows), jnp.float32),
                 jax.ShapeDtypeStruct((b, nk, num_splits, rows), jnp.float32)]
    out_specs = [
        pl.BlockSpec((None, None, None, config.block_q, d), lambda b_, h, r, s: (b_, h, s, r, 0)),
        pl.BlockSpec((None, None, None, config.block_q), lambda b_, h, r, s: (b_, h, s, r)),
        pl.BlockSpec((None, None, None, config.block_q), lambda b_, h, r, s: (b_, h, s, r))]

  precision = (jax.lax.Precision.HIGHEST if q.dtype == jnp.float32
               else jax.lax.Precision.DEFAULT)
  kernel = functools.partial(
      _paged_attention_kernel, block_q=config.block_q, block_k=config.block_k,
      kv_split=config.kv_split, num_heads=nh, group=group, scale=d ** -0.5 * math.log2(math.e),
      precision=precision)
  outs = pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=plgpu_triton.CompilerParams(num_warps=config.num_warps,
                                                  num_stages=config.num_stages),
      interpret=interpret, name="paged_attention",
  )(view.kv_lens, view.block_tables, view.positions, q.reshape(b, t * nh, d), k_pool, v_pool)

  if config.kv_split is None:
    return outs[0].reshape(b, t, nh, d)
  out = _merge_splits(*outs)[:, :, :t * group]  # [B, K, T * G, D]
  out = out.reshape(b, nk, t, group, d).transpose(0, 2, 1, 3, 4)
  return out.reshape(b, t, nh, d).astype(q.dtype)


def paged_attention_interpret(q, k_pool, v_pool, view, *, config=None):
  """The same kernel run by the Pallas interpreter (CPU tests, the engine on CPU)."""
  return paged_attention(q, k_pool, v_pool, view, config=config, interpret=True)


# -------------------------------------------------------------------------- reference
def paged_attention_reference(q: jax.Array, k_pool: jax.Array, v_pool: jax.Array,
                              view: AttentionView) -> jax.Array:
  """float32 oracle: gather every block in logical order, mask j <= pos and j < kv_len."""
  b, t, nh, d = q.shape
  nk = k_pool.shape[2]
  k = gather(k_pool, view.block_tables).astype(jnp.float32)  # [B, S, K, D]
  v = gather(v_pool, view.block_tables).astype(jnp.float32)
  qg = q.astype(jnp.float32).reshape(b, t, nk, nh // nk, d)  # [B, T, K, G, D]
  scores = jnp.einsum("btkgd,bskd->bkgts", qg, k,
                      precision=jax.lax.Precision.HIGHEST) * (d ** -0.5)
  keys = jnp.arange(k.shape[1], dtype=jnp.int32)
  visible = ((keys[None, None, :] <= view.positions[:, :, None])
             & (keys[None, None, :] < view.kv_lens[:, None, None]))  # [B, T, S]
  scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
  probs = jax.nn.softmax(scores, axis=-1)
  v = jnp.where(visible.any(1)[:, :, None, None], v, 0.0)  # garbage past kv_len (NaN too)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v, precision=jax.lax.Precision.HIGHEST)
  return out.reshape(b, t, nh, d)
