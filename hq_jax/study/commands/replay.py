"""Trace replay: a real request stream through the dense and HQ caches at KV budgets.

  hq-jax replay --no_model --kv_budget_gb=0,1,4,16 --output_dir=DIR

replays ../shared/traces/mooncake_conversation_trace.jsonl (or --trace) in arrival
order and writes DIR/trace_replay.csv (one row per backend x budget), DIR/capacity.csv
(concurrent requests each backend admits on a synthetic grid), DIR/trace_replay.png and
DIR/summary.json (strict JSON: config, command, rows, and the ledger row). --no_model
runs the real caches (host-only) on a time model; model mode runs seeded weights through
`Engine` on a slice (--max_requests) and adds TTFT percentiles. Requests longer than the
model's context (prompt + output > max_position_embeddings) are skipped and counted
(skipped_long_context) unless --allow_long_context. docs/traces.md walks through one replay.
"""

import math
import os
import time


import tqdm
from absl import app, flags
from ml_collections import config_flags

from configs import trace_replay as default_config
from hq_jax.study import cli, outputs, trace_outputs, traces

_CONFIG = config_flags.DEFINE_config_file(
    "config", cli.config_path("trace_replay.py"),
    "Config file; its fields can also be set by the plain flags below.")
cli.define_flags(default_config.get_config(), {
    "trace": "JSONL trace; a relative path is tried from the cwd, then from the repo root",
    "trace_format": f"trace file format, one of {sorted(traces.FORMATS)}",
    "no_model": "replay the real caches without a model, on a time model (fast, whole "
                "trace on CPU)",
    "model": "preset whose KV shape sets bytes per block (model mode: seeded weights)",
    "dtype": "KV / weight dtype: bytes per block follow it",
    "attention": "model mode: auto | reference | pallas | triton | mosaic | pallas_interpret "
                 "(auto: pallas on a GPU)",
    "kv_budget_gb": "KV pool budgets in GB (10^9 bytes); 0 = unbounded",
    "host_kv_budget_gb": "HQ host-tier budgets in GB (one hq row per device budget and host "
                         "budget); 0 = no host tier",
    "host_memory": "model mode: where the host tier lives: auto (pinned_host where the "
                   "backend has it, else device) | pinned_host | device",
    "max_concurrency": "requests holding KV at once (and cache slots)",
    "max_output_tokens": "cap on generated tokens per request; 0 = the trace's output_length",
    "max_requests": "replay only the first N requests; 0 = all",
    "window_s": "replay only the requests arriving in the trace's first S seconds; 0 = all",
    "time_scale": "arrival times are multiplied by this (< 1 compresses the trace)",
    "prefill_tokens_per_s": "time model: computed prefill tokens per second",
    "decode_tokens_per_s": "time model: generated tokens per second of one request",
    "capacity_context_lengths": "capacity grid: tokens per request",
    "capacity_shared_fractions": "capacity grid: shared prefix fraction, in [0, 1)",
    "time_limit_s": "model mode: after this many seconds (from the start, shared evenly by "
                    "the rows) stop admitting, finish, write outputs marked partial; 0 = none",
    "seed": "seed of the synthesized tokens and of random weights",
    "allow_long_context": "replay requests whose prompt + output exceed the model's "
                          "max_position_embeddings (else skipped and counted)",
    "output_dir": "where the outputs go (required; must be empty unless --overwrite)",
    "overwrite": "allow writing into a non-empty --output_dir",
})
flags.adopt_module_key_flags(cli)


def _check(ok: bool, flag: str, message: str) -> None:
  if not ok:
    raise app.UsageError(f"--{flag}: {message}")


