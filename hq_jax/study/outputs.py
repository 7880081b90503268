"""The one writer of every script's CSV/JSON outputs, and their readers.

A script's run owns a few files in its output directory (e.g. memory_sweep.csv,
workloads.csv) plus `<name>.run.json`, its run record: command, config, platform and a
`run_id`. Every CSV row carries the same `run_id` (a column) and every JSON output a
`run_id` key, so a report can tell whether a CSV and a run record belong together.

    with outputs.Run(output_dir, "memory_sweep", ["memory_sweep.csv"], overwrite=False,
                     record={"config": ...}) as run:   # checks + locks before any compute
      ...
      run.write_csv("memory_sweep.csv", rows, COLUMNS)
      run.finish(rows=len(rows))

Why each rule:
  - a directory that already holds this script's outputs is refused unless `overwrite`
    (two sweeps into one directory silently mixed their CSV and run record); with
    `overwrite`, the old outputs are deleted before anything runs, so an interrupted
    re-run never leaves the old run record beside new rows;
  - a lock file (created with O_EXCL) is held while the run writes: a second run into the
    same directory fails at once instead of interleaving;
  - JSON is strict (allow_nan=False): NaN/Inf are refused with the key that held them,
    never written as `NaN`/`-Infinity`;
  - all of this happens when the run opens, before the model is loaded: a bad directory
    fails in a second, not after the compute.
Other scripts' files may share the directory (`make demo` writes every script into one).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import socket
import uuid
from typing import Any, Iterable, Sequence

LOCK_NAME = ".hq_jax.lock"
RUN_ID = "run_id"


class OutputError(RuntimeError):
  """An output directory or file cannot be used as asked."""


def record_name(script: str) -> str:
  """The run record of `script`'s outputs, e.g. `memory_sweep.run.json`."""
  return f"{script}.run.json"


# ----------------------------------------------------------------------- JSON


def _find_non_finite(obj, path="$") -> str | None:
  if isinstance(obj, float) and not math.isfinite(obj):
    return f"{path} = {obj}"
  if isinstance(obj, dict):
    for k, v in obj.items():
      found = _find_non_finite(v, f"{path}.{k}")
      if found:
        return found
  if isinstance(obj, (list, tuple)):
    for i, v in enumerate(obj):
      found = _find_non_finite(v, f"{path}[{i}]")
      if found:
        return found
  return None


def dumps_json(obj, *, what: str = "output") -> str:
  """Strict JSON text: a NaN or infinity raises OutputError naming where it is."""
  try:
    return json.dumps(obj, indent=1, allow_nan=False)
  except ValueError as e:
    where = _find_non_finite(obj) or str(e)
    raise OutputError(f"{what}: refusing to write a non-finite number ({where}); strict JSON "
                      "has no NaN or Infinity: the run produced a non-finite result") from e


def _atomic_write(path: str, text: str) -> None:
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)


