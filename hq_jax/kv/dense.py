"""Dense paged cache: each request reserves blocks for `max_seq_len` tokens at admission.

(Or, with `admit(..., reserve_tokens=n)`, for its own n tokens, as vLLM without prefix
caching does for a request whose output length is known: the trace replay's serving
mode. The memory sweep keeps the max_seq_len reservation.)

This is the seed's dense backend done honestly: the reservation is its *allocation*
(`kv_bytes_allocated`), the tokens it has written are its *use* (`kv_bytes_used`).
Nothing is shared between requests. Free blocks are derived from the block tables
(a block is free when no active request's table holds it), so there is no free list
to keep in sync.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from hq_jax.kv.base import CacheError, PagedCache, updated
from hq_jax.kv.paged import KVLayout


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DenseKVCache(PagedCache):
  backend = "dense"

  @classmethod
  def init(cls, layout: KVLayout, *, num_blocks: int, max_requests: int,
           max_seq_len: int) -> "DenseKVCache":
    return cls(**cls._base_arrays(layout, num_blocks, max_requests, max_seq_len))

  @classmethod
  def for_requests(cls, layout: KVLayout, *, max_requests: int, max_seq_len: int):
    """A pool exactly large enough for `max_requests` reservations."""
    return cls.init(layout, num_blocks=max_requests * layout.blocks_for(max_seq_len),
                    max_requests=max_requests, max_seq_len=max_seq_len)

  def admit(self, tokens, salt: int = 0, *, reserve_tokens: int | None = None,
            consume: bool = False) -> tuple["DenseKVCache", int]:
    """Reserves blocks for a new request; returns (cache, slot).

    The reservation covers `max_seq_len` tokens, or `reserve_tokens` (the prompt plus the
    tokens it will generate; at least the prompt, at most max_seq_len): appending past it
    is an error. `salt` and `consume` are accepted for interface parity; nothing is ever
    shared here, and the arrays are per request (a copy is cheap).
    """
    del salt, consume
    prompt = self._check_prompt(tokens)
    if reserve_tokens is not None and not prompt.size <= reserve_tokens <= self.max_seq_len:
      raise CacheError(f"reserve_tokens={reserve_tokens} must be in [{prompt.size} (the "
                       f"prompt), {self.max_seq_len} (max_seq_len)]")
    active = np.asarray(self.active)
    slot = self._free_slot(active)
    tables = np.asarray(self.block_tables)
    used = np.zeros(self.num_blocks, bool)
    held = tables[active]
    used[held[held >= 0]] = True
    free = np.flatnonzero(~used)
    need = (self.max_blocks_per_seq if reserve_tokens is None else
            -(-reserve_tokens // self.block_size))
    if free.size < need:
      what = (f"max_seq_len {self.max_seq_len}" if reserve_tokens is None else
              f"reserve_tokens {reserve_tokens}")
      raise CacheError(
          f"pool too small: a dense request reserves {need} blocks ({what}), only "
          f"{free.size} of {self.num_blocks} are free")
    return dataclasses.replace(
        self,
        block_tables=updated(self.block_tables, (slot, slice(0, need)), free[:need]),
        req_lens=updated(self.req_lens, slot, prompt.size),
        seq_lens=updated(self.seq_lens, slot, 0),
        active=updated(self.active, slot, True),
        query_tokens=self.query_tokens + prompt.size), slot

  def append(self, slot: int, token: int) -> "DenseKVCache":
    """Extends a request by one (decoded) token; its K/V is written by the next step."""
    n = self._check_append(slot, token)
    if n % self.block_size == 0 and int(self.block_tables[slot, n // self.block_size]) < 0:
      raise CacheError(f"slot {slot} is full: its reservation of {n} tokens "
                       "(admit's reserve_tokens) is used up")
    return dataclasses.replace(self, req_lens=updated(self.req_lens, slot, n + 1))

  def release(self, slot: int, *, consume: bool = False) -> "DenseKVCache":
    """Frees the request's reservation (its K/V is simply abandoned). `consume` is accepted
    for interface parity (the arrays are per request: a copy is cheap)."""
    del consume
    self._check_slot(slot)
    return dataclasses.replace(
        self,
        block_tables=updated(self.block_tables, slot, -1),
        req_lens=updated(self.req_lens, slot, 0),
        seq_lens=updated(self.seq_lens, slot, 0),
        active=updated(self.active, slot, False))
