"""`hq-jax latency`: study.commands.latency (flags: --help)."""

from hq_jax.study.commands.latency import run

if __name__ == "__main__":
  run()
