"""Latency on CPU (scripts/latency.py): TTFT with and without reuse, decode step time."""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.model = "tiny"
  c.text_file = ""
  c.context_lengths = [256]
  c.concurrency = [4]
  c.shared_prefix_fractions = [0.75]
  c.block_size = 16
  c.chunk_size = 64
  c.dtype = "float32"
  c.kv_dtype = ""  # K/V cache: "" = dtype, bfloat16, float8_e4m3fn (e4m3 + per-token scales).
  c.repeats = 5
  c.warmup = 1
  c.seed = 0
  c.attention = "auto"  # auto | reference | pallas | pallas_interpret | mosaic; auto: Pallas on GPU.
  c.decode_attention = "paged"  # paged | dedup | auto.
  c.decode_rows = 64  # Rows of every decode step (0 = the bucketed opt-out, not batch-invariant).
  c.allow_long_context = False  # Refuse requests past the model's max_position_embeddings.
  c.mesh = ""  # "data:1,model:M": tensor parallel over M devices; "" = one device.
  c.output_dir = ""
  c.overwrite = False  # Replace this script's earlier outputs in output_dir (else refused).
  return c
