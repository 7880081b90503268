"""`hq-jax bench kernels`: bench.commands.kernels (flags: --help)."""

from hq_jax.study.commands.bench_kernels import run

if __name__ == "__main__":
  run()
