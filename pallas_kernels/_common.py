"""Pieces the paged and shared-prefix kernels share: launch limits, the online-softmax tile
step, the exact split merge's weighted sums, input checks and the pool layout.

Pool layout (the kernels' plain-array interface): K and V pools are
`[layers, num_blocks, block_size, kv_heads, head_dim]` with a `layer` index picking one
layer, or one layer's `[num_blocks, block_size, kv_heads, head_dim]`. The kernels read the
picked layer straight out of the full pool: `flat_pool` views it as
`[layers * num_blocks, block_size, K, D]` (a reshape of a contiguous array, no copy) and a
block id b of layer l becomes l * num_blocks + b. Nothing slices `pool[layer]`, which XLA
would have to materialize as a copy of the whole layer before a custom call.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu_triton

WARPS = (1, 2, 4, 8, 16)  # the warp counts a Triton launch takes


def is_pow2(x: int) -> bool:
  return x > 0 and x & (x - 1) == 0


def full_block(shape) -> pl.BlockSpec:
  """A BlockSpec whose one block is the whole array (the kernel indexes it itself)."""
  return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def flat_pool(k_pool: jax.Array, v_pool: jax.Array, layer):
  """(k, v as [layers * num_blocks, bs, K, D], block offset of `layer` as an int32 [1]).

  Accepts all layers `[L, NB, bs, K, D]` with `layer` (an int or a traced int32 scalar) or
  one layer `[NB, bs, K, D]` with layer None/0.
  """
  if k_pool.shape != v_pool.shape:
    raise ValueError(f"k_pool {k_pool.shape} and v_pool {v_pool.shape} differ")
  if k_pool.ndim == 4:
    if layer not in (None, 0):
      raise ValueError(f"a one-layer pool {k_pool.shape} takes no layer index, got {layer}")
    return k_pool, v_pool, jnp.zeros((1,), jnp.int32)
  if k_pool.ndim != 5:
    raise ValueError(f"pools must be [layers, num_blocks, block_size, kv_heads, head_dim] "
                     f"or one layer's [num_blocks, block_size, kv_heads, head_dim], got "
                     f"{k_pool.shape}")
  if layer is None:
    raise ValueError(f"a pool of {k_pool.shape[0]} layers needs a layer index")
  nl, nb = k_pool.shape[:2]
  if isinstance(layer, int) and not 0 <= layer < nl:
    raise ValueError(f"layer {layer} is outside the pool's {nl} layers")
  offset = (jnp.asarray(layer, jnp.int32) * nb).reshape(1)
  flat = lambda p: p.reshape(nl * nb, *p.shape[2:])
  return flat(k_pool), flat(v_pool), offset


def layer_pool(pool: jax.Array, layer) -> jax.Array:
  """One layer's [NB, bs, K, D] (for the XLA references only: this does slice)."""
  return pool if pool.ndim == 4 else pool[layer]


def check_inputs(q: jax.Array, k_pool: jax.Array, v_pool: jax.Array, block_tables: jax.Array,
                 positions: jax.Array, kv_lens: jax.Array) -> None:
  """q [B, T, H, D], pools [(L,) NB, bs, K, D], tables [B, MB], positions [B, T], lens [B]."""
  if q.ndim != 4:
    raise ValueError(f"q must be [batch, tokens, heads, head_dim], got {q.shape}")
  b, t, nh, d = q.shape
  if k_pool.shape != v_pool.shape or k_pool.ndim not in (4, 5):
    raise ValueError(f"k_pool {k_pool.shape} / v_pool {v_pool.shape} must be equal "
                     "[(layers,) num_blocks, block_size, kv_heads, head_dim]")
  nk, dk = k_pool.shape[-2:]
  if dk != d:
    raise ValueError(f"pools of head_dim {dk} do not fit q {q.shape}")
  if nh % nk:
    raise ValueError(f"{nh} query heads are not a multiple of {nk} kv heads")
  if block_tables.ndim != 2 or block_tables.shape[0] != b:
    raise ValueError(f"block_tables must be [{b}, max_blocks], got {block_tables.shape}")
  if positions.shape != (b, t):
    raise ValueError(f"positions must be [{b}, {t}], got {positions.shape}")
  if kv_lens.shape != (b,):
    raise ValueError(f"kv_lens must be [{b}], got {kv_lens.shape}")
  for name, x in (("block_tables", block_tables), ("positions", positions),
                  ("kv_lens", kv_lens)):
    if x.dtype != jnp.int32:
      raise ValueError(f"{name} must be int32, got {x.dtype}")


