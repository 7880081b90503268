"""Replaying real request traces through the dense and HQ caches at a KV memory budget.

A trace is a list of requests with arrival times, prompt and output lengths, and the
prefix structure of each prompt as a chain of block ids (Mooncake: one id per 512-token
block; the last block may be partial). Three pieces live here:

* `load_trace`: parse and validate a trace file (errors name the file and line).
* `request_tokens`: deterministic token ids per request, so that a real cache's own
  verified chain finds exactly the sharing the trace encodes; `scheduler_requests`
  turns trace requests into the serving scheduler's `Request`s.
* `replay`: the no-model replay. The real `DedupKVCache` / `DenseKVCache` (host-only:
  no K/V storage) runs under the serving `Scheduler` (`hq_jax.serve.scheduler`) on a
  time model instead of a model; model mode is `scheduler.serve` on the same scheduler.

To add a trace format, write a `(record: dict, where: str) -> TraceRequest` parser
and register it in `FORMATS`.
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import json
import math
import os
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from hq_jax.serve.scheduler import (Admitted, DataParallel, Request, ServingStats,
                                    admit_prompt, blocks_to_come)

TRACE_BLOCK_TOKENS = 512  # Mooncake's hash block: one id per 512 prompt tokens.


class TraceError(ValueError):
  """A trace file that cannot be replayed; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class TraceRequest:
  index: int  # 0-based position in the trace
  arrival_s: float  # seconds from the start of the trace
  input_length: int  # prompt tokens
  output_length: int  # generated tokens
  hash_ids: tuple[int, ...]  # one id per trace block of the prompt (the last may be partial)


