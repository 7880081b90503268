"""Shared-prefix ("deduplicated block") decode attention as a Pallas GPU kernel, bit for bit
the paged decode kernel's output.

Parts: the kernel body (`_dedup_kernel`: shared programs and per-request programs in one
launch), the jitted wrapper `dedup_attention` with its `TuningConfig`, and the float32
`dedup_attention_reference`. The split merge is the paged kernel's (`_common.merge_splits`).

The HQ cache stores a block shared by C requests once, but paged decode still reads it C
times (once per request). Here a sharing plan (`SharingPlan` below, the kernel's input
format; `hq_jax.kv.sharing` builds it from block tables) names the shared runs of blocks
(trie nodes: node n is keys [node_start[n], node_start[n] + node_lens[n]) of every one of
its requests, which share all blocks before it too) and tiles of their requests.

Exactness by construction: paged decode (`paged_attention` with its decode config, kv_split
S) cuts every request's keys into splits [j * S, (j + 1) * S) at fixed absolute positions,
computes each split's partial (acc, m, l) with `_common.split_partials` (tiles of block_k
at fixed offsets from the split's start) and merges them by an exact log-sum-exp in
increasing j (`_common.merge_splits`). This kernel computes the same partials with the same
code, tiles and launch parameters, writes them into the same [B, K, splits, block_q, D]
buffers, and runs the same merge launch. Only who computes a split differs:

  1. shared programs, one per (tile of a node's requests, kv head, split slot): the splits
     that lie entirely inside [0, end of node n) and end past its start (j with start <
     (j + 1) S <= end), computed once for the tile's requests: rows = slot * G + g (all G
     query heads of a kv head for `requests_per_tile` = block_q // G requests), keys read
     through the first request's block table (the same physical blocks for all of them);
     each row is stored to its own request's partial;
  2. request programs, one per (request, kv head, split slot): its other splits, j from
     floor(private_start / S) (the split that straddles the end of its deepest node) to
     the last split before kv_len, exactly as the paged kernel's program (request, kv head,
     0, j) computes them.

A row's bits depend only on its own q row, its position, the split and the keys (the tile
step works row by row; a dot's row depends on that row of q alone), so a split computed
for a tile of requests equals the one paged decode computes for each of them; the tile has
the paged program's block_q rows, block_k keys and warps, so the same compiled tile code.
Split slots loop (a program handles slot s, s + slots, ...), so the static counts set only
parallelism, never which splits exist.

Cost against the old kernel (which picked its own, longer splits relative to each node and
raised their count for occupancy): splits are the paged decode's (S = 1024 keys); a shared
tile holds only block_q // G requests (2 at G = 7 with the decode tiles' 16 rows), so a
shared block is read once per 2 requests, not per 9; the straddling split is read per
request (at most S keys each); a node shorter than S shares nothing. Decode (T = 1) only;
anything else, a plan with no shared node, or a config without splits is handed to the
paged kernel (its bits, trivially).

FP8 K/V: with `k_scale` and `v_scale` (one float32 per token and kv head), e4m3 pools are
read and dequantized in registers as in `paged_attention.py` (the same `split_partials`);
the reference attends over the dequantized values.

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

from pallas_kernels import paged_attention as pa
from pallas_kernels._common import (check_inputs, dequantize_pool, dot_precision, flat_pool,
                                    flat_scales, full_block, gather_blocks, merge_splits,
                                    split_partials, tile_queries)


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
  node_start    [N]       first key of each node (block aligned)
  """

  node_tables: jax.Array
  node_lens: jax.Array
  tile_node: jax.Array
  tile_reqs: jax.Array
  req_rows: jax.Array
  private_start: jax.Array
  node_start: jax.Array
  requests_per_tile: int = dataclasses.field(metadata=dict(static=True), default=1)
  # Longest private remainder, a power of two: sets how many split slots the request
  # programs launch (a hint only; longer remainders stay correct). Bucketed by the planner
  # so a decode loop does not recompile every time a remainder grows.
  private_tokens_hint: int = dataclasses.field(metadata=dict(static=True), default=0)
  # Whether any node exists. Without one the kernel is plain paged decode (the same
  # launch, the same bits), so a batch that shares nothing never pays for the split.
  has_shared: bool = dataclasses.field(metadata=dict(static=True), default=True)

  @property
  def num_tiles(self) -> int:
    return self.tile_node.shape[0]


