"""The honest harness: the acceptance invocation, reproducibility, the formula on every row,
the seed's three accounting mistakes each caught, the ledger and the report."""

import csv
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from hq_jax.engine import Engine
from hq_jax.harness import ledger, memory, report
from hq_jax.harness.memory import HarnessError
from hq_jax.kv.paged import KVLayout
from hq_jax.workloads import TokenStream

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
  keep = [i for i, c in enumerate(rows[0]) if c not in memory.TIMING_COLUMNS]
  return [[r[i] for i in keep] for r in rows]


@pytest.fixture(scope="module")
def sweep_csv(tmp_path_factory):
  return _sweep_script(tmp_path_factory.mktemp("sweep"))


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
    assert r["peak_device_bytes"] is None  # CPU reports none: left empty, not invented.
    assert r["ttft_ms"] > 0


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


def test_latency_and_report(tiny_setup, tmp_path, sweep_csv):
  from hq_jax.harness import latency
  engine, layout, stream = tiny_setup
  rows = latency.run_point(engine, layout, stream, model="tiny", context_length=128,
                           concurrency=2, shared_prefix_fraction=0.5, repeats=2, warmup=1,
                           seed=0)
  assert [r["mode"] for r in rows] == ["dense", "hq_cold", "hq_warm"]
  warm = rows[2]
  assert warm["cached_tokens"] == 64 and warm["computed_tokens"] == 64
  assert all(r["ttft_ms_min"] <= r["ttft_ms_median"] <= r["ttft_ms_max"] for r in rows)
  (tmp_path / "latency.csv").write_text(memory.to_csv(rows, latency.COLUMNS))
  (tmp_path / "memory_sweep.csv").write_text(sweep_csv)
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
