"""The one writer of every script's CSV/JSON outputs, and their readers.

A script's run owns a few files in its output directory (e.g. memory_sweep.csv,
workloads.csv) plus `<name>.run.json`, its run record: command, config, platform and a
`run_id`. Every CSV row carries the same `run_id` (a column) and every JSON output a
`run_id` key, so a report can tell whether a CSV and a run record belong together.

    with outputs.Run(output_dir, "memory_sweep", ["memory_sweep.csv"], overwrite=False,
                     record={"config": ...}) as run:   # checks + locks before any compute
      ...
      run.write_csv("memory_sweep.csv", rows, COLUMNS)
      run.finish()                                     # seals the run (last, atomically)

Why each rule:
  - a directory that already holds this script's outputs is refused unless `overwrite`
    (two sweeps into one directory silently mixed their CSV and run record); with
    `overwrite`, the old outputs are deleted before anything runs, so an interrupted
    re-run never leaves the old run record beside new rows;
  - a lock file (created with O_EXCL) is held while the run writes: a second run into the
    same directory fails at once instead of interleaving;
  - JSON is strict (allow_nan=False): NaN/Inf are refused with the key that held them,
    never written as `NaN`/`-Infinity`;
  - `preflight()` runs the same checks without writing anything, so a script checks its
    directory before loading the model, and opens the run only after every input is good
    (a bad --model must not leave a failed record that blocks the directory);
  - a run is sealed: `finish` writes, last and atomically, the record's status "complete"
    together with `outputs`, every file the run wrote with its sha256, size and (CSV) row
    count. `sealed_outputs` checks a directory against its seals: a killed run (status
    still "running"), a file missing, extra, edited, truncated or swapped for another
    run's is refused with one line naming the file, so nothing cites rows a complete run
    did not write;
  - opening a run deletes the report's outputs (`DERIVED_FILES`: report.md, ledger.json,
    plots): they cite the directory's rows, which this run is about to change.
Other scripts' files may share the directory (`make demo` writes every script into one).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import socket
import uuid
from typing import Any, Iterable, Sequence

LOCK_NAME = ".hq_jax.lock"
RUN_ID = "run_id"
COMPLETE = "complete"
# What `report.write` makes from a directory's rows (it writes exactly these names).
DERIVED_FILES = ("report.md", "ledger.json", "kv_bytes_vs_context.png", "reuse_factor.png",
                 "ttft.png")


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


def _atomic_write(path: str, text: str) -> bytes:
  """Writes `text` (UTF-8) so that a reader never sees half of it; returns the bytes."""
  data = text.encode("utf-8")
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    with open(tmp, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except OSError as e:
    try:
      os.remove(tmp)
    except OSError:
      pass
    raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
  return data


def write_text(path: str, text: str) -> None:
  """A text file (Markdown), written atomically."""
  _atomic_write(path, text)


def write_json(path: str, obj) -> None:
  """Strict JSON, written atomically (a reader never sees half a file)."""
  text = dumps_json(obj, what=path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  _atomic_write(path, text)


def read_json(path: str, kind: type | None = None):
  """A JSON file, with its name in the error if it is truncated, not JSON, unreadable, or
  (with `kind`, e.g. dict) not a JSON value of that type."""
  try:
    with open(path, encoding="utf-8") as f:
      obj = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise OutputError(f"{path} is not valid JSON (truncated or corrupt?): {e}") from e
  except OSError as e:
    raise OutputError(f"cannot read {path}: {e.strerror or e}") from None
  if kind is not None and not isinstance(obj, kind):
    names = {dict: "object", list: "array"}
    raise OutputError(f"{path} is a JSON {names.get(type(obj), type(obj).__name__)}, not the "
                      f"JSON {names.get(kind, kind.__name__)} it must be")
  return obj


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
  except OSError as e:
    raise OutputError(f"cannot read {path}: {e.strerror or e}") from None
  if not text.strip():
    raise OutputError(f"{path} is empty (no header, no rows): a run that completes writes "
                      "both")
  return read_csv_text(text, name=path)


def _seal(data: bytes, rows: int | None) -> dict:
  return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "rows": rows}


# ------------------------------------------------------------- the run itself


def check_output_dir(directory: str, flag: str = "--output_dir") -> None:
  """Fails at once for a directory that is missing from the flags or is a file."""
  if not directory:
    raise OutputError(f"{flag} is required")
  if os.path.exists(directory) and not os.path.isdir(directory):
    raise OutputError(f"{flag}={directory} is a file, not a directory")
  # The nearest existing ancestor must let us create what is missing below it.
  parent = os.path.abspath(directory)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise OutputError(f"{flag}={directory}: {parent} is a file, not a directory")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise OutputError(f"{flag}={directory}: {parent} is not writable")


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class Run:
  """One script's outputs in `directory`: checked and locked on entry, sealed by `finish`,
  unlocked on exit."""

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
    self._seals: dict[str, dict] = {}  # what this run wrote, by file name

  @property
  def record_path(self) -> str:
    return os.path.join(self.directory, record_name(self.script))

  def path(self, name: str) -> str:
    return os.path.join(self.directory, name)

  def _ours(self) -> list[str]:
    """This script's files already in the directory (what it declares now, what its last
    run declared, and its run record)."""
    declared = list(self.files)
    if os.path.exists(self.record_path):  # Also what the previous run of this script made.
      try:
        old = read_json(self.record_path, dict).get("files", [])
        declared += [f for f in old if isinstance(f, str) and os.path.basename(f) == f
                     and f not in declared]
      except OutputError:
        pass
    return [f for f in declared + [record_name(self.script)] if os.path.lexists(self.path(f))]

  def preflight(self) -> None:
    """Every check `__enter__` makes (a usable, writable directory, no earlier outputs
    unless `overwrite`, no live lock), writing nothing: call it before loading a model."""
    check_output_dir(self.directory)
    if not os.path.isdir(self.directory):
      return
    ours = self._ours()
    if ours and not self.overwrite:
      raise OutputError(
          f"--output_dir={self.directory} already holds {', '.join(ours)} from an earlier "
          "run: pass --overwrite to replace them, or choose another directory")
    lock = self.path(LOCK_NAME)
    if os.path.exists(lock) and (holder := self._lock_holder(lock)) is not None:
      raise OutputError(
          f"--output_dir={self.directory} is locked by another run ({holder}); wait for "
          f"it, or delete {lock} if no run is writing there")

  def __enter__(self) -> "Run":
    check_output_dir(self.directory)
    try:
      os.makedirs(self.directory, exist_ok=True)
    except OSError as e:
      raise OutputError(f"--output_dir={self.directory}: cannot create it "
                        f"({e.strerror or e})") from None
    self._acquire()
    try:
      ours = self._ours()
      if ours and not self.overwrite:
        raise OutputError(
            f"--output_dir={self.directory} already holds {', '.join(ours)} from an earlier "
            "run: pass --overwrite to replace them, or choose another directory")
      # Old outputs go first, so none can outlive an interrupted re-run; the report's
      # outputs too: they cite rows this run is about to replace or add to.
      for f in ours + [f for f in DERIVED_FILES if os.path.lexists(self.path(f))]:
        try:
          os.remove(self.path(f))
        except OSError as e:
          raise OutputError(f"cannot remove {self.path(f)}: {e.strerror or e}") from None
      write_json(self.record_path, self.record)
    except BaseException:
      self._release()
      raise
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    try:
      if exc_type is not None and os.path.exists(self.record_path):
        self.record["status"] = f"failed: {exc_type.__name__}"
        try:
          write_json(self.record_path, self.record)
        except OutputError:
          pass  # The directory went bad; the error that got us here says more.
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
      except OSError as e:
        raise OutputError(f"--output_dir={self.directory}: cannot create {lock} "
                          f"({e.strerror or e})") from None
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
    data = _atomic_write(path, to_csv([{**r, RUN_ID: self.run_id} for r in rows], columns))
    self._seals[name] = _seal(data, len(rows))
    return path

  def write_json(self, name: str, obj: dict) -> str:
    path = self._check_name(name)
    data = _atomic_write(path, dumps_json({**obj, RUN_ID: self.run_id}, what=path))
    self._seals[name] = _seal(data, None)
    return path

  def write_text(self, name: str, text: str) -> str:
    """A declared text output (Markdown), written atomically."""
    path = self._check_name(name)
    self._seals[name] = _seal(_atomic_write(path, text), None)
    return path

  def adopt(self, name: str) -> str:
    """A declared output written by other code (a plot) at `run.path(name)`: sealed as it
    is on disk now."""
    path = self._check_name(name)
    try:
      with open(path, "rb") as f:
        data = f.read()
    except OSError as e:
      raise OutputError(f"{self.script} declared {name} but cannot read it: "
                        f"{e.strerror or e}") from None
    self._seals[name] = _seal(data, None)
    return path

  def finish(self, **extra: Any) -> None:
    """Seals the run: one atomic write of the record with status "complete" and every
    declared file's sha256, size and row count (a report refuses anything else)."""
    self.record.update(extra, status=COMPLETE,
                       outputs={f: self._seals[f] for f in self.files if f in self._seals})
    write_json(self.record_path, self.record)


