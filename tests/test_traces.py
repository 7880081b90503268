"""Trace replay: loading, token synthesis, the no-model replay through the real caches
against hand-computed rows, model mode, the script."""

import csv
import json
import os
import random

import numpy as np
import pytest

from hq_jax import config
from hq_jax.kv.dedup import DedupKVCache
from hq_jax.kv.dense import DenseKVCache
from hq_jax.kv.paged import KVLayout
from hq_jax.study import trace_outputs, traces
from hq_jax.study.traces import ReplayConfig, TraceRequest

B = traces.TRACE_BLOCK_TOKENS
# Long holds, so requests overlap and compete for the pool.
SLOW = ReplayConfig(max_concurrency=4, prefill_tokens_per_s=1000.0, decode_tokens_per_s=2.0)


def _req(i, ids, n, out=0, t=0.0):
  return TraceRequest(i, t, n, out, tuple(ids))


def random_trace(seed, n=30, max_blocks=3, max_out=20, partial=True):
  """Conversations: each request extends a random prefix of an earlier chain."""
  rng = random.Random(seed)
  reqs, next_id, t = [], 0, 0.0
  for i in range(n):
    base = []
    if reqs and rng.random() < 0.7:
      prev = rng.choice(reqs)
      base = list(prev.hash_ids[:rng.randint(1, len(prev.hash_ids))])
      # Only a full block may be extended (as in Mooncake, a partial id ends its chain).
      if base and len(base) * B > prev.input_length:
        base.pop()
    extra = rng.randint(0 if base else 1, max_blocks)
    ids = base + list(range(next_id, next_id + extra))
    next_id += extra
    if not ids:
      ids, next_id = [next_id], next_id + 1
    low = (len(ids) - 1) * B + 1 if partial else len(ids) * B
    n_tok = rng.randint(low, len(ids) * B) if partial else low
    t += rng.random() * 0.5
    reqs.append(_req(i, ids, n_tok, rng.randint(1, max_out), t))
  return reqs


def _write(path, lines):
  path.write_text("".join(line + "\n" for line in lines))
  return str(path)


def _line(ts=0, n=600, out=5, ids=(0, 1)):
  return json.dumps(dict(timestamp=ts, input_length=n, output_length=out, hash_ids=list(ids)))


# ---------------------------------------------------------------------------- tokens
def test_equal_ids_equal_tokens_and_shared_only_where_ids_match():
  a = traces.request_tokens(_req(0, [7, 8, 9], 3 * B), vocab_size=512, seed=3)
  b = traces.request_tokens(_req(1, [7, 8, 10], 3 * B), vocab_size=512, seed=3)
  np.testing.assert_array_equal(a[:2 * B], b[:2 * B])
  assert not np.array_equal(a[2 * B:2 * B + 16], b[2 * B:2 * B + 16])
  # Different ids differ from their very first cache block, whatever the vocabulary.
  for vocab in (2, 512, 151936):
    firsts = {traces.block_id_tokens(i, vocab_size=vocab, seed=0)[:16].tobytes()
              for i in range(300)}
    assert len(firsts) == 300
  c = traces.request_tokens(_req(0, [7, 8, 9], 3 * B), vocab_size=512, seed=4)
  assert not np.array_equal(a, c)  # seeded


def test_real_cache_finds_exactly_the_trace_sharing():
  layout = KVLayout(1, 1, 1, 16, "float32")
  cache = DedupKVCache.init(layout, num_blocks=256, max_requests=4, max_seq_len=4 * B)
  a, b, c = _req(0, [1, 2, 3], 3 * B), _req(1, [1, 2, 4], 3 * B), _req(2, [5, 2], 2 * B)
  hits = []
  for r in (a, b, c):
    cache, slot = cache.admit(traces.request_tokens(r, vocab_size=512))
    hits.append(int(cache.seq_lens[slot]))
    cache = cache.commit(slot, r.input_length)
  assert hits == [0, 2 * B, 0]  # id 2 under another parent is another block


