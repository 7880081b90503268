"""Trace replay in model mode on one H200: the Mooncake trace's first 6 minutes, dense vs HQ.

  python scripts/trace_replay.py --config=configs/trace_replay_gpu.py --output_dir=$OUT

About 6 minutes of device time for both backends together (an estimate from the
--no_model accounting of this window and measured H200 rates: docs/traces.md, "Model
mode"). 2 GB of KV at the 0.5B shape forces HQ to evict cached blocks; a 4,096-token
chunk and 16 request slots keep the compiled shapes to one prefill chunk and five decode
buckets. --time_limit_s keeps the run under a 10-minute device call: past it, nothing
more is admitted and the outputs are written marked partial.
"""

from configs import trace_replay


def get_config():
  c = trace_replay.get_config()
  c.no_model = False
  c.model = "0.5b"
  c.dtype = "bfloat16"
  c.attention = "auto"  # the Pallas kernels on a GPU
  c.window_s = 360.0  # the first 6 minutes of arrivals: 1,082 requests, 14.95M prompt tokens
  c.kv_budget_gb = [2.0]
  c.chunk_size = 4096
  c.max_concurrency = 16
  c.max_output_tokens = 4
  c.time_scale = 1.0  # real time; idle gaps are skipped, not slept
  c.time_limit_s = 540.0
  return c
