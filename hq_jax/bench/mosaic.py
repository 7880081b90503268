"""Check and time the Mosaic GPU kernels on a GPU: paged decode, chunked prefill, and
shared-prefix decode, each beside the Triton kernel (and, for prefill, jax's
`attention_mgpu`) on the same inputs, in one process.

  hq-jax bench mosaic decode [--sweep] [0.5b|7b ...] [BATCHxCONTEXT ...]
  hq-jax bench mosaic prefill [0.5b|7b ...] [--chunks=4096,16384] [--tuned]
  hq-jax bench mosaic shared [SHAREDxOWNxREQUESTS ...]

Every variant is first checked against its float32 reference on fresh random inputs, then
timed by `hq_jax.bench.timing.device_ms` (CUPTI device time of every kernel a call
launches). The kernel files (`pallas_kernels/`) hold the kernels, their configs and
references; this module holds how they are measured. Figures: docs/results.md.
"""

from __future__ import annotations

import dataclasses
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np

from hq_jax.bench.timing import device_ms
from pallas_kernels import dedup_attention as da
from pallas_kernels import dedup_attention_mgpu as dm
from pallas_kernels import paged_attention as triton_paged
from pallas_kernels import paged_attention_mgpu as pm
from pallas_kernels import paged_prefill_mgpu as pp
from pallas_kernels.dedup_attention import SharingPlan



# ------------------------------------------------------------ paged decode
SHAPES = {"0.5b": (14, 2, 64), "7b": (28, 4, 128)}  # (query heads, kv heads, head_dim)
DECODE_POINTS = ((64, 4096), (8, 32768), (1, 131072))  # (batch, context)
# `--sweep`: what one device call can time (about 9 s per config and point). Earlier sweeps
# found occupancy (programs per SM) worth more than pipeline depth, and longer splits
# better; they gave the defaults above. This one: the defaults' neighbours and the
# fold_kv_heads configs (0.5B: K * D = 128, the tiles of the D = 128 configs). decode_main() drops
# those that do not fit.
DECODE_SWEEP = (
    pm.TuningConfig(pages_per_step=8, kv_split=2048, max_concurrent_steps=2),
    pm.TuningConfig(pages_per_step=4, kv_split=1024, max_concurrent_steps=2),
    pm.TuningConfig(pages_per_step=4, kv_split=2048, max_concurrent_steps=2),
    pm.TuningConfig(pages_per_step=4, kv_split=4096, max_concurrent_steps=2),
    pm.TuningConfig(pages_per_step=4, kv_split=512, max_concurrent_steps=2, fold_kv_heads=True),
    pm.TuningConfig(pages_per_step=4, kv_split=1024, max_concurrent_steps=2, fold_kv_heads=True),
    pm.TuningConfig(pages_per_step=4, kv_split=2048, max_concurrent_steps=2, fold_kv_heads=True),
    pm.TuningConfig(pages_per_step=4, kv_split=1024, max_concurrent_steps=2, fold_kv_heads=True,
                 p_in_registers=True),
)