def _cache(reqs, num_blocks=None, *, backend="hq", block_size=16, cfg=SLOW):
  """A host-only cache for a no-model replay of `reqs` (None: room for all at once)."""
  layout = KVLayout(1, 1, 1, block_size, "float32")
  holds = [r.input_length + cfg.output_tokens(r) for r in reqs]
  kind = DenseKVCache if backend == "dense" else DedupKVCache
  return kind.init(layout, num_blocks=num_blocks or sum(layout.blocks_for(h) for h in holds),
                   max_requests=cfg.max_concurrency, max_seq_len=max(holds), host_only=True)


def _replay(reqs, num_blocks=None, *, backend="hq", block_size=16, cfg=SLOW,
            max_context=None) -> dict:
  """The no-model replay's row (1 byte per block: peaks count blocks)."""
  cache = _cache(reqs, num_blocks, backend=backend, block_size=block_size, cfg=cfg)
  stats = traces.replay(reqs, cache, cfg, vocab_size=512, max_context=max_context)
  return stats.row(bytes_per_block=1)


def test_partial_last_block():
  r = _req(0, [1, 2], B + 100)
  toks = traces.request_tokens(r, vocab_size=512)
  assert toks.size == B + 100
  np.testing.assert_array_equal(toks[B:], traces.block_id_tokens(2, vocab_size=512, seed=0)[:100])
  # The cache shares only full cache blocks: of the 100-token tail, 96 (6 x 16) are hit.
  row = _replay([_req(0, [1, 2], B + 100), _req(1, [1, 2], B + 100, 0, 10.0)])
  assert row["hit_tokens"] == B + 96
  assert traces.direct_hit_tokens([r, r]) == B + 100  # the README's count takes it all


# --------------------------------------------------------------- the no-model replay
# Hand-computed replays (block 16, so a 512-token trace block is 32 cache blocks) on a
# pool of 80 blocks; prefill 1,000 tokens/s, nothing generated.
HAND = ReplayConfig(max_concurrency=4, prefill_tokens_per_s=1000.0)


def test_no_model_replay_equals_the_hand_computed_eviction_story():
  """r0 [1, 2] holds blocks 0-63 until 1.024 s; released tail first, so its id-2 blocks
  are the oldest cached. r1 [1, 3] at 2 s hits id 1 (32 blocks), takes the 16 never-used
  blocks and evicts 16 (r0's logical 63..48). r2 [1, 2] at 4 s hits id 1 and r0's id-2
  blocks 32..47 still cached (48 blocks), and evicts 16 of r1's id-3 tail for the rest."""
  reqs = [_req(0, [1, 2], 2 * B, 0, 0.0), _req(1, [1, 3], 2 * B, 0, 2.0),
          _req(2, [1, 2], 2 * B, 0, 4.0)]
  row = _replay(reqs, 80, cfg=HAND)
  assert (row["requests"], row["hit_tokens"], row["evicted_blocks"]) == (3, 32 * 16 + 48 * 16,
                                                                         32)
  assert row["computed_prefill_tokens"] == 3 * 2 * B - row["hit_tokens"]
  assert row["peak_kv_bytes_used"] == 64 and row["peak_concurrency"] == 1
  assert row["hit_ratio"] == row["hit_tokens"] / row["prompt_tokens"]
  assert row["mean_queue_wait_s"] == 0.0 and row["skipped_requests"] == 0
  # Dense, same pool: every request reserves its own 64 blocks; nothing is ever shared.
  dense = _replay(reqs, 80, cfg=HAND, backend="dense")
  assert (dense["hit_tokens"], dense["evicted_blocks"], dense["peak_kv_bytes_used"]) == (0, 0, 64)
  assert dense["computed_prefill_tokens"] == 3 * 2 * B


