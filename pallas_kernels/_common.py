"""Pieces the paged and shared-prefix kernels share: launch limits, the online-softmax tile
step, one split's key loop (`split_partials`), the exact split merge (`merge_splits`), input
checks and the pool layout. The Triton paged decode and the shared-prefix decode compute
every split's partial with `split_partials` and merge with `merge_splits`: that is what
makes their outputs the same bits.

Pool layout (the kernels' plain-array interface): K and V pools are
`[layers, num_blocks, block_size, kv_heads, head_dim]` with a `layer` index picking one
layer, or one layer's `[num_blocks, block_size, kv_heads, head_dim]`. The kernels read the
picked layer straight out of the full pool: `flat_pool` views it as
`[layers * num_blocks, block_size, K, D]` (a reshape of a contiguous array, no copy) and a
block id b of layer l becomes l * num_blocks + b. Nothing slices `pool[layer]`, which XLA
would have to materialize as a copy of the whole layer before a custom call.
"""

from __future__ import annotations

import functools

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


def tile_queries(q_ref, positions_ref, b, h, rows: jax.Array, *, num_tokens: int, group: int,
                 num_heads: int):
  """(q [bq, D], pos [bq], row_ok [bq], q_rows [bq, 1]) of query rows `rows` of request b
  and kv head h (q_ref [B, T * H, D], positions_ref [B, T]): row = t * G + g is token t,
  query head h * G + g, row q_rows of q_ref[b] (and of the output's). Rows past T * G are
  padding (q 0, pos -1). The paged and the shared-prefix kernels load their queries by
  this one piece, so a row's operands are alike in both."""
  row_ok = rows < num_tokens * group
  t, g = rows // group, rows % group
  q_rows = (t * num_heads + h * group + g)[:, None]
  cols = jnp.arange(q_ref.shape[-1], dtype=jnp.int32)[None, :]
  # Gathers index every dimension with arrays (what both Triton and the interpreter take).
  q = plgpu_triton.load(q_ref.at[b, q_rows, cols], mask=row_ok[:, None], other=0)
  pos = plgpu_triton.load(positions_ref.at[b, t], mask=row_ok, other=-1)
  return q, pos, row_ok, q_rows


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


