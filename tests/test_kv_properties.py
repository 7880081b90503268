"""Hypothesis state machine over random admit / write / append / release / evict sequences.

K/V written for token p of a request is a function of (salt, tokens[:p+1]), as with a
real model, so reading a request back returns exactly its own values if and only if
no block was ever shared, evicted or overwritten wrongly. The host-tier machine runs the
same program with a host tier: evicted blocks move to it and come back on hits, the
copies run before each write, as the engine runs them before each step.
"""

import hashlib
import os

import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from hq_jax import config
from hq_jax.kv import paged, tiers
from hq_jax.kv.base import CacheError, PoolFull
from hq_jax.kv.dedup import DedupKVCache
from hq_jax.kv.dense import DenseKVCache

# Tiny blocks, a 2-letter alphabet and a small pool: prefixes repeat, blocks are shared
# across salts' equal tokens, and eviction reuses parents of cached children often.
LAYOUT = paged.KVLayout(num_layers=2, num_kv_heads=1, head_dim=2, block_size=2,
                        dtype="float32")
MAX_SEQ = 12
ALPHABET = st.integers(0, 1)


def _value(salt, prefix) -> float:
  digest = hashlib.blake2b(np.asarray([salt] + list(prefix), np.int64).tobytes(),
                           digest_size=3).digest()
  return float(int.from_bytes(digest, "little"))  # Exact in float32 (< 2**24).


def _write(cache, slot, salt, tokens):
  """Writes K/V for tokens [seq_len, req_len) of `slot` and commits them (the copies
  between tiers first, as a model step runs them)."""
  cache, _ = tiers.run_copies(cache)
  start, end = int(cache.seq_lens[slot]), int(cache.req_lens[slot])
  if end == start:
    return cache
  chunk = end - start
  view = cache.view([slot], [start], chunk)
  vals = np.array([_value(salt, tokens[:p + 1]) for p in range(start, end)], np.float32)
  k = jnp.broadcast_to(jnp.asarray(vals)[None, :, None, None], (1, chunk, 1, 2))
  pools = cache.pools
  for layer in range(LAYOUT.num_layers):
    pools = paged.write_layer(pools, layer, k + layer, -k - layer, view.write_slots)
  return cache.with_pools(pools).commit(slot, end)


class CacheMachine(RuleBasedStateMachine):
  backend = "hq"
  host_blocks = 0

  def __init__(self):
    super().__init__()
    if self.backend == "hq":
      self.cache = DedupKVCache.init(LAYOUT, num_blocks=12, max_requests=4,
                                     max_seq_len=MAX_SEQ, hash_bits=0,  # All collide.
                                     host_blocks=self.host_blocks)
    else:
      self.cache = DenseKVCache.init(LAYOUT, num_blocks=24, max_requests=4,
                                     max_seq_len=MAX_SEQ)
    self.requests = {}  # slot -> (salt, tokens)

  @rule(tokens=st.lists(ALPHABET, min_size=1, max_size=MAX_SEQ), salt=st.integers(0, 1))
  def admit_and_write(self, tokens, salt):
    try:
      cache, slot = self.cache.admit(np.asarray(tokens, np.int32), salt)
    except CacheError as e:
      assert isinstance(e, PoolFull) or "no free request slot" in str(e)
      return
    self.cache = _write(cache, slot, salt, tokens)
    self.requests[slot] = (salt, list(tokens))

  @precondition(lambda self: self.requests)
  @rule(data=st.data(), token=ALPHABET)
  def append(self, data, token):
    slot = data.draw(st.sampled_from(sorted(self.requests)))
    salt, tokens = self.requests[slot]
    try:
      cache = self.cache.append(slot, token)
    except CacheError as e:
      assert "full" in str(e) or isinstance(e, PoolFull)
      return
    self.cache = _write(cache, slot, salt, tokens + [token])
    self.requests[slot] = (salt, tokens + [token])

  @precondition(lambda self: self.requests)
  @rule(data=st.data())
  def release(self, data):
    slot = data.draw(st.sampled_from(sorted(self.requests)))
    self.cache = self.cache.release(slot)
    del self.requests[slot]

  @precondition(lambda self: self.backend == "hq")
  @rule(n=st.integers(0, 4))
  def evict(self, n):
    self.cache = self.cache.evict(n)

  @invariant()
  def reads_return_what_was_written(self):
    for slot, (salt, tokens) in self.requests.items():
      k, v = self.cache.read_kv(slot)
      want = np.array([_value(salt, tokens[:p + 1]) for p in range(len(tokens))], np.float32)
      for layer in range(LAYOUT.num_layers):
        np.testing.assert_array_equal(np.asarray(k[layer, :, 0, 0]), want + layer)
        np.testing.assert_array_equal(np.asarray(v[layer, :, 0, 1]), -want - layer)

  @invariant()
  def refcounts_count_table_entries(self):
    if self.backend != "hq":
      return
    counts = np.zeros(self.cache.num_blocks, np.int64)
    for slot, (_, tokens) in self.requests.items():
      n = -(-len(tokens) // LAYOUT.block_size)
      np.add.at(counts, np.asarray(self.cache.block_tables)[slot, :n], 1)
    np.testing.assert_array_equal(np.asarray(self.cache.refcount), counts)

  @invariant()
  def shared_only_with_equal_salt_and_prefix(self):
    bs = LAYOUT.block_size
    owners = {}
    tables = np.asarray(self.cache.block_tables)
    for slot, (salt, tokens) in self.requests.items():
      for i in range(-(-len(tokens) // bs)):
        owners.setdefault(int(tables[slot, i]), []).append((i, salt, tokens[:(i + 1) * bs]))
    for holders in owners.values():
      first = holders[0]
      for other in holders[1:]:
        assert self.backend == "hq", "dense never shares"
        assert other[0] == first[0] and other[1] == first[1] and other[2] == first[2]
        assert len(first[2]) == (first[0] + 1) * bs  # Only full blocks are shared.


  @invariant()
  def host_tier_within_budget_one_copy_per_identity(self):
    if not self.host_blocks:
      return
    c = self.cache
    reg = np.flatnonzero(np.asarray(c.host_registered))
    assert reg.size <= self.host_blocks
    assert np.unique(np.asarray(c.host_gen)[reg]).size == reg.size
    assert int(c.host_hit_tokens) <= int(c.hit_tokens)
    assert int(c.host_hit_tokens) <= int(c.blocks_to_device) * LAYOUT.block_size


class DenseCacheMachine(CacheMachine):
  backend = "dense"


class HostTierCacheMachine(CacheMachine):
  host_blocks = 5


# `make test` runs 15 random programs per machine (it must stay under 10 minutes on the
# 2-core box); HQ_JAX_DEEP_TESTS=1 (`make test-deep`) runs the earlier 40.
_settings = settings(max_examples=40 if os.environ.get("HQ_JAX_DEEP_TESTS") else 15,
                     stateful_step_count=30, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow])
TestDedupCache = CacheMachine.TestCase
TestDedupCache.settings = _settings
TestDenseCache = DenseCacheMachine.TestCase
TestDenseCache.settings = _settings
TestHostTierCache = HostTierCacheMachine.TestCase
TestHostTierCache.settings = _settings
