"""The honest harness: the acceptance invocation, reproducibility, the formula on every row,
the seed's three accounting mistakes each caught, the ledger and the report."""

import csv
import io
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from hq_jax.serve.engine import Engine
from hq_jax.study import errors, ledger, memory, outputs, report
from hq_jax.study.errors import HarnessError
from hq_jax.kv.paged import KVLayout
from hq_jax.study.requests import TokenStream

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _sweep_script(out):
  proc = subprocess.run(
      [sys.executable, "scripts/memory_sweep.py", "--model=tiny", "--context_lengths=256,1024",
       "--concurrency=1,8", "--shared_prefix_fractions=0.75", f"--output_dir={out}"],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return (out / "memory_sweep.csv").read_text()


def _drop_timing(text):
  rows = list(csv.reader(io.StringIO(text)))
  # Timing varies between runs, and each run has its own id; everything else is exact.
  keep = [i for i, c in enumerate(rows[0])
          if c not in memory.TIMING_COLUMNS and c != outputs.RUN_ID]
  return [[r[i] for i in keep] for r in rows]


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("sweep")
  _sweep_script(out)
  return out


@pytest.fixture(scope="module")
def sweep_csv(sweep_dir):
  return (sweep_dir / "memory_sweep.csv").read_text()


def test_acceptance_invocation_rows_match_the_formula(sweep_csv):
  rows = memory.read_csv_text(sweep_csv)
  assert len(rows) == 8 and {r["backend"] for r in rows} == {"dense", "hq"}
  for r in rows:
    assert r["tokens_per_request"] == r["context_length"]
    n, c, p, tok = (r["context_length"], r["concurrency"], r["shared_prefix_tokens"],
                    r["bytes_per_token"])
    assert p == int(0.75 * n) // 16 * 16
    blk = 16 * tok
    if r["backend"] == "dense":
      assert r["kv_bytes_used"] == c * n * tok
      assert r["kv_bytes_allocated"] == c * r["max_seq_len"] * tok
    else:
      assert r["kv_bytes_used"] == (p // 16 + c * (n - p) // 16) * blk
      # HQ's pool holds what the requests need (not c * n): a row's pool shows the saving.
      # (Sizes here are whole blocks, so the pool is exactly what it holds.)
      assert r["pool_bytes"] == r["kv_bytes_used"]
      assert c == 1 or r["pool_bytes"] < c * n * tok
    # The row's own peak (XLA's accounting): at least its pool, and the pool's copy in the
    # step's outputs (no donation on CPU).
    assert r["peak_device_bytes"] >= 2 * r["pool_bytes"]
    assert r["process_peak_bytes"] is None  # CPU's allocator reports none: left empty.
    assert r["attention"] == "reference"  # What ran: "auto" is the XLA reference on CPU.
    assert r["ttft_ms"] > 0


def test_peak_device_bytes_is_the_rows_own(sweep_csv):
  rows = memory.read_csv_text(sweep_csv)
  for n, c in [(1024, 8), (256, 8)]:
    dense, hq = [next(r for r in rows if r["backend"] == b and r["context_length"] == n
                      and r["concurrency"] == c) for b in ("dense", "hq")]
    # Sharing 3/4 of every request: HQ's pool, and so its peak, is the smaller one, though
    # its row ran after dense's (a process-wide running peak could never go down).
    assert hq["peak_device_bytes"] < dense["peak_device_bytes"]
    assert dense["peak_device_bytes"] - hq["peak_device_bytes"] >= (
        dense["pool_bytes"] - hq["pool_bytes"])


def test_same_seed_gives_byte_identical_csv(sweep_csv, tmp_path):
  again = _sweep_script(tmp_path)
  assert _drop_timing(again) == _drop_timing(sweep_csv)


@pytest.fixture(scope="module")
def tiny_setup(tiny):
  params, cfg = tiny
  layout = KVLayout.from_config(cfg, 16)
  stream = TokenStream((np.arange(5000) * 7919) % cfg.vocab_size)
  return Engine(params, cfg, chunk_size=32), layout, stream


def _point(tiny_setup, **kw):
  engine, layout, stream = tiny_setup
  args = dict(model="tiny", context_length=128, concurrency=2, shared_prefix_fraction=0.5,
              num_prefixes=1, max_seq_len=0, seed=0)
  args.update(kw)
  return memory.run_point(engine, layout, stream, **args)


def test_a_points_timed_prefills_never_compile(tiny_setup, monkeypatch):
  """run_point warms up on one chunk only; every prefill it then times (dense and HQ, a
  prefix found cached, chunks skipped) must run executables that chunk compiled."""
  real, compiles = memory.run_requests, []

  def counted(*args, **kwargs):
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, _, **kw: compiles.append(event)
        if event == "/jax/core/compile/backend_compile_duration" else None)
    try:
      return real(*args, **kwargs)
    finally:
      jax.monitoring.clear_event_listeners()

  monkeypatch.setattr(memory, "run_requests", counted)
  dense, hq = _point(tiny_setup, context_length=160, concurrency=3, shared_prefix_fraction=0.5)
  assert hq["computed_tokens"] < dense["computed_tokens"]  # chunks were skipped
  assert compiles == [], f"{len(compiles)} compilations in a point's timed prefills"


def test_seed_mistake_dense_allocation_reported_as_use(tiny_setup):
  dense, _ = _point(tiny_setup, max_seq_len=512)
  assert dense["kv_bytes_allocated"] > dense["kv_bytes_used"]
  seed_style = dict(dense, kv_bytes_used=dense["kv_bytes_allocated"])
  with pytest.raises(HarnessError, match="differs from the analytic prediction"):
    memory.check_row(seed_style)


def test_seed_mistake_requests_capped_below_their_label(tiny_setup, monkeypatch):
  real = memory.grid_requests

  def capped(stream, *, context_length, **kw):  # The seed's std::min clamps, scaled down.
    return real(stream, context_length=min(context_length, 96), **kw)

  monkeypatch.setattr(memory, "grid_requests", capped)
  with pytest.raises(HarnessError, match="capped below their label"):
    _point(tiny_setup, context_length=256)


def test_seed_mistake_concurrency_one_presented_as_reuse(tiny_setup, monkeypatch):
  real = memory.run_requests

  def with_iterations(engine, cache, requests):  # Warm-up iterations of the same request.
    for _ in range(3):
      cache, res = real(engine, cache, requests)
      cache = cache.release(res[0].slot)
    return real(engine, cache, requests)

  monkeypatch.setattr(memory, "run_requests", with_iterations)
  with pytest.raises(HarnessError, match="concurrency 1"):
    _point(tiny_setup, concurrency=1)
  # And the ledger never cites concurrency-1 rows as compression.
  monkeypatch.setattr(memory, "run_requests", real)
  rows = _point(tiny_setup, concurrency=1)
  assert ledger.compression_concurrent(rows)["supported"] == ledger.UNTESTED
  assert ledger.no_reuse_at_concurrency_one(rows)["supported"] == ledger.SUPPORTED


def test_ledger_refutes_a_logit_difference():
  ppl = {"max_abs_logit_diff": {"full_prefill": 0.0, "prefix_reuse": 1e-6},
         "prefix_reuse": {"cached_tokens": 64}, "num_tokens": 128,
         "dense": {"ppl": 10.0}, "hq": {"ppl": 10.0}}
  assert ledger.bit_identical(ppl)["supported"] == ledger.REFUTED
  assert ledger.bit_identical(None)["supported"] == ledger.UNTESTED


def test_latency_and_report(tiny_setup, tmp_path, sweep_dir):
  from hq_jax.study import latency
  engine, layout, stream = tiny_setup
  rows = latency.run_point(engine, layout, stream, model="tiny", context_length=128,
                           concurrency=2, shared_prefix_fraction=0.5, repeats=2, warmup=1,
                           seed=0)
  assert [r["mode"] for r in rows] == ["dense", "hq_cold", "hq_warm"]
  warm = rows[2]
  assert warm["cached_tokens"] == 64 and warm["computed_tokens"] == 64
  assert all(r["ttft_ms_min"] <= r["ttft_ms_median"] <= r["ttft_ms_max"] for r in rows)
  with outputs.Run(str(tmp_path), "latency", ["latency.csv"]) as run:
    run.write_csv("latency.csv", rows, latency.COLUMNS)
    run.finish()
  for name in ("memory_sweep.csv", "memory_sweep.run.json", "workloads.csv"):
    (tmp_path / name).write_text((sweep_dir / name).read_text())
  path = report.write(str(tmp_path))
  text = open(path).read()
  assert "## Claims ledger" in text and "HQ stores less KV than dense" in text
  for png in ("kv_bytes_vs_context.png", "reuse_factor.png", "ttft.png"):
    assert os.path.getsize(tmp_path / png) > 1000
  claims = json.loads((tmp_path / "ledger.json").read_text())
  by_claim = {c["claim"]: c for c in claims}
  assert by_claim["HQ stored KV is flat in context length"]["supported"] == ledger.REFUTED
  assert by_claim["Every request has exactly its context_length label's tokens"][
      "supported"] == ledger.SUPPORTED
  assert by_claim["Peak device memory during prefill is reduced"][
      "supported"] == ledger.SUPPORTED


def test_ledger_peak_claim_needs_per_row_peaks_and_can_refute(sweep_csv):
  rows = memory.read_csv_text(sweep_csv)
  assert ledger.peak_memory(rows)["supported"] == ledger.SUPPORTED
  blank = [dict(r, peak_device_bytes=None) for r in rows]
  assert ledger.peak_memory(blank)["supported"] == ledger.UNTESTED
  swapped = [dict(r, peak_device_bytes=(1 if r["backend"] == "dense" else 2)) for r in rows]
  assert ledger.peak_memory(swapped)["supported"] == ledger.REFUTED


def _copy_sweep(sweep_dir, to):
  for name in ("memory_sweep.csv", "memory_sweep.run.json", "workloads.csv"):
    (to / name).write_text((sweep_dir / name).read_text())


def _csv_text(rows) -> str:
  """Rows as a CSV file's text (quoted where a cell holds a comma, as the writer does)."""
  out = io.StringIO()
  csv.writer(out, lineterminator="\n").writerows(rows)
  return out.getvalue()


def test_report_refuses_a_tampered_row(sweep_dir, tmp_path):
  """Issue 14 defect 2: one edited kv_bytes_used gave rc 0 and "equal to the analytic
  prediction on every row", above the tampered row itself."""
  _copy_sweep(sweep_dir, tmp_path)
  assert report.write(str(tmp_path))  # Honest: accepted.
  os.remove(tmp_path / "report.md")
  text = (tmp_path / "memory_sweep.csv").read_text()
  rows = list(csv.reader(io.StringIO(text)))
  col = rows[0].index("kv_bytes_used")
  pred = rows[0].index("kv_bytes_predicted")
  tampered = [list(r) for r in rows]
  tampered[4][col] = str(int(tampered[4][col]) // 2)
  (tmp_path / "memory_sweep.csv").write_text(
      _csv_text(tampered))
  with pytest.raises(report.ReportError,
                     match=r"memory_sweep.csv data row 4: .*kv_bytes_used .* differs"):
    report.write(str(tmp_path))
  # Editing the prediction along with it does not help: it is recomputed from the row.
  tampered[4][pred] = tampered[4][col]
  (tmp_path / "memory_sweep.csv").write_text(
      _csv_text(tampered))
  with pytest.raises(report.ReportError, match=r"data row 4: .*kv_bytes_predicted"):
    report.write(str(tmp_path))
  assert not (tmp_path / "report.md").exists()
  # The script says so with status 1 and the file's name.
  proc = subprocess.run([sys.executable, "scripts/report.py", f"--run_dir={tmp_path}"],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1 and "memory_sweep.csv data row 4" in proc.stderr


def test_report_refuses_rows_of_another_run(sweep_dir, tmp_path):
  """Issue 14 defect 4: rows were credited to another run's command."""
  _copy_sweep(sweep_dir, tmp_path)
  record = json.loads((tmp_path / "memory_sweep.run.json").read_text())
  record["run_id"] = "0123456789abcdef"
  (tmp_path / "memory_sweep.run.json").write_text(json.dumps(record))
  with pytest.raises(report.ReportError, match="different runs"):
    report.write(str(tmp_path))
  record["run_id"] = json.loads(
      (sweep_dir / "memory_sweep.run.json").read_text())["run_id"]
  record["status"] = "running"  # An interrupted sweep's partial CSV.
  (tmp_path / "memory_sweep.run.json").write_text(json.dumps(record))
  with pytest.raises(report.ReportError, match="did not complete"):
    report.write(str(tmp_path))


def test_exact_logit_comparison_counts_nan_as_a_difference():
  """Issue 14 defect 3: the max-abs-diff helper could call a NaN logit bit-identical."""
  from hq_jax.study import perplexity
  a = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], np.float32)
  b = a.copy()
  assert perplexity.logit_mismatches(a, b) == 0 and perplexity.max_abs_diff(a, b) == 0.0
  b[1, 1] = np.nan
  assert perplexity.logit_mismatches(a, b) == 1
  assert np.isnan(perplexity.max_abs_diff(a, b))
  nan_both = a.copy()
  nan_both[0, 0] = np.nan
  assert perplexity.logit_mismatches(nan_both, nan_both) == 1  # NaN is never "equal".
  b = a.copy()
  b[0, 2] = np.inf
  assert perplexity.max_abs_diff(a, b) == np.inf
  ppl = {"max_abs_logit_diff": {"full_prefill": 0.0, "prefix_reuse": 0.0},
         "logit_mismatches": {"full_prefill": 0, "prefix_reuse": 1},
         "prefix_reuse": {"cached_tokens": 64}, "num_tokens": 128,
         "dense": {"ppl": 10.0}, "hq": {"ppl": 10.0}}
  assert ledger.bit_identical(ppl)["supported"] == ledger.REFUTED
  ppl["logit_mismatches"]["prefix_reuse"] = 0
  assert ledger.bit_identical(ppl)["supported"] == ledger.SUPPORTED
  del ppl["logit_mismatches"]  # An older file: judged by its max |diff|, NaN refuted.
  ppl["max_abs_logit_diff"]["full_prefill"] = float("nan")
  assert ledger.bit_identical(ppl)["supported"] == ledger.REFUTED


def test_chunked_nll_equals_the_whole_array_log_softmax(tiny):
  """token_nll scores one chunk at a time; the numbers are those of the whole array."""
  import jax
  import jax.numpy as jnp
  from hq_jax.study import perplexity
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(300, 512)).astype(np.float32) * 4
  ids = rng.integers(0, 512, size=300)
  logp = jax.nn.log_softmax(jnp.asarray(logits[:-1]), axis=-1)
  whole = np.asarray(-jnp.take_along_axis(logp, jnp.asarray(ids[1:, None]), axis=-1)[:, 0],
                     np.float64)
  np.testing.assert_array_equal(perplexity.token_nll(logits, ids, chunk=64), whole)


