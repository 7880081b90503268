"""Dense paged cache: each request reserves blocks for `max_seq_len` tokens at admission.

(Or, with `admit(..., reserve_tokens=n)`, for its own n tokens, as vLLM without prefix
caching does for a request whose output length is known: the trace replay's serving
mode. The memory sweep keeps the max_seq_len reservation.)

This is the seed's dense backend done honestly: the reservation is its *allocation*
(`kv_bytes_allocated`), the tokens it has written are its *use* (`kv_bytes_used`).
Nothing is shared between requests. The block tables are the truth: a block is free when
no active request's table holds it. The free list (lowest id first) is derived from them
(see `base`), so admission costs O(blocks reserved), not a scan of the pool.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from hq_jax.kv.base import CacheError, FreeBlocks, PagedCache, PoolFull, check_salt
from hq_jax.kv.paged import KVLayout


class _DenseState:
  """Derived from the tables: the free blocks and how many are held."""

  def __init__(self, free: FreeBlocks, held: int):
    self.free, self.held = free, held


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DenseKVCache(PagedCache):
  backend = "dense"

  @classmethod
  def init(cls, layout: KVLayout, *, num_blocks: int, max_requests: int,
           max_seq_len: int, host_only: bool = False) -> "DenseKVCache":
    """`host_only`: no K/V pools (bookkeeping only, e.g. a no-model replay)."""
    cache = cls(**cls._base_arrays(layout, num_blocks, max_requests, max_seq_len, host_only))
    object.__setattr__(cache, "_derived", _DenseState(FreeBlocks(num_blocks), 0))
    return cache

  @classmethod
  def for_requests(cls, layout: KVLayout, *, max_requests: int, max_seq_len: int):
    """A pool exactly large enough for `max_requests` reservations."""
    return cls.init(layout, num_blocks=max_requests * layout.blocks_for(max_seq_len),
                    max_requests=max_requests, max_seq_len=max_seq_len)

  def _build_state(self) -> _DenseState:
    tables = self.block_tables[self.active]
    used = np.zeros(self.num_blocks, bool)
    used[tables[tables >= 0]] = True
    return _DenseState(FreeBlocks(self.num_blocks, ~used), int(np.count_nonzero(used)))

  def _copy_state(self, state: _DenseState) -> _DenseState:
    return _DenseState(state.free.copy(), state.held)

  @property
  def cached_blocks(self) -> int:
    """Dense never caches a block past its request (interface parity with HQ)."""
    self._check_live()
    return 0

  def cached_prefix_tokens(self, tokens, salt: int = 0) -> int:
    """Dense never finds a prefix cached (interface parity with HQ's router query)."""
    self._check_live()
    return 0

  def admit(self, tokens, salt: int = 0, *,
            reserve_tokens: int | None = None) -> tuple["DenseKVCache", int]:
    """Reserves blocks for a new request; returns (cache, slot).

    The reservation covers `max_seq_len` tokens, or `reserve_tokens` (the prompt plus the
    tokens it will generate; at least the prompt, at most max_seq_len): appending past it
    is an error. `salt` is validated as HQ validates it (a tenant id, an int32); nothing
    is ever shared here, so it changes nothing else.
    """
    self._check_live()
    prompt = self._check_prompt(tokens)
    check_salt(salt)
    if reserve_tokens is not None:
      reserve_tokens = _check_reserve(reserve_tokens, prompt.size, self.max_seq_len)
    slot = self._free_slot(self.active)
    need = (self.max_blocks_per_seq if reserve_tokens is None else
            -(-reserve_tokens // self.block_size))
    c = self._begin()
    free = c._state.free
    if len(free) < need:
      what = (f"max_seq_len {self.max_seq_len}" if reserve_tokens is None else
              f"reserve_tokens {reserve_tokens}")
      raise PoolFull(
          f"pool too small: a dense request reserves {need} blocks ({what}), only "
          f"{len(free)} of {self.num_blocks} are free", need=need, available=len(free),
          what=f"a dense request of {prompt.size} tokens ({what})")
    c.block_tables[slot, :need] = free.take(need)
    c._state.held += need
    c.req_lens[slot] = prompt.size
    c.seq_lens[slot] = 0
    c.active[slot] = True
    c.query_tokens[...] += prompt.size
    return self._finish(c, "admit"), slot

  def _check_reserved(self, slot: int, end: int) -> None:
    """Tokens up to `end` must lie in the slot's reservation."""
    if end and int(self.block_tables[slot, (end - 1) // self.block_size]) < 0:
      n = int(np.count_nonzero(self.block_tables[slot] >= 0)) * self.block_size
      raise CacheError(f"slot {slot} is full: its reservation of {n} tokens "
                       "(admit's reserve_tokens) is used up")

  def append_batch(self, slots, tokens) -> "DenseKVCache":
    """Extends each slot by one token (one decode step); all checked before any change."""
    self._check_live()
    self._check_distinct(list(slots), len(tokens))
    checked = [self._check_append(s, t) for s, t in zip(slots, tokens)]
    for slot, n in checked:
      self._check_reserved(slot, n + 1)
    c = self._begin()
    for slot, n in checked:
      c.req_lens[slot] = n + 1
    return self._finish(c, "append")

  def extend(self, slot: int, tokens) -> "DenseKVCache":
    """Appends `tokens` to `slot` and commits them (their K/V counted as written): the
    same cache as `append` + `commit` token by token, in one call."""
    self._check_live()
    slot, n, arr = self._check_extend(slot, tokens)
    self._check_reserved(slot, n + arr.size)
    c = self._begin()
    if arr.size:  # as token by token: no token, no commit
      c.req_lens[slot] = c.seq_lens[slot] = n + arr.size
    return self._finish(c, "extend")

  def release(self, slot: int) -> "DenseKVCache":
    """Frees the request's reservation (its K/V is simply abandoned)."""
    self._check_live()
    slot = self._check_slot(slot)
    c = self._begin()
    blocks = c.block_tables[slot]
    blocks = blocks[blocks >= 0]
    c._state.free.put(blocks.tolist())
    c._state.held -= blocks.size
    c.block_tables[slot] = -1
    c.req_lens[slot] = c.seq_lens[slot] = 0
    c.active[slot] = False
    return self._finish(c, "release")


def _check_reserve(reserve_tokens, prompt_size: int, max_seq_len: int) -> int:
  if (isinstance(reserve_tokens, (bool, np.bool_))
      or not isinstance(reserve_tokens, (int, np.integer))
      or not prompt_size <= reserve_tokens <= max_seq_len):
    raise CacheError(f"reserve_tokens={reserve_tokens!r} must be in [{prompt_size} (the "
                     f"prompt), {max_seq_len} (max_seq_len)]")
  return int(reserve_tokens)
