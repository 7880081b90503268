"""Dense and HQ caches: accounting against the formula, verified reuse, salts, LRU,
bad input leaving the cache unchanged, orbax round trip of a warm cache."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hq_jax import checkpoint
from hq_jax.serve.engine import Engine
from hq_jax.kv.base import CacheError
from hq_jax.kv.dedup import DedupKVCache
from hq_jax.kv.dense import DenseKVCache
from hq_jax.kv.stats import kv_stats

MAX_SEQ = 256


@pytest.fixture(scope="module")
def engine(tiny):
  params, cfg = tiny
  return Engine(params, cfg, chunk_size=32)


def _requests(c, length, prefix, seed=0, vocab=512):
  rng = np.random.default_rng(seed)
  shared = rng.integers(0, vocab, prefix)
  return [np.concatenate([shared, rng.integers(0, vocab, length - prefix)]) for _ in range(c)]


@pytest.mark.parametrize("c,length,prefix", [(1, 64, 0), (2, 64, 32), (4, 128, 64),
                                             (8, 96, 48), (3, 80, 80), (5, 160, 0)])
def test_memory_equals_formula(engine, tiny_layout, c, length, prefix):
  dense = DenseKVCache.for_requests(tiny_layout, max_requests=c, max_seq_len=MAX_SEQ)
  hq = DedupKVCache.init(tiny_layout, num_blocks=c * MAX_SEQ // 16, max_requests=c,
                         max_seq_len=MAX_SEQ)
  for r in _requests(c, length, prefix):
    dense, _ = engine.prefill(dense, r, logits="last")
    hq, _ = engine.prefill(hq, r, logits="last")
  tok, blk = tiny_layout.bytes_per_token, tiny_layout.bytes_per_block
  d, h = kv_stats(dense), kv_stats(hq)
  assert d.kv_bytes_used == c * length * tok
  assert d.kv_bytes_allocated == c * MAX_SEQ * tok
  assert h.kv_bytes_used == (prefix // 16 + c * (length - prefix) // 16) * blk
  assert h.kv_bytes_allocated == h.kv_bytes_used  # All blocks full: nothing reserved ahead.
  assert d.reuse_factor == 1.0 and d.logical_blocks == h.logical_blocks == c * length // 16
  assert h.physical_blocks == prefix // 16 + c * (length - prefix) // 16
  assert h.hit_tokens == (c - 1) * prefix and h.query_tokens == d.query_tokens == c * length


def test_partial_blocks_are_private_and_counted_by_tokens(engine, tiny_layout):
  hq = DedupKVCache.init(tiny_layout, num_blocks=32, max_requests=2, max_seq_len=MAX_SEQ)
  r = np.arange(40) % 500  # 2 full blocks + 8 tokens
  hq, a = engine.prefill(hq, r)
  hq, b = engine.prefill(hq, r)
  tables = np.asarray(hq.block_tables)
  assert (tables[0, :2] == tables[1, :2]).all() and tables[0, 2] != tables[1, 2]
  assert kv_stats(hq).kv_bytes_used == (32 + 2 * 8) * tiny_layout.bytes_per_token
  # The whole prompt was cached but the last chunk is always computed (its logits).
  assert b.hit_tokens == 32 and b.cached_tokens == 32 and b.computed_tokens == 8
  chex.assert_trees_all_equal(a.last_logits, b.last_logits)


def test_metadata_bytes_per_block_is_constant(tiny_layout):
  per_block = []
  for nb in (16, 32, 64):
    c = DedupKVCache.init(tiny_layout, num_blocks=nb, max_requests=4, max_seq_len=MAX_SEQ)
    per_block.append(kv_stats(c).metadata_bytes)
  assert per_block[1] - per_block[0] == (per_block[2] - per_block[1]) / 2
  # refcount, registered, hash, salt, parent, parent gen, gen, tokens[16], last_used.
  assert (per_block[1] - per_block[0]) / 16 == 4 + 1 + 4 + 4 + 4 + 4 + 4 + 16 * 4 + 4


def test_dense_reserve_tokens(tiny_layout):
  """A dense request may reserve only its own prompt + output (the trace replay's serving
  mode); the default stays max_seq_len, and appending past a reservation is an error."""
  c = DenseKVCache.init(tiny_layout, num_blocks=6, max_requests=4, max_seq_len=MAX_SEQ)
  with pytest.raises(CacheError, match="pool too small"):
    c.admit(np.arange(20))  # max_seq_len's blocks do not fit in 6
  c, a = c.admit(np.arange(20), reserve_tokens=40)  # 3 blocks
  c, b = c.admit(np.arange(5), reserve_tokens=48)  # 3 blocks: the pool is full
  assert kv_stats(c).kv_bytes_allocated == 6 * tiny_layout.bytes_per_block
  assert set(c.block_tables[a][:3]) | set(c.block_tables[b][:3]) == set(range(6))
  with pytest.raises(CacheError, match="pool too small"):
    c.admit([1], reserve_tokens=1)
  for t in range(28):
    c = c.append(a, t)
  with pytest.raises(CacheError, match="reservation of 48 tokens"):
    c.append(a, 0)
  c = c.release(b)
  with pytest.raises(CacheError, match="reserve_tokens=3 must be in"):
    c.admit(np.arange(5), reserve_tokens=3)
  c, s = c.release(a).admit(np.arange(5), reserve_tokens=17)
  assert (c.block_tables[s] >= 0).sum() == 2


def _admit_commit(cache, tokens, salt=0):
  cache, slot = cache.admit(np.asarray(tokens), salt)
  return cache.commit(slot, len(tokens)), slot


def test_hash_collisions_never_reuse_wrong_blocks(tiny_layout):
  """With 0 hash bits every block collides; only verified identity may share."""
  for bits in (0, 32):
    c = DedupKVCache.init(tiny_layout, num_blocks=32, max_requests=4, max_seq_len=MAX_SEQ,
                          hash_bits=bits)
    a, b = np.arange(48), np.arange(48)
    b[20] = 999  # Differs in block 1: block 0 shared, blocks 1 and 2 not.
    c, sa = _admit_commit(c, a)
    c, sb = _admit_commit(c, b)
    c, sc = _admit_commit(c, a)
    t = np.asarray(c.block_tables)
    assert t[sa, 0] == t[sb, 0]
    assert t[sa, 1] != t[sb, 1] and t[sa, 2] != t[sb, 2]  # Block 2 has equal tokens, not parents.
    assert (t[sa, :3] == t[sc, :3]).all()
    assert kv_stats(c).physical_blocks == 5


def _reference_hits(cache, prompt, salt=0) -> int:
  """Hit blocks of `prompt` by brute force over the arrays: at each full block, the one
  registered block with this salt, parent, parent's generation and tokens."""
  bs = cache.block_size
  parent, pgen, n = -1, 0, 0
  for i in range(len(prompt) // bs):
    match = np.flatnonzero(cache.registered & (cache.block_salt == salt)
                           & (cache.block_parent == parent)
                           & (cache.block_parent_gen == pgen)
                           & (cache.block_tokens == prompt[i * bs:(i + 1) * bs]).all(axis=1))
    assert match.size <= 1, "two registered blocks share an identity"
    if not match.size:
      break
    parent, pgen, n = int(match[0]), int(cache.block_gen[match[0]]), n + 1
  return n


def _rebuilt(cache):
  """The cache as orbax or jax.tree_util would rebuild it: arrays only, no derived state."""
  return jax.tree.map(lambda x: x, cache)


@pytest.mark.parametrize("bits", [2, 32])
def test_incremental_and_rebuilt_lookups_find_the_same_blocks(tiny_layout, bits):
  """A long prompt's hit chain through the cache's incremental index and through an index
  rebuilt from the arrays before every operation: the same cache, with hashes that
  collide (2 bits) or not, and the hits a brute-force walk over the arrays finds."""
  rng = np.random.default_rng(bits)
  prefix = rng.integers(0, 50, 40 * 16)  # 40 blocks
  prompts = [np.r_[prefix[:k * 16], rng.integers(0, 50, 24)] for k in (40, 40, 25, 3)]
  results = []
  for rebuild in (False, True):
    c = DedupKVCache.init(tiny_layout, num_blocks=256, max_requests=8, max_seq_len=1024,
                          hash_bits=bits)
    for p in prompts:
      want = _reference_hits(c, p)
      c, slot = (_rebuilt(c) if rebuild else c).admit(p)
      assert int(c.seq_lens[slot]) == want * 16
      c = c.commit(slot, p.size)
    results.append(c)
  a, b = results
  for name in ("block_tables", "refcount", "registered", "block_hash", "block_parent"):
    np.testing.assert_array_equal(np.asarray(getattr(a, name)), np.asarray(getattr(b, name)))
  t = np.asarray(a.block_tables)
  assert (t[1, :40] == t[0, :40]).all() and (t[2, :25] == t[0, :25]).all()
  assert int(np.asarray(a.hit_tokens)) == (40 + 25 + 3) * 16


def test_salt_isolates_tenants(tiny_layout):
  c = DedupKVCache.init(tiny_layout, num_blocks=32, max_requests=4, max_seq_len=MAX_SEQ)
  c, s0 = _admit_commit(c, np.arange(32), salt=7)
  c, s1 = _admit_commit(c, np.arange(32), salt=8)
  c, s2 = _admit_commit(c, np.arange(32), salt=7)
  t = np.asarray(c.block_tables)
  assert not set(t[s0, :2]) & set(t[s1, :2])
  assert (t[s0, :2] == t[s2, :2]).all()


def test_released_blocks_stay_cached_until_lru_eviction(tiny_layout):
  c = DedupKVCache.init(tiny_layout, num_blocks=4, max_requests=2, max_seq_len=64)
  a, b = np.arange(32), np.arange(100, 132)
  c, sa = _admit_commit(c, a)
  c = c.release(sa)
  assert c.cached_blocks == 2 and kv_stats(c).kv_bytes_used == 0
  c, sa = c.admit(a)  # Re-admission finds both blocks.
  assert int(c.seq_lens[sa]) == 32
  c = c.commit(sa, 32).release(sa)
  c, sb = _admit_commit(c, b)  # Uses the 2 never-used blocks: nothing evicted.
  assert c.cached_blocks == 2
  c = c.release(sb)
  c, sc = _admit_commit(c, np.arange(200, 248))  # Needs 3: evicts LRU (a's tail first).
  assert c.cached_blocks == 1
  c = c.release(sc)
  c2, s = c.copy().admit(b)
  assert int(c2.seq_lens[s]) == 16  # b's first block survived, its tail did not.
  c3 = c.evict()
  assert c3.cached_blocks == 0
  c4, s = c3.admit(b)
  assert int(c4.seq_lens[s]) == 0


def _snapshot(cache):
  return jax.tree.map(np.array, cache)


@pytest.mark.parametrize("backend", ["dense", "hq"])
def test_bad_input_is_a_clear_error_and_leaves_the_cache_unchanged(engine, tiny_layout,
                                                                   backend):
  if backend == "dense":
    c = DenseKVCache.init(tiny_layout, num_blocks=6, max_requests=2, max_seq_len=64)
  else:
    c = DedupKVCache.init(tiny_layout, num_blocks=6, max_requests=2, max_seq_len=64)
  c, _ = engine.prefill(c, np.arange(40))
  before = _snapshot(c)
  cases = [
      (lambda: engine.prefill(c, [1, 2, 512]), "outside the vocabulary"),
      (lambda: engine.prefill(c, [-1, 2]), "outside the vocabulary"),
      (lambda: engine.prefill(c, []), "empty request"),
      (lambda: engine.prefill(c, np.arange(65)), "longer than max_seq_len"),
      (lambda: engine.prefill(c, np.ones((2, 3), np.int32)), "1-D"),
      (lambda: engine.prefill(c, np.array([1.5, 2.0])), "integers"),
      (lambda: engine.prefill(c, np.arange(64) + 100), "pool too small"),
      (lambda: engine.decode(c, [1], [3]), "not an active request"),
      (lambda: engine.decode(c, [0, 0], [3, 4]), "slot twice"),
      (lambda: engine.decode(c, [0], [3, 4]), "one token per slot"),
      (lambda: c.release(5), "not an active request"),
      (lambda: c.release(True), "slot must be an int"),
      (lambda: c.release(0.0), "slot must be an int"),
      (lambda: c.commit("0", 40), "slot must be an int"),
      (lambda: c.append(None, 1), "slot must be an int"),
      (lambda: c.commit(0, 41), "outside"),
  ]
  for salt in ("tenant", 1.5, None, True):  # the same salt rule for both backends
    cases.append((lambda salt=salt: c.admit([1, 2], salt=salt), "salt must be an int"))
  cases.append((lambda: c.admit([1, 2], salt=2**40), "does not fit in int32"))
  for fn, message in cases:
    with pytest.raises(CacheError, match=message):
      fn()
    chex.assert_trees_all_equal(_snapshot(c), before)


def test_no_free_slot(tiny_layout):
  c = DedupKVCache.init(tiny_layout, num_blocks=8, max_requests=1, max_seq_len=64)
  c, _ = c.admit([1, 2, 3])
  with pytest.raises(CacheError, match="no free request slot"):
    c.admit([4])


def test_warm_cache_survives_orbax_round_trip(engine, tiny_layout, tmp_path):
  def fresh():
    return DedupKVCache.init(tiny_layout, num_blocks=24, max_requests=3, max_seq_len=128)
  c = fresh()
  reqs = _requests(3, 80, 48, seed=1)
  c, r0 = engine.prefill(c, reqs[0])
  c, r1 = engine.prefill(c, reqs[1])
  c = c.release(r0.slot)  # Leaves cached, refcount-0 blocks in the LRU.
  checkpoint.save(str(tmp_path / "cache"), c)
  restored = checkpoint.restore(str(tmp_path / "cache"), fresh())
  chex.assert_trees_all_equal(restored, c)
  outs = []
  for cache in (c, restored):
    cache, res = engine.prefill(cache, reqs[2])
    cache, step = engine.decode(cache, [r1.slot, res.slot], [5, 6])
    outs.append((cache, res.cached_tokens, res.logits, step.logits))
  assert outs[0][1] == outs[1][1] == 48  # The 48 shared tokens: three whole blocks.
  chex.assert_trees_all_equal(outs[0], outs[1])


@pytest.mark.parametrize("backend", ["dense", "hq"])
def test_batched_decode_bookkeeping_equals_one_slot_at_a_time(tiny_layout, backend):
  if backend == "dense":
    c = DenseKVCache.init(tiny_layout, num_blocks=12, max_requests=3, max_seq_len=64)
  else:
    c = DedupKVCache.init(tiny_layout, num_blocks=12, max_requests=3, max_seq_len=64)
  for n in (16, 31, 17):  # Next tokens: a new block, fill a block, mid-block.
    c, s = c.admit(np.arange(n) % 7)
    c = c.commit(s, n)
  slots, tokens = [2, 0, 1], [5, 6, 7]
  one_by_one = c.copy()
  for s, t in zip(slots, tokens):
    one_by_one = one_by_one.append(s, t)
  batched = c.copy().append_batch(slots, tokens)
  chex.assert_trees_all_equal(_snapshot(batched), _snapshot(one_by_one))
  lens = [int(batched.req_lens[s]) for s in slots]
  seq = one_by_one
  for s, n in zip(slots, lens):
    seq = seq.commit(s, n)
  chex.assert_trees_all_equal(_snapshot(batched.commit_batch(slots, lens)), _snapshot(seq))
  if backend == "hq":
    assert int(seq.registered.sum()) > int(c.registered.sum())  # Slot 1's block filled.
  with pytest.raises(CacheError, match="appears twice"):
    c.append_batch([0, 0], [1, 2])


def test_a_step_where_several_slots_need_blocks_equals_one_slot_at_a_time(tiny_layout):
  """append_batch allocates a step's new blocks at once: the same blocks, in slot order, as
  one allocation per slot, also when the free blocks run out mid-step and cached ones are
  evicted in LRU order."""
  c = DedupKVCache.init(tiny_layout, num_blocks=9, max_requests=4, max_seq_len=64)
  for seed in (1, 2):  # two released chains of 2 blocks: cached, evictable (LRU)
    c, s = c.admit(np.random.default_rng(seed).integers(0, 50, 32))
    c = c.commit(s, 32).release(s)
  for n in (16, 32, 16):  # 1 + 2 + 1 blocks: 1 of 9 blocks free, 4 cached
    c, s = c.admit(np.random.default_rng(n + s).integers(0, 50, n))
    c = c.commit(s, n)
  assert int(np.sum(~c.registered & (c.refcount == 0))) == 1 and c.cached_blocks == 4
  slots, tokens = [2, 0, 1], [5, 6, 7]  # every slot at a block boundary: 3 new blocks
  one_by_one = c.copy()
  for s, t in zip(slots, tokens):
    one_by_one = one_by_one.append(s, t)
  batched = c.append_batch(slots, tokens)
  chex.assert_trees_all_equal(_snapshot(batched), _snapshot(one_by_one))
  assert batched.cached_blocks == 2  # two cached blocks were evicted


def test_derived_state_equals_a_rebuild_over_a_decode_run(tiny_layout):
  """append_batch / commit_batch on the cache's incremental derived state (free list, LRU
  queue, index, counters) give the same cache as the same steps on caches whose state is
  rebuilt from the arrays before every step, over a decode run that allocates, fills,
  registers and evicts blocks; a step the pool cannot take is refused before anything
  changes."""
  def build():
    c = DedupKVCache.init(tiny_layout, num_blocks=14, max_requests=4, max_seq_len=96)
    for n, shift in ((20, 0), (33, 0), (17, 1)):  # two share a first block
      c, s = c.admit((np.arange(n) + shift) % 7)
      c = c.commit(s, n)
    c, s = c.admit(np.arange(40) % 5)
    c = c.commit(s, 40).release(s)  # cached, refcount-0 blocks: evicted when needed
    return c
  rebuilt, incremental = build(), build()
  slots = [0, 1, 2]
  for step in range(30):
    toks = [step % 7, (step + 1) % 7, (step + 2) % 7]
    rebuilt = _rebuilt(rebuilt).append_batch(slots, toks)
    incremental = incremental.append_batch(slots, toks)
    lens = [int(rebuilt.req_lens[s]) for s in slots]
    rebuilt = _rebuilt(rebuilt).commit_batch(slots, lens)
    incremental = incremental.commit_batch(slots, lens)
    chex.assert_trees_all_equal(_snapshot(incremental), _snapshot(rebuilt))
    assert (incremental.held_blocks, incremental.cached_blocks) == (
        _rebuilt(rebuilt).held_blocks, _rebuilt(rebuilt).cached_blocks)
  assert int(rebuilt.block_gen.max()) > 1  # blocks were evicted and reused on the way
  full = incremental
  while int(np.sum(np.asarray(full.refcount) == 0)) >= 3:
    lens = [int(full.req_lens[s]) + 1 for s in slots]
    full = full.append_batch(slots, [1, 1, 1]).commit_batch(slots, lens)
  # Append until some slot needs a block the pool no longer has: refused, nothing changed.
  before = _snapshot(full)
  with pytest.raises(CacheError, match="pool too small|is full"):
    for _ in range(16):
      full = full.append_batch(slots, [2, 2, 2])
      full = full.commit_batch(slots, [int(full.req_lens[s]) for s in slots])
      before = _snapshot(full)
  chex.assert_trees_all_equal(_snapshot(full), before)
  full.append_batch([0], [3])  # still valid: a step that fits goes on


def test_admission_on_derived_state_equals_a_rebuild_and_refuses_before_any_change(
    tiny_layout):
  """admit on the incremental derived state gives the same cache as admit on a cache
  rebuilt from its arrays, over prompts that hit an active chain, a released one, nothing,
  and that must evict; a prompt the pool cannot take (after its hits are counted as held),
  a bad salt and a full slot table are refused with the cache unchanged and still valid."""
  rng = np.random.default_rng(3)
  base = rng.integers(0, 50, 6 * 16)
  prompts = [np.r_[base, [1, 2, 3]], base[:4 * 16], rng.integers(0, 50, 40),
             np.r_[base[:5 * 16], rng.integers(0, 50, 30)], rng.integers(0, 50, 70)]
  caches = []
  for rebuild in (False, True):
    c = DedupKVCache.init(tiny_layout, num_blocks=24, max_requests=4, max_seq_len=512)
    for i, p in enumerate(prompts):
      c, slot = (_rebuilt(c) if rebuild else c).admit(p)
      c = c.commit(slot, p.size)
      if i in (1, 2):
        c = c.release(slot)  # cached, refcount-0 blocks: hit or evicted later
      caches.append(_snapshot(c))
  n = len(prompts)
  for rebuilt, incremental in zip(caches[n:], caches[:n]):
    chex.assert_trees_all_equal(incremental, rebuilt)
  assert int(c.hit_tokens) > 0 and int(c.block_gen.max()) > 1  # hits, and evictions
  before = _snapshot(c)
  free = int(np.sum(np.asarray(c.refcount) == 0))
  # Hits its 6 cached blocks (held by request 0), then needs free + 1 more: too many.
  too_big = np.r_[base, rng.integers(0, 50, (free + 1) * 16)]
  for fn, message in [(lambda: c.admit(too_big), "pool too small"),
                      (lambda: c.admit(base, salt="x"), "salt must be an int")]:
    with pytest.raises(CacheError, match=message):
      fn()
    chex.assert_trees_all_equal(_snapshot(c), before)
  # keep_free: blocks that must stay allocatable after admission (a server's running
  # requests will need them). A 2-block prompt hitting nothing fits with free - 2 kept free,
  # not with one more.
  fresh = rng.integers(50, 99, 32)
  for fn, message in [(lambda: c.admit(fresh, keep_free=free - 1),
                       f"needs 2 new blocks and {free - 1} kept free but only {free} "),
                      (lambda: c.admit(fresh, keep_free=-1), "keep_free")]:
    with pytest.raises(CacheError, match=message):
      fn()
    chex.assert_trees_all_equal(_snapshot(c), before)
  kept, s = c.copy().admit(fresh, keep_free=free - 2)
  assert int(np.sum(np.asarray(kept.refcount) == 0)) == free - 2
  # release on the derived state equals release on a rebuilt cache.
  chex.assert_trees_all_equal(_snapshot(kept.release(s)),
                              _snapshot(_rebuilt(c.copy().admit(fresh)[0]).release(s)))
  c, _ = c.admit(base[:16])  # the fourth slot
  before = _snapshot(c)
  with pytest.raises(CacheError, match="no free request slot"):
    c.admit(base)
  chex.assert_trees_all_equal(_snapshot(c), before)


@pytest.mark.parametrize("bits", [0, 32])
def test_lookup_finds_what_a_brute_force_walk_finds(tiny_layout, bits):
  """Admission's lookup (a hash map, single candidates verified in one vectorized pass at
  the end) against a brute-force walk over the arrays: prompts that share all, part or
  none of an active or released request's chain, a chain that diverges mid-way, and
  (0 bits) hashes that all collide."""
  rng = np.random.default_rng(bits)
  base = rng.integers(0, 50, 30 * 16)
  other = base.copy()
  other[12 * 16 + 3] = 99  # diverges in block 12
  prompts = [np.r_[base, rng.integers(0, 50, 7)], base[:20 * 16], np.r_[other, 1, 2],
             np.r_[base[:25 * 16], rng.integers(0, 50, 40)], np.r_[base[:16], [77] * 16],
             base[:5]]
  c = DedupKVCache.init(tiny_layout, num_blocks=256, max_requests=8, max_seq_len=1024,
                        hash_bits=bits)
  hits = []
  for i, p in enumerate(prompts):
    want = _reference_hits(c, p)
    c, slot = c.admit(p)
    assert int(c.seq_lens[slot]) == want * 16
    c = c.commit(slot, p.size)
    hits.append(want)
    assert (c.block_tables[slot, :want] == c.block_tables[0, :want]).all()
    if i == 1:
      c = c.release(slot)  # its chain stays cached, but no table holds it
  for slot in range(8):  # every request leaves: the chains stay cached, no table holds them
    if bool(np.asarray(c.active)[slot]):
      c = c.release(slot)
  hits.append(_reference_hits(c, prompts[0]))
  c, _ = _admit_commit(c, prompts[0])
  assert hits[1:] == [20, 12, 25, 1, 0, 30]
  assert int(np.asarray(c.hit_tokens)) == (20 + 12 + 25 + 1 + 30) * 16


def test_a_block_with_equal_tokens_but_another_parent_is_no_hit(tiny_layout):
  """A guessed continuation (here the next block id) whose tokens, salt and parent's
  generation match but whose parent differs must not be taken: after another prefix the
  same 16 tokens have other K/V."""
  p, q, x = np.arange(16), np.arange(100, 116), np.arange(200, 216)
  c = DedupKVCache.init(tiny_layout, num_blocks=32, max_requests=4, max_seq_len=MAX_SEQ)
  c, _ = _admit_commit(c, p)  # block 0: P
  c, _ = _admit_commit(c, q)  # block 1: Q
  c, sb = _admit_commit(c, np.r_[p, x])  # P hits block 0; X after P is block 2
  assert tuple(np.asarray(c.block_tables)[sb, :2]) == (0, 2)
  c, sc = _admit_commit(c, np.r_[q, x])  # Q is block 1; X after Q is not block 2
  t = np.asarray(c.block_tables)
  assert t[sc, 0] == 1 and t[sc, 1] not in (0, 1, 2)
  assert int(np.asarray(c.hit_tokens)) == 32  # P once, Q once


def test_a_block_under_an_older_generation_of_its_parent_is_no_hit(tiny_layout):
  """The vectorized verification of a looked-up chain checks the parent's generation as the
  one-by-one check does: a child registered under its parent's earlier life (the parent
  evicted and reallocated since) is refused, though it is the map's single candidate for
  its key (the key hashes tokens, not generations)."""
  p, x = np.arange(16), np.arange(200, 216)
  c = DedupKVCache.init(tiny_layout, num_blocks=32, max_requests=4, max_seq_len=MAX_SEQ)
  c, _ = _admit_commit(c, np.r_[p, x])  # blocks 0 (P) and 1 (X after P)
  blocks = np.r_[p, x].reshape(2, 16)
  assert c._lookup(blocks, 0) == [0, 1]
  c.block_gen[0] += 1  # block 0 reallocated: X's registration is stale
  assert c._lookup(blocks, 0) == [0]