def _no_compute(monkeypatch):
  calls = []
  monkeypatch.setattr(memory, "run_point", lambda *a, **k: calls.append(1) or [])
  return calls


@pytest.mark.parametrize("grid, message", [
    (dict(context_lengths=[64, 0]), r"--context_lengths=64,0: 0 is below 1"),
    (dict(context_lengths=[]), r"--context_lengths is empty"),
    (dict(concurrency=[0]), r"--concurrency=0: 0 is below 1"),
    (dict(shared_prefix_fractions=[1.5]), r"--shared_prefix_fractions: 1.5 is not in"),
    (dict(num_prefixes=[-1]), r"--num_prefixes"),
    (dict(context_lengths=[4160]), r"exceed tiny's max_position_embeddings 4096.*"
                                   r"--allow_long_context"),
    (dict(chunk_size_at=["64:24"]), r"--chunk_size_at: '64:24' needs .* multiple of "
                                    r"--block_size=16"),
    (dict(chunk_size_at=["64-32"]), r"--chunk_size_at: '64-32' is not CONTEXT:CHUNK"),
    (dict(chunk_size_at=["64:32", "64:48"]), r"names context length 64 twice"),
    (dict(chunk_size=40), r"--chunk_size=40 must be a positive multiple of --block_size=16"),
])
def test_sweep_checks_every_flag_before_any_compute(tiny, tiny_setup, monkeypatch, grid,
                                                    message):
  """Issue 14 defects 7 and 8: `--context_lengths=64,0` wrote the 64 rows, then raised;
  4,160 tokens on a 4,096-token model ran silently."""
  params, cfg = tiny
  _, _, stream = tiny_setup
  calls = _no_compute(monkeypatch)
  args = dict(context_lengths=[64], concurrency=[2], shared_prefix_fractions=[0.5],
              num_prefixes=[1])
  args.update(grid)
  with pytest.raises(ValueError, match=message):
    memory.sweep(params, cfg, stream, model="tiny", **args)
  assert not calls


