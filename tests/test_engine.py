"""The engine on `tiny`: dense and HQ logits are bit-identical, and reuse really skips work."""

import jax.numpy as jnp
import numpy as np
import pytest

from hq_jax.engine import Engine
from hq_jax.kv.dedup import DedupKVCache
from hq_jax.kv.dense import DenseKVCache


def _caches(layout, n=4, max_seq=192):
  return (DenseKVCache.for_requests(layout, max_requests=n, max_seq_len=max_seq),
          DedupKVCache.init(layout, num_blocks=n * max_seq // 16, max_requests=n,
                            max_seq_len=max_seq))


def _diff(a, b):
  return float(jnp.max(jnp.abs(a - b)))


@pytest.mark.parametrize("chunk", [16, 32, 64])
def test_dense_and_hq_bit_identical(tiny, tiny_layout, chunk):
  params, cfg = tiny
  engine = Engine(params, cfg, chunk_size=chunk)
  rng = np.random.default_rng(chunk)
  prefix = rng.integers(0, cfg.vocab_size, 80)
  reqs = [np.concatenate([prefix, rng.integers(0, cfg.vocab_size, n)]) for n in (37, 50, 3)]

  # (a) full prefill of one request.
  dense, hq = _caches(tiny_layout)
  dense, d = engine.prefill(dense, reqs[0])
  hq, h = engine.prefill(hq, reqs[0])
  assert h.cached_tokens == 0 and _diff(d.logits, h.logits) == 0.0

  # (b) a second request sharing the prefix, cached chunks skipped, vs dense from scratch.
  hq, h2 = engine.prefill(hq, reqs[1])
  _, d2 = engine.prefill(_caches(tiny_layout)[0], reqs[1])
  assert h2.cached_tokens == 80 // chunk * chunk > 0
  assert h2.computed_tokens == len(reqs[1]) - h2.cached_tokens
  assert _diff(d2.logits[h2.first_position:], h2.logits) == 0.0

  # (c) several concurrent requests sharing the prefix, then batched decode steps.
  dense, d2 = engine.prefill(dense, reqs[1])
  dense, d3 = engine.prefill(dense, reqs[2])
  hq, h3 = engine.prefill(hq, reqs[2])
  assert _diff(d3.logits[h3.first_position:], h3.logits) == 0.0
  slots = [d.slot, d2.slot, d3.slot]
  assert slots == [h.slot, h2.slot, h3.slot]
  tokens = [1, 2, 3]
  for _ in range(20):  # Crosses block boundaries: new private blocks on the HQ side.
    dense, dl = engine.decode(dense, slots, tokens)
    hq, hl = engine.decode(hq, slots, tokens)
    assert _diff(dl, hl) == 0.0
    tokens = [int(t) for t in jnp.argmax(hl, axis=-1)]


def test_reuse_changes_nothing_but_the_work(tiny, tiny_layout):
  """The same prompt twice on HQ: second prefill computes only its last chunk."""
  params, cfg = tiny
  engine = Engine(params, cfg, chunk_size=32)
  prompt = np.arange(100) % cfg.vocab_size
  hq = _caches(tiny_layout)[1]
  hq, first = engine.prefill(hq, prompt)
  hq, second = engine.prefill(hq, prompt)
  assert (second.hit_tokens, second.cached_tokens, second.computed_tokens) == (96, 96, 4)
  assert _diff(first.last_logits, second.last_logits) == 0.0


def test_generate_is_deterministic_and_matches_prefill(tiny, tiny_layout):
  params, cfg = tiny
  engine = Engine(params, cfg, chunk_size=16)
  prompt = list(range(1, 21))
  _, _, a = engine.generate(_caches(tiny_layout)[0], prompt, steps=6)
  _, _, b = engine.generate(_caches(tiny_layout)[1], prompt, steps=6)
  assert a == b and len(a) == 6
  # Re-prefilling prompt + generated tokens predicts the same continuation.
  _, res = engine.prefill(_caches(tiny_layout)[0], prompt + a[:-1])
  assert [int(t) for t in jnp.argmax(res.logits[len(prompt) - 1:], -1)] == a


def test_engine_rejects_bad_settings(tiny, tiny_layout):
  params, cfg = tiny
  with pytest.raises(ValueError, match="attention must be one of"):
    Engine(params, cfg, attention="flash")
  with pytest.raises(ValueError, match="not a multiple of the cache's block_size"):
    Engine(params, cfg, chunk_size=24).prefill(_caches(tiny_layout)[0], [1, 2])
