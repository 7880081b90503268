"""Memory sweep: dense vs HQ on the same real-text requests over a grid.

  hq-jax sweep --model=tiny --context_lengths=256,1024 \
      --concurrency=1,8 --shared_prefix_fractions=0.75 --output_dir=DIR

writes DIR/memory_sweep.csv (one checked row per backend and grid point),
DIR/workloads.csv (system prompt, few-shot, multi-turn) and DIR/memory_sweep.run.json
(command, config, platform; its run_id is in every CSV row). The sweep stops with an
error if a measured kv_bytes_used differs from the analytic prediction; every flag is
checked before the model is loaded; earlier outputs in DIR are refused unless --overwrite.

  hq-jax sweep --plan_only --model=72b --dtype=bfloat16 --device_gb=80 \
      --context_lengths=4096,32768 --concurrency=8,64 --output_dir=DIR

writes only DIR/memory_plan.csv (and memory_plan.run.json): for each --plan_tp size, the
weights and dense K/V pool one device holds and whether the point fits, with the reason
when not; no weights are made and nothing is computed. --mesh=model:M runs the sweep
tensor parallel over M devices.
"""



import tqdm
from absl import flags
from ml_collections import config_flags

from configs import memory_sweep as default_config
from hq_jax.study import cli, errors, memory, workloads

_CONFIG = config_flags.DEFINE_config_file(
    "config", cli.config_path("memory_sweep.py"),
    "Config file; its fields can also be set by the plain flags below.")
cli.define_flags(default_config.get_config(), {
    "text_file": cli.REQUEST_TEXT_HELP,
    "context_lengths": "tokens per request (every request has exactly this many)",
    "concurrency": "requests held in the cache at once",
    "shared_prefix_fractions": "fraction of each request that is a shared prefix "
                               "(rounded down to whole blocks)",
    "num_prefixes": "distinct shared prefixes; request i carries prefix i % num_prefixes",
    "max_seq_len": "dense reservation per request; 0 = its context_length",
    "chunk_size_at": "CONTEXT:CHUNK pairs: the points of that context length prefill in that "
                     "chunk instead of --chunk_size (each row records its chunk)",
    "seed": "seed of request offsets in the text and of random weights",
    "workloads": "also run the system-prompt, few-shot and multi-turn workloads",
    "users": "workloads: concurrent users / requests",
    "system_tokens": "workloads: system prompt tokens",
    "user_tokens": "workloads: tokens of each user turn / question",
    "examples": "workloads: few-shot examples",
    "example_tokens": "workloads: tokens per few-shot example",
    "turns": "workloads: turns of the multi-turn conversation",
    "output_dir": "where the CSVs and memory_sweep.run.json are written (required)",
    "plan_only": "write memory_plan.csv (per-device weights and K/V at each --plan_tp, "
                 "what fits and why not) and stop: no weights, no compute",
    "plan_tp": "tensor-parallel sizes of --plan_only's plan",
    "device_gb": "--plan_only: device memory in decimal GB (0 = this device's limit)",
})
flags.adopt_module_key_flags(cli)