def test_long_context_is_allowed_only_when_asked(tiny):
  _, cfg = tiny
  with pytest.raises(ValueError, match="--allow_long_context"):
    errors.check_context_limit(cfg, 4097, "--context_lengths")
  errors.check_context_limit(cfg, 4096, "--context_lengths")
  errors.check_context_limit(cfg, 4160, "--context_lengths", allow_long_context=True)


def test_repetitive_text_is_refused_up_front(tiny, monkeypatch):
  """Issue 14 defect 7: a text too repetitive for distinct suffixes surfaced as
  "allocation reported as use?" after the compute."""
  params, cfg = tiny
  calls = _no_compute(monkeypatch)
  stream = TokenStream(np.tile(np.arange(2), 100))  # 4 suffixes, 2 distinct slices.
  with pytest.raises(ValueError, match="too repetitive"):
    memory.sweep(params, cfg, stream, model="tiny", context_lengths=[128], concurrency=[4],
                 shared_prefix_fractions=[0.5])
  assert not calls
  from hq_jax.study import latency
  with pytest.raises(ValueError, match="too repetitive"):
    latency.sweep(params, cfg, stream, model="tiny", context_lengths=[128], concurrency=[4],
                  shared_prefix_fractions=[0.5])


def test_latency_and_workload_flags(tiny, tiny_setup):
  """Issue 14 defect 7: `--concurrency=0` raised IndexError, `--system_tokens=-5` was
  accepted, `--users=0` failed after the sweep."""
  from hq_jax.study import latency, workloads
  params, cfg = tiny
  _, _, stream = tiny_setup
  with pytest.raises(ValueError, match=r"--concurrency=0: 0 is below 1"):
    latency.sweep(params, cfg, stream, model="tiny", context_lengths=[128], concurrency=[0],
                  shared_prefix_fractions=[0.5])
  sizes = dict(users=4, system_tokens=192, user_tokens=48, examples=3, example_tokens=96,
               turns=4)
  for name, bad in (("system_tokens", -5), ("users", 0), ("turns", 0), ("examples", 0)):
    with pytest.raises(ValueError, match=rf"--{name} must be an integer >= "):
      workloads.run(params, cfg, stream, model="tiny", sizes={**sizes, name: bad})