def decode_inputs(key, batch, context, shape, *, num_layers=2, block_size=16,
                  dtype=jnp.bfloat16):
  """Fresh random decode inputs: every request holds `context` keys at a random placement
  of the blocks (block 0 never assigned), the query at the last position; two layers."""
  nh, nk, d = SHAPES[shape]
  max_blocks = -(-context // block_size)
  num_blocks = 1 + batch * max_blocks
  kq, kk, kv, kp = jax.random.split(key, 4)
  pool_shape = (num_layers, num_blocks, block_size, nk, d)
  q = jax.random.normal(kq, (batch, 1, nh, d), dtype)
  k_pool = jax.random.normal(kk, pool_shape, dtype)
  v_pool = jax.random.normal(kv, pool_shape, dtype)
  tables = (1 + jax.random.permutation(kp, num_blocks - 1)).reshape(batch, max_blocks)
  kv_lens = jnp.full((batch,), context, jnp.int32)
  return q, k_pool, v_pool, tables.astype(jnp.int32), (kv_lens - 1)[:, None], kv_lens


def decode_main(sweep: bool = False, shapes=tuple(SHAPES), points=DECODE_POINTS, reps: int = 5) -> None:
  """Checks each config against the float32 reference, then times it by CUPTI (device time
  of every kernel a call launches: the q pad and the split merge count). Each timed call
  runs layers 0 and 1 (disjoint K/V, together larger than L2) and counts half. Each row
  also gives its rate as a fraction of an XLA reduction's read rate measured first in the
  same process (a jitted float32 sum over 2 GiB of bf16: the decode target's yardstick).
  The Triton kernel (the engine's decode, default config) is timed first at every point."""

  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}", flush=True)
  big = jax.random.normal(jax.random.key(1), (1 << 30,), jnp.bfloat16)
  read_sum = jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32))
  jax.block_until_ready(read_sum(big))
  read_ms = device_ms(read_sum, big, reps=reps)
  read_tb_s = big.nbytes / read_ms / 1e9
  del big
  print(f"XLA read rate {read_tb_s:.2f} TB/s", flush=True)
  for shape in shapes:
    nh, nk, d = SHAPES[shape]

    def fits(c):  # in SMEM, and within pm.check_fold's limits when folding
      if pm.smem_bytes(c, d, num_kv_heads=nk) + 4096 > pm.SMEM_PER_SM:
        return False
      try:
        if c.fold_kv_heads:
          pm.check_fold(nh, nk, d)
      except ValueError:
        return False
      return True

    configs = tuple(dict.fromkeys(
        (pm.default_config(d),) + tuple(c for c in (DECODE_SWEEP if sweep else ()) if fits(c))))
    # The Triton kernel (the engine's decode) first, on the same inputs in the same run.
    kernels = [("triton paged_attention (engine's decode)", triton_paged.paged_attention)]
    kernels += [(str(c), functools.partial(pm.paged_decode_attention_mgpu, config=c))
                for c in configs]
    widen = max(c.kv_split for c in configs) // 16  # table entries: one more, empty, split
    for batch, context in points:
      inputs = decode_inputs(jax.random.key(batch * 7 + context), batch, context, shape)
      ref = pm.paged_decode_attention_reference(*inputs, 1)
      kv_bytes = 2 * batch * context * nk * d * 2  # K and V, bf16, read once
      for name, kernel in kernels:
        try:
          fn = jax.jit(kernel)
          out = fn(*inputs, 1)
          err = float(jnp.linalg.norm((out.astype(jnp.float32) - ref).ravel())
                      / jnp.linalg.norm(ref.ravel()))
          if not err < 2e-2:
            raise AssertionError(f"relative L2 error {err:.2e} vs the f32 reference")
          # Same bits for a request alone, with a wider table (one more, empty, split).
          q, kp, vp, tables, pos, lens = inputs
          wide = jnp.concatenate([tables[:1], jnp.ones((1, widen), jnp.int32)], axis=1)
          alone = fn(q[:1], kp, vp, wide, pos[:1], lens[:1], 1)
          if not bool(jnp.array_equal(alone, out[:1])):
            raise AssertionError("request 0 alone gives other bits than in the batch")
          pair = jax.jit(lambda *a: (fn(*a, 0), fn(*a, 1)))
          jax.block_until_ready(pair(*inputs))
          ms = device_ms(pair, *inputs, reps=reps)
          us = ms * 1e3 / 2
          print(f"{shape} {batch}x{context} {name}: {us:.1f} us, "
                f"{kv_bytes / us / 1e6:.2f} TB/s = {kv_bytes / us / 1e6 / read_tb_s:.2f} of "
                f"the read rate, err {err:.1e}", flush=True)
        except Exception as e:  # noqa: BLE001 - report and go on with the next config
          print(f"{shape} {batch}x{context} {name}: FAILED {type(e).__name__}: "
                f"{str(e)[:2000]}", flush=True)


# ------------------------------------------------------------ chunked prefill
PREFILL_CONTEXT = 32768  # tokens of the causal prefill
PREFILL_CHUNK = 4096  # query tokens per chunked-prefill call
PREFILL_LAYER = 1  # the timed layer (of 2): the kernel reads it out of the all-layers pool


