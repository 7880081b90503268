"""What the dense and deduplicated caches share: request slots, block tables, views, reads.

A cache is a frozen, registered dataclass of arrays. The K/V pools are device arrays,
written only inside jitted steps. The metadata (block tables, lengths, the HQ block
index) is planned on the host, so it is kept as numpy arrays in the same pytree: no device
round trip per admission or decode step, and an orbax round trip still restores a cache
that behaves identically.

Ownership. Every operation (admit, commit, commit_batch, append, append_batch, extend,
release, evict, with_pools) takes the cache and returns the new one: it updates the
metadata arrays in place and hands them over, as a jitted step donates the pools. The
cache passed in is consumed: any later operation on it, a read through it and `kv_stats`
of it raise `CacheError`; `cache.copy()` keeps an explicit snapshot (O(pool)). So a
decode step or an admission costs O(blocks touched), not a copy of every array. On any
error the cache passed in is unchanged and still valid: everything is checked before
anything changes.

Derived state. The arrays are the only source of truth. What makes an operation O(1) per
block (free lists, the HQ hash index and LRU queue, counters) is derived from them, kept
on the cache object outside the dataclass fields and handed to the returned cache. A
cache without it (restored by orbax, rebuilt by `jax.tree_util`, made by
`dataclasses.replace`) rebuilds it on its first operation, from private copies of its
arrays (O(pool), once), so it never shares mutable arrays with the cache it came from.

Per request slot s:
  block_tables[s, i]  physical block of logical block i, -1 where none
  req_lens[s]         tokens the request has (prompt + appended), covered by its table
  seq_lens[s]         tokens whose K/V is written (<= req_lens[s])
  active[s]           slot in use
"""

from __future__ import annotations

import dataclasses
import heapq
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hq_jax.kv.paged import AttentionView, KVLayout, KVPools, dequantize, gather


class CacheError(ValueError):
  """Bad input to a cache operation; the cache passed in is left unchanged."""


class PoolFull(CacheError):
  """The pool cannot supply the blocks an operation needs (the cache is unchanged).

  need: new blocks the operation needs; keep_free: blocks that must stay allocatable
  after it (HQ admission's `keep_free`); available: blocks it could have had (free, or
  cached and evictable); what: the operation, in words."""

  def __init__(self, message: str, *, need: int, available: int, what: str,
               keep_free: int = 0):
    super().__init__(message)
    self.need, self.available, self.what, self.keep_free = need, available, what, keep_free


def static_field(**kwargs):
  return dataclasses.field(metadata=dict(static=True), **kwargs)


def check_int(value, what: str) -> int:
  """`value` as an int; bools, floats, None, strings are a CacheError naming `what`."""
  if type(value) is int:  # the common case, first: this runs per slot of a decode step
    return value
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
    raise CacheError(f"{what} must be an int, got {type(value).__name__} {value!r}")
  return int(value)


def check_salt(salt) -> int:
  """A salt (tenant id) is an int32; the same rule for both backends."""
  if isinstance(salt, (bool, np.bool_)) or not isinstance(salt, (int, np.integer)):
    raise CacheError(f"salt must be an int (a tenant id), got {type(salt).__name__}")
  if not -2**31 <= int(salt) < 2**31:
    raise CacheError(f"salt {salt} does not fit in int32")
  return int(salt)


class _Consumed:
  """Marks a cache whose arrays were handed to the cache an operation returned."""

  def __init__(self, op: str):
    self.op = op


_STATE = "_derived"  # the attribute holding a cache's derived state (or _Consumed)