def test_token_stream_refuses_ids_outside_the_vocabulary():
  """Issue 14 defect 6 (harness inputs): ids >= 2**31 wrapped; floats were accepted."""
  with pytest.raises(ValueError, match="outside the vocabulary"):
    TokenStream(np.array([0, 2**31 + 1] * 40, np.int64), 512)
  with pytest.raises(ValueError, match="outside the vocabulary"):
    TokenStream(np.array([0, 600] * 40), 512)
  with pytest.raises(ValueError, match="must be integers"):
    TokenStream(np.zeros(100, np.float32), 512)


def test_a_pool_that_fills_the_device_exactly_is_allowed_one_block_more_is_refused(monkeypatch):
  """The fit check compares the pool's bytes (K and V counted once) with the device's
  limit: 64 x 128k tokens of the 0.5B shape (103 GB) fit an H200's 138 GB."""
  layout = KVLayout(num_layers=24, num_kv_heads=2, head_dim=64, block_size=16, dtype="bfloat16")
  blocks = 64 * layout.blocks_for(131072)
  limit = blocks * layout.bytes_per_block

  class Device:
    def memory_stats(self):
      return {"bytes_limit": limit}

  monkeypatch.setattr(memory.jax, "devices", lambda: [Device()])
  memory._check_fits(layout, blocks, "dense at 64 x 131072 tokens")  # exactly fits
  with pytest.raises(HarnessError, match="needs a 103.1 GB K/V pool"):
    memory._check_fits(layout, blocks + 1, "dense at 64 x 131072 tokens")