def prefill_inputs(key, shape, context=None, *, num_layers=2, block_size=16,
                  dtype=jnp.bfloat16):
  """One request of `context` tokens: q for every token [1, context, H, D], pools holding
  its K/V at a random placement of the blocks (block 0 never assigned), its block table."""
  nh, nk, d = SHAPES[shape]
  num_pages = (context or PREFILL_CONTEXT) // block_size
  kq, kk, kv, kp = jax.random.split(key, 4)
  pool_shape = (num_layers, 1 + num_pages, block_size, nk, d)
  q = jax.random.normal(kq, (1, num_pages * block_size, nh, d), dtype)
  k_pool = jax.random.normal(kk, pool_shape, dtype)
  v_pool = jax.random.normal(kv, pool_shape, dtype)
  tables = (1 + jax.random.permutation(kp, num_pages)).reshape(1, num_pages)
  return q, k_pool, v_pool, tables.astype(jnp.int32)


def chunk_at_end(attend, q_all, k_pool, v_pool, tables, *, chunk: int = PREFILL_CHUNK):
  """The last `chunk` tokens of the context as one call (its first tokens cached)."""
  n = q_all.shape[1]
  positions = jnp.arange(n - chunk, n, dtype=jnp.int32)[None]
  return attend(q_all[:, n - chunk:], k_pool, v_pool, tables, positions,
                jnp.full((1,), n, jnp.int32), PREFILL_LAYER)


