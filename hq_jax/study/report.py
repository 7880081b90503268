"""Turns a run directory into report.md: tables, PNG plots and the claims ledger.

Reads whatever of these the directory holds: perplexity.json, memory_sweep.csv,
latency.csv, workloads.csv, trace_replay.csv (with summary.json), each with the run
record of the script that wrote it (`<script>.run.json`, see study/outputs.py). Writes
report.md, ledger.json and the plots next to them (`outputs.DERIVED_FILES`).

Nothing is cited unchecked. A directory is refused (ReportError, one line naming the
file, the row and the column) when:
  - a run record is not complete (a killed or failed run) or a file does not match its
    seal (missing, extra, edited, truncated, another run's), or a row lacks its run id;
  - a row fails its sweep's `check_row` (the kv/token invariants and every derived
    column: blocks, reuse factor, pool, metadata, peak, hit ratio);
  - the rows are not what the record's config makes (grid points, model, seed, budgets).
A ledger line above a tampered row would be a lie, and a partial report could be mistaken
for a whole one.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

from matplotlib.figure import Figure

from hq_jax.study import latency, ledger, memory, outputs, trace_outputs, traces, workloads
from hq_jax.study.errors import HarnessError

# file -> (the check each of its rows must pass (the one its sweep ran), its columns)
SOURCES: dict[str, tuple[Callable[[dict], None], Sequence[str]] | None] = {
    "perplexity.json": None,
    "memory_sweep.csv": (memory.check_row, memory.COLUMNS),
    "latency.csv": (latency.check_row, latency.COLUMNS),
    "workloads.csv": (workloads.check_row, workloads.COLUMNS),
}
TRACE_FILES = ("trace_replay.csv", "summary.json", "capacity.csv")
# A row that fails a check raises one of these (a tampered cell can hold any type).
_ROW_ERRORS = (HarnessError, KeyError, TypeError, ValueError, ZeroDivisionError)


class ReportError(ValueError):
  """A run directory's files are inconsistent, tampered or from different runs."""


def _figure():
  # A bare Figure (no pyplot): no global backend switch, so notebooks keep inline plots.
  fig = Figure(figsize=(6.4, 4.2))
  return fig, fig.subplots()


def _save(fig, ax, path, *, grid_axis="both", legend_size=8):
  """The finish every plot shares: a light grid, a legend, tight layout, a PNG."""
  ax.grid(alpha=0.3, axis=grid_axis)
  ax.legend(fontsize=legend_size)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def _refuse(path: str, e: Exception, what: str = "") -> ReportError:
  missing = "column" if "data row" in what else "field"
  detail = f"missing {missing} {e}" if isinstance(e, KeyError) else str(e)
  return ReportError(f"{path}{what}: {detail}. The report cites only rows that pass the "
                     "sweep's own checks and match their run record: re-run the sweep")


def _check_rows(path: str, rows: list[dict], check, columns: Sequence[str]) -> None:
  missing = [c for c in columns if c not in rows[0]] if rows else []
  if missing:
    raise ReportError(f"{path} has no {missing[0]} column: not a file its script wrote")
  for i, row in enumerate(rows):
    try:
      check(row)
    except _ROW_ERRORS as e:
      raise _refuse(path, e, f" data row {i + 1}") from None


def _load(run_dir: str):
  """(perplexity, memory rows, latency rows, workload rows, trace rows and claim, run
  records by script): each row checked against its sweep's `check_row`, each file against
  its run's seal (`outputs.sealed_outputs`) and run id, and the rows against the config of
  the run record that wrote them."""
  if not os.path.isdir(run_dir):
    raise ReportError(f"--run_dir={run_dir} is not a directory")
  try:
    return _load_checked(run_dir)
  except outputs.OutputError as e:
    raise ReportError(str(e)) from None


