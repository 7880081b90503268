"""Trace replay in model mode on one H200: the Mooncake trace's first 10 minutes, dense vs HQ.

  python scripts/trace_replay.py --config=configs/trace_replay_gpu.py --output_dir=$OUT

The window holds 1,750 requests, 24.5M prompt tokens; both backends fit one 10-minute
device call (the measured time: docs/results.md, "Trace replay"). 32 GB of KV at the 0.5B
shape (2.6M tokens) holds about a tenth of what the window writes, so HQ evicts; a
4,096-token chunk and 16 request slots keep the compiled shapes to one prefill chunk and five
decode buckets. --time_limit_s keeps the run inside a 10-minute device call: past it,
nothing more is admitted and the outputs are written marked partial.
"""

from configs import trace_replay


def get_config():
  c = trace_replay.get_config()
  c.no_model = False
  c.model = "0.5b"
  c.dtype = "bfloat16"
  c.attention = "auto"  # the Pallas kernels on a GPU
  c.window_s = 600.0  # the first 10 minutes of arrivals: 1,750 requests, 24.5M prompt tokens
  c.kv_budget_gb = [32.0]
  c.chunk_size = 4096
  c.max_concurrency = 16
  c.max_output_tokens = 4
  c.time_scale = 1.0  # real time; idle gaps are skipped, not slept
  c.time_limit_s = 545.0
  return c
