"""hq-jax: dense paged vs deduplicated-block (HQ) KV caches for Qwen2.5 in JAX.

The public surface; everything else is reachable through its module.
"""

from hq_jax.config import ModelConfig, get_config
from hq_jax.serve.engine import Engine
from hq_jax.kv.dedup import DedupKVCache
from hq_jax.kv.dense import DenseKVCache
from hq_jax.kv.paged import KVLayout
from hq_jax.kv.stats import kv_stats


def __getattr__(name):
  # Loaded on first use: `python -m hq_jax.weights` must not find the module imported.
  if name in ("load_model", "load_shipped"):
    from hq_jax import weights
    return getattr(weights, name)
  raise AttributeError(f"module 'hq_jax' has no attribute {name!r}")

__all__ = ["ModelConfig", "get_config", "Engine", "DedupKVCache", "DenseKVCache", "KVLayout",
           "kv_stats", "load_model", "load_shipped"]