def validate(cfg):
  """Every flag checked before any work; returns (model config, KV layout, trace path).

  The fields every command shares (output_dir, dtype, block_size, chunk_size, attention,
  seed) go through `cli.validate`; the replay checks only its own here."""
  from hq_jax import config as config_lib
  from hq_jax.kv.paged import KVLayout
  try:
    cli.validate(cfg)
  except (ValueError, outputs.OutputError) as e:
    raise app.UsageError(str(e)) from None
  _check(cfg.trace_format in traces.FORMATS, "trace_format",
         f"{cfg.trace_format!r} is not one of {sorted(traces.FORMATS)}")
  try:
    model_cfg = config_lib.get_config(cfg.model, dtype=cfg.dtype)
  except ValueError as e:
    raise app.UsageError(f"--model: {e}") from None
  _check(traces.TRACE_BLOCK_TOKENS % cfg.block_size == 0, "block_size",
         f"{cfg.block_size} must divide the trace block ({traces.TRACE_BLOCK_TOKENS} tokens)")
  if not cfg.no_model and cfg.attention in ("pallas", "triton", "mosaic"):
    import jax
    _check(jax.default_backend() == "gpu", "attention",
           f"{cfg.attention} needs a GPU (backend here: {jax.default_backend()}); use "
           "reference or pallas_interpret, or --no_model")
  _check(len(cfg.kv_budget_gb) > 0, "kv_budget_gb", "give at least one budget")
  _check(all(math.isfinite(b) and b >= 0 for b in cfg.kv_budget_gb), "kv_budget_gb",
         f"{cfg.kv_budget_gb} must be finite and >= 0")
  _check(len(set(cfg.kv_budget_gb)) == len(cfg.kv_budget_gb), "kv_budget_gb",
         "a budget appears twice")
  hosts = cfg.host_kv_budget_gb
  _check(len(hosts) > 0, "host_kv_budget_gb", "give at least one budget (0 = no host tier)")
  _check(all(math.isfinite(b) and b >= 0 for b in hosts), "host_kv_budget_gb",
         f"{hosts} must be finite and >= 0")
  _check(len(set(hosts)) == len(hosts), "host_kv_budget_gb", "a budget appears twice")
  from hq_jax.kv import tiers
  _check(cfg.host_memory in tiers.HOST_MEMORY_KINDS, "host_memory",
         f"{cfg.host_memory!r} is not one of {', '.join(tiers.HOST_MEMORY_KINDS)}")
  # The K/V dtype sets the bytes of a block, so how many blocks a budget buys (FP8: about
  # half of bfloat16's bytes, scales included).
  layout = KVLayout.from_config(model_cfg, cfg.block_size, cfg.kv_dtype or cfg.dtype)
  try:
    for b in cfg.kv_budget_gb:
      trace_outputs.pool_blocks(b, layout.bytes_per_block)
    for b in hosts:
      trace_outputs.host_pool_blocks(b, layout.bytes_per_block)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  if not cfg.no_model and any(hosts):
    try:
      tiers.host_memory_kind(cfg.host_memory)
    except ValueError as e:
      raise app.UsageError(f"--host_memory: {e}") from None
  for name in ("max_concurrency", "time_scale", "prefill_tokens_per_s", "decode_tokens_per_s"):
    _check(cfg[name] > 0 and math.isfinite(cfg[name]), name, f"{cfg[name]} must be positive")
  for name in ("max_output_tokens", "max_requests", "window_s", "time_limit_s"):
    _check(cfg[name] >= 0, name, f"{cfg[name]} must be >= 0 (0 = no limit)")
  _check(all(n > 0 for n in cfg.capacity_context_lengths), "capacity_context_lengths",
         f"{cfg.capacity_context_lengths} must be positive")
  _check(all(0 <= f < 1 for f in cfg.capacity_shared_fractions), "capacity_shared_fractions",
         f"{cfg.capacity_shared_fractions} must be in [0, 1)")
  from hq_jax.mesh import MeshSpec
  spec = MeshSpec.parse(cfg.mesh)
  if cfg.no_model:
    _check(spec.model == 1, "mesh", f"{spec.label}: model:M splits a model's heads; "
           "--no_model replays caches only (data:D shards them)")
  else:
    try:
      cli.data_meshes(cfg, model_cfg)
    except ValueError as e:
      raise app.UsageError(str(e)) from None
  _check(spec.data <= cfg.max_concurrency, "mesh",
         f"{spec.label}: each data shard needs a slot of --max_concurrency={cfg.max_concurrency}")
  path = cfg.trace
  if not os.path.isabs(path) and not os.path.exists(path):
    path = os.path.join(cli.REPO_ROOT, path)
  return model_cfg, layout, os.path.abspath(path)


