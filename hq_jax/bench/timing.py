"""How kernel benchmarks time and check: one place for `scripts/kernel_bench.py` and
`hq_jax.bench.shared_prefix`.

Times are device time by CUPTI (`jax.experimental.mosaic.gpu.profiler.measure`): every
kernel a call launches, XLA fusions included, so a split merge or a layout fusion counts.
"""

from __future__ import annotations

import collections
import statistics
import time
from typing import Callable

import jax
import numpy as np


def rel_err(out, ref) -> float:
  """Relative L2 error of out against ref, in float64."""
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def _jitted(fn: Callable):
  """fn itself if it is already a top-level jitted function (which may carry compiler
  options: those are refused on a nested jit), else jax.jit(fn)."""
  return fn if isinstance(fn, jax.stages.Wrapped) else jax.jit(fn)


def device_ms(fn: Callable, *args, reps: int, wall_clock: bool = False) -> float:
  """Median time (ms) of fn(*args) over reps calls after a warm-up (compilation): CUPTI
  device time, or wall clock with `wall_clock` (interpret-mode smoke runs on a CPU)."""
  fn = _jitted(fn)
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    if wall_clock:
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times.append((time.perf_counter() - t0) * 1e3)
    else:
      from jax.experimental.mosaic.gpu import profiler
      times.append(profiler.measure(fn)(*args)[1])
  return statistics.median(times)


def kernel_breakdown(fn: Callable, *args, calls: int = 1, reps: int = 5) -> str:
  """Device time of each kernel fn launches, by CUPTI: median over reps runs, per name.

  fn may run `calls` independent calls of the function of interest (kernel_bench's `_pair`:
  2, so its K/V is never in L2); a kernel's time is summed over its launches of one run and
  divided by calls. Names are in launch order: for our split decode, "paged_attention"
  then "paged_attention_merge" (and anything XLA adds around them). A diagnostic: where
  the profiler is unavailable (a CPU), says so instead of raising.
  """
  try:
    from jax.experimental.mosaic.gpu import profiler
    fn = _jitted(fn)
    times = collections.defaultdict(list)
    for _ in range(reps):
      _, kernels = profiler.measure(fn, aggregate=False)(*args)
      run = collections.defaultdict(float)  # first-launch order
      for name, ms in kernels or ():
        run[name] += ms
      for name, ms in run.items():
        times[name].append(ms)
    if not times:
      return "n/a (no kernels recorded)"
    return ", ".join(f"{name[:48]} {statistics.median(ms) * 1e3 / calls:.1f} us"
                     for name, ms in times.items())
  except Exception as e:  # noqa: BLE001 - diagnostics only
    return f"n/a ({type(e).__name__})"
