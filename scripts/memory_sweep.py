"""Memory sweep: dense vs HQ on the same real-text requests over a grid.

  python scripts/memory_sweep.py --model=tiny --context_lengths=256,1024 \
      --concurrency=1,8 --shared_prefix_fractions=0.75 --output_dir=DIR

writes DIR/memory_sweep.csv (one checked row per backend and grid point),
DIR/workloads.csv (system prompt, few-shot, multi-turn) and DIR/run.json. The sweep
stops with an error if a measured kv_bytes_used differs from the analytic prediction.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import tqdm
from absl import app, flags
from ml_collections import config_flags

from configs import memory_sweep as default_config
from hq_jax.harness import cli, memory, workloads

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "..", "configs", "memory_sweep.py"),
    "Config file; its fields can also be set by the plain flags below.")
cli.define_flags(default_config.get_config(), {
    "text_file": cli.REQUEST_TEXT_HELP,
    "context_lengths": "tokens per request (every request has exactly this many)",
    "concurrency": "requests held in the cache at once",
    "shared_prefix_fractions": "fraction of each request that is a shared prefix "
                               "(rounded down to whole blocks)",
    "num_prefixes": "distinct shared prefixes; request i carries prefix i % num_prefixes",
    "max_seq_len": "dense reservation per request; 0 = its context_length",
    "seed": "seed of request offsets in the text and of random weights",
    "workloads": "also run the system-prompt, few-shot and multi-turn workloads",
    "users": "workloads: concurrent users / requests",
    "system_tokens": "workloads: system prompt tokens",
    "user_tokens": "workloads: tokens of each user turn / question",
    "examples": "workloads: few-shot examples",
    "example_tokens": "workloads: tokens per few-shot example",
    "turns": "workloads: turns of the multi-turn conversation",
    "output_dir": "where the CSVs are written (required)",
})
flags.adopt_module_key_flags(cli)


def main(argv):
  del argv
  cfg = cli.resolve(_CONFIG.value)
  if not cfg.output_dir:
    raise app.UsageError("--output_dir is required")
  params, model_cfg, stream = cli.load_model_and_stream(cfg)
  points = (len(cfg.context_lengths) * len(cfg.concurrency) *
            len(cfg.shared_prefix_fractions) * len(cfg.num_prefixes))
  os.makedirs(cfg.output_dir, exist_ok=True)
  path = os.path.join(cfg.output_dir, "memory_sweep.csv")

  def write(rows):  # After every grid point, so an interrupted sweep keeps what it measured.
    with open(path + ".tmp", "w") as f:
      f.write(memory.to_csv(rows))
    os.replace(path + ".tmp", path)

  with tqdm.tqdm(total=points, desc="memory sweep", unit="point") as bar:
    rows = memory.sweep(params, model_cfg, stream, model=cfg.model,
                        context_lengths=cfg.context_lengths, concurrency=cfg.concurrency,
                        shared_prefix_fractions=cfg.shared_prefix_fractions,
                        num_prefixes=cfg.num_prefixes, block_size=cfg.block_size,
                        chunk_size=cfg.chunk_size, max_seq_len=cfg.max_seq_len, seed=cfg.seed,
                        progress=bar, on_rows=write)
  print(f"wrote {path} ({len(rows)} rows, every kv_bytes_used equal to its prediction)")
  if cfg.workloads:
    sizes = {k: cfg[k] for k in ("users", "system_tokens", "user_tokens", "examples",
                                 "example_tokens", "turns")}
    wrows = workloads.run(params, model_cfg, stream, model=cfg.model, sizes=sizes,
                          block_size=cfg.block_size, chunk_size=cfg.chunk_size, seed=cfg.seed)
    wpath = os.path.join(cfg.output_dir, "workloads.csv")
    with open(wpath, "w") as f:
      f.write(memory.to_csv(wrows, workloads.COLUMNS))
    print(f"wrote {wpath}")
  cli.write_json(os.path.join(cfg.output_dir, "run.json"),
                 {"command": cli.command_line(), "config": cfg.to_dict(), **cli.run_metadata()})


if __name__ == "__main__":
  app.run(main)
