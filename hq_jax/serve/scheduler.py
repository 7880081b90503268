"""Continuous batching: a FIFO queue of requests admitted into a paged cache.

One admission policy, used by the model's serving loop (`serve`, below) and by the
no-model trace replay (`hq_jax.study.traces.replay`, which runs the same `Scheduler` on
a time model instead of a model):

  * requests join the queue at their arrival time, in arrival order;
  * the queue head is admitted while a request slot is free (`max_concurrency`) and the
    cache can take it; when the cache refuses it (`PoolFull`) everything waits (head of
    line) for running requests to finish and release their blocks;
  * a request that could never run is skipped and counted: longer than the model's
    context (`max_context`, unless None), than the cache's `max_seq_len`, or needing more
    blocks than the whole pool.

`ServingStats` is the one accumulator of what happened (admissions, hits, computed
tokens, blocks held over time, queueing, TTFT); both loops fill it through the
scheduler and read their result row from `ServingStats.row`.

This module is the serving layer: it knows requests, caches and the engine, never the
study code that builds requests from traces.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import time
from typing import Callable, Iterable, Iterator

import numpy as np

from hq_jax.kv import tiers
from hq_jax.kv.base import PoolFull


@dataclasses.dataclass(frozen=True)
class Request:
  """A request as the scheduler sees it."""

  id: int  # unique; ties in finish order are broken by it
  arrival_s: float  # on the scheduler's clock
  prompt: np.ndarray  # [prompt_tokens] int32 token ids
  output_tokens: int  # tokens to generate
  salt: int = 0  # tenant id: part of block identity in the HQ cache

  @property
  def prompt_tokens(self) -> int:
    return int(self.prompt.size)

  @property
  def hold_tokens(self) -> int:
    """Tokens the request holds when it is done: prompt + output."""
    return int(self.prompt.size) + self.output_tokens


@dataclasses.dataclass(frozen=True)
class Admitted:
  """What admitting a request did (an admission function's result)."""

  slot: int
  hit_tokens: int  # prompt tokens found cached
  computed_tokens: int  # prompt tokens run (or, without a model, to be run) through the model
  first_token: int | None = None  # the prefill's greedy token (with a model)


def _arrived(stream, t: float):
  """The requests of `stream` (a `Scheduler` or `DataParallel`: `_next`, `_arrivals`,
  `_last_arrival`) that have arrived by `t`, taken from it in order; one arriving before
  the one before it is a ValueError."""
  while stream._next is not None and stream._next.arrival_s <= t:
    req = stream._next
    if req.arrival_s < stream._last_arrival:
      raise ValueError(f"request {req.id} arrives at {req.arrival_s} s, before the one "
                       f"before it ({stream._last_arrival} s): requests must come in "
                       "arrival order")
    stream._last_arrival = req.arrival_s
    stream._next = next(stream._arrivals, None)
    yield req


@dataclasses.dataclass
class ServingStats:
  """The accumulator of one replay or serving run (both loops fill it the same way)."""

  requests: int = 0  # admitted
  skipped: int = 0  # could never fit the cache (max_seq_len, or the whole pool)
  skipped_long_context: int = 0  # longer than the model's context (max_context)
  prompt_tokens: int = 0
  hit_tokens: int = 0
  computed_tokens: int = 0
  peak_blocks: int = 0
  peak_concurrency: int = 0
  block_s: float = 0.0  # integral of held blocks over time
  concurrency_s: float = 0.0  # integral of running requests over time
  wait_s: float = 0.0  # summed time from arrival to admission
  t_first: float | None = None
  t_last: float | None = None
  evicted_blocks: int = 0
  # The HQ cache's host tier (0 without one): hit_tokens = device + host hit tokens.
  host_hit_tokens: int = 0
  host_hit_requests: int = 0  # admitted requests with a host hit
  blocks_to_host: int = 0  # moved device -> host (planned, without a model)
  blocks_to_device: int = 0
  # Model only (None / empty without one):
  decode_steps: int | None = None
  ttft_s: list[float] = dataclasses.field(default_factory=list)
  admit_s: float = 0.0  # host time of admissions (token synthesis, fit check, cache admit)
  prefill_s: float = 0.0  # admission + prefill time of the admitted requests
  transfer_s: float | None = None  # wall time of the copies between tiers (synced)
  partial: bool = False  # stopped admitting at a deadline

  @property
  def span_s(self) -> float:
    if self.t_last is None or self.t_last <= self.t_first:
      return 0.0
    return self.t_last - self.t_first

  def row(self, *, bytes_per_block: int) -> dict:
    """The result columns (the trace replay's CSV columns, less the run's own)."""
    n, span, prompt = self.requests, self.span_s, self.prompt_tokens
    timed = bool(self.ttft_s)
    pct = lambda q: float(np.percentile(np.asarray(self.ttft_s) * 1000, q)) if timed else None
    return dict(
        requests=n, skipped_requests=self.skipped,
        skipped_long_context=self.skipped_long_context, prompt_tokens=prompt,
        hit_tokens=self.hit_tokens, hit_ratio=self.hit_tokens / prompt if prompt else 0.0,
        computed_prefill_tokens=self.computed_tokens, evicted_blocks=self.evicted_blocks,
        device_hit_tokens=self.hit_tokens - self.host_hit_tokens,
        host_hit_tokens=self.host_hit_tokens, host_hit_requests=self.host_hit_requests,
        bytes_to_host=self.blocks_to_host * bytes_per_block,
        bytes_to_device=self.blocks_to_device * bytes_per_block,
        transfer_s=self.transfer_s,
        peak_kv_bytes_used=self.peak_blocks * bytes_per_block,
        mean_kv_bytes_used=(self.block_s / span if span else 0.0) * bytes_per_block,
        mean_concurrency=self.concurrency_s / span if span else 0.0,
        peak_concurrency=self.peak_concurrency, replay_span_s=span,
        mean_queue_wait_s=self.wait_s / n if n else 0.0,
        decode_steps=self.decode_steps, partial=self.partial,
        prefill_tokens_per_s_measured=(self.computed_tokens / self.prefill_s
                                       if timed and self.prefill_s else None),
        host_admit_ms_mean=1000 * self.admit_s / n if timed and n else None,
        ttft_p50_ms=pct(50), ttft_p90_ms=pct(90), ttft_p99_ms=pct(99))


AdmitFn = Callable[[object, Request], tuple[object, Admitted]]



# The fields a sum over data shards adds up (every count, integral and host time, a new
# counter included); these combine otherwise: the shared clock, the peaks (of the sums, kept
# by `DataParallel`), the None-able model counters and the TTFT list.
_SUMMED = tuple(f.name for f in dataclasses.fields(ServingStats) if f.name not in {
    "t_first", "t_last", "peak_blocks", "peak_concurrency", "decode_steps", "ttft_s",
    "transfer_s", "partial"})

class Scheduler:
  """The queue, the running set and the cache of one run (see the module docstring).

  The scheduler owns `cache` (every cache operation consumes its argument): a loop reads
  `scheduler.cache`, runs a step on it and stores the result back. `running` maps a slot
  to the running request and the loop's own state for it.
  """

  def __init__(self, cache, requests: Iterable[Request], *, max_concurrency: int,
               max_context: int | None = None, progress=None):
    if max_concurrency < 1:
      raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
    self.cache = cache
    self.max_concurrency, self.max_context = max_concurrency, max_context
    self.progress = progress
    self.queue: collections.deque[Request] = collections.deque()
    self.running: dict[int, object] = {}
    self.stats = ServingStats()
    self._arrivals: Iterator[Request] = iter(requests)
    self._next: Request | None = next(self._arrivals, None)
    self._last_arrival = -math.inf
    self._counted0 = self._counters(cache)
    self._held = cache.held_blocks
    # Blocks the refused head needs (PoolFull's need + keep_free), while only releases
    # have happened since: they change neither its hits nor its need, so it is tried
    # again only once that many blocks are unheld (a necessary condition; a refusal
    # changes nothing). 0: try. A model step (new registered blocks) forgets it.
    self._refused_need = 0

  # The caches' cumulative counters the stats take their deltas of (the dense cache has
  # none: it never evicts, and has no host tier).
  _COUNTERS = ("evicted_blocks", "host_hit_tokens", "blocks_to_host", "blocks_to_device")

  @classmethod
  def _counters(cls, cache) -> tuple[int, ...]:
    return tuple(int(getattr(cache, name, 0)) for name in cls._COUNTERS)

  # ------------------------------------------------------------------ clock
  @property
  def next_arrival(self) -> float:
    """Arrival time of the next request not yet queued (inf when none is left)."""
    return self._next.arrival_s if self._next is not None else math.inf

  @property
  def done(self) -> bool:
    return self._next is None and not self.queue and not self.running

  def advance(self, t: float) -> None:
    """Moves the clock to `t`: blocks held and requests running are integrated."""
    st = self.stats
    if st.t_last is None:
      st.t_first = t
    else:
      dt = t - st.t_last
      st.block_s += self._held * dt
      st.concurrency_s += len(self.running) * dt
    st.t_last = t

  def enqueue_until(self, t: float) -> None:
    """Queues every request that has arrived by `t`."""
    self.queue.extend(_arrived(self, t))

  def stop_admitting(self) -> None:
    """Drops the queue and what has not arrived (a deadline): running requests finish."""
    self.queue.clear()
    self._next = None
    self.stats.partial = True

  # -------------------------------------------------------------- admission
  def never_fits(self, req: Request) -> str | None:
    """Why `req` can never run ("long_context", "cache"), or None."""
    if self.max_context is not None and req.hold_tokens > self.max_context:
      return "long_context"
    cache = self.cache
    if (req.hold_tokens > cache.max_seq_len
        or -(-req.hold_tokens // cache.block_size) > cache.num_blocks):
      return "cache"
    return None

  def admit_waiting(self, now: Callable[[], float],
                    admit: AdmitFn) -> Iterator[tuple[Request, Admitted]]:
    """Admits the queue head while a slot is free and `admit` does not raise `PoolFull`.

    `admit(cache, request) -> (cache, Admitted)` does the admission itself (it may also
    prefill); it must leave the cache unchanged when it raises. `now()` is the clock when
    an admission starts (its queue wait ends). Yields each admitted request for the loop
    to register in `running` (before the next one is tried, so that an admission function
    sees every running request).
    """
    st = self.stats
    while self.queue and len(self.running) < self.max_concurrency:
      if self._refused_need > self.cache.num_blocks - self.cache.held_blocks:
        return
      req = self.queue[0]
      t = now()
      why = self.never_fits(req)
      if why is not None:
        self.queue.popleft()
        if why == "long_context":
          st.skipped_long_context += 1
        else:
          st.skipped += 1
        self._tick()
        continue
      host_hits = int(getattr(self.cache, "host_hit_tokens", 0))
      try:
        self.cache, adm = admit(self.cache, req)
      except PoolFull as e:
        self._refused_need = e.need + e.keep_free
        return  # Head of line: wait for a release.
      self._refused_need = 0
      self.queue.popleft()
      st.requests += 1
      st.prompt_tokens += req.prompt_tokens
      st.hit_tokens += adm.hit_tokens
      st.computed_tokens += adm.computed_tokens
      st.host_hit_requests += int(getattr(self.cache, "host_hit_tokens", 0)) > host_hits
      st.wait_s += t - req.arrival_s
      yield req, adm
      st.peak_concurrency = max(st.peak_concurrency, len(self.running))
      self.blocks_changed()
      self._tick()

  def release(self, slot: int) -> None:
    self.cache = self.cache.release(slot)
    del self.running[slot]

  def blocks_changed(self) -> None:
    """Reads the cache's held blocks after a change (for the time integral and the peak)."""
    self._held = self.cache.held_blocks
    self.stats.peak_blocks = max(self.stats.peak_blocks, self._held)
    st = self.stats
    (st.evicted_blocks, st.host_hit_tokens, st.blocks_to_host, st.blocks_to_device) = (
        a - b for a, b in zip(self._counters(self.cache), self._counted0))

  def forget_refusal(self) -> None:
    """The cache changed other than by releases: a refused head is tried again."""
    self._refused_need = 0

  def _tick(self) -> None:
    if self.progress is not None:
      self.progress.update(1)


# ------------------------------------------------------------------ data parallel
@dataclasses.dataclass(frozen=True)
class Route:
  """Where the router sent a request, and why."""

  shard: int
  prefix_tokens: int  # tokens of its prompt that shard held cached at arrival
  by_prefix: bool  # True: the longest cached prefix decided; False: the least-loaded fallback


class DataParallel:
  """One `Scheduler` per data shard (each its own cache: pool and slots, so HQ shares blocks
  within a shard only), fed by one arrival stream that a cache-aware router splits.

  Routing (at arrival, as Dynamo and llm-d route from their KV events): the shard whose
  cache holds the longest cached prefix of the prompt (`cached_prefix_tokens`); where no
  shard holds any, or several hold the longest, the least loaded of them (fewest running
  plus queued requests, then fewest held blocks, then the lowest index). Each shard then
  admits its own queue FIFO, head of line, as one `Scheduler`. The clock is shared: every
  shard is advanced to each event. With one shard this is exactly `Scheduler`.
  """

  def __init__(self, caches, requests: Iterable[Request], *, max_concurrency,
               max_context: int | None = None, progress=None):
    """max_concurrency: each shard's slots (an int for all, or one per shard)."""
    if not caches:
      raise ValueError("DataParallel needs at least one cache")
    slots = ([max_concurrency] * len(caches) if isinstance(max_concurrency, int)
             else list(max_concurrency))
    if len(slots) != len(caches):
      raise ValueError(f"{len(slots)} max_concurrency values for {len(caches)} caches")
    self.shards = [Scheduler(c, (), max_concurrency=n, max_context=max_context,
                             progress=progress) for c, n in zip(caches, slots)]
    self._arrivals: Iterator[Request] = iter(requests)
    self._next: Request | None = next(self._arrivals, None)
    self._last_arrival = -math.inf
    self.routes: dict[int, Route] = {}  # request id -> its route
    self.peak_blocks = 0  # of the sum over shards at one time
    self.peak_concurrency = 0

  @property
  def next_arrival(self) -> float:
    return self._next.arrival_s if self._next is not None else math.inf

  @property
  def done(self) -> bool:
    return self._next is None and all(s.done for s in self.shards)

  def advance(self, t: float) -> None:
    for s in self.shards:
      s.advance(t)

  def route(self, req: Request) -> Route:
    """The shard `req` goes to (see the class docstring); changes nothing."""
    if len(self.shards) == 1:  # nothing to choose: no lookup
      return Route(0, 0, False)
    prefix = [s.cache.cached_prefix_tokens(req.prompt, req.salt) for s in self.shards]
    best = max(prefix)
    load = lambda i: (len(self.shards[i].running) + len(self.shards[i].queue),
                      self.shards[i].cache.held_blocks, i)
    shard = min((i for i, p in enumerate(prefix) if p == best), key=load)
    return Route(shard, best, best > 0 and prefix.count(best) < len(prefix))

  def enqueue_until(self, t: float) -> None:
    """Routes every request that has arrived by `t` to its shard's queue."""
    for req in _arrived(self, t):
      route = self.routes[req.id] = self.route(req)
      self.shards[route.shard].queue.append(req)

  def stop_admitting(self) -> None:
    """Drops every queue and what has not arrived (a deadline): running requests finish."""
    self._next = None
    for s in self.shards:
      s.stop_admitting()

  def observe(self) -> None:
    """Reads the global peaks after a change (blocks and requests summed over shards)."""
    self.peak_blocks = max(self.peak_blocks, sum(s._held for s in self.shards))
    self.peak_concurrency = max(self.peak_concurrency,
                                sum(len(s.running) for s in self.shards))

  @property
  def stats(self) -> ServingStats:
    """The global accumulator: every count summed over shards, the peaks of the sums."""
    out = ServingStats()
    for field in _SUMMED:
      setattr(out, field, sum(getattr(s.stats, field) for s in self.shards))
    moved = [s.stats.transfer_s for s in self.shards]
    out.transfer_s = None if None in moved else sum(moved)
    first = self.shards[0].stats
    out.t_first, out.t_last = first.t_first, first.t_last
    out.peak_blocks, out.peak_concurrency = self.peak_blocks, self.peak_concurrency
    out.partial = any(s.stats.partial for s in self.shards)
    out.ttft_s = [t for s in self.shards for t in s.stats.ttft_s]
    steps = [s.stats.decode_steps for s in self.shards]
    out.decode_steps = None if None in steps else sum(steps)
    return out


def admit_prompt(cache, prompt: np.ndarray, salt: int, *, hold_tokens: int,
                 keep_free: int = 0):
  """Admits a prompt whose request will hold `hold_tokens` in all: the dense cache
  reserves them now; HQ allocates the prompt's blocks and must keep `keep_free` more
  allocatable (`PoolFull` otherwise). Returns (cache, slot)."""
  if cache.backend == "dense":
    return cache.admit(prompt, salt, reserve_tokens=hold_tokens)
  return cache.admit(prompt, salt, keep_free=keep_free)


def blocks_to_come(now_tokens: int, final_tokens: int, block_size: int) -> int:
  """New blocks a request needs to grow from `now_tokens` to `final_tokens`."""
  return -(-final_tokens // block_size) - -(-now_tokens // block_size)


# ------------------------------------------------------------------ the model's loop
@dataclasses.dataclass
class _Running:
  req: Request
  remaining: int  # decode steps still to run
  last_token: int  # fed to the next decode step
  final_len: int  # tokens in the cache when the request is done


def serve(engine, scheduler: Scheduler, *, deadline: float | None = None,
          generated: dict[int, list[int]] | None = None) -> ServingStats:
  """Serves the scheduler's requests through `engine` in (scaled) real time.

  One iteration: requests that have arrived join the queue; the queue head is admitted
  while it fits, each admitted request prefilled at once (from its first uncached block)
  and its first token taken from the prefill's last logits; then one `Engine.decode`
  step feeds every running request its last token, and a request that has its output
  tokens is released. When nothing runs and nothing waits the clock jumps to the next
  arrival (idle time is skipped, not slept: it costs no device time and changes no TTFT).

  Memory: the dense cache reserves a request's prompt + output at admission; HQ
  allocates as tokens arrive, so a request is admitted only if the pool can still supply
  every running request's future blocks (free or evictable cached ones): a decode step
  never runs out of blocks.

  TTFT = the clock when the first token is on the host minus the arrival: queueing,
  admission and prefill included. `deadline` (a `time.perf_counter()` value): past it
  nothing more is admitted, running requests finish, and the stats are marked partial.
  `generated` (if given) receives each request's greedy tokens by id.
  """
  _serve([engine], _OneShard(scheduler), deadline=deadline, generated=generated)
  return scheduler.stats


def serve_data_parallel(engines, dp: DataParallel, *, deadline: float | None = None,
                        generated: dict[int, list[int]] | None = None) -> ServingStats:
  """`serve` over data shards: `engines[d]` runs `dp.shards[d]` (its own cache; e.g. one
  Engine per `hq_jax.mesh.data_shards` row). Requests are routed at arrival (`DataParallel`),
  each iteration admits every shard's queue and then dispatches one decode step per shard
  with running requests before reading any of their tokens, so the shards' devices work at
  once. Returns the global stats (`dp.stats`); each shard's are `dp.shards[d].stats`."""
  if len(engines) != len(dp.shards):
    raise ValueError(f"{len(engines)} engines for {len(dp.shards)} data shards")
  _serve(list(engines), dp, deadline=deadline, generated=generated)
  return dp.stats


class _OneShard:
  """One `Scheduler` as `_serve` drives shards (`DataParallel`'s interface)."""

  def __init__(self, sched: Scheduler):
    self.shards = [sched]
    self.enqueue_until, self.stop_admitting = sched.enqueue_until, sched.stop_admitting

  @property
  def next_arrival(self) -> float:
    return self.shards[0].next_arrival

  def observe(self) -> None:
    pass


def _serve(engines, dp, *, deadline, generated) -> None:
  """The serving loop of `serve` and `serve_data_parallel` (one shard: `serve` exactly)."""
  shards = dp.shards
  for sched in shards:
    sched.stats.decode_steps = 0
  transfer0 = [getattr(e, "transfer_s", 0.0) for e in engines]  # tier copies (host tier)
  clock0, offset = time.perf_counter(), dp.next_arrival
  offset = 0.0 if math.isinf(offset) else offset
  clock = lambda: time.perf_counter() - clock0 + offset
  generated = {} if generated is None else generated

  def admit_fn(engine, sched):
    bs = sched.cache.block_size
    st = sched.stats

    def admit(cache, req: Request) -> tuple[object, Admitted]:
      t0 = time.perf_counter()
      try:
        future = sum(blocks_to_come(int(cache.req_lens[s]), r.final_len, bs)
                     for s, r in sched.running.items())
        final = max(req.hold_tokens - 1, req.prompt_tokens)  # the last token is never fed
        cache, slot = admit_prompt(
            cache, req.prompt, req.salt, hold_tokens=req.hold_tokens,
            keep_free=future + blocks_to_come(req.prompt_tokens, final, bs))
      finally:
        st.admit_s += time.perf_counter() - t0
      cache, res = engine.prefill(cache, req.prompt, salt=req.salt, logits="last", slot=slot)
      first = int(np.argmax(np.asarray(res.last_logits)))  # waits for the prefill
      st.prefill_s += time.perf_counter() - t0
      st.ttft_s.append(clock() - req.arrival_s)
      generated[req.id] = [first]
      return cache, Admitted(slot, res.hit_tokens, res.computed_tokens, first)
    return admit

  admits = [admit_fn(e, s) for e, s in zip(engines, shards)]
  for sched in shards:
    sched.advance(clock())
  while True:
    dp.enqueue_until(clock())
    if (deadline is not None and (any(s.queue for s in shards)
                                  or not math.isinf(dp.next_arrival))
        and time.perf_counter() >= deadline):
      dp.stop_admitting()
    for sched, admit in zip(shards, admits):
      for req, adm in sched.admit_waiting(clock, admit):
        sched.advance(clock())
        run = _Running(req, max(req.output_tokens - 1, 0), adm.first_token,
                       max(req.hold_tokens - 1, req.prompt_tokens))
        sched.running[adm.slot] = run
        if not run.remaining:
          sched.release(adm.slot)
    busy = [(sched, engine) for sched, engine in zip(shards, engines) if sched.running]
    if busy:  # One decode step for every running request of every shard.
      steps = []
      for sched, engine in busy:  # dispatched on every shard before any token is read
        sched.advance(clock())
        slots = list(sched.running)
        sched.cache, step = engine.decode(sched.cache, slots,
                                          [sched.running[s].last_token for s in slots])
        steps.append((sched, slots, step))
      for sched, slots, step in steps:
        tokens = np.asarray(step.logits).argmax(-1)  # [B]: one transfer
        sched.stats.decode_steps += 1
        sched.forget_refusal()  # the step registered blocks: the head may hit more now
        sched.blocks_changed()
        for s, tok in zip(slots, tokens.tolist()):
          r = sched.running[s]
          generated[r.req.id].append(tok)
          r.last_token, r.remaining = tok, r.remaining - 1
          if not r.remaining:
            sched.release(s)
        sched.blocks_changed()
      dp.observe()
    elif any(s.queue for s in shards):
      raise AssertionError("the queue head fits an empty pool but was not admitted")
    elif not math.isinf(dp.next_arrival):
      for sched in shards:
        sched.advance(clock())
      offset += max(0.0, dp.next_arrival - clock())  # Skip idle time.
      for sched in shards:
        sched.stats.t_last = clock()
    else:
      break
  for sched, engine, t0 in zip(shards, engines, transfer0):
    sched.advance(clock())
    sched.stats.transfer_s = getattr(engine, "transfer_s", 0.0) - t0


def warm_up(engine, cache, max_concurrency: int):
  """Compiles the prefill chunk and every decode batch size up to `max_concurrency`, so
  TTFTs exclude compilation; returns the cache with the pool back to all free.

  Throwaway one-token requests are admitted without a model, decoded in batches of
  1..max_concurrency (the forward compiles once per power-of-two bucket; the slice of the
  real rows once per size), then released (HQ: and evicted). Their junk K/V stays in the
  pool, which nothing can read.
  """
  steps = max_concurrency + 1  # prefill token + one append per batch size
  per = -(-steps // cache.block_size)
  if max_concurrency > cache.max_requests or max_concurrency * per > cache.num_blocks:
    return cache  # Checked first: a failed step could leave donated (dead) pools behind.
  slots = []
  for _ in range(max_concurrency):
    cache, s = admit_prompt(cache, np.zeros(1, np.int32), 0, hold_tokens=steps)
    cache = cache.commit(s, 0)
    slots.append(s)
  cache, res = engine.prefill(cache, np.zeros(1, np.int32), logits="last", slot=slots[0])
  np.asarray(res.last_logits)
  for b in range(1, max_concurrency + 1):
    cache, step = engine.decode(cache, slots[:b], [0] * b)
    np.asarray(step.logits)
  for s in slots:
    cache = cache.release(s)
  if cache.backend != "hq":
    return cache
  # Dropped, not moved to a host tier: the throwaway blocks are no one's prefix. Then the
  # tiers' copy step is compiled at every size (timed copies exclude compilation).
  return tiers.warm_up(cache.evict(to_host=False))
