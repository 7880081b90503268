"""Model-mode trace replay: continuous batching of real requests on a real cache and model.

`ServingBackend.replay` runs a slice of a trace through `Engine` on a `DenseKVCache` or
`DedupKVCache` in (scaled) real time and returns a row with the same columns as
`traces.replay` plus TTFT percentiles and measured prefill throughput.

Scheduling, one iteration of the loop:
  1. requests whose scaled arrival time has passed join a FIFO queue;
  2. the queue head is admitted while a request slot is free (`max_concurrency`) and its
     blocks fit; each admitted request is prefilled at once (cached whole chunks skipped)
     and its first token taken from the prefill's last logits; a head that does not fit
     waits (head of line) for running requests to finish;
  3. one `Engine.decode` step feeds every running request its last token (one batch,
     padded to a power-of-two bucket); a request that has its output tokens is released.
When nothing runs and nothing waits, the replay clock jumps to the next arrival (idle time
is skipped, not slept: it costs no device time and changes no TTFT).

Memory: the dense cache reserves each request's own prompt + output tokens at admission
(`DenseKVCache.admit(reserve_tokens=...)`); HQ allocates as tokens arrive, so a request is
admitted only if the pool can still supply every running request's future blocks (free
or evictable cached ones): a decode step never runs out of blocks.

TTFT of a request = the replay clock when its first token is on the host minus its scaled
arrival: queueing, admission and prefill included. Prefill throughput = computed prefill
tokens / the summed admission + prefill time of the requests.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Sequence

import numpy as np

from hq_jax.study import traces
from hq_jax.study.traces import ReplayConfig, TraceRequest


@dataclasses.dataclass
class _Running:
  req: TraceRequest
  remaining: int  # decode steps still to run
  last_token: int  # fed to the next decode step
  final_len: int  # tokens in the cache when the request is done


def held_blocks(cache) -> int:
  """Blocks held by running requests, each physical block once (as `kv_stats` counts)."""
  return cache.held_blocks


def _evicted(cache) -> int:
  """The cache's cumulative count of evicted blocks (dense never evicts)."""
  return int(getattr(cache, "evicted_blocks", 0))


