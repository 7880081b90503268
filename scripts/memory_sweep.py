"""`hq-jax sweep`: study.commands.sweep (flags: --help)."""

from hq_jax.study.commands.sweep import run

if __name__ == "__main__":
  run()