def main(argv):
  del argv
  cfg = cli.resolve(_CONFIG.value)
  cli.validate(cfg)  # Every flag, and the output directory, before anything is loaded.
  if cfg.plan_only:
    return _plan(cfg)
  cli.model_mesh(cfg, what="the memory sweep")  # syntax and devices, before any loading
  files = ["memory_sweep.csv"] + (["workloads.csv"] if cfg.workloads else [])
  run = cli.open_run(cfg, "memory_sweep", files)
  # The model, the text and every request are checked before the run opens: an input
  # error leaves nothing (no failed record) in the directory.
  params, model_cfg, stream = cli.load_model_and_stream(cfg)
  memory.check_sweep(model_cfg, stream, context_lengths=cfg.context_lengths,
                     concurrency=cfg.concurrency,
                     shared_prefix_fractions=cfg.shared_prefix_fractions,
                     num_prefixes=cfg.num_prefixes, block_size=cfg.block_size,
                     chunk_size=cfg.chunk_size, chunk_size_at=cfg.chunk_size_at,
                     max_seq_len=cfg.max_seq_len, seed=cfg.seed,
                     allow_long_context=cfg.allow_long_context)
  if cfg.workloads:
    workloads.check(model_cfg, stream, {k: cfg[k] for k in workloads.SIZE_MINIMUM}, cfg.seed,
                    cfg.allow_long_context)
  mesh = cli.model_mesh(cfg, model_cfg, "the memory sweep")
  with run:
    points = (len(cfg.context_lengths) * len(cfg.concurrency) *
              len(cfg.shared_prefix_fractions) * len(cfg.num_prefixes))
    engine_args = dict(block_size=cfg.block_size, chunk_size=cfg.chunk_size, seed=cfg.seed,
                       attention=cfg.attention, decode_attention=cfg.decode_attention,
                       allow_long_context=cfg.allow_long_context,
                       kv_dtype=cfg.kv_dtype or None, mesh=mesh)
    # After every grid point, so an interrupted sweep keeps what it measured (its run
    # record stays "running": the report refuses it).
    write = lambda rows: run.write_csv("memory_sweep.csv", rows, memory.COLUMNS)
    skipped = []

    def skip(point, reason):
      skipped.append(dict(zip(("context_length", "concurrency", "shared_prefix_fraction",
                               "num_prefixes"), point), reason=reason))
      tqdm.tqdm.write(f"skipped (does not fit): {reason}")

    with tqdm.tqdm(total=points, desc="memory sweep", unit="point") as bar:
      rows = memory.sweep(params, model_cfg, stream, model=cfg.model,
                          context_lengths=cfg.context_lengths, concurrency=cfg.concurrency,
                          shared_prefix_fractions=cfg.shared_prefix_fractions,
                          num_prefixes=cfg.num_prefixes, max_seq_len=cfg.max_seq_len,
                          chunk_size_at=cfg.chunk_size_at, progress=bar, on_rows=write,
                          on_skip=skip, **engine_args)
    if not rows:
      raise errors.HarnessError(f"no grid point fits on the device ({len(skipped)} skipped: "
                                f"{skipped[0]['reason']})")
    path = write(rows)
    print(f"wrote {path} ({len(rows)} rows, every kv_bytes_used equal to its prediction"
          f"{f'; {len(skipped)} points skipped, see run.json' if skipped else ''})")
    if cfg.workloads:
      sizes = {k: cfg[k] for k in workloads.SIZE_MINIMUM}
      wrows = workloads.run(params, model_cfg, stream, model=cfg.model, sizes=sizes,
                            **engine_args)
      print(f"wrote {run.write_csv('workloads.csv', wrows, workloads.COLUMNS)}")
    run.finish(attention=rows[0]["attention"], decode_attention=cfg.decode_attention,
               skipped_points=skipped)



def _plan(cfg):
  """--plan_only: memory_plan.csv for the grid at every --plan_tp, before any compute."""
  from hq_jax import config as config_lib
  try:
    model_cfg = config_lib.get_config("coder-0.5b" if cfg.model == "shipped" else cfg.model,
                                      dtype=cfg.dtype)
  except ValueError as e:
    raise ValueError(f"--plan_only plans a preset shape: --model: {e}") from None
  if any(t < 1 for t in cfg.plan_tp) or not cfg.plan_tp:
    raise ValueError(f"--plan_tp={cfg.plan_tp}: give sizes >= 1")
  device_bytes = int(cfg.device_gb * 1e9)
  if not device_bytes:
    import jax
    device_bytes = (jax.devices()[0].memory_stats() or {}).get("bytes_limit", 0)
    if not device_bytes:
      raise ValueError("--plan_only: this device reports no memory limit (CPU): give "
                       "--device_gb")
  points = memory.check_grid(context_lengths=cfg.context_lengths, concurrency=cfg.concurrency,
                             shared_prefix_fractions=cfg.shared_prefix_fractions,
                             num_prefixes=cfg.num_prefixes)
  run = cli.open_run(cfg, "memory_plan", ["memory_plan.csv"])
  with run:
    rows = memory.mesh_plan(model_cfg, points, tps=cfg.plan_tp, device_bytes=device_bytes,
                            block_size=cfg.block_size, max_seq_len=cfg.max_seq_len,
                            kv_dtype=cfg.kv_dtype or None)
    path = run.write_csv("memory_plan.csv", rows, memory.PLAN_COLUMNS)
    for r in rows:
      print(f"{r['mesh']:16s} {r['concurrency']:4d} x {r['context_length']:<7d} "
            + ("fits" if r["fits"] else f"skipped: {r['reason']}"))
    run.finish(fits=sum(r["fits"] for r in rows), skipped=sum(not r["fits"] for r in rows))
  print(f"wrote {path} ({len(rows)} rows)")


def run(argv=None):
  """`hq-jax sweep` and `scripts/memory_sweep.py`."""
  cli.run_command(cli.exit_on_error(main), __name__, argv)
