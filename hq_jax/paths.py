"""Where downloads, converted weights and corpora are cached (outside the repo)."""

import os


def cache_dir() -> str:
  """`$HQ_JAX_CACHE`, default `~/.cache/hq_jax`."""
  return os.path.abspath(os.path.expanduser(os.environ.get("HQ_JAX_CACHE", "~/.cache/hq_jax")))
