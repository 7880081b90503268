"""`hq-jax bench e2e`: bench.commands.e2e (flags: --help)."""

from hq_jax.study.commands.bench_e2e import run

if __name__ == "__main__":
  run()
