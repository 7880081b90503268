"""`hq-jax report`: study.commands.report (flags: --help)."""

from hq_jax.study.commands.report import run

if __name__ == "__main__":
  run()
