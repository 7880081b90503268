"""The full-size sweep for the H200: Qwen2.5 shapes with seeded random weights, bfloat16.

Run once per model shape (--model=0.5b, --model=7b). The largest points hold
64 x 128k tokens of dense K/V: 64 * 131072 * 57344 B = 481 GB for the 7B shape in
bfloat16, more than one H200 has: the sweep skips a point whose dense pool does not fit
beside the weights (`memory.unfit_points`), prints why and lists it in run.json
("skipped_points"), and runs the rest. For the 7B shape's 32k x 64 point (120 GB of K/V
beside 15 GB of weights) give XLA_PYTHON_CLIENT_MEM_FRACTION=0.95.
"""

from configs import memory_sweep


def get_config():
  c = memory_sweep.get_config()
  c.model = "0.5b"
  c.context_lengths = [4096, 16384, 32768, 131072]
  c.concurrency = [1, 8, 64]
  c.shared_prefix_fractions = [0.0, 0.5, 0.9]
  # Prefill chunk for the GPU: e2e_bench's time to first token was best with 4k chunks at
  # the 7B shape and with 16k at 0.5B (docs/results.md, "GPU end to end"). Prefix reuse
  # skips whole chunks, so larger chunks reuse less of a short shared prefix: 4k here.
  c.chunk_size = 4096
  # At 128k, 16k chunks skip the same tokens as 4k chunks at these fractions (65,536 and
  # 114,688 of a request's shared prefix) and ran a 0.5B 128k prompt faster (docs/log/,
  # "Full grid and peak HBM"). Each row records its chunk;
  # --chunk_size_at= (empty) runs every point at --chunk_size.
  c.chunk_size_at = ["131072:16384"]
  c.dtype = "bfloat16"
  c.attention = "pallas"  # The kernel under test; "auto" would pick it too, but say so.
  # 131072 tokens exceed the presets' max_position_embeddings (32768; Qwen2.5 reaches 128k
  # with YaRN): fine for memory and speed on random weights, so asked for explicitly.
  c.allow_long_context = True
  c.workloads = False
  return c
