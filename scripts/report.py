"""Turns a run directory (perplexity.json, memory_sweep.csv, latency.csv, workloads.csv)
into report.md with tables, plots and the claims ledger.

  python scripts/report.py --run_dir=DIR
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from absl import app, flags

from hq_jax.harness import report

_RUN_DIR = flags.DEFINE_string("run_dir", None, "directory written by the sweep scripts")


def main(argv):
  del argv
  if not _RUN_DIR.value:
    raise app.UsageError("--run_dir is required")
  path = report.write(_RUN_DIR.value)
  print(f"report: {os.path.abspath(path)}")


if __name__ == "__main__":
  app.run(main)
