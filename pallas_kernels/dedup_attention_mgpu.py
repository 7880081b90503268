"""Shared-prefix ("dedup") decode attention with a Mosaic GPU (plgpu) kernel for Hopper.

The Mosaic GPU counterpart of `dedup_attention.py` (same interface, same `SharingPlan`, same
semantics; read that module's docstring first). Parts: the kernel body (`_items_kernel`), the
jitted wrapper `dedup_attention_mgpu` with its `TuningConfig`, the merge (`merge_partials`,
plain jnp); its GPU check-and-time run is `hq_jax.bench.mosaic` (`hq-jax bench mosaic
shared`). The float32 oracle is
`dedup_attention.dedup_attention_reference` (the same decomposition). A leaf: jax, numpy,
the standard library and pallas_kernels.* only.

One kernel body serves both parts; an "item" reads keys [start, start + len) of one row of a
block table against its query rows:
  1. shared part: an item is a tile of a node's requests (a plan.tile_reqs row) and its
     table row the node's (plan.node_tables), so a shared page is read once per tile, not
     once per request. A tile fills `shared_warpgroups` 64-row halves (one wgmma's M each):
     64 // G requests x G query heads of a kv head per half (G = 7: 9 requests, 63 rows;
     the planner's requests_per_tile = shared_warpgroups * (64 // G)). With two, both
     warpgroups multiply the same K/V slots (half the SMEM fills per FLOP) and alternate
     between wgmma and softmax by a schedule barrier, as jax's attention_mgpu does;
  2. private part: an item is a request, its rows its G query heads (padded to 8), its keys
     [private_start, kv_len) of its own block table; one warpgroup.
Grid (item, kv head, split), items fastest (a node's tiles read a split at about the same
time: L2). Pools of all layers are viewed (free reshape) as 2-D [L * NB * block_size, K * D],
so the page of (layer, block, kv head) is one TMA box [block_size, D]; the page id is read
from the table in GMEM. A step is pages_per_step pages of K and of V (2 * pages_per_step TMA
copies) into one of max_concurrent_steps SMEM slots; a slot is refilled once the step that
used it is done, so the next steps' copies fly while the warpgroups compute (the loop of
`paged_attention_mgpu._decode_kernel` with item-relative keys). QK^T and PV are wgmma (bf16
in, f32 accumulate); the online softmax is in log2 units. Only the last step of a split can
hold keys past the item: their scores are masked; pages past the item are read from its
last page, so for shared nodes (full blocks) those V rows are real finite data that a zero
probability drops, while private items (a partial last page) zero them in SMEM.

Splits: split s of an item of n keys covers [s * L, min(n, (s + 1) L)) with L =
cdiv(n, num_splits) rounded up to block_kv (item-relative: unlike the Triton kernel, whose
splits are the paged kernel's fixed absolute ones, so this kernel is not bit-exact with
paged decode). Every
program writes its float32 partial (acc [R, D], m [R] in log2 units, l [R]); an empty split
writes (0, -inf, 0).

Merge (`merge_partials`, XLA): per request its nodes root to deepest, each over its splits
in increasing order, then its private splits; the max of m first, then the weighted sums as
an unrolled chain in that order. Every term is a function of the plan's logical structure
and the request's keys (a row of a wgmma depends on its own q row only), so a request's
output does not depend on where its blocks live (tested bit for bit).

Without a shared node (or without a plan) this is `paged_attention_mgpu` (decode), its bits;
with T > 1 the Triton `paged_attention` (no Mosaic chunk kernel here).

Tested in the Mosaic GPU interpreter on CPU with race detection
(tests/test_dedup_attention_mgpu.py); lowers for `cuda` on a CPU machine at both model
shapes, one and two warpgroups, P through SMEM or registers, with the jax versions
paged_attention_mgpu supports (`_kernel_call` bridges out_type/out_shape); its tests also
run compiled on a Hopper GPU. Faster than the Triton dedup kernel at the 7B shape, slower at
0.5B (docs/results.md, "GPU kernels"), so the engine's dedup decode runs the Triton one.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
import numpy as np

from pallas_kernels import dedup_attention as da
from pallas_kernels import paged_attention_mgpu as pm
from pallas_kernels._common import check_inputs
from pallas_kernels.dedup_attention import SharingPlan
from pallas_kernels.paged_attention import paged_attention

# The float32 oracle of the same decomposition (node partials, private partial, LSE merge).
dedup_attention_reference = da.dedup_attention_reference

WGMMA_ROWS = pm.WGMMA_ROWS  # 64 query rows per program
ROW_PAD = pm.ROW_PAD
SWIZZLE = pm.SWIZZLE


@dataclasses.dataclass(frozen=True)
class TuningConfig:
  """Tiles of both launches; the reduction order depends on block_kv and the split counts.

  pages_per_step: pages per pipeline step; block_kv = pages_per_step * block_size keys, a
    multiple of 64 (the K dimension of the PV wgmma).
  shared_kv_split / private_kv_split: most keys per split (multiples of block_kv); the split
    count is raised until a launch has min_programs programs, at most max_splits.
  max_concurrent_steps: SMEM slots of K/V (steps in flight).
  p_in_registers: P from registers into the PV wgmma (compiled GPU only).
  shared_warpgroups: compute warpgroups per shared program. 2: a tile holds twice the
    requests (two 64-row halves), both halves read the same K/V slots (half the SMEM fills
    per FLOP of one) and alternate between wgmma and softmax (the schedule of jax's
    attention_mgpu); the first also issues the TMA copies.
  """

  pages_per_step: int = 4
  shared_kv_split: int = 2048
  private_kv_split: int = 1024
  max_concurrent_steps: int = 2
  min_programs: int = 264  # 2 x the 132 SMs of an H200
  max_splits: int = 64
  p_in_registers: bool = False
  shared_warpgroups: int = 1

  def __post_init__(self):
    for name in ("pages_per_step", "max_concurrent_steps", "min_programs", "max_splits"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    for name in ("shared_kv_split", "private_kv_split"):
      if getattr(self, name) <= 0:
        raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
    if self.shared_warpgroups not in (1, 2):
      raise ValueError(f"shared_warpgroups must be 1 or 2, got {self.shared_warpgroups}")
    if self.shared_warpgroups == 2 and self.max_concurrent_steps < 2:
      raise ValueError("two compute warpgroups refill a slot during the next step: "
                       "max_concurrent_steps must be >= 2")

  def block_kv(self, block_size: int) -> int:
    """Keys per step, checked against the page size (the config does not know it)."""
    block_kv = self.pages_per_step * block_size
    if block_kv % 64:
      raise ValueError(f"pages_per_step * block_size = {block_kv} must be a multiple of 64 "
                       "(the K dimension of the PV wgmma)")
    for name in ("shared_kv_split", "private_kv_split"):
      if getattr(self, name) % block_kv:
        raise ValueError(f"{name}={getattr(self, name)} must be a multiple of "
                         f"block_kv={block_kv}")
    return block_kv

  def requests_per_tile(self, group: int) -> int:
    """Requests whose G query heads fill a tile's 64-row halves (what the planner needs)."""
    if not 1 <= group <= WGMMA_ROWS:
      raise ValueError(f"a group of {group} query heads does not fit {WGMMA_ROWS} rows")
    return self.shared_warpgroups * (WGMMA_ROWS // group)


# Not tuned on the H200. SMEM at D = 128: K/V 2 x 2 slots x 64 keys x 128 x 2 B = 64 KiB,
# q 16 KiB, P 8 KiB (the epilogue's 33 KiB reuses them): two programs per SM.
DEFAULT = TuningConfig()
# Two compute warpgroups on 126 rows (18 requests at G = 7), P from registers: q 32 KiB,
# K/V 64 KiB, epilogue 64 KiB (allocated once for both warpgroups).
DEFAULT_WS = TuningConfig(max_concurrent_steps=2, shared_warpgroups=2, p_in_registers=True)


def tile_rows(rpt: int, group: int, warpgroups: int) -> tuple[int, int]:
  """(requests per 64-row half, rows written per half): a tile's slot `slot` and head g sit
  at row (slot // half) * rows + (slot % half) * G + g of its partials (slot * G + g with
  one warpgroup)."""
  half = -(-rpt // warpgroups)
  if half * group > WGMMA_ROWS:
    raise ValueError(f"the plan's tiles hold {rpt} requests x {group} heads, more than "
                     f"{warpgroups} x {WGMMA_ROWS} rows")
  return half, pm._round_up(half * group, ROW_PAD)


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


def _num_splits(tokens: int, items: int, kv_heads: int, *, kv_split: int, block_k: int,
                min_programs: int, cap: int) -> int:
  """Static split count: splits of <= kv_split keys, more while the grid is small."""
  by_length = -(-tokens // kv_split)
  by_fill = -(-min_programs // (items * kv_heads))
  most = min(cap, -(-tokens // block_k))  # a split holds at least one key tile
  return max(1, min(max(by_length, by_fill), most))


# ----------------------------------------------------------------------------- kernel
def _items_kernel(
    layer_ref,  # [1] int32: the layer (GMEM)
    item_table_ref,  # [I] int32: row of tables_ref each item reads
    item_start_ref,  # [I] int32: first key of the item in that row (block aligned)
    item_len_ref,  # [I] int32: keys of the item (0: nothing, e.g. a padding tile)
    tables_ref,  # [NT, MBt] int32: physical blocks
    q_ref,  # [I, K, W * R, D]: each item's query rows per kv head, R (<= 64) per warpgroup
    k_ref,  # [L * NB * block_size, K * D] (all layers' pools, 2-D view)
    v_ref,  # [L * NB * block_size, K * D]
    acc_out_ref,  # [I, K, S, W * R, D] f32
    m_out_ref,  # [I, K, S, W * R] f32, log2 units
    l_out_ref,  # [I, K, S, W * R] f32
    *, num_blocks: int, block_size: int, pages_per_step: int, num_splits: int,
    max_concurrent_steps: int, p_in_registers: bool, warpgroups: int, whole_pages: bool,
    scale: float):
  """Program (item i, kv head h, split s). whole_pages: the item's keys end on a page
  boundary (shared nodes are full blocks), so a page is all visible or all past the item;
  pages past it are read from the item's last page (real, finite data) and need no zeroing
  in SMEM (with two compute warpgroups, one must not write a slot the other reads)."""
  i = lax.axis_index("i")
  h = lax.axis_index("h")
  s = lax.axis_index("s")
  num_tables = tables_ref.shape[1]
  rows_out, head_dim = q_ref.shape[2] // warpgroups, q_ref.shape[3]
  dtype = q_ref.dtype
  block_kv = pages_per_step * block_size
  slots = max_concurrent_steps

  # Split s of the item: keys [lo, lo + num_keys) (item-relative): cdiv(n, splits)
  # rounded up to block_kv keys per split.
  table = item_table_ref[i]
  start = item_start_ref[i]
  n = item_len_ref[i]
  split_len = ((n + (num_splits - 1)) // num_splits + (block_kv - 1)) // block_kv * block_kv
  lo = s * split_len
  num_keys = jnp.clip(n - lo, 0, split_len)
  num_steps = (num_keys + (block_kv - 1)) // block_kv
  num_full = num_keys // block_kv  # steps whose every key is in the item: no mask
  page_base = layer_ref[0] * num_blocks  # first physical block of this layer
  first_page = (start + lo) // block_size  # start and lo are block aligned
  # Pages past the item (the last step of a split) read its last page: a valid block whose
  # keys the mask drops.
  last_page = jnp.minimum((start + n + (block_size - 1)) // block_size - 1, num_tables - 1)

  tiled = (plgpu.TilingTransform((8, SWIZZLE // jnp.dtype(dtype).itemsize)),
           plgpu.SwizzleTransform(SWIZZLE))
  kv_smem = lambda: plgpu.SMEM((slots, block_kv, head_dim), dtype, transforms=tiled)
  p_smem_type = (None if p_in_registers else
                 plgpu.SMEM((warpgroups, WGMMA_ROWS, block_kv), dtype, transforms=tiled))
  q_smem_type = plgpu.SMEM((warpgroups, WGMMA_ROWS, head_dim), dtype, transforms=tiled)
  kv_barriers = lambda: plgpu.Barrier(num_arrivals=pages_per_step, num_barriers=slots)
  out_smem = (plgpu.SMEM((warpgroups, WGMMA_ROWS, head_dim), jnp.float32),
              plgpu.SMEM((warpgroups, WGMMA_ROWS), jnp.float32),
              plgpu.SMEM((warpgroups, WGMMA_ROWS), jnp.float32))

  def pages_of(step):
    return [page_base + tables_ref[table, jnp.minimum(
        first_page + step * pages_per_step + p, last_page)] for p in range(pages_per_step)]

  issue = functools.partial(pm.copy_pages, k_ref, v_ref, head=h, block_size=block_size,
                            head_dim=head_dim)

  def load_q(q_smem, q_barrier, w):
    # Rows [w * R, (w + 1) * R) of the item's q; rows R..63 of q_smem stay unwritten (each
    # row of QK^T, softmax and PV depends on its own q row only, and is never written out).
    plgpu.copy_gmem_to_smem(q_ref.at[i, h, pl.ds(w * rows_out, rows_out)],
                            q_smem.at[pl.ds(0, rows_out)], q_barrier)
    plgpu.barrier_wait(q_barrier)

  def softmax(scores, m, l, j, masked):
    """Online softmax of one step's scores [64, block_kv] (log2 units) -> (p, m, l, alpha)."""
    visible = None
    if masked:
      num_visible = num_keys - j * block_kv
      cols = plgpu.broadcasted_iota(jnp.int32, (WGMMA_ROWS, block_kv), 1,
                                    layout=plgpu.Layout.WGMMA)
      visible = cols < num_visible
    return pm.online_softmax(scores, m, l, visible)

  def qk(q_smem, k_slot):
    def compute(acc_ref):
      plgpu.wgmma(acc_ref, q_smem, k_slot.transpose((1, 0)))
      return acc_ref[...]
    return pl.run_scoped(compute, plgpu.ACC((WGMMA_ROWS, block_kv), jnp.float32)) * scale

  def pv(p, p_smem, v_slot):
    if not p_in_registers:
      p_smem[...] = p.astype(dtype)
      plgpu.commit_smem()  # the P stores, before the wgmma reads them

    def compute(acc_ref):
      plgpu.wgmma(acc_ref, p.astype(dtype) if p_in_registers else p_smem, v_slot)
      return acc_ref[...]
    return pl.run_scoped(compute, plgpu.ACC((WGMMA_ROWS, head_dim), jnp.float32))

  def store(acc, m, l, acc_smem, m_smem, l_smem, w):
    acc_smem[...] = acc
    m_smem[...] = m
    l_smem[...] = l
    plgpu.commit_smem()
    out_rows = pl.ds(w * rows_out, rows_out)
    plgpu.copy_smem_to_gmem(acc_smem.at[pl.ds(0, rows_out)], acc_out_ref.at[i, h, s, out_rows])
    plgpu.copy_smem_to_gmem(m_smem.at[pl.ds(0, rows_out)], m_out_ref.at[i, h, s, out_rows])
    plgpu.copy_smem_to_gmem(l_smem.at[pl.ds(0, rows_out)], l_out_ref.at[i, h, s, out_rows])
    plgpu.wait_smem_to_gmem(0)

  if warpgroups == 1:
    # One warpgroup issues the copies and computes: a slot is refilled at the end of the
    # step that consumed it.
    def body(q_smem, q_barrier):
      load_q(q_smem.at[0], q_barrier.at[0], 0)

      def loop_scope(k_smem, v_smem, p_smem, k_barriers, v_barriers):
        kv = (k_smem, v_smem, k_barriers, v_barriers)
        pm.fill_pipeline(lambda j: issue(kv, j, pages_of(j)), slots, num_steps)

        def step(j, carry, *, masked: bool):
          acc, m, l = carry  # [64, D], [64], [64] float32
          slot = lax.rem(j, slots)
          # Table loads for this slot's refill, issued now: their latency hides behind the
          # matmuls (clamped: always in bounds).
          next_pages = pages_of(j + slots)
          plgpu.barrier_wait(k_barriers.at[slot])
          scores = qk(q_smem.at[0], k_smem.at[slot])
          p, m, l, alpha = softmax(scores, m, l, j, masked)
          plgpu.barrier_wait(v_barriers.at[slot])
          if masked and not whole_pages:  # keys past the item may be NaN; 0 * NaN = NaN
            v_rows = plgpu.broadcasted_iota(jnp.int32, (block_kv, head_dim), 0,
                                            layout=plgpu.Layout.WGMMA)
            v_slot = v_smem.at[slot]
            v_slot[...] = jnp.where(v_rows < num_keys - j * block_kv, v_slot[...],
                                    0).astype(dtype)
            plgpu.commit_smem()
          acc = (lax.broadcast_in_dim(alpha, acc.shape, [0]) * acc
                 + pv(p, None if p_smem is None else p_smem.at[0], v_smem.at[slot]))

          @pl.when(j + slots < num_steps)  # both wgmmas are done: refill the slot
          def _refill():
            issue(kv, slot, next_pages)

          return acc, m, l

        carry = lax.fori_loop(0, num_full, functools.partial(step, masked=False),
                              pm.initial_carry(WGMMA_ROWS, head_dim))
        return lax.fori_loop(num_full, num_steps, functools.partial(step, masked=True),
                             carry)

      acc, m, l = pl.run_scoped(loop_scope, kv_smem(), kv_smem(), p_smem_type,
                                kv_barriers(), kv_barriers())
      # The epilogue's SMEM reuses the loop's (a later scope).
      pl.run_scoped(lambda *refs: store(acc, m, l, *(r.at[0] for r in refs), 0), *out_smem)

    pl.run_scoped(body, q_smem_type, plgpu.Barrier(num_barriers=1))
    return

  # Two compute warpgroups (rows [w * R, (w + 1) * R)) on the same K/V slots. Warpgroup 0
  # also issues the copies: a slot is refilled once both have done PV on it, during the
  # next step (so at least 2 slots; a third,
  # copy-only warpgroup as in attention_mgpu deadlocks the CPU interpreter's thread pool on
  # a 2-core machine). The schedule barrier makes them alternate (one in wgmma while the
  # other is in softmax), as jax's attention_mgpu does; both run the same steps.
  if not whole_pages:
    raise NotImplementedError("two compute warpgroups need items of whole pages")

  def ws_body(q_smem, k_smem, v_smem, p_smem, acc_smem, m_smem, l_smem, q_barriers,
              k_barriers, v_barriers, consumed, schedule):
    kv = (k_smem, v_smem, k_barriers, v_barriers)
    wg = lax.axis_index("wg")

    def schedule_barrier():
      plgpu.barrier_arrive(schedule)
      plgpu.barrier_wait(schedule)

    @pl.when(wg == 0)
    def _prefetch():
      pm.fill_pipeline(lambda j: issue(kv, j, pages_of(j)), slots, num_steps)

    load_q(q_smem.at[wg], q_barriers.at[wg], wg)
    pl.when(wg == 1)(schedule_barrier)

    def step(j, carry, *, masked: bool):
      acc, m, l = carry
      slot = lax.rem(j, slots)
      prev_pages = pages_of(j - 1 + slots)  # for warpgroup 0's refill; latency hidden
      plgpu.barrier_wait(k_barriers.at[slot])

      def compute_qk(acc_ref):
        plgpu.wgmma(acc_ref, q_smem.at[wg], k_smem.at[slot].transpose((1, 0)))
        schedule_barrier()
        return acc_ref[...]

      scores = pl.run_scoped(compute_qk, plgpu.ACC((WGMMA_ROWS, block_kv), jnp.float32))
      p, m, l, alpha = softmax(scores * scale, m, l, j, masked)
      plgpu.barrier_arrive(schedule)  # softmax done

      # Warpgroup 0 refills the previous step's slot here, not after its own PV: warpgroup 1
      # finishes that step's PV only after warpgroup 0's QK^T of this step (the schedule
      # barrier), so waiting for it any earlier would deadlock.
      @pl.when((wg == 0) & (j >= 1) & (j - 1 + slots < num_steps))
      def _refill():
        prev_slot = lax.rem(j + (slots - 1), slots)
        plgpu.barrier_wait(consumed.at[prev_slot])  # both are done with step j - 1
        issue(kv, prev_slot, prev_pages)

      plgpu.barrier_wait(v_barriers.at[slot])
      plgpu.barrier_wait(schedule)  # the tensor cores are free
      acc = (lax.broadcast_in_dim(alpha, acc.shape, [0]) * acc
             + pv(p, None if p_smem is None else p_smem.at[wg], v_smem.at[slot]))

      @pl.when(j + slots < num_steps)  # the slot will be refilled with step j + slots
      def _release():
        plgpu.barrier_arrive(consumed.at[slot])

      return acc, m, l

    carry = lax.fori_loop(0, num_full, functools.partial(step, masked=False),
                          pm.initial_carry(WGMMA_ROWS, head_dim))
    acc, m, l = lax.fori_loop(num_full, num_steps, functools.partial(step, masked=True),
                              carry)
    pl.when(wg == 0)(schedule_barrier)
    store(acc, m, l, acc_smem.at[wg], m_smem.at[wg], l_smem.at[wg], wg)

  pl.run_scoped(ws_body, q_smem_type, kv_smem(), kv_smem(), p_smem_type, *out_smem,
                plgpu.Barrier(num_barriers=warpgroups), kv_barriers(), kv_barriers(),
                plgpu.Barrier(num_arrivals=warpgroups, num_barriers=slots),
                plgpu.Barrier(num_arrivals=warpgroups), collective_axes="wg")


def _item_partials(q_rows, k2, v2, layer, items, *, part: _Part, num_blocks: int,
                   block_size: int, config: TuningConfig, warpgroups: int,
                   whole_pages: bool, interpret):
  """One launch over one kind of items: partials ([I, K, S, W * R, D], [I, K, S, W * R] x 2).

  q_rows [I, K, W * R, D]; items = (item_table [I], item_start [I], item_len [I], tables).
  """
  num_items, nk, rows, d = q_rows.shape
  kernel = functools.partial(
      _items_kernel, num_blocks=num_blocks, block_size=block_size,
      pages_per_step=config.pages_per_step, num_splits=part.num_splits,
      max_concurrent_steps=config.max_concurrent_steps,
      p_in_registers=config.p_in_registers, warpgroups=warpgroups, whole_pages=whole_pages,
      scale=d ** -0.5 * math.log2(math.e))
  lead = (num_items, nk, part.num_splits, rows)
  out_type = (jax.ShapeDtypeStruct(lead + (d,), jnp.float32),
              jax.ShapeDtypeStruct(lead, jnp.float32), jax.ShapeDtypeStruct(lead, jnp.float32))
  threads = dict(num_threads=warpgroups, thread_name="wg") if warpgroups > 1 else {}
  # Items fastest: a node's tiles read a split at about the same time (L2).
  call = pm._kernel_call(kernel, out_type, interpret=interpret or None,
                         grid=(num_items, nk, part.num_splits), grid_names=("i", "h", "s"),
                         compiler_params=plgpu.CompilerParams(approx_math=True), **threads)
  return call(layer, *(jnp.asarray(x, jnp.int32) for x in items), q_rows, k2, v2)


# ---------------------------------------------------------------------------- wrapper
def _check(q, group):
  if jnp.dtype(q.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    raise NotImplementedError(f"bf16 or f16 only (wgmma operands), got {q.dtype}")
  if q.shape[-1] % 64:
    raise ValueError(f"head_dim must be a multiple of 64, got {q.shape[-1]}")
  if group > WGMMA_ROWS:
    raise ValueError(f"GQA group {group} > {WGMMA_ROWS} rows of one wgmma")


def _parts(plan: SharingPlan, b: int, mb: int, nk: int, block_size: int,
           config: TuningConfig) -> tuple[_Part, _Part]:
  """Static shapes of the shared and private launches (rows, block_kv, split counts)."""
  block_kv = config.block_kv(block_size)
  num_tiles = plan.tile_node.shape[0]
  shared = _Part(num_tiles, 0, block_kv, _num_splits(
      plan.node_tables.shape[1] * block_size, num_tiles, nk, kv_split=config.shared_kv_split,
      block_k=block_kv, min_programs=config.min_programs, cap=config.max_splits))
  private = _Part(b, 0, block_kv, _num_splits(
      min(mb * block_size, plan.private_tokens_hint or mb * block_size), b, nk,
      kv_split=config.private_kv_split, block_k=block_kv, min_programs=config.min_programs,
      cap=config.max_splits))
  return shared, private


def _shared_items(plan: SharingPlan):
  """(item_table, item_start, item_len, tables) of the shared tiles; a padding tile (no
  request in slot 0) has length 0."""
  num_tiles = plan.tile_node.shape[0]
  lens = jnp.where(plan.tile_reqs[:, 0] >= 0, plan.node_lens[plan.tile_node], 0)
  return plan.tile_node, np.zeros((num_tiles,), np.int32), lens, plan.node_tables


def _shared_q(q3, plan: SharingPlan, nk: int, warpgroups: int):
  """[TL, K, W * R, D]: tile t's query rows in `tile_rows` order (zeros for empty slots)."""
  b, nh, d = q3.shape
  group = nh // nk
  rpt = plan.requests_per_tile
  half, rows = tile_rows(rpt, group, warpgroups)
  reqs = jnp.pad(plan.tile_reqs, ((0, 0), (0, warpgroups * half - rpt)), constant_values=-1)
  qg = q3.reshape(b, nk, group, d)[jnp.maximum(reqs, 0)]  # [TL, W * half, K, G, D]
  qg = jnp.where((reqs >= 0)[:, :, None, None, None], qg, 0)
  num_tiles = reqs.shape[0]
  qg = qg.reshape(num_tiles, warpgroups, half, nk, group, d).transpose(0, 3, 1, 2, 4, 5)
  qg = qg.reshape(num_tiles, nk, warpgroups, half * group, d)
  qg = jnp.pad(qg, ((0, 0), (0, 0), (0, 0), (0, rows - half * group), (0, 0)))
  return qg.reshape(num_tiles, nk, warpgroups * rows, d)


def _private_q(q3, nk: int):
  b, nh, d = q3.shape
  group = nh // nk
  rows = pm._round_up(group, ROW_PAD)
  return jnp.pad(q3.reshape(b, nk, group, d), ((0, 0), (0, 0), (0, rows - group), (0, 0)))


def _pools_2d(k_pool, v_pool, layer):
  """(k, v as 2-D [L * NB * bs, K * D], layer [1] int32, NB): free reshapes."""
  if k_pool.ndim == 4:
    if layer not in (None, 0):
      raise ValueError(f"a one-layer pool {k_pool.shape} takes no layer index, got {layer}")
    k_pool, v_pool, layer = k_pool[None], v_pool[None], 0
  elif layer is None:
    raise ValueError(f"a pool of {k_pool.shape[0]} layers needs a layer index")
  nl, nb, bs, nk, d = k_pool.shape
  flat = lambda p: p.reshape(nl * nb * bs, nk * d)
  return flat(k_pool), flat(v_pool), jnp.asarray(layer, jnp.int32).reshape(1), nb


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def dedup_attention_mgpu(q: jax.Array, k_pool: jax.Array, v_pool: jax.Array,
                         block_tables: jax.Array, positions: jax.Array, kv_lens: jax.Array,
                         plan: SharingPlan | None, layer=None, *,
                         config: TuningConfig | None = None, interpret=False) -> jax.Array:
  """Decode attention of q [B, 1, H, D] over the pools of `layer`, shared runs read once.

  As `dedup_attention.dedup_attention`: pools [L, NB, bs, K, D] with a layer index (int or
  traced) or one layer's [NB, bs, K, D] with layer None; `plan` from the same batch's block
  tables with requests_per_tile = TuningConfig.requests_per_tile(G) (or fewer). Without a
  plan or a shared node: `paged_decode_attention_mgpu`; T > 1: the Triton paged kernel.
  `interpret`: False (compile for the GPU) or a `plgpu.InterpretGPUParams` (CPU).
  Returns [B, 1, H, D] in q's dtype; float32 softmax and sums.
  """
  check_inputs(q, k_pool, v_pool, block_tables, positions, kv_lens)
  b, t, nh, d = q.shape
  if t != 1:
    return paged_attention(q, k_pool, v_pool, block_tables, positions, kv_lens, layer,
                           interpret=bool(interpret))
  config = config or DEFAULT
  if interpret and config.p_in_registers:
    raise NotImplementedError("p_in_registers=True runs compiled only: the Mosaic GPU "
                              "interpreter takes wgmma operands from SMEM")
  k2, v2, layer, nb = _pools_2d(k_pool, v_pool, layer)
  bs, nk = k_pool.shape[-3], k_pool.shape[-2]
  group = nh // nk
  _check(q, group)
  if plan is None or not plan.has_shared:
    pools = lambda p: p.reshape(-1, nb, bs, nk, d)
    return pm.paged_decode_attention_mgpu(q, pools(k_pool), pools(v_pool), block_tables,
                                          positions, kv_lens, layer[0], interpret=interpret)
  warpgroups = config.shared_warpgroups
  tile_rows(plan.requests_per_tile, group, warpgroups)  # validates the plan's tiles
  if plan.req_rows.shape[0] != b:
    raise ValueError(f"the plan is for {plan.req_rows.shape[0]} requests, q has {b}")
  q3 = q[:, 0]  # [B, H, D]
  shared, private = _parts(plan, b, block_tables.shape[1], nk, bs, config)
  launch = functools.partial(_item_partials, k2=k2, v2=v2, layer=layer, num_blocks=nb,
                             block_size=bs, config=config, interpret=interpret)
  # 1. Shared runs: one item per tile of a node's requests (nodes are full blocks).
  s_raw = launch(_shared_q(q3, plan, nk, warpgroups), items=_shared_items(plan),
                 part=shared, warpgroups=warpgroups, whole_pages=True)
  # 2. Private remainders: one item per request, keys [private_start, kv_len).
  p_items = (np.arange(b, dtype=np.int32), plan.private_start,
             jnp.maximum(kv_lens - plan.private_start, 0), block_tables)
  p_raw = launch(_private_q(q3, nk), items=p_items, part=private, warpgroups=1,
                 whole_pages=False)
  # 3. Each request's node partials, then its private partials, in a fixed order.
  out = merge_partials(plan, s_raw, p_raw, group=group,
                       warpgroups=warpgroups).astype(q.dtype)  # [B, K, G, D]
  return out.reshape(b, 1, nh, d)


def merge_partials(plan: SharingPlan, s_raw, p_raw, *, group: int,
                   warpgroups: int = 1) -> jax.Array:
  """Exact log-sum-exp merge of each request's partials in plain jnp -> [B, K, G, D] f32.

  s_raw: shared partials (acc [TL, K, Ss, Rs, D], m, l [TL, K, Ss, Rs]), rows in
  `tile_rows` order; p_raw: private ones [B, K, Sp, Rp(, D)]; m in log2 units. The order:
  request b's nodes req_rows[b, d], d = 0, 1, ... (root to
  deepest), each over its splits in increasing order, then its private splits in increasing
  order; the max of m first (exact in any order), then the weighted sums as an unrolled
  chain of adds in that order (XLA keeps the order of a chain, not of a jnp.sum). Empty
  splits and absent nodes are (0, -inf, 0) and add exact zeros. A row with no visible key
  gives 0.
  """
  s_acc, s_m, s_l = s_raw
  p_acc, p_m, p_l = p_raw
  rpt = plan.requests_per_tile
  rows = plan.req_rows  # [B, DEP]
  has = rows >= 0
  r = jnp.maximum(rows, 0)
  tile = (r // rpt)[..., None]  # [B, DEP, 1]
  half, rows_per_wg = tile_rows(rpt, group, warpgroups)
  slot = (r % rpt)[..., None]
  row = slot // half * rows_per_wg + slot % half * group + jnp.arange(group)  # [B, DEP, G]
  # Gather each request's node rows: [B, DEP, G, K, Ss(, D)] -> [B, DEP, K, G, Ss(, D)].
  take = lambda x: jnp.swapaxes(jnp.moveaxis(x, 3, 1)[tile, row], 2, 3)
  n_m = jnp.where(has[:, :, None, None, None], take(s_m), -jnp.inf)
  n_l = jnp.where(has[:, :, None, None, None], take(s_l), 0.0)
  n_acc = jnp.where(has[:, :, None, None, None, None], take(s_acc), 0.0)
  # Private rows g < G: [B, K, Sp, G(, D)] -> [B, K, G, Sp(, D)].
  q_m, q_l = (jnp.swapaxes(x[..., :group], 2, 3) for x in (p_m, p_l))
  q_acc = jnp.swapaxes(p_acc[..., :group, :], 2, 3)
  m_max = jnp.maximum(jnp.max(n_m, axis=(1, 4)), jnp.max(q_m, axis=3))  # [B, K, G]
  m_max = jnp.where(m_max == -jnp.inf, 0.0, m_max)
  terms = [(n_m[:, dd, ..., s], n_l[:, dd, ..., s], n_acc[:, dd, :, :, s])
           for dd in range(rows.shape[1]) for s in range(s_m.shape[2])]
  terms += [(q_m[..., s], q_l[..., s], q_acc[:, :, :, s]) for s in range(p_m.shape[2])]
  num = jnp.zeros(q_acc.shape[:3] + q_acc.shape[4:], jnp.float32)
  den = jnp.zeros(m_max.shape, jnp.float32)
  for m_s, l_s, acc_s in terms:
    w = jnp.exp2(m_s - m_max)
    num = num + w[..., None] * acc_s
    den = den + w * l_s
  return jnp.where(den[..., None] > 0, num / den[..., None], 0.0)


@functools.partial(jax.jit, static_argnames=("config",))
def shared_part_mgpu(q, k_pool, v_pool, block_tables, plan: SharingPlan, layer, *,
                     config: TuningConfig | None = None):
  """The shared launch alone (compiled), for timing its matrix work in `main`."""
  config = config or DEFAULT
  k2, v2, layer, nb = _pools_2d(k_pool, v_pool, layer)
  bs, nk = k_pool.shape[-3], k_pool.shape[-2]
  shared, _ = _parts(plan, q.shape[0], block_tables.shape[1], nk, bs, config)
  return _item_partials(_shared_q(q[:, 0], plan, nk, config.shared_warpgroups), k2, v2,
                        layer, _shared_items(plan), part=shared, num_blocks=nb,
                        block_size=bs, config=config, warpgroups=config.shared_warpgroups,
                        whole_pages=True, interpret=False)
