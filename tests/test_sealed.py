"""Sealed runs (issue 25): nothing is cited that a complete run did not write, and every bad
input ends a command with one clear line. One test per cause of the issue (items 1-7; items
8-9 are the cache's and the checkpoint's), then a seeded fuzz: one random cell edited, or
one row deleted or duplicated, in a complete sweep's and a complete replay's outputs,
refused every time.

The complete outputs are built once per module at tiny sizes (the sweep in this process,
the replay by its script) and copied for each case; the commands' error paths run in one
driver process per command (absl flags are global to a process). Every subprocess starts
first (`spawned`) and runs while the sweep computes here, so the file stays fast.
"""

import csv
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest

from hq_jax import config as config_lib
from hq_jax import data, tokenizer, weights
from hq_jax.study import errors, latency, memory, outputs, report, workloads
from hq_jax.study.requests import TokenStream

ROOT = os.path.join(os.path.dirname(__file__), "..")
GRID = dict(context_lengths=[32], concurrency=[1, 3], shared_prefix_fractions=[0.5],
            num_prefixes=[1], block_size=16, chunk_size=32, seed=0)
SIZES = dict(users=2, system_tokens=32, user_tokens=16, examples=2, example_tokens=16, turns=2)
LATENCY = dict(context_lengths=[32], concurrency=[2], shared_prefix_fractions=[0.5],
               block_size=16, chunk_size=32, repeats=1, warmup=0, seed=0)


def _env():
  return {**os.environ, "PYTHONPATH": os.path.abspath(ROOT), "JAX_PLATFORMS": "cpu"}


def _script(*args, timeout=300):
  return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout, env=_env())


# Runs each argv through a command's main in one process (flags reset between cases), the
# way `hq-jax COMMAND` does: prints [[exit status, stderr], ...] as JSON.
_DRIVER = r"""
import contextlib, io, json, sys, traceback
from absl import flags
import importlib
module = importlib.import_module(sys.argv[1])
from hq_jax.study import cli
results = []
for argv in json.loads(sys.argv[2]):
  argv = ["hq-jax", *argv]
  err, rc = io.StringIO(), 0
  with contextlib.redirect_stderr(err):
    try:
      flags.FLAGS.unparse_flags()
      flags.FLAGS(argv)
      cli.exit_on_error(module.main)(argv)
    except SystemExit as e:
      if isinstance(e.code, str):
        print(e.code, file=sys.stderr)
      rc = 1 if isinstance(e.code, str) else (e.code or 0)
    except BaseException:
      traceback.print_exc()
      rc = -1
  results.append([rc, err.getvalue()])
print("RESULTS" + json.dumps(results))
"""


def _spawn(args: list[str]) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=_env())


def _wait(proc: subprocess.Popen) -> subprocess.CompletedProcess:
  out, err = proc.communicate(timeout=300)
  return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _drive(command: str, cases: list[list[str]]) -> subprocess.Popen:
  return _spawn(["-c", _DRIVER, f"hq_jax.study.commands.{command}", json.dumps(cases)])


def _driven(proc: subprocess.Popen) -> list[tuple[int, str]]:
  done = _wait(proc)
  assert "RESULTS" in done.stdout, done.stderr[-3000:]
  return [tuple(r) for r in json.loads(done.stdout.split("RESULTS", 1)[1])]


