"""Latency: time to first token with and without prefix reuse, and decode step time.

At each grid point, three prefill modes of the same request:
  dense      the dense cache (no reuse possible);
  hq_cold    a fresh HQ cache (nothing cached: the cost of dedup bookkeeping alone);
  hq_warm    an HQ cache where another request with the same prefix ran first, so
             the prefix's whole chunks are skipped;
and one decode step of all `concurrency` requests on each backend. Every timing is
repeated `repeats` times after `warmup` untimed runs (compilation); fresh caches are
built outside the timed region. Reported: median, min and max.
"""

from __future__ import annotations

import itertools
import statistics
import time
from typing import Iterable

import jax

from hq_jax.config import ModelConfig
from hq_jax.engine import Engine
from hq_jax.harness.memory import make_cache, run_requests
from hq_jax.kv.paged import KVLayout
from hq_jax.workloads import TokenStream, grid_requests, shared_prefix_tokens

COLUMNS = ("mode", "model", "context_length", "concurrency", "shared_prefix_tokens",
           "cached_tokens", "computed_tokens", "repeats", "ttft_ms_median", "ttft_ms_min",
           "ttft_ms_max", "decode_step_ms_median", "decode_step_ms_min", "decode_step_ms_max",
           "platform")


def _summary(values_s):
  ms = [1e3 * v for v in values_s]
  return round(statistics.median(ms), 3), round(min(ms), 3), round(max(ms), 3)


def run_point(engine: Engine, layout: KVLayout, stream: TokenStream, *, model: str,
              context_length: int, concurrency: int, shared_prefix_fraction: float,
              repeats: int, warmup: int, seed: int) -> list[dict]:
  # One extra request: hq_warm's "previous" request shares the prefix, not the suffix.
  reqs = grid_requests(stream, context_length=context_length, concurrency=concurrency + 1,
                       shared_prefix_fraction=shared_prefix_fraction,
                       block_size=layout.block_size, seed=seed)
  warmer, target, batch = reqs[0], reqs[1], reqs[1:]
  p = shared_prefix_tokens(context_length, shared_prefix_fraction, layout.block_size)

  def fresh(backend, n=concurrency + 1):
    return make_cache(backend, layout, concurrency=n, context_length=context_length,
                      max_seq_len=context_length + warmup + repeats + 1)

  rows = []
  for mode in ("dense", "hq_cold", "hq_warm"):
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
      cache, logits = engine.decode(cache, slots, [1] * len(slots))
      logits.block_until_ready()
      if i >= warmup:
        steps.append(time.perf_counter() - t0)
    ttft, dec = _summary(times), _summary(steps)
    rows.append({
        "mode": mode, "model": model, "context_length": context_length,
        "concurrency": concurrency, "shared_prefix_tokens": p,
        "cached_tokens": res.cached_tokens, "computed_tokens": res.computed_tokens,
        "repeats": repeats, "ttft_ms_median": ttft[0], "ttft_ms_min": ttft[1],
        "ttft_ms_max": ttft[2], "decode_step_ms_median": dec[0], "decode_step_ms_min": dec[1],
        "decode_step_ms_max": dec[2], "platform": jax.devices()[0].platform})
  return rows


def sweep(params, cfg: ModelConfig, stream: TokenStream, *, model: str,
          context_lengths: Iterable[int], concurrency: Iterable[int],
          shared_prefix_fractions: Iterable[float], block_size: int = 16, chunk_size: int = 64,
          repeats: int = 5, warmup: int = 1, seed: int = 0, progress=None) -> list[dict]:
  if repeats < 1 or warmup < 0:
    raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
  layout = KVLayout.from_config(cfg, block_size)
  engine = Engine(params, cfg, chunk_size=chunk_size)
  rows = []
  for n, c, f in itertools.product(context_lengths, concurrency, shared_prefix_fractions):
    rows += run_point(engine, layout, stream, model=model, context_length=n, concurrency=c,
                      shared_prefix_fraction=f, repeats=repeats, warmup=warmup, seed=seed)
    if progress is not None:
      progress.update(1)
  return rows
