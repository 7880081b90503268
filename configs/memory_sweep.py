"""Memory sweep on CPU (scripts/memory_sweep.py): a small grid, both backends."""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.model = "tiny"  # "shipped", a preset (seeded random weights), a .gguf file or an HF dir.
  c.text_file = ""  # Empty: the shipped Wikipedia articles.
  c.context_lengths = [256, 1024]
  c.concurrency = [1, 8]
  c.shared_prefix_fractions = [0.75]
  c.num_prefixes = [1]
  c.max_seq_len = 0  # Dense reservation per request; 0 = the request's context_length.
  c.block_size = 16
  c.chunk_size = 64
  c.chunk_size_at = []  # "CONTEXT:CHUNK": another prefill chunk at that context length.
  c.dtype = "float32"
  c.kv_dtype = ""  # K/V cache: "" = dtype, bfloat16, float8_e4m3fn (e4m3 + per-token scales).
  c.seed = 0
  c.workloads = True  # Also run system-prompt / few-shot / multi-turn workloads.
  c.users = 4
  c.system_tokens = 192
  c.user_tokens = 48
  c.examples = 3
  c.example_tokens = 96
  c.turns = 4
  c.attention = "auto"  # auto | reference | pallas | pallas_interpret | mosaic; auto: Pallas on GPU.
  c.decode_attention = "paged"  # paged | dedup | auto.
  c.allow_long_context = False  # Refuse requests past the model's max_position_embeddings.
  c.mesh = ""  # "data:1,model:M": tensor parallel over M devices; "" = one device.
  c.plan_only = False  # Write memory_plan.csv (what fits per device at each --plan_tp) only.
  c.plan_tp = [1, 2, 4, 8]  # Tensor-parallel sizes of the plan.
  c.device_gb = 0.0  # The plan's device memory (decimal GB); 0 = this device's limit.
  c.output_dir = ""
  c.overwrite = False  # Replace this script's earlier outputs in output_dir (else refused).
  return c