def _load_checked(run_dir: str):
  loaded: dict = {}
  for name, source in SOURCES.items():
    path = os.path.join(run_dir, name)
    if not os.path.lexists(path):
      continue
    if source is None:
      loaded[name] = outputs.read_json(path, dict)
    else:
      loaded[name] = outputs.read_csv(path)
      _check_rows(path, loaded[name], *source)
  trace = _trace_rows(run_dir)
  if trace is not None:
    loaded["trace_replay.csv"] = trace[0]
    if trace[1] is not None:
      loaded["summary.json"] = trace[1]
  outputs.sealed_outputs(run_dir, [*SOURCES, *TRACE_FILES])
  all_records = outputs.run_records(run_dir)
  records, by_file = {}, {}
  for name, content in loaded.items():
    record = outputs.check_file_run(run_dir, name, content, all_records)
    records[record.get("script", name)] = by_file[name] = record
  _check_configs(run_dir, loaded, by_file)
  return (loaded.get("perplexity.json"), loaded.get("memory_sweep.csv", []),
          loaded.get("latency.csv", []), loaded.get("workloads.csv", []),
          [trace[2], ledger.peer_advantage(trace[0])] if trace else [], records)


def _check_configs(run_dir: str, loaded: dict, by_file: dict) -> None:
  """The rows against the config their run record says produced them (a record without
  a config, e.g. a notebook's own `outputs.Run`, has only its seal checked)."""
  def config(name):
    record = by_file.get(name, {})
    return record.get("config") if isinstance(record.get("config"), dict) else None

  checks = {
      "memory_sweep.csv": lambda rows, c: memory.check_rows(
          rows, c, by_file["memory_sweep.csv"].get("skipped_points") or ()),
      "workloads.csv": workloads.check_rows,
      "latency.csv": latency.check_rows,
      "trace_replay.csv": lambda rows, c: trace_outputs.check_rows(
          rows, c, bytes_per_block=by_file["trace_replay.csv"]["bytes_per_block"],
          trace_requests=by_file["trace_replay.csv"]["trace_requests"]),
  }
  for name, check in checks.items():
    if name in loaded and config(name) is not None:
      try:
        check(loaded[name], config(name))
      except _ROW_ERRORS as e:
        raise _refuse(os.path.join(run_dir, name), e,
                      f" (against {by_file[name].get('script')}.run.json)") from None
  ppl, c = loaded.get("perplexity.json"), config("perplexity.json")
  if ppl is not None and c is not None and (
      ppl.get("num_tokens") != c.get("num_tokens") or ppl.get("model") != c.get("model")):
    raise ReportError(f"{os.path.join(run_dir, 'perplexity.json')}: model "
                      f"{ppl.get('model')!r}, {ppl.get('num_tokens')} tokens, where its run "
                      f"record's config says {c.get('model')!r}, {c.get('num_tokens')}")


def _trace_rows(run_dir: str):
  """(rows of trace_replay.csv, summary.json or None, the ledger row recomputed from the
  rows, never copied from summary.json), or None if the directory holds no replay. A
  summary.json whose verdict differs from what its CSV gives is refused."""
  path = os.path.join(run_dir, "trace_replay.csv")
  if not os.path.lexists(path):
    return None
  rows = outputs.read_csv(path)
  summary_path = os.path.join(run_dir, "summary.json")
  summary = outputs.read_json(summary_path, dict) if os.path.lexists(summary_path) else None
  trace = (summary or {}).get("trace")
  name = os.path.basename(trace.get("path", "")) if isinstance(trace, dict) else ""
  try:
    claim = traces.ledger_row(rows, name or "replayed")
  except _ROW_ERRORS as e:
    raise _refuse(path, e, " (not a trace replay the report can check)") from None
  if summary is not None and summary.get("ledger_row") not in (None, claim):
    raise ReportError(f"{summary_path}: its ledger row is not what {path} gives; the report "
                      "cites only verdicts it recomputes from rows: re-run the replay")
  _check_rows(path, rows, trace_outputs.check_row, trace_outputs.COLUMNS)
  return rows, summary, claim


