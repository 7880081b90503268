"""The one output writer: strict JSON, run ids tying CSVs to their run record, refusing a
used directory unless asked, a lock while a run writes, errors that name the file."""

import json
import os
import subprocess
import sys

import pytest

from hq_jax.study import outputs
from hq_jax.study.outputs import OutputError


def test_strict_json_refuses_nan_and_infinity(tmp_path):
  """Issue 14 defect 3: a corrupted run wrote `-Infinity` into JSON."""
  path = tmp_path / "x.json"
  for bad in (float("nan"), float("-inf")):
    with pytest.raises(OutputError, match=r"non-finite number \(\$\.a\.b\[1\] = "):
      outputs.write_json(str(path), {"a": {"b": [0.0, bad]}})
    assert not path.exists()
  outputs.write_json(str(path), {"a": 1.5})
  assert json.loads(path.read_text()) == {"a": 1.5}


def _run(tmp_path, name="sweep", overwrite=False, rows=({"x": 1},)):
  with outputs.Run(str(tmp_path), name, [f"{name}.csv"], overwrite=overwrite,
                   record={"command": "test"}) as run:
    run.write_csv(f"{name}.csv", list(rows), ["x"])
    run.finish()
  return run


def test_used_directory_is_refused_unless_overwrite(tmp_path):
  """Issue 14 defect 4: two sweeps into one directory both exited 0, the CSV holding run
  A's rows while run.json described run B."""
  a = _run(tmp_path)
  with pytest.raises(OutputError, match=r"already holds sweep.csv, sweep.run.json.*--overwrite"):
    _run(tmp_path)
  assert outputs.read_csv(str(tmp_path / "sweep.csv"))[0]["run_id"] == a.run_id
  # Another script's outputs may share the directory (make demo writes all into one).
  _run(tmp_path, name="other")
  b = _run(tmp_path, overwrite=True, rows=({"x": 2},))
  rows = outputs.read_csv(str(tmp_path / "sweep.csv"))
  record = outputs.read_json(str(tmp_path / "sweep.run.json"))
  assert rows == [{"x": 2, "run_id": b.run_id}] and record["run_id"] == b.run_id
  assert record["status"] == "complete" and not (tmp_path / outputs.LOCK_NAME).exists()
  # Files the previous run declared go too (a sweep re-run without --workloads must not
  # leave the old workloads.csv beside the new record).
  with outputs.Run(str(tmp_path), "sweep", ["sweep.csv", "extra.csv"], overwrite=True) as run:
    run.write_csv("extra.csv", [], ["x"])
    run.finish()
  _run(tmp_path, overwrite=True)
  assert not (tmp_path / "extra.csv").exists() and (tmp_path / "other.csv").exists()


def test_overwrite_deletes_old_outputs_before_the_run(tmp_path):
  """An interrupted re-run must not leave the old run record beside new rows."""
  _run(tmp_path)
  with pytest.raises(KeyboardInterrupt):
    with outputs.Run(str(tmp_path), "sweep", ["sweep.csv"], overwrite=True) as run:
      assert not (tmp_path / "sweep.csv").exists()
      raise KeyboardInterrupt
  record = outputs.read_json(str(tmp_path / "sweep.run.json"))
  assert record["run_id"] == run.run_id and record["status"] == "failed: KeyboardInterrupt"
  assert not (tmp_path / outputs.LOCK_NAME).exists()


def test_csv_and_record_of_different_runs_are_refused(tmp_path):
  a_dir, b_dir = tmp_path / "a", tmp_path / "b"
  _run(a_dir)
  _run(b_dir, rows=({"x": 7},))
  # Run A's rows beside run B's record: the old failure mode, now detected.
  (b_dir / "sweep.csv").write_text((a_dir / "sweep.csv").read_text())
  rows = outputs.read_csv(str(b_dir / "sweep.csv"))
  records = outputs.run_records(str(b_dir))
  with pytest.raises(OutputError, match=r"sweep.csv data row 1: run_id .* different runs"):
    outputs.check_file_run(str(b_dir), "sweep.csv", rows, records)


def test_lock_is_exclusive_while_a_run_writes(tmp_path):
  with outputs.Run(str(tmp_path), "sweep", ["sweep.csv"]):
    with pytest.raises(OutputError, match=r"is locked by another run \(sweep, pid"):
      _run(tmp_path, name="other")
  _run(tmp_path, name="other")  # Released on exit.
  # A lock left by a process that died (same host) is taken over, not obeyed forever.
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True).stdout.strip()
  import socket
  (tmp_path / outputs.LOCK_NAME).write_text(f"{socket.gethostname()} {dead} sweep\n")
  _run(tmp_path, name="third")


def test_output_dir_that_is_a_file_fails_first(tmp_path):
  f = tmp_path / "file"
  f.write_text("x")
  with pytest.raises(OutputError, match="is a file, not a directory"):
    with outputs.Run(str(f), "sweep", ["sweep.csv"]):
      pytest.fail("the run body must not start")
  assert f.read_text() == "x"


def test_truncated_files_name_themselves(tmp_path):
  """Issue 14 defect 8: truncated CSV/JSON raised without naming the file."""
  _run(tmp_path)
  csv_path, json_path = tmp_path / "sweep.csv", tmp_path / "sweep.run.json"
  text = csv_path.read_text()
  csv_path.write_text(text[:text.rindex(",")])  # The last row loses its run_id cell.
  with pytest.raises(OutputError, match=rf"{csv_path} data row 1 has 1 cells"):
    outputs.read_csv(str(csv_path))
  json_path.write_text(json_path.read_text()[:20])
  with pytest.raises(OutputError, match=rf"{json_path} is not valid JSON"):
    outputs.read_json(str(json_path))
  csv_path.write_bytes(b"x\n\xff\xfe\n")
  with pytest.raises(OutputError, match=rf"{csv_path} is not UTF-8"):
    outputs.read_csv(str(csv_path))


def test_run_metadata_names_the_code(monkeypatch):
  """A GPU figure names its commit: the run record carries it, from git or, where the tree
  travels without .git, from $HQ_JAX_COMMIT."""
  from hq_jax.study import cli
  monkeypatch.setenv("HQ_JAX_COMMIT", "abc1234")
  assert cli.run_metadata()["commit"] == "abc1234"
  monkeypatch.delenv("HQ_JAX_COMMIT")
  head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                        cwd=os.path.dirname(__file__))
  if head.returncode == 0:  # a git checkout (CI's clean clone is one)
    assert cli.code_version().split("-")[0] == head.stdout.strip()
