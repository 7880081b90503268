"""`hq-jax replay`: study.commands.replay (flags: --help)."""

from hq_jax.study.commands.replay import run

if __name__ == "__main__":
  run()