def _table(rows: Sequence[dict], columns: Sequence[str], first_index: bool = False) -> str:
  if not rows:
    return "_none_\n"
  cols = (["#"] if first_index else []) + list(columns)
  esc = lambda s: s.replace("|", "\\|")  # A "|" inside a cell would split it.
  out = ["| " + " | ".join(esc(c) for c in cols) + " |", "|" + "---|" * len(cols)]
  for i, r in enumerate(rows):
    cells = ([str(i + 1)] if first_index else []) + [esc(_fmt(r.get(c))) for c in columns]
    out.append("| " + " | ".join(cells) + " |")
  return "\n".join(out) + "\n"


def _fmt(v) -> str:
  if v is None:
    return ""
  if isinstance(v, float):
    return f"{v:.4g}"
  if isinstance(v, int):
    return f"{v:,}"
  return str(v)


def plot_kv_vs_context(mem, path):
  fig, ax = _figure()
  frac = mem[0]["shared_prefix_fraction"]
  series = sorted({(r["backend"], r["concurrency"]) for r in mem})
  for backend, c in series:
    rows = sorted((r for r in mem if r["backend"] == backend and r["concurrency"] == c
                   and r["shared_prefix_fraction"] == frac and r["num_prefixes"] == 1),
                  key=lambda r: r["context_length"])
    if rows:
      ax.plot([r["context_length"] for r in rows], [r["kv_bytes_used"] / 2**20 for r in rows],
              marker="o" if backend == "hq" else "s", linestyle="-" if backend == "hq" else "--",
              fillstyle="full" if backend == "hq" else "none",
              label=f"{backend}, concurrency {c}")
  ax.set_xlabel("context length (tokens per request)")
  ax.set_ylabel("KV bytes used (MiB)")
  ax.set_title(f"KV held, shared prefix fraction {frac}")
  ax.set_xscale("log", base=2)
  _save(fig, ax, path)


def plot_reuse(mem, path):
  fig, ax = _figure()
  hq = [r for r in mem if r["backend"] == "hq" and r["num_prefixes"] == 1]
  for frac in sorted({r["shared_prefix_fraction"] for r in hq}):
    for n in sorted({r["context_length"] for r in hq}):
      rows = sorted((r for r in hq if r["shared_prefix_fraction"] == frac
                     and r["context_length"] == n), key=lambda r: r["concurrency"])
      ax.plot([r["concurrency"] for r in rows], [r["reuse_factor"] for r in rows], marker="o",
              label=f"{n} tokens, shared {frac}")
  ax.set_xlabel("concurrency (requests)")
  ax.set_ylabel("reuse factor (logical / physical blocks)")
  ax.set_xscale("log", base=2)
  _save(fig, ax, path)


def plot_ttft(lat, path):
  fig, ax = _figure()
  points = sorted({(r["context_length"], r["concurrency"]) for r in lat})
  modes = ["dense", "hq_cold", "hq_warm"]
  width = 0.8 / len(modes)
  for j, mode in enumerate(modes):
    rows = [next((r for r in lat if (r["context_length"], r["concurrency"]) == p
                  and r["mode"] == mode), None) for p in points]
    xs = [i + j * width for i, r in enumerate(rows) if r]
    med = [r["ttft_ms_median"] for r in rows if r]
    err = [[r["ttft_ms_median"] - r["ttft_ms_min"] for r in rows if r],
           [r["ttft_ms_max"] - r["ttft_ms_median"] for r in rows if r]]
    ax.bar(xs, med, width, yerr=err, capsize=3, label=mode)
  ax.set_xticks([i + width for i in range(len(points))])
  ax.set_xticklabels([f"{n} tok\nC={c}" for n, c in points])
  ax.set_ylabel("time to first token (ms, median; bars: min-max)")
  _save(fig, ax, path, grid_axis="y", legend_size=None)