class ServingBackend:
  """One backend (a cache at a budget) replayed through the model with continuous batching.

  `generated` maps a request's trace index to its greedy tokens after a replay (tests).
  """

  def __init__(self, cache, engine, *, vocab_size: int, seed: int = 0, name: str | None = None):
    self.cache, self.engine, self.vocab_size, self.seed = cache, engine, vocab_size, seed
    self.name = name or cache.backend
    self.block_size = cache.block_size
    self.generated: dict[int, list[int]] = {}

  def fits_ever(self, hold_tokens: int) -> bool:
    return (hold_tokens <= self.cache.max_seq_len
            and -(-hold_tokens // self.block_size) <= self.cache.num_blocks)

  def _blocks_to_come(self, now_len: int, final_len: int) -> int:
    bs = self.block_size
    return -(-final_len // bs) - -(-now_len // bs)

  def _try_admit(self, req: TraceRequest, prompt: np.ndarray, hold: int, future: int):
    """(cache, slot) with `req` admitted, or None if it does not fit now (the cache then
    unchanged and still valid)."""
    from hq_jax.kv.base import PoolFull
    cache = self.cache
    try:
      if cache.backend == "dense":
        return cache.admit(prompt, reserve_tokens=hold)
      # HQ: the pool must still supply the running requests' future blocks and this one's.
      need = future + self._blocks_to_come(req.input_length, max(hold - 1, req.input_length))
      return cache.admit(prompt, keep_free=need)
    except PoolFull:
      return None

  def replay(self, requests: Sequence[TraceRequest], cfg: ReplayConfig, *,
             bytes_per_block: int, progress=None, deadline: float | None = None) -> dict:
    """Replays `requests` (see the module docstring); `deadline` (a `time.perf_counter()`
    value): past it nothing more is admitted, running requests finish, and the row is
    marked partial (requests not admitted are not counted)."""
    engine, clock0 = self.engine, time.perf_counter()
    offset = requests[0].arrival_s * cfg.time_scale if requests else 0.0
    clock = lambda: time.perf_counter() - clock0 + offset
    arrival = lambda r: r.arrival_s * cfg.time_scale
    queue: collections.deque[TraceRequest] = collections.deque()
    running: dict[int, _Running] = {}
    acc = collections.Counter()
    ttfts, prefill_s, partial = [], 0.0, False
    nxt, held, evicted0 = 0, held_blocks(self.cache), _evicted(self.cache)
    t_first = t_last = clock()

    def advance():
      nonlocal t_last
      t = clock()
      acc["block_s"] += held * (t - t_last)
      acc["conc_s"] += len(running) * (t - t_last)
      t_last = t

    def release(slot):
      self.cache = self.cache.release(slot)
      del running[slot]

    while True:
      while nxt < len(requests) and arrival(requests[nxt]) <= clock():
        queue.append(requests[nxt])
        nxt += 1
      if (deadline is not None and (queue or nxt < len(requests))
          and time.perf_counter() >= deadline):
        partial = True  # Stop admitting; what is running finishes.
        queue.clear()
        nxt = len(requests)
      # Admission and prefill, in arrival order.
      while queue and len(running) < cfg.max_concurrency:
        req = queue[0]
        out = cfg.output_tokens(req)
        hold = req.input_length + out
        if not self.fits_ever(hold):
          queue.popleft()
          acc["skipped"] += 1
          if progress is not None:
            progress.update(1)
          continue
        t_admit = time.perf_counter()
        prompt = traces.request_tokens(req, vocab_size=self.vocab_size, seed=self.seed)
        future = sum(self._blocks_to_come(int(self.cache.req_lens[s]), r.final_len)
                     for s, r in running.items())
        admitted = self._try_admit(req, prompt, hold, future)
        acc["admit_s"] += time.perf_counter() - t_admit  # host: tokens, fit check, admission
        if admitted is None:
          break  # Head of line: wait for a release.
        queue.popleft()
        advance()
        cache, slot = admitted
        cache, res = engine.prefill(cache, prompt, logits="last", slot=slot)
        first = int(np.argmax(np.asarray(res.last_logits)))  # waits for the prefill
        t_tok = clock()
        prefill_s += time.perf_counter() - t_admit
        self.cache = cache
        ttfts.append(t_tok - arrival(req))
        acc["wait_s"] += t_tok - arrival(req) - (time.perf_counter() - t_admit)
        acc["requests"] += 1
        acc["prompt"] += req.input_length
        acc["hit"] += res.hit_tokens
        acc["computed"] += res.computed_tokens
        self.generated[req.index] = [first]
        running[slot] = _Running(req, max(out - 1, 0), first,
                                 max(hold - 1, req.input_length))
        acc["peak_conc"] = max(acc["peak_conc"], len(running))
        if not running[slot].remaining:
          release(slot)
        held = held_blocks(self.cache)
        acc["peak_blocks"] = max(acc["peak_blocks"], held)
        if progress is not None:
          progress.update(1)
      if running:  # One decode step for every running request.
        advance()
        slots = list(running)
        self.cache, step = engine.decode(self.cache, slots,
                                         [running[s].last_token for s in slots])
        tokens = np.asarray(step.logits).argmax(-1)  # [B]: one transfer
        acc["decode_steps"] += 1
        held = held_blocks(self.cache)
        acc["peak_blocks"] = max(acc["peak_blocks"], held)
        for s, tok in zip(slots, tokens.tolist()):
          r = running[s]
          self.generated[r.req.index].append(tok)
          r.last_token, r.remaining = tok, r.remaining - 1
          if not r.remaining:
            release(s)
        held = held_blocks(self.cache)
      elif queue:
        raise AssertionError("the queue head fits an empty pool but was not admitted")
      elif nxt < len(requests):
        advance()
        offset += max(0.0, arrival(requests[nxt]) - clock())  # Skip idle time.
        t_last = clock()
      else:
        break
    advance()
    span = t_last - t_first
    n = acc["requests"]
    pct = (lambda q: float(np.percentile(np.asarray(ttfts) * 1000, q))) if ttfts else (
        lambda q: None)
    return dict(
        backend=self.name, requests=n, skipped_requests=acc["skipped"],
        prompt_tokens=acc["prompt"], hit_tokens=acc["hit"],
        hit_ratio=acc["hit"] / acc["prompt"] if acc["prompt"] else 0.0,
        computed_prefill_tokens=acc["computed"],
        evicted_blocks=_evicted(self.cache) - evicted0,
        peak_kv_bytes_used=acc["peak_blocks"] * bytes_per_block,
        mean_kv_bytes_used=(acc["block_s"] / span if span else 0.0) * bytes_per_block,
        mean_concurrency=acc["conc_s"] / span if span else 0.0,
        peak_concurrency=acc["peak_conc"], replay_span_s=span,
        mean_queue_wait_s=acc["wait_s"] / n if n else 0.0,
        decode_steps=acc["decode_steps"], partial=partial,
        prefill_tokens_per_s_measured=acc["computed"] / prefill_s if prefill_s else None,
        host_admit_ms_mean=1000 * acc["admit_s"] / n if n else None,
        ttft_p50_ms=pct(50), ttft_p90_ms=pct(90), ttft_p99_ms=pct(99))


def warm_up(engine, cache, max_concurrency: int):
  """Compiles the prefill chunk and every decode batch size up to `max_concurrency`, so
  TTFTs exclude compilation; returns the cache with the pool back to all free.

  Throwaway one-token requests are admitted without a model, decoded in batches of
  1..max_concurrency (the forward compiles once per power-of-two bucket; the slice of the
  real rows once per size), then released (HQ: and evicted). Their junk K/V stays in the
  pool, which nothing can read.
  """
  steps = max_concurrency + 1  # prefill token + one append per batch size
  reserve = {"reserve_tokens": steps} if cache.backend == "dense" else {}
  per = -(-steps // cache.block_size)
  if max_concurrency > cache.max_requests or max_concurrency * per > cache.num_blocks:
    return cache  # Checked first: a failed step could leave donated (dead) pools behind.
  slots = []
  for _ in range(max_concurrency):
    cache, s = cache.admit(np.zeros(1, np.int32), **reserve)
    cache = cache.commit(s, 0)
    slots.append(s)
  cache, res = engine.prefill(cache, np.zeros(1, np.int32), logits="last", slot=slots[0])
  np.asarray(res.last_logits)
  for b in range(1, max_concurrency + 1):
    cache, step = engine.decode(cache, slots[:b], [0] * b)
    np.asarray(step.logits)
  for s in slots:
    cache = cache.release(s)
  return cache.evict() if cache.backend == "hq" else cache


def make_factory(layout, requests: Sequence[TraceRequest], cfg: ReplayConfig, *,
                 vocab_size: int, seed: int, engine, warm: bool = True):
  """Backends for model mode: a real cache per (name, budget) through `engine`.

  The unbounded HQ row (the upper bound on hits) is the simulator's: a pool holding the
  whole slice would not fit on one GPU, and its hits do not depend on timing. Budget 0
  for dense gets a pool for the whole slice.
  """
  from hq_jax.kv.dedup import DedupKVCache
  from hq_jax.kv.dense import DenseKVCache
  max_hold = max(r.input_length + cfg.output_tokens(r) for r in requests)
  max_hold = max(max_hold, cfg.max_concurrency + 1)  # the warm-up's requests
  everything = sum(layout.blocks_for(r.input_length + cfg.output_tokens(r)) for r in requests)
  everything = max(everything, cfg.max_concurrency * layout.blocks_for(cfg.max_concurrency + 1))

  def make(name, num_blocks):
    if name == "hq_unbounded":
      return traces.HQSimulator(None, layout.block_size, name=name)
    kind = DenseKVCache if name == "dense" else DedupKVCache
    cache = kind.init(layout, num_blocks=num_blocks or everything,
                      max_requests=cfg.max_concurrency, max_seq_len=max_hold)
    if warm:
      cache = warm_up(engine, cache, cfg.max_concurrency)
    return ServingBackend(cache, engine, vocab_size=vocab_size, seed=seed, name=name)
  return make
