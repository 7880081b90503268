"""Perplexity of real text, dense vs HQ, with the logit difference between them.

Three runs over the same `token_ids`:
  dense          one request, full chunked prefill on the dense cache;
  hq             the same on the HQ cache ("full_prefill" difference);
  prefix reuse   on a fresh HQ cache, a request holding the first half (chunk-aligned)
                 is prefilled first, then the full text: its first chunks are skipped
                 and the rest attend to the cached K/V ("prefix_reuse" difference,
                 over the positions it computed).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from hq_jax.config import ModelConfig
from hq_jax.engine import Engine
from hq_jax.kv.dedup import DedupKVCache
from hq_jax.kv.dense import DenseKVCache
from hq_jax.kv.paged import KVLayout


def token_nll(logits: jax.Array, token_ids) -> np.ndarray:
  """NLL of token i+1 given tokens <= i, for each i: [len(token_ids) - 1] float64."""
  ids = jnp.asarray(token_ids, jnp.int32)
  logp = jax.nn.log_softmax(logits[:-1].astype(jnp.float32), axis=-1)
  return np.asarray(-jnp.take_along_axis(logp, ids[1:, None], axis=-1)[:, 0], np.float64)


def ppl(nll: np.ndarray) -> float:
  return float(np.exp(np.mean(nll)))


def _max_abs_diff(a, b) -> float:
  return float(jnp.max(jnp.abs(a - b)))


def run(params, cfg: ModelConfig, token_ids, *, chunk_size: int = 64,
        block_size: int = 16) -> dict:
  ids = np.asarray(token_ids, np.int32)
  n = ids.size
  if n < 2:
    raise ValueError(f"perplexity needs at least 2 tokens, got {n}")
  layout = KVLayout.from_config(cfg, block_size)
  engine = Engine(params, cfg, chunk_size=chunk_size)

  dense = DenseKVCache.for_requests(layout, max_requests=1, max_seq_len=n)
  _, d = engine.prefill(dense, ids)
  hq = DedupKVCache.init(layout, num_blocks=layout.blocks_for(n), max_requests=1,
                         max_seq_len=n)
  _, h = engine.prefill(hq, ids)

  prefix = (n // 2) // chunk_size * chunk_size
  reuse = DedupKVCache.init(layout, num_blocks=2 * layout.blocks_for(n), max_requests=2,
                            max_seq_len=n)
  if prefix:
    reuse, _ = engine.prefill(reuse, ids[:prefix], logits="last")
  _, r = engine.prefill(reuse, ids)

  dense_nll, hq_nll = token_nll(d.logits, ids), token_nll(h.logits, ids)
  return {
      "num_tokens": int(n),
      "chunk_size": chunk_size,
      "block_size": block_size,
      "dense": {"ppl": ppl(dense_nll), "nll": dense_nll.tolist()},
      "hq": {"ppl": ppl(hq_nll), "nll": hq_nll.tolist()},
      "max_abs_logit_diff": {
          "full_prefill": _max_abs_diff(d.logits, h.logits),
          "prefix_reuse": _max_abs_diff(d.logits[r.first_position:], r.logits),
      },
      "prefix_reuse": {"prefix_tokens": prefix, "cached_tokens": r.cached_tokens,
                       "computed_tokens": r.computed_tokens},
  }
