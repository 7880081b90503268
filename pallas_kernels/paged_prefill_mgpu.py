"""Paged grouped-query CHUNKED-PREFILL attention as a Mosaic GPU (plgpu) kernel for Hopper.

Parts, as in `paged_attention_mgpu.py` (the decode kernel, whose page layout, pipeline and
version shims this reuses): the kernel body (`_prefill_kernel`), the jitted wrapper
`paged_prefill_attention_mgpu` with its `TuningConfig`, a float32
`paged_prefill_attention_reference` on this file's interface; its GPU check-and-time table
is `hq_jax.bench.mosaic` (`hq-jax bench mosaic prefill`). A leaf: jax, numpy,
the standard library and `paged_attention_mgpu` only.

Interface and semantics of `paged_attention.paged_attention` for T >= 1 query tokens: q
[B, T, H, D]; pools of ALL layers [L, num_blocks, block_size, K, D]; block tables [B, MB];
positions [B, T]; kv_lens [B]; `layer` (int or traced). Query token t of request b sees the
logical keys j <= positions[b, t] and j < kv_lens[b]; a token that sees no key gives 0.

Rows: the G = H / K query heads of kv head h and the T tokens form the rows of both matmuls,
row r = t * G + g (the wrapper lays q out as [B, K, T * G, D], padded to tiles of 64 rows,
and the output back: two XLA copies of q's size, about 1% of a 4k chunk's time). A
program is one computing warpgroup per tile of 64 rows (`compute_wgs` = 2 or 3: that many
warpgroups on adjacent tiles, sharing the K/V slots, as attention_mgpu (2) and FA3 at
head_dim 64 (3); `schedule_barrier` adds attention_mgpu's ping-pong for 2: they take turns,
one's softmax under the other's wgmmas), plus with
`warp_specialized` a warpgroup that only issues TMA copies. Grid (row programs, kv heads,
requests); programs of the last row tiles (the most keys, causal) start first.

Pages: the wrapper views the pools (free, no copy) as 2-D [L * num_blocks * block_size,
K * D]; the page of (layer, physical block p, kv head h) is the box rows [(layer *
num_blocks + p) * block_size, +block_size), columns [h * D, +D): one TMA copy per page, the
page id read from the block table in GMEM. A pipeline step is `pages_per_step` pages
(block_kv keys) of K and of V into one of `max_concurrent_steps` SMEM slots, refilled as
soon as its step is done (by every computing warpgroup).

Math per step: S = Q K^T (wgmma, f32), online softmax in log2 units (exp2, log2(e) folded
into the scale), O += P V (wgmma; P through SMEM by default, from registers with
`p_in_registers`, compiled only: the interpreter takes wgmma operands from SMEM only).

Causal: per row tile the wrapper computes (from positions and kv_lens only) hi = min(kv_len,
max position + 1) over its rows, the number of steps ceil(hi / block_kv) (steps entirely
past the tile's last position are never loaded, nor computed) and the number of leading
steps every real row of the tile sees whole (no mask). Only the remaining (diagonal) steps
mask, per row: key < hi and key <= the row's position (on the max and on the
probabilities after exp2, so a hidden score, even NaN, drops out). The one step holding
kv_len (when kv_len is not a multiple of block_kv) also zeroes the V rows of keys >= kv_len
in SMEM before PV: garbage there, even NaN, times a zero probability would still be NaN
(with several computing warpgroups, warpgroup 0 zeroes and they meet at a barrier before
PV).
Keys below kv_len are written cache, finite (as the Triton kernel assumes too). A warpgroup
whose tile needs fewer steps than its neighbour's waits for and releases the rest.

Reduction order: every tile walks its keys from 0 in steps of block_kv at fixed logical
offsets: the bits of a request's output depend on its own q, positions, kv_len and logical
K/V and on block_kv only, not on which physical blocks hold its pages, its batch
neighbours, the table width, the slots, warp specialization or compute_wgs
(tests/test_paged_prefill_mgpu.py checks these). Padding rows (past T * G) get position
-1; they never reach the output.

Key splits (`kv_splits` > 1, `kv_split` keys each; the engine runs none, `TUNED_KV_SPLITS`):
a row program's keys are cut at the fixed key positions s * kv_split (the last split takes
the rest), one program each, for more programs where a chunk has too few to fill the GPU
(three computing warpgroups take the whole register file: one program per SM). Each writes
its rows' acc / l in q's dtype with m and l; `paged_attention_mgpu.merge_splits` combines
them exactly, in increasing split order. The boundaries do not depend on the program's
rows, so a row's bits do not depend on where its chunk starts either.

Tested in the Mosaic GPU interpreter on CPU (races, out-of-bounds reads and uninitialized
SMEM checked); lowers for `cuda` on a CPU machine
(`jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",))`) at the 0.5B and 7B shapes,
every config of `hq_jax.bench.mosaic.main_configs`; its tests also run compiled on a Hopper GPU, the
three-warpgroup key splits among them. `tuned_config` (three computing warpgroups; two key
splits at D=64) is the engine's prefill under `--attention=pallas` on Hopper; how close it
comes to `attention_mgpu` in 16k and 4k chunks: docs/results.md, "GPU kernels". API
differences between jax versions: those of paged_attention_mgpu (`_kernel_call`); nothing
else used here differs.
Not done: tuning beyond the handful of configs `hq-jax bench mosaic prefill` times. The kernel's default config
is the simplest schedule (one warpgroup, P through SMEM); the engine runs `tuned_config`,
the fastest measured: three computing warpgroups (192 rows per step, FA3's tile at head_dim
64, without its intra-warpgroup overlap), at both head_dims.
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

from pallas_kernels.paged_attention_mgpu import (SWIZZLE, _kernel_call, _round_up,
                                                check_inputs, compiles_here, copy_pages,
                                                fill_pipeline, initial_carry, merge_splits,
                                                online_softmax, table_pages)

BLOCK_Q = 64  # query rows per computing warpgroup: one wgmma's M
# Registers per thread (computing, memory warpgroup) by computing warpgroups, within the
# 64K of an SM: 2 as attention_mgpu (2 x 232 + 40 = 504 per lane of 128), 3 as FA3 at
# head_dim 64 (3 x 160 + 32 = 512).
REGISTERS = {2: (232, 40), 3: (160, 32)}


@dataclasses.dataclass(frozen=True)
class TuningConfig:
  """Tile sizes of the prefill kernel; the reduction order depends on block_kv only (the
  other knobs change the schedule, not a bit of the output).

  pages_per_step: pages (of block_size tokens) per pipeline step; block_kv = pages_per_step *
    block_size keys must be a multiple of 64 (the K dimension of the PV wgmma in bf16).
  max_concurrent_steps: SMEM slots of K/V, i.e. steps in flight (>= 2 to overlap).
  p_in_registers: feed P to the PV wgmma from registers (compiled GPU only).
  warp_specialized: a separate warpgroup only issues the TMA copies.
  compute_wgs: computing warpgroups per program (1, 2 or 3; more than 1 needs
    warp_specialized), each with its own tile of 64 query rows, sharing the K/V slots (as
    attention_mgpu; 3 as FA3 at head_dim 64: 192 rows per K/V step).
  schedule_barrier: with compute_wgs=2, FA3's ping-pong (as attention_mgpu): the two
    warpgroups take turns, one's softmax while the other's wgmmas run. Needs >= 2 slots.
  kv_splits: programs per row program, each over the keys of one split, merged exactly in
    increasing split order outside the kernel. More programs where a chunk has too few to
    fill the GPU; 1 = none.
  kv_split: keys per split (a multiple of block_kv; needed with kv_splits > 1). Split s
    holds the keys [s * kv_split, (s + 1) * kv_split), the last one every key from
    (kv_splits - 1) * kv_split on: boundaries at fixed absolute key positions, so a row's
    bits do not depend on where its chunk starts, on the chunk size or on its neighbours.
  """

  pages_per_step: int = 4
  max_concurrent_steps: int = 2
  p_in_registers: bool = False
  warp_specialized: bool = False
  compute_wgs: int = 1
  schedule_barrier: bool = False
  kv_splits: int = 1
  kv_split: int | None = None

  def __post_init__(self):
    if self.pages_per_step < 1:
      raise ValueError(f"pages_per_step must be >= 1, got {self.pages_per_step}")
    if self.max_concurrent_steps < 1:
      raise ValueError(f"max_concurrent_steps must be >= 1, got {self.max_concurrent_steps}")
    if self.compute_wgs not in (1, 2, 3):
      raise ValueError(f"compute_wgs must be 1, 2 or 3, got {self.compute_wgs}")
    if self.compute_wgs > 1 and not self.warp_specialized:
      raise ValueError(f"compute_wgs={self.compute_wgs} needs warp_specialized=True (a "
                       "memory warpgroup)")
    if self.schedule_barrier and (self.compute_wgs != 2 or self.max_concurrent_steps < 2):
      raise ValueError("schedule_barrier needs compute_wgs=2 and max_concurrent_steps >= 2")
    if self.kv_splits < 1:
      raise ValueError(f"kv_splits must be >= 1, got {self.kv_splits}")
    if self.kv_splits > 1 and (self.kv_split is None or self.kv_split <= 0):
      raise ValueError(f"kv_splits={self.kv_splits} needs kv_split, the keys per split (a "
                       f"positive multiple of block_kv), got {self.kv_split}")

  def block_kv(self, block_size: int) -> int:
    block_kv = self.pages_per_step * block_size
    if block_kv % 64:
      raise ValueError(f"pages_per_step * block_size = {block_kv} must be a multiple of 64 "
                       "(the K dimension of the PV wgmma)")
    if self.kv_splits > 1 and self.kv_split % block_kv:
      raise ValueError(f"kv_split={self.kv_split} must be a multiple of block_kv={block_kv}")
    return block_kv


# The simplest schedule (one warpgroup, no memory warpgroup): the kernel's default and
# the benchmark's baseline; the engine runs `tuned_config` below. Both fit two programs on an SM
# (smem_bytes: 88 KiB each), so one program's softmax overlaps the other's wgmma.
DEFAULT_D64 = TuningConfig(pages_per_step=8, max_concurrent_steps=2)  # block_kv 128
DEFAULT_D128 = TuningConfig(pages_per_step=4, max_concurrent_steps=2)  # block_kv 64


def default_config(head_dim: int) -> TuningConfig:
  return DEFAULT_D128 if head_dim >= 128 else DEFAULT_D64


# The fastest variant measured, at both head_dims (a 32k causal prefill through the pool,
# timed beside jax's attention_mgpu in the same run; figures in docs/log/, "Three computing
# warpgroups"): three computing warpgroups (192 rows per K/V step), 8 pages per step, two
# slots, P in registers; faster than the two-warpgroup ping-pong configs it replaces.
# Same bits as every other config with the same block_kv and no key splits.
TUNED = TuningConfig(pages_per_step=8, max_concurrent_steps=2, p_in_registers=True,
                     warp_specialized=True, compute_wgs=3)
# Key splits per head_dim, chosen by `hq-jax bench mosaic prefill 0.5b 7b
# --chunks=4096,16384 --tuned` (figures: docs/results.md, "GPU kernels"). The splits once timed
# (two at D=64 sped up 4k chunks, left 16k chunks unchanged; at D=128 slower) cut each
# program's own steps in two, boundaries that moved with the chunk's rows; splits at fixed key
# positions (`kv_split`) are not timed yet, so the engine runs none: `hq_jax.bench.mosaic.tuned_variants` has the
# ones to time.
TUNED_KV_SPLITS = {64: 1, 128: 1}


def tuned_config(head_dim: int, *, interpret: bool = False) -> TuningConfig:
  """The engine's config: the fastest measured (above). For the interpreter, the same
  schedule of keys (block_kv, kv_splits) from one warpgroup with P through SMEM: the
  interpreter's wgmma takes SMEM operands only, and it runs each warpgroup as a thread
  (slow, and on a 2-core machine the blocking barrier callbacks of several can starve XLA's
  CPU thread pools). Without splits that is the same bits as on the GPU; with splits the
  boundaries are fixed key positions, so the same bits too."""
  config = dataclasses.replace(TUNED, kv_splits=TUNED_KV_SPLITS.get(head_dim, 1))
  if interpret:
    return TuningConfig(pages_per_step=config.pages_per_step,
                        max_concurrent_steps=config.max_concurrent_steps,
                        kv_splits=config.kv_splits, kv_split=config.kv_split)
  return config


def supported(dtype, head_dim: int, block_size: int) -> bool:
  """Whether `tuned_config` runs compiled here (`paged_attention_mgpu.compiles_here`),
  with pages that fill whole pipeline steps."""
  if not compiles_here(dtype, head_dim):
    return False
  try:
    tuned_config(head_dim).block_kv(block_size)
  except ValueError:
    return False
  return True


def smem_bytes(config: TuningConfig, head_dim: int, block_size: int = 16,
               itemsize: int = 2) -> int:
  """SMEM of one program (Mosaic adds ~3 KiB: barriers, alignment): per computing
  warpgroup the q/out tile, P and the row positions; the K/V slots."""
  block_kv = config.pages_per_step * block_size
  per_wg = ((BLOCK_Q * head_dim + (0 if config.p_in_registers else BLOCK_Q * block_kv))
            * itemsize + BLOCK_Q * 4)
  return (config.compute_wgs * (per_wg + (2 * BLOCK_Q * 4 if config.kv_splits > 1 else 0))
          + 2 * config.max_concurrent_steps * block_kv * head_dim * itemsize)


# ----------------------------------------------------------------------------- kernel
def _prefill_kernel(
    layer_ref,  # [1] int32 (GMEM)
    kv_lens_ref,  # [B] int32
    tiles_ref,  # [B, NT, 3] int32: (key steps, unmasked leading steps, hi) per row tile
    row_pos_ref,  # [B, NT * 64] int32: position of each query row, -1 for padding rows
    tables_ref,  # [B, MB] int32
    q_ref,  # [B, K, NT * 64, D] rows r = t * G + g
    k_ref,  # [L * NB * block_size, K * D] (all layers' pools, 2-D view)
    v_ref,  # [L * NB * block_size, K * D]
    *out_refs,  # out [B, K, NT * 64, D]; with S splits [B, K, S, NT * 64, D], m, l
    #             [B, K, S, NT * 64] (m in log2 units)
    num_blocks: int, block_size: int, pages_per_step: int, max_concurrent_steps: int,
    p_in_registers: bool, warp_specialized: bool, compute_wgs: int, schedule_barrier: bool,
    kv_splits: int, kv_split: int | None, scale: float, interpreted: bool):
  b = lax.axis_index("b")
  h = lax.axis_index("h")
  num_programs = tiles_ref.shape[1] // compute_wgs
  if kv_splits == 1:
    program = num_programs - 1 - lax.axis_index("r")  # the last tiles see the most keys: first
  else:  # a row program's splits are adjacent in the grid
    program = num_programs - 1 - lax.axis_index("r") // kv_splits
    split = lax.rem(lax.axis_index("r"), kv_splits)
  head_dim = q_ref.shape[-1]
  dtype = q_ref.dtype
  block_kv = pages_per_step * block_size
  slots = max_concurrent_steps
  page_base = layer_ref[0] * num_blocks  # first physical block of this layer
  kv_len = kv_lens_ref[b]
  # The one step that holds both keys < kv_len and keys >= kv_len (garbage in the pool,
  # even NaN): its V rows >= kv_len are zeroed in SMEM before PV. -1: no such step.
  partial_step = jnp.where(kv_len % block_kv != 0, kv_len // block_kv, -1)
  # Steps each computing warpgroup's tile needs; the slots hold the longest.
  tile_steps = [tiles_ref[b, program * compute_wgs + w, 0] for w in range(compute_wgs)]
  num_steps = functools.reduce(jnp.maximum, tile_steps)
  # Loop indices below count steps from this program's first one (`absolute` maps them to
  # key steps); without splits the two are the same.
  if kv_splits == 1:
    absolute = in_split = lambda steps: steps
  else:  # split `split` holds the key steps [lo, lo + split_len), the last one [lo, .)
    split_len = kv_split // block_kv
    lo = split * split_len
    span = jnp.where(split == kv_splits - 1, jnp.iinfo(jnp.int32).max // 2, split_len)
    absolute = lambda i: lo + i
    in_split = lambda steps: jnp.clip(steps - lo, 0, span)  # a count of steps
    num_steps = in_split(num_steps)

  tiled = (plgpu.TilingTransform((8, SWIZZLE // jnp.dtype(dtype).itemsize)),
           plgpu.SwizzleTransform(SWIZZLE))
  kv_smem = lambda: plgpu.SMEM((slots, block_kv, head_dim), dtype, transforms=tiled)
  p_smem_type = (None if p_in_registers else
                 plgpu.SMEM((compute_wgs, BLOCK_Q, block_kv), dtype, transforms=tiled))
  kv_barriers = lambda: plgpu.Barrier(num_arrivals=pages_per_step, num_barriers=slots)
  qo_smem_type = plgpu.SMEM((compute_wgs, BLOCK_Q, head_dim), dtype, transforms=tiled)
  pos_smem_type = plgpu.SMEM((compute_wgs, BLOCK_Q), jnp.int32)
  # With splits: each computing warpgroup's partial m and l (float32 rows) on their way out.
  ml_smem_type = (plgpu.SMEM((compute_wgs, 2, BLOCK_Q), jnp.float32) if kv_splits > 1
                  else None)
  # Per computing warpgroup: its q tile and its row positions (2 copies).
  q_barrier_type = plgpu.Barrier(num_arrivals=2, num_barriers=compute_wgs)

  def pages_of(step):
    return table_pages(tables_ref, b, step * pages_per_step, page_base, pages_per_step)

  issue = functools.partial(copy_pages, k_ref, v_ref, head=h, block_size=block_size,
                            head_dim=head_dim)

  def prefetch(kv):
    fill_pipeline(lambda i: issue(kv, i, pages_of(absolute(i))), slots, num_steps)

  def compute(w, qo_smem, pos_smem, ml_smem, q_barrier, kv, p_smem, step_done, zero_v, *,
              load_next_pages: bool, turn=None):
    """Computing warpgroup w (traced or static): its tile's key loop, then its output.

    step_done(i, slot, next_pages) runs once step i's wgmmas are done (the slot may be
    refilled); zero_v(a, slot) zeroes the V rows >= kv_len of key step a == partial_step.
    turn: the schedule barrier (two rounds a step), or None. With splits, ml_smem holds the
    partial's m and l on their way out.
    """
    k_smem, v_smem, k_barriers, v_barriers = kv
    tile = program * compute_wgs + w
    rows = pl.ds(tile * BLOCK_Q, BLOCK_Q)
    # Counted from the program's first step: steps [0, .) hold a key some row sees; steps
    # [0, num_full): every key seen by every row.
    num_tile_steps = in_split(tiles_ref[b, tile, 0])
    num_full = in_split(tiles_ref[b, tile, 1])
    hi = tiles_ref[b, tile, 2]  # keys >= hi are seen by no row of the tile
    plgpu.copy_gmem_to_smem(q_ref.at[b, h, rows], qo_smem, q_barrier)
    plgpu.copy_gmem_to_smem(row_pos_ref.at[b, rows], pos_smem, q_barrier)
    plgpu.barrier_wait(q_barrier)
    row_pos = plgpu.load(pos_smem, layout=plgpu.Layout.WGMMA.reduce(1))  # [64] int32
    if turn is not None:
      pl.when(w == 1)(functools.partial(take_turn, turn))  # warpgroup 0 goes first

    def step(i, carry, *, masked: bool):
      acc, m, l = carry  # [64, D], [64], [64] float32
      slot = lax.rem(i, slots)
      a = absolute(i)  # the key step
      # The table loads for the refill at the end of this step, issued now so their latency
      # hides behind this step's matmuls (clamped: always in bounds).
      next_pages = pages_of(a + slots) if load_next_pages else None
      plgpu.barrier_wait(k_barriers.at[slot])

      def compute_qk(acc_ref):
        plgpu.wgmma(acc_ref, qo_smem, k_smem.at[slot].transpose((1, 0)))
        if turn is not None:
          take_turn(turn)  # QK^T issued: the other warpgroup's softmax may end
        return acc_ref[...]

      scores = pl.run_scoped(compute_qk, plgpu.ACC((BLOCK_Q, block_kv), jnp.float32))
      visible = None  # scores: [64, block_kv], unscaled
      if masked:  # key < hi (hence < kv_len) and key <= the row's position
        cols = plgpu.broadcasted_iota(jnp.int32, (BLOCK_Q, block_kv), 1,
                                      layout=plgpu.Layout.WGMMA)
        keys = cols + a * block_kv
        visible = (keys < hi) & (
            keys <= lax.broadcast_in_dim(row_pos, (BLOCK_Q, block_kv), [0]))
      p, m_new, l, alpha = online_softmax(scores, m, l, visible, scale=scale)
      # All of the step's vector work before the turn ends, as attention_mgpu: the rescaled
      # accumulator (PV accumulates into it) and P in the input dtype; the barrier keeps the
      # compiler from sinking any of it past the turn, under the other warpgroup's wgmmas.
      acc = lax.broadcast_in_dim(alpha, acc.shape, [0]) * acc
      p = p.astype(dtype)
      acc, m_new, l, p = lax.optimization_barrier((acc, m_new, l, p))
      if not p_in_registers:
        p_smem[...] = p

      if turn is not None:
        plgpu.barrier_arrive(turn)  # softmax done
      plgpu.barrier_wait(v_barriers.at[slot])
      if masked:  # only a masked step can be the partial one (it holds a key >= hi)
        zero_v(a, slot)
      if turn is not None:
        plgpu.barrier_wait(turn)  # the other warpgroup's QK^T issued: tensor cores free
      plgpu.commit_smem()  # the P (and V) stores, before the wgmma reads them

      def compute_pv(acc_ref):
        plgpu.wgmma(acc_ref, p if p_in_registers else p_smem, v_smem.at[slot])

      def accumulate_pv(acc_ref):
        if not interpreted:  # PV accumulates into the rescaled accumulator, as attention_mgpu
          acc_ref[...] = acc
        compute_pv(acc_ref)
        return acc_ref[...]

      # The interpreter cannot store to a wgmma accumulator: there PV goes into a fresh
      # (zero) one and is added (other rounding, as deterministic).
      pv = pl.run_scoped(accumulate_pv, plgpu.ACC((BLOCK_Q, head_dim), jnp.float32))
      acc = acc + pv if interpreted else pv
      step_done(i, slot, next_pages)  # both wgmmas are done: the slot may be refilled
      return acc, m_new, l

    carry = lax.fori_loop(0, num_full, functools.partial(step, masked=False),
                          initial_carry(BLOCK_Q, head_dim))
    acc, m, l = lax.fori_loop(num_full, num_tile_steps, functools.partial(step, masked=True),
                              carry)

    # acc / l (0 for a row that saw no key: it has acc = 0) through the q tile's SMEM; with
    # splits also m (log2 units) and l, for the merge.
    l_safe = jnp.where(l == 0.0, 1.0, l)
    qo_smem[...] = (acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])).astype(dtype)
    if kv_splits > 1:
      ml_smem.at[0][...] = m
      ml_smem.at[1][...] = l
    plgpu.commit_smem()
    if kv_splits == 1:
      plgpu.copy_smem_to_gmem(qo_smem, out_refs[0].at[b, h, rows])
    else:
      plgpu.copy_smem_to_gmem(qo_smem, out_refs[0].at[b, h, split, rows])
      plgpu.copy_smem_to_gmem(ml_smem.at[0], out_refs[1].at[b, h, split, rows])
      plgpu.copy_smem_to_gmem(ml_smem.at[1], out_refs[2].at[b, h, split, rows])
    plgpu.wait_smem_to_gmem(0)
    return num_tile_steps

  def take_turn(turn):
    plgpu.barrier_arrive(turn)
    plgpu.barrier_wait(turn)

  def zero_rows_past_kv_len(v_smem, i, slot):
    v_rows = plgpu.broadcasted_iota(jnp.int32, (block_kv, head_dim), 0,
                                    layout=plgpu.Layout.WGMMA)
    v_slot = v_smem.at[slot]
    v_slot[...] = jnp.where(v_rows < kv_len - i * block_kv, v_slot[...], 0).astype(dtype)

  if not warp_specialized:
    # One warpgroup issues the copies and computes: a slot is refilled at the end of the
    # step that consumed it.
    def body(qo_smem, pos_smem, ml_smem, k_smem, v_smem, p_smem, q_barrier, k_barriers,
             v_barriers):
      kv = (k_smem, v_smem, k_barriers, v_barriers)
      prefetch(kv)  # before the q wait: K/V latency overlaps q's

      def refill(i, slot, next_pages):
        @pl.when(i + slots < num_steps)
        def _refill():
          issue(kv, slot, next_pages)

      def zero_v(i, slot):
        pl.when(i == partial_step)(lambda: zero_rows_past_kv_len(v_smem, i, slot))

      compute(0, qo_smem.at[0], pos_smem.at[0], None if ml_smem is None else ml_smem.at[0],
              q_barrier.at[0], kv, None if p_smem is None else p_smem.at[0], refill, zero_v,
              load_next_pages=True)

    pl.run_scoped(body, qo_smem_type, pos_smem_type, ml_smem_type, kv_smem(), kv_smem(),
                  p_smem_type, q_barrier_type, kv_barriers(), kv_barriers())
    return

  # Warp specialized: warpgroups 0..compute_wgs-1 compute, one tile each; the last one only
  # issues copies, refilling a slot once every computing warpgroup released it.
  def ws_body(qo_smem, pos_smem, ml_smem, k_smem, v_smem, p_smem, q_barrier, k_barriers,
              v_barriers, consumed, zeroed, turn):
    kv = (k_smem, v_smem, k_barriers, v_barriers)
    wg = lax.axis_index("wg")

    @pl.when(wg < compute_wgs)
    def _compute():
      if compute_wgs > 1:  # as attention_mgpu (2) and FA3 at head_dim 64 (3)
        plgpu.set_max_registers(REGISTERS[compute_wgs][0], action="increase")

      def release(i, slot, _):
        @pl.when(i + slots < num_steps)  # only the slots the producer will refill
        def _release():
          plgpu.barrier_arrive(consumed.at[slot])

      def meet():  # at `zeroed`, once per program, after the zeroing's stores
        plgpu.commit_smem()
        plgpu.barrier_arrive(zeroed)
        plgpu.barrier_wait(zeroed)

      def zero_and_meet(i, slot):
        """Warpgroup 0 zeroes the shared V slot, then every computing warpgroup meets before
        any reads it: each passes step partial_step exactly once, in its key loop (a masked
        step) or in the drain below."""
        pl.when(wg == 0)(lambda: zero_rows_past_kv_len(v_smem, i, slot))
        meet()

      def zero_v(i, slot):
        @pl.when(i == partial_step)
        def _zero():
          if compute_wgs == 1:
            zero_rows_past_kv_len(v_smem, i, slot)
            return
          if not schedule_barrier:
            zero_and_meet(i, slot)
            return
          # Ping-pong (two warpgroups): a warpgroup in the drain takes turns, so only those
          # that use this step meet. When both do, warpgroup 0 zeroes and both meet at
          # `zeroed` (once per program): each passed its turn's arrive, neither waits on
          # its end yet.
          other_steps = tiles_ref[b, program * 2 + 1 - wg, 0]
          both = other_steps > i
          pl.when((wg == 0) | ~both)(lambda: zero_rows_past_kv_len(v_smem, i, slot))
          pl.when(both)(meet)

      done = compute(wg, qo_smem.at[wg], pos_smem.at[wg],
                     None if ml_smem is None else ml_smem.at[wg], q_barrier.at[wg], kv,
                     None if p_smem is None else p_smem.at[wg], release, zero_v,
                     load_next_pages=False, turn=turn)

      # Steps only the other warpgroup needs: wait for each (so this warpgroup never
      # releases a slot twice within one fill) and release it.
      @pl.loop(done, num_steps)
      def _drain(i):
        slot = lax.rem(i, slots)
        plgpu.barrier_wait(k_barriers.at[slot])
        plgpu.barrier_wait(v_barriers.at[slot])
        if compute_wgs > 1 and not schedule_barrier:
          a = absolute(i)
          pl.when(a == partial_step)(lambda: zero_and_meet(a, slot))
        release(i, slot, None)
        if turn is not None:  # a step's two turns, as if computed
          take_turn(turn)
          take_turn(turn)

      if turn is not None:
        # Pairs with the extra turn warpgroup 1 takes before its loop.
        pl.when(wg == 0)(functools.partial(take_turn, turn))

    @pl.when(wg == compute_wgs)
    def _memory():
      if compute_wgs > 1:
        plgpu.set_max_registers(REGISTERS[compute_wgs][1], action="decrease")
      prefetch(kv)

      def refill(j, _):  # step j + slots goes where step j was
        slot = lax.rem(j, slots)
        pages = pages_of(absolute(j) + slots)  # loaded before the wait: latency hidden
        plgpu.barrier_wait(consumed.at[slot])
        issue(kv, slot, pages)

      lax.fori_loop(0, jnp.maximum(num_steps - slots, 0), refill, None)

  pl.run_scoped(ws_body, qo_smem_type, pos_smem_type, ml_smem_type, kv_smem(), kv_smem(),
                p_smem_type, q_barrier_type, kv_barriers(), kv_barriers(),
                plgpu.Barrier(num_arrivals=compute_wgs, num_barriers=slots),
                plgpu.Barrier(num_arrivals=compute_wgs),
                plgpu.Barrier(num_arrivals=2) if schedule_barrier else None,
                collective_axes="wg")


# ---------------------------------------------------------------------------- wrapper
def tile_bounds(positions, kv_lens, group: int, num_tiles: int, block_kv: int):
  """Per-row positions [B, NT * 64] (-1 past T * G) and per-row-tile (key steps, unmasked
  leading steps, hi) [B, NT, 3], from positions [B, T] and kv_lens [B] only."""
  b, t = positions.shape
  rows = jnp.arange(num_tiles * BLOCK_Q, dtype=jnp.int32)
  valid = rows < t * group
  row_pos = jnp.where(valid[None], positions[:, jnp.minimum(rows // group, t - 1)], -1)
  by_tile = row_pos.reshape(b, num_tiles, BLOCK_Q)
  kv_len = kv_lens[:, None]
  hi = jnp.clip(jnp.max(by_tile, axis=-1) + 1, 0, kv_len)  # [B, NT]
  num_steps = (hi + block_kv - 1) // block_kv
  # Keys below visible_end are seen by every real row of the tile (padding rows compute
  # on them too; they never reach the output).
  big = jnp.iinfo(jnp.int32).max
  visible_end = jnp.min(jnp.where(valid.reshape(num_tiles, BLOCK_Q)[None], by_tile + 1, big),
                        axis=-1)
  visible_end = jnp.clip(visible_end, 0, kv_len)
  num_full = jnp.minimum(visible_end // block_kv, num_steps)
  return row_pos, jnp.stack([num_steps, num_full, hi], axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def paged_prefill_attention_mgpu(q: jax.Array, k_pool: jax.Array, v_pool: jax.Array,
                                 block_tables: jax.Array, positions: jax.Array,
                                 kv_lens: jax.Array, layer=0, *,
                                 config: TuningConfig | None = None,
                                 interpret=False) -> jax.Array:
  """Attention of q [B, T, H, D] over layer `layer` of pools [L, NB, bs, K, D].

  Query t of request b attends to logical keys j <= positions[b, t] and j < kv_lens[b]
  through block_tables [B, MB] (entries past a request's blocks must be valid block ids).
  Returns [B, T, H, D] in q's dtype (0 for a token that sees no key); softmax and sums in
  float32. `interpret`: False (compile for the GPU), or a `plgpu.InterpretGPUParams` (CPU).
  """
  check_inputs(q, k_pool, v_pool, block_tables, positions, kv_lens, decode=False)
  b, t, nh, d = q.shape
  nl, nb, bs, nk, _ = k_pool.shape
  group = nh // nk
  config = config or default_config(d)
  block_kv = config.block_kv(bs)
  if interpret and config.p_in_registers:
    raise NotImplementedError("p_in_registers=True runs compiled only: the Mosaic GPU "
                              "interpreter takes wgmma operands from SMEM")
  # Row tiles of 64, a whole number of programs of compute_wgs tiles each.
  num_tiles = _round_up(pl.cdiv(t * group, BLOCK_Q), config.compute_wgs)
  num_rows = num_tiles * BLOCK_Q

  # Rows r = t * G + g of kv head h, padded with zeros to whole tiles.
  q_rows = q.reshape(b, t, nk, group, d).transpose(0, 2, 1, 3, 4).reshape(b, nk, t * group, d)
  q_rows = jnp.pad(q_rows, ((0, 0), (0, 0), (0, num_rows - t * group), (0, 0)))
  row_pos, tiles = tile_bounds(positions.astype(jnp.int32), kv_lens.astype(jnp.int32),
                               group, num_tiles, block_kv)
  # Free views: a page of one kv head is a 2-D box [bs, D] of these.
  k2 = k_pool.reshape(nl * nb * bs, nk * d)
  v2 = v_pool.reshape(nl * nb * bs, nk * d)
  layer = jnp.asarray(layer, jnp.int32).reshape(1)

  splits = config.kv_splits
  kernel = functools.partial(
      _prefill_kernel, num_blocks=nb, block_size=bs, pages_per_step=config.pages_per_step,
      max_concurrent_steps=config.max_concurrent_steps, p_in_registers=config.p_in_registers,
      warp_specialized=config.warp_specialized, compute_wgs=config.compute_wgs,
      schedule_barrier=config.schedule_barrier, kv_splits=splits, kv_split=config.kv_split,
      scale=d ** -0.5 * math.log2(math.e), interpreted=bool(interpret))
  threads = (dict(num_threads=config.compute_wgs + 1, thread_name="wg")
             if config.warp_specialized else {})
  if splits == 1:
    out_type = jax.ShapeDtypeStruct((b, nk, num_rows, d), q.dtype)
  else:  # per split: acc / l in q's dtype, m (log2 units) and l
    out_type = (jax.ShapeDtypeStruct((b, nk, splits, num_rows, d), q.dtype),
                jax.ShapeDtypeStruct((b, nk, splits, num_rows), jnp.float32),
                jax.ShapeDtypeStruct((b, nk, splits, num_rows), jnp.float32))
  call = _kernel_call(
      kernel, out_type, interpret=interpret or None,
      grid=(num_tiles // config.compute_wgs * splits, nk, b), grid_names=("r", "h", "b"),
      **threads, compiler_params=plgpu.CompilerParams(approx_math=True))
  out = call(layer, kv_lens.astype(jnp.int32), tiles, row_pos,
             block_tables.astype(jnp.int32), q_rows, k2, v2)
  if splits > 1:  # the partials are normalized (acc / l): the decode kernel's merge of acc
    normed, m, l = out
    out = merge_splits(normed.astype(jnp.float32) * l[..., None], m, l).astype(q.dtype)
  out = out[:, :, :t * group].reshape(b, nk, t, group, d).transpose(0, 2, 1, 3, 4)
  return out.reshape(b, t, nh, d)


# -------------------------------------------------------------------------- reference
def paged_prefill_attention_reference(q, k_pool, v_pool, block_tables, positions, kv_lens,
                                      layer=0):
  """float32 oracle on the kernel's interface: gather the layer's blocks in logical order,
  token t of request b attends to keys j <= positions[b, t] and j < kv_lens[b] (hidden keys,
  even NaN, drop out; a token that sees no key gives 0)."""
  b, t, nh, d = q.shape
  nk = k_pool.shape[3]
  gather = lambda pool: pool[layer][block_tables].reshape(b, -1, nk, d).astype(jnp.float32)
  k, v = gather(k_pool), gather(v_pool)  # [B, S, K, D]
  keys = jnp.arange(k.shape[1], dtype=jnp.int32)
  visible = ((keys[None, None] <= positions[:, :, None])
             & (keys[None, None] < kv_lens[:, None, None]))  # [B, T, S]
  qg = q.astype(jnp.float32).reshape(b, t, nk, nh // nk, d)  # [B, T, K, G, D]
  scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, precision=lax.Precision.HIGHEST) * d ** -0.5
  mask = visible[:, None, None]  # [B, 1, 1, T, S]
  scores = jnp.where(mask, scores, -jnp.inf)
  probs = jnp.where(mask, jnp.exp(scores - jnp.max(scores, -1, keepdims=True)), 0.0)
  probs = probs / jnp.maximum(jnp.sum(probs, -1, keepdims=True), 1e-30)
  v = jnp.where(visible.any(1)[:, :, None, None], v, 0.0)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v, precision=lax.Precision.HIGHEST)
  return out.reshape(b, t, nh, d)