def _replay(run, cfg, requests, model_cfg, layout, replay_cfg, engine, trace_path, deadline):
  """Replays every budget, writes the run's outputs; returns (rows, capacity, summary)."""
  bar = lambda desc: tqdm.tqdm(total=len(requests), desc=desc, unit="req", mininterval=1.0)
  shard_rows = []  # --mesh=data:D: one per (row, shard)
  rows = trace_outputs.run_budgets(
      requests, cfg.kv_budget_gb, model=cfg.model, layout=layout, cfg=replay_cfg,
      vocab_size=model_cfg.vocab_size, seed=cfg.seed,
      max_context=model_cfg.context_limit(cfg.allow_long_context),
      engine=engine, progress_factory=bar, deadline=deadline, mesh=cfg.mesh,
      shard_rows=shard_rows, host_budgets_gb=cfg.host_kv_budget_gb,
      host_memory=cfg.host_memory)
  capacity = trace_outputs.capacity_rows(
      model=cfg.model, budgets_gb=cfg.kv_budget_gb, bytes_per_block=layout.bytes_per_block,
      block_size=cfg.block_size, context_lengths=cfg.capacity_context_lengths,
      shared_fractions=cfg.capacity_shared_fractions)
  capacity = [{**r, "kv_dtype": layout.dtype} for r in capacity]
  run.write_csv("trace_replay.csv", rows, trace_outputs.COLUMNS)
  run.write_csv("capacity.csv", capacity, trace_outputs.CAPACITY_COLUMNS)
  name = os.path.basename(trace_path)
  trace_outputs.plot(rows, run.path("trace_replay.png"),
                     f"{name}: {len(requests)} requests, {cfg.model} KV shape, "
                     f"block {cfg.block_size}, concurrency <= {cfg.max_concurrency}")
  run.adopt("trace_replay.png")  # written by matplotlib: sealed as it is on disk
  prompt = sum(r.input_length for r in requests)
  summary = {
      "command": cli.command_line(), "config": cfg.to_dict(), **cli.run_metadata(),
      "trace": {"path": trace_path, "requests": len(requests), "prompt_tokens": prompt,
                "direct_hit_ratio": traces.direct_hit_tokens(requests) / prompt},
      "kv_dtype": layout.dtype, "bytes_per_block": layout.bytes_per_block, "rows": rows,
      "capacity": capacity, "mesh": rows[0]["mesh"], "shards": shard_rows,
      # True when --time_limit_s stopped a model-mode row early: its requests are a prefix.
      "partial": any(r["partial"] for r in rows),
      "ledger_row": traces.ledger_row(rows, name)}
  run.write_json("summary.json", summary)  # strict JSON, with the run id
  run.finish(partial=summary["partial"])
  return rows, capacity, summary