def test_pool_full_waits_at_the_head_of_the_line():
  """r0 holds 64 of 80 blocks until 1.024 s. r1 (64 blocks) arrives at 0.1 s and gets
  `PoolFull`: it waits. r2 (16 blocks) would fit at 0.2 s but waits behind r1 (FIFO, head
  of line); both are admitted when r0 finishes, r1 first (evicting 48 of r0's cached
  blocks), then r2 (evicting the other 16)."""
  reqs = [_req(0, [1, 2], 2 * B, 0, 0.0), _req(1, [3, 4], 2 * B, 0, 0.1),
          _req(2, [5], B // 2, 0, 0.2)]
  row = _replay(reqs, 80, cfg=HAND)
  assert row["requests"] == 3 and row["peak_concurrency"] == 2
  assert row["mean_queue_wait_s"] == pytest.approx((0 + (1.024 - 0.1) + (1.024 - 0.2)) / 3)
  assert row["evicted_blocks"] == 48 + 16 and row["peak_kv_bytes_used"] == 80
  # A slot limit holds the line the same way: with one slot r2 waits for r1 too.
  one = _replay(reqs, 80, cfg=ReplayConfig(max_concurrency=1, prefill_tokens_per_s=1000.0))
  assert one["peak_concurrency"] == 1
  assert one["mean_queue_wait_s"] == pytest.approx(
      (0 + (1.024 - 0.1) + (1.024 + 1.024 - 0.2)) / 3)


def test_long_context_is_skipped_and_counted():
  """A request whose prompt + output exceed the context (600 here) is skipped and counted
  in its own column unless the limit is lifted; one larger than the whole pool is skipped
  as never fitting."""
  reqs = [_req(0, [1], 500, 99, 0.0), _req(1, [1, 2], 600, 1, 1.0), _req(2, [3], 100, 0, 2.0),
          _req(3, [4, 5, 6], 3 * B, 0, 3.0)]
  cfg = ReplayConfig(max_concurrency=4)
  row = _replay(reqs, 60, cfg=cfg, max_context=600)
  assert (row["requests"], row["skipped_long_context"], row["skipped_requests"]) == (2, 2, 0)
  assert row["prompt_tokens"] == 600
  row = _replay(reqs, 60, cfg=cfg, max_context=None)
  assert (row["requests"], row["skipped_long_context"], row["skipped_requests"]) == (3, 0, 1)
  assert row["hit_tokens"] == 496  # r1 hits r0's 31 full blocks of id 1
  tiny_cfg = config.get_config("tiny")
  assert (tiny_cfg.context_limit(False) == tiny_cfg.max_position_embeddings
          and tiny_cfg.context_limit(True) is None)


def test_dense_reserves_and_never_hits():
  reqs = random_trace(1)
  rows = [_replay(reqs, nb, backend="dense") for nb in (200, None)]
  assert all(r["hit_tokens"] == 0 and r["hit_ratio"] == 0.0 for r in rows)
  assert rows[0]["peak_kv_bytes_used"] <= 200


def test_unbounded_hit_ratio_equals_direct_chain_count():
  reqs = random_trace(2, n=60, partial=False)
  row = _replay(reqs)
  assert row["hit_tokens"] == traces.direct_hit_tokens(reqs) and row["evicted_blocks"] == 0
  reqs = random_trace(3, n=60)  # partial last blocks: only the partial cache block differs
  direct = traces.direct_hit_tokens(reqs)
  assert 0 <= direct - _replay(reqs)["hit_tokens"] < 16 * len(reqs)


def test_hit_ratio_non_decreasing_in_budget():
  reqs = random_trace(4, n=80)
  ratios = [_replay(reqs, nb)["hit_ratio"] for nb in (100, 200, 400, 800, 1600, None)]
  assert ratios == sorted(ratios) and ratios[0] < ratios[-1]


def test_replay_skips_what_never_fits_and_is_deterministic():
  reqs = random_trace(8, n=40)
  big = _req(40, [10**6, 10**6 + 1, 10**6 + 2], 3 * B, 0, reqs[-1].arrival_s)
  row = _replay(reqs + [big], 3 * B // 16 - 1)
  assert row["skipped_requests"] >= 1 and row["requests"] + row["skipped_requests"] == 41
  assert row["evicted_blocks"] > 0 and row["hit_tokens"] > 0
  assert row == _replay(reqs + [big], 3 * B // 16 - 1)


def test_scheduler_refuses_requests_out_of_arrival_order():
  from hq_jax.serve.scheduler import Request, Scheduler
  cache = _cache([_req(0, [1], 16)], 8, cfg=ReplayConfig())
  sched = Scheduler(cache, [Request(0, 1.0, np.zeros(4, np.int32), 0),
                            Request(1, 0.5, np.zeros(4, np.int32), 0)], max_concurrency=2)
  with pytest.raises(ValueError, match="arrival order"):
    sched.enqueue_until(2.0)


# --------------------------------------------------------------------------- loading
def test_load_trace_ok(tmp_path):
  path = _write(tmp_path / "t.jsonl", [_line(0), _line(1500, 1024, 0, (0, 1)), ""])
  reqs = traces.load_trace(path)
  assert [r.arrival_s for r in reqs] == [0.0, 1.5] and reqs[1].output_length == 0
  assert len(traces.load_trace(path, max_requests=1)) == 1


@pytest.mark.parametrize("lines,message", [
    ([], "empty trace"),
    (["{not json"], ":1: not a JSON object"),
    ([_line(), '{"timestamp": 1, "input_length": 5, "output_length": 1}'],
     ":2: missing field 'hash_ids'"),
    ([_line(10), _line(5)], ":2: timestamp goes back in time"),
    ([_line(n=600, ids=(0,))], ":1: 1 hash_ids for input_length 600"),
    ([_line(n=0, ids=())], ":1: input_length must be an integer >= 1"),
    (["[1, 2]"], ":1: not a JSON object"),
    ([_line(ids=(0, 1)), _line(ids=(2, 1))], ":2: hash id 1 follows id 2 but follows id 0 at"),
])
def test_bad_files(tmp_path, lines, message):
  path = _write(tmp_path / "bad.jsonl", lines)
  with pytest.raises(traces.TraceError, match=message) as e:
    traces.load_trace(path)
  assert str(path) in str(e.value)


def test_missing_file_and_unknown_format(tmp_path):
  with pytest.raises(traces.TraceError, match="does not exist"):
    traces.load_trace(str(tmp_path / "nope.jsonl"))
  with pytest.raises(traces.TraceError, match="unknown trace format"):
    traces.load_trace(str(tmp_path / "nope.jsonl"), fmt="csv")


# ------------------------------------------------------------------- model and script
def _serve(tiny, reqs, rcfg, budgets=(0.0,), chunk=64, deadline=None, donate=None,
           engine=True):
  """run_budgets in model mode (or, engine=False, the no-model replay at the model's
  shape): (rows, greedy tokens by (backend, budget) and request index, engine)."""
  from hq_jax.serve.engine import Engine
  params, cfg = tiny
  layout = KVLayout.from_config(cfg, block_size=16)
  eng = Engine(params, cfg, chunk_size=chunk, attention="reference", donate=donate)
  generated = {}
  rows = trace_outputs.run_budgets(reqs, list(budgets), model="tiny", layout=layout, cfg=rcfg,
                                   vocab_size=cfg.vocab_size, engine=eng if engine else None,
                                   deadline=deadline, generated=generated)
  return rows, generated, eng


def test_model_mode_on_tiny(tiny):
  """Model mode: continuous batching through Engine prefill/decode on real caches."""
  reqs = [_req(0, [1], 200, 2, 0.0), _req(1, [1], 300, 2, 0.1), _req(2, [2], 150, 1, 0.2)]
  rcfg = ReplayConfig(max_concurrency=2)
  rows, _, engine = _serve(tiny, reqs, rcfg)
  by = {r["backend"]: r for r in rows}
  assert by["hq_unbounded"]["hit_tokens"] == 192  # 12 full blocks of request 0's 200 tokens
  assert by["hq_unbounded"]["computed_prefill_tokens"] == 200 + (300 - 192) + 150
  assert by["dense"]["hit_tokens"] == 0 and by["dense"]["computed_prefill_tokens"] == 650
  dense = by["dense"]
  assert dense["ttft_p50_ms"] > 0 and dense["ttft_p99_ms"] >= dense["ttft_p50_ms"]
  assert dense["prefill_tokens_per_s_measured"] > 0 and dense["partial"] is False
  assert dense["host_admit_ms_mean"] > 0
  assert dense["requests"] == 3 and dense["decode_steps"] >= 1
  # The warm-up (every decode batch size compiled first) leaves nothing behind.
  from hq_jax.serve import scheduler
  layout = KVLayout.from_config(tiny[1], block_size=16)
  cache = scheduler.warm_up(engine, DedupKVCache.init(layout, num_blocks=64, max_requests=2,
                                                      max_seq_len=400), 2)
  assert not cache.active.any() and cache.held_blocks == 0 and cache.cached_blocks == 0


def test_model_and_no_model_replays_share_the_accumulator(tiny):
  """The same requests through the model and without it give rows with the same columns
  and, where timing cannot matter (requests far apart, chunk = block, so a hit skips
  exactly its blocks), the same values: hits, evictions (forced by a 20-block pool), peak
  blocks, computed tokens; the timing columns only with a model."""
  reqs = [_req(0, [1], 200, 5, 0.0), _req(1, [2], 200, 5, 50.0), _req(2, [1], 200, 5, 100.0)]
  rcfg = ReplayConfig(max_concurrency=2)
  layout = KVLayout.from_config(tiny[1], block_size=16)
  budget = 20.5 * layout.bytes_per_block / 1e9
  model, _, _ = _serve(tiny, reqs, rcfg, budgets=(budget,), chunk=16)
  no_model, _, _ = _serve(tiny, reqs, rcfg, budgets=(budget,), chunk=16, engine=False)
  assert [list(r) for r in model] == [list(r) for r in no_model]
  assert set(model[0]) == set(trace_outputs.COLUMNS)
  same = ("backend", "requests", "skipped_requests", "skipped_long_context", "prompt_tokens",
          "hit_tokens", "hit_ratio", "computed_prefill_tokens", "evicted_blocks",
          "peak_kv_bytes_used", "peak_concurrency")
  for m, n in zip(model, no_model):
    assert {k: m[k] for k in same} == {k: n[k] for k in same}, m["backend"]
  hq = {r["backend"]: r for r in model}["hq"]
  # r0 (13 blocks) leaves 12 registered ones cached; r1 takes the 8 free and evicts the 5
  # oldest (r0's tail); r2 hits r0's first 7, takes r1's freed partial block and evicts 5.
  assert (hq["hit_tokens"], hq["evicted_blocks"]) == (7 * 16, 10)
  assert hq["peak_kv_bytes_used"] == 13 * layout.bytes_per_block
  for rows, timed in ((model, True), (no_model, False)):
    for r in rows:
      if r["backend"] != "hq_unbounded":
        assert (r["ttft_p50_ms"] is not None) == timed and (r["decode_steps"] is not None) == timed
        # The model rows say which decode contract they ran under (issue 26).
        assert r["invariance"] == ("batch_invariant" if timed else "")
      assert r["hit_ratio"] == r["hit_tokens"] / r["prompt_tokens"]
      assert 0 < r["mean_kv_bytes_used"] <= r["peak_kv_bytes_used"]


def test_batched_decode_matches_one_request_at_a_time(tiny):
  """Continuous batching gives every request the greedy tokens it gets alone, on a budget
  that forces HQ to evict; dense reserves only each request's own tokens, so it runs
  requests concurrently."""
  from hq_jax.kv.dense import DenseKVCache
  params, cfg = tiny
  reqs = [_req(0, [1, 2], 700, 5, 0.0), _req(1, [1, 3], 600, 3, 0.0),
          _req(2, [1, 2, 4], 1100, 6, 0.0), _req(3, [5], 90, 1, 0.0),
          _req(4, [7, 8, 9], 1500, 2, 0.0), _req(5, [1, 2], 800, 4, 0.0),
          _req(6, [6], 300, 2, 0.0)]
  rcfg = ReplayConfig(max_concurrency=4)
  layout = KVLayout.from_config(cfg, block_size=16)
  budget = 100.5 * layout.bytes_per_block / 1e9  # 100 blocks: request 4 alone needs 94
  # Donating, as on a GPU.
  rows, generated, engine = _serve(tiny, reqs, rcfg, budgets=(budget,), chunk=128, donate=True)
  by = {r["backend"]: r for r in rows}
  assert by["hq"]["evicted_blocks"] > 0 and by["hq"]["hit_tokens"] > 0
  assert by["dense"]["peak_concurrency"] > 1  # not one max_seq_len reservation each
  assert by["dense"]["decode_steps"] < sum(r.output_length - 1 for r in reqs)  # batched
  for name in ("dense", "hq"):
    assert all(np.isfinite([by[name]["ttft_p50_ms"], by[name]["ttft_p99_ms"]]))
    assert by[name]["requests"] == len(reqs)
    for r in reqs:
      alone = DenseKVCache.init(layout, num_blocks=100, max_requests=1, max_seq_len=1600)
      prompt = traces.request_tokens(r, vocab_size=cfg.vocab_size)
      _, _, want = engine.generate(alone, prompt, r.output_length)
      assert generated[(name, budget)][r.index] == want, (name, r.index)
  # Hits skip whole cached chunks only.
  assert by["hq"]["computed_prefill_tokens"] < by["dense"]["computed_prefill_tokens"]


def test_time_limit_marks_rows_partial(tiny):
  import time
  reqs = [_req(i, [i], 100, 2, 0.01 * i) for i in range(6)]
  rows, _, _ = _serve(tiny, reqs, ReplayConfig(max_concurrency=2),
                      deadline=time.perf_counter())
  dense = {r["backend"]: r for r in rows}["dense"]
  assert dense["partial"] is True and dense["requests"] < len(reqs)
  assert {r["backend"]: r for r in rows}["hq_unbounded"]["partial"] is False


def test_script(tmp_path):
  import subprocess
  import sys
  root = os.path.join(os.path.dirname(__file__), "..")
  run = lambda *a: subprocess.run([sys.executable, "scripts/trace_replay.py", *a], cwd=root,
                                  capture_output=True, text=True, timeout=120)
  lines = [json.dumps(dict(timestamp=100 * r.arrival_s, input_length=r.input_length,
                           output_length=r.output_length, hash_ids=list(r.hash_ids)))
           for r in random_trace(9, n=40)]
  trace = _write(tmp_path / "t.jsonl", lines)
  out = tmp_path / "out"
  proc = run(f"--trace={trace}", "--no_model", "--kv_budget_gb=0,0.001,0.01",
             f"--output_dir={out}", "--capacity_context_lengths=1024")
  assert proc.returncode == 0, proc.stderr[-2000:]
  summary = json.loads((out / "summary.json").read_text())
  assert [r["backend"] for r in summary["rows"]] == ["hq_unbounded", "dense", "dense", "hq",
                                                     "dense", "hq"]
  assert summary["ledger_row"]["supported"] in ("yes", "mixed", "no")
  assert (out / "trace_replay.png").stat().st_size > 0
  header = (out / "trace_replay.csv").read_text().splitlines()[0]
  assert header.endswith("decode_steps,partial,ttft_p50_ms,ttft_p90_ms,ttft_p99_ms,"
                         "prefill_tokens_per_s_measured,host_admit_ms_mean,run_id")
  run_id = summary["run_id"]  # the CSV rows and the summary carry this run's id
  assert (out / "trace_replay.csv").read_text().splitlines()[1].endswith(
      f",,False,,,,,,{run_id}")
  assert summary["partial"] is False
  record = json.loads((out / "trace_replay.run.json").read_text())
  assert record["run_id"] == run_id and record["status"] == "complete"
  assert all(r["checked_by_replay"] for r in summary["capacity"])
  # The report's ledger carries the replay's verdict, recomputed from the CSV rows; a
  # tampered row (a hit count no replay gave) is refused.
  from hq_jax.study import report
  with open(report.write(str(out))) as f:
    assert summary["ledger_row"]["verdict"] in f.read()
  with open(out / "trace_replay.csv", newline="") as f:
    table = list(csv.reader(f))  # csv: the mesh label holds a comma (quoted)
  table[4][table[0].index("computed_prefill_tokens")] = "1"
  with open(out / "trace_replay.csv", "w", newline="") as f:
    csv.writer(f, lineterminator="\n").writerows(table)
  with pytest.raises(report.ReportError, match="ledger row is not what"):
    report.write(str(out))
  # Errors name the flag or the file and line, before anything is written.
  proc = run(f"--trace={trace}", "--no_model", f"--output_dir={out}")
  assert proc.returncode != 0 and "--output_dir" in proc.stderr and "--overwrite" in proc.stderr
  bad = _write(tmp_path / "bad.jsonl", [_line(), "oops"])
  proc = run(f"--trace={bad}", "--no_model", f"--output_dir={tmp_path / 'o2'}")
  assert proc.returncode != 0 and f"{bad}:2: not a JSON object" in proc.stderr
  assert not os.path.exists(tmp_path / "o2")


def test_capacity_analytic_matches_the_real_caches():
  for nb, length, frac in [(100, 160, 0.5), (100, 160, 0.9), (64, 1000, 0.0), (10, 300, 0.5)]:
    shared, dense, hq = trace_outputs.capacity_analytic(nb, length, frac, 16)
    assert trace_outputs.capacity_replayed(nb, length, shared, 16, "dense", dense) == dense
    assert trace_outputs.capacity_replayed(nb, length, shared, 16, "hq", hq) == hq
  assert trace_outputs.capacity_analytic(100, 160, 0.5, 16) == (5, 10, 19)  # 10 + 9 * 10 < 100
  assert trace_outputs.capacity_analytic(10, 300, 0.5, 16) == (9, 0, 0)  # 19 blocks > pool


def test_time_scale_and_output_cap():
  reqs = random_trace(10, n=40)
  base = _replay(reqs)
  fast = ReplayConfig(max_concurrency=64, prefill_tokens_per_s=1000.0, decode_tokens_per_s=2.0,
                      time_scale=0.01, max_output_tokens=1)
  squeezed = _replay(reqs, cfg=fast)
  assert squeezed["replay_span_s"] < base["replay_span_s"]
  assert squeezed["peak_concurrency"] > SLOW.max_concurrency
  with pytest.raises(ValueError, match="time_scale"):
    ReplayConfig(time_scale=0.0)


def test_script_model_mode_on_tiny(tmp_path):
  """The CLI's model mode end to end: window, time limit, outputs and the printed table."""
  import subprocess
  import sys
  root = os.path.join(os.path.dirname(__file__), "..")
  lines = [_line(0, 100, 3, (0,)), _line(200, 600, 2, (0, 1)), _line(400, 80, 1, (2,)),
           _line(9000, 50, 1, (3,))]  # the last arrives after --window_s
  trace = _write(tmp_path / "t.jsonl", lines)
  out = tmp_path / "out"
  proc = subprocess.run(
      [sys.executable, "scripts/trace_replay.py", f"--trace={trace}", "--model=tiny",
       "--dtype=float32", "--attention=reference", "--chunk_size=64", "--window_s=5",
       "--kv_budget_gb=0.001", "--max_concurrency=2", "--time_limit_s=300",
       f"--output_dir={out}", "--capacity_context_lengths=256"],
      cwd=root, capture_output=True, text=True, timeout=240)
  assert proc.returncode == 0, proc.stderr[-2000:]
  summary = json.loads((out / "summary.json").read_text())
  assert summary["partial"] is False and summary["trace"]["requests"] == 3
  rows = {r["backend"]: r for r in summary["rows"]}
  assert rows["dense"]["requests"] == rows["hq"]["requests"] == 3
  assert rows["hq"]["hit_tokens"] == 96 and rows["hq"]["ttft_p99_ms"] > 0
  assert "TTFT p50" in proc.stdout and "prefill tok/s" in proc.stdout
