"""End-to-end speed against the rooflines: decode steps and time to first token.

  hq-jax bench e2e --output_dir=runs/e2e                       # H200 defaults
  hq-jax bench e2e --decode=tiny:4x64 --prefill=tiny:128 --output_dir=DIR

Runs `Engine` on seeded weights at Qwen2.5 shapes and prints each measured time beside its
floor (weights + K/V over the in-run XLA read rate for decode; FLOPs over the in-run bf16
matmul rate for prefill). Logic and method: hq_jax/bench/e2e.py. Writes
e2e_bench.csv, e2e_bench.md and the run record e2e_bench.run.json.
"""

import dataclasses

from absl import app, flags

from hq_jax import mesh as mesh_lib
from hq_jax.serve.engine import ATTENTION, DECODE_ROWS
from hq_jax.bench import e2e as e2e_bench
from hq_jax.study import cli, outputs

FLAGS = flags.FLAGS
flags.DEFINE_string("output_dir", None, "Where e2e_bench.csv and e2e_bench.md go (required).")
flags.DEFINE_list("decode", ["7b:64x4096", "0.5b:8x32768"], "Decode points MODEL:BATCHxCONTEXT.")
flags.DEFINE_list("prefill", ["7b:16384", "0.5b:32768"], "Prefill points MODEL:TOKENS.")
flags.DEFINE_enum("attention", "auto", list(ATTENTION),
                  "Attention backend (auto: the Pallas kernels on a GPU).")
flags.DEFINE_string("dtype", "bfloat16", "Weights dtype (and K/V, unless --kv_dtype).")
flags.DEFINE_string("kv_dtype", "", cli.COMMON_HELPS["kv_dtype"])
flags.DEFINE_integer("steps", 20, "Timed decode steps per point (wall clock, last synced).")
flags.DEFINE_integer("reps", 10, "Repetitions of device-time measurements (median).")
flags.DEFINE_integer("prefill_repeats", 3, "Timed prefills per point after a compile run.")
flags.DEFINE_list("chunk_sizes", ["*:2048"], "Prefill chunk per model, MODEL:TOKENS ('*' = any).")
flags.DEFINE_float("dedup_shared_fraction", 0.9,
                   "Also decode on HQ with this shared fraction, paged and dedup (0: skip).")
flags.DEFINE_list("decode_rows", [str(DECODE_ROWS)],
                  "Rows of every decode step; each decode point runs once per value (0: the "
                  "bucketed opt-out, a batch padded to a power of two, whose bits then depend "
                  "on the batch).")
flags.DEFINE_integer("block_size", 16, "KV block size in tokens.")
flags.DEFINE_string("mesh", "", "Devices: model:M = tensor parallel over M devices (kv heads); "
                    "empty = one device. data:D is refused here (one data shard).")
flags.DEFINE_integer("seed", 0, "Seed of weights, tokens and K/V.")
flags.DEFINE_bool("overwrite", False, "Replace this script's earlier outputs in --output_dir.")


def main(argv):
  del argv
  if not FLAGS.output_dir:
    raise app.UsageError("--output_dir is required")
  try:
    outputs.check_output_dir(FLAGS.output_dir)
  except outputs.OutputError as e:
    raise app.UsageError(str(e))
  try:
    decode = e2e_bench.parse_points(FLAGS.decode, "decode")
    prefill = e2e_bench.parse_points(FLAGS.prefill, "prefill")
    chunks = {k: int(v) for k, v in (c.split(":") for c in FLAGS.chunk_sizes)}
    decode_rows = tuple(int(v) for v in FLAGS.decode_rows)
    mesh = mesh_lib.MeshSpec.parse(FLAGS.mesh)
    if mesh.data != 1:
      raise ValueError(f"--mesh={mesh.label}: the e2e bench times one data shard (data:1); "
                       "data shards are independent copies of it")
    mesh.check()
    for name in dict.fromkeys(m for m, _, _ in decode + prefill):
      mesh.check(e2e_bench.model_config(name, FLAGS.dtype))
  except ValueError as e:
    raise app.UsageError(str(e))
  if FLAGS.steps < 1 or FLAGS.reps < 1 or FLAGS.prefill_repeats < 1:
    raise app.UsageError("--steps, --reps and --prefill_repeats must be >= 1")
  if not decode_rows or min(decode_rows) < 0:
    raise app.UsageError("--decode_rows must be integers >= 0")
  if not 0 <= FLAGS.dedup_shared_fraction < 1:
    raise app.UsageError("--dedup_shared_fraction must be in [0, 1)")
  files = ["e2e_bench.csv", "e2e_bench.md"]
  try:
    with outputs.Run(FLAGS.output_dir, "e2e_bench", files, overwrite=FLAGS.overwrite,
                     record={"command": cli.command_line(), **cli.run_metadata(),
                             "mesh": mesh.label}) as run:
      ceilings, rows = e2e_bench.run(
          decode_points=decode, prefill_points=prefill, attention=FLAGS.attention,
          dtype=FLAGS.dtype, steps=FLAGS.steps, reps=FLAGS.reps,
          prefill_repeats=FLAGS.prefill_repeats, chunk_sizes=chunks,
          dedup_shared_fraction=FLAGS.dedup_shared_fraction, block_size=FLAGS.block_size,
          seed=FLAGS.seed, log=lambda m: print(m, flush=True), kv_dtype=FLAGS.kv_dtype or None,
          decode_rows=decode_rows, mesh=FLAGS.mesh)
      run.write_csv("e2e_bench.csv", rows, e2e_bench.COLUMNS)
      text = e2e_bench.markdown(ceilings, rows)
      run.write_text("e2e_bench.md", text)
      run.finish(ceilings=dataclasses.asdict(ceilings))
  except outputs.OutputError as e:
    raise app.UsageError(str(e))
  print(text)



def run(argv=None):
  """`hq-jax bench e2e` and `scripts/e2e_bench.py`."""
  cli.run_command(cli.exit_on_error(main), __name__, argv)