@dataclasses.dataclass(frozen=True)
class TuningConfig:
  """The tiles of every split program: `split`, a paged decode config (block_q rows,
  block_k keys, kv_split keys per split, warps, stages). Bit-equality with paged decode
  holds when it is the paged kernel's own decode config (`default_config`); a config
  without kv_split shares nothing (the paged kernel runs)."""

  split: pa.TuningConfig = pa.DEFAULT_DECODE

  def requests_per_tile(self, group: int) -> int:
    """Requests whose G query heads fill one shared tile (what the planner needs)."""
    if group > self.split.block_q:
      raise ValueError(f"a group of {group} query heads does not fit block_q="
                       f"{self.split.block_q}")
    return self.split.block_q // group


def default_config(head_dim: int, group: int) -> TuningConfig:
  """The paged kernel's decode tiles for G query heads per kv head (`pa.default_config`):
  the config under which this kernel's bits are paged decode's."""
  return TuningConfig(split=pa.default_config(group, head_dim))


def shared_split_count(plan: SharingPlan, kv_split: int) -> int:
  """Host-side: the (tile, split) pairs a plan's shared programs compute under splits of
  kv_split keys (splits j with start < (j + 1) * kv_split <= end of a used tile's node).
  0 means the kernel reads nothing once for several requests (nodes shorter than a split)."""
  lens, starts = np.asarray(plan.node_lens), np.asarray(plan.node_start)
  node = np.asarray(plan.tile_node)[np.asarray(plan.tile_reqs)[:, 0] >= 0]
  return int(np.sum((starts[node] + lens[node]) // kv_split - starts[node] // kv_split))


# ----------------------------------------------------------------------------- kernel
def _program(p, *, num_tiles: int, num_reqs: int, num_kv_heads: int, shared_slots: int):
  """Program p -> (is_shared, item, kv head, split slot): the shared programs first (tile
  fastest, so a node's tiles read a split at about the same time: L2), then the request
  programs (request fastest). int32 selects (the Triton lowering does not select between
  booleans); static divisors."""
  n_shared = num_tiles * num_kv_heads * shared_slots
  is_shared = p < n_shared
  j = jnp.where(is_shared, p, p - n_shared)
  unravel = lambda n: (j % n, (j // n) % num_kv_heads, j // (n * num_kv_heads))
  return (is_shared, *(jnp.where(is_shared, a, b) for a, b in
                       zip(unravel(num_tiles), unravel(num_reqs))))


def _dedup_kernel(
    layer_ref,  # [1] int32: first block of this layer in the flat pool
    kv_lens_ref,  # [B] int32
    tables_ref,  # [B, MB] int32
    positions_ref,  # [B, 1] int32
    tile_reqs_ref,  # [TL, RPT] int32
    tile_node_ref,  # [TL] int32
    node_start_ref,  # [N] int32
    node_lens_ref,  # [N] int32
    private_start_ref,  # [B] int32
    q_ref,  # [B, H, D]
    k_ref,  # [layers * num_blocks, block_size, D] (this program's kv head)
    v_ref,
    *refs,  # FP8: k_scale, v_scale [layers * num_blocks, block_size]; then the partials
    #         acc [B, K, S, block_q, D], m, l [B, K, S, block_q] (whole arrays)
    num_tiles: int, shared_slots: int, request_slots: int, block_q: int, block_k: int,
    kv_split: int, num_heads: int, group: int, scale: float, precision, quantized: bool):
  ks_ref, vs_ref = refs[:2] if quantized else (None, None)
  acc_ref, m_ref, l_ref = refs[-3:]
  num_reqs, num_kv_heads = acc_ref.shape[:2]
  rpt = tile_reqs_ref.shape[1]
  head_dim = q_ref.shape[2]
  is_shared, i, h, s = _program(pl.program_id(0), num_tiles=num_tiles, num_reqs=num_reqs,
                                num_kv_heads=num_kv_heads, shared_slots=shared_slots)
  cols = jnp.arange(head_dim, dtype=jnp.int32)[None, :]
  rows = jnp.arange(block_q, dtype=jnp.int32)
  layer_offset = layer_ref[0]
  kw = dict(block_k=block_k, scale=scale, precision=precision)

  def splits(first, end, slots, body):
    """body(j) for the splits j = first + s, first + s + slots, ... below end."""
    count = (jnp.maximum(end - first - s, 0) + slots - 1) // slots
    jax.lax.fori_loop(0, count, lambda c, x: (body(first + s + c * slots), x)[1], 0)

  @pl.when(is_shared)
  def _shared():
    # Row = slot * G + g: request tile_reqs[i, slot], query head h * G + g.
    slot, g = rows // group, rows % group
    row_ok = rows < rpt * group
    req = plgpu_triton.load(tile_reqs_ref.at[i, jnp.minimum(slot, rpt - 1)], mask=row_ok,
                            other=-1)  # [bq]
    row_ok = row_ok & (req >= 0)
    first = jnp.maximum(tile_reqs_ref[i, 0], 0)  # its table reads the node's blocks
    used = tile_reqs_ref[i, 0] >= 0  # slot 0 empty: a padding tile
    req = jnp.where(row_ok, req, first)
    q = plgpu_triton.load(q_ref.at[req[:, None], (h * group + g)[:, None], cols],
                          mask=row_ok[:, None], other=0)  # [bq, D]
    pos = plgpu_triton.load(positions_ref.at[req, jnp.zeros_like(req)], mask=row_ok,
                            other=-1)
    node = tile_node_ref[i]
    start = node_start_ref[node]
    end = start + node_lens_ref[node]
    # Rows of no request are stored to rows >= G of the first request's partial (which
    # the merge never reads), at distinct addresses: the interpreter stores a masked row by
    # writing back what it read, so two rows on one address could undo a write.
    first_bad = jnp.min(jnp.where(row_ok, block_q, rows))
    dst = jnp.where(row_ok, g, group + rows - first_bad)

    def split(j):
      acc, m, l = split_partials(q, pos, row_ok, end, j * kv_split, kv_split, tables_ref,
                                 first, layer_offset, k_ref, v_ref, ks_ref, vs_ref, **kw)
      plgpu_triton.store(acc_ref.at[req[:, None], h, j, dst[:, None], cols], acc)
      plgpu_triton.store(m_ref.at[req, h, j, dst], m)
      plgpu_triton.store(l_ref.at[req, h, j, dst], l)

    # Splits inside [0, end) that end past start: start < (j + 1) S <= end.
    splits(start // kv_split, jnp.where(used, end // kv_split, 0), shared_slots, split)

  @pl.when(pl.program_id(0) >= num_tiles * num_kv_heads * shared_slots)  # not is_shared
  def _request():
    # The paged kernel's program (request b, kv head h, row tile 0, split j), T = 1.
    b = i
    q, pos, row_ok, _ = tile_queries(q_ref, positions_ref, b, h, rows, num_tokens=1,
                                     group=group, num_heads=num_heads)  # [bq, D], [bq], [bq]
    kv_len = kv_lens_ref[b]

    def split(j):
      acc, m, l = split_partials(q, pos, row_ok, kv_len, j * kv_split, kv_split, tables_ref,
                                 b, layer_offset, k_ref, v_ref, ks_ref, vs_ref, **kw)
      plgpu_triton.store(acc_ref.at[b, h, j, rows[:, None], cols], acc)
      plgpu_triton.store(m_ref.at[b, h, j, rows], m)
      plgpu_triton.store(l_ref.at[b, h, j, rows], l)

    # From the split holding private_start (the one that straddles the deepest node's end,
    # or the first of the remainder) to the last one that starts before kv_len.
    splits(private_start_ref[b] // kv_split, pl.cdiv(kv_len, kv_split), request_slots,
           split)


# ---------------------------------------------------------------------------- wrapper
@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def dedup_attention(q: jax.Array, k_pool: jax.Array, v_pool: jax.Array,
                    block_tables: jax.Array, positions: jax.Array, kv_lens: jax.Array,
                    plan: SharingPlan | None, layer=None, *, k_scale: jax.Array | None = None,
                    v_scale: jax.Array | None = None, config: TuningConfig | None = None,
                    interpret: bool = False) -> jax.Array:
  """Decode attention of q [B, 1, H, D] over the pools of `layer`, shared runs read once;
  the bits of `paged_attention` under the same split config (None: both kernels' default).

  Pools, tables, positions, lengths, `layer` and FP8 scales as for `paged_attention`. `plan`
  must come from the same batch's block tables (`hq_jax.kv.sharing.build_plan`) with
  requests_per_tile <= config.requests_per_tile(G). Without a plan, with T > 1, with a plan
  with no shared node or a config without splits, this is the paged kernel. Returns
  [B, 1, H, D] in q's dtype; float32 softmax and accumulation.
  """
  check_inputs(q, k_pool, v_pool, block_tables, positions, kv_lens)
  b, t, nh, d = q.shape
  nk = k_pool.shape[-2]
  group = nh // nk
  split = (config or default_config(d, group)).split
  if (plan is None or t != 1 or not plan.has_shared or split.kv_split is None
      or group > split.block_q):
    return pa.paged_attention(q, k_pool, v_pool, block_tables, positions, kv_lens, layer,
                              k_scale=k_scale, v_scale=v_scale,
                              config=None if config is None else split, interpret=interpret)
  ks_flat, vs_flat = flat_scales(k_scale, v_scale, k_pool)
  scales = () if ks_flat is None else (ks_flat, vs_flat)
  k_flat, v_flat, layer_offset = flat_pool(k_pool, v_pool, layer)
  nb, bs = k_flat.shape[:2]
  rpt = plan.requests_per_tile
  if rpt * group > split.block_q:
    raise ValueError(f"the plan's tiles hold {rpt} requests x {group} heads = {rpt * group} "
                     f"rows, more than block_q={split.block_q}")
  if plan.req_rows.shape[0] != b:
    raise ValueError(f"the plan is for {plan.req_rows.shape[0]} requests, q has {b}")
  kv_split = split.kv_split
  mb = block_tables.shape[1]
  num_splits = pl.cdiv(mb * bs, kv_split)  # the paged kernel's: the merge is its launch
  num_tiles = plan.tile_node.shape[0]
  # Split slots: a node holds at most cdiv(its length, S) of its splits, a request at most
  # cdiv(private length, S) + 1 (the straddling one); longer ones loop over their slots.
  shared_slots = max(1, min(num_splits, pl.cdiv(plan.node_tables.shape[1] * bs, kv_split)))
  request_slots = max(1, min(num_splits,
                             pl.cdiv(plan.private_tokens_hint or mb * bs, kv_split) + 1))
  num_programs = (num_tiles * shared_slots + b * request_slots) * nk
  head = lambda p: _program(p, num_tiles=num_tiles, num_reqs=b, num_kv_heads=nk,
                            shared_slots=shared_slots)[2]
  kv_spec = pl.BlockSpec((nb, bs, None, d), lambda p: (0, 0, head(p), 0))
  scale_spec = pl.BlockSpec((nb, bs, None), lambda p: (0, 0, head(p)))
  ints = (layer_offset, kv_lens, block_tables, positions, plan.tile_reqs, plan.tile_node,
          plan.node_start, plan.node_lens, plan.private_start)
  q3 = q[:, 0]  # [B, H, D]
  lead = (b, nk, num_splits, split.block_q)
  out_shape = [jax.ShapeDtypeStruct(lead + (d,), jnp.float32),
               jax.ShapeDtypeStruct(lead, jnp.float32), jax.ShapeDtypeStruct(lead, jnp.float32)]
  kernel = functools.partial(
      _dedup_kernel, num_tiles=num_tiles, shared_slots=shared_slots,
      request_slots=request_slots, block_q=split.block_q, block_k=split.block_k,
      kv_split=kv_split, num_heads=nh, group=group, scale=d ** -0.5 * math.log2(math.e),
      precision=dot_precision(q.dtype), quantized=bool(scales))
  acc, m, l = pl.pallas_call(
      kernel, grid=(num_programs,),
      in_specs=([full_block(x.shape) for x in ints] + [full_block(q3.shape), kv_spec, kv_spec]
                + [scale_spec] * len(scales)),
      out_specs=[full_block(o.shape) for o in out_shape], out_shape=out_shape,
      compiler_params=plgpu_triton.CompilerParams(num_warps=split.num_warps,
                                                  num_stages=split.num_stages),
      interpret=interpret, name="dedup_attention",
  )(*ints, q3, k_flat, v_flat, *scales)
  out = merge_splits(kv_lens, acc, m, l, num_tokens=1, num_heads=nh, block_q=split.block_q,
                     kv_split=kv_split, out_dtype=q.dtype, interpret=interpret)
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
