"""Paged grouped-query DECODE attention as a Mosaic GPU (plgpu) kernel for Hopper.

Parts, as in `paged_attention.py`: the kernel body (`_decode_kernel`), the jitted wrapper
`paged_decode_attention_mgpu` with its `TuningConfig`, the exact split merge (`merge_splits`,
plain jnp), a float32 `paged_decode_attention_reference` on this file's interface (the tests
also check against `paged_attention.paged_attention_reference`); its GPU check-and-time
sweep is `hq_jax.bench.mosaic` (`hq-jax bench mosaic decode [--sweep]`). Imports
jax, numpy, the standard library and `_common` (its input checks) only.

Layout: q [B, 1, H, D]; pools of ALL layers [L, num_blocks, block_size, K, D]; block tables
[B, MB]; positions [B, 1]; kv_lens [B]; `layer` picks the layer (may be traced). The
wrapper only reshapes the pools (free, no copy) to 2-D [L * num_blocks * block_size, K * D]:
the page of (layer, physical block p, kv head h) is then the plain 2-D box
rows [(layer * num_blocks + p) * block_size, +block_size), columns [h * D, +D), one TMA copy.

One program (one warpgroup of 128 threads; two with `warp_specialized`, the second only
issuing the TMA copies) per (request, kv head, split of the key sequence):
  * its G query heads are the rows of both matmuls, padded to the 64 rows of a wgmma
    (rows G.. of the SMEM q tile are never initialized or written out: every row of QK^T,
    of the softmax and of PV depends on its own q row only, so they cannot leak);
  * it walks its split in steps of `block_kv` keys (pages_per_step pages): each step is
    2 * pages_per_step TMA copies (one per page of K and of V, page id read from the block
    table in GMEM, like ragged_dot_mgpu reads its group sizes) into one of
    `max_concurrent_steps` SMEM slots; a slot is refilled as soon as its step is done, so
    up to max_concurrent_steps steps of K/V are in flight while the warpgroup computes;
  * QK^T and PV are wgmma (bf16 in, f32 accumulate); the online softmax is in log2 units
    with exp2 (the scale has log2(e) folded in), as in `paged_attention.online_softmax_step`.
    P goes through SMEM to the PV wgmma by default (the interpreter takes SMEM operands
    only); `p_in_registers` feeds it from registers on the GPU, as attention_mgpu does;
  * only the last step of a split can hold keys it must not see (j > position or
    j >= kv_len: garbage or NaN in the pool, or pages read through table entries past the
    request's blocks): that step masks the scores and zeroes those rows of V in SMEM before
    PV (a NaN times a zero probability would still be NaN).

`fold_kv_heads` (a config option, no faster than the defaults): one program per (request,
split) for all kv heads, its K * G rows the block-diagonal q over K * D columns (a page of
every head is one TMA box); see `TuningConfig`.

Splits: fixed logical boundaries [s * kv_split, (s + 1) * kv_split); every program writes its
partial (acc [R, D], m [R], l [R], float32, R = G rounded up to 8 rows), an empty split
writes (0, -inf, 0). The wrapper merges them with an exact log-sum-exp in increasing split
order (`merge_splits`, an unrolled chain of adds, not a reduction whose order XLA may pick):
splits past kv_len add exact zeros, so neither the table width nor the batch nor the
physical placement of pages changes a bit of a request's output.

Tested in the Mosaic GPU interpreter on CPU (tests/test_paged_attention_mgpu.py); lowers for
`cuda` on a CPU machine (`jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",))`); its
tests also run compiled on a Hopper GPU. With the defaults below it is faster than the Triton
kernel at large batches and long contexts, but slower at a few requests of a few thousand
tokens (too few programs: one per split) and just past a split boundary, so the engine
decodes on it under `--attention=mosaic` only (figures: docs/results.md, "GPU kernels").
API notes (checked in jax 0.11.2 and 0.12.0 here): a transposed ref is `ref.transpose(perm)`
(`plgpu.transpose_ref`, used by 0.11-era examples, is deprecated in both); `plgpu.kernel`
takes `out_type` (earlier versions `out_shape`: `_kernel_call` falls back to it); both have
`plgpu.InterpretGPUParams` and `profiler.measure(f, aggregate=, iterations=)`.
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

from pallas_kernels import _common as common

WGMMA_ROWS = 64  # rows of one warpgroup's wgmma: the G query heads are padded to this
ROW_PAD = 8  # partial outputs keep G rows rounded up to this (one (8, x) TMA tile)
SWIZZLE = 128  # bytes; with 2-byte elements, SMEM tiles of (8, 64) (attention_mgpu's choice)


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


@dataclasses.dataclass(frozen=True)
class TuningConfig:
  """Tile sizes of the decode kernel; the reduction order depends on block_kv and kv_split.

  pages_per_step: pages (of block_size tokens) per pipeline step; block_kv = pages_per_step *
    block_size keys must be a multiple of 64 (the K dimension of the PV wgmma in bf16).
  kv_split: keys per split of the sequence (a multiple of block_kv). Splits are at fixed
    logical boundaries, so the bits do not depend on the batch or the table width.
  max_concurrent_steps: SMEM slots of K/V, i.e. steps in flight (>= 2 to overlap).
  p_in_registers: feed P to the PV wgmma from registers (as attention_mgpu does) instead of
    through SMEM. Compiled GPU only: the interpreter takes wgmma operands from SMEM only.
  warp_specialized: a second warpgroup only issues the TMA copies (refilling a slot as soon
    as the computing warpgroup releases it); the epilogue's SMEM is then not shared.
  fold_kv_heads: one program per (request, split) for ALL K kv heads instead of one per kv
    head: a page of every head is one [block_size, K * D] box (one TMA copy, K * D * 2 bytes
    per row instead of D * 2), and the K * G query rows form a block-diagonal q [K * G, K * D]
    (row of head h holds its q in columns h*D..(h+1)*D, zeros elsewhere), so one QK^T gives
    every row its own head's scores; of the PV product [K * G, K * D] each row keeps its own
    head's columns. Twice (K times) the matrix work of a per-head program, on K times the
    bytes per copy: for small heads (D = 64), it runs like a D = K * D kernel. Needs K * G <=
    64 rows and K * D <= 256 (one wgmma's N).
  """

  pages_per_step: int = 4
  kv_split: int = 512
  max_concurrent_steps: int = 2
  p_in_registers: bool = False
  warp_specialized: bool = False
  fold_kv_heads: bool = False

  def __post_init__(self):
    if self.pages_per_step < 1:
      raise ValueError(f"pages_per_step must be >= 1, got {self.pages_per_step}")
    if self.max_concurrent_steps < 1:
      raise ValueError(f"max_concurrent_steps must be >= 1, got {self.max_concurrent_steps}")
    if self.kv_split <= 0:
      raise ValueError(f"kv_split must be positive, got {self.kv_split}")

  def block_kv(self, block_size: int) -> int:
    """Keys per step; checked against the page size here (the config does not know it)."""
    block_kv = self.pages_per_step * block_size
    if block_kv % 64:
      raise ValueError(f"pages_per_step * block_size = {block_kv} must be a multiple of 64 "
                       "(the K dimension of the PV wgmma)")
    if self.kv_split % block_kv:
      raise ValueError(f"kv_split={self.kv_split} must be a multiple of block_kv={block_kv}")
    return block_kv


# SMEM per program: K/V 2 * slots * block_kv * D * 2 bytes = 64 KiB for both defaults, q
# 8 / 16 KiB, P 16 / 8 KiB: 88 KiB, so two programs fit on an SM (227 KiB), each with 2
# steps (2 x 32 KiB of K/V) in flight. The epilogue's f32 tile reuses the loop's SMEM (a
# later run_scoped). Chosen by `hq-jax bench mosaic decode --sweep` (the
# Triton kernel timed in the same run; figures: docs/results.md, "GPU kernels"): longer
# splits won at both head_dims. 4096-key splits were faster still at 64 x 4k and 8 x 32k of
# the 7B shape and slower at 1 x 128k, but a (request, kv head) is one program per split: at
# small batches and short contexts (1 x 4k: 4 programs at 4096, 8 at 2048, 16 for the
# Triton kernel's 1024) a long split leaves most SMs idle, which the sweep's points do not
# show. 2048 keeps every sweep point ahead of Triton; at 1 and 8 requests of 4k the Triton
# kernel is still faster, and the fold_kv_heads configs of `hq_jax.bench.mosaic.DECODE_SWEEP` did not beat DEFAULT_D64.
DEFAULT_D64 = TuningConfig(pages_per_step=8, kv_split=2048, max_concurrent_steps=2)
DEFAULT_D128 = TuningConfig(pages_per_step=4, kv_split=2048, max_concurrent_steps=2)


def default_config(head_dim: int) -> TuningConfig:
  return DEFAULT_D128 if head_dim >= 128 else DEFAULT_D64


SMEM_PER_SM = 227 * 1024  # bytes a Hopper SM gives its blocks (Mosaic checks 232448)


def smem_bytes(config: TuningConfig, head_dim: int, block_size: int = 16,
               itemsize: int = 2, num_kv_heads: int = 1) -> int:
  """SMEM of one program, as Mosaic GPU lays it out (it adds 2-4 KiB: barriers, alignment):
  q + K/V slots + P during the loop; the epilogue's f32 tile reuses that space, except
  warp specialized (one allocation for both warpgroups). With fold_kv_heads a program's
  head_dim is num_kv_heads * head_dim."""
  if config.fold_kv_heads:
    head_dim *= num_kv_heads
  block_kv = config.pages_per_step * block_size
  loop = (WGMMA_ROWS * head_dim + 2 * config.max_concurrent_steps * block_kv * head_dim
          + (0 if config.p_in_registers else WGMMA_ROWS * block_kv)) * itemsize
  epilogue = WGMMA_ROWS * itemsize * head_dim + (WGMMA_ROWS * head_dim + 2 * WGMMA_ROWS) * 4
  if config.warp_specialized:
    return loop + epilogue - WGMMA_ROWS * itemsize * head_dim
  return max(loop, epilogue)


# ----------------------------------------------------------------------------- kernel
def strict_interpreter():
  """The Mosaic GPU interpreter (CPU) failing on races and out-of-bounds reads, with
  uninitialized memory read as NaN: the `interpret` argument the tests pass."""
  return plgpu.InterpretGPUParams(detect_races=True, out_of_bounds_reads="raise",
                                  uninitialized_memory="nan")


def table_pages(tables_ref, row, first_page, page_base: int, pages_per_step: int):
  """The physical blocks (rows of the 2-D pools / block_size) of pages_per_step consecutive
  pages of a block-table row from first_page. Pages past the table (the last step of a short
  range) read its last entry: any valid block will do, the step's mask drops those keys."""
  last = tables_ref.shape[1] - 1
  return [page_base + tables_ref[row, jnp.minimum(first_page + i, last)]
          for i in range(pages_per_step)]


def copy_pages(k_ref, v_ref, kv, slot, pages, *, head, block_size: int, head_dim: int):
  """TMA copies of one pipeline step's pages of K and V (the 2-D pool views, kv head
  `head`) into SMEM slot `slot`, one copy per page; the slot's barriers count them."""
  k_smem, v_smem, k_barriers, v_barriers = kv
  for i, page in enumerate(pages):
    src = (pl.ds(page * block_size, block_size), pl.ds(head * head_dim, head_dim))
    dst = (slot, pl.ds(i * block_size, block_size))
    plgpu.copy_gmem_to_smem(k_ref.at[src], k_smem.at[dst], k_barriers.at[slot])
    plgpu.copy_gmem_to_smem(v_ref.at[src], v_smem.at[dst], v_barriers.at[slot])


def fill_pipeline(issue_step, slots: int, num_steps) -> None:
  """Issues the copies of steps 0 .. slots - 1 (those that exist): a full pipeline."""
  for i in range(slots):
    @pl.when(i < num_steps)
    def _prefetch():
      issue_step(i)


def initial_carry(rows: int, head_dim: int):
  """(acc, m, l) of the online softmax before any key: zeros, -inf, zeros, in the layouts
  of a warpgroup's wgmma accumulator ([rows, head_dim]) and its row reductions ([rows])."""
  return (
      plgpu.layout_cast(jnp.zeros((rows, head_dim), jnp.float32), plgpu.Layout.WGMMA),
      plgpu.layout_cast(jnp.full((rows,), -jnp.inf, jnp.float32),
                        plgpu.Layout.WGMMA.reduce(1)),
      plgpu.layout_cast(jnp.zeros((rows,), jnp.float32), plgpu.Layout.WGMMA.reduce(1)))


def online_softmax(scores, m, l, visible=None, *, scale=None):
  """One key step of the online softmax, log2 units: scores [R, N], the running row max m
  and sum l [R] -> (p [R, N] float32, new m, new l, alpha = the factor the old accumulator
  takes). scores are in log2 units, or raw with `scale` (> 0) the factor to them: then the
  max is taken before scaling (the same value: rounding is monotonic) and the scale rides
  in exp2's argument, one multiply-add per score instead of a multiply pass. `visible`
  [R, N] bool, or None for a step whose keys every row sees: a hidden score (even NaN)
  gets p = 0; a row that has seen no key keeps m = -inf, p = 0."""
  if visible is None:
    m_tile = jnp.max(scores, axis=1)
  else:
    m_tile = jnp.max(jnp.where(visible, scores, -jnp.inf), axis=1)
  if scale is not None:
    m_tile = m_tile * scale
  m_new = jnp.maximum(m, m_tile)
  m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # no visible key yet
  alpha = jnp.exp2(m - m_safe)
  scaled = scores if scale is None else scores * scale
  p = jnp.exp2(scaled - lax.broadcast_in_dim(m_safe, scores.shape, [0]))
  if visible is not None:
    p = jnp.where(visible, p, 0.0)  # exp2 of a hidden (even NaN) score is dropped
  return p, m_new, alpha * l + jnp.sum(p, axis=1), alpha


def _decode_kernel(
    layer_ref,  # [1] int32 (GMEM)
    kv_lens_ref,  # [B] int32
    positions_ref,  # [B, 1] int32
    tables_ref,  # [B, MB] int32
    q_ref,  # [B, K, R, D] (G query heads of each kv head, padded to R rows)
    k_ref,  # [L * NB * block_size, K * D] (all layers' pools, 2-D view)
    v_ref,  # [L * NB * block_size, K * D]
    acc_out_ref,  # [B, K, S, R, D] f32
    m_out_ref,  # [B, K, S, R] f32, log2 units
    l_out_ref,  # [B, K, S, R] f32
    *, num_blocks: int, block_size: int, pages_per_step: int, kv_split: int,
    max_concurrent_steps: int, p_in_registers: bool, warp_specialized: bool, scale: float):
  b = lax.axis_index("b")
  h = lax.axis_index("h")
  s = lax.axis_index("s")
  rows_out, head_dim = q_ref.shape[2], q_ref.shape[3]
  dtype = q_ref.dtype
  block_kv = pages_per_step * block_size
  slots = max_concurrent_steps

  # Keys this program reduces over: [lo, lo + num_keys), cut at the last visible key.
  lo = s * kv_split
  end = jnp.minimum(kv_lens_ref[b], positions_ref[b, 0] + 1)  # keys [0, end) are visible
  num_keys = jnp.clip(end - lo, 0, kv_split)
  num_steps = (num_keys + (block_kv - 1)) // block_kv
  num_full = num_keys // block_kv  # steps whose every key is visible: no mask
  page_base = layer_ref[0] * num_blocks  # first physical block of this layer

  tiled = (plgpu.TilingTransform((8, SWIZZLE // jnp.dtype(dtype).itemsize)),
           plgpu.SwizzleTransform(SWIZZLE))
  kv_smem = lambda: plgpu.SMEM((slots, block_kv, head_dim), dtype, transforms=tiled)
  p_smem_type = (None if p_in_registers
                 else plgpu.SMEM((WGMMA_ROWS, block_kv), dtype, transforms=tiled))
  kv_barriers = lambda: plgpu.Barrier(num_arrivals=pages_per_step, num_barriers=slots)
  out_smem = (plgpu.SMEM((WGMMA_ROWS, head_dim), jnp.float32),
              plgpu.SMEM((WGMMA_ROWS,), jnp.float32), plgpu.SMEM((WGMMA_ROWS,), jnp.float32))

  def pages_of(step):
    return table_pages(tables_ref, b, lo // block_size + step * pages_per_step, page_base,
                       pages_per_step)

  issue = functools.partial(copy_pages, k_ref, v_ref, head=h, block_size=block_size,
                            head_dim=head_dim)

  def prefetch(kv):
    fill_pipeline(lambda i: issue(kv, i, pages_of(i)), slots, num_steps)

  def issue_q(q_smem, q_barrier):
    # The G (padded to R) query rows of this kv head; rows R..63 of q_smem stay unwritten.
    plgpu.copy_gmem_to_smem(q_ref.at[b, h], q_smem.at[pl.ds(0, rows_out)], q_barrier.at[0])

  def consume(q_smem, kv, p_smem, step_done, *, load_next_pages: bool):
    """The key loop; step_done(i, slot, next_pages) runs once a step's wgmmas are done."""
    k_smem, v_smem, k_barriers, v_barriers = kv

    def step(i, carry, *, masked: bool):
      acc, m, l = carry  # [64, D], [64], [64] float32
      slot = lax.rem(i, slots)
      # The table loads for the refill at the end of this step, issued now so their latency
      # hides behind this step's matmuls (clamped: always in bounds).
      next_pages = pages_of(i + slots) if load_next_pages else None
      plgpu.barrier_wait(k_barriers.at[slot])

      def compute_qk(acc_ref):
        plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
        return acc_ref[...]

      scores = pl.run_scoped(compute_qk, plgpu.ACC((WGMMA_ROWS, block_kv), jnp.float32))
      scores = scores * scale  # [64, block_kv], log2 units
      visible = None
      if masked:
        num_visible = num_keys - i * block_kv  # keys of this step that exist and are seen
        cols = plgpu.broadcasted_iota(jnp.int32, (WGMMA_ROWS, block_kv), 1,
                                      layout=plgpu.Layout.WGMMA)
        visible = cols < num_visible
      p, m_new, l, alpha = online_softmax(scores, m, l, visible)
      if not p_in_registers:
        p_smem[...] = p.astype(dtype)

      plgpu.barrier_wait(v_barriers.at[slot])
      if masked:  # hidden keys' V rows may hold NaN; 0 * NaN would poison acc
        v_rows = plgpu.broadcasted_iota(jnp.int32, (block_kv, head_dim), 0,
                                        layout=plgpu.Layout.WGMMA)
        v_slot = v_smem.at[slot]
        v_slot[...] = jnp.where(v_rows < num_visible, v_slot[...], 0).astype(dtype)
      plgpu.commit_smem()  # the P (and V) stores, before the wgmma reads them

      def compute_pv(acc_ref):
        plgpu.wgmma(acc_ref, p.astype(dtype) if p_in_registers else p_smem, v_smem.at[slot])
        return acc_ref[...]

      pv = pl.run_scoped(compute_pv, plgpu.ACC((WGMMA_ROWS, head_dim), jnp.float32))
      acc = lax.broadcast_in_dim(alpha, acc.shape, [0]) * acc + pv
      step_done(i, slot, next_pages)  # both wgmmas are done: the slot may be refilled
      return acc, m_new, l

    carry = lax.fori_loop(0, num_full, functools.partial(step, masked=False),
                          initial_carry(WGMMA_ROWS, head_dim))
    return lax.fori_loop(num_full, num_steps, functools.partial(step, masked=True), carry)

  def store(acc, m, l, acc_smem, m_smem, l_smem):
    """The first R rows of (acc, m, l) to this program's partial in GMEM."""
    acc_smem[...] = acc
    m_smem[...] = m
    l_smem[...] = l
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(acc_smem.at[pl.ds(0, rows_out)], acc_out_ref.at[b, h, s])
    plgpu.copy_smem_to_gmem(m_smem.at[pl.ds(0, rows_out)], m_out_ref.at[b, h, s])
    plgpu.copy_smem_to_gmem(l_smem.at[pl.ds(0, rows_out)], l_out_ref.at[b, h, s])
    plgpu.wait_smem_to_gmem(0)

  if not warp_specialized:
    # One warpgroup issues the copies and computes: a slot is refilled at the end of the
    # step that consumed it.
    def body(q_smem, q_barrier):
      issue_q(q_smem, q_barrier)

      def loop_scope(k_smem, v_smem, p_smem, k_barriers, v_barriers):
        kv = (k_smem, v_smem, k_barriers, v_barriers)
        prefetch(kv)  # in flight together with q: one memory latency before the loop
        plgpu.barrier_wait(q_barrier.at[0])

        def refill(i, slot, next_pages):
          @pl.when(i + slots < num_steps)
          def _refill():
            issue(kv, slot, next_pages)

        return consume(q_smem, kv, p_smem, refill, load_next_pages=True)

      acc, m, l = pl.run_scoped(loop_scope, kv_smem(), kv_smem(), p_smem_type, kv_barriers(),
                                kv_barriers())
      # The epilogue's SMEM reuses the loop's (a later scope).
      pl.run_scoped(functools.partial(store, acc, m, l), *out_smem)

    pl.run_scoped(body, plgpu.SMEM((WGMMA_ROWS, head_dim), dtype, transforms=tiled),
                  plgpu.Barrier(num_barriers=1))
    return

  # Warp specialized: warpgroup 1 only issues copies (a slot as soon as warpgroup 0 says it
  # is consumed), warpgroup 0 only computes. Everything is allocated once, for both.
  def ws_body(q_smem, k_smem, v_smem, p_smem, acc_smem, m_smem, l_smem, q_barrier,
              k_barriers, v_barriers, consumed):
    kv = (k_smem, v_smem, k_barriers, v_barriers)
    wg = lax.axis_index("wg")

    @pl.when(wg == 0)
    def _compute():
      issue_q(q_smem, q_barrier)
      plgpu.barrier_wait(q_barrier.at[0])

      def release(i, slot, _):
        @pl.when(i + slots < num_steps)  # only the slots the producer will refill
        def _release():
          plgpu.barrier_arrive(consumed.at[slot])

      acc, m, l = consume(q_smem, kv, p_smem, release, load_next_pages=False)
      store(acc, m, l, acc_smem, m_smem, l_smem)

    @pl.when(wg == 1)
    def _memory():
      prefetch(kv)

      def refill(j, _):  # step j + slots goes where step j was
        slot = lax.rem(j, slots)
        pages = pages_of(j + slots)  # loaded before the wait: latency hidden behind it
        plgpu.barrier_wait(consumed.at[slot])
        issue(kv, slot, pages)

      lax.fori_loop(0, jnp.maximum(num_steps - slots, 0), refill, None)

  pl.run_scoped(ws_body, plgpu.SMEM((WGMMA_ROWS, head_dim), dtype, transforms=tiled),
                kv_smem(), kv_smem(), p_smem_type, *out_smem, plgpu.Barrier(num_barriers=1),
                kv_barriers(), kv_barriers(), plgpu.Barrier(num_barriers=slots),
                collective_axes="wg")


# ---------------------------------------------------------------------------- merge
def merge_splits(acc, m, l):
  """Exact log-sum-exp merge of per-split partials, in increasing split order.

  acc [..., S, R, D], m and l [..., S, R] float32 (m in log2 units) -> [..., R, D] float32.
  The max over splits first (exact in any order), then the weighted sums as an explicit
  chain s = 0, 1, ... (an unrolled Python loop: XLA keeps the order of a chain of adds, not
  of a jnp.sum). An empty split (m = -inf, l = 0, acc = 0) adds exact zeros, so trailing
  empty splits (a wider table) change no bit. A row with no visible key gives 0.
  """
  num_splits = m.shape[-2]
  m_max = jnp.max(m, axis=-2)  # [..., R]
  m_max = jnp.where(m_max == -jnp.inf, 0.0, m_max)
  num = jnp.zeros(acc.shape[:-3] + acc.shape[-2:], jnp.float32)
  den = jnp.zeros(m_max.shape, jnp.float32)
  for s in range(num_splits):
    w = jnp.exp2(m[..., s, :] - m_max)
    num = num + w[..., None] * acc[..., s, :, :]
    den = den + w * l[..., s, :]
  return jnp.where(den[..., None] > 0, num / den[..., None], 0.0)


# ---------------------------------------------------------------------------- wrapper
def check_inputs(q, k_pool, v_pool, block_tables, positions, kv_lens, *,
                 decode: bool = True) -> None:
  """The Triton kernels' shape checks (`_common.check_inputs`) and what the Mosaic GPU
  kernels add: pools of all layers [L, NB, bs, K, D], one bf16 or f16 dtype (wgmma
  operands), head_dim a multiple of 64; decode: one token per request, G <= 64 rows."""
  common.check_inputs(q, k_pool, v_pool, block_tables, positions, kv_lens)
  b, t, nh, d = q.shape
  if decode and t != 1:
    raise ValueError(f"q must be [B, 1, H, D] (decode), got {q.shape}")
  if k_pool.ndim != 5:
    raise ValueError(f"k_pool {k_pool.shape} must be all layers' [L, num_blocks, block_size, "
                     "K, D]")
  if q.dtype != k_pool.dtype or q.dtype != v_pool.dtype:
    raise ValueError(f"q, k_pool, v_pool dtypes differ: {q.dtype}, {k_pool.dtype}, "
                     f"{v_pool.dtype}")
  if jnp.dtype(q.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    raise NotImplementedError(f"bf16 or f16 only (wgmma operands), got {q.dtype}")
  if d % 64:
    raise ValueError(f"head_dim must be a multiple of 64, got {d}")
  if decode and nh // k_pool.shape[3] > WGMMA_ROWS:
    raise ValueError(f"GQA group {nh // k_pool.shape[3]} > {WGMMA_ROWS} rows of one wgmma")


def check_fold(num_heads: int, num_kv_heads: int, head_dim: int) -> None:
  """`fold_kv_heads` puts all H query heads in one wgmma's rows and all K * D columns in its
  N dimension."""
  if num_heads > WGMMA_ROWS:
    raise ValueError(f"fold_kv_heads: {num_heads} query heads > {WGMMA_ROWS} rows of one "
                     "wgmma")
  if num_kv_heads * head_dim > 256:
    raise ValueError(f"fold_kv_heads: K * D = {num_kv_heads * head_dim} > 256 (one wgmma's N)")


def compiles_here(dtype, head_dim: int) -> bool:
  """What every Mosaic kernel here needs to run compiled: a Hopper GPU (wgmma is sm_90a
  only), bf16 / f16 operands, head_dim a multiple of 64."""
  dev = jax.devices()[0]
  return (dev.platform == "gpu" and getattr(dev, "compute_capability", None) == "9.0"
          and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
          and head_dim % 64 == 0)


def _kernel_call(body, out_type, *, interpret, **kwargs):
  """plgpu.kernel across versions: `out_type` in jax 0.12, `out_shape` before."""
  try:
    return plgpu.kernel(body, out_type=out_type, interpret=interpret, **kwargs)
  except TypeError:
    return plgpu.kernel(body, out_shape=out_type, interpret=interpret, **kwargs)


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def paged_decode_attention_mgpu(q: jax.Array, k_pool: jax.Array, v_pool: jax.Array,
                                block_tables: jax.Array, positions: jax.Array,
                                kv_lens: jax.Array, layer=0, *,
                                config: TuningConfig | None = None,
                                interpret=False) -> jax.Array:
  """Decode attention of q [B, 1, H, D] over layer `layer` of pools [L, NB, bs, K, D].

  Query b attends to logical keys j <= positions[b, 0] and j < kv_lens[b] through
  block_tables [B, MB]. Returns [B, 1, H, D] in q's dtype; softmax and sums in float32.
  `interpret`: False (compile for the GPU), or a `plgpu.InterpretGPUParams` (CPU).
  """
  check_inputs(q, k_pool, v_pool, block_tables, positions, kv_lens)
  b, _, nh, d = q.shape
  nl, nb, bs, nk, _ = k_pool.shape
  group = nh // nk
  config = config or default_config(d)
  config.block_kv(bs)  # validates the tiles against the page size
  if interpret and config.p_in_registers:
    raise NotImplementedError("p_in_registers=True runs compiled only: the Mosaic GPU "
                              "interpreter takes wgmma operands from SMEM")
  mb = block_tables.shape[1]
  num_splits = pl.cdiv(mb * bs, config.kv_split)
  scale = d ** -0.5 * math.log2(math.e)
  if config.fold_kv_heads:
    # One "kv head" of K * D columns whose K * G rows are the block-diagonal q (below).
    check_fold(nh, nk, d)
    q_heads = q.reshape(b, nk, group, 1, d)
    own = (jnp.arange(nk)[:, None] == jnp.arange(nk)[None, :])[None, :, None, :, None]
    q = jnp.where(own, q_heads, jnp.zeros((), q.dtype)).reshape(b, 1, nh, nk * d)
    nk, group, d = 1, nh, nk * d
  rows = _round_up(group, ROW_PAD)

  # q rows of kv head h are its G query heads, padded to R rows (tiny: B * K * R * D).
  q_rows = jnp.pad(q.reshape(b, nk, group, d), ((0, 0), (0, 0), (0, rows - group), (0, 0)))
  # Free views: a page of one kv head is a 2-D box [bs, D] of these.
  k2 = k_pool.reshape(nl * nb * bs, nk * d)
  v2 = v_pool.reshape(nl * nb * bs, nk * d)
  layer = jnp.asarray(layer, jnp.int32).reshape(1)

  kernel = functools.partial(
      _decode_kernel, num_blocks=nb, block_size=bs, pages_per_step=config.pages_per_step,
      kv_split=config.kv_split, max_concurrent_steps=config.max_concurrent_steps,
      p_in_registers=config.p_in_registers, warp_specialized=config.warp_specialized,
      scale=scale)
  out_type = (jax.ShapeDtypeStruct((b, nk, num_splits, rows, d), jnp.float32),
              jax.ShapeDtypeStruct((b, nk, num_splits, rows), jnp.float32),
              jax.ShapeDtypeStruct((b, nk, num_splits, rows), jnp.float32))
  threads = dict(num_threads=2, thread_name="wg") if config.warp_specialized else {}
  call = _kernel_call(
      kernel, out_type, interpret=interpret or None,
      grid=(b, nk, num_splits), grid_names=("b", "h", "s"), **threads,
      compiler_params=plgpu.CompilerParams(approx_math=True))
  acc, m, l = call(layer, kv_lens.astype(jnp.int32), positions.astype(jnp.int32),
                   block_tables.astype(jnp.int32), q_rows, k2, v2)
  out = merge_splits(acc, m, l)[:, :, :group]  # [B, K, G, D]
  if config.fold_kv_heads:  # [B, 1, H, K0 * D0]: row h*G0 + g keeps columns h*D0..(h+1)*D0
    nk0 = k_pool.shape[3]
    d0 = d // nk0
    out = out.reshape(b, nk0, nh // nk0, nk0, d0)
    out = jnp.stack([out[:, h, :, h] for h in range(nk0)], axis=1)  # [B, K0, G0, D0]
    return out.reshape(b, 1, nh, d0).astype(q.dtype)
  return out.reshape(b, 1, nh, d).astype(q.dtype)


# -------------------------------------------------------------------------- reference
def paged_decode_attention_reference(q, k_pool, v_pool, block_tables, positions, kv_lens,
                                     layer=0):
  """float32 oracle on the kernel's interface: gather the layer's blocks in logical order,
  attend to keys j <= positions[b, 0] and j < kv_lens[b] (hidden keys, even NaN, drop out)."""
  b, _, nh, d = q.shape
  nk = k_pool.shape[3]
  gather = lambda pool: pool[layer][block_tables].reshape(b, -1, nk, d).astype(jnp.float32)
  k, v = gather(k_pool), gather(v_pool)  # [B, S, K, D]
  keys = jnp.arange(k.shape[1], dtype=jnp.int32)
  visible = (keys[None] <= positions) & (keys[None] < kv_lens[:, None])  # [B, S]
  qg = q.astype(jnp.float32).reshape(b, nk, nh // nk, d)  # [B, K, G, D]
  scores = jnp.einsum("bkgd,bskd->bkgs", qg, k, precision=lax.Precision.HIGHEST) * d ** -0.5
  scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
  probs = jnp.where(visible[:, None, None], jax.nn.softmax(scores, axis=-1), 0.0)
  v = jnp.where(visible[:, :, None, None], v, 0.0)
  out = jnp.einsum("bkgs,bskd->bkgd", probs, v, precision=lax.Precision.HIGHEST)
  return out.reshape(b, 1, nh, d)
