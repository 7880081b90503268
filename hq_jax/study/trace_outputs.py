"""Trace replay over several budgets, the capacity grid, and their CSV / plot outputs.

`hq-jax replay` (`hq_jax.study.commands.replay`) is a thin shell around `run_budgets`,
`capacity_rows` and `plot` (its CSV and JSON go through `hq_jax.study.outputs`, as every
script's do); a notebook can call them directly.
"""

from __future__ import annotations

import collections
import math
import time
from typing import Sequence

import numpy as np

from hq_jax.kv.dedup import DedupKVCache
from hq_jax.kv.dense import DenseKVCache
from hq_jax.kv.paged import KVLayout
from hq_jax.mesh import MeshSpec
from hq_jax.serve import scheduler
from hq_jax.serve.scheduler import Request
from hq_jax.study import traces
from hq_jax.study.traces import ReplayConfig, TraceRequest

GB = 10**9  # --kv_budget_gb counts decimal gigabytes, as GPU datasheets do.

COLUMNS = ("model", "mesh", "block_size", "kv_dtype", "invariance", "kv_budget_gb", "num_blocks",
           "host_kv_budget_gb", "host_blocks", "backend",
           "requests", "skipped_requests", "skipped_long_context", "prompt_tokens",
           "hit_tokens", "hit_ratio", "device_hit_tokens", "host_hit_tokens",
           "host_hit_requests", "computed_prefill_tokens", "evicted_blocks",
           "bytes_to_host", "bytes_to_device", "transfer_s", "host_memory_kind",
           "peak_kv_bytes_used", "mean_kv_bytes_used", "mean_concurrency", "peak_concurrency",
           "replay_span_s", "mean_queue_wait_s", "decode_steps", "partial", "ttft_p50_ms",
           "ttft_p90_ms", "ttft_p99_ms", "prefill_tokens_per_s_measured", "host_admit_ms_mean")
CAPACITY_COLUMNS = ("model", "block_size", "kv_dtype", "kv_budget_gb", "num_blocks",
                    "context_length", "shared_prefix_fraction", "shared_blocks", "dense_admitted",
                    "hq_admitted", "hq_over_dense", "checked_by_replay")


def pool_blocks(budget_gb: float, bytes_per_block: int,
                flag: str = "kv_budget_gb") -> int | None:
  """Blocks a budget buys (None = unbounded for budget 0); an error naming `flag` if not
  even one."""
  if budget_gb == 0:
    return None
  blocks = int(budget_gb * GB) // bytes_per_block
  if blocks < 1:
    raise ValueError(f"--{flag}={budget_gb:g} is less than one KV block "
                     f"({bytes_per_block} bytes)")
  return blocks


def host_pool_blocks(budget_gb: float, bytes_per_block: int) -> int:
  """Blocks of a host tier a budget buys (0 = no host tier): `pool_blocks`' rule."""
  return pool_blocks(budget_gb, bytes_per_block, "host_kv_budget_gb") or 0


def replay_plan(budgets_gb: Sequence[float],
                host_budgets_gb: Sequence[float] = (0.0,)) -> list[tuple[str, float, float]]:
  """The rows of a replay, as (backend, device budget, host budget): hq_unbounded once,
  then per device budget dense (device only: it reuses nothing) and, where bounded, hq at
  each host budget."""
  plan = [("hq_unbounded", 0.0, 0.0)]
  for b in budgets_gb:
    plan += [("dense", b, 0.0)] + ([("hq", b, h) for h in host_budgets_gb] if b else [])
  return plan


def _caches(layout, requests: Sequence[TraceRequest], cfg: ReplayConfig):
  """(max_seq_len, blocks for every request at once) of a replay's caches."""
  holds = [r.input_length + cfg.output_tokens(r) for r in requests]
  return max(holds), sum(layout.blocks_for(h) for h in holds)


