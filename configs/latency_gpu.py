"""Latency on the H200 (scripts/latency.py): the 0.5B shape at 4k-32k tokens, bfloat16.

Seeded random weights at the Qwen2.5 shape (speed does not depend on their values); the
Pallas kernels; the same prefill chunk as configs/memory_sweep_gpu.py, so a point's time to
first token here and there measure the same steps.
"""

from configs import latency


def get_config():
  c = latency.get_config()
  c.model = "0.5b"
  c.context_lengths = [4096, 8192, 16384, 32768]
  c.concurrency = [8]
  c.shared_prefix_fractions = [0.5, 0.9]
  c.chunk_size = 4096
  c.dtype = "bfloat16"
  c.attention = "pallas"
  c.repeats = 5
  c.warmup = 1
  # The decode steps after a 32,768-token prompt reach position 32,774, past the preset's
  # max_position_embeddings (32,768): harmless for speed on random weights, so said here.
  c.allow_long_context = True
  return c
