"""The block manager's contract: ownership (an operation consumes the cache it is given),
snapshots, typed pool exhaustion, the eviction counter, `extend`, host-only pools, checked
restores, and derived state that a restored cache rebuilds to behave identically."""

import os
import tempfile

import chex
import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hq_jax import checkpoint
from hq_jax.serve.engine import Engine
from hq_jax.kv.base import CacheError, PoolFull
from hq_jax.kv.dedup import DedupKVCache
from hq_jax.kv.dense import DenseKVCache
from hq_jax.kv.paged import KVLayout
from hq_jax.kv.stats import kv_stats

LAYOUT = KVLayout(num_layers=1, num_kv_heads=1, head_dim=2, block_size=4, dtype="float32")


def _hq(num_blocks=16, max_requests=4, max_seq_len=32, **kw):
  return DedupKVCache.init(LAYOUT, num_blocks=num_blocks, max_requests=max_requests,
                           max_seq_len=max_seq_len, **kw)


def _dense(num_blocks=32, max_requests=4, max_seq_len=32, **kw):
  return DenseKVCache.init(LAYOUT, num_blocks=num_blocks, max_requests=max_requests,
                           max_seq_len=max_seq_len, **kw)


def _snapshot(cache):
  return jax.tree.map(np.array, cache)


@pytest.mark.parametrize("make", [_hq, _dense])
def test_an_operation_consumes_the_cache_it_is_given(make):
  c = make()
  c2, slot = c.admit(np.arange(10))
  ops = {"admit": lambda: c.admit([1]), "commit": lambda: c.commit(slot, 10),
         "append": lambda: c.append(slot, 1), "extend": lambda: c.extend(slot, [1, 2]),
         "release": lambda: c.release(slot), "kv_stats": lambda: kv_stats(c),
         "copy": lambda: c.copy(), "host_view": lambda: c.host_view([slot], [0], 4),
         "held_blocks": lambda: c.held_blocks}
  if c.backend == "hq":
    ops["evict"] = lambda: c.evict()
  for name, fn in ops.items():
    with pytest.raises(CacheError, match=r"consumed by a later operation \(admit\).*copy\(\)"):
      fn()
  c3 = c2.commit(slot, 10)
  with pytest.raises(CacheError, match=r"consumed by a later operation \(commit\)"):
    c2.release(slot)
  assert kv_stats(c3).active_requests == 1


@pytest.mark.parametrize("make", [_hq, _dense])
def test_a_failed_operation_leaves_the_cache_valid(make):
  c = make()
  c, slot = c.admit(np.arange(10))
  for bad in (lambda: c.commit(slot, 11), lambda: c.release(7), lambda: c.admit([-1]),
              lambda: c.extend(slot, np.arange(40)), lambda: c.append(slot, 2**31)):
    before = _snapshot(c)
    with pytest.raises(CacheError):
      bad()
    chex.assert_trees_all_equal(_snapshot(c), before)
  c = c.commit(slot, 10).release(slot)  # still usable
  assert kv_stats(c).active_requests == 0


@pytest.mark.parametrize("make", [_hq, _dense])
def test_copy_is_an_independent_snapshot(make):
  c = make()
  c, a = c.admit(np.arange(12))
  c = c.commit(a, 12)
  snap = c.copy()
  before = _snapshot(snap)
  c, b = c.admit(np.arange(12))
  c = c.commit(b, 12).release(a)
  chex.assert_trees_all_equal(_snapshot(snap), before)
  # The snapshot goes on independently, to the same place as the original.
  snap, b2 = snap.admit(np.arange(12))
  snap = snap.commit(b2, 12).release(a)
  chex.assert_trees_all_equal(_snapshot(snap), _snapshot(c))


def test_pool_full_is_typed_with_its_fields():
  c = _hq(num_blocks=6)
  c, a = c.admit(np.arange(12))  # 3 blocks
  c = c.commit(a, 12)
  with pytest.raises(PoolFull) as e:
    c.admit(np.arange(100, 116))  # 4 blocks, 3 can be had
  assert (e.value.need, e.value.available, e.value.keep_free) == (4, 3, 0)
  assert isinstance(e.value, CacheError) and "16 tokens" in e.value.what
  # Hits are pinned before counting what can be had: 2 hit blocks, 2 new, 1 kept free.
  with pytest.raises(PoolFull) as e:
    c.admit(np.r_[np.arange(8), np.arange(200, 208)], keep_free=2)
  assert (e.value.need, e.value.available, e.value.keep_free) == (2, 3, 2)
  d = _dense(num_blocks=10, max_seq_len=16)  # 4 blocks per reservation
  d, _ = d.admit([1])
  d, _ = d.admit([1])
  with pytest.raises(PoolFull) as e:
    d.admit([1])
  assert (e.value.need, e.value.available) == (4, 2)
  # A decode step that needs more blocks than can be had.
  c = _hq(num_blocks=2, max_requests=2)
  c, s0 = c.admit(np.arange(4))
  c, s1 = c.admit(np.arange(10, 14))
  with pytest.raises(PoolFull) as e:
    c.append_batch([s0, s1], [1, 2])
  assert (e.value.need, e.value.available) == (2, 0)


