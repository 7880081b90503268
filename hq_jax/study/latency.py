"""Latency: time to first token with and without prefix reuse, and decode step time.

At each grid point, three prefill modes of the same request:
  dense      the dense cache (no reuse possible);
  hq_cold    a fresh HQ cache (nothing cached: the cost of dedup bookkeeping alone);
  hq_warm    an HQ cache where another request with the same prefix ran first, so
             the prefix's cached blocks are skipped (prefill starts at the first
             uncached block);
and one decode step of all `concurrency` requests on each backend. Every timing is
repeated `repeats` times after `warmup` untimed runs (compilation); fresh caches are
built outside the timed region. Reported: median, min and max.
"""

from __future__ import annotations

import statistics
import time
from typing import Iterable

import jax

from hq_jax.config import ModelConfig
from hq_jax.serve.engine import DECODE_ROWS, Engine
from hq_jax.study.errors import HarnessError, check_context_limit
from hq_jax.study.memory import check_grid, make_cache, point_requests, run_requests
from hq_jax.study.requests import TokenStream, shared_prefix_tokens
from hq_jax.kv.paged import KVLayout

MODES = ("dense", "hq_cold", "hq_warm")
COLUMNS = ("mode", "model", "mesh", "context_length", "concurrency", "shared_prefix_tokens",
           "cached_tokens", "computed_tokens", "repeats", "ttft_ms_median", "ttft_ms_min",
           "ttft_ms_max", "decode_step_ms_median", "decode_step_ms_min", "decode_step_ms_max",
           "platform", "attention", "decode_attention", "kv_dtype", "decode_rows", "invariance")


def check_row(row: dict) -> None:
  """Raises HarnessError for a latency row that cannot be a measurement: a range that does
  not hold its median, or cached + computed tokens that are not the request."""
  if row["mode"] not in MODES:
    raise HarnessError(f"mode {row['mode']!r} is not one of {', '.join(MODES)}")
  where = f"{row['mode']} row context_length={row['context_length']}"
  if row["mode"] != "hq_warm" and row["cached_tokens"]:
    raise HarnessError(f"{where}: {row['cached_tokens']} cached tokens on a fresh cache")
  if not 0 <= row["cached_tokens"] <= row["shared_prefix_tokens"] <= row["context_length"]:
    raise HarnessError(f"{where}: cached_tokens {row['cached_tokens']} exceeds the shared "
                       f"prefix ({row['shared_prefix_tokens']} of {row['context_length']})")
  for what in ("ttft_ms", "decode_step_ms"):
    lo, mid, hi = row[f"{what}_min"], row[f"{what}_median"], row[f"{what}_max"]
    if not 0 <= lo <= mid <= hi:
      raise HarnessError(f"{where}: {what}_min/median/max {lo}/{mid}/{hi} are not ordered")
  if row["cached_tokens"] + row["computed_tokens"] != row["context_length"]:
    raise HarnessError(f"{where}: cached_tokens {row['cached_tokens']} + computed_tokens "
                       f"{row['computed_tokens']} != context_length {row['context_length']}")


def check_rows(rows, config: dict) -> None:
  """Raises HarnessError unless `rows` are exactly what a run of `config` (its run record's
  config) makes: the three modes at every grid point, with its model and repeats."""
  want = sorted((n, c, shared_prefix_tokens(n, f, config["block_size"]), m)
                for n in config["context_lengths"] for c in config["concurrency"]
                for f in config["shared_prefix_fractions"] for m in MODES)
  got = sorted((r["context_length"], r["concurrency"], r["shared_prefix_tokens"], r["mode"])
               for r in rows)
  if got != want:
    raise HarnessError(f"the rows' (context_length, concurrency, shared_prefix_tokens, mode) "
                       f"are {got}, not the grid of the run record's config {want}")
  for i, r in enumerate(rows):
    if (r["model"], r["repeats"]) != (config["model"], config["repeats"]):
      raise HarnessError(f"data row {i + 1}: model {r['model']!r}, repeats {r['repeats']}; the "
                         f"run record's config says {config['model']!r}, {config['repeats']}")


def _summary(values_s):
  ms = [1e3 * v for v in values_s]
  return round(statistics.median(ms), 3), round(min(ms), 3), round(max(ms), 3)


