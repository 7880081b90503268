"""What the dense and deduplicated caches share: request slots, block tables, views, reads.

A cache is a frozen, registered dataclass of arrays; every operation returns a new
cache. The K/V pools are device arrays, written only inside jitted steps. The metadata
(block tables, lengths, the HQ block index) is planned on the host, so it is kept as
numpy arrays in the same pytree: no device round trip per admission or decode step,
and an orbax round trip still restores a cache that behaves identically.

Per request slot s:
  block_tables[s, i]  physical block of logical block i, -1 where none
  req_lens[s]         tokens the request has (prompt + appended), covered by its table
  seq_lens[s]         tokens whose K/V is written (<= req_lens[s])
  active[s]           slot in use
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hq_jax.kv.paged import AttentionView, KVLayout, KVPools, dequantize, gather


class CacheError(ValueError):
  """Bad input to a cache operation; the cache passed in is left unchanged."""


def static_field(**kwargs):
  return dataclasses.field(metadata=dict(static=True), **kwargs)


def updated(array, index, value) -> np.ndarray:
  """A copy of a metadata array with `array[index] = value` (caches never change in place)."""
  out = np.array(array)
  out[index] = value
  return out


@dataclasses.dataclass(frozen=True)
class PagedCache:
  """Fields and read paths common to `DenseKVCache` and `DedupKVCache`."""

  pools: KVPools
  block_tables: np.ndarray  # [max_requests, max_blocks_per_seq] int32, -1 = none
  req_lens: np.ndarray  # [max_requests] int32
  seq_lens: np.ndarray  # [max_requests] int32
  active: np.ndarray  # [max_requests] bool
  hit_tokens: np.ndarray  # [] int32, prompt tokens found cached at admission (cumulative)
  query_tokens: np.ndarray  # [] int32, prompt tokens looked up at admission (cumulative)
  max_seq_len: int = static_field()

  backend = "base"

  # ------------------------------------------------------------------ shapes
  @property
  def block_size(self) -> int:
    return self.pools.block_size

  @property
  def num_blocks(self) -> int:
    return self.pools.num_blocks

  @property
  def max_requests(self) -> int:
    return self.block_tables.shape[0]

  @property
  def max_blocks_per_seq(self) -> int:
    return self.block_tables.shape[1]

  @property
  def layout(self) -> KVLayout:
    nl, _, bs, nk, d = self.pools.k.shape
    return KVLayout(nl, nk, d, bs, jnp.dtype(self.pools.k.dtype).name)

  @staticmethod
  def _base_arrays(layout: KVLayout, num_blocks: int, max_requests: int, max_seq_len: int):
    if max_seq_len <= 0 or max_requests <= 0 or num_blocks <= 0:
      raise CacheError("num_blocks, max_requests and max_seq_len must be positive, got "
                       f"{num_blocks}, {max_requests}, {max_seq_len}")
    mb = layout.blocks_for(max_seq_len)
    return dict(
        pools=KVPools.zeros(layout, num_blocks),
        block_tables=np.full((max_requests, mb), -1, np.int32),
        req_lens=np.zeros((max_requests,), np.int32),
        seq_lens=np.zeros((max_requests,), np.int32),
        active=np.zeros((max_requests,), bool),
        hit_tokens=np.zeros((), np.int32),
        query_tokens=np.zeros((), np.int32),
        max_seq_len=max_seq_len)

  # ------------------------------------------------------------ validation
  def _check_slot(self, slot: int) -> None:
    if not (0 <= slot < self.max_requests) or not bool(self.active[slot]):
      raise CacheError(f"slot {slot} is not an active request")

  def _check_prompt(self, tokens) -> np.ndarray:
    arr = np.asarray(tokens)
    if arr.ndim != 1:
      raise CacheError(f"a request's tokens must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
      raise CacheError("empty request: a request needs at least one token")
    if not np.issubdtype(arr.dtype, np.integer):
      raise CacheError(f"token ids must be integers, got dtype {arr.dtype}")
    if arr.size > self.max_seq_len:
      raise CacheError(f"request of {arr.size} tokens is longer than max_seq_len "
                       f"({self.max_seq_len})")
    if arr.min() < 0:
      raise CacheError(f"negative token id {int(arr.min())}")
    if arr.max() >= 2**31:  # stored as int32: a larger id would wrap onto another
      raise CacheError(f"token id {int(arr.max())} does not fit in int32")
    return arr.astype(np.int32)

  def _check_append(self, slot: int, token: int) -> int:
    """Validates a one-token extension; returns the request's current length."""
    self._check_slot(slot)
    n = int(self.req_lens[slot])
    if n >= self.max_seq_len:
      raise CacheError(f"slot {slot} is full: {n} tokens = max_seq_len")
    if isinstance(token, (bool, np.bool_)) or not isinstance(token, (int, np.integer)):
      raise CacheError(f"a token id must be an int, got {type(token).__name__}")
    if not 0 <= int(token) < 2**31:
      raise CacheError(f"token id {int(token)} is negative or does not fit in int32")
    return n

  def _free_slot(self, active: np.ndarray) -> int:
    free = np.flatnonzero(~active)
    if free.size == 0:
      raise CacheError(f"no free request slot: all {self.max_requests} are active; release one "
                       "or build the cache with a larger max_requests")
    return int(free[0])

  # ------------------------------------------------------------ K/V writes
  def commit(self, slot: int, num_tokens: int):
    """Marks the K/V of the first `num_tokens` tokens of `slot` as written."""
    return self.commit_batch([slot], [num_tokens])

  def commit_batch(self, slots: Sequence[int], num_tokens: Sequence[int], *,
                   consume: bool = False):
    """`commit` for several slots at once (one decode step): all checked before any change.
    `consume` lets a cache update its metadata in place (the HQ cache: see its `_meta`)."""
    del consume  # the base arrays are per request: a copy is cheap
    slots, num_tokens = [int(s) for s in slots], [int(n) for n in num_tokens]
    self._check_distinct(slots, len(num_tokens))
    for slot, n in zip(slots, num_tokens):
      self._check_slot(slot)
      if not (int(self.seq_lens[slot]) <= n <= int(self.req_lens[slot])):
        raise CacheError(f"commit of {n} tokens for slot {slot} outside "
                         f"[{int(self.seq_lens[slot])}, {int(self.req_lens[slot])}]")
    return dataclasses.replace(self, seq_lens=updated(self.seq_lens, slots, num_tokens))

  def append_batch(self, slots: Sequence[int], tokens: Sequence[int], *,
                   consume: bool = False):
    """Extends each slot by one token (one decode step); the cache is unchanged on error."""
    del consume  # see commit_batch
    self._check_distinct(list(slots), len(tokens))
    cache = self
    for slot, token in zip(slots, tokens):
      cache = cache.append(slot, token)
    return cache

  @staticmethod
  def _check_distinct(slots: list, count: int) -> None:
    if len(slots) != count:
      raise CacheError(f"{len(slots)} slots but {count} values")
    if len(set(slots)) != len(slots):
      raise CacheError(f"a slot appears twice in {slots}")

  def with_pools(self, pools: KVPools):
    if (pools.k.shape != self.pools.k.shape or pools.k.dtype != self.pools.k.dtype
        or pools.quantized != self.pools.quantized):
      raise CacheError(f"pools of shape {pools.k.shape}/{pools.k.dtype} do not fit a cache of "
                       f"{self.pools.k.shape}/{self.pools.k.dtype}")
    return dataclasses.replace(self, pools=pools)

  # ------------------------------------------------------------------ reads
  def view(self, slots: Sequence[int], start: Sequence[int], chunk: int, *,
           pad_to: int | None = None) -> AttentionView:
    """`host_view` on the device, its arrays moved in one transfer call."""
    return jax.device_put(self.host_view(slots, start, chunk, pad_to=pad_to))

  def host_view(self, slots: Sequence[int], start: Sequence[int], chunk: int, *,
                pad_to: int | None = None) -> AttentionView:
    """The attention view, as numpy arrays, for `chunk` query tokens of each slot from
    position `start[b]` (host planning reads it; `view` puts it on the device).

    A token is written only if its position is in [seq_lens, req_lens): K/V already
    held (a cache hit, or an earlier chunk) is never overwritten. `pad_to` adds rows that
    read nothing (kv_len 0) and write nothing, so that batches of several sizes share one
    compiled shape.
    """
    slots = np.asarray(slots, np.int32)
    start = np.asarray(start, np.int32)
    pad_to = slots.size if pad_to is None else pad_to
    if pad_to < slots.size:
      raise CacheError(f"pad_to={pad_to} is smaller than the batch of {slots.size}")
    bs = self.block_size
    tables = np.zeros((pad_to, self.max_blocks_per_seq), np.int32)
    tables[:slots.size] = np.asarray(self.block_tables)[slots]  # [B, MB]
    seq = np.zeros((pad_to,), np.int32)
    req = np.zeros((pad_to,), np.int32)
    seq[:slots.size] = np.asarray(self.seq_lens)[slots]
    req[:slots.size] = np.asarray(self.req_lens)[slots]
    first = np.zeros((pad_to,), np.int32)
    first[:slots.size] = start
    pos = first[:, None] + np.arange(chunk, dtype=np.int32)[None]  # [B, T]
    writable = (pos >= seq[:, None]) & (pos < req[:, None])  # never for padding rows
    blk = np.take_along_axis(tables, np.minimum(pos // bs, tables.shape[1] - 1), axis=1)
    oob = self.num_blocks * bs
    write = np.where(writable & (blk >= 0), blk * bs + pos % bs, oob).astype(np.int32)
    kv_lens = np.minimum(first + chunk, req).astype(np.int32)
    return AttentionView(positions=pos.astype(np.int32), block_tables=np.maximum(tables, 0),
                         write_slots=write, kv_lens=kv_lens)

  def read_kv(self, slot: int) -> tuple[jax.Array, jax.Array]:
    """The written K and V of a request: [layers, seq_len, kv_heads, head_dim] each, as
    stored (FP8 pools: dequantized to float32)."""
    self._check_slot(slot)
    n = int(self.seq_lens[slot])
    table = jnp.maximum(self.block_tables[slot], 0)[None]
    read = lambda pool: None if pool is None else jax.vmap(
        lambda p: gather(p, table)[0, :n])(pool)
    if not self.pools.quantized:
      return read(self.pools.k), read(self.pools.v)
    return (dequantize(read(self.pools.k), read(self.pools.k_scale)),
            dequantize(read(self.pools.v), read(self.pools.v_scale)))

  def tokens_of(self, slot: int) -> int:
    return int(self.req_lens[slot])


def metadata_leaves(cache: PagedCache) -> dict[str, jax.Array]:
  """Every array of the cache that is not K/V (what `metadata_bytes` counts)."""
  return {f.name: getattr(cache, f.name) for f in dataclasses.fields(cache)
          if f.name != "pools" and not f.metadata.get("static")}