# ---------------------------------------------------------------------------- loading
def _parse_mooncake(record: dict, where: str, index: int) -> TraceRequest:
  for field in ("timestamp", "input_length", "output_length", "hash_ids"):
    if field not in record:
      raise TraceError(f"{where}: missing field {field!r}")
  ts, n, out, ids = (record[k] for k in ("timestamp", "input_length", "output_length",
                                          "hash_ids"))
  if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts) or ts < 0:
    raise TraceError(f"{where}: timestamp must be a finite number >= 0 (ms), got {ts!r}")
  for name, v, low in (("input_length", n, 1), ("output_length", out, 0)):
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
      raise TraceError(f"{where}: {name} must be an integer >= {low}, got {v!r}")
  if not isinstance(ids, list) or not all(
      isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
    raise TraceError(f"{where}: hash_ids must be a list of integers >= 0")
  if len(ids) != -(-n // TRACE_BLOCK_TOKENS):
    raise TraceError(f"{where}: {len(ids)} hash_ids for input_length {n}; expected "
                     f"ceil({n} / {TRACE_BLOCK_TOKENS}) = {-(-n // TRACE_BLOCK_TOKENS)}")
  return TraceRequest(index, ts / 1000.0, n, out, tuple(ids))


# Format name -> parser of one JSON record. Timestamps in the record are milliseconds.
FORMATS: dict[str, Callable[[dict, str, int], TraceRequest]] = {"mooncake": _parse_mooncake}


def load_trace(path: str, fmt: str = "mooncake", max_requests: int = 0) -> list[TraceRequest]:
  """Reads a JSONL trace, checking every line before any work starts.

  Arrival times must be non-decreasing (the replay admits in arrival order).
  `max_requests` > 0 keeps the first that many requests (checked lines only).
  """
  if fmt not in FORMATS:
    raise TraceError(f"unknown trace format {fmt!r}; known: {sorted(FORMATS)}")
  if not os.path.isfile(path):
    raise TraceError(f"{path}: trace file does not exist")
  parse, out, last = FORMATS[fmt], [], 0.0
  parent: dict[int, tuple[int, str]] = {}  # id -> (the id before it, where first seen)
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, 1):
      where = f"{path}:{lineno}"
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise TraceError(f"{where}: not UTF-8 text (byte {e.start} of the line)") from None
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise TraceError(f"{where}: not a JSON object ({e.msg})") from None
      if not isinstance(record, dict):
        raise TraceError(f"{where}: not a JSON object")
      req = parse(record, where, len(out))
      if req.arrival_s < last:
        raise TraceError(f"{where}: timestamp goes back in time ({req.arrival_s * 1000:g} ms "
                         f"after {last * 1000:g} ms); a trace must be in arrival order")
      last = req.arrival_s
      _check_chain(req.hash_ids, parent, where)
      out.append(req)
      if max_requests and len(out) >= max_requests:
        break
  if not out:
    raise TraceError(f"{path}: empty trace (no requests)")
  return out


def _check_chain(ids: Sequence[int], parent: dict, where: str) -> None:
  """An id names a whole prefix, so it must always follow the same id (or start a prompt).

  The token synthesis relies on it (an id's tokens follow from the id alone); a trace
  that breaks it is not a prefix-hash trace.
  """
  prev = -1
  for i in ids:
    seen = parent.setdefault(i, (prev, where))
    if seen[0] != prev:
      what = lambda p: "starts a prompt" if p == -1 else f"follows id {p}"
      raise TraceError(f"{where}: hash id {i} {what(prev)} but {what(seen[0])} at {seen[1]}; "
                       "ids must hash whole prefixes")
    prev = i


# --------------------------------------------------------------------------- tokens
_U = np.uint64
_GOLDEN, _MIX1, _MIX2 = _U(0x9E3779B97F4A7C15), _U(0xBF58476D1CE4E5B9), _U(0x94D049BB133111EB)


def _splitmix(x: np.ndarray) -> np.ndarray:
  """splitmix64's finalizer over a uint64 array (array arithmetic wraps silently)."""
  x = (x ^ (x >> _U(30))) * _MIX1
  x = (x ^ (x >> _U(27))) * _MIX2
  return x ^ (x >> _U(31))


@functools.lru_cache(maxsize=64)
def _position_keys(seed: int, stream: int, length: int) -> np.ndarray:
  """[length] uint64 pseudo-random keys of the positions of one token stream."""
  return _splitmix(_U((seed * 0x9E3779B97F4A7C15 + stream) % 2**64)
                   + np.arange(1, length + 1, dtype=_U) * _MIX2)


_POOL_TOKENS = 1 << 22  # pseudo-random tokens per (seed, stream, vocabulary) pool


@functools.lru_cache(maxsize=8)
def _token_pool(seed: int, stream: int, vocab_size: int) -> np.ndarray:
  """[_POOL_TOKENS] pseudo-random token ids in [0, vocab_size), a function of the
  arguments only (read only)."""
  x = _splitmix(_position_keys(seed, stream, _POOL_TOKENS) * _MIX1)
  pool = (((x >> _U(32)) * _U(vocab_size)) >> _U(32)).astype(np.int32)
  pool.flags.writeable = False
  return pool


def _stream_tokens(keys: np.ndarray, seed: int, stream: int, length: int,
                   vocab_size: int) -> np.ndarray:
  """[n] keys -> [n, length] pseudo-random token ids, a function of (seed, stream, key,
  position) only: each key reads `length` tokens of the pool from an offset its hash
  picks (one gather per token: a whole trace's prompts are cheap to synthesize)."""
  if length > _POOL_TOKENS // 2:  # very long outputs: hash every position
    x = (_splitmix(keys.astype(_U))[:, None]
         ^ _position_keys(seed, stream, length)[None]) * _MIX1
    return (((x >> _U(32)) * _U(vocab_size)) >> _U(32)).astype(np.int32)
  starts = _splitmix(keys.astype(_U) * _GOLDEN + _U(stream)) % _U(_POOL_TOKENS - length)
  if starts.size == 1:  # one key (a request's output): a slice of the pool
    start = int(starts[0])
    return _token_pool(seed, stream, vocab_size)[None, start:start + length].copy()
  return _pool_windows(seed, stream, vocab_size, length)[starts.astype(np.int64)]


@functools.lru_cache(maxsize=64)
def _pool_windows(seed: int, stream: int, vocab_size: int, length: int) -> np.ndarray:
  """The pool's windows of `length` tokens (a read-only view): a key's tokens are one
  row, copied contiguously (no [n, length] index array)."""
  return np.lib.stride_tricks.sliding_window_view(_token_pool(seed, stream, vocab_size),
                                                  length)


def _id_digits(vocab_size: int) -> int:
  """Tokens needed to spell any 31-bit id in base vocab_size."""
  return max(1, math.ceil(31 / math.log2(vocab_size)))


def blocks_tokens(block_ids, *, vocab_size: int, seed: int,
                  block_tokens: int = TRACE_BLOCK_TOKENS) -> np.ndarray:
  """The tokens of trace blocks, [n] ids -> [n, block_tokens] int32: a function of
  (id, seed) only, computed for all the ids at once.

  The first tokens spell the id in base vocab_size, so two different ids never give
  the same first cache block (chained identity then separates everything after it);
  the rest are pseudo-random ids (`_stream_tokens`).
  """
  if vocab_size < 2:
    raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
  ids = np.asarray(block_ids, np.int64).reshape(-1)
  toks = _stream_tokens(ids, seed, 0, block_tokens, vocab_size)
  v = ids.copy()
  for i in range(min(_id_digits(vocab_size), block_tokens)):
    toks[:, i], v = v % vocab_size, v // vocab_size
  return toks


def block_id_tokens(block_id: int, *, vocab_size: int, seed: int,
                    block_tokens: int = TRACE_BLOCK_TOKENS) -> np.ndarray:
  """The tokens of one trace block (`blocks_tokens` of one id)."""
  return blocks_tokens([block_id], vocab_size=vocab_size, seed=seed,
                       block_tokens=block_tokens)[0]


def request_tokens(req: TraceRequest, *, vocab_size: int, seed: int = 0,
                   block_tokens: int = TRACE_BLOCK_TOKENS) -> np.ndarray:
  """The prompt of a request: its blocks' tokens in order, the last cut to input_length."""
  return blocks_tokens(req.hash_ids, vocab_size=vocab_size, seed=seed,
                       block_tokens=block_tokens).reshape(-1)[:req.input_length]


def decode_tokens(request_id: int, count: int, *, vocab_size: int, seed: int = 0) -> np.ndarray:
  """Stand-in generated tokens (no model): seeded per request, so never shared."""
  return _stream_tokens(np.asarray([request_id]), seed, 1, count, vocab_size)[0]


def direct_hit_tokens(requests: Sequence[TraceRequest],
                      block_tokens: int = TRACE_BLOCK_TOKENS) -> int:
  """The trace README's count: sum of min(k * 512, input_length), k = longest seen chain.

  Ids hash whole prefixes, so "the chain up to id j was seen" is "id j was seen".
  """
  seen, hits = set(), 0
  for r in requests:
    k = 0
    for i in r.hash_ids:
      if i not in seen:
        break
      k += 1
    hits += min(k * block_tokens, r.input_length)
    seen.update(r.hash_ids)
  return hits


# ---------------------------------------------------------------------------- replay
@dataclasses.dataclass(frozen=True)
class ReplayConfig:
  """The admission policy and the time model of a replay (see docs/traces.md)."""

  max_concurrency: int = 64  # requests holding KV at once
  max_output_tokens: int = 0  # cap on generated tokens per request; 0 = the trace's
  prefill_tokens_per_s: float = 10_000.0  # time model: computed prefill tokens per second
  decode_tokens_per_s: float = 30.0  # time model: generated tokens per second per request
  time_scale: float = 1.0  # arrival times are multiplied by this

  def __post_init__(self):
    for name in ("max_concurrency", "prefill_tokens_per_s", "decode_tokens_per_s",
                 "time_scale"):
      if not getattr(self, name) > 0:
        raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
    if self.max_output_tokens < 0:
      raise ValueError(f"max_output_tokens must be >= 0, got {self.max_output_tokens}")

  def output_tokens(self, req: TraceRequest) -> int:
    cap = self.max_output_tokens
    return min(req.output_length, cap) if cap else req.output_length


def scheduler_requests(requests: Iterable[TraceRequest], cfg: ReplayConfig, *,
                       vocab_size: int, seed: int = 0,
                       synthesize: bool = True) -> Iterator[Request]:
  """The trace's requests as the scheduler's, built one at a time as they are pulled (a
  whole trace's prompts would not fit in memory at once): arrivals scaled, outputs capped.
  `synthesize` False: zero prompts of the right lengths, for a cache that never reads its
  tokens (the dense cache without a model)."""
  for r in requests:
    prompt = (request_tokens(r, vocab_size=vocab_size, seed=seed) if synthesize else
              np.zeros(r.input_length, np.int32))
    yield Request(r.index, r.arrival_s * cfg.time_scale, prompt, cfg.output_tokens(r))


def replay_requests(cache, requests: Iterable[Request], cfg: ReplayConfig, *,
                    vocab_size: int, seed: int = 0, max_context: int | None = None,
                    progress=None) -> tuple[ServingStats, object]:
  """Replays `requests` (in arrival order) through `cache` without a model; returns
  (stats, the cache at the end).

  Policy: the serving `Scheduler` (FIFO, head of line, skip what never fits). A request's
  whole life is taken at admission: its prompt is admitted (HQ: with room kept for its
  output) and committed, and its stand-in output tokens (`decode_tokens`) appended and
  committed at once (`extend`; HQ: `admit(then_extend=...)`, the same in one operation). Time model: a request admitted at t holds its blocks
  until t + computed_prefill_tokens / prefill_tokens_per_s + output_tokens /
  decode_tokens_per_s; then it is released (its chain cached tail first, in HQ).
  """
  dp = replay_data_parallel([cache], requests, cfg, vocab_size=vocab_size, seed=seed,
                            max_context=max_context, progress=progress)
  return dp.shards[0].stats, dp.shards[0].cache


def replay_data_parallel(caches: Sequence, requests: Iterable[Request], cfg: ReplayConfig, *,
                         vocab_size: int, seed: int = 0, max_context: int | None = None,
                         progress=None, max_concurrency=None) -> DataParallel:
  """`replay_requests` over one cache per data shard (`DataParallel`: cache-aware routing at
  arrival; each shard `cfg.max_concurrency` slots, or `max_concurrency[d]`). Returns the
  `DataParallel`: `shards[d].stats` / `.cache` are each shard's, `stats` the global sums.
  One cache: exactly `replay_requests`."""
  dp = DataParallel(list(caches), requests,
                    max_concurrency=cfg.max_concurrency if max_concurrency is None else
                    max_concurrency,
                    max_context=max_context, progress=progress)
  bs = caches[0].block_size
  # heap of (finish time, request id, shard, slot)
  finishing: list[tuple[float, int, int, int]] = []

  def admit(cache, req: Request):
    if cache.backend == "hq" and req.output_tokens:  # admit + extend, as one operation
      hit = -int(cache.hit_tokens)
      cache, slot = cache.admit(req.prompt, req.salt, then_extend=decode_tokens(
          req.id, req.output_tokens, vocab_size=vocab_size, seed=seed))
      hit += int(cache.hit_tokens)
      return cache, Admitted(slot, hit, req.prompt_tokens - hit)
    cache, slot = admit_prompt(
        cache, req.prompt, req.salt, hold_tokens=req.hold_tokens,
        keep_free=blocks_to_come(req.prompt_tokens, req.hold_tokens, bs))
    hit = int(cache.seq_lens[slot])
    if req.output_tokens:  # `extend` commits the prompt with its output (never read: dense)
      cache = cache.extend(slot, np.zeros(req.output_tokens, np.int32))
    else:
      cache = cache.commit(slot, req.prompt_tokens)
    return cache, Admitted(slot, hit, req.prompt_tokens - hit)

  t = 0.0
  now = lambda: t
  while not dp.done:
    t_arr = dp.next_arrival
    t_fin = finishing[0][0] if finishing else math.inf
    if t_fin <= t_arr:  # Finishes first at a tie, so the arrival sees the freed blocks.
      t = t_fin
      dp.advance(t)
      changed = set()
      while finishing and finishing[0][0] == t:
        _, _, d, slot = heapq.heappop(finishing)
        dp.shards[d].release(slot)
        changed.add(d)
      for d in changed:
        dp.shards[d].blocks_changed()
    elif t_arr < math.inf:
      t = t_arr
      dp.advance(t)
      dp.enqueue_until(t)
    else:
      raise AssertionError("queue stuck with nothing running")  # never_fits rules this out
    for d, sched in enumerate(dp.shards):
      for req, adm in sched.admit_waiting(now, admit):
        sched.running[adm.slot] = req
        duration = (adm.computed_tokens / cfg.prefill_tokens_per_s
                    + req.output_tokens / cfg.decode_tokens_per_s)
        heapq.heappush(finishing, (t + duration, req.id, d, adm.slot))
    dp.observe()
  return dp


def replay(requests: Sequence[TraceRequest], cache, cfg: ReplayConfig, *, vocab_size: int,
           seed: int = 0, max_context: int | None = None, progress=None) -> ServingStats:
  """`replay_requests` of a trace's requests (`scheduler_requests`)."""
  return replay_requests(cache, scheduler_requests(requests, cfg, vocab_size=vocab_size,
                                                   seed=seed, synthesize=cache.backend == "hq"),
                         cfg, vocab_size=vocab_size, seed=seed, max_context=max_context,
                         progress=progress)[0]


# ---------------------------------------------------------------------------- ledger
def ledger_row(rows: Sequence[dict], trace_name: str) -> dict:
  """The claims-ledger entry of a replay, in `hq_jax.study.ledger`'s form.

  Claim: at a bounded KV budget, HQ's prefix sharing computes fewer prefill tokens
  than the dense cache on this trace. "yes" when it does at every bounded budget,
  "mixed" at some, "no" at none, "not tested" without a bounded budget. The bound is
  the unbounded HQ row; row numbers cite trace_replay.csv (1-based data rows).
  """
  claim = f"HQ prefix sharing saves prefill compute on the {trace_name} trace at a fixed KV budget"
  # Per device budget, the HQ row with the smallest host tier (device-only where there is
  # one: what a host tier adds is the peer-advantage claim's evidence).
  idx = {}
  for i in sorted(range(len(rows)), key=lambda i: rows[i].get("host_kv_budget_gb") or 0.0):
    idx.setdefault((rows[i]["backend"], rows[i]["kv_budget_gb"]), i)
  budgets = sorted({r["kv_budget_gb"] for r in rows if r["backend"] == "hq"})
  if not budgets:
    return {"claim": claim, "supported": "not tested", "verdict": "no bounded budget replayed",
            "evidence": ""}
  parts, wins, cites = [], 0, []
  for b in budgets:
    hq, dense = rows[idx[("hq", b)]], rows[idx[("dense", b)]]
    if not dense["computed_prefill_tokens"] or not hq["computed_prefill_tokens"]:
      parts.append(f"{b:g} GB: a backend admitted no request")
      continue
    saved = 1 - hq["computed_prefill_tokens"] / dense["computed_prefill_tokens"]
    wins += saved > 0
    host = (f" + {hq['host_kv_budget_gb']:g} GB host" if hq.get("host_kv_budget_gb") else "")
    parts.append(f"{b:g} GB{host}: hit {100 * hq['hit_ratio']:.1f}%, prefill "
                 f"-{100 * saved:.1f}%")
    cites += [idx[("hq", b)], idx[("dense", b)]]
  ub = rows[idx[("hq_unbounded", 0.0)]]
  compared = len(parts) - sum("admitted no request" in p for p in parts)
  supported = ("not tested" if not compared else "yes" if wins == compared else
               "mixed" if wins else "no")
  verdict = ("; ".join(parts) + f" (HQ vs dense; unbounded HQ: hit {100 * ub['hit_ratio']:.1f}%)")
  evidence = ", ".join(f"trace_replay.csv#{i + 1}" for i in sorted(set(cites) | {idx[(
      "hq_unbounded", 0.0)]}))
  return {"claim": claim, "supported": supported, "verdict": verdict, "evidence": evidence}
