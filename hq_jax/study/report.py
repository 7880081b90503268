"""Turns a run directory into report.md: tables, PNG plots and the claims ledger.

Reads whatever of these the directory holds: perplexity.json, memory_sweep.csv,
latency.csv, workloads.csv, each with the run record of the script that wrote it
(`<script>.run.json`, see harness/outputs.py). Writes report.md, ledger.json and the
plots next to them.

Nothing is cited unchecked: every file must carry the run id of its run record (so rows
are never credited to another run's command), and every row is re-checked with the same
`check_row` its sweep used. A file or row that fails is refused (ReportError naming the
file, the row and the column), never reported: a ledger line above a tampered row would
be a lie, and a partial report could be mistaken for a whole one.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

from matplotlib.figure import Figure

from hq_jax.study import latency, ledger, memory, outputs, traces, workloads
from hq_jax.study.errors import HarnessError

# file -> the check each of its rows must pass (the one its sweep ran)
SOURCES: dict[str, Callable[[dict], None] | None] = {
    "perplexity.json": None,
    "memory_sweep.csv": memory.check_row,
    "latency.csv": latency.check_row,
    "workloads.csv": workloads.check_row,
}


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


def _load(run_dir: str):
  """(perplexity, memory rows, latency rows, workload rows, run records by script), each
  file checked against its run record and each row against its sweep's `check_row`."""
  if not os.path.isdir(run_dir):
    raise ReportError(f"--run_dir={run_dir} is not a directory")
  loaded: dict = {}
  for name, check in SOURCES.items():
    path = os.path.join(run_dir, name)
    if not os.path.exists(path):
      continue
    content = outputs.read_json(path) if name.endswith(".json") else outputs.read_csv(path)
    if check is not None:
      for i, row in enumerate(content):
        try:
          check(row)
        except (HarnessError, KeyError, TypeError) as e:
          what = f"missing column {e}" if isinstance(e, KeyError) else str(e)
          raise ReportError(f"{path} data row {i + 1}: {what}. The report cites only rows "
                            "that pass the sweep's own checks: re-run the sweep") from e
    loaded[name] = content
  records = {}
  try:
    all_records = outputs.run_records(run_dir)
    for name, content in loaded.items():
      record = outputs.check_file_run(run_dir, name, content, all_records)
      records[record.get("script", name)] = record
  except outputs.OutputError as e:
    raise ReportError(str(e)) from e
  return (loaded.get("perplexity.json"), loaded.get("memory_sweep.csv", []),
          loaded.get("latency.csv", []), loaded.get("workloads.csv", []), records)


def _trace_claim(run_dir: str) -> dict | None:
  """The trace replay's ledger row (scripts/trace_replay.py), recomputed from the rows of
  trace_replay.csv, never copied from summary.json; None if the directory holds no replay.
  A summary.json whose verdict differs from what its CSV gives is refused."""
  path = os.path.join(run_dir, "trace_replay.csv")
  if not os.path.exists(path):
    return None
  try:
    rows = outputs.read_csv(path)
    summary_path = os.path.join(run_dir, "summary.json")
    summary = outputs.read_json(summary_path) if os.path.exists(summary_path) else {}
    name = os.path.basename(summary.get("trace", {}).get("path", "")) or "replayed"
    claim = traces.ledger_row(rows, name)
  except (outputs.OutputError, KeyError, TypeError, ZeroDivisionError) as e:
    raise ReportError(f"{path}: not a trace replay the report can check ({e})") from e
  if summary.get("ledger_row") not in (None, claim):
    raise ReportError(f"{summary_path}: its ledger row is not what {path} gives; the report "
                      "cites only verdicts it recomputes from rows: re-run the replay")
  return claim


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
  ppl, mem, lat, work, records = _load(run_dir)
  trace_claim = _trace_claim(run_dir)
  if not (ppl or mem or lat or work or trace_claim):
    raise FileNotFoundError(f"{run_dir} holds none of perplexity.json, memory_sweep.csv, "
                            "latency.csv, workloads.csv, trace_replay.csv")
  claims = ledger.build(ppl, mem, lat) + ([trace_claim] if trace_claim else [])
  outputs.write_json(os.path.join(run_dir, "ledger.json"), claims)
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
  path = os.path.join(run_dir, "report.md")
  with open(path, "w") as f:
    f.write("\n".join(md))
  return path