def main(argv):
  del argv
  t_start = time.perf_counter()
  cfg = cli.resolve(_CONFIG.value)
  model_cfg, layout, trace_path = validate(cfg)
  try:
    requests = traces.load_trace(trace_path, cfg.trace_format, cfg.max_requests)
  except traces.TraceError as e:
    raise app.UsageError(f"--trace: {e}") from None
  if cfg.window_s:
    requests = [r for r in requests if r.arrival_s < cfg.window_s]
    _check(bool(requests), "window_s", f"no request arrives in the first {cfg.window_s:g} s")
  replay_cfg = traces.ReplayConfig(
      max_concurrency=cfg.max_concurrency, max_output_tokens=cfg.max_output_tokens,
      prefill_tokens_per_s=cfg.prefill_tokens_per_s,
      decode_tokens_per_s=cfg.decode_tokens_per_s, time_scale=cfg.time_scale)
  files = ["trace_replay.csv", "capacity.csv", "trace_replay.png", "summary.json"]
  # The record's config, block bytes and request count let the report check every row
  # against the replay that wrote it.
  run = cli.open_run(cfg, "trace_replay", files, bytes_per_block=layout.bytes_per_block,
                     trace_requests=len(requests))
  ran, engine = "none (--no_model)", None
  if not cfg.no_model:
    import jax

    from hq_jax import model as model_lib
    from hq_jax.serve.engine import Engine
    params = model_lib.init_params(model_cfg, jax.random.key(cfg.seed))
    # One engine per data row of --mesh (each its own weights copy and cache). The tiers'
    # copies are waited for and timed (transfer_s): at admission the device has finished
    # the last step anyway (its tokens were read), and the first chunk needs them.
    engine = [Engine(params, model_cfg, chunk_size=cfg.chunk_size, attention=cfg.attention,
                     allow_long_context=cfg.allow_long_context, kv_dtype=layout.dtype,
                     decode_rows=cfg.decode_rows, mesh=m, time_transfers=True)
              for m in cli.data_meshes(cfg, model_cfg)]
    ran = engine[0].attention_label
  deadline = t_start + cfg.time_limit_s if cfg.time_limit_s else None
  # The run locks the directory while it writes; a failure marks its record failed.
  run.record["attention"] = ran
  with run:
    rows, capacity, summary = _replay(run, cfg, requests, model_cfg, layout, replay_cfg,
                                      engine, trace_path, deadline)
  name, prompt = os.path.basename(trace_path), summary["trace"]["prompt_tokens"]
  print(f"trace {name}: {len(requests)} requests, {prompt:,} prompt tokens, direct chain "
        f"hit ratio {100 * summary['trace']['direct_hit_ratio']:.2f}%")
  for r in rows:
    tier = (f" + {r['host_kv_budget_gb']:g} host (device {100 * r['device_hit_tokens'] / max(r['prompt_tokens'], 1):.2f}%"
            f" / host {100 * r['host_hit_tokens'] / max(r['prompt_tokens'], 1):.2f}%)"
            if r["host_kv_budget_gb"] else "")
    print(f"{r['backend']:13s} {r['kv_budget_gb']:7g} GB{tier}  hit {100 * r['hit_ratio']:6.2f}%  "
          f"computed {r['computed_prefill_tokens']:>12,}  evicted {r['evicted_blocks']:>9,}  "
          f"peak {r['peak_kv_bytes_used'] / 1e9:7.2f} GB  mean conc "
          f"{r['mean_concurrency']:5.1f}  skipped {r['skipped_requests']}"
          + (f" + {r['skipped_long_context']} long" if r["skipped_long_context"] else ""))
  for r in summary["shards"]:
    print(f"  shard {r['shard']} {r['backend']:13s} {r['kv_budget_gb']:7g} GB  hit "
          f"{100 * r['hit_ratio']:6.2f}%  requests {r['requests']:>7,}  routed by prefix "
          f"{r['routed_by_prefix']:>7,}")
  long = max(r["skipped_long_context"] for r in rows)
  if long:
    print(f"skipped {long} requests longer than {cfg.model}'s context (prompt + output > "
          f"max_position_embeddings {model_cfg.max_position_embeddings}): "
          "--allow_long_context replays them")
  timed = [r for r in rows if r["ttft_p50_ms"] is not None]
  if timed:
    print(f"\n{'backend':13s} {'budget':>7s} {'requests':>8s} {'TTFT p50':>9s} {'p90':>9s} "
          f"{'p99 (ms)':>9s} {'prefill tok/s':>13s} {'decode steps':>12s} {'admit ms':>8s}")
    for r in timed:
      print(f"{r['backend']:13s} {r['kv_budget_gb']:5g} GB {r['requests']:8d} "
            f"{r['ttft_p50_ms']:9.1f} {r['ttft_p90_ms']:9.1f} {r['ttft_p99_ms']:9.1f} "
            f"{r['prefill_tokens_per_s_measured']:13,.0f} {r['decode_steps']:12d} "
            f"{r['host_admit_ms_mean']:8.2f}"
            + (f"  host {r['host_kv_budget_gb']:g} GB: {r['host_hit_requests']} requests hit it, "
               f"transfers {r['transfer_s']:.3f} s ({1000 * r['transfer_s'] / max(r['host_hit_requests'], 1):.2f} ms "
               f"per host-hit request), {r['bytes_to_device'] / 1e9:.2f} GB in, "
               f"{r['bytes_to_host'] / 1e9:.2f} GB out ({r['host_memory_kind']})"
               if r["host_kv_budget_gb"] else "")
            + ("  PARTIAL (--time_limit_s)" if r["partial"] else ""))
  print(f"ledger: {summary['ledger_row']['supported']}: {summary['ledger_row']['verdict']}")
  print(f"wrote {cfg.output_dir}/trace_replay.csv, capacity.csv, trace_replay.png, summary.json")



def run(argv=None):
  """`hq-jax replay` and `scripts/trace_replay.py`."""
  cli.run_command(cli.exit_on_error(main), __name__, argv)