def run_point(engine: Engine, layout: KVLayout, stream: TokenStream, *, model: str,
              context_length: int, concurrency: int, shared_prefix_fraction: float,
              repeats: int, warmup: int, seed: int) -> list[dict]:
  # One extra request: hq_warm's "previous" request shares the prefix, not the suffix.
  reqs = point_requests(stream, context_length=context_length, concurrency=concurrency + 1,
                        shared_prefix_fraction=shared_prefix_fraction, num_prefixes=1,
                        block_size=layout.block_size, seed=seed)
  warmer, target, batch = reqs[0], reqs[1], reqs[1:]
  p = shared_prefix_tokens(context_length, shared_prefix_fraction, layout.block_size)

  def fresh(backend, n=concurrency + 1):
    return make_cache(backend, layout, concurrency=n, context_length=context_length,
                      max_seq_len=context_length + warmup + repeats + 1, mesh=engine.mesh)

  rows = []
  for mode in MODES:
    backend = "dense" if mode == "dense" else "hq"
    times, res = [], None
    for i in range(warmup + repeats):
      cache = fresh(backend)
      if mode == "hq_warm":
        cache, _ = engine.prefill(cache, warmer.tokens, logits="last")
      cache, res = engine.prefill(cache, target.tokens, logits="last")
      if i >= warmup:
        times.append(res.ttft_s)
    # Decode: all `concurrency` requests active, one token each per step.
    cache, results = run_requests(engine, fresh(backend), batch)
    slots = [r.slot for r in results]
    steps = []
    for i in range(warmup + repeats):
      t0 = time.perf_counter()
      cache, out = engine.decode(cache, slots, [1] * len(slots))
      out.logits.block_until_ready()
      used = out.attention
      if i >= warmup:
        steps.append(time.perf_counter() - t0)
    ttft, dec = _summary(times), _summary(steps)
    rows.append({
        "mode": mode, "model": model, "mesh": engine.mesh_label,
        "context_length": context_length,
        "concurrency": concurrency, "shared_prefix_tokens": p,
        "cached_tokens": res.cached_tokens, "computed_tokens": res.computed_tokens,
        "repeats": repeats, "ttft_ms_median": ttft[0], "ttft_ms_min": ttft[1],
        "ttft_ms_max": ttft[2], "decode_step_ms_median": dec[0], "decode_step_ms_min": dec[1],
        "decode_step_ms_max": dec[2], "platform": jax.devices()[0].platform,
        "attention": engine.attention_label, "decode_attention": used or engine.decode_attention,
        "kv_dtype": layout.dtype, "decode_rows": engine.decode_rows,
        "invariance": engine.invariance})
    check_row(rows[-1])
  return rows


def check_sweep(cfg: ModelConfig, stream: TokenStream, *, context_lengths: Iterable[int],
                concurrency: Iterable[int], shared_prefix_fractions: Iterable[float],
                block_size: int = 16, repeats: int = 5, warmup: int = 1, seed: int = 0,
                allow_long_context: bool = False) -> list[tuple]:
  """Every check `sweep` makes before any compute; returns the grid points. A script calls
  it before opening its run, so a bad input leaves nothing in the output directory."""
  if repeats < 1:
    raise ValueError(f"--repeats must be >= 1, got {repeats}")
  if warmup < 0:
    raise ValueError(f"--warmup must be >= 0, got {warmup}")
  points = [(n, c, f) for n, c, f, _ in check_grid(
      context_lengths=context_lengths, concurrency=concurrency,
      shared_prefix_fractions=shared_prefix_fractions)]
  # Decode appends warmup + repeats tokens after the prompt.
  check_context_limit(cfg, max(n for n, _, _ in points) + warmup + repeats + 1,
                      "--context_lengths", allow_long_context)
  for n, c, f in points:
    point_requests(stream, context_length=n, concurrency=c + 1, shared_prefix_fraction=f,
                   num_prefixes=1, block_size=block_size, seed=seed)
  return points


def sweep(params, cfg: ModelConfig, stream: TokenStream, *, model: str,
          context_lengths: Iterable[int], concurrency: Iterable[int],
          shared_prefix_fractions: Iterable[float], block_size: int = 16, chunk_size: int = 64,
          repeats: int = 5, warmup: int = 1, seed: int = 0, attention: str = "auto",
          decode_attention: str = "paged", allow_long_context: bool = False,
          progress=None, kv_dtype: str | None = None,
          decode_rows: int = DECODE_ROWS, mesh=None) -> list[dict]:
  """Every grid point; all flags, the context limit and the requests are checked first.
  `decode_rows`: `Engine(decode_rows=)` (0: the bucketed opt-out); `mesh`: `Engine(mesh=)`
  (one data row: tensor parallel); each row records both."""
  points = check_sweep(cfg, stream, context_lengths=context_lengths, concurrency=concurrency,
                       shared_prefix_fractions=shared_prefix_fractions,
                       block_size=block_size, repeats=repeats, warmup=warmup, seed=seed,
                       allow_long_context=allow_long_context)
  layout = KVLayout.from_config(cfg, block_size, kv_dtype)
  engine = Engine(params, cfg, chunk_size=chunk_size, attention=attention,
                  decode_attention=decode_attention, allow_long_context=allow_long_context,
                  kv_dtype=layout.dtype, decode_rows=decode_rows, mesh=mesh)
  rows = []
  for n, c, f in points:
    rows += run_point(engine, layout, stream, model=model, context_length=n, concurrency=c,
                      shared_prefix_fraction=f, repeats=repeats, warmup=warmup, seed=seed)
    if progress is not None:
      progress.update(1)
  return rows
