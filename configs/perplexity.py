"""Perplexity of real text, dense vs HQ (scripts/perplexity.py)."""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.model = "shipped"  # "shipped", a preset (random weights), a .gguf file or an HF dir.
  c.text_file = ""  # Empty: the shipped Wikipedia articles.
  c.num_tokens = 512  # CPU-friendly; configs/perplexity_gpu.py uses 4096.
  c.chunk_size = 64
  c.block_size = 16
  c.dtype = "float32"
  c.kv_dtype = ""  # K/V cache: "" = dtype, bfloat16, float8_e4m3fn (e4m3 + per-token scales).
  c.seed = 0  # Random weights for presets.
  c.attention = "auto"  # auto | reference | pallas | pallas_interpret | mosaic; auto: Pallas on GPU.
  c.decode_attention = "paged"  # paged | dedup | auto.
  c.allow_long_context = False  # Refuse requests past the model's max_position_embeddings.
  c.mesh = ""  # "data:1,model:M": tensor parallel over M devices; "" = one device.
  c.output_dir = ""
  c.overwrite = False  # Replace this script's earlier outputs in output_dir (else refused).
  return c
