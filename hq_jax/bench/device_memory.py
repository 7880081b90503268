"""Peak device memory of one stretch of work (a sweep row), from XLA's own accounting.

The allocator's `peak_bytes_in_use` is a process-wide running maximum that JAX cannot
reset, so after the first row it says nothing about the row at hand. `PeakTracker`
instead computes, before every jitted step the engine runs (it is the engine's
`on_step` hook), what the device holds while that step runs:

    bytes of every live device array (weights, pools and metadata, the step's inputs)
  + the step's scratch (`temp_size_in_bytes` of the compiled executable)
  + its outputs, less those that reuse a donated input's buffer (`alias_size_in_bytes`)

and keeps the maximum since `start()`. The figures come from XLA's buffer assignment
for the executable that runs (`jit(...).lower(...).compile().memory_analysis()`, which
hits the same compilation cache as the call itself), so the peak is exact in what XLA
allocates; it leaves out what no array or executable owns (the CUDA context, cuBLAS
workspaces, allocator rounding). It is the same on every platform, so CPU tests can
check it; on a GPU the sweep also records the allocator's process peak beside it
(`process_peak_bytes`) to cross-check the first row of a fresh process, where the two
measure the same thing.
"""

from __future__ import annotations

import gc
from typing import Any, Callable

import jax


def live_bytes(device=None) -> int:
  """Bytes of every device array alive in this process: on all devices, or (`device`)
  the shards that device holds."""
  live = [a for a in jax.live_arrays() if not a.is_deleted()]
  if device is None:
    return sum(a.nbytes for a in live)
  return sum(s.data.nbytes for a in live for s in a.addressable_shards if s.device == device)


def process_peak_bytes() -> int | None:
  """The allocator's process-wide peak so far, where the platform reports one (GPU)."""
  stats = jax.devices()[0].memory_stats()
  return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def _signature(args: tuple, kwargs: dict):
  leaves, tree = jax.tree.flatten(args)
  shapes = tuple((getattr(x, "shape", None), str(getattr(x, "dtype", type(x)))) for x in leaves)
  return tree, shapes, tuple(sorted(kwargs.items()))


class PeakTracker:
  """Callable as `Engine(on_step=tracker)`: tracks the peak device bytes since `start()`.

  `device`: count only what that device holds (a tensor-parallel step: its shards of the
  live arrays; XLA's memory analysis of an SPMD executable is already per device)."""

  def __init__(self, device=None):
    self._extra: dict[Any, int] = {}  # (fn, signature) -> scratch + new output bytes
    self.peak = 0
    self.device = device

  def start(self) -> None:
    """Begins a new stretch: the peak restarts from what is alive now."""
    gc.collect()  # arrays of earlier rows held only by reference cycles
    self.peak = live_bytes(self.device)

  def step_bytes(self, fn: Callable, args: tuple, kwargs: dict) -> int:
    """Scratch plus non-aliased output bytes of `fn(*args, **kwargs)`, memoized by shape."""
    key = (fn, _signature(args, kwargs))
    if key not in self._extra:
      stats = fn.lower(*args, **kwargs).compile().memory_analysis()
      self._extra[key] = (stats.temp_size_in_bytes + stats.output_size_in_bytes
                          - stats.alias_size_in_bytes)
    return self._extra[key]

  def __call__(self, fn: Callable, args: tuple, kwargs: dict) -> None:
    self.peak = max(self.peak, live_bytes(self.device) + self.step_bytes(fn, args, kwargs))