def run_records(run_dir: str) -> dict[str, dict]:
  """Every run record in `run_dir`, by file name (each must be a JSON object)."""
  try:
    names = sorted(os.listdir(run_dir))
  except OSError as e:
    raise OutputError(f"cannot list {run_dir}: {e.strerror or e}") from None
  return {f: read_json(os.path.join(run_dir, f), dict) for f in names
          if f.endswith(".run.json")}


def sealed_outputs(run_dir: str, cited: Iterable[str] = ()) -> dict[str, tuple[str, dict]]:
  """{file: (its run record's name, the record)} for every file a run in `run_dir` sealed,
  each checked against its seal; raises OutputError, naming the file, for:
    - a run record that is not a JSON object, not complete (a killed or failed run), or
      has no seals (`outputs`);
    - a sealed file that is missing, or whose bytes or sha256 are not what the run wrote;
    - a file two records claim, or a file of `cited` (what the caller will read) or of a
      record's declared `files` that no complete run sealed (an extra file).
  Row counts and run ids are checked by `check_file_run` on the parsed content."""
  records = run_records(run_dir)
  owner: dict[str, tuple[str, dict]] = {}
  for fname, record in records.items():
    where = os.path.join(run_dir, fname)
    if record.get("status") != COMPLETE:
      raise OutputError(
          f"{where}: run {record.get(RUN_ID)} did not complete (status "
          f"{record.get('status')!r}): its outputs are partial or absent; re-run "
          f"{record.get('script', 'the script')} with --overwrite (or delete the record)")
    seals, declared = record.get("outputs"), record.get("files")
    if not isinstance(seals, dict) or not isinstance(declared, list):
      raise OutputError(f"{where}: a complete record without `files` and `outputs` (the "
                        "sealed list of what the run wrote): written by an older hq-jax or "
                        "edited; re-run the script")
    for name in declared:
      if name not in seals and os.path.lexists(os.path.join(run_dir, str(name))):
        raise OutputError(f"{os.path.join(run_dir, str(name))}: {fname} declares it but its "
                          "run did not write it: an extra file; delete it or re-run")
    for name, seal in seals.items():
      path = os.path.join(run_dir, name)
      if name in owner:
        raise OutputError(f"{path}: both {owner[name][0]} and {fname} list it: one file, two "
                          "runs; re-run one of the scripts with --overwrite")
      if name not in declared or not isinstance(seal, dict):
        raise OutputError(f"{where}: its seal of {name} is malformed: the record was edited")
      owner[name] = (fname, record)
      try:
        with open(path, "rb") as f:
          data = f.read()
      except FileNotFoundError:
        raise OutputError(f"{path} is missing: {fname} lists it as written by run "
                          f"{record.get(RUN_ID)}") from None
      except OSError as e:
        raise OutputError(f"cannot read {path}: {e.strerror or e}") from None
      if (len(data), hashlib.sha256(data).hexdigest()) != (seal.get("bytes"), seal.get("sha256")):
        raise OutputError(f"{path} is not the file run {record.get(RUN_ID)} wrote ({len(data)} "
                          f"bytes, sha256 {hashlib.sha256(data).hexdigest()[:12]}..., where "
                          f"{fname} sealed {seal.get('bytes')} bytes, "
                          f"{str(seal.get('sha256'))[:12]}...): edited, truncated or replaced;"
                          " re-run the script")
  for name in cited:
    if name not in owner and os.path.lexists(os.path.join(run_dir, name)):
      raise OutputError(f"{os.path.join(run_dir, name)}: no complete run record "
                        "(*.run.json) lists it: it was not written by a complete run of a "
                        "script; re-run the script that makes it")
  return owner


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
  seal = (record.get("outputs") or {}).get(name)
  if isinstance(content, list):
    if seal is not None and seal.get("rows") != len(rows):
      raise OutputError(f"{path} has {len(rows)} data rows where {fname} sealed "
                        f"{seal.get('rows')}: rows were added or deleted")
    if not rows:
      raise OutputError(f"{path} has no data rows: a complete run writes at least one")
    if RUN_ID not in rows[0]:
      raise OutputError(f"{path} has no {RUN_ID} column: it cannot be tied to {fname}")
  for i, row in enumerate(rows):
    if row.get(RUN_ID) != run_id:
      where = f"{path} data row {i + 1}" if isinstance(content, list) else path
      raise OutputError(f"{where}: run_id {row.get(RUN_ID)!r} is not the run id {run_id!r} of "
                        f"{fname}: the file and its run record come from different runs")
  return record