class FreeBlocks:
  """Never-used and freed blocks, lowest id first: a heap below a high-water mark, every
  block at or above the mark free. A pool of any size costs nothing until it is used."""

  def __init__(self, num_blocks: int, free_mask: np.ndarray | None = None):
    self.num_blocks = num_blocks
    if free_mask is None:
      self.mark, self.heap = 0, []
    else:
      used = np.flatnonzero(~free_mask)
      self.mark = int(used[-1]) + 1 if used.size else 0
      self.heap = np.flatnonzero(free_mask[:self.mark]).tolist()  # sorted: a heap

  def __len__(self) -> int:
    return len(self.heap) + self.num_blocks - self.mark

  def take(self, n: int) -> np.ndarray:
    """The n lowest free ids, as an int64 array (the caller checked that there are n)."""
    k = min(n, len(self.heap))
    if k > 32 and 8 * k >= len(self.heap):  # many: sort once (a sorted list is a heap)
      self.heap.sort()
      out = np.array(self.heap[:k], np.int64)
      del self.heap[:k]
    else:
      out = np.fromiter((heapq.heappop(self.heap) for _ in range(k)), np.int64, k)
    if n > k:
      out = np.concatenate([out, np.arange(self.mark, self.mark + n - k, dtype=np.int64)])
      self.mark += n - k
    return out

  def put(self, blocks) -> None:
    blocks = list(blocks)
    if len(blocks) > 8 and len(blocks) * 4 > len(self.heap):
      self.heap += blocks
      heapq.heapify(self.heap)
    else:
      for b in blocks:
        heapq.heappush(self.heap, b)

  def copy(self) -> "FreeBlocks":
    out = FreeBlocks(self.num_blocks)
    out.mark, out.heap = self.mark, list(self.heap)
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
  POOL_FIELDS = ("pools",)  # the fields holding K/V (KVPools), not metadata

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

  @property
  def host_only(self) -> bool:
    """Built with `host_only=True`: bookkeeping without K/V storage (no model step)."""
    return self.pools.is_host_only

  @staticmethod
  def _base_arrays(layout: KVLayout, num_blocks: int, max_requests: int, max_seq_len: int,
                   host_only: bool = False):
    for name, value in (("num_blocks", num_blocks), ("max_requests", max_requests),
                        ("max_seq_len", max_seq_len)):
      if check_int(value, name) <= 0:
        raise CacheError("num_blocks, max_requests and max_seq_len must be positive, got "
                         f"{num_blocks}, {max_requests}, {max_seq_len}")
    if num_blocks >= 2**31:
      raise CacheError(f"num_blocks {num_blocks} does not fit the int32 block tables")
    mb = layout.blocks_for(max_seq_len)
    pools = (KVPools.host_only(layout, num_blocks) if host_only else
             KVPools.zeros(layout, num_blocks))
    return dict(
        pools=pools,
        block_tables=np.full((max_requests, mb), -1, np.int32),
        req_lens=np.zeros((max_requests,), np.int32),
        seq_lens=np.zeros((max_requests,), np.int32),
        active=np.zeros((max_requests,), bool),
        hit_tokens=np.zeros((), np.int32),
        query_tokens=np.zeros((), np.int32),
        max_seq_len=max_seq_len)

  # ------------------------------------------------------------- ownership
  def _build_state(self):
    """The derived state of this cache's arrays (see the module docstring)."""
    raise NotImplementedError

  def _copy_state(self, state):
    raise NotImplementedError

  def _check_live(self) -> None:
    state = self.__dict__.get(_STATE)
    if isinstance(state, _Consumed):
      raise CacheError(f"this cache was consumed by a later operation ({state.op}), which "
                       "took over its arrays; use the cache that operation returned, or "
                       "cache.copy() before it to keep a snapshot")

  def _begin(self) -> "PagedCache":
    """The cache an operation works on: this one, or (without derived state) one with
    private copies of the arrays and the state built from them."""
    self._check_live()
    if self.__dict__.get(_STATE) is not None:
      return self
    c = dataclasses.replace(self, **{name: np.array(v)
                                     for name, v in metadata_leaves(self).items()})
    object.__setattr__(c, _STATE, c._build_state())
    return c

  def _finish(self, c: "PagedCache", op: str, **changes) -> "PagedCache":
    """Hands `c`'s arrays and state to a new cache; this one (and `c`) are consumed."""
    new = object.__new__(type(c))  # `dataclasses.replace` without re-running __init__
    new.__dict__.update(c.__dict__)  # (no field is derived in __init__): O(fields), cheap
    for name, value in changes.items():
      object.__setattr__(new, name, value)
    object.__setattr__(new, _STATE, c.__dict__[_STATE])
    object.__setattr__(self, _STATE, _Consumed(op))
    if c is not self:
      object.__setattr__(c, _STATE, _Consumed(op))
    return new

  @property
  def _state(self):
    return self.__dict__[_STATE]

  def copy(self) -> "PagedCache":
    """An independent snapshot (metadata and pools copied: O(pool)); this cache stays valid."""
    self._check_live()
    pools = {name: p if p.is_host_only else jax.tree.map(jnp.copy, p)
             for name, p in pool_leaves(self).items()}
    new = dataclasses.replace(self, **pools, **{
        name: np.array(v) for name, v in metadata_leaves(self).items()})
    state = self.__dict__.get(_STATE)
    object.__setattr__(new, _STATE, None if state is None else self._copy_state(state))
    return new

  # ------------------------------------------------------------ validation
  def _check_slot(self, slot) -> int:
    slot = check_int(slot, "slot")
    if not (0 <= slot < self.max_requests) or not bool(self.active[slot]):
      raise CacheError(f"slot {slot} is not an active request")
    return slot

  def _check_prompt(self, tokens) -> np.ndarray:
    arr = np.asarray(tokens)
    if arr.ndim != 1:
      raise CacheError(f"a request's tokens must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
      raise CacheError("empty request: a request needs at least one token")
    return self._check_token_array(arr, f"request of {arr.size} tokens")

  def _check_token_array(self, arr: np.ndarray, what: str) -> np.ndarray:
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
      raise CacheError(f"token ids must be integers, got dtype {arr.dtype}")
    if arr.size > self.max_seq_len:
      raise CacheError(f"{what} is longer than max_seq_len ({self.max_seq_len})")
    if arr.size and arr.min() < 0:
      raise CacheError(f"negative token id {int(arr.min())}")
    if arr.size and arr.max() >= 2**31:  # stored as int32: a larger id would wrap onto another
      raise CacheError(f"token id {int(arr.max())} does not fit in int32")
    return arr.astype(np.int32, copy=False)  # read only: an int32 input is not copied

  def _check_append(self, slot, token) -> tuple[int, int]:
    """Validates a one-token extension; returns (slot, the request's current length)."""
    slot = self._check_slot(slot)
    n = int(self.req_lens[slot])
    if n >= self.max_seq_len:
      raise CacheError(f"slot {slot} is full: {n} tokens = max_seq_len")
    if isinstance(token, (bool, np.bool_)) or not isinstance(token, (int, np.integer)):
      raise CacheError(f"a token id must be an int, got {type(token).__name__}")
    if not 0 <= int(token) < 2**31:
      raise CacheError(f"token id {int(token)} is negative or does not fit in int32")
    return slot, n

  def _check_extend(self, slot, tokens) -> tuple[int, int, np.ndarray]:
    """Validates a many-token extension; returns (slot, current length, tokens)."""
    slot = self._check_slot(slot)
    arr = np.asarray(tokens)
    if arr.ndim != 1:
      raise CacheError(f"extend's tokens must be 1-D, got shape {arr.shape}")
    arr = self._check_token_array(arr, f"extension of {arr.size} tokens")
    n = int(self.req_lens[slot])
    if n + arr.size > self.max_seq_len:
      raise CacheError(f"slot {slot} holds {n} tokens: {arr.size} more exceed max_seq_len "
                       f"({self.max_seq_len})")
    return slot, n, arr

  def _free_slot(self, active: np.ndarray) -> int:
    free = np.flatnonzero(~active)
    if free.size == 0:
      raise CacheError(f"no free request slot: all {self.max_requests} are active; release one "
                       "or build the cache with a larger max_requests")
    return int(free[0])

  def _check_commits(self, slots, num_tokens) -> tuple[np.ndarray, np.ndarray]:
    """Validated (slots, num_tokens) of a commit, as int64 arrays (vectorized: a decode
    step commits every running request)."""
    slots = [check_int(s, "slot") for s in slots]
    num_tokens = [check_int(n, "num_tokens") for n in num_tokens]
    self._check_distinct(slots, len(num_tokens))
    s, n = np.asarray(slots, np.int64), np.asarray(num_tokens, np.int64)
    ok = (s >= 0) & (s < self.max_requests)
    ok[ok] = self.active[s[ok]]
    if not ok.all():
      self._check_slot(int(s[np.argmin(ok)]))  # raises, naming the slot
    seq, req = self.seq_lens[s], self.req_lens[s]
    bad = (n < seq) | (n > req)
    if bad.any():
      i = int(np.argmax(bad))
      raise CacheError(f"commit of {n[i]} tokens for slot {s[i]} outside "
                       f"[{seq[i]}, {req[i]}]")
    return s, n

  @staticmethod
  def _check_distinct(slots: list, count: int) -> None:
    if len(slots) != count:
      raise CacheError(f"{len(slots)} slots but {count} values")
    if len(set(slots)) != len(slots):
      raise CacheError(f"a slot appears twice in {slots}")

  # ------------------------------------------------------------ K/V writes
  def commit(self, slot: int, num_tokens: int):
    """Marks the K/V of the first `num_tokens` tokens of `slot` as written."""
    return self.commit_batch([slot], [num_tokens])

  def commit_batch(self, slots: Sequence[int], num_tokens: Sequence[int]):
    """`commit` for several slots at once (one decode step): all checked before any change."""
    self._check_live()
    slots, num_tokens = self._check_commits(slots, num_tokens)
    c = self._begin()
    c.seq_lens[slots] = num_tokens
    return self._finish(c, "commit")

  def append(self, slot: int, token: int):
    """Extends a request by one (decoded) token; its K/V is written by the next step."""
    return self.append_batch([slot], [token])

  def with_pools(self, pools: KVPools, *, host_pools: KVPools | None = None):
    """The cache with the K/V pools a model step wrote (this cache is consumed); an HQ
    cache's host tier's too, where a step (`tiers.run_copies`) wrote them."""
    self._check_live()
    if self.host_only:
      raise CacheError("this cache was built host_only (no K/V pools): it cannot run a "
                       "model step")
    changes = dict(pools=pools)
    if host_pools is not None:
      changes["host_pools"] = host_pools
    for name, new in changes.items():
      old = getattr(self, name)
      if (new.k.shape != old.k.shape or new.k.dtype != old.k.dtype
          or new.quantized != old.quantized):
        raise CacheError(f"{name} of shape {new.k.shape}/{new.k.dtype} do not fit a cache "
                         f"of {old.k.shape}/{old.k.dtype}")
    return self._finish(self._begin(), "with_pools", **changes)

  # ----------------------------------------------------------------- queries
  @property
  def held_blocks(self) -> int:
    """Blocks held by active requests, each physical block once."""
    self._check_live()
    state = self.__dict__.get(_STATE)
    if state is not None:
      return state.held
    return self._count_held()

  def _count_held(self) -> int:
    tables = np.asarray(self.block_tables)[np.asarray(self.active)]
    return int(np.unique(tables[tables >= 0]).size)

  # ------------------------------------------------------------------ reads
  def view(self, slots: Sequence[int], start: Sequence[int], chunk: int, *,
           pad_to: int | None = None) -> AttentionView:
    """`host_view` on the device, its arrays moved in one transfer call."""
    if self.host_only:
      raise CacheError("this cache was built host_only (no K/V pools): it cannot run a "
                       "model step")
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
    self._check_live()
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
    self._check_live()
    slot = self._check_slot(slot)
    if self.host_only:
      raise CacheError("this cache was built host_only: it holds no K/V to read")
    n = int(self.seq_lens[slot])
    table = jnp.maximum(self.block_tables[slot], 0)[None]
    read = lambda pool: None if pool is None else jax.vmap(
        lambda p: gather(p, table)[0, :n])(pool)
    if not self.pools.quantized:
      return read(self.pools.k), read(self.pools.v)
    return (dequantize(read(self.pools.k), read(self.pools.k_scale)),
            dequantize(read(self.pools.v), read(self.pools.v_scale)))

  def tokens_of(self, slot: int) -> int:
    self._check_live()
    return int(self.req_lens[slot])


def pool_leaves(cache: PagedCache) -> dict[str, KVPools]:
  """The cache's K/V pools by field name (`POOL_FIELDS`: the device's and, in HQ with a
  host tier, the host's; a field that is None holds none)."""
  return {name: getattr(cache, name) for name in cache.POOL_FIELDS
          if getattr(cache, name) is not None}


def metadata_leaves(cache: PagedCache) -> dict[str, jax.Array]:
  """Every array of the cache that is not K/V (what `metadata_bytes` counts)."""
  return {f.name: getattr(cache, f.name) for f in dataclasses.fields(cache)
          if not f.metadata.get("static") and f.name not in cache.POOL_FIELDS}