def run_budgets(requests: Sequence[TraceRequest], budgets_gb: Sequence[float], *,
                model: str, layout: KVLayout, cfg: ReplayConfig, vocab_size: int,
                seed: int = 0, max_context: int | None = None, engine=None,
                warm: bool = True, progress_factory=None, deadline: float | None = None,
                generated: dict | None = None, mesh: str = "data:1,model:1",
                shard_rows: list | None = None, host_budgets_gb: Sequence[float] = (0.0,),
                host_memory: str = "auto") -> list[dict]:
  """One row per (backend, budget): dense and hq at each budget, hq_unbounded once.

  Budget 0 means unbounded: it gives the dense row with a pool for every request at once
  and the hq_unbounded row (the upper bound on prefix hits: a pool that never evicts).
  Without `engine` every row is the no-model replay (`traces.replay`) on host-only caches.
  With one (model mode), dense and hq rows run `scheduler.serve` through it on real caches
  (warmed up first unless `warm` is False); hq_unbounded stays the no-model replay, whose
  hits do not depend on timing and whose pool would not fit on one GPU. `deadline` (a
  `time.perf_counter()` value) is shared out evenly among the model-mode rows still to
  run: each gets the time left / the rows left. `generated` (model mode) receives each
  row's greedy tokens by request index, under (backend, budget) (and the host budget
  after them where it is not 0). `host_budgets_gb`: the HQ rows' host tiers (0: none;
  `replay_plan`); `host_memory`: where a model-mode host tier lives (`tiers`).

  `mesh` ("data:D,model:M", `hq_jax.mesh.MeshSpec`): with D > 1 each row runs D caches
  under cache-aware routing (`scheduler.DataParallel`; no model: `traces.
  replay_data_parallel`; model mode: `scheduler.serve_data_parallel`, `engine` then a list
  of D engines, one per data row), the budget's blocks and cfg.max_concurrency split as
  evenly as they go (the shards' sums are the row's), so a row compares directly with one
  cache of the same budget; its columns are the global sums and `shard_rows` (if given)
  receives one row per (row, shard) with `shard` and `routed_by_prefix` added. A host
  tier runs on one data shard only (refused with D > 1).
  """
  spec = MeshSpec.parse(mesh)
  shards = spec.data
  engines = None if engine is None else (
      list(engine) if isinstance(engine, (list, tuple)) else [engine])
  if engines is not None and len(engines) != shards:
    raise ValueError(f"--mesh={spec.label}: {len(engines)} engines for {shards} data shards")
  if shards > cfg.max_concurrency:
    raise ValueError(f"--mesh={spec.label}: {shards} data shards need --max_concurrency >= "
                     f"{shards} (each shard gets its share of the slots)")
  if shards > 1 and any(host_budgets_gb):
    raise ValueError(f"--host_kv_budget_gb with --mesh={spec.label}: a host tier runs on one "
                     "data shard only (give data:1 or --host_kv_budget_gb=0)")
  plan = replay_plan(budgets_gb, host_budgets_gb)
  max_seq_len, everything = _caches(layout, requests, cfg)
  bpb = layout.bytes_per_block
  served = [name != "hq_unbounded" and engines is not None for name, _, _ in plan]
  rows = []
  for i, (name, budget, host_gb) in enumerate(plan):
    nb = pool_blocks(budget, bpb)
    nh = host_pool_blocks(host_gb, bpb)
    kind = DenseKVCache if name == "dense" else DedupKVCache
    tier = dict(host_blocks=nh, host_memory=host_memory) if nh else {}
    memory_kind = ""
    label = f"{name} @ {budget:g} GB" + (f" + {host_gb:g} GB host" if nh else "")
    bar = progress_factory(label) if progress_factory else None
    try:
      if served[i]:
        slots = _split(cfg.max_concurrency, shards)
        seq = max(max_seq_len, cfg.max_concurrency + 1)  # the warm-up's requests
        pools = (_split(nb, shards) if nb else
                 [max(everything, c * layout.blocks_for(seq)) for c in slots])
        caches = []
        for e, b, c in zip(engines, pools, slots):
          cache = kind.init(layout, num_blocks=b, max_requests=c, max_seq_len=seq, **tier)
          if nh:
            from hq_jax.kv import tiers
            memory_kind = tiers.pools_memory_kind(cache.host_pools)
          caches.append(scheduler.warm_up(e, cache, c) if warm else cache)
        row_deadline = None
        if deadline is not None:
          now = time.perf_counter()
          row_deadline = now + max(0.0, deadline - now) / sum(served[i:])
        key = (name, budget) + ((host_gb,) if nh else ())
        out = {} if generated is None else generated.setdefault(key, {})
        arrivals = traces.scheduler_requests(requests, cfg, vocab_size=vocab_size, seed=seed)
        if shards == 1:
          sched = scheduler.Scheduler(caches[0], arrivals, max_concurrency=cfg.max_concurrency,
                                      max_context=max_context, progress=bar)
          stats = scheduler.serve(engines[0], sched, deadline=row_deadline, generated=out)
        else:
          dp = scheduler.DataParallel(caches, arrivals, max_concurrency=slots,
                                      max_context=max_context, progress=bar)
          stats = scheduler.serve_data_parallel(engines, dp, deadline=row_deadline,
                                                generated=out)
          if shard_rows is not None:
            shard_rows += _shard_rows(dp, pools if nb else None, bpb, model=model,
                                      mesh=spec.label, layout=layout, budget=budget,
                                      backend=name)
      elif shards == 1:
        cache = kind.init(layout, num_blocks=nb or everything,
                          max_requests=cfg.max_concurrency, max_seq_len=max_seq_len,
                          host_only=True, **tier)
        stats = traces.replay(requests, cache, cfg, vocab_size=vocab_size, seed=seed,
                              max_context=max_context, progress=bar)
      else:
        dp, blocks = _replay_shards(
            requests, kind, layout, nb, everything, max_seq_len, cfg, shards,
            vocab_size=vocab_size, seed=seed, max_context=max_context, progress=bar)
        stats = dp.stats
        if shard_rows is not None:
          shard_rows += _shard_rows(dp, blocks, bpb, model=model, mesh=spec.label,
                                    layout=layout, budget=budget, backend=name)
    finally:
      if bar is not None:
        bar.close()
    rows.append(dict(model=model, mesh=spec.label, block_size=layout.block_size,
                     kv_dtype=layout.dtype,
                     invariance=engines[0].invariance if served[i] else "",
                     kv_budget_gb=budget,
                     num_blocks=nb if nb is not None else "", host_kv_budget_gb=host_gb,
                     host_blocks=nh, host_memory_kind=memory_kind, backend=name,
                     **stats.row(bytes_per_block=bpb)))
  return rows


