"""The exactness contract (docs/architecture.md): a request's logits are a function of its
tokens and the model alone, whichever of its blocks were cached, wherever its chunks start,
whatever shares its decode step. Exact equality throughout: max |delta| is 0, no tolerance.

Runs on the CPU with the XLA attention and the Triton kernels in the Pallas interpreter;
compiled on a GPU the same bodies check the kernels themselves.
"""

import jax
import numpy as np
import pytest

from hq_jax.engine import Engine
from hq_jax.kv.dedup import DedupKVCache
from hq_jax.kv.dense import DenseKVCache
from hq_jax.kv.paged import KVLayout

# Small blocks: many distinct block-aligned hit lengths (and chunk starts) in a short prompt.
BLOCK = 4
MAX_SEQ = 160


def _layout(cfg):
  return KVLayout.from_config(cfg, block_size=BLOCK)


def _hq(cfg, max_requests=2):
  return DedupKVCache.init(_layout(cfg), num_blocks=max_requests * MAX_SEQ // BLOCK,
                           max_requests=max_requests, max_seq_len=MAX_SEQ)


def _dense(cfg, max_requests=1):
  return DenseKVCache.for_requests(_layout(cfg), max_requests=max_requests,
                                   max_seq_len=MAX_SEQ)


def _max_delta(a, b) -> float:
  a, b = np.asarray(a), np.asarray(b)
  assert a.shape == b.shape
  return float(np.max(np.abs(a - b))) if a.size else 0.0


@pytest.mark.parametrize("attention,chunk,num_prompts", [
    ("reference", 16, 2), ("reference", 24, 1), ("pallas_interpret", 16, 1)])
def test_warm_prefill_equals_cold_and_dense(tiny, attention, chunk, num_prompts):
  """For random prompts and >= 20 random block-aligned cached lengths each: a warm HQ
  prefill (after a cold one of a prompt sharing that many tokens) gives exactly the logits
  of a cold HQ prefill and of a dense one, and it really skipped the cached blocks. One
  prompt is a whole number of blocks, so that the fully cached case (only the last block
  recomputed) is among the lengths."""
  params, cfg = tiny
  engine = Engine(params, cfg, chunk_size=chunk, attention=attention)
  rng = np.random.default_rng(chunk + num_prompts)
  for i in range(num_prompts):
    n = 120 if i == 0 else int(rng.integers(100, MAX_SEQ))
    prompt = rng.integers(0, cfg.vocab_size, n)
    _, dense = engine.prefill(_dense(cfg), prompt)
    _, cold = engine.prefill(_hq(cfg), prompt)
    assert cold.hit_tokens == 0 and cold.computed_tokens == n
    assert _max_delta(cold.logits, dense.logits) == 0.0
    blocks = n // BLOCK
    lengths = rng.choice(np.arange(1, blocks + 1), size=20, replace=False) * BLOCK
    if n % BLOCK == 0:
      lengths[0] = n  # the whole prompt cached
    for hit in lengths:
      hq, _ = engine.prefill(_hq(cfg), prompt[:hit])  # caches `hit` tokens' full blocks
      hq, warm = engine.prefill(hq, prompt)
      skip = min(hit, (n - 1) // BLOCK * BLOCK)  # the last token is always computed
      assert (warm.hit_tokens, warm.cached_tokens, warm.computed_tokens) == (
          hit, skip, n - skip), (n, hit)
      assert warm.first_position == skip and 0 < warm.computed_tokens < n
      assert _max_delta(warm.logits, dense.logits[skip:]) == 0.0, (n, hit)
      assert _max_delta(warm.last_logits, cold.last_logits) == 0.0, (n, hit)