def write(run_dir: str) -> str:
  """Writes report.md (last), ledger.json and the plots; a directory it refuses keeps no
  earlier report (which would cite rows that are no longer what was checked)."""
  for name in outputs.DERIVED_FILES:
    path = os.path.join(run_dir, name)
    if os.path.isdir(run_dir) and os.path.lexists(path):
      try:
        os.remove(path)
      except OSError as e:
        raise ReportError(f"cannot remove the old {path}: {e.strerror or e}") from None
  ppl, mem, lat, work, trace_claim, records = _load(run_dir)
  if not (ppl or mem or lat or work or trace_claim):
    raise ReportError(f"{run_dir} holds none of perplexity.json, memory_sweep.csv, "
                      "latency.csv, workloads.csv, trace_replay.csv")
  try:
    return _write(run_dir, ppl, mem, lat, work, trace_claim, records)
  except (outputs.OutputError, OSError) as e:  # OSError: matplotlib's savefig
    for name in outputs.DERIVED_FILES:  # nothing half-written: no plots without their report
      try:
        os.remove(os.path.join(run_dir, name))
      except OSError:
        pass
    detail = str(e) if isinstance(e, outputs.OutputError) else e.strerror or str(e)
    raise ReportError(f"cannot write the report into {run_dir}: {detail}") from None


def _write(run_dir, ppl, mem, lat, work, trace_claim, records) -> str:
  claims = ledger.build(ppl, mem, lat) + list(trace_claim)
  md = ["# hq-jax run report\n"]
  for script, run in sorted(records.items()):
    md.append(f"{script} run `{run.get(outputs.RUN_ID)}` produced {run.get('date')} on "
              f"{run.get('device')} ({run.get('platform')}, JAX backend "
              f"{run.get('backend', '?')}), JAX {run.get('jax_version')}, attention "
              f"{run.get('attention', '?')}, by `{run.get('command', '')}`.\n")
  md.append("## Claims ledger\n")
  md.append("Each verdict is computed from the rows it cites (`file#N` = Nth data row).\n")
  md.append(_table(claims, ["claim", "supported", "verdict", "evidence"]))
  if ppl:
    md.append("## Perplexity (dense vs HQ)\n")
    md.append(_table([{
        "model": ppl.get("model_name", ppl.get("model", "")), "tokens": ppl["num_tokens"],
        "dense ppl": ppl["dense"]["ppl"], "hq ppl": ppl["hq"]["ppl"],
        "max |dlogit| full": ppl["max_abs_logit_diff"]["full_prefill"],
        "max |dlogit| reuse": ppl["max_abs_logit_diff"]["prefix_reuse"]}],
        ["model", "tokens", "dense ppl", "hq ppl", "max |dlogit| full", "max |dlogit| reuse"]))
  if mem:
    md.append("## Memory sweep\n")
    md.append("Every row was checked: tokens_per_request == context_length and "
              "kv_bytes_used == kv_bytes_predicted.\n")
    md.append(_table(mem, ["backend", "context_length", "concurrency", "shared_prefix_tokens",
                           "kv_bytes_allocated", "kv_bytes_used", "kv_bytes_predicted",
                           "reuse_factor", "metadata_bytes", "ttft_ms"], first_index=True))
    plot_kv_vs_context(mem, os.path.join(run_dir, "kv_bytes_vs_context.png"))
    plot_reuse(mem, os.path.join(run_dir, "reuse_factor.png"))
    md.append("\n![KV bytes used vs context length](kv_bytes_vs_context.png)\n")
    md.append("![Reuse factor vs concurrency](reuse_factor.png)\n")
  if lat:
    md.append("## Latency\n")
    md.append(_table(lat, ["mode", "context_length", "concurrency", "cached_tokens",
                           "computed_tokens", "ttft_ms_median", "ttft_ms_min", "ttft_ms_max",
                           "decode_step_ms_median", "repeats"], first_index=True))
    plot_ttft(lat, os.path.join(run_dir, "ttft.png"))
    md.append("\n![TTFT with and without reuse](ttft.png)\n")
  if work:
    md.append("## Workloads\n")
    md.append(_table(work, ["workload", "backend", "requests", "prompt_tokens", "kv_bytes_used",
                            "reuse_factor", "hit_rate", "computed_tokens"], first_index=True))
  outputs.write_json(os.path.join(run_dir, "ledger.json"), claims)
  path = os.path.join(run_dir, "report.md")
  outputs.write_text(path, "\n".join(md))
  return path