def test_pool_full_before_a_bad_slot_is_not_raised():
  with pytest.raises(CacheError, match="not an active request"):
    _hq().extend(0, [1])


def test_evicted_counter_equals_the_generation_diff():
  """The cache's own count of evicted blocks equals what the replays used to compute by
  diffing generations: cached blocks before an operation that were reallocated by it."""
  rng = np.random.default_rng(0)
  c = _hq(num_blocks=12, max_requests=3, max_seq_len=24)
  total, slots = 0, []
  for step in range(200):
    before = c.copy()
    was_cached = before.registered & (before.refcount == 0)
    try:
      if slots and rng.random() < 0.4:
        c = c.release(slots.pop(rng.integers(len(slots))))
      elif slots and rng.random() < 0.3:
        s = slots[rng.integers(len(slots))]
        if c.req_lens[s] + 3 <= 24:
          c = c.extend(s, rng.integers(0, 3, 3))
      else:
        n = int(rng.integers(1, 20))
        c, s = c.admit(rng.integers(0, 2, n))
        c = c.commit(s, n)
        slots.append(s)
    except CacheError:
      continue
    diff = int(np.sum(was_cached & (c.block_gen > before.block_gen)))
    assert int(c.evicted_blocks) - int(before.evicted_blocks) == diff
    total += diff
  assert total > 10 and int(c.evicted_blocks) == total == kv_stats(c).evicted_blocks
  n = c.cached_blocks
  assert int(c.evict().evicted_blocks) == total + n  # evict() counts too


@pytest.mark.parametrize("make", [_hq, _dense])
def test_extend_equals_appending_and_committing_one_by_one(make):
  rng = np.random.default_rng(1)
  c = make(num_blocks=12 if make is _hq else 40, max_requests=3, max_seq_len=40)
  for n in (9, 14):  # cached chains to evict, and an active request
    c, s = c.admit(rng.integers(0, 3, n))
    c = c.commit(s, n)
  if c.backend == "hq":
    c = c.release(0)
  c, slot = c.admit(rng.integers(0, 3, 6))
  c = c.commit(slot, 3)  # K/V of 3 of its 6 tokens written
  for k in (0, 1, 3, 4, 11):
    tokens = rng.integers(0, 3, k)
    one = c.copy()
    for t in tokens:
      one = one.append(slot, int(t))
      one = one.commit(slot, int(one.req_lens[slot]))
    c = c.extend(slot, tokens)
    chex.assert_trees_all_equal(_snapshot(c), _snapshot(one))
    assert c.held_blocks == one.held_blocks
  if c.backend == "hq":
    assert int(c.evicted_blocks) > 0
    assert c.held_blocks == int(np.count_nonzero(c.refcount))


def test_held_and_cached_blocks_are_counted_as_the_arrays_say():
  rng = np.random.default_rng(2)
  c = _hq(num_blocks=20, max_requests=4)
  for i in range(30):
    try:
      n = int(rng.integers(1, 20))
      c, s = c.admit(rng.integers(0, 2, n))
      c = c.commit(s, n)
      if i % 2:
        c = c.release(s)
    except CacheError:
      c = c.release(int(np.flatnonzero(c.active)[0]))
    assert c.held_blocks == int(np.count_nonzero(c.refcount))
    assert c.cached_blocks == int(np.sum(c.registered & (c.refcount == 0)))


@pytest.mark.parametrize("make", [_hq, _dense])
def test_host_only_pools(make, tiny):
  """A host-only cache keeps the bookkeeping and the accounting of a real one without K/V
  storage (a pool of millions of blocks costs its metadata only), and refuses a model."""
  real, host = make(), make(host_only=True)
  assert host.host_only and not real.host_only
  assert not isinstance(host.pools.k, jax.Array)
  ops = lambda c: c.admit(np.arange(10))
  real, a = ops(real)
  host, b = ops(host)
  real, host = real.commit(a, 10).extend(a, [1, 2]), host.commit(b, 10).extend(b, [1, 2])
  sr, sh = kv_stats(real), kv_stats(host)
  assert sr == sh and sh.pool_bytes == 2 * real.pools.k.nbytes
  for name in ("block_tables", "req_lens", "seq_lens"):
    np.testing.assert_array_equal(getattr(real, name), getattr(host, name))
  params, cfg = tiny
  engine = Engine(params, cfg, chunk_size=16)
  layout = KVLayout.from_config(cfg, 16)
  kind = type(host)
  big = kind.init(layout, num_blocks=1_000_000, max_requests=2, max_seq_len=64,
                  host_only=True)
  assert kv_stats(big).pool_bytes == 1_000_000 * layout.bytes_per_block
  for fn in (lambda: engine.prefill(big, [1, 2, 3]),
             lambda: big.with_pools(real.pools), lambda: big.view([0], [0], 1)):
    with pytest.raises(CacheError, match="host_only"):
      fn()
  with pytest.raises(ValueError, match="host_only"):
    checkpoint.save(os.path.join(tempfile.mkdtemp(), "c"), big)
  big, s = big.admit(np.arange(40))
  assert big.held_blocks == (3 if kind is DedupKVCache else 4)


