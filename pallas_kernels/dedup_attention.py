"""Shared-prefix ("deduplicated block") decode attention as a Pallas GPU kernel.

Parts, as in `paged_attention.py`: the kernel body (`_partials_kernel`), the merge kernel
(`_merge_kernel`), the jitted wrapper `dedup_attention` with its `TuningConfig`, and the
float32 `dedup_attention_reference`.

The HQ cache stores a block shared by C requests once, but paged decode still reads it C
times (once per request). Here a sharing plan (`SharingPlan` below, the kernel's input
format; `hq_jax.kv.sharing` builds it from block tables) names the shared runs
of blocks (trie nodes) and their requests; decode attention is split, as in FlashInfer's
cascade attention and Hydragen, into

  1. shared part: one program per (tile of a node's requests, kv head, split of the run).
     Its query rows are all G query heads of the kv head for `requests_per_tile` requests
     (row = slot * G + g), so each K/V tile is read once for all of them and the score and
     value products are matrix work;
  2. private part: one program per (request, kv head, split) over the request's keys after
     its deepest node, `[private_start, kv_len)`: paged decode with a shifted start;
  3. merge: one small Pallas launch (`_merge_kernel`, one program per request, kv head and
     column tile of D) gathers each request's float32 partials (acc, m, l) and merges them
     by an exact log-sum-exp (no epsilon) in a fixed order: its nodes root to deepest
     (`req_rows[b, d]`, d = 0, 1, ...), each over its splits in increasing order, then its
     private splits in increasing order. The max of m over all of them comes first, then
     the weighted sums in that order; the order depends only on the plan and the request,
     not on where blocks live. It writes the output in q's layout and dtype.

Both parts run the same kernel body (one launch each with their own tile sizes, or both in
one launch with `fused`); the merge only reads their partials, so it is the same either way.
An item (a tile or a request) reads keys [start, len) of one row of a block table (the
lengths are read in the kernel, and index arrays that depend only on shapes are constants:
no XLA work runs around the launches); its splits have a per-item length (cdiv(len - start,
splits) rounded to block_k), so a short item never launches long empty loops and the static
split count only sets parallelism.

The reduction order differs from the paged kernel's (other splits, and the shared part is
merged in separately), so outputs are equal within floating-point tolerance, not bit-exact:
the engine keeps exact paged decode as its default. Decode (T = 1) only; anything else, and
a plan with no shared node, is handed to the paged kernel (bit-identical to it).

Split counts are static: splits of at most `kv_split` keys, raised until a launch has
`min_programs` programs, so a few tiles over a short prefix still fill the GPU.

FP8 K/V: with `k_scale` and `v_scale` (one float32 per token and kv head), e4m3 pools are
read and dequantized in registers as in `paged_attention.py` (`online_softmax_step`); the
reference attends over the dequantized values.

Backend: the Triton lowering of Pallas, like `paged_attention.py` (same gather loads through
block tables, which is what works in both Triton and the interpreter today).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu_triton

from pallas_kernels._common import (MERGE_UNROLL, WARPS, add_partials, check_inputs,
                                    dequantize_pool, dot_precision, flat_pool, flat_scales,
                                    full_block, gather_blocks, is_pow2, merge_block_d,
                                    load_kv_tile, online_softmax_step)
from pallas_kernels.paged_attention import paged_attention


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SharingPlan:
  """Which requests of a decode batch share runs of blocks, as padded int32 arrays.

  The kernel's input format (built from block tables by `hq_jax.kv.sharing.build_plan`):
  node_tables   [N, NB]   physical blocks of each node's run (0 past its end)
  node_lens     [N]       tokens of each node (0 for padding nodes)
  tile_node     [TL]      node of each tile (0 for padding tiles)
  tile_reqs     [TL, RPT] batch row of each request of a tile, -1 = none; a tile's
                          requests fill its slots from 0, so slot 0 = -1 marks a padding
                          tile (the kernels rely on this)
  req_rows      [B, DEP]  flat tile row (tile * RPT + slot) of request b's d-th node, -1 = none
  private_start [B]       first key of each request's private remainder (block aligned)
  """

  node_tables: jax.Array
  node_lens: jax.Array
  tile_node: jax.Array
  tile_reqs: jax.Array
  req_rows: jax.Array
  private_start: jax.Array
  requests_per_tile: int = dataclasses.field(metadata=dict(static=True), default=1)
  # Longest private remainder, a power of two: sets how many splits the private part
  # launches (a hint only; longer remainders stay correct). Bucketed by the planner so a
  # decode loop does not recompile every time a remainder grows.
  private_tokens_hint: int = dataclasses.field(metadata=dict(static=True), default=0)
  # Whether any node exists. Without one the kernel is plain paged decode (the same
  # launch, the same bits), so a batch that shares nothing never pays for the split.
  has_shared: bool = dataclasses.field(metadata=dict(static=True), default=True)

  @property
  def num_tiles(self) -> int:
    return self.tile_node.shape[0]


@dataclasses.dataclass(frozen=True)
class TuningConfig:
  """Tile sizes for the shared and private launches.

  shared_block_q: query rows per shared program (>= requests_per_tile * G of the plan).
  shared_block_k / private_block_k: keys per inner step (powers of two >= 16).
  shared_kv_split / private_kv_split: most keys per split; the static split count is
    cdiv(longest node or private hint, kv_split), raised until a launch has at least
    min_programs programs (a few per SM: a small batch still fills the GPU), never
    above one split per block_k keys or max_splits.
  private_block_q: rows per private program (>= G: one request's query heads).
  fused: one launch for both parts instead of two (shared_num_warps/stages apply to both).
  """

  shared_block_q: int = 64
  shared_block_k: int = 64
  shared_kv_split: int = 2048
  shared_num_warps: int = 4
  shared_num_stages: int = 2
  private_block_q: int = 16
  private_block_k: int = 128
  private_kv_split: int = 1024
  private_num_warps: int = 4
  private_num_stages: int = 3
  max_splits: int = 64
  min_programs: int = 264  # 2 x the 132 SMs of an H100/H200
  # One launch for both parts (shared and private programs alternate, so compute-bound
  # tiles and memory-bound remainders run side by side), with the shared warps and stages.
  fused: bool = False

  def __post_init__(self):
    for name in ("shared_block_q", "shared_block_k", "private_block_q", "private_block_k"):
      v = getattr(self, name)
      if not is_pow2(v) or v < 16:
        raise ValueError(f"{name} must be a power of two >= 16 (a Triton dot needs 16), "
                         f"got {v}")
    for name, block in (("shared_kv_split", "shared_block_k"),
                        ("private_kv_split", "private_block_k")):
      v = getattr(self, name)
      if v <= 0 or v % getattr(self, block):
        raise ValueError(f"{name} must be a positive multiple of {block}="
                         f"{getattr(self, block)}, got {v}")
    for name in ("shared_num_warps", "private_num_warps"):
      if getattr(self, name) not in WARPS:
        raise ValueError(f"{name} must be one of {WARPS}, got {getattr(self, name)}")
    for name in ("shared_num_stages", "private_num_stages", "max_splits", "min_programs"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

  def requests_per_tile(self, group: int) -> int:
    """Requests whose G query heads fill one shared tile (what the planner needs)."""
    if group > self.shared_block_q:
      raise ValueError(f"a group of {group} query heads does not fit shared_block_q="
                       f"{self.shared_block_q}")
    return self.shared_block_q // group


DEFAULT = TuningConfig()  # the fastest measured at head_dim 64 (Qwen-0.5B shape)
# Head_dim 128 (Qwen-7B shape): 128-row tiles of 128 keys, about one wave of long shared
# programs (splits of up to 8192 keys), both parts in one launch.
DEFAULT_D128 = TuningConfig(shared_block_q=128, shared_block_k=128, shared_num_warps=8,
                            shared_num_stages=2, shared_kv_split=8192, min_programs=128,
                            fused=True)


def default_config(head_dim: int) -> TuningConfig:
  """The measured best tiles for a head size (docs/log/, the shared-prefix decode kernel)."""
  return DEFAULT_D128 if head_dim >= 128 else DEFAULT


# ----------------------------------------------------------------------------- kernel
@dataclasses.dataclass(frozen=True)
class _Part:
  """Static shape of one kind of item (shared tiles or private remainders)."""

  num_items: int
  block_q: int
  block_k: int
  num_splits: int

  @property
  def num_programs(self) -> int:
    return self.num_items * self.num_splits  # times the kv heads


def _split_len(n, part: _Part):
  """Keys per split of an item of n keys: cdiv(n, splits) rounded up to block_k (0 if n = 0).

  Split s covers item keys [s * split_len, min(n, (s + 1) * split_len)); it is non-empty iff
  s * split_len < n (which implies s < num_splits). Static divisors only (Triton).
  """
  per_split = (n + part.num_splits - 1) // part.num_splits
  return (per_split + part.block_k - 1) // part.block_k * part.block_k


def _item_partials(i, h, s, item_refs, layer_ref, q_ref, k_ref, v_ref, scale_refs=(), *,
                   part: _Part, group: int, scale: float, precision):
  """(acc [bq, D], m [bq], l [bq]) of item i, kv head h, split s (m in log2 units).

  item_refs = (item_table [I], item_start [I], table_lens [NT], item_reqs [I, RPT],
  tables [NT, MBt]); layer_ref [1]: the layer's first block in the flat pool. Item i reads keys [item_start[i], table_lens[item_table[i]]) of row
  item_table[i] of `tables` (item_start block aligned; none if slot 0 holds no request:
  a padding tile, since `build_plan` fills a tile's slots from 0); its query rows are
  slot * G + g for the requests item_reqs[i, slot]. k_ref, v_ref: [num_blocks, block_size,
  D] of kv head h, all layers; scale_refs: FP8 pools' (k_scale, v_scale) [num_blocks,
  block_size] of kv head h, or (). Lengths are read here, not computed in XLA around the launch (that
  would be extra small kernels per call); a scalar load, not a reduction over the tile's
  requests, which cost registers (and stack in the fused launch) on sm_90.
  """
  item_table_ref, item_start_ref, table_lens_ref, item_reqs_ref, tables_ref = item_refs
  layer_offset = layer_ref[0]
  block_q, block_k = part.block_q, part.block_k
  rpt = item_reqs_ref.shape[1]
  num_tables = tables_ref.shape[1]
  block_size, head_dim = k_ref.shape[1], k_ref.shape[2]

  # Row = slot * G + g: request item_reqs[i, slot], query head h * G + g.
  rows = jnp.arange(block_q, dtype=jnp.int32)
  slot, g = rows // group, rows % group
  row_ok = rows < rpt * group
  req = plgpu_triton.load(item_reqs_ref.at[i, jnp.minimum(slot, rpt - 1)], mask=row_ok,
                          other=-1)  # [bq]
  row_ok = row_ok & (req >= 0)
  req = jnp.maximum(req, 0)
  cols = jnp.arange(head_dim, dtype=jnp.int32)[None, :]
  q = plgpu_triton.load(q_ref.at[req[:, None], (h * group + g)[:, None], cols],
                        mask=row_ok[:, None], other=0)  # [bq, D]

  table = item_table_ref[i]
  offset = item_start_ref[i]  # in keys
  used = item_reqs_ref[i, 0] >= 0
  n = jnp.where(used, jnp.maximum(table_lens_ref[table] - offset, 0), 0)
  split_len = _split_len(n, part)
  lo = s * split_len
  hi = jnp.minimum(n, lo + split_len)
  num_steps = (jnp.maximum(hi - lo, 0) + block_k - 1) // block_k
  # Whole tiles (every key below hi) skip the key mask and the load masks; only a last
  # partial tile is masked. Same tiles in the same order either way (see
  # online_softmax_step: a fully visible tile gives the same bits through both paths).
  num_full = jnp.maximum(hi - lo, 0) // block_k

  def step(j, carry, *, masked: bool):
    # carry = (acc [bq, D], m [bq], l [bq]) float32
    keys = lo + j * block_k + jnp.arange(block_k, dtype=jnp.int32)  # [bk] item keys
    logical = jnp.minimum((offset + keys) // block_size, num_tables - 1)
    if not masked:
      pages = plgpu_triton.load(tables_ref.at[table, logical]) + layer_offset
      kv_idx = (pages[:, None], ((offset + keys) % block_size)[:, None], cols)
      k = plgpu_triton.load(k_ref.at[kv_idx])  # [bk, D]
      v = plgpu_triton.load(v_ref.at[kv_idx])
      scale_idx = (pages, (offset + keys) % block_size)
      scales = dict(zip(("k_scale", "v_scale"), (  # FP8: [bk] each
          plgpu_triton.load(r.at[scale_idx]) for r in scale_refs)))
      return online_softmax_step(carry, q, k, v, None, scale=scale, precision=precision,
                                 **scales)
    key_ok = keys < hi  # past the item: other requests' blocks or garbage (NaN too)
    pages = plgpu_triton.load(tables_ref.at[table, logical], mask=key_ok,
                              other=0) + layer_offset
    kv_idx = (pages[:, None], ((offset + keys) % block_size)[:, None], cols)
    k = load_kv_tile(k_ref, kv_idx, key_ok, q.dtype)  # [bk, D]
    v = load_kv_tile(v_ref, kv_idx, key_ok, q.dtype)
    scale_idx = (pages, (offset + keys) % block_size)
    scales = dict(zip(("k_scale", "v_scale"), (
        plgpu_triton.load(r.at[scale_idx], mask=key_ok, other=0) for r in scale_refs)))
    return online_softmax_step(carry, q, k, v, key_ok[None, :], scale=scale,
                               precision=precision, **scales)

  init = (jnp.zeros((block_q, head_dim), jnp.float32),
          jnp.full((block_q,), -jnp.inf, jnp.float32), jnp.zeros((block_q,), jnp.float32))
  carry = jax.lax.fori_loop(0, num_full, functools.partial(step, masked=False), init)
  return jax.lax.fori_loop(num_full, num_steps, functools.partial(step, masked=True), carry)


def _partials_kernel(*refs, part: _Part, quantized: bool, **kw):
  """Grid (item, kv head, split); outputs are this program's blocks."""
  item_refs, layer_ref = refs[:5], refs[5]
  n = 11 if quantized else 9  # FP8: k_scale, v_scale after q, k, v
  (q_ref, k_ref, v_ref, *scale_refs), (acc_ref, m_ref, l_ref) = refs[6:n], refs[n:]
  i, h, s = (pl.program_id(a) for a in range(3))
  acc, m, l = _item_partials(i, h, s, item_refs, layer_ref, q_ref, k_ref, v_ref,
                             tuple(scale_refs), part=part, **kw)
  acc_ref[...] = acc
  m_ref[...] = m
  l_ref[...] = l


def _fused_program(p, shared: _Part, private: _Part, num_kv_heads: int):
  """Program p of the fused launch -> (is_shared 1/0, item, kv head, split).

  Shared and private programs alternate while both last (a compute-bound tile and a
  memory-bound remainder share an SM), then the longer kind runs alone. Within a kind the
  item index is fastest, so a node's tiles read a split at about the same time (L2).
  """
  n_s = shared.num_programs * num_kv_heads
  n_p = private.num_programs * num_kv_heads
  both = min(n_s, n_p)
  mixed = p < 2 * both
  # int32 throughout (the Triton lowering does not select between booleans).
  is_shared = jnp.where(mixed, 1 - p % 2, int(n_s > n_p))
  j = jnp.where(mixed, p // 2, p - both)
  # Static divisors for each kind, then a select (a traced divisor does not lower).
  unravel = lambda n: (j % n, (j // n) % num_kv_heads, j // (n * num_kv_heads))
  return (is_shared, *(jnp.where(is_shared == 1, a, b) for a, b in
                       zip(unravel(shared.num_items), unravel(private.num_items))))


def _fused_kernel(*refs, shared: _Part, private: _Part, num_kv_heads: int, quantized: bool,
                  **kw):
  """Both kinds of items in one launch: grid (programs,), outputs whole arrays."""
  s_items, p_items, layer_ref = refs[:5], refs[5:10], refs[10]
  n = 16 if quantized else 14  # FP8: k_scale, v_scale after q, k, v
  (q_ref, k_ref, v_ref, *scale_refs), s_out, p_out = refs[11:n], refs[n:n + 3], refs[n + 3:]
  is_shared, i, h, s = _fused_program(pl.program_id(0), shared, private, num_kv_heads)
  cols = jnp.arange(k_ref.shape[2], dtype=jnp.int32)[None, :]

  for flag, items, out, part in ((is_shared == 1, s_items, s_out, shared),
                                 (is_shared == 0, p_items, p_out, private)):
    @pl.when(flag)
    def _(items=items, out=out, part=part):
      acc, m, l = _item_partials(i, h, s, items, layer_ref, q_ref, k_ref, v_ref,
                                 tuple(scale_refs), part=part, **kw)
      rows = jnp.arange(part.block_q, dtype=jnp.int32)
      plgpu_triton.store(out[0].at[i, h, s, rows[:, None], cols], acc)
      plgpu_triton.store(out[1].at[i, h, s, rows], m)
      plgpu_triton.store(out[2].at[i, h, s, rows], l)


def _kernel_kw(q3, k_pool):
  d = q3.shape[-1]
  return dict(group=q3.shape[1] // k_pool.shape[2], scale=d ** -0.5 * math.log2(math.e),
              precision=dot_precision(q3.dtype))


def _out_shapes(part: _Part, nk: int, d: int):
  lead = (part.num_items, nk, part.num_splits, part.block_q)
  return [jax.ShapeDtypeStruct(lead + (d,), jnp.float32),
          jax.ShapeDtypeStruct(lead, jnp.float32), jax.ShapeDtypeStruct(lead, jnp.float32)]


def _partials(q3, k_pool, v_pool, layer_offset, items, scales=(), *, part: _Part, num_warps,
              num_stages, interpret, name):
  """One launch over one kind of items: raw partials [I, K, S, block_q, (D)], m in log2.
  scales: FP8 pools' flat (k_scale, v_scale) [num_blocks, bs, K], or ()."""
  nb, bs, nk, d = k_pool.shape
  grid = (part.num_items, nk, part.num_splits)  # items fastest: tiles read a split together
  kv_spec = pl.BlockSpec((nb, bs, None, d), lambda i, h, s: (0, 0, h, 0))
  scale_spec = pl.BlockSpec((nb, bs, None), lambda i, h, s: (0, 0, h))
  in_specs = ([full_block(x.shape) for x in items]
              + [full_block((1,)), full_block(q3.shape), kv_spec, kv_spec]
              + [scale_spec] * len(scales))
  out_specs = [
      pl.BlockSpec((None, None, None, part.block_q, d), lambda i, h, s: (i, h, s, 0, 0)),
      pl.BlockSpec((None, None, None, part.block_q), lambda i, h, s: (i, h, s, 0)),
      pl.BlockSpec((None, None, None, part.block_q), lambda i, h, s: (i, h, s, 0))]
  return pl.pallas_call(
      functools.partial(_partials_kernel, part=part, quantized=bool(scales),
                        **_kernel_kw(q3, k_pool)),
      grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=_out_shapes(part, nk, d),
      compiler_params=plgpu_triton.CompilerParams(num_warps=num_warps,
                                                  num_stages=num_stages),
      interpret=interpret, name=name,
  )(*items, layer_offset, q3, k_pool, v_pool, *scales)


def _fused_partials(q3, k_pool, v_pool, layer_offset, s_items, p_items, scales=(), *,
                    shared: _Part, private: _Part, num_warps, num_stages, interpret):
  """Both launches' programs in one launch: (shared partials, private partials)."""
  nb, bs, nk, d = k_pool.shape
  num_programs = (shared.num_programs + private.num_programs) * nk
  head = lambda p: _fused_program(p, shared, private, nk)[2]
  kv_spec = pl.BlockSpec((nb, bs, None, d), lambda p: (0, 0, head(p), 0))
  scale_spec = pl.BlockSpec((nb, bs, None), lambda p: (0, 0, head(p)))
  in_specs = ([full_block(x.shape) for x in (*s_items, *p_items)]
              + [full_block((1,)), full_block(q3.shape), kv_spec, kv_spec]
              + [scale_spec] * len(scales))
  out_shape = _out_shapes(shared, nk, d) + _out_shapes(private, nk, d)
  outs = pl.pallas_call(
      functools.partial(_fused_kernel, shared=shared, private=private, num_kv_heads=nk,
                        quantized=bool(scales), **_kernel_kw(q3, k_pool)),
      grid=(num_programs,), in_specs=in_specs,
      out_specs=[full_block(o.shape) for o in out_shape],
      out_shape=out_shape,
      compiler_params=plgpu_triton.CompilerParams(num_warps=num_warps,
                                                  num_stages=num_stages),
      interpret=interpret, name="dedup_attention_fused",
  )(*s_items, *p_items, layer_offset, q3, k_pool, v_pool, *scales)
  return outs[:3], outs[3:]


def _merge_kernel(req_rows_ref, tile_node_ref, node_lens_ref, start_ref, kv_lens_ref,
                  s_acc_ref, s_m_ref, s_l_ref, p_acc_ref, p_m_ref, p_l_ref, o_ref, *,
                  shared: _Part, private: _Part, rpt: int, group: int, block_g: int,
                  block_d: int):
  """Exact log-sum-exp merge of request b's partials for kv head h, column tile c.

  The partials, in this fixed order: the node rows req_rows[b, d] for d = 0, 1, ... (root
  to deepest; tile r // RPT, rows (r % RPT) * G + g), each over its splits in increasing
  order, then the private rows g over their splits in increasing order. m_max is taken over
  all of them first (a max is exact in any order); then w * acc and w * l (w = exp2(m -
  m_max)) are summed in that order, one partial after the other. The order depends only on
  the plan and the request. Only splits that can be non-empty (s * split_len < the item's
  length) are read; any other holds m = -inf, l = 0, acc = 0 and would add exact zeros.
  A row with no visible key gives 0. Rows g >= G (block_g pads G to a power of two) are
  never read or written.
  """
  b, h, c = (pl.program_id(i) for i in range(3))
  rows = jnp.arange(block_g, dtype=jnp.int32)
  row_ok = rows < group
  g = jnp.minimum(rows, group - 1)  # loads: padding rows address row G - 1 (masked off)
  cols = (c * block_d + jnp.arange(block_d, dtype=jnp.int32))[None, :]  # [1, block_d]

  # (partial refs, item, its rows [block_g], its length in keys, its part), in merge order.
  sources = []
  for d in range(req_rows_ref.shape[1]):
    r = req_rows_ref[b, d]
    tile = jnp.maximum(r, 0) // rpt  # static divisors (Triton)
    slot = jnp.maximum(r, 0) % rpt
    n = jnp.where(r >= 0, node_lens_ref[tile_node_ref[tile]], 0)
    sources.append(((s_acc_ref, s_m_ref, s_l_ref), tile, slot * group + g, n, shared))
  n = jnp.maximum(kv_lens_ref[b] - start_ref[b], 0)
  sources.append(((p_acc_ref, p_m_ref, p_l_ref), b, g, n, private))

  def fold(src, step, carry):
    """carry = step(carry, [(s, mask)] of `unroll` splits) over the item's splits in order.

    Each iteration reads `unroll` splits with independent loads (in flight together); a
    split that cannot be non-empty is masked off (no memory traffic, exact zeros)."""
    n, part = src[3], src[4]
    split_len = _split_len(n, part)
    unroll = min(MERGE_UNROLL, part.num_splits)
    bound = jnp.minimum(pl.cdiv(n, part.block_k), part.num_splits)  # >= non-empty splits

    def body(i, carry):
      splits = [(jnp.minimum(i * unroll + u, part.num_splits - 1),
                 row_ok & ((i * unroll + u) * split_len < n)) for u in range(unroll)]
      return step(carry, splits)

    return jax.lax.fori_loop(0, pl.cdiv(bound, unroll), body, carry)

  m_max = jnp.full((block_g,), -jnp.inf, jnp.float32)
  for src in sources:
    (_, m_ref, _), item, src_rows = src[:3]

    def max_step(m_max, splits, m_ref=m_ref, item=item, src_rows=src_rows):
      ms = [plgpu_triton.load(m_ref.at[item, h, s, src_rows], mask=ok, other=-jnp.inf)
            for s, ok in splits]
      for m_s in ms:
        m_max = jnp.maximum(m_max, m_s)
      return m_max

    m_max = fold(src, max_step, m_max)
  m_max = jnp.where(m_max == -jnp.inf, 0.0, m_max)  # no visible key: every weight is 0

  carry = (jnp.zeros((block_g, block_d), jnp.float32), jnp.zeros((block_g,), jnp.float32))
  for src in sources:
    (acc_ref, m_ref, l_ref), item, src_rows = src[:3]

    def add_step(carry, splits, acc_ref=acc_ref, m_ref=m_ref, l_ref=l_ref, item=item,
                 src_rows=src_rows):
      loads = [(plgpu_triton.load(m_ref.at[item, h, s, src_rows], mask=ok, other=-jnp.inf),
                plgpu_triton.load(l_ref.at[item, h, s, src_rows], mask=ok, other=0.0),
                plgpu_triton.load(acc_ref.at[item, h, s, src_rows[:, None], cols],
                                  mask=ok[:, None], other=0.0))
               for s, ok in splits]
      return add_partials(carry, loads, m_max)  # in increasing split order

    carry = fold(src, add_step, carry)
  num, den = carry
  out = jnp.where(den[:, None] > 0, num / den[:, None], 0.0)
  # Distinct addresses for the padding rows too: the interpreter stores a masked row by
  # writing back what it read, so two rows on one address could undo a write.
  plgpu_triton.store(o_ref.at[b, (h * group + rows)[:, None], cols],
                     out.astype(o_ref.dtype), mask=row_ok[:, None])


def _merge_partials(plan: SharingPlan, kv_lens, s_raw, p_raw, *, shared: _Part,
                    private: _Part, num_heads: int, out_dtype, interpret: bool):
  """Merges each request's node and private partials into [B, H, D] in one Pallas launch.

  Grid (request, kv head, column tile of D): D is split (as in the paged merge) until the
  grid has enough programs; the sums run element by element, so that changes no bit.
  """
  b, nk = p_raw[1].shape[:2]
  d = p_raw[0].shape[-1]
  group = num_heads // nk
  block_g = max(16, 1 << (group - 1).bit_length())  # Triton tiles: powers of two
  block_d = merge_block_d(b * nk, d)
  kernel = functools.partial(_merge_kernel, shared=shared, private=private,
                             rpt=plan.requests_per_tile, group=group, block_g=block_g,
                             block_d=block_d)
  args = (plan.req_rows, plan.tile_node, plan.node_lens, plan.private_start, kv_lens,
          *s_raw, *p_raw)
  return pl.pallas_call(
      kernel, grid=(b, nk, d // block_d), in_specs=[full_block(x.shape) for x in args],
      out_specs=full_block((b, num_heads, d)),
      out_shape=jax.ShapeDtypeStruct((b, num_heads, d), out_dtype),
      compiler_params=plgpu_triton.CompilerParams(
          num_warps=max(1, min(4, block_g * block_d // 256)), num_stages=1),
      interpret=interpret, name="dedup_attention_merge",
  )(*args)


def _num_splits(tokens: int, items: int, kv_heads: int, *, kv_split: int, block_k: int,
                min_programs: int, cap: int) -> int:
  """Static split count: splits of <= kv_split keys, more while the grid is small."""
  by_length = -(-tokens // kv_split)
  by_fill = -(-min_programs // (items * kv_heads))
  most = min(cap, -(-tokens // block_k))  # a split holds at least one key tile
  return max(1, min(max(by_length, by_fill), most))


# ---------------------------------------------------------------------------- wrapper
@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def dedup_attention(q: jax.Array, k_pool: jax.Array, v_pool: jax.Array,
                    block_tables: jax.Array, positions: jax.Array, kv_lens: jax.Array,
                    plan: SharingPlan | None, layer=None, *, k_scale: jax.Array | None = None,
                    v_scale: jax.Array | None = None, config: TuningConfig | None = None,
                    interpret: bool = False) -> jax.Array:
  """Decode attention of q [B, 1, H, D] over the pools of `layer`, shared runs read once.

  Pools, tables, positions, lengths, `layer` and FP8 scales as for `paged_attention`. `plan` must come
  from the same batch's block tables (`hq_jax.kv.sharing.build_plan`). Without a plan, with
  T > 1, or with a plan with no shared node (nothing to read once), this is the paged
  kernel, unchanged. Returns [B, 1, H, D] in q's dtype; float32 softmax and accumulation.
  """
  check_inputs(q, k_pool, v_pool, block_tables, positions, kv_lens)
  b, t, nh, d = q.shape
  if plan is None or t != 1 or not plan.has_shared:
    return paged_attention(q, k_pool, v_pool, block_tables, positions, kv_lens, layer,
                           k_scale=k_scale, v_scale=v_scale, interpret=interpret)
  ks_flat, vs_flat = flat_scales(k_scale, v_scale, k_pool)
  scales = () if ks_flat is None else (ks_flat, vs_flat)
  k_pool, v_pool, layer_offset = flat_pool(k_pool, v_pool, layer)
  nb, bs, nk, _ = k_pool.shape
  config = config or default_config(d)
  group = nh // nk
  rpt = plan.requests_per_tile
  if rpt * group > config.shared_block_q:
    raise ValueError(f"the plan's tiles hold {rpt} requests x {group} heads = {rpt * group} "
                     f"rows, more than shared_block_q={config.shared_block_q}")
  if group > config.private_block_q:
    raise ValueError(f"{group} query heads per kv head exceed private_block_q="
                     f"{config.private_block_q}")
  if plan.req_rows.shape[0] != b:
    raise ValueError(f"the plan is for {plan.req_rows.shape[0]} requests, q has {b}")
  q3 = q[:, 0]  # [B, H, D]

  # 1. Shared runs: one item per tile of a node's requests (keys [0, node_lens[node]) of its
  # node table). Padding tiles have no request and read nothing. Index arrays that depend
  # only on shapes are host constants (no iota kernels per call).
  num_tiles = plan.tile_node.shape[0]
  s_items = (plan.tile_node, np.zeros((num_tiles,), np.int32), plan.node_lens,
             plan.tile_reqs, plan.node_tables)
  shared = _Part(num_tiles, config.shared_block_q, config.shared_block_k, _num_splits(
      plan.node_tables.shape[1] * bs, num_tiles, nk, kv_split=config.shared_kv_split,
      block_k=config.shared_block_k, min_programs=config.min_programs,
      cap=config.max_splits))
  # 2. Private remainders: one item per request, keys [private_start, kv_len) of its table.
  mb = block_tables.shape[1]
  p_items = (np.arange(b, dtype=np.int32), plan.private_start, kv_lens,
             np.arange(b, dtype=np.int32).reshape(b, 1), block_tables)
  private = _Part(b, config.private_block_q, config.private_block_k, _num_splits(
      min(mb * bs, plan.private_tokens_hint or mb * bs), b, nk,
      kv_split=config.private_kv_split, block_k=config.private_block_k,
      min_programs=config.min_programs, cap=config.max_splits))
  if config.fused:
    s_raw, p_raw = _fused_partials(
        q3, k_pool, v_pool, layer_offset, s_items, p_items, scales, shared=shared,
        private=private,
        num_warps=config.shared_num_warps, num_stages=config.shared_num_stages,
        interpret=interpret)
  else:
    s_raw = _partials(q3, k_pool, v_pool, layer_offset, s_items, scales, part=shared,
                      num_warps=config.shared_num_warps, num_stages=config.shared_num_stages,
                      interpret=interpret, name="dedup_attention_shared")
    p_raw = _partials(q3, k_pool, v_pool, layer_offset, p_items, scales, part=private,
                      num_warps=config.private_num_warps,
                      num_stages=config.private_num_stages, interpret=interpret,
                      name="dedup_attention_private")
  # 3. Each request's node partials and private partial, merged in one launch.
  out = _merge_partials(plan, kv_lens, s_raw, p_raw, shared=shared, private=private,
                        num_heads=nh, out_dtype=q.dtype, interpret=interpret)
  return out.reshape(b, 1, nh, d)


# -------------------------------------------------------------------------- reference
def dedup_attention_reference(q: jax.Array, k_pool: jax.Array, v_pool: jax.Array,
                              block_tables: jax.Array, positions: jax.Array,
                              kv_lens: jax.Array, plan: SharingPlan, layer=None, *,
                              k_scale=None, v_scale=None) -> jax.Array:
  """float32 oracle of the same decomposition: node partials, private partial, LSE merge
  (FP8 pools: over the dequantized values).

  Each node's keys come from the plan's node table (not the requests' tables), so a plan
  whose nodes do not match the requests' blocks gives a wrong answer here too; comparing
  with `paged_attention_reference` checks the plan, comparing with the kernel checks it.
  """
  del positions  # decode: every request's query sits at kv_len - 1
  all_layers = k_pool.ndim == 5  # (scales have one axis less than their pool)
  pick = lambda x: x[layer] if all_layers and x is not None else x
  k_pool = dequantize_pool(pick(k_pool), pick(k_scale))  # float32 [NB, bs, K, D]
  v_pool = dequantize_pool(pick(v_pool), pick(v_scale))
  hp = jax.lax.Precision.HIGHEST
  b, t, nh, d = q.shape
  if t != 1:
    raise ValueError(f"decode only (T = 1), got T = {t}")
  nk = k_pool.shape[2]
  group = nh // nk
  bs = k_pool.shape[1]
  rpt = plan.requests_per_tile
  qg = q[:, 0].astype(jnp.float32).reshape(b, nk, group, d) * d ** -0.5  # [B, K, G, D]

  def partial(qx, k, v, ok):  # qx [..., K, G, D]; k, v [..., S, K, D]; ok [..., S]
    s = jnp.einsum("...kgd,...skd->...kgs", qx, k, precision=hp)
    s = jnp.where(ok[..., None, None, :], s, -jnp.inf)
    m = jnp.max(s, axis=-1)
    m_safe = jnp.where(m == -jnp.inf, 0.0, m)
    p = jnp.exp(s - m_safe[..., None])
    v = jnp.where(ok[..., :, None, None], v, 0.0)
    return jnp.einsum("...kgs,...skd->...kgd", p, v, precision=hp), m, jnp.sum(p, -1)

  # Node partials for every (tile, slot), then gathered per request.
  nk_ = gather_blocks(k_pool, plan.node_tables).astype(jnp.float32)  # [N, S_n, K, D]
  nv_ = gather_blocks(v_pool, plan.node_tables).astype(jnp.float32)
  node_ok = jnp.arange(nk_.shape[1])[None] < plan.node_lens[:, None]  # [N, S_n]
  reqs = plan.tile_reqs.reshape(-1)  # [TL * RPT]
  nodes = jnp.repeat(plan.tile_node, rpt)
  n_acc, n_m, n_l = partial(qg[jnp.maximum(reqs, 0)], nk_[nodes], nv_[nodes],
                            node_ok[nodes] & (reqs >= 0)[:, None])
  idx = jnp.maximum(plan.req_rows, 0)
  has = (plan.req_rows >= 0)[:, :, None, None]
  # Private remainder [private_start, kv_len) of each request's own table.
  k = gather_blocks(k_pool, block_tables).astype(jnp.float32)  # [B, S, K, D]
  v = gather_blocks(v_pool, block_tables).astype(jnp.float32)
  keys = jnp.arange(k.shape[1])[None]
  ok = (keys >= plan.private_start[:, None]) & (keys < kv_lens[:, None])
  p_acc, p_m, p_l = partial(qg, k, v, ok)
  acc = jnp.concatenate([n_acc[idx], p_acc[:, None]], axis=1)  # [B, DEP + 1, K, G, D]
  m = jnp.concatenate([jnp.where(has, n_m[idx], -jnp.inf), p_m[:, None]], axis=1)
  l = jnp.concatenate([n_l[idx], p_l[:, None]], axis=1)
  m_max = jnp.max(m, axis=1, keepdims=True)
  w = jnp.exp(m - jnp.where(m_max == -jnp.inf, 0.0, m_max))
  acc, l = jnp.sum(acc * w[..., None], axis=1), jnp.sum(l * w, axis=1)
  out = jnp.where(l[..., None] > 0, acc / l[..., None], 0.0)
  del bs
  return out.reshape(b, 1, nh, d)