def gather_blocks(pool: jax.Array, block_tables: jax.Array) -> jax.Array:
  """[NB, bs, K, D] pool, [B, MB] tables -> [B, MB * bs, K, D] in logical order."""
  b, mb = block_tables.shape
  _, bs, nk, d = pool.shape
  return pool[block_tables].reshape(b, mb * bs, nk, d)


def load_kv_tile(ref, idx, ok: jax.Array, dtype) -> jax.Array:
  """A [bk, D] K or V tile whose keys that are not `ok` read as 0 (those entries may hold
  garbage, NaN too). An e4m3 tile converts to `dtype` (exactly) on the load: Triton's
  lowering cannot build an e4m3 fill value, so it loads unfilled and is zeroed after the
  conversion, which gives the valid keys the bits of an unmasked load."""
  if ref.dtype == jnp.float8_e4m3fn:
    x = plgpu_triton.load(ref.at[idx], mask=ok[:, None]).astype(dtype)
    return jnp.where(ok[:, None], x, jnp.zeros((), dtype))
  return plgpu_triton.load(ref.at[idx], mask=ok[:, None], other=0)


def online_softmax_step(carry, q, k, v, visible, *, scale: float, precision, k_scale=None,
                        v_scale=None):
  """One key tile of the online softmax (shared by the paged and the dedup kernels).

  carry = (acc [bq, D], m [bq], l [bq]) float32; q [bq, D], k and v [bk, D]; visible
  [bq, bk] (or broadcastable to it), or None when every key of the tile is visible to every
  row (no mask computed). Scores are in log2 units (`scale` has log2(e) folded in): exp2 is
  one fast instruction. A row with no visible key yet keeps m = -inf, l = 0, acc = 0 exactly.

  FP8 K/V: k and v hold e4m3 values and k_scale, v_scale [bk] float32 their per-key scales
  (`dequantize_tile`'s contract). e4m3 converts to q's dtype exactly, and the scales are
  applied where they cost one multiply per key instead of one per element: q . (s k) =
  s (q . k) on the scores, sum_j p_j (s_j v_j) = sum_j (p_j s_j) v_j on the probabilities
  (l, the softmax denominator, sums the unscaled p).

  The mask is applied to the max and to the probabilities, not to the scores before exp2:
  so p = exp2(scores - m) is the same operations with and without a mask (a compiler may
  fuse `scores * scale - m` into one FMA, which a select in between would prevent in one
  path only), and a tile gives the same bits through either path when all of it is visible.
  """
  acc, m, l = carry
  # e4m3 pools, or pools of another dtype than q's (bfloat16 K/V under float32 weights):
  # both operands of a Triton dot must share one type, and these conversions are exact.
  k, v = k.astype(q.dtype), v.astype(q.dtype)
  scores = plgpu_triton.dot(q, k, trans_b=True, precision=precision) * scale  # [bq, bk] f32
  if k_scale is not None:
    scores = scores * k_scale[None, :]
  if visible is None:
    m_tile = jnp.max(scores, axis=1)
  else:
    m_tile = jnp.max(jnp.where(visible, scores, -jnp.inf), axis=1)
  m_new = jnp.maximum(m, m_tile)
  m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
  alpha = jnp.exp2(m - m_safe)
  p = jnp.exp2(scores - m_safe[:, None])
  if visible is not None:
    p = jnp.where(visible, p, 0.0)  # exp2 of a hidden score may be inf; it is dropped here
  l = alpha * l + jnp.sum(p, axis=1)
  pv = p if v_scale is None else p * v_scale[None, :]
  acc = alpha[:, None] * acc + plgpu_triton.dot(pv.astype(v.dtype), v, precision=precision)
  return acc, m_new, l