def test_points_that_do_not_fit_beside_the_weights_are_named_not_run(monkeypatch):
  """The 7B shape at 32k x 64 (120 GB of dense K/V) beside 15 GB of weights: the sweep
  skips a point whose dense pool does not fit in what the weights and a step's headroom
  leave, and says why; one block less than that room fits."""
  layout = KVLayout(num_layers=28, num_kv_heads=4, head_dim=128, block_size=16,
                    dtype="bfloat16")
  weights = 15_200_000_000
  need = 64 * layout.blocks_for(32768) * layout.bytes_per_block
  limit = weights + memory.STEP_HEADROOM_BYTES + need

  class Device:
    def memory_stats(self):
      return {"bytes_limit": limit}

  monkeypatch.setattr(memory.jax, "devices", lambda: [Device()])
  monkeypatch.setattr(memory.device_memory, "live_bytes", lambda device=None: weights)
  points = [(32768, 64, 0.9, 1), (32768, 8, 0.9, 1), (4096, 64, 0.0, 1)]
  assert memory.unfit_points(points, layout, 0) == {}  # exactly fits
  # 16 more tokens of dense reservation per request (max_seq_len, every point): one
  # block each, and the points of 64 requests no longer fit.
  unfit = memory.unfit_points(points, layout, 32768 + 16)
  assert list(unfit) == [(32768, 64, 0.9, 1), (4096, 64, 0.0, 1)]
  assert unfit[(32768, 64, 0.9, 1)].startswith(
      "64 x 32768 tokens: the dense pool needs 120.32 GB; 120.26 GB are free")
  del Device.memory_stats  # a platform without a limit (CPU): nothing is skipped
  Device.memory_stats = lambda self: None
  assert memory.unfit_points(points, layout, 0) == {}


