"""Trace replay in model mode on one GPU with more room: FP8 K/V and an HQ host tier.

  python scripts/trace_replay.py --config=configs/trace_replay_host_gpu.py --output_dir=$OUT

The first 10 minutes of the Mooncake trace, as `trace_replay_gpu`, with 32 GB of device K/V
in float8_e4m3fn (twice bfloat16's blocks) and a 64 GB host tier in pinned host memory
(issue 27's acceptance): rows dense (FP8, 32 GB) and hq (FP8, 32 GB + 64 GB host), their
TTFT percentiles, the host tier's hit tokens, bytes moved each way and transfer time.
FP8 prefills and decodes on the Triton kernels (`pallas` picks them for FP8).
"""

from configs import trace_replay_gpu


def get_config():
  c = trace_replay_gpu.get_config()
  c.kv_dtype = "float8_e4m3fn"
  c.host_kv_budget_gb = [64.0]
  c.host_memory = "auto"  # pinned_host where the backend runs the copy step there
  return c
