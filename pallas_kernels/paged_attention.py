"""Paged grouped-query attention (decode and chunked prefill) as a Pallas GPU kernel.

Parts, as in jax's `pallas/ops/gpu/decode_attention.py`: the kernel body
(`_paged_attention_kernel`, its key loop `_common.split_partials`), the split merge kernel
(`_common.merge_splits`, shared with the shared-prefix kernel), the jitted wrapper
`paged_attention` with its `TuningConfig`, and the float32 `paged_attention_reference`.

Inputs are plain arrays (this package imports only jax): q `[B, T, H, D]`, the K and V pools
of all layers `[L, num_blocks, block_size, K, D]` with a `layer` index (or one layer's
`[num_blocks, block_size, K, D]`), per-request block tables `[B, MB]`, query positions
`[B, T]` and lengths `kv_lens [B]`. The kernel reads its layer out of the full pool (see
`_common.flat_pool`): passing `pool[layer]` instead would make XLA copy the layer first.

One program handles one request, one kv head, one tile of `block_q` query rows and one
split of the key sequence. Its query rows are the (token, head) pairs of the kv head's
group, row r = t * G + g, so each K/V tile is loaded once for all G query heads and all
T tokens of a prefill chunk. Each row carries its own position, so one kernel does decode
(T = 1), chunked prefill (causal within the chunk, cached blocks before it) and mixes.

Key loop: a program walks its keys in tiles of `block_k` at fixed logical offsets. The
leading tiles that every row of the tile sees whole (they end at or before the smallest
position + 1 over its rows and at or before kv_len) run without a mask: no causal compare,
no load masks. The rest (the diagonal of a prefill chunk, the last partial tile of a decode)
run with the full mask. The two loops cover the same tiles in the same order, and the
online-softmax step does the same arithmetic with and without a mask (it masks the max and
the probabilities, not the scores before exp2; see `online_softmax_step`), so skipping the
mask changes no bit.

Splits: with `kv_split`, the kernel writes per-split partials (acc, m, l) in float32 and a
second, small Pallas launch (`_common.merge_splits`, one program per request, kv head, row tile and
column tile of D) merges them and writes the output in q's layout and dtype. Without it,
the kernel normalizes and writes the output itself.

Exactness: a program reduces over keys in logical order in tiles of `block_k` tokens that
start at fixed logical offsets; splits cover fixed logical ranges `[s * kv_split, (s + 1) *
kv_split)`. The merge is an exact log-sum-exp (no epsilon): the max over splits first, then
the weighted sums in increasing split order; it reads only the splits that start before
kv_len (a split past it is empty and would add exact zeros), so neither the table width nor
the batch changes a bit. Nothing depends on where blocks live or on other requests, so dense
and deduplicated caches give bit-identical outputs.

FP8 K/V: with `k_scale` and `v_scale` (float32, one per token and kv head, the pools'
shape without head_dim), the pools hold float8_e4m3fn values x / s. The kernel loads the
e4m3 tiles and their scales and dequantizes in registers: the values convert to q's dtype
exactly and the scales multiply the scores and the probabilities (`online_softmax_step`),
so a K/V tile moves half the bytes of bfloat16 plus 4 per key and kv head. The reference
attends over the dequantized values in float32.

Backend: the Triton lowering of Pallas (`pl.pallas_call` with `plgpu_triton.CompilerParams`),
deprecated since JAX 0.11, chosen as the direct way to a correct kernel with per-key
block-table gathers. The Mosaic GPU (TMA, wgmma) kernels beside it (`paged_prefill_mgpu`,
`paged_attention_mgpu`) replace it where they are faster (docs/results.md).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu_triton

from pallas_kernels._common import (WARPS, check_inputs, dequantize_pool, dot_precision,
                                    flat_pool, flat_scales, full_block, gather_blocks,
                                    is_pow2, merge_splits, split_partials, tile_queries)


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
      if not is_pow2(v) or v < 16:
        raise ValueError(f"{name} must be a power of two >= 16 (a Triton dot needs 16), "
                         f"got {v}")
    if self.kv_split is not None and (self.kv_split <= 0 or self.kv_split % self.block_k):
      raise ValueError(f"kv_split must be None or a positive multiple of block_k="
                       f"{self.block_k}, got {self.kv_split}")
    if self.num_warps not in WARPS:
      raise ValueError(f"num_warps must be one of {WARPS}, got {self.num_warps}")
    if self.num_stages < 1:
      raise ValueError(f"num_stages must be >= 1, got {self.num_stages}")


DEFAULT_DECODE = TuningConfig(block_q=16, block_k=128, kv_split=1024, num_warps=4,
                              num_stages=3)  # the fastest measured at 64x4k (0.5B shape)
DEFAULT_PREFILL = TuningConfig(block_q=64, block_k=64, kv_split=None, num_warps=4,
                               num_stages=3)
# Head_dim 128 (7B shape): faster than 64 x 64 tiles on 32k causal tokens (docs/log/).
DEFAULT_PREFILL_D128 = TuningConfig(block_q=128, block_k=128, kv_split=None, num_warps=8,
                                    num_stages=3)


def default_config(num_query_rows: int, head_dim: int = 64) -> TuningConfig:
  """Decode-sized tiles for a few rows (T * G), prefill-sized tiles for a chunk.

  A function of shapes only, so dense and HQ caches (same shapes) get the same tiles and
  the same bits; docs/log/ has the measurements behind each choice.
  """
  if num_query_rows <= 16:
    return DEFAULT_DECODE
  return DEFAULT_PREFILL_D128 if head_dim >= 128 else DEFAULT_PREFILL


# ----------------------------------------------------------------------------- kernel
def _paged_attention_kernel(
    layer_ref,  # [1] int32: first block of this layer in the flat pool
    kv_lens_ref,  # [B] int32
    tables_ref,  # [B, MB] int32
    positions_ref,  # [B, T] int32
    q_ref,  # [B, T * H, D]
    k_ref,  # [layers * num_blocks, block_size, D] (this program's kv head)
    v_ref,  # [layers * num_blocks, block_size, D]
    *out_refs,  # FP8: k_scale, v_scale [layers * num_blocks, block_size] first; then
    #             unsplit: o [B, T * H, D]; split: acc [block_q, D], m [block_q], l [block_q]
    block_q: int, block_k: int, kv_split: int | None, num_heads: int, group: int,
    scale: float, precision, mask_every_tile: bool = False, quantized: bool = False):
  b, h, r, s = (pl.program_id(i) for i in range(4))
  ks_ref, vs_ref = out_refs[:2] if quantized else (None, None)
  out_refs = out_refs[2:] if quantized else out_refs
  num_tokens = positions_ref.shape[1]
  head_dim = k_ref.shape[2]

  # Query rows of this tile: row = t * G + g is token t, query head h * G + g.
  rows = r * block_q + jnp.arange(block_q, dtype=jnp.int32)  # [block_q]
  q, pos, row_ok, q_rows = tile_queries(q_ref, positions_ref, b, h, rows,
                                        num_tokens=num_tokens, group=group,
                                        num_heads=num_heads)  # [bq, D], [bq], [bq], [bq, 1]
  cols = jnp.arange(head_dim, dtype=jnp.int32)[None, :]  # [1, D]
  kv_len = kv_lens_ref[b]

  # Keys this program reduces over: its split, cut at the last key any row may see.
  lo = 0 if kv_split is None else s * kv_split
  acc, m, l = split_partials(q, pos, row_ok, kv_len, lo, kv_split, tables_ref, b,
                             layer_ref[0], k_ref, v_ref, ks_ref, vs_ref, block_k=block_k,
                             scale=scale, precision=precision,
                             mask_every_tile=mask_every_tile)

  if kv_split is None:
    (o_ref,) = out_refs
    out = jnp.where(l[:, None] > 0, acc / l[:, None], 0.0)
    plgpu_triton.store(o_ref.at[b, q_rows, cols], out.astype(o_ref.dtype),
                       mask=row_ok[:, None])
  else:
    acc_ref, m_ref, l_ref = out_refs

    @pl.when(lo < kv_len)  # the merge reads only splits that start before kv_len
    def _store():
      acc_ref[...] = acc
      m_ref[...] = m
      l_ref[...] = l


def _paged_attention(q, k_pool, v_pool, block_tables, positions, kv_lens, layer=None, *,
                     config, interpret, mask_every_tile=False, merge_block_d=None,
                     k_scale=None, v_scale=None):
  """`paged_attention` with private knobs for tests (not jitted on its own)."""
  check_inputs(q, k_pool, v_pool, block_tables, positions, kv_lens)
  ks_flat, vs_flat = flat_scales(k_scale, v_scale, k_pool)
  quantized = ks_flat is not None
  k_flat, v_flat, layer_offset = flat_pool(k_pool, v_pool, layer)
  b, t, nh, d = q.shape
  nb, bs, nk, _ = k_flat.shape
  group = nh // nk
  config = config or default_config(t * group, d)
  mb = block_tables.shape[1]
  num_row_tiles = pl.cdiv(t * group, config.block_q)
  num_splits = 1 if config.kv_split is None else pl.cdiv(mb * bs, config.kv_split)
  grid = (b, nk, num_row_tiles, num_splits)

  kv_spec = pl.BlockSpec((nb, bs, None, d), lambda b_, h, r, s: (0, 0, h, 0))
  in_specs = [full_block((1,)), full_block((b,)), full_block((b, mb)), full_block((b, t)),
              full_block((b, t * nh, d)), kv_spec, kv_spec]
  scale_args = ()
  if quantized:
    scale_spec = pl.BlockSpec((nb, bs, None), lambda b_, h, r, s: (0, 0, h))
    in_specs += [scale_spec, scale_spec]
    scale_args = (ks_flat, vs_flat)
  if config.kv_split is None:
    out_shape = [jax.ShapeDtypeStruct((b, t * nh, d), q.dtype)]
    out_specs = [full_block((b, t * nh, d))]
  else:
    rows = num_row_tiles * config.block_q
    out_shape = [jax.ShapeDtypeStruct((b, nk, num_splits, rows, d), jnp.float32),
                 jax.ShapeDtypeStruct((b, nk, num_splits, rows), jnp.float32),
                 jax.ShapeDtypeStruct((b, nk, num_splits, rows), jnp.float32)]
    out_specs = [
        pl.BlockSpec((None, None, None, config.block_q, d), lambda b_, h, r, s: (b_, h, s, r, 0)),
        pl.BlockSpec((None, None, None, config.block_q), lambda b_, h, r, s: (b_, h, s, r)),
        pl.BlockSpec((None, None, None, config.block_q), lambda b_, h, r, s: (b_, h, s, r))]

  kernel = functools.partial(
      _paged_attention_kernel, block_q=config.block_q, block_k=config.block_k,
      kv_split=config.kv_split, num_heads=nh, group=group, scale=d ** -0.5 * math.log2(math.e),
      precision=dot_precision(q.dtype), mask_every_tile=mask_every_tile, quantized=quantized)
  outs = pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=plgpu_triton.CompilerParams(num_warps=config.num_warps,
                                                  num_stages=config.num_stages),
      interpret=interpret, name="paged_attention",
  )(layer_offset, kv_lens, block_tables, positions, q.reshape(b, t * nh, d), k_flat, v_flat,
    *scale_args)

  if config.kv_split is None:
    return outs[0].reshape(b, t, nh, d)
  out = merge_splits(kv_lens, *outs, num_tokens=t, num_heads=nh,
                      block_q=config.block_q, kv_split=config.kv_split, out_dtype=q.dtype,
                      interpret=interpret, block_d=merge_block_d)
  return out.reshape(b, t, nh, d)


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def paged_attention(q: jax.Array, k_pool: jax.Array, v_pool: jax.Array,
                    block_tables: jax.Array, positions: jax.Array, kv_lens: jax.Array,
                    layer=None, *, k_scale: jax.Array | None = None,
                    v_scale: jax.Array | None = None, config: TuningConfig | None = None,
                    interpret: bool = False) -> jax.Array:
  """Attention of q [B, T, H, D] over the pools of `layer` ([L, NB, bs, K, D] and a layer
  index, an int or traced int32 scalar; or one layer's [NB, bs, K, D] and layer None).

  block_tables [B, MB] int32: physical block of each logical block (entries past a
  request's blocks must be valid block ids; they are never read). Query t of request b
  attends to logical keys j <= positions[b, t] and j < kv_lens[b]. Returns [B, T, H, D] in
  q's dtype; softmax and accumulation in float32.

  FP8 pools (float8_e4m3fn) come with k_scale, v_scale: float32, the pools' shape without
  head_dim (one scale per token and kv head; K/V = value * scale).
  """
  return _paged_attention(q, k_pool, v_pool, block_tables, positions, kv_lens, layer,
                          config=config, interpret=interpret, k_scale=k_scale,
                          v_scale=v_scale)


# -------------------------------------------------------------------------- reference
def paged_attention_reference(q: jax.Array, k_pool: jax.Array, v_pool: jax.Array,
                              block_tables: jax.Array, positions: jax.Array,
                              kv_lens: jax.Array, layer=None, *, k_scale=None,
                              v_scale=None) -> jax.Array:
  """float32 oracle: gather every block in logical order, mask j <= pos and j < kv_len
  (FP8 pools: over the dequantized values)."""
  b, t, nh, d = q.shape
  all_layers = k_pool.ndim == 5  # (scales have one axis less than their pool)
  pick = lambda x: x[layer] if all_layers and x is not None else x
  k_pool = dequantize_pool(pick(k_pool), pick(k_scale))
  v_pool = dequantize_pool(pick(v_pool), pick(v_scale))
  nk = k_pool.shape[2]
  k = gather_blocks(k_pool, block_tables)  # [B, S, K, D] float32
  v = gather_blocks(v_pool, block_tables)
  qg = q.astype(jnp.float32).reshape(b, t, nk, nh // nk, d)  # [B, T, K, G, D]
  scores = jnp.einsum("btkgd,bskd->bkgts", qg, k,
                      precision=jax.lax.Precision.HIGHEST) * (d ** -0.5)
  keys = jnp.arange(k.shape[1], dtype=jnp.int32)
  visible = ((keys[None, None, :] <= positions[:, :, None])
             & (keys[None, None, :] < kv_lens[:, None, None]))  # [B, T, S]
  scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
  probs = jax.nn.softmax(scores, axis=-1)
  v = jnp.where(visible.any(1)[:, :, None, None], v, 0.0)  # garbage past kv_len (NaN too)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v, precision=jax.lax.Precision.HIGHEST)
  return out.reshape(b, t, nh, d)
