"""The exactness contract (docs/architecture.md): a request's logits are a function of its
tokens and the model alone, whichever of its blocks were cached, wherever its chunks start,
whatever shares its decode step. Exact equality throughout: max |delta| is 0, no tolerance.

Runs on the CPU with the XLA attention and the Triton kernels in the Pallas interpreter; on
a GPU with XLA and the compiled kernels: Triton, and the Mosaic GPU prefill and decode on a
bf16 model of head_dim 64 with 16-token blocks (the shapes they take; Hopper only).
"""

import dataclasses

import jax
import numpy as np
import pytest

from hq_jax import model as model_lib

from hq_jax.serve.engine import Engine
from hq_jax.kv.dedup import DedupKVCache
from hq_jax.kv.dense import DenseKVCache
from hq_jax.kv.paged import KVLayout

GPU = jax.default_backend() == "gpu"
HOPPER = GPU and getattr(jax.devices()[0], "compute_capability", None) == "9.0"
# Small blocks: many distinct block-aligned hit lengths (and chunk starts) in a short prompt.
BLOCK = 4
MAX_SEQ = 160
# (attention, model variant): what this machine runs. "mosaic_shape" is tiny in bf16 with
# head_dim 64 and 16-token blocks, where "pallas" prefills on the Mosaic GPU kernel.
BACKENDS = ([("reference", "tiny"), ("triton", "tiny")]
            + ([("pallas", "mosaic_shape"), ("mosaic", "mosaic_shape")] if HOPPER else [])
            if GPU else [("reference", "tiny"), ("pallas_interpret", "tiny")])


@pytest.fixture(scope="module")
def models(tiny):
  params, cfg = tiny
  out = {"tiny": (params, cfg, BLOCK, MAX_SEQ)}
  if HOPPER:
    wide = dataclasses.replace(cfg, dtype="bfloat16", head_dim=64)
    out["mosaic_shape"] = (model_lib.init_params(wide, jax.random.key(1), scale=0.1), wide,
                           16, 4 * MAX_SEQ)
  return out


@dataclasses.dataclass(frozen=True)
class _Caches:
  cfg: object
  block: int
  max_seq: int

  def layout(self):
    return KVLayout.from_config(self.cfg, block_size=self.block)

  def hq(self, max_requests=2):
    return DedupKVCache.init(self.layout(), num_blocks=max_requests * self.max_seq // self.block,
                             max_requests=max_requests, max_seq_len=self.max_seq)

  def dense(self, max_requests=1):
    return DenseKVCache.for_requests(self.layout(), max_requests=max_requests,
                                     max_seq_len=self.max_seq)


def _max_delta(a, b) -> float:
  a, b = np.asarray(a), np.asarray(b)
  assert a.shape == b.shape
  return float(np.max(np.abs(a - b))) if a.size else 0.0


# (attention, model, chunk_size, prompts): two prompts and a chunk of 24 on XLA.
_PREFILL_CASES = ([("reference", "tiny", 16, 2), ("reference", "tiny", 24, 1)]
                  + [(a, m, 16 if m == "tiny" else 64, 1) for a, m in BACKENDS[1:]])