def split_partials(q, pos, row_ok, kv_len, lo, split_len, tables_ref, table_row,
                   layer_offset, k_ref, v_ref, ks_ref=None, vs_ref=None, *, block_k: int,
                   scale: float, precision, mask_every_tile: bool = False):
  """(acc [bq, D], m [bq], l [bq]) float32 of query rows q [bq, D] over one split's keys.

  The split is keys [lo, lo + split_len) (split_len None: [lo, ...)) of row `table_row` of
  `tables_ref` [rows, MB] (physical block of each logical block; + layer_offset in the
  flat pool), cut at kv_len and at the last key any row sees (max pos + 1); row i sees keys
  j <= pos[i] and j < kv_len. Rows that are not row_ok (pos = -1) accumulate whatever; the
  caller never reads them. k_ref, v_ref: [blocks, block_size, D] of one kv head; ks_ref,
  vs_ref: their FP8 scales [blocks, block_size], or None.

  Keys are reduced in tiles of block_k at fixed offsets lo + i * block_k. The leading tiles
  every valid row sees whole (they end at or before the smallest pos + 1 over row_ok rows
  and at or before kv_len) run without a mask: no causal compare, no load masks; the rest
  with the full mask. Both loops cover the same tiles in the same order and the tile step
  does the same arithmetic with and without a mask (`online_softmax_step`), so a row's bits
  depend only on its q, its pos, kv_len, lo, split_len and the keys: not on the other rows
  (this is what lets the shared-prefix kernel compute a split once for several requests).
  """
  block_q, head_dim = q.shape
  block_size = k_ref.shape[1]
  num_tables = tables_ref.shape[1]
  cols = jnp.arange(head_dim, dtype=jnp.int32)[None, :]
  quantized = ks_ref is not None
  hi = jnp.minimum(kv_len, jnp.max(pos) + 1)
  if split_len is not None:
    hi = jnp.minimum(hi, lo + split_len)
  num_steps = pl.cdiv(jnp.maximum(hi - lo, 0), block_k)
  # Padding rows (q = 0) accumulate something; it never reaches an output.
  visible_end = jnp.minimum(kv_len, jnp.min(jnp.where(row_ok, pos + 1, kv_len)))
  num_full = jnp.minimum(jnp.maximum(visible_end - lo, 0) // block_k, num_steps)
  if mask_every_tile:  # the plain path, kept to test that the unmasked tiles change no bit
    num_full = 0

  def step(i, carry, *, masked: bool):
    # carry = (acc [bq, D], m [bq], l [bq]) float32
    keys = lo + i * block_k + jnp.arange(block_k, dtype=jnp.int32)  # [bk] logical keys
    logical = keys // block_size
    pages = plgpu_triton.load(tables_ref.at[table_row, logical], mask=logical < num_tables,
                              other=0) + layer_offset  # [bk] physical block of each key
    kv_idx = (pages[:, None], (keys % block_size)[:, None], cols)
    scale_idx = (pages, keys % block_size)
    if not masked:  # keys < kv_len, so K/V need no load mask (the table keeps its bound)
      k = plgpu_triton.load(k_ref.at[kv_idx])  # [bk, D]
      v = plgpu_triton.load(v_ref.at[kv_idx])
      scales = {} if not quantized else dict(  # [bk] each
          k_scale=plgpu_triton.load(ks_ref.at[scale_idx]),
          v_scale=plgpu_triton.load(vs_ref.at[scale_idx]))
      return online_softmax_step(carry, q, k, v, None, scale=scale, precision=precision,
                                 **scales)
    key_ok = keys < kv_len  # entries past the request's blocks hold garbage (even NaN)
    k = load_kv_tile(k_ref, kv_idx, key_ok, q.dtype)  # [bk, D]
    v = load_kv_tile(v_ref, kv_idx, key_ok, q.dtype)
    scales = {} if not quantized else dict(
        k_scale=plgpu_triton.load(ks_ref.at[scale_idx], mask=key_ok, other=0),
        v_scale=plgpu_triton.load(vs_ref.at[scale_idx], mask=key_ok, other=0))
    visible = key_ok[None, :] & (keys[None, :] <= pos[:, None])
    return online_softmax_step(carry, q, k, v, visible, scale=scale, precision=precision,
                               **scales)

  init = (jnp.zeros((block_q, head_dim), jnp.float32),
          jnp.full((block_q,), -jnp.inf, jnp.float32), jnp.zeros((block_q,), jnp.float32))
  carry = jax.lax.fori_loop(0, num_full, functools.partial(step, masked=False), init)
  return jax.lax.fori_loop(num_full, num_steps, functools.partial(step, masked=True), carry)


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
  """The weighted sums of an exact log-sum-exp merge (the split merge, `merge_splits`).

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


def _merge_kernel(
    kv_lens_ref,  # [B] int32
    acc_ref,  # [S, block_q, block_d] f32 (this request, kv head, row tile, column tile)
    m_ref,  # [S, block_q] f32, log2 units
    l_ref,  # [S, block_q] f32
    o_ref,  # [B, T * H, D]
    *, block_q: int, block_d: int, kv_split: int, num_heads: int, group: int, unroll: int):
  """Exact log-sum-exp merge of one (request, kv head, row tile)'s splits, in split order.

  m_max is taken over all splits first (a max is exact in any order); then w_s * acc_s and
  w_s * l_s are summed in increasing s, one split after the other. Only the splits that
  start before kv_len are read: which ones depends on the request alone (not on the table
  width or the batch), and any other split would add exact zeros. A row with no visible key
  (l = 0 in every split) gives 0.
  """
  b, h, r, c = (pl.program_id(i) for i in range(4))
  num_splits = m_ref.shape[0]
  num_tokens = o_ref.shape[1] // num_heads

  rows = r * block_q + jnp.arange(block_q, dtype=jnp.int32)  # [block_q]
  row_ok = rows < num_tokens * group  # rows past T * G are padding: never read or written
  t, g = rows // group, rows % group
  q_rows = (t * num_heads + h * group + g)[:, None]  # [bq, 1] rows of o_ref[b]
  cols = (c * block_d + jnp.arange(block_d, dtype=jnp.int32))[None, :]  # [1, block_d]
  n = jnp.minimum(pl.cdiv(kv_lens_ref[b], kv_split), num_splits)
  num_iters = pl.cdiv(n, unroll)

  # Each iteration reads `unroll` splits with independent loads (in flight together: the
  # loop is long and narrow at long contexts); loads past n are masked off (m = -inf, l = 0,
  # acc = 0: weight 0, exact zeros), so the sums are the chain over s < n whatever unroll.
  def splits(i):
    for u in range(unroll):
      s = i * unroll + u
      yield jnp.minimum(s, num_splits - 1), row_ok & (s < n)

  def max_step(i, m_max):
    ms = [plgpu_triton.load(m_ref.at[s], mask=ok, other=-jnp.inf) for s, ok in splits(i)]
    for m_s in ms:
      m_max = jnp.maximum(m_max, m_s)
    return m_max

  m_max = jax.lax.fori_loop(0, num_iters, max_step,
                            jnp.full((block_q,), -jnp.inf, jnp.float32))
  m_max = jnp.where(m_max == -jnp.inf, 0.0, m_max)  # no visible key: every weight is 0

  def add_step(i, carry):
    loads = [(plgpu_triton.load(m_ref.at[s], mask=ok, other=-jnp.inf),
              plgpu_triton.load(l_ref.at[s], mask=ok, other=0.0),
              plgpu_triton.load(acc_ref.at[s], mask=ok[:, None], other=0.0))
             for s, ok in splits(i)]
    return add_partials(carry, loads, m_max)

  num, den = jax.lax.fori_loop(
      0, num_iters, add_step,
      (jnp.zeros((block_q, block_d), jnp.float32), jnp.zeros((block_q,), jnp.float32)))
  out = jnp.where(den[:, None] > 0, num / den[:, None], 0.0)
  plgpu_triton.store(o_ref.at[b, q_rows, cols], out.astype(o_ref.dtype),
                     mask=row_ok[:, None])


def merge_splits(kv_lens, acc, m, l, *, num_tokens: int, num_heads: int, block_q: int,
                  kv_split: int, out_dtype, interpret: bool, block_d: int | None = None):
  """Merges the per-split partials acc [B, K, S, R, D], m and l [B, K, S, R] (R =
  row tiles * block_q; m in log2 units) into [B, T * H, D] (q's layout) in one Pallas
  launch: the paged kernel's merge, and the shared-prefix kernel's (the same bits for the
  same partials). Split s of request b is read iff s * kv_split < kv_lens[b]."""
  b, nk, num_splits, rows, d = acc.shape
  group = num_heads // nk
  num_row_tiles = rows // block_q
  block_d = block_d or merge_block_d(b * nk * num_row_tiles, d)
  if d % block_d:
    raise ValueError(f"block_d={block_d} does not divide head_dim={d}")
  kernel = functools.partial(_merge_kernel, block_q=block_q, block_d=block_d,
                             kv_split=kv_split, num_heads=num_heads, group=group,
                             unroll=MERGE_UNROLL)
  return pl.pallas_call(
      kernel, grid=(b, nk, num_row_tiles, d // block_d),
      in_specs=[
          full_block((b,)),
          pl.BlockSpec((None, None, num_splits, block_q, block_d),
                       lambda b_, h, r, c: (b_, h, 0, r, c)),
          pl.BlockSpec((None, None, num_splits, block_q), lambda b_, h, r, c: (b_, h, 0, r)),
          pl.BlockSpec((None, None, num_splits, block_q), lambda b_, h, r, c: (b_, h, 0, r))],
      out_specs=full_block((b, num_tokens * num_heads, d)),
      out_shape=jax.ShapeDtypeStruct((b, num_tokens * num_heads, d), out_dtype),
      # About 8 elements per thread; no software pipelining: the unrolled loads already
      # keep several splits in flight and nothing feeds a dot.
      compiler_params=plgpu_triton.CompilerParams(
          num_warps=max(1, min(4, block_q * block_d // 256)), num_stages=1),
      interpret=interpret, name="paged_attention_merge",
  )(kv_lens, acc, m, l)
