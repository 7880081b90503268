"""Turns a run directory (perplexity.json, memory_sweep.csv, latency.csv, workloads.csv)
into report.md with tables, plots and the claims ledger.

  hq-jax report --run_dir=DIR

Refuses (status 1, naming the file, row and column) a directory whose files carry
another run's id than their run record, or any row that fails its sweep's check_row.
"""

import os
import sys


from absl import app, flags

from hq_jax.study import cli, report

_RUN_DIR = flags.DEFINE_string("run_dir", None, "directory written by the sweep scripts")


def main(argv):
  del argv
  if not _RUN_DIR.value:
    raise app.UsageError("--run_dir is required")
  try:
    path = report.write(_RUN_DIR.value)
  except report.ReportError as e:
    sys.exit(f"error: {e}")
  print(f"report: {os.path.abspath(path)}")



def run(argv=None):
  """`hq-jax report` and `scripts/report.py`."""
  cli.run_command(cli.exit_on_error(main), __name__, argv)