def _split(total: int, parts: int) -> list[int]:
  """`total` in `parts` shares as even as they go (the first ones one larger)."""
  return [total // parts + (d < total % parts) for d in range(parts)]


def _shard_rows(dp, blocks, bpb, **columns) -> list[dict]:
  """One row per data shard of a row (`run_budgets`' `shard_rows`): the row's columns, the
  shard's pool (None: unbounded) and serving stats, and how many requests its prefix won."""
  by_prefix = collections.Counter(r.shard for r in dp.routes.values() if r.by_prefix)
  c = columns
  return [dict(model=c["model"], mesh=c["mesh"], block_size=c["layout"].block_size,
               kv_dtype=c["layout"].dtype, kv_budget_gb=c["budget"], backend=c["backend"],
               shard=d, num_blocks=blocks[d] if blocks else "",
               routed_by_prefix=by_prefix[d], **s.stats.row(bytes_per_block=bpb))
          for d, s in enumerate(dp.shards)]


def _replay_shards(requests, kind, layout, num_blocks, everything, max_seq_len, cfg, shards,
                   *, vocab_size, seed, max_context, progress):
  """The no-model replay of one row over `shards` host-only caches (`run_budgets`):
  (the `DataParallel` after it, each shard's pool blocks or None when unbounded)."""
  slots = _split(cfg.max_concurrency, shards)
  blocks = _split(num_blocks, shards) if num_blocks else [everything] * shards
  caches = [kind.init(layout, num_blocks=b, max_requests=c, max_seq_len=max_seq_len,
                      host_only=True) for b, c in zip(blocks, slots)]
  dp = traces.replay_data_parallel(
      caches, traces.scheduler_requests(requests, cfg, vocab_size=vocab_size, seed=seed,
                                        synthesize=kind is DedupKVCache),
      cfg, vocab_size=vocab_size, seed=seed, max_context=max_context, progress=progress,
      max_concurrency=slots)
  return dp, blocks if num_blocks else None


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


def capacity_replayed(num_blocks: int, context_length: int, shared_blocks: int,
                      block_size: int, backend: str, limit: int) -> int:
  """Requests the real cache (host-only) admits at once under the no-model replay: all
  arrive at t=0, share their first `shared_blocks` blocks, and never finish."""
  n = limit + 1
  shared = np.arange(shared_blocks * block_size, dtype=np.int32)
  rest = context_length - shared.size

  def requests():
    for i in range(n):  # A request's own tokens: its id (chained identity does the rest).
      yield Request(i, 0.0, np.r_[shared, np.full(rest, 2**24 + i, np.int32)], 0)
  layout = KVLayout(1, 1, 1, block_size, "float32")
  kind = DenseKVCache if backend == "dense" else DedupKVCache
  cache = kind.init(layout, num_blocks=num_blocks, max_requests=n,
                    max_seq_len=context_length, host_only=True)
  cfg = ReplayConfig(max_concurrency=n, prefill_tokens_per_s=1e-9)
  stats, _ = traces.replay_requests(cache, requests(), cfg, vocab_size=2)
  return stats.peak_concurrency


def capacity_rows(*, model: str, budgets_gb: Sequence[float], bytes_per_block: int,
                  block_size: int, context_lengths: Sequence[int],
                  shared_fractions: Sequence[float],
                  check_limit: int = 2_000_000) -> list[dict]:
  """The capacity question on a synthetic grid; analytic, checked by replaying it
  through the real caches (`capacity_replayed`).

  Points needing more than `check_limit` block operations to replay are not checked
  (`checked_by_replay` False).
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
          got = (capacity_replayed(nb, length, shared, block_size, "dense", dense),
                 capacity_replayed(nb, length, shared, block_size, "hq", hq))
          if got != (dense, hq):
            raise AssertionError(f"capacity at {budget} GB, L={length}, f={frac}: analytic "
                                 f"{(dense, hq)} but the caches admit {got}")
        rows.append(dict(model=model, block_size=block_size, kv_budget_gb=budget,
                         num_blocks=nb, context_length=length, shared_prefix_fraction=frac,
                         shared_blocks=shared, dense_admitted=dense, hq_admitted=hq,
                         hq_over_dense=hq / dense if dense else "",
                         checked_by_replay=checked))
  return rows


def plot(rows: Sequence[dict], path: str, title: str) -> None:
  """Hit ratio and computed prefill tokens against the budget, per backend."""
  from matplotlib.figure import Figure
  fig = Figure(figsize=(10, 4))
  ax_hit, ax_comp = fig.subplots(1, 2)
  bounded = sorted({r["kv_budget_gb"] for r in rows if r["kv_budget_gb"]})
  hosts = sorted({r.get("host_kv_budget_gb") or 0.0 for r in rows})
  lines = [("dense", 0.0, "s-", "dense")] + [
      ("hq", h, "o-" if not h else "^--", "hq" if not h else f"hq + {h:g} GB host")
      for h in hosts]
  for backend, host, style, label in lines:
    pts = sorted((r["kv_budget_gb"], r) for r in rows
                 if r["backend"] == backend and r["kv_budget_gb"]
                 and (r.get("host_kv_budget_gb") or 0.0) == host)
    if pts:
      xs = [b for b, _ in pts]
      ax_hit.plot(xs, [100 * r["hit_ratio"] for _, r in pts], style, label=label)
      ax_comp.plot(xs, [r["computed_prefill_tokens"] / 1e6 for _, r in pts], style,
                   label=label)
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


REPLAY_BACKENDS = ("hq_unbounded", "dense", "hq")


def check_row(row: dict) -> None:
  """Raises ValueError for a trace_replay.csv row whose numbers contradict each other
  (the report cites only rows a replay can have written)."""
  b = row["backend"]
  if b not in REPLAY_BACKENDS:
    raise ValueError(f"backend {b!r} is not one of {', '.join(REPLAY_BACKENDS)}")
  where = f"{b} row at {row['kv_budget_gb']} GB"
  prompt, hit, computed = row["prompt_tokens"], row["hit_tokens"], row["computed_prefill_tokens"]
  if not 0 <= hit <= prompt:
    raise ValueError(f"{where}: hit_tokens {hit} is not within prompt_tokens {prompt}")
  ratio = hit / prompt if prompt else 0.0
  if not math.isclose(row["hit_ratio"], ratio, rel_tol=1e-9, abs_tol=1e-12):
    raise ValueError(f"{where}: hit_ratio {row['hit_ratio']} is not hit_tokens / prompt_tokens "
                     f"= {ratio}")
  simulated = row["decode_steps"] is None  # --no_model: the block policy alone
  if (computed != prompt - hit) if simulated else not prompt - hit <= computed <= prompt:
    raise ValueError(f"{where}: computed_prefill_tokens {computed} is not prompt_tokens - "
                     f"hit_tokens = {prompt - hit}"
                     + ("" if simulated else " or more (whole chunks), at most the prompt"))
  if b == "dense" and (hit or row["evicted_blocks"]):
    raise ValueError(f"{where}: the dense cache never hits or evicts, yet hit_tokens {hit}, "
                     f"evicted_blocks {row['evicted_blocks']}")
  if (row["kv_budget_gb"] == 0) != (row["num_blocks"] is None) or (
      b == "hq_unbounded" and row["kv_budget_gb"] != 0):
    raise ValueError(f"{where}: num_blocks {row['num_blocks']!r} does not match the budget "
                     "(0 GB is the unbounded pool, which has no block count)")
  dev, host = row["device_hit_tokens"], row["host_hit_tokens"]
  if dev + host != hit or min(dev, host) < 0:
    raise ValueError(f"{where}: device_hit_tokens {dev} + host_hit_tokens {host} is not "
                     f"hit_tokens {hit}")
  moved = (row["bytes_to_host"], row["bytes_to_device"])
  if min(moved) < 0 or min(row["host_blocks"], row["host_hit_requests"]) < 0:
    raise ValueError(f"{where}: a negative host-tier count")
  if not row["host_kv_budget_gb"] and (host or any(moved) or row["host_blocks"]
                                       or row["host_hit_requests"]):
    raise ValueError(f"{where}: no host tier (host_kv_budget_gb 0), yet host_hit_tokens "
                     f"{host}, bytes_to_host / bytes_to_device {moved[0]} / {moved[1]}")
  if b != "hq" and row["host_kv_budget_gb"]:
    raise ValueError(f"{where}: host_kv_budget_gb {row['host_kv_budget_gb']}, but only hq "
                     "rows have a host tier")
  if (host > 0) != (row["host_hit_requests"] > 0) or row["host_hit_requests"] > row["requests"]:
    raise ValueError(f"{where}: host_hit_requests {row['host_hit_requests']} does not fit "
                     f"host_hit_tokens {host} and requests {row['requests']}")
  transfer = row["transfer_s"]
  if simulated and transfer is not None or transfer is not None and not transfer >= 0:
    raise ValueError(f"{where}: transfer_s {transfer!r} (a no-model row moves no bytes: "
                     "empty; a model row: seconds >= 0)")
  if min(row["requests"], row["skipped_requests"], row["skipped_long_context"],
         row["evicted_blocks"],
         row["peak_kv_bytes_used"], row["mean_concurrency"]) < 0 or (
      row["mean_concurrency"] > row["peak_concurrency"] + 1e-9):
    raise ValueError(f"{where}: a negative count, or mean_concurrency "
                     f"{row['mean_concurrency']} above peak_concurrency "
                     f"{row['peak_concurrency']}")


def check_rows(rows: Sequence[dict], config: dict, *, bytes_per_block: int,
               trace_requests: int) -> None:
  """Raises ValueError unless `rows` are what a replay of `config` (its run record's
  config) over `trace_requests` requests writes: the budget plan of `run_budgets` in
  order, the config's model and block size, each pool's block count, every request
  admitted or skipped (fewer only in a partial row), each host tier's block count, bytes
  moved in whole blocks."""
  host_budgets = config.get("host_kv_budget_gb", [0.0])  # (a record from before the tier)
  plan = replay_plan(config["kv_budget_gb"], host_budgets)
  got = [(r["backend"], r["kv_budget_gb"], r["host_kv_budget_gb"]) for r in rows]
  if got != plan:
    raise ValueError(f"the rows' (backend, kv_budget_gb, host_kv_budget_gb) are {got}, not "
                     f"the plan of the run record's --kv_budget_gb {config['kv_budget_gb']} "
                     f"and --host_kv_budget_gb {host_budgets}: {plan}")
  for i, r in enumerate(rows):
    nb = pool_blocks(r["kv_budget_gb"], bytes_per_block)
    nh = host_pool_blocks(r["host_kv_budget_gb"], bytes_per_block)
    moved = (r["bytes_to_host"], r["bytes_to_device"])
    if r["host_blocks"] != nh or any(m % bytes_per_block for m in moved) or (
        r["host_hit_tokens"] > moved[1] // bytes_per_block * r["block_size"]):
      raise ValueError(f"data row {i + 1}: host_blocks {r['host_blocks']} is not {nh}, what "
                       f"{r['host_kv_budget_gb']} GB buys, or bytes moved {moved} are not "
                       "whole blocks covering its host hits (the run record's config)")
    done = r["requests"] + r["skipped_requests"] + r["skipped_long_context"]
    problem = (
        f"model {r['model']!r} is not {config['model']!r}" if r["model"] != config["model"]
        else f"block_size {r['block_size']} is not {config['block_size']}"
        if r["block_size"] != config["block_size"]
        else f"num_blocks {r['num_blocks']} is not {nb}, what {r['kv_budget_gb']} GB buys"
        if r["num_blocks"] != nb
        else f"peak_kv_bytes_used {r['peak_kv_bytes_used']} is not whole blocks within the pool"
        if r["peak_kv_bytes_used"] % bytes_per_block or (
            nb is not None and r["peak_kv_bytes_used"] > nb * bytes_per_block)
        else f"peak_concurrency {r['peak_concurrency']} exceeds --max_concurrency"
        if r["peak_concurrency"] > config["max_concurrency"]
        else f"{done} requests admitted or skipped of the {trace_requests} replayed"
        if done > trace_requests or (done < trace_requests and r["partial"] not in (True, "True"))
        else None)
    if problem:
      raise ValueError(f"data row {i + 1}: {problem} (the run record's config)")