@pytest.mark.parametrize("attention,model,chunk,num_prompts", _PREFILL_CASES)
def test_warm_prefill_equals_cold_and_dense(models, attention, model, chunk, num_prompts):
  """For random prompts and >= 20 random block-aligned cached lengths each: a warm HQ
  prefill (after a cold one of a prompt sharing that many tokens) gives exactly the logits
  of a cold HQ prefill and of a dense one, and it really skipped the cached blocks. One
  prompt is a whole number of blocks, so that the fully cached case (only the last block
  recomputed) is among the lengths."""
  params, cfg, block, max_seq = models[model]
  caches = _Caches(cfg, block, max_seq)
  # No donation: the same engine on every cache (donating changes no bit:
  # test_engine.test_donating_engine_equals_copying_engine).
  engine = Engine(params, cfg, chunk_size=chunk, attention=attention, donate=False)
  rng = np.random.default_rng(chunk + num_prompts)
  for i in range(num_prompts):
    n = 22 * block if i == 0 else int(rng.integers(25 * block, max_seq))
    prompt = rng.integers(0, cfg.vocab_size, n)
    _, dense = engine.prefill(caches.dense(), prompt)
    _, cold = engine.prefill(caches.hq(), prompt)
    _, cold_last = engine.prefill(caches.hq(), prompt, logits="last")  # what serving runs
    assert cold.hit_tokens == 0 and cold.computed_tokens == n
    assert _max_delta(cold.logits, dense.logits) == 0.0
    blocks = n // block
    lengths = rng.choice(np.arange(1, blocks + 1), size=20, replace=False) * block
    if n % block == 0:
      lengths[0] = n  # the whole prompt cached
    for j, hit in enumerate(lengths):
      hq, _ = engine.prefill(caches.hq(), prompt[:hit])  # caches `hit` tokens' full blocks
      hq, warm = engine.prefill(hq, prompt)
      skip = min(hit, (n - 1) // block * block)  # the last token is always computed
      assert (warm.hit_tokens, warm.cached_tokens, warm.computed_tokens) == (
          hit, skip, n - skip), (n, hit)
      assert warm.first_position == skip and 0 < warm.computed_tokens < n
      assert _max_delta(warm.logits, dense.logits[skip:]) == 0.0, (n, hit)
      assert _max_delta(warm.last_logits, cold.last_logits) == 0.0, (n, hit)
      if j < 3:  # the one-row projection (logits="last") is invariant on its own too
        hq, _ = engine.prefill(caches.hq(), prompt[:hit])
        _, warm_last = engine.prefill(hq, prompt, logits="last")
        assert _max_delta(warm_last.last_logits, cold_last.last_logits) == 0.0, (n, hit)


def _prefilled(engine, caches, prompts, order):
  """A dense cache holding `prompts`, admitted in `order` (so each lands in another slot);
  returns (cache, slot of each prompt)."""
  cache, slots = caches.dense(max_requests=len(prompts)), [None] * len(prompts)
  for i in order:
    cache, res = engine.prefill(cache, prompts[i], logits="last")
    slots[i] = res.slot
  return cache, slots


_DECODE_CASES = ([(a, m, 64, (1, 3, 8, 64)) for a, m in BACKENDS] if GPU else
                 [("reference", "tiny", 64, (1, 3, 8, 64)), ("pallas_interpret", "tiny", 4,
                                                             (1, 6))])
_DECODE_CASES += [("reference", "tiny", 8, (1, 5, 20))]


@pytest.mark.parametrize("attention,model,decode_rows,sizes", _DECODE_CASES)
def test_decode_logits_do_not_depend_on_the_batch(models, attention, model, decode_rows,
                                                  sizes):
  """A request's decode logits (two steps) are the same bits alone and in batches of every
  size, at other slots and other places in the batch, and when a batch larger than
  decode_rows runs in several steps. (With decode_rows=0, the bucketed opt-out, this fails:
  a batch of 8 changes request 0's bits.)"""
  params, cfg, block, max_seq = models[model]
  caches = _Caches(cfg, block, max_seq)
  # No donation: every batch starts from the same prefilled cache.
  engine = Engine(params, cfg, chunk_size=16, attention=attention, decode_rows=decode_rows,
                  donate=False)
  rng = np.random.default_rng(decode_rows)
  num = max(sizes)
  prompts = [rng.integers(0, cfg.vocab_size, int(rng.integers(3, 40))) for _ in range(num)]
  tokens = rng.integers(0, cfg.vocab_size, (2, num))
  # Two admission orders: a request sits at another slot in every other batch.
  prefilled = [_prefilled(engine, caches, prompts, rng.permutation(num)) for _ in range(2)]
  want = {}  # request -> its logits of both steps
  for k, size in enumerate(sizes):
    cache, slots = prefilled[k % 2]
    cache = cache.copy()  # decoding consumes the cache: keep the prefilled one for later batches
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


# Dedup decode: the backends whose decode kernel has a shared-read variant (Triton). (Under
# "reference" and "mosaic" a step with a plan runs the paged decode: nothing to compare.)
_DEDUP_BACKENDS = ["triton", "pallas"] if GPU else ["pallas_interpret"]


@pytest.mark.parametrize("attention", _DEDUP_BACKENDS)
@pytest.mark.parametrize("heads", [4, 14])
def test_dedup_decode_equals_paged(tiny, attention, heads):
  """decode_attention="dedup" gives paged decode's logits, max |delta| exactly 0, and it
  really read shared runs once: an HQ cache (16-token blocks) where three requests share a
  prefix of two whole splits of the engine's paged decode tiles (1024 keys each), two share
  a random prefix of one split and a part of the next (which each computes itself) and one
  shares nothing; fresh random prompts, two decode steps, the batch padded to decode_rows.
  The tiny model (G = 2 query heads per kv head: one tile of 8 requests) and its variant
  with Qwen-0.5B's grouping (14 heads, G = 7: tiles of 2 requests, so a node spans tiles)."""
  from hq_jax.kv import sharing
  from pallas_kernels import dedup_attention as dedup_kernel
  params, cfg = tiny
  if heads != cfg.num_heads:
    cfg = dataclasses.replace(cfg, num_heads=heads)
    params = model_lib.init_params(cfg, jax.random.key(2), scale=0.1)
  block, split = 16, 1024
  rng = np.random.default_rng(26)
  a = rng.integers(0, cfg.vocab_size, 2 * split)
  b = rng.integers(0, cfg.vocab_size, split + block * int(rng.integers(1, 8)) + 5)
  own = lambda: rng.integers(0, cfg.vocab_size, int(rng.integers(1, 40)))
  prompts = [np.r_[a, own()] for _ in range(3)] + [np.r_[b, own()] for _ in range(2)]
  prompts.append(rng.integers(0, cfg.vocab_size, 150))
  layout = KVLayout.from_config(cfg, block_size=block)
  cache = DedupKVCache.init(layout, num_blocks=len(a) // block + 2 * len(b) // block + 64,
                            max_requests=len(prompts), max_seq_len=len(a) + 48)
  prefill = Engine(params, cfg, chunk_size=256, attention=attention, donate=False)
  slots = []
  for p in prompts:
    cache, res = prefill.prefill(cache, p, logits="last")
    slots.append(res.slot)
  tokens = rng.integers(0, cfg.vocab_size, (2, len(prompts)))
  logits = {}
  for mode in ("paged", "dedup"):
    engine = Engine(params, cfg, chunk_size=256, attention=attention, decode_attention=mode,
                    donate=False)
    c, steps = cache.copy(), []
    for step in range(2):
      c, out = engine.decode(c, slots, [int(t) for t in tokens[step]])
      assert out.attention == mode
      steps.append(np.asarray(out.logits))
    logits[mode] = np.stack(steps)
  # The plan the engine ran (its planner's rule): shared splits exist, so dedup computed
  # some splits once for several requests.
  group = cfg.num_heads // cfg.num_kv_heads
  config = dedup_kernel.default_config(cfg.head_dim, group)
  assert config.split.kv_split == split
  plan, summary = sharing.build_plan(np.asarray(c.block_tables)[slots],
                                     np.asarray(c.seq_lens)[slots], block,
                                     requests_per_tile=config.requests_per_tile(group))
  assert summary.saved_tokens > 0 and dedup_kernel.shared_split_count(plan, split) >= 3
  assert _max_delta(logits["dedup"], logits["paged"]) == 0.0