def _one_line(rc, stderr, *needles, status=(1, 2)):
  """A command's failure: status 1 or 2, no traceback, one `error:` line naming the input."""
  assert rc in status, (rc, stderr[-2000:])
  assert "Traceback" not in stderr, stderr[-3000:]
  lines = [l for l in stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1, stderr[-2000:]
  for n in needles:
    assert n in lines[0], (n, lines[0])
  return lines[0]


# ------------------------------------------------------------------ the complete runs


def _sweep_config(**over):
  from configs import memory_sweep
  c = memory_sweep.get_config().to_dict()
  c.update(model="tiny", workloads=True, **GRID, **SIZES, **over)
  return c


def _latency_config():
  from configs import latency as latency_config
  c = latency_config.get_config().to_dict()
  c.update(model="tiny", **LATENCY)
  return c


@pytest.fixture(scope="module")
def stream():
  _, _, tok = weights.load_model("tiny")
  ids = tokenizer.encode_text(tok, data.read_text("")[:60_000], vocab_size=512)
  return TokenStream(ids, 512)


@pytest.fixture(scope="module")
def sweep_dir(tiny, stream, spawned, tmp_path_factory):
  """A complete memory sweep (with workloads) and latency run, as the scripts write them."""
  params, cfg = tiny
  out = str(tmp_path_factory.mktemp("sealed_sweep"))
  with outputs.Run(out, "memory_sweep", ["memory_sweep.csv", "workloads.csv"],
                   record={"command": "test", "config": _sweep_config()}) as run:
    rows = memory.sweep(params, cfg, stream, model="tiny", **GRID)
    run.write_csv("memory_sweep.csv", rows, memory.COLUMNS)
    wrows = workloads.run(params, cfg, stream, model="tiny", sizes=SIZES, block_size=16,
                          chunk_size=32, seed=0)
    run.write_csv("workloads.csv", wrows, workloads.COLUMNS)
    run.finish(skipped_points=[])
  with outputs.Run(out, "latency", ["latency.csv"],
                   record={"command": "test", "config": _latency_config()}) as run:
    lrows = latency.sweep(params, cfg, stream, model="tiny", **LATENCY)
    run.write_csv("latency.csv", lrows, latency.COLUMNS)
    run.finish()
  report.write(out)  # complete and honest: accepted
  return out


def _trace_lines(seed=0, n=30):
  rng = random.Random(seed)
  lines, t = [], 0
  for i in range(n):
    t += rng.randint(10, 400)
    ids = rng.choice([[0, 1], [0, 2], [3]]) + [1000 + 10 * i + j for j in range(rng.randint(1, 4))]
    lines.append(json.dumps(dict(timestamp=t, input_length=512 * len(ids) - rng.randint(0, 300),
                                 output_length=rng.randint(1, 40), hash_ids=ids)))
  return "\n".join(lines) + "\n"


REPLAY_ARGS = ["--no_model", "--model=tiny", "--kv_budget_gb=0,0.002,0.01",
               "--host_kv_budget_gb=0,0.004", "--capacity_context_lengths=1024"]


_KILL_AFTER_CSV = (
    "import os, signal, sys\n"
    "from hq_jax.study import outputs\n"
    "write = outputs.Run.write_csv\n"
    "def killing(self, name, *a, **k):\n"
    "  path = write(self, name, *a, **k)\n"
    "  if name == 'trace_replay.csv':\n"
    "    os.kill(os.getpid(), signal.SIGKILL)\n"
    "  return path\n"
    "outputs.Run.write_csv = killing\n"
    "from hq_jax.study.commands import replay\n"
    "replay.run(sys.argv)\n")


@pytest.fixture(scope="module")
def spawned(tiny, tmp_path_factory):
  """Every subprocess of the module, started at once; each test waits for its own."""
  tmp = tmp_path_factory.mktemp("sealed_inputs")
  trace = tmp / "t.jsonl"
  trace.write_text(_trace_lines())
  bad = tmp / "bad.jsonl"
  bad.write_bytes(_trace_lines(n=3).encode() + b'{"timestamp": 1, "x": "\xff"}\n')
  afile = tmp / "afile"
  afile.write_text("x")
  paths = dict(trace=str(trace), bad=str(bad), afile=str(afile), out=str(tmp / "out"),
               replay=str(tmp / "replay"), killed=str(tmp / "killed"),
               truncated=_hf_dir(tiny, tmp / "truncated", truncate=True),
               empty_cfg=_hf_dir(tiny, tmp / "empty_cfg", config_text="{}"),
               bad_json=_hf_dir(tiny, tmp / "bad_json", config_text="{oops"))
  p = paths
  sweep = ["--model=tiny", "--context_lengths=32", "--concurrency=2",
           "--shared_prefix_fractions=0.5", "--workloads=false"]
  sweep_cases = [
      ([*sweep, f"--output_dir={p['afile']}/sub"], (p["afile"],), 1),
      ([*sweep, "--output_dir=/proc/hq_jax_sealed_test/out"], ("/proc/hq_jax_sealed_test",), 1),
      ([sweep[0], "--context_lengths=abc", f"--output_dir={p['out']}"],
       ("--context_lengths=abc",), 2),
      ([f"--model={p['truncated']}", *sweep[1:], f"--output_dir={p['out']}"],
       (f"{p['truncated']}/model.safetensors",), 1),
      ([f"--model={p['empty_cfg']}", *sweep[1:], f"--output_dir={p['out']}"],
       (f"{p['empty_cfg']}/config.json",), 1),
      ([f"--model={p['bad_json']}", *sweep[1:], f"--output_dir={p['out']}"],
       (f"{p['bad_json']}/config.json", "not valid JSON"), 1),
      (["--model=bogus", *sweep[1:], f"--output_dir={p['out']}"], ("bogus",), 1),
      ([sweep[0], "--context_lengths=8192", f"--output_dir={p['out']}"],
       ("--context_lengths", "--allow_long_context"), 1),
  ]
  replay = [f"--trace={p['trace']}", *REPLAY_ARGS]
  replay_cases = [
      ([*replay[:-2], "--kv_budget_gb=abc", f"--output_dir={p['out']}"],
       ("--kv_budget_gb=abc",), 2),
      ([f"--trace={p['bad']}", *REPLAY_ARGS, f"--output_dir={p['out']}"],
       (f"{p['bad']}:4", "UTF-8"), 2),
      ([*replay, f"--output_dir={p['afile']}/sub"], (p["afile"],), 2),
      ([*replay, "--host_kv_budget_gb=0,-4", f"--output_dir={p['out']}"],
       ("--host_kv_budget_gb", ">= 0"), 2),
      ([*replay, "--host_kv_budget_gb=0,0", f"--output_dir={p['out']}"],
       ("--host_kv_budget_gb", "twice"), 2),
      ([*replay, "--host_kv_budget_gb=1e-12", f"--output_dir={p['out']}"],
       ("--host_kv_budget_gb=1e-12", "less than one KV block"), 2),
      ([*replay, "--host_memory=gpu", f"--output_dir={p['out']}"], ("--host_memory",), 2),
  ]
  procs = dict(
      replay=_spawn(["scripts/trace_replay.py", *replay, f"--output_dir={p['replay']}"]),
      killed=_spawn(["-c", _KILL_AFTER_CSV, *replay, f"--output_dir={p['killed']}"]),
      sweep_cases=_drive("sweep", [c[0] for c in sweep_cases]),
      replay_cases=_drive("replay", [c[0] for c in replay_cases]),
      usage=_spawn(["scripts/trace_replay.py", f"--trace={p['trace']}", "--block_size=7",
                    f"--output_dir={p['out']}"]),
      bad_flag=_spawn(["scripts/memory_sweep.py", "--seed=abc", f"--output_dir={p['out']}"]))
  yield dict(paths=paths, procs=procs, sweep_cases=sweep_cases, replay_cases=replay_cases)
  for proc in procs.values():
    if proc.poll() is None:
      proc.kill()
      proc.communicate()


@pytest.fixture(scope="module")
def trace_file(spawned):
  return spawned["paths"]["trace"]


@pytest.fixture(scope="module")
def replay_dir(spawned):
  proc = _wait(spawned["procs"]["replay"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = spawned["paths"]["replay"]
  report.write(out)  # complete and honest: accepted
  return out


# What report.write makes (outputs.DERIVED_FILES, spelled out so that these tests also run,
# and fail for their cause, against the code before sealed runs).
REPORT_FILES = ("report.md", "ledger.json", "kv_bytes_vs_context.png", "reuse_factor.png",
                "ttft.png")


def _copy(src, tmp_path, name="copy"):
  dst = str(tmp_path / name)
  shutil.copytree(src, dst)
  for f in REPORT_FILES:  # the copy starts without a report
    if os.path.exists(os.path.join(dst, f)):
      os.remove(os.path.join(dst, f))
  return dst


def _rows(path):
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    return reader.fieldnames, list(reader)


def _write_rows(path, header, rows):
  buf = io.StringIO()
  w = csv.DictWriter(buf, fieldnames=header, lineterminator="\n")
  w.writeheader()
  w.writerows(rows)
  with open(path, "w", newline="") as f:
    f.write(buf.getvalue())


def _record_of(d, name):
  for fname, record in outputs.run_records(d).items():
    if name in record.get("files", ()):
      return os.path.join(d, fname), record
  raise AssertionError(name)


def _reseal(d, name, *, rows=True):
  """Rewrites `name`'s seal as if its run had written the file as it is now (a buggy or
  forged writer): only the row checks can then catch a wrong row."""
  path, record = _record_of(d, name)
  data = open(os.path.join(d, name), "rb").read()
  seal = record.get("outputs", {}).get(name)
  if seal is None:  # a record that seals nothing (the code before sealed runs)
    return
  seal.update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
  if rows and name.endswith(".csv"):
    seal["rows"] = len(_rows(os.path.join(d, name))[1])
  with open(path, "w") as f:
    json.dump(record, f)


def _edit(d, name, fn, *, reseal=True):
  header, rows = _rows(os.path.join(d, name))
  header = fn(header, rows) or header
  _write_rows(os.path.join(d, name), header, rows)
  if reseal:
    _reseal(d, name)


def _refused(d, *needles):
  with pytest.raises(report.ReportError) as e:
    report.write(d)
  for n in needles:
    assert n in str(e.value), (n, str(e.value))
  assert "\n" not in str(e.value)
  assert not os.path.exists(os.path.join(d, "report.md"))
  return str(e.value)


def _hq_row(rows, concurrency="3"):
  return next(r for r in rows if r["backend"] == "hq" and r["concurrency"] == concurrency)


def test_complete_outputs_are_accepted(sweep_dir, replay_dir):
  """The fixtures' honest outputs pass (their fixtures ran `report.write`); first in the
  file, so the in-process sweep runs while the module's subprocesses do."""
  for d in (sweep_dir, replay_dir):
    assert all(r["status"] == "complete" and r.get("outputs")
               for r in outputs.run_records(d).values())


# ------------------------------------------------------------- item 1: the replay's seal


def test_killed_replay_is_refused(spawned):
  """Item 1: SIGKILL as soon as trace_replay.csv appears left the record "running" and no
  summary.json, and report.py gave the ledger verdict, status 0."""
  proc = _wait(spawned["procs"]["killed"])
  out = spawned["paths"]["killed"]
  assert proc.returncode == -9, proc.stderr[-2000:]
  assert os.path.exists(os.path.join(out, "trace_replay.csv"))
  assert not os.path.exists(os.path.join(out, "summary.json"))
  _refused(out, "trace_replay.run.json", "did not complete")
  proc = _script("scripts/report.py", f"--run_dir={out}")
  _one_line(proc.returncode, proc.stderr, "did not complete", status=(1,))


def test_replay_rows_are_tied_to_their_record(replay_dir, tmp_path):
  """Item 1: rewritten run ids, a deleted record or run_id column, or an edited hit count
  (summary.json gone) were accepted."""
  d = _copy(replay_dir, tmp_path, "ids")
  record_path, record = _record_of(d, "trace_replay.csv")
  new = "f" * 16
  _edit(d, "trace_replay.csv", lambda h, rows: [r.update(run_id=new) for r in rows] and None,
        reseal=False)
  record["run_id"] = new
  with open(record_path, "w") as f:
    json.dump(record, f)
  _refused(d, "trace_replay.csv", "is not the file run")

  d = _copy(replay_dir, tmp_path, "no_record")
  os.remove(os.path.join(d, "trace_replay.run.json"))
  _refused(d, "trace_replay.csv", "no complete run record")

  d = _copy(replay_dir, tmp_path, "no_run_id")
  _edit(d, "trace_replay.csv",
        lambda h, rows: [r.pop("run_id") for r in rows] and h[:-1], reseal=False)
  _refused(d, "trace_replay.csv")

  d = _copy(replay_dir, tmp_path, "hits")
  os.remove(os.path.join(d, "summary.json"))
  _edit(d, "trace_replay.csv", lambda h, rows: rows[-1].update(
      hit_tokens=str(int(rows[-1]["hit_tokens"]) + 512)), reseal=False)
  _refused(d, "trace_replay.csv")


# -------------------------------------------------------- item 2: derived columns, config


@pytest.mark.parametrize("column, value, message", [
    ("reuse_factor", "9.99", "reuse_factor 9.99 is not"),
    ("physical_blocks", "1", "physical_blocks 1 is not"),
    ("peak_device_bytes", "1000", "below the row's own K/V pool"),
    ("metadata_bytes", "1000000000", "metadata_bytes 1000000000 is not"),
    ("backend", "HQ", "backend 'HQ' is not one of dense, hq"),
])
def test_derived_columns_are_checked(sweep_dir, tmp_path, column, value, message):
  """Item 2: an HQ row's reuse factor, blocks, peak, metadata or backend name that its own
  grid point cannot give was cited (even by a run that sealed it: the check is the row's)."""
  d = _copy(sweep_dir, tmp_path)
  _edit(d, "memory_sweep.csv", lambda h, rows: _hq_row(rows).update({column: value}))
  _refused(d, "memory_sweep.csv data row", message)


@pytest.mark.parametrize("column, value, message", [
    ("host_hit_tokens", "16", "is not hit_tokens"),
    ("bytes_to_device", "7", "not whole blocks"),
    ("host_kv_budget_gb", "0.008", "not the plan"),
    ("transfer_s", "0.5", "moves no bytes"),
])
def test_host_tier_columns_are_checked(replay_dir, tmp_path, column, value, message):
  """The host tier's columns: device + host hits = hits, bytes in whole blocks, the host
  budgets of the record's config, no transfer time without a model."""
  d = _copy(replay_dir, tmp_path)
  rows = _rows(os.path.join(d, "trace_replay.csv"))[1]
  assert any(float(r["host_kv_budget_gb"]) and int(r["host_hit_tokens"]) for r in rows)
  _edit(d, "trace_replay.csv", lambda h, rows: next(
      r for r in rows if float(r["host_kv_budget_gb"])).update({column: value}))
  _refused(d, "trace_replay.csv", message)


def test_rows_must_be_what_the_records_config_made(sweep_dir, tmp_path):
  """Item 2: `context_lengths` [4096] in the record beside rows at 32/64 was accepted; and
  HQ's peak raised above dense's flipped a verdict (the seal refuses the edit)."""
  d = _copy(sweep_dir, tmp_path, "config")
  path, record = _record_of(d, "memory_sweep.csv")
  record["config"]["context_lengths"] = [4096]
  with open(path, "w") as f:
    json.dump(record, f)
  _refused(d, "memory_sweep.csv", "of the run record's config")

  d = _copy(sweep_dir, tmp_path, "peak")
  def raise_peak(header, rows):
    for r in rows:
      if r["backend"] == "hq":
        r["peak_device_bytes"] = str(10 * int(r["peak_device_bytes"]))
  _edit(d, "memory_sweep.csv", raise_peak, reseal=False)
  _refused(d, "memory_sweep.csv is not the file run")


# ------------------------------------------------------------------ item 3: row counts


def test_row_counts_are_verified(sweep_dir, tmp_path):
  """Item 3: a duplicated row ("9 of 9 rows"), a deleted last row, or a 0-byte
  memory_sweep.csv beside a valid latency.csv were accepted."""
  dup = lambda h, rows: rows.append(dict(rows[3])) and None
  drop = lambda h, rows: rows.pop() and None
  for name, edit in (("dup", dup), ("drop", drop)):
    d = _copy(sweep_dir, tmp_path, name)
    _edit(d, "memory_sweep.csv", edit, reseal=False)
    _refused(d, "memory_sweep.csv is not the file run")
    _reseal(d, "memory_sweep.csv", rows=False)  # the bytes' seal forged, not the count
    _refused(d, "memory_sweep.csv has", "rows were added or deleted")
    _reseal(d, "memory_sweep.csv")  # the whole seal forged: the grid check remains
    _refused(d, "memory_sweep.csv", "run record's config")
  d = _copy(sweep_dir, tmp_path, "empty")
  open(os.path.join(d, "memory_sweep.csv"), "w").close()
  _refused(d, "memory_sweep.csv")


# ------------------------------------------------- item 4: one line, never a traceback


def test_bad_run_files_are_one_line(sweep_dir, replay_dir, tmp_path):
  """Item 4: a dropped metadata_bytes column (KeyError in the ledger), a run.json or
  summary.json that is a JSON list (AttributeError)."""
  d = _copy(sweep_dir, tmp_path, "column")
  _edit(d, "memory_sweep.csv", lambda h, rows: [r.pop("metadata_bytes") for r in rows] and
        [c for c in h if c != "metadata_bytes"])
  _refused(d, "memory_sweep.csv has no metadata_bytes column")
  d = _copy(sweep_dir, tmp_path, "list")
  with open(os.path.join(d, "memory_sweep.run.json"), "w") as f:
    json.dump([1, 2], f)
  _refused(d, "memory_sweep.run.json is a JSON array")
  d = _copy(replay_dir, tmp_path, "summary")
  with open(os.path.join(d, "summary.json"), "w") as f:
    json.dump([], f)
  _refused(d, "summary.json is a JSON array")


def _hf_dir(tiny, path, config_text=None, truncate=False):
  from safetensors.numpy import save_file
  params, cfg = tiny
  os.makedirs(path)
  hf = {"model_type": "qwen2", "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "max_position_embeddings": cfg.max_position_embeddings}
  with open(os.path.join(path, "config.json"), "w") as f:
    f.write(json.dumps(hf) if config_text is None else config_text)
  st = os.path.join(path, "model.safetensors")
  save_file(weights.to_state_dict(params, cfg), st)
  if truncate:
    with open(st, "r+b") as f:
      f.truncate(os.path.getsize(st) // 2)
  return str(path)


def test_commands_fail_with_one_line(spawned):
  """Items 4 and 5: unusable output directories, unparsable list flags, bad model files,
  a non-UTF-8 trace each end the command with one line naming the input, status 1 or 2 (a
  usage error), and leave nothing in the output directory (no failed run record that
  would block it until --overwrite)."""
  procs, out = spawned["procs"], spawned["paths"]["out"]
  for name in ("sweep_cases", "replay_cases"):
    for (_, needles, status), (rc, err) in zip(spawned[name], _driven(procs[name])):
      _one_line(rc, err, *needles, status=(status,))
  # Item 5: none of these opened a run; the directory takes the next run as it is.
  assert not os.path.exists(out) or not os.listdir(out), os.listdir(out)
  outputs.Run(out, "memory_sweep", ["memory_sweep.csv"]).preflight()
  # A usage error prints its line, not the whole --help before it.
  proc = _wait(procs["usage"])
  line = _one_line(proc.returncode, proc.stderr, "--block_size", status=(2,))
  assert proc.stderr.strip().splitlines() == [line] and "--kv_budget_gb" not in proc.stderr
  # So does a value absl itself cannot parse.
  proc = _wait(procs["bad_flag"])
  line = _one_line(proc.returncode, proc.stderr, "--seed=abc", status=(2,))
  assert proc.stderr.strip().splitlines() == [line]


def test_model_files_get_clear_errors(tiny, tmp_path):
  """Item 4, at the library: a truncated model.safetensors raised SafetensorError, a
  config.json of {} KeyError 'num_attention_heads', a non-JSON one named no file."""
  truncated = _hf_dir(tiny, tmp_path / "t", truncate=True)
  with pytest.raises(weights.WeightsError, match=r"t/model.safetensors.*truncated"):
    weights.load_model(truncated)
  with pytest.raises(ValueError, match=r"e/config.json lacks num_attention_heads"):
    weights.load_model(_hf_dir(tiny, tmp_path / "e", config_text="{}"))
  with pytest.raises(ValueError, match=r"j/config.json is not valid JSON"):
    config_lib.from_hf_config(_hf_dir(tiny, tmp_path / "j", config_text="[1"))
  with pytest.raises(ValueError, match=r"l/config.json is a JSON list"):
    config_lib.from_hf_config(_hf_dir(tiny, tmp_path / "l", config_text="[1]"))


# ----------------------------------------------------- item 6: --overwrite and the report


def test_a_new_run_removes_the_stale_report(sweep_dir, tmp_path):
  """Item 6: --overwrite left report.md, ledger.json and the plots citing rows that were
  no longer there."""
  d = _copy(sweep_dir, tmp_path)
  report.write(d)
  assert all(os.path.exists(os.path.join(d, f)) for f in REPORT_FILES)
  with outputs.Run(d, "memory_sweep", ["memory_sweep.csv"], overwrite=True):
    assert not any(os.path.exists(os.path.join(d, f)) for f in REPORT_FILES)
  assert tuple(outputs.DERIVED_FILES) == REPORT_FILES


# -------------------------------------------------------------- item 7: the context rule


def test_one_context_rule_everywhere(tiny, tiny_layout):
  """Item 7: only the memory sweep enforced the context limit; Engine.prefill ran prompts
  past it (the replay's model mode ran 7k tokens on a 4,096-position model)."""
  from hq_jax.kv.base import CacheError
  from hq_jax.kv.dense import DenseKVCache
  from hq_jax.serve.engine import Engine
  params, cfg = tiny
  cache = DenseKVCache.for_requests(tiny_layout, max_requests=1, max_seq_len=16)
  prompt = np.zeros(cfg.max_position_embeddings + 1, np.int32)
  with pytest.raises(ValueError, match="4097 tokens exceed tiny's "
                     "max_position_embeddings 4096.*--allow_long_context") as e:
    Engine(params, cfg).prefill(cache, prompt)
  assert isinstance(e.value, config_lib.ContextLengthError)
  assert (e.value.tokens, e.value.limit) == (4097, 4096)
  # Allowed: the rule passes, and the cache's own check (max_seq_len 16) is what refuses.
  with pytest.raises(CacheError, match="longer than max_seq_len"):
    Engine(params, cfg, allow_long_context=True).prefill(cache, prompt)
  # The scripts' check is the same rule, naming its flag.
  with pytest.raises(ValueError, match="--num_tokens: requests: 4097") as e:
    errors.check_context_limit(cfg, 4097, "--num_tokens")
  assert isinstance(e.value, config_lib.ContextLengthError)
  from configs import trace_replay
  assert trace_replay.get_config().allow_long_context is False


# ------------------------------------------------------------------------------ fuzz


def _mutate(d, names, rng):
  """One random cell changed, or one random data row deleted or duplicated."""
  name = rng.choice(names)
  path = os.path.join(d, name)
  header, rows = _rows(path)
  kind = rng.choice(["cell", "cell", "delete", "duplicate"])
  i = rng.randrange(len(rows))
  if kind == "delete":
    rows.pop(i)
  elif kind == "duplicate":
    rows.insert(rng.randrange(len(rows) + 1), dict(rows[i]))
  else:
    col = rng.choice(header)
    old = rows[i][col]
    others = [r[col] for r in rows if r[col] != old]
    try:
      number = float(old)
      bumped = [str(int(number) + rng.choice([-1, 1])) if old.lstrip("-").isdigit()
                else repr(number * rng.choice([0.5, 1.001, 2.0]) + 1e-3)]
    except ValueError:
      bumped = []
    choices = [v for v in bumped + others + ["", "x", "0"] if v != old]
    rows[i][col] = rng.choice(choices)
  _write_rows(path, header, rows)
  return f"{kind} in {name} row {i + 1}"


@pytest.mark.parametrize("which", ["sweep", "replay"])
def test_fuzz_every_tampered_output_is_refused(sweep_dir, replay_dir, tmp_path, which):
  rng = random.Random(25 if which == "sweep" else 2025)
  src = sweep_dir if which == "sweep" else replay_dir
  names = (["memory_sweep.csv", "workloads.csv", "latency.csv"] if which == "sweep" else
           ["trace_replay.csv", "capacity.csv"])
  for trial in range(50):
    d = _copy(src, tmp_path, f"t{trial}")
    what = _mutate(d, names, rng)
    with pytest.raises(report.ReportError):
      report.write(d)
      pytest.fail(f"trial {trial}: {what} was accepted")
    shutil.rmtree(d)
