"""Paged attention on the GPU: our Pallas kernels vs the stock JAX kernel vs the XLA path.

  hq-jax bench kernels --output_dir=runs/kernel_bench
  hq-jax bench kernels --sections=shared --shapes=qwen2.5-7b

Decode (TB/s), chunked prefill (TFLOP/s, beside `attention_mgpu`) and shared-prefix decode
(dedup vs paged); every variant is checked against the float32 reference before it is
timed. Method and logic: hq_jax/bench/kernels.py. Writes kernel_bench.csv,
kernel_bench.md and kernel_bench_shared.csv.
"""

from absl import app, flags

from hq_jax.bench import kernels as kernel_bench
from hq_jax.study import cli, outputs

FLAGS = flags.FLAGS
flags.DEFINE_string("output_dir", "runs/kernel_bench", "Where CSV and Markdown go.")
flags.DEFINE_list("shapes", ["qwen2.5-0.5b", "qwen2.5-7b"],
                  "Model presets (hq_jax.config) whose attention shape is benchmarked.")
flags.DEFINE_list("cases", ["64x4096", "8x32768", "1x131072"], "Decode batch x context.")
flags.DEFINE_integer("block_size", 16, "Tokens per KV block (page).")
flags.DEFINE_integer("reps", 20, "Timed repetitions (median reported).")
flags.DEFINE_integer("seed", 0, "Seed of all random inputs.")
flags.DEFINE_bool("stock", True, "Also time jax.experimental.pallas.ops.gpu.paged_attention.")
flags.DEFINE_bool("xla", True, "Also time the model's XLA attention path.")
flags.DEFINE_list("prefill_tokens", ["32768"], "Causal prefill lengths (empty: skip).")
flags.DEFINE_integer("prefill_check_tokens", 2048, "Prefill length checked vs reference.")
flags.DEFINE_list("sections", list(kernel_bench.SECTIONS),
                  "What to run: decode, prefill, shared (shared-prefix dedup vs paged).")
flags.DEFINE_list("shared_points", ["32768:256:128", "4096:512:64", "2048:512:16",
                                    "0:4096:64"],
                  "Shared-prefix points shared:unique:batch (the targets of issue #5).")
flags.DEFINE_list("shared_sweep", ["1024:512:8", "8192:512:16", "16384:256:32"],
                  "Extra shared-prefix points that place the engine's auto threshold.")
flags.DEFINE_list("shared_configs", ["exact", "q64"],
                  "Dedup tuning configs (names in hq_jax.bench.shared_prefix.CONFIGS); "
                  "the fastest per point is reported.")
flags.DEFINE_bool("overwrite", False, "Replace this script's earlier outputs in --output_dir.")
flags.DEFINE_list("kv_dtypes", list(kernel_bench.KV_DTYPES),
                  "K/V dtypes of our Triton kernels' decode and prefill rows: bfloat16, "
                  "float8_e4m3fn (rows 'ours_fp8': e4m3 and per-token scales)")
flags.DEFINE_integer("shared_check_requests", 16,
                     "Requests per shared point checked against the float32 reference.")


def main(argv):
  del argv
  try:
    cases = [tuple(int(x) for x in c.lower().split("x")) for c in FLAGS.cases]
    prefill = [int(n) for n in FLAGS.prefill_tokens]
  except ValueError:
    raise app.UsageError("--cases take BATCHxCONTEXT and --prefill_tokens integers, got "
                         f"{FLAGS.cases} and {FLAGS.prefill_tokens}")
  try:
    kernel_bench.check_args(shapes=FLAGS.shapes, sections=FLAGS.sections,
                            shared_configs=FLAGS.shared_configs)
    with outputs.Run(FLAGS.output_dir, "kernel_bench", kernel_bench.OUTPUTS,
                     overwrite=FLAGS.overwrite,
                     record={"command": cli.command_line(), **cli.run_metadata()}) as out:
      kernel_bench.run(
          out, shapes=FLAGS.shapes, cases=cases, sections=FLAGS.sections,
          prefill_tokens=prefill, block_size=FLAGS.block_size, reps=FLAGS.reps,
          seed=FLAGS.seed, stock=FLAGS.stock, xla=FLAGS.xla,
          prefill_check_tokens=FLAGS.prefill_check_tokens, shared_points=FLAGS.shared_points,
          shared_sweep=FLAGS.shared_sweep, shared_configs=FLAGS.shared_configs,
          shared_check_requests=FLAGS.shared_check_requests, kv_dtypes=FLAGS.kv_dtypes,
          log=lambda m: print(m, flush=True))
      out.finish()
  except (ValueError, outputs.OutputError) as e:
    raise app.UsageError(str(e))



def run(argv=None):
  """`hq-jax bench kernels` and `scripts/kernel_bench.py`."""
  cli.run_command(cli.exit_on_error(main), __name__, argv)
