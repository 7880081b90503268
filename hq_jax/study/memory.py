"""The memory sweep: both backends on the same real-text requests, checked against the formula.

Every row is one (backend, grid point). The checks in `check_row` make each of the
seed harness's mistakes an error rather than a result:
  - a request shorter than its context_length label ("capped below its label");
  - a measured kv_bytes_used that is not the analytic prediction (e.g. dense allocation
    reported as use: the prediction counts held tokens, not reservations);
  - cross-request reuse claimed at concurrency 1.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import statistics
from typing import Iterable, Sequence

import jax
import numpy as np

from hq_jax import mesh as mesh_lib
from hq_jax.config import ModelConfig
from hq_jax.serve.engine import Engine
from hq_jax.kv.dedup import DedupKVCache
from hq_jax.kv.dense import DenseKVCache
from hq_jax.kv.paged import KVLayout
from hq_jax.kv.stats import kv_stats
from hq_jax.bench import device_memory
from hq_jax.study import outputs
from hq_jax.study.errors import HarnessError, check_context_limit, check_positive
from hq_jax.study.requests import (Request, TokenStream, check_grid_distinct, grid_requests,
                                     shared_prefix_tokens)

BACKENDS = ("dense", "hq")
# Wall-clock columns: they vary between runs and are kept apart from the exact ones.
TIMING_COLUMNS = ("ttft_ms", "prefill_s")
COLUMNS = (
    "backend", "model", "mesh", "context_length", "tokens_per_request", "concurrency",
    "shared_prefix_fraction", "num_prefixes", "shared_prefix_tokens", "unique_suffix_tokens",
    "block_size", "chunk_size", "kv_dtype", "bytes_per_token", "max_seq_len",
    "kv_bytes_allocated",
    "kv_bytes_used", "kv_bytes_predicted", "physical_blocks", "logical_blocks", "reuse_factor",
    "metadata_bytes", "pool_bytes", "hit_tokens", "query_tokens", "computed_tokens",
    "peak_device_bytes", "process_peak_bytes", "seed", "attention") + TIMING_COLUMNS


def predicted_kv_bytes(backend: str, *, context_length: int, concurrency: int,
                       shared_prefix_tokens: int, num_prefixes: int,
                       bytes_per_token: int) -> int:
  """K/V held by `concurrency` requests of `context_length` tokens, analytically.

  Dense holds every token of every request. HQ holds each distinct (block-aligned)
  prefix once, plus every request's own suffix. `bytes_per_token` is the layout's (FP8:
  scales included, so FP8 rows are predicted with their scale bytes).
  """
  c, n, p = concurrency, context_length, shared_prefix_tokens
  if backend == "dense":
    return c * n * bytes_per_token
  groups = min(num_prefixes, c) if p else 0
  return (groups * p + c * (n - p)) * bytes_per_token


@functools.lru_cache(maxsize=256)
def metadata_bytes(backend: str, *, block_size: int, num_blocks: int, max_requests: int,
                   max_seq_len: int) -> int:
  """What `kv_stats(cache).metadata_bytes` is for a cache of this shape: its arrays depend
  on the block counts, never on the K/V shape, so a stand-in layout is built abstractly
  (`jax.eval_shape`: no pool is allocated)."""
  layout = KVLayout(1, 1, 1, block_size, "float32")
  cls = DenseKVCache if backend == "dense" else DedupKVCache
  cache = jax.eval_shape(lambda: cls.init(layout, num_blocks=num_blocks,
                                          max_requests=max_requests, max_seq_len=max_seq_len))
  from hq_jax.kv.base import metadata_leaves
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
             for x in metadata_leaves(cache).values())


def _expected_blocks(row: dict) -> tuple[int, int, int]:
  """(logical, physical, pool) blocks of a row's grid point, from its own columns."""
  bs, n, c = row["block_size"], row["context_length"], row["concurrency"]
  per = -(-n // bs)
  logical = c * per
  if row["backend"] == "dense":
    return logical, logical, c * -(-row["max_seq_len"] // bs)
  p = row["shared_prefix_tokens"]
  groups = min(row["num_prefixes"], c) if p else 0
  physical = groups * (p // bs) + c * -(-(n - p) // bs)
  return logical, physical, physical


def check_row(row: dict) -> None:
  """Raises HarnessError if a row shows one of the seed harness's accounting mistakes, or a
  derived column (blocks, reuse factor, pool, metadata, peak) that its grid point cannot
  give."""
  if row["backend"] not in BACKENDS:
    raise HarnessError(f"backend {row['backend']!r} is not one of {', '.join(BACKENDS)}")
  where = (f"{row['backend']} row context_length={row['context_length']} "
           f"concurrency={row['concurrency']}")
  predicted = predicted_kv_bytes(
      row["backend"], context_length=row["context_length"], concurrency=row["concurrency"],
      shared_prefix_tokens=row["shared_prefix_tokens"], num_prefixes=row["num_prefixes"],
      bytes_per_token=row["bytes_per_token"])
  if row["kv_bytes_predicted"] != predicted:
    raise HarnessError(f"{where}: kv_bytes_predicted {row['kv_bytes_predicted']} is not the "
                       f"analytic prediction {predicted} from the row's own grid point")
  if row["tokens_per_request"] != row["context_length"]:
    raise HarnessError(
        f"{where}: requests have {row['tokens_per_request']} tokens but are labelled "
        f"{row['context_length']}: requests capped below their label")
  if row["kv_bytes_used"] != row["kv_bytes_predicted"]:
    raise HarnessError(
        f"{where}: measured kv_bytes_used {row['kv_bytes_used']} differs from the analytic "
        f"prediction {row['kv_bytes_predicted']} (allocation reported as use?)")
  if row["kv_bytes_used"] > row["kv_bytes_allocated"]:
    raise HarnessError(f"{where}: uses more K/V ({row['kv_bytes_used']}) than it allocated "
                       f"({row['kv_bytes_allocated']})")
  if row["concurrency"] == 1 and row["reuse_factor"] != 1.0:
    raise HarnessError(
        f"{where}: reuse_factor {row['reuse_factor']} at concurrency 1: one request cannot "
        "reuse another's blocks (reuse accumulated across iterations is not compression)")
  if row["concurrency"] == 1 and row["hit_tokens"]:
    raise HarnessError(
        f"{where}: {row['hit_tokens']} hit tokens at concurrency 1 on a fresh cache: they can "
        "only come from earlier iterations of the same request, not from cross-request reuse")
  if row["backend"] == "dense" and row["reuse_factor"] != 1.0:
    raise HarnessError(f"{where}: the dense cache never shares, yet reuse_factor "
                       f"{row['reuse_factor']}")
  _check_derived(row, where)


def _check_derived(row: dict, where: str) -> None:
  bs, n, c = row["block_size"], row["context_length"], row["concurrency"]
  p = row["shared_prefix_tokens"]
  if not (0 <= p <= n and p % bs == 0 and row["unique_suffix_tokens"] == n - p):
    raise HarnessError(f"{where}: shared_prefix_tokens {p} / unique_suffix_tokens "
                       f"{row['unique_suffix_tokens']} are not a block-aligned split of {n}")
  if p != shared_prefix_tokens(n, row["shared_prefix_fraction"], bs):
    raise HarnessError(f"{where}: shared_prefix_tokens {p} is not shared_prefix_fraction "
                       f"{row['shared_prefix_fraction']} of {n} tokens in blocks of {bs}")
  if row["max_seq_len"] < n:
    raise HarnessError(f"{where}: max_seq_len {row['max_seq_len']} < context_length {n}")
  if row["query_tokens"] != c * n:
    raise HarnessError(f"{where}: query_tokens {row['query_tokens']} is not the {c * n} prompt "
                       f"tokens of concurrency {c} x {n}: prompts were looked up more than "
                       "once (earlier iterations of the same requests?)")
  logical, physical, pool = _expected_blocks(row)
  bpb = bs * row["bytes_per_token"]
  expect = {"logical_blocks": logical, "physical_blocks": physical,
            "reuse_factor": round(logical / physical, 6), "pool_bytes": pool * bpb,
            "kv_bytes_allocated": (pool if row["backend"] == "dense" else physical) * bpb,
            "metadata_bytes": metadata_bytes(row["backend"], block_size=bs, num_blocks=pool,
                                             max_requests=c, max_seq_len=row["max_seq_len"])}
  for column, value in expect.items():
    if row[column] != value:
      raise HarnessError(f"{where}: {column} {row[column]} is not {value}, what this grid "
                         "point's blocks give (logical / physical blocks, the pool, the "
                         "cache layout)")
  if not 0 <= row["hit_tokens"] <= row["query_tokens"] or (
      row["backend"] == "dense" and row["hit_tokens"]):
    raise HarnessError(f"{where}: hit_tokens {row['hit_tokens']} of {row['query_tokens']} "
                       "looked up (dense never hits)")
  if not 0 < row["computed_tokens"] <= c * n or (
      row["computed_tokens"] < c * n - row["hit_tokens"]):
    raise HarnessError(f"{where}: computed_tokens {row['computed_tokens']} is not between "
                       f"the tokens not hit ({c * n - row['hit_tokens']}) and all {c * n}")
  # On a mesh the peak is one device's, which holds 1/model of the pool.
  share = row["pool_bytes"] // mesh_lib.MeshSpec.parse(row.get("mesh") or "").model
  if row["peak_device_bytes"] is not None and row["peak_device_bytes"] < share:
    raise HarnessError(f"{where}: peak_device_bytes {row['peak_device_bytes']} is below the "
                       f"row's own K/V pool on one device ({share} bytes)")


def check_rows(rows: Sequence[dict], config: dict, skipped_points: Sequence[dict] = ()) -> None:
  """Raises HarnessError unless `rows` are exactly what a run of `config` (its run record's
  config) makes: both backends at every grid point it did not skip, once each, with the
  config's model, seed, block size, prefill chunk and dense reservation."""
  skipped = {(p["context_length"], p["concurrency"], p["shared_prefix_fraction"],
              p["num_prefixes"]) for p in skipped_points}
  points = [p for p in check_grid(context_lengths=config["context_lengths"],
                                  concurrency=config["concurrency"],
                                  shared_prefix_fractions=config["shared_prefix_fractions"],
                                  num_prefixes=config.get("num_prefixes", (1,)))
            if p not in skipped]
  want = sorted((*p, b) for p in points for b in BACKENDS)
  got = sorted((r["context_length"], r["concurrency"], r["shared_prefix_fraction"],
                r["num_prefixes"], r["backend"]) for r in rows)
  if got != want:
    raise HarnessError(f"the rows' grid points (context_length, concurrency, fraction, "
                       f"num_prefixes, backend) are {got}, not the {len(want)} of the run "
                       f"record's config {want}")
  chunks = parse_chunk_size_at(config.get("chunk_size_at", ()), block_size=config["block_size"])
  for i, r in enumerate(rows):
    n = r["context_length"]
    expect = {"model": config["model"], "seed": config["seed"],
              "block_size": config["block_size"],
              "chunk_size": chunks.get(n, config["chunk_size"]),
              "max_seq_len": config.get("max_seq_len") or n,
              "mesh": mesh_lib.MeshSpec.parse(config.get("mesh", "")).label}
    for column, value in expect.items():
      if r[column] != value:
        raise HarnessError(f"data row {i + 1}: {column} {r[column]!r}, where the run "
                           f"record's config gives {value!r}")


def _check_fits(layout: KVLayout, num_blocks: int, what: str, tp: int = 1) -> None:
  """Refuses a pool the device cannot hold (its 1/tp share of the kv heads), before trying
  to allocate it (bytes_per_block counts K and V already)."""
  stats = jax.devices()[0].memory_stats() or {}
  need = num_blocks * layout.bytes_per_block // tp
  if "bytes_limit" in stats and need > stats["bytes_limit"]:
    raise HarnessError(f"{what} needs a {need / 1e9:.1f} GB K/V pool; the device holds "
                       f"{stats['bytes_limit'] / 1e9:.1f} GB: trim the grid")


# Room a grid point leaves beside its K/V pool and the weights: a prefill step's scratch
# (the 7B shape's 4k-token chunk needs well under this) and the allocator's rounding.
STEP_HEADROOM_BYTES = 2 << 30


def unfit_points(points, layout: KVLayout, max_seq_len: int, tp: int = 1) -> dict[tuple, str]:
  """The grid points whose largest pool (dense's reservation; HQ's is never larger) does
  not fit beside what the device already holds (the weights) and STEP_HEADROOM_BYTES,
  each with the reason; none where the platform reports no memory limit (CPU). `tp`: the
  pools are split over that many devices' kv heads (device 0's share is checked)."""
  device = jax.devices()[0]
  stats = device.memory_stats() or {}
  if "bytes_limit" not in stats:
    return {}
  held = device_memory.live_bytes(device if tp > 1 else None)
  return {point: why for point in points
          if (why := _unfit_reason(point, layout, max_seq_len, tp=tp, device_bytes=stats[
              "bytes_limit"], weight_bytes=held)) is not None}


def _unfit_reason(point, layout: KVLayout, max_seq_len: int, *, tp: int, device_bytes: int,
                  weight_bytes: int) -> str | None:
  """Why a grid point's pool does not fit one device (None: it fits): the one rule of
  `unfit_points` (measured weights) and `mesh_plan` (planned ones)."""
  n, c = point[:2]
  need = c * layout.blocks_for(max_seq_len or n) * layout.bytes_per_block // tp
  room = device_bytes - weight_bytes - STEP_HEADROOM_BYTES
  if need <= room:
    return None
  per = f" per device (model:{tp})" if tp > 1 else ""
  if room <= 0:
    return (f"{c} x {n} tokens: the weights ({weight_bytes / 1e9:.2f} GB{per}) and "
            f"{STEP_HEADROOM_BYTES / 2**30:.0f} GiB of step headroom exceed the device's "
            f"{device_bytes / 1e9:.2f} GB")
  return (f"{c} x {n} tokens: the dense pool needs {need / 1e9:.2f} GB{per}; "
          f"{room / 1e9:.2f} GB are free beside the weights and "
          f"{STEP_HEADROOM_BYTES / 2**30:.0f} GiB of step headroom")


PLAN_COLUMNS = ("model", "mesh", "context_length", "concurrency", "shared_prefix_fraction",
                "num_prefixes", "kv_dtype", "param_bytes_per_device",
                "kv_pool_bytes_per_device", "headroom_bytes", "device_bytes", "fits",
                "reason")


def mesh_plan(cfg: ModelConfig, points, *, tps: Sequence[int], device_bytes: int,
              block_size: int = 16, max_seq_len: int = 0,
              kv_dtype: str | None = None) -> list[dict]:
  """What fits one device at each tensor-parallel size, before any compute or weights:
  one row per (tp, grid point) with the planned weights per device (its share of the split
  projections plus the replicated embeddings, norms and head), the dense pool per device
  (HQ's is never larger), and `fits` with the reason when it does not (`unfit_points`'
  rule). A `tp` that cannot split the model gives rows that say so."""
  layout = KVLayout.from_config(cfg, block_size, kv_dtype)
  rows = []
  for tp in tps:
    spec = mesh_lib.MeshSpec(1, tp)
    try:
      spec.check(cfg, num_devices=tp)
      weights = mesh_lib.param_bytes_per_device(cfg, tp)
      bad = None
    except ValueError as e:
      weights, bad = None, str(e)
    for point in points:
      n, c, f, g = point
      pool = c * layout.blocks_for(max_seq_len or n) * layout.bytes_per_block // tp
      why = bad or _unfit_reason(point, layout, max_seq_len, tp=tp,
                                 device_bytes=device_bytes, weight_bytes=weights)
      rows.append(dict(model=cfg.name, mesh=spec.label, context_length=n, concurrency=c,
                       shared_prefix_fraction=f, num_prefixes=g, kv_dtype=layout.dtype,
                       param_bytes_per_device=weights if weights is not None else "",
                       kv_pool_bytes_per_device=pool, headroom_bytes=STEP_HEADROOM_BYTES,
                       device_bytes=device_bytes, fits=why is None, reason=why or ""))
  return rows


def hq_blocks_needed(layout: KVLayout, *, concurrency: int, context_length: int,
                     shared_prefix_tokens: int, num_prefixes: int) -> int:
  """Blocks an HQ cache needs for a grid point's requests: each distinct (block-aligned)
  shared prefix once, plus every request's own suffix (its partial last block included)."""
  groups = min(num_prefixes, concurrency) if shared_prefix_tokens else 0
  return (groups * (shared_prefix_tokens // layout.block_size)
          + concurrency * layout.blocks_for(context_length - shared_prefix_tokens))


def make_cache(backend: str, layout: KVLayout, *, concurrency: int, context_length: int,
               max_seq_len: int, shared_prefix_tokens: int | None = None,
               num_prefixes: int = 1, mesh=None):
  """A cache for one grid point (on `mesh`: its pools made in place, split over kv heads,
  never whole on one device). Dense reserves max_seq_len per request. HQ's pool holds
  what the point's requests need when `shared_prefix_tokens` is given (the memory sweep:
  so a row's pool, and its device memory, can show what sharing saves), else enough for no
  sharing at all (latency, workloads: room for decode steps, never an eviction)."""
  if backend == "dense":
    blocks = concurrency * layout.blocks_for(max_seq_len)
  elif shared_prefix_tokens is None:
    blocks = concurrency * layout.blocks_for(context_length)
  else:
    blocks = hq_blocks_needed(layout, concurrency=concurrency, context_length=context_length,
                              shared_prefix_tokens=shared_prefix_tokens,
                              num_prefixes=num_prefixes)
  tp = mesh_lib.spec_of(mesh).model
  _check_fits(layout, blocks, f"{backend} at {concurrency} x {context_length} tokens", tp)
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
  kind = DenseKVCache if backend == "dense" else DedupKVCache
  cache = kind.init(layout, num_blocks=blocks, max_requests=concurrency,
                    max_seq_len=max_seq_len, host_only=mesh is not None)
  if mesh is None:
    return cache
  return dataclasses.replace(cache, pools=mesh_lib.zeros_pools(layout, blocks, mesh))


def run_requests(engine: Engine, cache, requests: Sequence[Request]):
  """Prefills all requests (kept active together); returns (cache, per-request results)."""
  results = []
  for r in requests:
    cache, res = engine.prefill(cache, r.tokens, salt=r.salt, logits="last")
    results.append(res)
  return cache, results


def point_requests(stream: TokenStream, *, context_length: int, concurrency: int,
                   shared_prefix_fraction: float, num_prefixes: int, block_size: int,
                   seed: int) -> list[Request]:
  """The requests of one grid point, refused up front if the text cannot make them distinct."""
  requests = grid_requests(stream, context_length=context_length, concurrency=concurrency,
                           shared_prefix_fraction=shared_prefix_fraction,
                           num_prefixes=num_prefixes, block_size=block_size, seed=seed)
  check_grid_distinct(
      requests, block_size=block_size,
      shared_tokens=shared_prefix_tokens(context_length, shared_prefix_fraction, block_size))
  return requests


def run_point(engine: Engine, layout: KVLayout, stream: TokenStream, *, model: str,
              context_length: int, concurrency: int, shared_prefix_fraction: float,
              num_prefixes: int, max_seq_len: int, seed: int,
              tracker: device_memory.PeakTracker | None = None) -> list[dict]:
  """Both backends on the same requests at one grid point: one checked row each.

  With `tracker` (the engine's `on_step` hook), a row's peak_device_bytes is the peak
  during that row alone: the previous row's cache is gone before it starts."""
  requests = point_requests(stream, context_length=context_length, concurrency=concurrency,
                            shared_prefix_fraction=shared_prefix_fraction,
                            num_prefixes=num_prefixes, block_size=layout.block_size, seed=seed)
  p = shared_prefix_tokens(context_length, shared_prefix_fraction, layout.block_size)
  max_seq = max_seq_len or context_length
  rows = []
  for backend in BACKENDS:
    def fresh():
      return make_cache(backend, layout, concurrency=concurrency,
                        context_length=context_length, max_seq_len=max_seq,
                        shared_prefix_tokens=p, num_prefixes=num_prefixes, mesh=engine.mesh)
    # Compile this point's shapes on a throwaway cache, so ttft_ms is not compile time:
    # one chunk is enough (every chunk of every request runs the same executable; a test
    # counts compilations), and a whole 128k-token request would cost seconds per row.
    engine.prefill(fresh(), requests[0].tokens[:engine.chunk_size], logits="last")
    if tracker is not None:
      tracker.start()
    cache, results = run_requests(engine, fresh(), requests)
    s = kv_stats(cache)
    row = {
        "backend": backend, "model": model, "mesh": engine.mesh_label,
        "context_length": context_length,
        "tokens_per_request": int(min(len(r) for r in requests)),
        "concurrency": concurrency, "shared_prefix_fraction": shared_prefix_fraction,
        "num_prefixes": num_prefixes, "shared_prefix_tokens": p,
        "unique_suffix_tokens": context_length - p, "block_size": layout.block_size,
        "chunk_size": engine.chunk_size, "kv_dtype": layout.dtype,
        "bytes_per_token": layout.bytes_per_token,
        "max_seq_len": max_seq,
        "kv_bytes_allocated": s.kv_bytes_allocated, "kv_bytes_used": s.kv_bytes_used,
        "kv_bytes_predicted": predicted_kv_bytes(
            backend, context_length=context_length, concurrency=concurrency,
            shared_prefix_tokens=p, num_prefixes=num_prefixes,
            bytes_per_token=layout.bytes_per_token),
        "physical_blocks": s.physical_blocks, "logical_blocks": s.logical_blocks,
        "reuse_factor": round(s.reuse_factor, 6), "metadata_bytes": s.metadata_bytes,
        "pool_bytes": s.pool_bytes, "hit_tokens": s.hit_tokens, "query_tokens": s.query_tokens,
        "computed_tokens": sum(r.computed_tokens for r in results),
        "peak_device_bytes": tracker.peak if tracker is not None else None,
        "process_peak_bytes": device_memory.process_peak_bytes(), "seed": seed,
        "attention": engine.attention_label,
        "ttft_ms": round(1e3 * statistics.median(r.ttft_s for r in results), 3),
        "prefill_s": round(sum(r.ttft_s for r in results), 4),
    }
    del cache, results  # before the next backend's pool exists
    check_row(row)
    rows.append(row)
  return rows


def check_sweep(cfg: ModelConfig, stream: TokenStream, *, context_lengths: Iterable[int],
                concurrency: Iterable[int], shared_prefix_fractions: Iterable[float],
                num_prefixes: Iterable[int] = (1,), block_size: int = 16, chunk_size: int = 64,
                chunk_size_at: Iterable[str] = (), max_seq_len: int = 0, seed: int = 0,
                allow_long_context: bool = False) -> tuple[list[tuple], dict[int, int]]:
  """Every check `sweep` makes before any compute (grid values, the context limit, the
  requests of every point); returns (grid points, {context_length: chunk}). A script calls
  it before opening its run, so a bad input leaves nothing in the output directory."""
  chunks = parse_chunk_size_at(chunk_size_at, block_size=block_size)
  if chunk_size < 1 or chunk_size % block_size:
    raise ValueError(f"--chunk_size={chunk_size} must be a positive multiple of "
                     f"--block_size={block_size}")
  points = check_grid(context_lengths=context_lengths, concurrency=concurrency,
                      shared_prefix_fractions=shared_prefix_fractions,
                      num_prefixes=num_prefixes)
  context_lengths = [p[0] for p in points]
  if max_seq_len < 0:
    raise ValueError(f"--max_seq_len must be >= 0, got {max_seq_len}")
  if max_seq_len and max_seq_len < max(context_lengths):
    raise ValueError(f"--max_seq_len {max_seq_len} < context_length {max(context_lengths)}")
  check_context_limit(cfg, max(max_seq_len, *context_lengths), "--context_lengths",
                      allow_long_context)
  for n, c, f, g in points:
    point_requests(stream, context_length=n, concurrency=c, shared_prefix_fraction=f,
                   num_prefixes=g, block_size=block_size, seed=seed)
  return points, chunks


def sweep(params, cfg: ModelConfig, stream: TokenStream, *, model: str,
          context_lengths: Iterable[int], concurrency: Iterable[int],
          shared_prefix_fractions: Iterable[float], num_prefixes: Iterable[int] = (1,),
          block_size: int = 16, chunk_size: int = 64, chunk_size_at: Iterable[str] = (),
          max_seq_len: int = 0, seed: int = 0, attention: str = "auto",
          decode_attention: str = "paged", allow_long_context: bool = False, progress=None,
          on_rows=None, on_skip=None, kv_dtype: str | None = None, mesh=None) -> list[dict]:
  """The full grid; `progress` (e.g. a tqdm) is updated once per grid point, and
  `on_rows(rows_so_far)` is called after each (to write partial results). Every grid
  value, the context limit and the requests of every point are checked before any
  compute, so a bad grid fails at once rather than after the rows before it. A point
  whose pools cannot fit on the device (`unfit_points`) is skipped, both backends, and
  `on_skip(point, reason)` is called for it before any compute (point = (context_length,
  concurrency, shared_prefix_fraction, num_prefixes)). `chunk_size_at` ("CONTEXT:CHUNK"
  strings, `parse_chunk_size_at`) gives the points of a context length another prefill
  chunk than `chunk_size`; each row records its chunk. `kv_dtype`: the caches' K/V dtype
  (None: the model's); each row records it. `mesh`: a jax Mesh of one data row
  (`hq_jax.mesh`): the engine runs tensor parallel on it, a point is skipped when device
  0's share does not fit, and each row records the mesh."""
  points, chunks = check_sweep(
      cfg, stream, context_lengths=context_lengths, concurrency=concurrency,
      shared_prefix_fractions=shared_prefix_fractions, num_prefixes=num_prefixes,
      block_size=block_size, chunk_size=chunk_size, chunk_size_at=chunk_size_at,
      max_seq_len=max_seq_len, seed=seed, allow_long_context=allow_long_context)
  layout = KVLayout.from_config(cfg, block_size, kv_dtype)
  unfit = unfit_points(points, layout, max_seq_len,
                       tp=mesh_lib.spec_of(mesh).model)
  for point, reason in unfit.items():
    if on_skip is not None:
      on_skip(point, reason)
  # On a mesh: device 0's peak (every device holds the same share).
  tracker = device_memory.PeakTracker(None if mesh is None else mesh.devices.flat[0])
  engines = {}  # one per chunk size, made when first needed

  def engine_for(n):
    chunk = chunks.get(n, chunk_size)
    if chunk not in engines:
      engines[chunk] = Engine(params, cfg, chunk_size=chunk, attention=attention,
                              decode_attention=decode_attention, on_step=tracker,
                              allow_long_context=allow_long_context, kv_dtype=layout.dtype,
                              mesh=mesh)
    return engines[chunk]

  rows = []
  for n, c, f, g in points:
    if (n, c, f, g) not in unfit:
      rows += run_point(engine_for(n), layout, stream, model=model, context_length=n,
                        concurrency=c, shared_prefix_fraction=f, num_prefixes=g,
                        max_seq_len=max_seq_len, seed=seed, tracker=tracker)
      if on_rows is not None:
        on_rows(rows)
    if progress is not None:
      progress.update(1)
  return rows


def parse_chunk_size_at(specs: Iterable[str], *, block_size: int) -> dict[int, int]:
  """{context_length: prefill chunk} from "CONTEXT:CHUNK" strings (e.g. "131072:16384");
  a chunk must be a positive multiple of block_size, a context length may appear once."""
  out = {}
  for spec in specs:
    parts = str(spec).split(":")
    try:
      context, chunk = (int(x) for x in parts)
    except ValueError:
      raise ValueError(f"--chunk_size_at: {spec!r} is not CONTEXT:CHUNK (two integers, "
                       "e.g. 131072:16384)") from None
    if context < 1 or chunk < 1 or chunk % block_size:
      raise ValueError(f"--chunk_size_at: {spec!r} needs a positive context length and a "
                       f"chunk that is a positive multiple of --block_size={block_size}")
    if context in out:
      raise ValueError(f"--chunk_size_at names context length {context} twice")
    out[context] = chunk
  return out


def check_grid(*, context_lengths, concurrency, shared_prefix_fractions,
               num_prefixes=(1,)) -> list[tuple]:
  """The grid points (context_length, concurrency, fraction, num_prefixes), every flag
  checked: no empty list, no value below its minimum, fractions in [0, 1]."""
  fracs = list(shared_prefix_fractions)
  if not fracs:
    raise ValueError("--shared_prefix_fractions is empty: give at least one value")
  bad = [f for f in fracs if not 0.0 <= f <= 1.0]
  if bad:
    raise ValueError(f"--shared_prefix_fractions: {bad[0]} is not in [0, 1]")
  return list(itertools.product(check_positive("context_lengths", context_lengths),
                                check_positive("concurrency", concurrency), fracs,
                                check_positive("num_prefixes", num_prefixes)))


def to_csv(rows: Sequence[dict], columns: Sequence[str] = COLUMNS) -> str:
  return outputs.to_csv(rows, columns)


read_csv = outputs.read_csv
read_csv_text = outputs.read_csv_text