def test_chunk_size_at_gives_a_context_length_its_own_chunk(tiny, tiny_setup):
  """Each point prefills in its context length's chunk and says so in its row; HQ skips
  every cached block whatever the chunk: of a 256-token request sharing 128 tokens, HQ's
  second request skips all 128 at chunk 96 too."""
  params, cfg = tiny
  _, _, stream = tiny_setup
  rows = memory.sweep(params, cfg, stream, model="tiny", context_lengths=[128, 256],
                      concurrency=[2], shared_prefix_fractions=[0.5], chunk_size=32,
                      chunk_size_at=["256:96"])
  chunk = {(r["context_length"], r["backend"]): r["chunk_size"] for r in rows}
  assert chunk == {(128, "dense"): 32, (128, "hq"): 32, (256, "dense"): 96,
                   (256, "hq"): 96}
  computed = {(r["context_length"], r["backend"]): r["computed_tokens"] for r in rows}
  assert computed == {(128, "dense"): 256, (128, "hq"): 256 - 64, (256, "dense"): 512,
                      (256, "hq"): 512 - 128}
  assert "chunk_size" in memory.COLUMNS


def test_the_sweep_runs_every_point_but_the_skipped_ones(tiny, tiny_setup, monkeypatch):
  params, cfg = tiny
  _, _, stream = tiny_setup
  ran, skipped = [], []
  monkeypatch.setattr(memory, "run_point",
                      lambda *a, context_length, concurrency, **k:
                      ran.append((context_length, concurrency)) or [])
  monkeypatch.setattr(memory, "unfit_points",
                      lambda points, *a, **k: {p: "too big" for p in points if p[1] == 4})
  memory.sweep(params, cfg, stream, model="tiny", context_lengths=[64, 128],
               concurrency=[2, 4], shared_prefix_fractions=[0.5],
               on_skip=lambda point, reason: skipped.append((point, reason)))
  assert ran == [(64, 2), (128, 2)]
  assert skipped == [((64, 4, 0.5, 1), "too big"), ((128, 4, 0.5, 1), "too big")]


def test_latency_rows_record_decode_rows_and_invariance(tiny, tiny_setup, tmp_path):
  """Issue 26 item 3: the looser (bucketed) decode is an explicit opt-out, recorded in every
  row; the default is the batch-invariant fixed-row step. A bad value is one flag error."""
  from hq_jax.study import cli, latency
  params, cfg = tiny
  _, _, stream = tiny_setup
  grid = dict(model="tiny", context_lengths=[32], concurrency=[2], shared_prefix_fractions=[0.5],
              chunk_size=32, repeats=1, warmup=0)
  default = latency.sweep(params, cfg, stream, **grid)
  loose = latency.sweep(params, cfg, stream, decode_rows=0, **grid)
  assert {(r["decode_rows"], r["invariance"]) for r in default} == {(64, "batch_invariant")}
  assert {(r["decode_rows"], r["invariance"]) for r in loose} == {(0, "bucketed")}
  assert "invariance" in latency.COLUMNS
  import configs.latency
  bad = configs.latency.get_config()
  bad.output_dir, bad.decode_rows = str(tmp_path / "out"), -1
  with pytest.raises(ValueError, match="--decode_rows must be >= 0"):
    cli.validate(bad)