def chunked_prefill(attend, q_all, k_pool, v_pool, tables, *, chunk: int = PREFILL_CHUNK):
  """The whole causal prefill as n / chunk calls, call c seeing keys [0, (c + 1) chunk)."""
  outs = []
  for c in range(q_all.shape[1] // chunk):
    positions = jnp.arange(c * chunk, (c + 1) * chunk, dtype=jnp.int32)[None]
    outs.append(attend(q_all[:, c * chunk:(c + 1) * chunk], k_pool, v_pool, tables,
                       positions, jnp.full((1,), (c + 1) * chunk, jnp.int32), PREFILL_LAYER))
  return jnp.concatenate(outs, axis=1)


def causal_flops(positions, num_heads: int, head_dim: int) -> float:
  """QK^T and PV multiply-adds of the keys each token sees: 4 * H * D * sum(pos + 1)."""
  return 4.0 * num_heads * head_dim * float(np.sum(np.asarray(positions, np.float64) + 1))


def main_configs(head_dim: int) -> tuple[tuple[pp.TuningConfig, ...], tuple[pp.TuningConfig, ...]]:
  """(first, later): the default (the form the decode kernel compiled and ran right on the
  GPU) and variants whose parts also ran there; then the variants with two computing
  warpgroups, run after every shape's first set (a hang there loses less)."""
  base = pp.default_config(head_dim)
  first = (base, dataclasses.replace(base, p_in_registers=True, warp_specialized=True))
  two = dict(warp_specialized=True, compute_wgs=2, max_concurrent_steps=2, p_in_registers=True)
  later = (pp.TuningConfig(pages_per_step=8, **two),
           pp.TuningConfig(pages_per_step=8, schedule_barrier=True, **two),
           pp.TuningConfig(pages_per_step=4, schedule_barrier=True, **two))
  if head_dim < 128:  # D = 64: the softmax weighs most; three slots
    later += (pp.TuningConfig(pages_per_step=8, schedule_barrier=True,
                           **dict(two, max_concurrent_steps=3)),
              pp.TuningConfig(pages_per_step=8, **dict(two, compute_wgs=3,
                                                    max_concurrent_steps=3)))
  # Three computing warpgroups, two slots (the engine's); then with key splits (more
  # programs where a chunk has too few to fill the GPU).
  return first, later + tuned_variants()


def tuned_variants(chunk: int = 4096) -> tuple[pp.TuningConfig, ...]:
  """The engine's config and its key-split variants (prefill_main(tuned_only=True) times these):
  splits of `chunk` keys (each earlier chunk's keys one split) and of half a chunk, 2 to 8
  programs per row program."""
  return (pp.TUNED,) + tuple(dataclasses.replace(pp.TUNED, kv_splits=s, kv_split=length)
                          for length, s in ((chunk, 2), (chunk, 4), (chunk, 8),
                                            (chunk // 2, 8)))


def _config_name(config: pp.TuningConfig) -> str:
  return (f"mosaic pages/step={config.pages_per_step} slots={config.max_concurrent_steps} "
          f"p_reg={int(config.p_in_registers)} ws={int(config.warp_specialized)} "
          f"wgs={config.compute_wgs} sched={int(config.schedule_barrier)}"
          f"{f' splits={config.kv_splits}x{config.kv_split}' if config.kv_splits > 1 else ''}")


def prefill_main(shapes=tuple(SHAPES), reps: int = 5, watchdog_s: float = 120.0,
         chunks=(PREFILL_CHUNK,), tuned_only: bool = False) -> None:
  """Per shape, a chunks[0]-token chunk at the end of a 32k context and the full 32k causal
  prefill in chunks of each size in `chunks`: our Mosaic GPU kernel (`main_configs`, or
  with `tuned_only` the engine's `pp.TUNED` and its split variants), the Triton
  `paged_attention` on the same inputs, and jax's `attention_mgpu` on the same 32k causal
  work over contiguous K/V (float16: its SMEM tiles are float16). Each is first checked
  against the float32 reference on 256 query tokens (relative L2 error), then timed by
  CUPTI (device time of every kernel a call launches; ours includes the q/out relayouts);
  each of our configs must give the same bits at every chunk size (split boundaries are
  fixed key positions). A variant that fails prints
  its error and the run goes on; one that runs longer than watchdog_s (a hang) prints its
  name and ends the process."""
  bad = [c for c in chunks if c < 256 or PREFILL_CONTEXT % c]
  if bad or not chunks:
    raise ValueError(f"chunks must divide {PREFILL_CONTEXT} and be >= 256 (256 tokens are checked), "
                     f"got {list(chunks)}")
  import os
  import threading
  from jax.experimental.pallas.ops.gpu import attention_mgpu  # GPU only

  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}", flush=True)
  rows = []  # (shape, workload, kernel, ms, TFLOP/s, rel err)

  def timed(shape, workload, kernel, fn, args, flops, check_tokens, ref_args):
    """Checks fn's output at check_tokens (absolute tokens) vs the reference, times it."""
    def hung():
      print(f"  {shape} | {workload} | {kernel}: no result after {watchdog_s:.0f} s, "
            "stopping", flush=True)
      os._exit(3)

    watchdog = threading.Timer(watchdog_s, hung)
    watchdog.start()
    try:
      fn = jax.jit(fn)
      out = fn(*args)
      q_all, k_pool, v_pool, tables = ref_args
      tok = jnp.asarray(check_tokens, jnp.int32)
      offset = PREFILL_CONTEXT - out.shape[1]  # out holds tokens [offset, PREFILL_CONTEXT)
      ref = pp.paged_prefill_attention_reference(
          q_all[:, tok], k_pool, v_pool, tables, tok[None],
          jnp.full((1,), PREFILL_CONTEXT, jnp.int32), PREFILL_LAYER)
      got = out[:, tok - offset].astype(jnp.float32)
      err = float(jnp.linalg.norm((got - ref).ravel()) / jnp.linalg.norm(ref.ravel()))
      if not err < 2e-2:
        raise AssertionError(f"relative L2 error {err:.2e} vs the f32 reference")
      jax.block_until_ready(fn(*args))
      ms = device_ms(fn, *args, reps=reps)
      rows.append((shape, workload, kernel, ms, flops / ms / 1e9, err))
      print(f"  {shape} | {workload} | {kernel}: {ms:.3f} ms, {flops / ms / 1e9:.0f} TFLOP/s, "
            f"err {err:.1e}", flush=True)
      return out
    except Exception as e:  # noqa: BLE001 - report and go on
      rows.append((shape, workload, kernel, None, None, None))
      print(f"  {shape} | {workload} | {kernel}: FAILED {type(e).__name__}: {str(e)[:1500]}",
            flush=True)
      return None
    finally:
      watchdog.cancel()

  cases = {}
  for shape in shapes:
    nh, nk, d = SHAPES[shape]
    inputs = prefill_inputs(jax.random.key(len(shape)), shape)
    rng = np.random.default_rng(0)
    end = chunks[0]
    end_tokens = np.sort(np.concatenate([  # 256 tokens to check, the last 64 among them
        rng.choice(np.arange(PREFILL_CONTEXT - end, PREFILL_CONTEXT - 64), min(192, end - 64),
                   replace=False),
        np.arange(PREFILL_CONTEXT - 64, PREFILL_CONTEXT)]))
    all_tokens = np.sort(np.concatenate([
        rng.choice(np.arange(32, PREFILL_CONTEXT - 32), min(192, PREFILL_CONTEXT - 64), replace=False),
        np.arange(32), np.arange(PREFILL_CONTEXT - 32, PREFILL_CONTEXT)]))
    workloads = (
        (f"{end} at end of {PREFILL_CONTEXT}", functools.partial(chunk_at_end, chunk=end),
         causal_flops(np.arange(PREFILL_CONTEXT - end, PREFILL_CONTEXT), nh, d), end_tokens),
    ) + tuple((f"{PREFILL_CONTEXT} in {c} chunks", functools.partial(chunked_prefill, chunk=c),
               causal_flops(np.arange(PREFILL_CONTEXT), nh, d), all_tokens) for c in chunks)
    cases[shape] = (inputs, workloads, rng)

  def run_ours(shape, configs):
    inputs, workloads, rng = cases[shape]
    q_all, k_pool, v_pool, tables = inputs
    whole = {}  # config -> its first 32k prefill's output
    for name, workload, flops, tokens in workloads:
      for config in configs:
        attend = functools.partial(pp.paged_prefill_attention_mgpu, config=config)
        out = timed(shape, name, _config_name(config), functools.partial(workload, attend),
                    inputs, flops, tokens, inputs)
        if out is not None and workload.func is chunked_prefill:
          if config in whole:
            print(f"  same bits as in {chunks[0]} chunks: "
                  f"{bool(jnp.array_equal(out, whole[config]))}", flush=True)
          whole.setdefault(config, out)
        if out is not None and config == pp.default_config(SHAPES[shape][2]):
          # Same bits at another physical placement of the same pages.
          perm = np.concatenate([[0], 1 + rng.permutation(k_pool.shape[1] - 1)])
          inv = jnp.asarray(np.argsort(perm), jnp.int32)
          moved = jax.jit(functools.partial(workload, attend))(
              q_all, k_pool[:, perm], v_pool[:, perm], inv[tables])
          print(f"  same bits at another placement: {bool(jnp.array_equal(moved, out))}",
                flush=True)

  for shape in shapes:
    nh, nk, d = SHAPES[shape]
    inputs, workloads, _ = cases[shape]
    q_all, k_pool, v_pool, tables = inputs
    print(f"== {shape} (H={nh}, K={nk}, D={d}), bf16, page 16", flush=True)
    # jax's attention_mgpu: contiguous K/V (the pool's pages in logical order), causal. It
    # applies no softmax scale (its reference neither): q is pre-scaled by 1/sqrt(D).
    contiguous = lambda pool: pool[PREFILL_LAYER][tables[0]].reshape(1, PREFILL_CONTEXT, nk, d)
    mgpu_args = ((q_all * d ** -0.5).astype(jnp.float16),
                 contiguous(k_pool).astype(jnp.float16),
                 contiguous(v_pool).astype(jnp.float16))
    for block_kv in (64, 128):
      config = attention_mgpu.TuningConfig(block_q=64, block_kv=block_kv,
                                           max_concurrent_steps=2, causal=True)
      timed(shape, f"{PREFILL_CONTEXT} causal, contiguous", f"attention_mgpu block_kv={block_kv}",
            lambda q, k, v, config=config: attention_mgpu.attention(q, k, v, config), mgpu_args,
            workloads[1][2], workloads[1][3], inputs)
    del mgpu_args
    for name, workload, flops, tokens in workloads:
      timed(shape, name, "triton paged_attention (default config)",
            functools.partial(workload, triton_paged.paged_attention), inputs, flops, tokens,
            inputs)
    run_ours(shape, tuned_variants(chunks[0]) if tuned_only else main_configs(d)[0])
  for shape in () if tuned_only else shapes:
    print(f"== {shape}: two or three computing warpgroups", flush=True)
    run_ours(shape, main_configs(SHAPES[shape][2])[1])

  for shape in shapes:
    mgpu = [r[4] for r in rows if r[0] == shape and r[2].startswith("attention_mgpu")
            and r[3] is not None]
    best = max(mgpu) if mgpu else None
    print(f"\n| {shape} | workload | kernel | ms | TFLOP/s | / attention_mgpu | rel err |")
    print("|---|---|---|---|---|---|---|")
    for _, workload, kernel, ms, tflops, err in (r for r in rows if r[0] == shape):
      if ms is None:
        print(f"| | {workload} | {kernel} | FAILED | | | |")
        continue
      ratio = f"{tflops / best:.2f}" if best else "n/a"
      print(f"| | {workload} | {kernel} | {ms:.2f} | {tflops:.0f} | {ratio} | {err:.1e} |")
  print(flush=True)


# ------------------------------------------------------------ shared-prefix decode
SHAPE_7B = (28, 4, 128)  # (query heads, kv heads, head_dim)
SHARED_POINTS = ((32768, 256, 128), (4096, 512, 64), (0, 4096, 64))  # (shared, own, requests)


def _pow2(n: int) -> int:
  return 1 << (max(int(n), 1) - 1).bit_length()


def single_prefix_plan(shared_blocks, own_tokens: int, batch: int, block_size: int, *,
                       requests_per_tile: int) -> SharingPlan:
  """The plan `hq_jax.kv.sharing.build_plan` makes when every request holds the blocks
  `shared_blocks` first and then `own_tokens` keys of its own (built here so this module
  stays a leaf; the tests compare it with build_plan's)."""
  shared_blocks = np.asarray(shared_blocks, np.int32)
  nsb, rpt = shared_blocks.size, requests_per_tile
  node_tables = np.zeros((1, _pow2(nsb)), np.int32)
  node_tables[0, :nsb] = shared_blocks
  num_tiles = -(-batch // rpt)
  tile_reqs = np.full((_pow2(num_tiles), rpt), -1, np.int32)
  tile_reqs.reshape(-1)[:batch] = np.arange(batch)
  return SharingPlan(
      node_tables=jnp.asarray(node_tables),
      node_lens=jnp.asarray([nsb * block_size], jnp.int32),
      tile_node=jnp.zeros((_pow2(num_tiles),), jnp.int32), tile_reqs=jnp.asarray(tile_reqs),
      req_rows=jnp.arange(batch, dtype=jnp.int32).reshape(batch, 1),
      private_start=jnp.full((batch,), nsb * block_size, jnp.int32),
      node_start=jnp.zeros((1,), jnp.int32), requests_per_tile=rpt, private_tokens_hint=max(_pow2(own_tokens), 1024),
      has_shared=nsb > 0 and batch > 1)


def shared_prefix_inputs(key, shared: int, own: int, batch: int, *, shape=SHAPE_7B,
                         num_layers: int = 2, block_size: int = 16, dtype=jnp.bfloat16):
  """Fresh random decode inputs: every request reads `shared` keys stored once, then `own`
  keys of its own; blocks at a random placement (block 0 never assigned)."""
  nh, nk, d = shape
  nsb, nob = shared // block_size, -(-own // block_size)
  num_blocks = 1 + nsb + batch * nob
  kq, kk, kv, kp = jax.random.split(key, 4)
  pool_shape = (num_layers, num_blocks, block_size, nk, d)
  q = jax.random.normal(kq, (batch, 1, nh, d), dtype)
  k_pool = jax.random.normal(kk, pool_shape, dtype)
  v_pool = jax.random.normal(kv, pool_shape, dtype)
  ids = np.asarray(1 + jax.random.permutation(kp, num_blocks - 1), np.int32)
  shared_ids, own_ids = ids[:nsb], ids[nsb:].reshape(batch, nob)
  tables = np.concatenate([np.broadcast_to(shared_ids, (batch, nsb)), own_ids], axis=1)
  kv_lens = jnp.full((batch,), shared + own, jnp.int32)
  return (q, k_pool, v_pool, jnp.asarray(tables), (kv_lens - 1)[:, None], kv_lens), shared_ids


def _shared_reference(q, k_pool, v_pool, tables, positions, kv_lens, layer):
  """float32 paged oracle, 8 requests at a time (the whole batch in f32 would not fit)."""
  one = lambda a: pm.paged_decode_attention_reference(
      a[0][None], k_pool, v_pool, a[1][None], a[2][None], a[3][None], layer)[0]
  return jax.lax.map(one, (q, tables, positions, kv_lens), batch_size=8)


def shared_main(points=SHARED_POINTS, reps: int = 5) -> None:
  """At the 7B shape, for each point: checks every kernel against the float32 oracle, then
  times it by CUPTI (device time of every kernel a call launches, the XLA gathers and merge
  included). Each timed call runs layers 0 and 1 (disjoint K/V) and counts half. One row per
  Mosaic config: its dedup time beside the Triton dedup, Triton paged and Mosaic paged times
  (the same for every row of a point), the shared launch alone and its TFLOP/s, the speedup
  over the faster paged kernel and the ideal byte ratio (paged bytes / dedup bytes)."""

  nh, nk, d = SHAPE_7B
  group = nh // nk
  configs = {"default": dm.DEFAULT, "p_regs": dataclasses.replace(dm.DEFAULT, p_in_registers=True),
             "ws2": dm.DEFAULT_WS,
             "ws2_3slot": dataclasses.replace(dm.DEFAULT_WS, max_concurrent_steps=3)}
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; H={nh} K={nk} D={d}, "
        "bf16, block 16; us per call (layer pair / 2)", flush=True)
  print(f"{'shared,own,reqs':>18} {'config':>9} | {'mosaic':>8} {'tri dedup':>9} "
        f"{'tri paged':>9} {'mos paged':>9} | {'shared':>8} {'TFLOP/s':>7} | {'x paged':>7} "
        f"{'ideal':>6} | {'err':>7}", flush=True)

  def timed(fn, inputs, ref):
    """(us per layer, relative L2 error of layer 1) after checking it."""
    out = jax.block_until_ready(fn(*inputs, 1))
    err = float("nan")
    if ref is not None:
      err = float(jnp.linalg.norm((out.astype(jnp.float32) - ref).ravel())
                  / jnp.linalg.norm(ref.ravel()))
      if not err < 2e-2:
        raise AssertionError(f"relative L2 error {err:.2e} vs the f32 reference")
    pair = jax.jit(lambda *a: (fn(*a, 0), fn(*a, 1)))
    jax.block_until_ready(pair(*inputs))
    ms = device_ms(pair, *inputs, reps=reps)
    return ms * 1e3 / 2, err

  def safe(label, fn, inputs, ref):
    try:
      return timed(fn, inputs, ref)
    except Exception as e:  # noqa: BLE001 - report and go on
      print(f"  {label} FAILED: {type(e).__name__}: {str(e)[:1500]}", flush=True)
      return float("nan"), float("nan")

  for shared, own, batch in points:
    point = f"{shared},{own},{batch}"
    inputs, shared_ids = shared_prefix_inputs(jax.random.key(shared + own + batch), shared,
                                              own, batch)
    ref = jax.block_until_ready(jax.jit(_shared_reference)(*inputs, 1))
    plan_of = lambda rpt: single_prefix_plan(shared_ids, own, batch, 16, requests_per_tile=rpt)
    tri_plan = plan_of(da.default_config(d, group).requests_per_tile(group))
    tri_dedup, _ = safe("triton dedup", lambda *a: da.dedup_attention(*a[:6], tri_plan, a[6]),
                        inputs, ref)
    tri_paged, _ = safe("triton paged", triton_paged.paged_attention, inputs, ref)
    mos_paged, _ = safe("mosaic paged", pm.paged_decode_attention_mgpu, inputs, ref)
    best_paged = np.nanmin([tri_paged, mos_paged, np.inf])
    flop = 4 * shared * batch * nh * d  # QK^T and PV of the shared keys, every request
    ideal = (shared + own) * batch / (shared + own * batch)
    for name, config in configs.items():
      plan = plan_of(config.requests_per_tile(group))
      fn = jax.jit(functools.partial(dm.dedup_attention_mgpu, config=config))
      run = lambda *a, fn=fn, plan=plan: fn(*a[:6], plan, a[6])
      us, err = safe(f"mosaic dedup {name}", run, inputs, ref)
      part_us = float("nan")
      if plan.has_shared:
        part = jax.jit(functools.partial(dm.shared_part_mgpu, config=config))
        part_us, _ = safe(f"shared part {name}", lambda *a, part=part, plan=plan: part(
            *a[:4], plan, a[6])[1], inputs, None)
      tflops = flop / part_us / 1e6 if flop else float("nan")
      print(f"{point:>18} {name:>9} | {us:8.1f} {tri_dedup:9.1f} {tri_paged:9.1f} "
            f"{mos_paged:9.1f} | {part_us:8.1f} {tflops:7.1f} | {best_paged / us:7.2f} "
            f"{ideal:6.2f} | {err:7.1e}", flush=True)
      if not plan.has_shared:
        break  # every config is the paged kernel


USAGE = __doc__.split("\n\n")[1]  # the three command lines of the module doc


def _usage_error(message: str) -> None:
  """One line naming the problem, then the usage; status 2 (as every command's usage error)."""
  print(f"error: hq-jax bench mosaic{message}\nusage:\n{USAGE}", file=sys.stderr)
  sys.exit(2)


def main(argv=None) -> None:
  """`hq-jax bench mosaic decode|prefill|shared ...` (the arguments of the module doc).
  --help prints the usage; an argument a subcommand does not take is one usage error."""
  args = list(sys.argv[1:] if argv is None else argv)
  if not args or args[0] in ("-h", "--help") or "--help" in args or "-h" in args:
    print(f"usage:\n{USAGE}\n\n{__doc__.split(chr(10) * 2)[2]}")
    sys.exit(0 if args else 2)
  what = args.pop(0)
  point = lambda a: a.count("x") == 1 and all(p.isdigit() for p in a.split("x"))
  takes = {"decode": lambda a: a == "--sweep" or a in SHAPES or point(a),
           "prefill": lambda a: a in SHAPES or a == "--tuned" or a.startswith("--chunks="),
           "shared": lambda a: a.count("x") == 2 and all(p.isdigit() for p in a.split("x"))}
  if what not in takes:
    _usage_error(f": unknown subcommand {what!r}")
  bad = [a for a in args if not takes[what](a)]
  if bad:
    _usage_error(f" {what}: unknown argument {bad[0]!r}")
  if what == "decode":
    decode_main(sweep="--sweep" in args,
                shapes=tuple(a for a in args if a in SHAPES) or tuple(SHAPES),
                points=tuple(tuple(map(int, a.split("x"))) for a in args if point(a))
                or DECODE_POINTS)
  elif what == "prefill":
    chunk_args = [a.split("=", 1)[1] for a in args if a.startswith("--chunks=")]
    try:
      chunks = tuple(int(c) for c in chunk_args[-1].split(",")) if chunk_args else (PREFILL_CHUNK,)
    except ValueError:
      _usage_error(f" prefill: --chunks takes integers, got {chunk_args[-1]!r}")
    prefill_main(shapes=tuple(a for a in args if a in SHAPES) or tuple(SHAPES), chunks=chunks,
                 tuned_only="--tuned" in args)
  else:
    shared_main(tuple(tuple(map(int, a.split("x"))) for a in args) or SHARED_POINTS)


def run(argv=None) -> None:
  """`hq-jax bench mosaic` (argv[0] is the command's name)."""
  main(None if argv is None else argv[1:])


if __name__ == "__main__":
  main()