def write_json(path: str, obj) -> None:
  """Strict JSON, written atomically (a reader never sees half a file)."""
  text = dumps_json(obj, what=path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  _atomic_write(path, text)


def read_json(path: str):
  """A JSON file, with its name in the error if it is truncated or not JSON."""
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise OutputError(f"{path} is not valid JSON (truncated or corrupt?): {e}") from e


# ------------------------------------------------------------------------ CSV


def to_csv(rows: Sequence[dict], columns: Sequence[str]) -> str:
  buf = io.StringIO()
  w = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
  w.writeheader()
  for row in rows:
    w.writerow({k: "" if row.get(k) is None else row[k] for k in columns})
  return buf.getvalue()


def _parse(v: str):
  if v == "":
    return None
  for kind in (int, float):
    try:
      return kind(v)
    except ValueError:
      pass
  return v


def read_csv_text(text: str, *, name: str = "CSV") -> list[dict]:
  """Rows with numbers parsed (empty cells become None); a row with missing or extra
  cells (a truncated file) is an error naming `name` and the row."""
  reader = csv.DictReader(io.StringIO(text))
  rows = []
  for i, row in enumerate(reader):
    if None in row or any(v is None for v in row.values()):
      cells = sum(v is not None for k, v in row.items() if k is not None)
      cells += len(row.get(None, []))
      raise OutputError(f"{name} data row {i + 1} has {cells} cells where "
                        f"the header has {len(reader.fieldnames)}: the file is truncated or "
                        "corrupt")
    rows.append({k: _parse(v) for k, v in row.items()})
  return rows


def read_csv(path: str) -> list[dict]:
  try:
    with open(path, newline="", encoding="utf-8") as f:
      text = f.read()
  except UnicodeDecodeError as e:
    raise OutputError(f"{path} is not UTF-8 text: {e}") from e
  return read_csv_text(text, name=path)


# ------------------------------------------------------------- the run itself


def check_output_dir(directory: str, flag: str = "--output_dir") -> None:
  """Fails at once for a directory that is missing from the flags or is a file."""
  if not directory:
    raise OutputError(f"{flag} is required")
  if os.path.exists(directory) and not os.path.isdir(directory):
    raise OutputError(f"{flag}={directory} is a file, not a directory")


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class Run:
  """One script's outputs in `directory`: checked and locked on entry, unlocked on exit."""

  def __init__(self, directory: str, script: str, files: Iterable[str], *,
               overwrite: bool = False, record: dict | None = None):
    self.directory = directory
    self.script = script
    self.files = list(files)
    self.overwrite = overwrite
    self.run_id = uuid.uuid4().hex[:16]
    self.record = {RUN_ID: self.run_id, "script": script, "status": "running",
                   "files": self.files, **(record or {})}
    self._lock = None

  @property
  def record_path(self) -> str:
    return os.path.join(self.directory, record_name(self.script))

  def path(self, name: str) -> str:
    return os.path.join(self.directory, name)

  def __enter__(self) -> "Run":
    check_output_dir(self.directory)
    os.makedirs(self.directory, exist_ok=True)
    self._acquire()
    try:
      declared = list(self.files)
      if os.path.exists(self.record_path):  # Also what the previous run of this script made.
        try:
          declared += [f for f in read_json(self.record_path).get("files", [])
                       if os.path.basename(f) == f and f not in declared]
        except OutputError:
          pass
      ours = [f for f in declared + [record_name(self.script)] if os.path.lexists(self.path(f))]
      if ours and not self.overwrite:
        raise OutputError(
            f"--output_dir={self.directory} already holds {', '.join(ours)} from an earlier "
            "run: pass --overwrite to replace them, or choose another directory")
      for f in ours:  # Old outputs go first, so none can outlive an interrupted re-run.
        os.remove(self.path(f))
      write_json(self.record_path, self.record)
    except BaseException:
      self._release()
      raise
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    try:
      if exc_type is not None and os.path.exists(self.record_path):
        self.record["status"] = f"failed: {exc_type.__name__}"
        write_json(self.record_path, self.record)
    finally:
      self._release()

  def _acquire(self) -> None:
    lock = self.path(LOCK_NAME)
    for _ in range(2):
      try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        holder = self._lock_holder(lock)
        if holder is not None:
          raise OutputError(
              f"--output_dir={self.directory} is locked by another run ({holder}); wait for "
              f"it, or delete {lock} if no run is writing there") from None
        os.remove(lock)  # A run on this host that died without unlocking.
        continue
      with os.fdopen(fd, "w") as f:
        f.write(f"{socket.gethostname()} {os.getpid()} {self.script}\n")
      self._lock = lock
      return
    raise OutputError(f"cannot lock {lock}")

  @staticmethod
  def _lock_holder(lock: str) -> str | None:
    """Who holds `lock`, or None when it is stale (its process on this host is gone)."""
    try:
      with open(lock) as f:
        host, pid, script = f.read().split()
      if host == socket.gethostname() and not _pid_alive(int(pid)):
        return None
      return f"{script}, pid {pid} on {host}"
    except (OSError, ValueError):
      return "unknown holder"

  def _release(self) -> None:
    if self._lock is not None:
      try:
        os.remove(self._lock)
      except FileNotFoundError:
        pass
      self._lock = None

  def _check_name(self, name: str) -> str:
    if name not in self.files:
      raise OutputError(f"{self.script} declared {self.files}, not {name}")
    return self.path(name)

  def write_csv(self, name: str, rows: Sequence[dict], columns: Sequence[str]) -> str:
    """Rows with this run's id in a `run_id` column, written atomically."""
    path = self._check_name(name)
    columns = [c for c in columns if c != RUN_ID] + [RUN_ID]
    _atomic_write(path, to_csv([{**r, RUN_ID: self.run_id} for r in rows], columns))
    return path

  def write_json(self, name: str, obj: dict) -> str:
    path = self._check_name(name)
    write_json(path, {**obj, RUN_ID: self.run_id})
    return path

  def write_text(self, name: str, text: str) -> str:
    """A declared text output (Markdown), written atomically."""
    path = self._check_name(name)
    _atomic_write(path, text)
    return path

  def finish(self, **extra: Any) -> None:
    """Marks the run record complete (a report refuses rows of unfinished runs)."""
    self.record.update(extra, status="complete")
    write_json(self.record_path, self.record)


def run_records(run_dir: str) -> dict[str, dict]:
  """Every run record in `run_dir`, by file name."""
  return {f: read_json(os.path.join(run_dir, f)) for f in sorted(os.listdir(run_dir))
          if f.endswith(".run.json")}


def check_file_run(run_dir: str, name: str, content, records: dict[str, dict]) -> dict:
  """The run record that declares output `name`, after checking that the file (CSV rows
  or a JSON dict) carries that record's run id on every row and that the run completed."""
  owners = [(f, r) for f, r in records.items() if name in r.get("files", ())]
  path = os.path.join(run_dir, name)
  if len(owners) != 1:
    raise OutputError(
        f"{path}: {'no' if not owners else len(owners)} run records "
        f"({', '.join(f for f, _ in owners) or '*.run.json'}) declare it: it was not written "
        "by one run of a script (or of outputs.Run); re-run the script that makes it")
  fname, record = owners[0]
  run_id = record.get(RUN_ID)
  if record.get("status") != "complete":
    raise OutputError(f"{os.path.join(run_dir, fname)}: run {run_id} did not complete (status "
                      f"{record.get('status')!r}), so {name} is partial: re-run "
                      f"{record.get('script', 'the script')} with --overwrite")
  rows = content if isinstance(content, list) else [content]
  for i, row in enumerate(rows):
    if row.get(RUN_ID) != run_id:
      where = f"{path} data row {i + 1}" if isinstance(content, list) else path
      raise OutputError(f"{where}: run_id {row.get(RUN_ID)!r} is not the run id {run_id!r} of "
                        f"{fname}: the file and its run record come from different runs")
  return record
