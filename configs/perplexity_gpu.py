"""Perplexity at 4096 tokens in bfloat16 (GPU)."""

from configs import perplexity


def get_config():
  c = perplexity.get_config()
  c.num_tokens = 4096
  c.chunk_size = 512
  c.dtype = "bfloat16"
  c.attention = "pallas"  # The kernel under test; "auto" would pick it too, but say so.
  return c
