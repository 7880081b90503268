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


def _prefilled(engine, cfg, prompts, order):
  """A dense cache holding `prompts`, admitted in `order` (so each lands in another slot);
  returns (cache, slot of each prompt)."""
  cache, slots = _dense(cfg, max_requests=len(prompts)), [None] * len(prompts)
  for i in order:
    cache, res = engine.prefill(cache, prompts[i], logits="last")
    slots[i] = res.slot
  return cache, slots


@pytest.mark.parametrize("attention,decode_rows,sizes", [
    ("reference", 64, (1, 3, 8, 64)), ("reference", 8, (1, 5, 20)),
    ("pallas_interpret", 8, (1, 3, 8))])
def test_decode_logits_do_not_depend_on_the_batch(tiny, attention, decode_rows, sizes):
  """A request's decode logits (two steps) are the same bits alone and in batches of every
  size, at other slots and other places in the batch, and when a batch larger than
  decode_rows runs in several steps. (With decode_rows=0, the bucketed opt-out, this fails:
  a batch of 8 changes request 0's bits.)"""
  params, cfg = tiny
  # No donation: every batch starts from the same prefilled cache (donating changes no bit:
  # test_engine.test_donating_engine_equals_copying_engine).
  engine = Engine(params, cfg, chunk_size=16, attention=attention, decode_rows=decode_rows,
                  donate=False)
  rng = np.random.default_rng(decode_rows)
  num = max(sizes)
  prompts = [rng.integers(0, cfg.vocab_size, int(rng.integers(3, 40))) for _ in range(num)]
  tokens = rng.integers(0, cfg.vocab_size, (2, num))
  want = {}  # request -> its logits of both steps
  for size in sizes:
    order = rng.permutation(num)
    cache, slots = _prefilled(engine, cfg, prompts, order)
    batch = [int(r) for r in rng.permutation(num)[:size]]  # requests, in batch order
    if 0 not in batch:
      batch[int(rng.integers(size))] = 0  # request 0 is in every batch
    got = {r: [] for r in batch}
    for step in range(2):
      cache, out = engine.decode(cache, [slots[r] for r in batch],
                                 [int(tokens[step, r]) for r in batch])
      assert out.attention == "paged" and out.logits.shape == (size, cfg.vocab_size)
      for j, r in enumerate(batch):
        got[r].append(np.asarray(out.logits[j]))
    for r, logits in got.items():
      if r in want:
        assert _max_delta(logits, want[r]) == 0.0, (size, r)
      want[r] = logits
  assert len(want) > 1
