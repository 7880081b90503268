"""Latency: time to first token with and without prefix reuse, and decode step time.

  hq-jax latency --model=tiny --context_lengths=256 --concurrency=4 --output_dir=DIR

writes DIR/latency.csv: for each grid point and mode (dense, hq_cold, hq_warm), the
median, min and max of `repeats` timed runs after `warmup` untimed ones; and
DIR/latency.run.json (command, config, platform; its run_id is in every CSV row).
"""



import tqdm
from absl import flags
from ml_collections import config_flags

from configs import latency as default_config
from hq_jax.study import cli, latency

_CONFIG = config_flags.DEFINE_config_file(
    "config", cli.config_path("latency.py"),
    "Config file; its fields can also be set by the plain flags below.")
cli.define_flags(default_config.get_config(), {
    "text_file": cli.REQUEST_TEXT_HELP,
    "context_lengths": "tokens per request",
    "concurrency": "requests decoding together",
    "shared_prefix_fractions": "fraction of each request that is a shared prefix",
    "repeats": "timed repetitions per measurement",
    "warmup": "untimed runs first (compilation)",
    "seed": "seed of request offsets and of random weights",
    "output_dir": "where latency.csv is written (required)",
})
flags.adopt_module_key_flags(cli)


def main(argv):
  del argv
  cfg = cli.resolve(_CONFIG.value)
  cli.validate(cfg)  # Every flag, and the output directory, before anything is loaded.
  cli.model_mesh(cfg, what="the latency sweep")  # syntax and devices, before any loading
  run = cli.open_run(cfg, "latency", ["latency.csv"])
  # The model, the text and every request are checked before the run opens.
  params, model_cfg, stream = cli.load_model_and_stream(cfg)
  latency.check_sweep(model_cfg, stream, context_lengths=cfg.context_lengths,
                      concurrency=cfg.concurrency,
                      shared_prefix_fractions=cfg.shared_prefix_fractions,
                      block_size=cfg.block_size, repeats=cfg.repeats, warmup=cfg.warmup,
                      seed=cfg.seed, allow_long_context=cfg.allow_long_context)
  mesh = cli.model_mesh(cfg, model_cfg, "the latency sweep")
  with run:
    points = len(cfg.context_lengths) * len(cfg.concurrency) * len(cfg.shared_prefix_fractions)
    with tqdm.tqdm(total=points, desc="latency", unit="point") as bar:
      rows = latency.sweep(params, model_cfg, stream, model=cfg.model,
                           context_lengths=cfg.context_lengths, concurrency=cfg.concurrency,
                           shared_prefix_fractions=cfg.shared_prefix_fractions,
                           block_size=cfg.block_size, chunk_size=cfg.chunk_size,
                           repeats=cfg.repeats, warmup=cfg.warmup, seed=cfg.seed,
                           attention=cfg.attention, decode_attention=cfg.decode_attention,
                           allow_long_context=cfg.allow_long_context, progress=bar,
                           kv_dtype=cfg.kv_dtype or None, decode_rows=cfg.decode_rows,
                           mesh=mesh)
    path = run.write_csv("latency.csv", rows, latency.COLUMNS)
    run.finish(attention=rows[0]["attention"], decode_attention=cfg.decode_attention)
  for r in rows:
    print(f"{r['mode']:8s} {r['context_length']:6d} tok x{r['concurrency']:<3d} "
          f"TTFT {r['ttft_ms_median']:9.2f} ms [{r['ttft_ms_min']:.2f}, {r['ttft_ms_max']:.2f}]"
          f"  decode step {r['decode_step_ms_median']:8.2f} ms  "
          f"(cached {r['cached_tokens']}, computed {r['computed_tokens']})")
  print(f"wrote {path}")



def run(argv=None):
  """`hq-jax latency` and `scripts/latency.py`."""
  cli.run_command(cli.exit_on_error(main), __name__, argv)