# ------------------------------------------------------------------ restore checks
def _warm(tmp_path, **kw):
  c = _hq(**kw)
  c, s = c.admit(np.arange(20) % 7)
  c = c.commit(s, 20).release(s)
  path = str(tmp_path / "ckpt")
  checkpoint.save(path, c)
  return c, path


@pytest.mark.parametrize("like,field", [
    (lambda: _hq(hash_bits=8), ".hash_bits"),
    (lambda: _hq(hash_bits=0), ".hash_bits"),
    (lambda: _hq(max_seq_len=30), ".max_seq_len"),
    (lambda: _hq(max_seq_len=64), ".max_seq_len"),
    (lambda: _hq(max_requests=8), ".active"),
    (lambda: _hq(num_blocks=32), ".block_gen"),
    (lambda: DedupKVCache.init(KVLayout(1, 1, 2, 4, "bfloat16"), num_blocks=16,
                               max_requests=4, max_seq_len=32), ".pools.k"),
    (lambda: _dense(num_blocks=16), "."),
])
def test_restore_refuses_a_like_that_does_not_match(tmp_path, like, field):
  c, path = _warm(tmp_path)
  with pytest.raises(checkpoint.CheckpointMismatch) as e:
    checkpoint.restore(path, like())
  assert e.value.field == field and field.strip(".") in str(e.value)
  restored = checkpoint.restore(path, _hq())
  chex.assert_trees_all_equal(restored, c)


def test_restore_without_layout_file_checks_shapes_and_dtypes(tmp_path):
  """A checkpoint written before the layout file existed: orbax's own metadata still
  refuses another shape or dtype (static fields cannot be checked there)."""
  c, path = _warm(tmp_path)
  os.remove(os.path.join(path, checkpoint.LAYOUT_FILE))
  with pytest.raises(checkpoint.CheckpointMismatch, match=r"\.active is \[4\] bool"):
    checkpoint.restore(path, _hq(max_requests=8))
  chex.assert_trees_all_equal(checkpoint.restore(path, _hq()), c)


# --------------------------------------------- restored caches behave identically
_OPS = st.lists(st.one_of(
    st.tuples(st.just("admit"), st.lists(st.integers(0, 1), min_size=1, max_size=14),
              st.integers(0, 1), st.integers(0, 3)),
    st.tuples(st.just("extend"), st.integers(0, 3), st.lists(st.integers(0, 1), max_size=6)),
    st.tuples(st.just("append"), st.integers(0, 3), st.integers(0, 1)),
    st.tuples(st.just("release"), st.integers(0, 3)),
    st.tuples(st.just("evict"), st.integers(0, 3))), max_size=25)


def _apply(c, op):
  """(new cache, outcome): the cache unchanged and the error's type on a refusal."""
  try:
    if op[0] == "admit":
      c, slot = c.admit(np.asarray(op[1]), op[2], keep_free=op[3])
      return c.commit(slot, len(op[1])), ("admit", slot)
    if op[0] == "extend":
      return c.extend(op[1], op[2]), op[0]
    if op[0] == "append":
      return c.append(op[1], op[2]), op[0]
    if op[0] == "release":
      return c.release(op[1]), op[0]
    return c.evict(op[1]), op[0]
  except CacheError as e:
    return c, type(e).__name__


@settings(max_examples=12 if not os.environ.get("HQ_JAX_DEEP_TESTS") else 60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(warm=_OPS, ops=_OPS, bits=st.sampled_from([0, 32]), host=st.sampled_from([0, 3]))
def test_a_restored_cache_behaves_as_the_one_saved(warm, ops, bits, host):
  """Random operations warm a cache (hits, evictions, collisions at 0 bits; with a host
  tier, moves to it, hits on it and their pending copies); it is saved and restored (its
  derived state rebuilt from the arrays); then the same random operations on both give the
  same outcomes and the same arrays at every step."""
  c = _hq(num_blocks=10, max_seq_len=24, hash_bits=bits, host_blocks=host)
  for op in warm:
    c, _ = _apply(c, op)
  with tempfile.TemporaryDirectory() as d:
    checkpoint.save(os.path.join(d, "c"), c)
    restored = checkpoint.restore(os.path.join(d, "c"), _hq(num_blocks=10, max_seq_len=24,
                                                            hash_bits=bits, host_blocks=host))
  for op in ops:
    c, a = _apply(c, op)
    restored, b = _apply(restored, op)
    assert a == b
    chex.assert_trees_all_equal(_snapshot(c), _snapshot(restored))
    assert (c.held_blocks, c.cached_blocks) == (restored.held_blocks, restored.cached_blocks)
    assert c.has_pending_copies == restored.has_pending_copies