def flat_scales(k_scale, v_scale, k_pool: jax.Array):
  """FP8 pools' scales ([L, NB, bs, K] or one layer's [NB, bs, K], float32) viewed as the
  flat pool's [layers * num_blocks, bs, K] (`flat_pool`), checked against k_pool; (None,
  None) for unquantized pools."""
  if (k_scale is None) != (v_scale is None):
    raise ValueError("k_scale and v_scale go together (FP8 pools carry both)")
  quantized = k_pool.dtype == jnp.float8_e4m3fn
  if k_scale is None:
    if quantized:
      raise ValueError("float8_e4m3fn pools need their k_scale and v_scale")
    return None, None
  if not quantized:
    raise ValueError(f"scales given for {k_pool.dtype} pools (only float8_e4m3fn has them)")
  for name, sc in (("k_scale", k_scale), ("v_scale", v_scale)):
    if sc.shape != k_pool.shape[:-1] or sc.dtype != jnp.float32:
      raise ValueError(f"{name} must be float32 {k_pool.shape[:-1]} (one per token and kv "
                       f"head of the pool {k_pool.shape}), got {sc.dtype} {sc.shape}")
  flat = lambda x: x.reshape(-1, *x.shape[-2:])
  return flat(k_scale), flat(v_scale)


def dequantize_pool(pool: jax.Array, scale) -> jax.Array:
  """float32 K/V of a pool [..., D] and its scales [...] (None: unquantized): what the FP8
  kernels' references attend over (x = e4m3 value * scale)."""
  x = pool.astype(jnp.float32)
  return x if scale is None else x * scale[..., None].astype(jnp.float32)


def add_partials(carry, partials, m_max):
  """The weighted sums of an exact log-sum-exp merge (both kernels' merges).

  carry = (num [bq, D], den [bq]); partials = [(m [bq], l [bq], acc [bq, D])] in the merge's
  fixed order, m in log2 units; m_max [bq] is their max over everything merged (0 where
  that is -inf). An empty partial (m = -inf, l = 0, acc = 0) adds exact zeros.
  """
  num, den = carry
  for m_s, l_s, acc_s in partials:  # in the given order: the order of the sums
    w = jnp.exp2(m_s - m_max)
    num = num + w[:, None] * acc_s
    den = den + w * l_s
  return num, den


def dot_precision(dtype):
  """float32 inputs get full-precision dots (the tests' tolerance); bf16 the default."""
  return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else jax.lax.Precision.DEFAULT


# The merges read MERGE_UNROLL splits per loop iteration and split D into column tiles
# until the grid has _MERGE_MIN_PROGRAMS programs (an H200 has 132 SMs): at 1 request x 128k
# the merge is 2 (request, kv head) pairs x 128 splits, too narrow for a program per pair.
# Neither changes a bit: the sums run over splits, element by element. Not tuned; on the GPU
# it was no faster than the XLA merge it replaced (docs/log/).
MERGE_UNROLL = 8
_MERGE_MIN_PROGRAMS = 128
_MERGE_MIN_BLOCK_D = 16


def merge_block_d(num_tiles: int, head_dim: int) -> int:
  """Columns per merge program for num_tiles (request, kv head, row tile) triples."""
  block_d = head_dim
  while (block_d > _MERGE_MIN_BLOCK_D and block_d % 2 == 0
         and num_tiles * (head_dim // block_d) < _MERGE_MIN_PROGRAMS):
    block_d //= 2
  return block_d
