"""Trace replay (scripts/trace_replay.py): the Mooncake conversation trace, dense vs HQ.

The defaults replay the whole trace in --no_model mode at the 0.5B shape; model mode
(GPU) wants a slice: --max_requests=64 --time_scale=0.05; --attention=auto picks Pallas there.
"""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.trace = "../shared/traces/mooncake_conversation_trace.jsonl"  # Relative: cwd, then repo.
  c.trace_format = "mooncake"
  c.no_model = False
  c.model = "0.5b"
  c.dtype = "bfloat16"
  c.kv_dtype = ""  # K/V cache: "" = dtype, bfloat16, float8_e4m3fn (e4m3 + per-token scales).
  c.block_size = 16
  c.chunk_size = 512
  c.decode_rows = 64  # Model mode: rows of every decode step (0 = bucketed, not batch-invariant).
  c.attention = "auto"
  c.kv_budget_gb = [0.0]
  # HQ's host tier per row (GB of host memory; 0 = none), and where it lives: "auto" =
  # pinned host memory where the backend has it, else the device's ("device").
  c.host_kv_budget_gb = [0.0]
  c.host_memory = "auto"
  c.max_concurrency = 64
  c.max_output_tokens = 0
  c.max_requests = 0
  c.window_s = 0.0
  c.time_scale = 1.0
  c.prefill_tokens_per_s = 10_000.0
  c.decode_tokens_per_s = 30.0
  c.capacity_context_lengths = [4096, 32768]
  c.capacity_shared_fractions = [0.5, 0.9]
  c.time_limit_s = 0.0
  c.allow_long_context = False  # Model mode: refuse prompts past the model's context.
  c.seed = 0
  c.allow_long_context = False
  c.mesh = ""  # "data:D,model:M": D cache shards, cache-aware routing; model:M: TP (model mode).
  c.output_dir = ""
  c.overwrite = False
  return c
