"""Trace replay over several budgets, the capacity grid, and their CSV / plot outputs.

`scripts/trace_replay.py` is a thin shell around `run_budgets`, `capacity_rows` and
`plot` (its CSV and JSON go through `hq_jax.study.outputs`, as every script's do); a
notebook can call them directly.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

from hq_jax.study import traces
from hq_jax.study.traces import DenseSimulator, HQSimulator, ReplayConfig, TraceRequest

GB = 10**9  # --kv_budget_gb counts decimal gigabytes, as GPU datasheets do.

COLUMNS = ("model", "block_size", "kv_dtype", "kv_budget_gb", "num_blocks", "backend",
           "requests", "skipped_requests", "prompt_tokens", "hit_tokens", "hit_ratio",
           "computed_prefill_tokens", "evicted_blocks", "peak_kv_bytes_used",
           "mean_kv_bytes_used", "mean_concurrency", "peak_concurrency", "replay_span_s",
           "mean_queue_wait_s", "decode_steps", "partial", "ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms",
           "prefill_tokens_per_s_measured", "host_admit_ms_mean")
CAPACITY_COLUMNS = ("model", "block_size", "kv_dtype", "kv_budget_gb", "num_blocks",
                    "context_length", "shared_prefix_fraction", "shared_blocks", "dense_admitted",
                    "hq_admitted", "hq_over_dense", "checked_by_simulator")


def pool_blocks(budget_gb: float, bytes_per_block: int) -> int | None:
  """Blocks a budget buys (None = unbounded for budget 0); an error if not even one."""
  if budget_gb == 0:
    return None
  blocks = int(budget_gb * GB) // bytes_per_block
  if blocks < 1:
    raise ValueError(f"--kv_budget_gb={budget_gb:g} is less than one KV block "
                     f"({bytes_per_block} bytes)")
  return blocks


BackendFactory = Callable[[str, int | None], object]


def simulator_factory(block_size: int) -> BackendFactory:
  def make(name, num_blocks):
    if name == "dense":
      return DenseSimulator(num_blocks, block_size, name=name)
    return HQSimulator(num_blocks, block_size, name=name)
  return make


def run_budgets(requests: Sequence[TraceRequest], budgets_gb: Sequence[float], *,
                model: str, bytes_per_block: int, block_size: int, cfg: ReplayConfig,
                make_backend: BackendFactory, progress_factory=None,
                deadline: float | None = None) -> list[dict]:
  """One row per (backend, budget): dense and hq at each budget, hq_unbounded once.

  Budget 0 means unbounded: it gives the dense row without a pool limit and the
  hq_unbounded row (the upper bound on prefix hits). A backend with its own `replay`
  (model mode: `trace_serving.ServingBackend`) runs that; the others the simulator's
  `traces.replay`. `deadline` (a `time.perf_counter()` value) is shared out evenly among
  the model-mode rows still to run: each gets the time left / the rows left.
  """
  plan = [("hq_unbounded", 0.0)]
  for b in budgets_gb:
    plan += [("dense", b)] + ([("hq", b)] if b else [])
  rows = []
  backends = [(name, budget, pool_blocks(budget, bytes_per_block)) for name, budget in plan]
  serving_left = None
  for i, (name, budget, nb) in enumerate(backends):
    backend = make_backend(name, nb)
    bar = progress_factory(f"{name} @ {budget:g} GB") if progress_factory else None
    try:
      if hasattr(backend, "replay"):
        if serving_left is None:  # the model-mode rows: all but the simulated unbounded one
          serving_left = sum(n != "hq_unbounded" for n, _, _ in backends[i:])
        row_deadline = None
        if deadline is not None:
          now = time.perf_counter()
          row_deadline = now + max(0.0, deadline - now) / serving_left
        serving_left -= 1
        row = backend.replay(requests, cfg, bytes_per_block=bytes_per_block, progress=bar,
                             deadline=row_deadline)
      else:
        row = traces.replay(requests, backend, cfg, bytes_per_block=bytes_per_block,
                            progress=bar)
    finally:
      if bar is not None:
        bar.close()
    rows.append(dict(model=model, block_size=block_size, kv_budget_gb=budget,
                     num_blocks=nb if nb is not None else "", **row))
  return rows


def capacity_analytic(num_blocks: int, context_length: int, shared_fraction: float,
                      block_size: int) -> tuple[int, int, int]:
  """(shared blocks, dense admitted, hq admitted) for identical-length requests at t=0.

  Each request holds ceil(L / bs) blocks; with HQ the first floor(f * L / bs) are one
  shared copy (held once), so after the first request each needs only its private rest.
  """
  total = -(-context_length // block_size)
  shared = min(int(shared_fraction * context_length) // block_size, total - 1)
  dense = num_blocks // total
  hq = 0 if total > num_blocks else 1 + (num_blocks - total) // (total - shared)
  return shared, dense, hq


def capacity_simulated(num_blocks: int, context_length: int, shared_blocks: int,
                       block_size: int, backend: str, limit: int) -> int:
  """Requests the simulator admits at once (all arrive at t=0 and never finish)."""
  n = limit + 1
  per = -(-context_length // block_size)
  reqs = []
  for i in range(n):  # Trace blocks = cache blocks here, so any shared block count works.
    ids = list(range(shared_blocks)) + [10**9 + i * per + j for j in range(per - shared_blocks)]
    reqs.append(TraceRequest(i, 0.0, context_length, 0, tuple(ids)))
  sim = (DenseSimulator(num_blocks, block_size) if backend == "dense" else
         HQSimulator(num_blocks, block_size, block_tokens=block_size))
  cfg = ReplayConfig(max_concurrency=n, prefill_tokens_per_s=1e-9)
  return traces.replay(reqs, sim, cfg, bytes_per_block=1)["peak_concurrency"]


def capacity_rows(*, model: str, budgets_gb: Sequence[float], bytes_per_block: int,
                  block_size: int, context_lengths: Sequence[int],
                  shared_fractions: Sequence[float],
                  check_limit: int = 2_000_000) -> list[dict]:
  """The capacity question on a synthetic grid; analytic, checked by the simulator.

  Points needing more than `check_limit` block operations to simulate are not
  checked (`checked_by_simulator` False).
  """
  rows = []
  for budget in budgets_gb:
    nb = pool_blocks(budget, bytes_per_block)
    if nb is None:
      continue  # Unbounded: capacity is only the concurrency limit.
    for length in context_lengths:
      for frac in shared_fractions:
        shared, dense, hq = capacity_analytic(nb, length, frac, block_size)
        checked = (hq + 1) * -(-length // block_size) <= check_limit
        if checked:
          got = (capacity_simulated(nb, length, shared, block_size, "dense", dense),
                 capacity_simulated(nb, length, shared, block_size, "hq", hq))
          if got != (dense, hq):
            raise AssertionError(f"capacity at {budget} GB, L={length}, f={frac}: analytic "
                                 f"{(dense, hq)} but the simulator admits {got}")
        rows.append(dict(model=model, block_size=block_size, kv_budget_gb=budget,
                         num_blocks=nb, context_length=length, shared_prefix_fraction=frac,
                         shared_blocks=shared, dense_admitted=dense, hq_admitted=hq,
                         hq_over_dense=hq / dense if dense else "",
                         checked_by_simulator=checked))
  return rows


def plot(rows: Sequence[dict], path: str, title: str) -> None:
  """Hit ratio and computed prefill tokens against the budget, per backend."""
  from matplotlib.figure import Figure
  fig = Figure(figsize=(10, 4))
  ax_hit, ax_comp = fig.subplots(1, 2)
  bounded = sorted({r["kv_budget_gb"] for r in rows if r["kv_budget_gb"]})
  for backend, style in (("dense", "s-"), ("hq", "o-")):
    pts = sorted((r["kv_budget_gb"], r) for r in rows
                 if r["backend"] == backend and r["kv_budget_gb"])
    if pts:
      xs = [b for b, _ in pts]
      ax_hit.plot(xs, [100 * r["hit_ratio"] for _, r in pts], style, label=backend)
      ax_comp.plot(xs, [r["computed_prefill_tokens"] / 1e6 for _, r in pts], style,
                   label=backend)
  for r in rows:
    if r["kv_budget_gb"] == 0:  # Unbounded rows as horizontal references.
      ls = ":" if r["backend"] == "hq_unbounded" else "--"
      ax_hit.axhline(100 * r["hit_ratio"], ls=ls, color="gray",
                     label=f"{r['backend']} (unbounded)")
      ax_comp.axhline(r["computed_prefill_tokens"] / 1e6, ls=ls, color="gray",
                      label=f"{r['backend']} (unbounded)")
  for ax, ylabel in ((ax_hit, "prefix hit ratio (%)"),
                     (ax_comp, "computed prefill tokens (M)")):
    if bounded:
      ax.set_xscale("log")
    ax.set_xlabel("KV budget (GB)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
