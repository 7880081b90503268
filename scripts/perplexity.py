"""`hq-jax perplexity`: study.commands.perplexity (flags: --help)."""

from hq_jax.study.commands.perplexity import run

if __name__ == "__main__":
  run()
