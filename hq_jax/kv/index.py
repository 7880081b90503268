"""The HQ cache's derived state: what makes its lookups and allocation O(1) per block.

`DedupKVCache` (`hq_jax.kv.dedup`) keeps its state in numpy arrays (the pytree: what a
checkpoint saves). Built from them, lazily and again after a restore:
- the chain keys (`block_keys` of `prefix_sums`: one 32-bit key per block, a hash of the
  salt and every token up to the block's end; the key narrows the search only, a hit is
  verified against the block's salt, parent, parent's generation and tokens);
- `BlockIndex`: a hash table of the registered blocks (bucketed, with a spill map), the
  free blocks, the cached (refcount-0) blocks in LRU order, and counters;
- `HostIndex`: the host tier's slots by generation, its LRU order and free slots.
Nothing here is state of its own: dropping it and building it again from the arrays gives
the same answers (a Hypothesis test drives both).
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING

import numpy as np

from hq_jax.kv.base import FreeBlocks

if TYPE_CHECKING:  # the cache whose arrays these structures are built from
  from hq_jax.kv.dedup import DedupKVCache

_M32 = (1 << 32) - 1
_U = np.uint64
_K_SALT, _K_MIX = _U(0x9E3779B97F4A7C15), _U(0xD6E8FEB86659FD93)
_position_mult = np.zeros((0,), np.uint64)  # grown on demand, a pure function of position


def _multipliers(n: int) -> np.ndarray:
  """Odd 64-bit multipliers of token positions 0..n-1 (splitmix64 of the position: the
  same in every process, so the stored hashes of a checkpoint stay valid)."""
  global _position_mult
  if _position_mult.size < n:
    with np.errstate(over="ignore"):
      z = (np.arange(max(n, 2 * _position_mult.size), dtype=np.uint64) + _U(1)) * _K_SALT
      z = (z ^ (z >> _U(30))) * _U(0xBF58476D1CE4E5B9)
      z = (z ^ (z >> _U(27))) * _U(0x94D049BB133111EB)
      _position_mult = (z ^ (z >> _U(31))) | _U(1)
  return _position_mult[:n]


def prefix_sums(blocks: np.ndarray, first: int = 0, before=0) -> np.ndarray:
  """Running token sums (weighted by position) to the end of each of `blocks` [n, bs],
  the consecutive full blocks from logical block `first`; `before`: the sum before it."""
  n, bs = blocks.shape
  # Array arithmetic wraps modulo 2**64 without a warning (only numpy scalars warn), so
  # no errstate here: it costs more than the arithmetic on a short run.
  weights = _multipliers((first + n) * bs)[first * bs:].reshape(n, bs)
  sums = np.einsum("ij,ij->i", blocks.astype(np.uint64), weights)  # no [n, bs] temporary
  sums[:1] += _U(before)
  return np.cumsum(sums, dtype=np.uint64)


def block_keys(prefix_sums: np.ndarray, salt: int, bits: int) -> np.ndarray:
  x = prefix_sums ^ _U((salt & _M32) * int(_K_SALT) % 2**64)  # the scalar product in ints
  x = (x ^ (x >> _U(31))) * _K_MIX
  x = x ^ (x >> _U(29))
  return (x >> _U(32)) & _U((1 << bits) - 1)


def _any4(flags: np.ndarray) -> np.ndarray:
  """flags [n, 4] bool (contiguous) -> [n] uint32, nonzero where a row has a True: a
  row's 4 bytes read as one word (a reduction along a short axis costs far more)."""
  return np.ascontiguousarray(flags).view(np.uint32)[:, 0]


def rows_equal(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """[n, k] == [n, k] row by row, as words of 8 bytes where k allows (see `_any4`)."""
  eq = np.ascontiguousarray(a == b)
  if eq.shape[1] % 8:
    return eq.all(axis=1)
  words = eq.view(np.uint64)
  out = words[:, 0] == 0x0101010101010101
  for i in range(1, words.shape[1]):
    out &= words[:, i] == 0x0101010101010101
  return out


class BlockIndex:
  """Derived from the block arrays (see `base`): never the truth, always rebuildable.

  table: the hash index, a table of buckets of 4: bucket `hash & mask` holds
         `hash << 32 | block + 1` in one of its entries (0: none), and
  spill: hash -> the registered blocks whose bucket was full, `spilled[bucket]` of them.
         Every registered block is in exactly one of the two, and only registered blocks
         are: a whole prompt's keys are probed in numpy (a bucket is one cache line), and
         the Python map only where `spilled` says. Every candidate is verified before use.
  lru:   cached blocks in LRU order, as `last_used << 32 | block` int64 arrays from
         `lru[0][head]` on (`queued` entries; runs are sliced out and tested at once); an entry
         is live iff its block is still cached with that `last_used` (stale entries are
         skipped, and the queue compacted when most of it is stale).
  free:  never-registered free blocks, lowest id first.
  held, cached: blocks with refcount > 0; registered blocks with refcount 0.
  sums:  slot -> (full blocks k, `prefix_sums` to the end of block k - 1) of an active
         request's tokens, so registering its next block hashes that block alone.
  """

  def __init__(self, num_blocks: int):
    # Sparse (a quarter full or less, up to a cap): a bucket seldom fills. Zeros cost no
    # memory until touched.
    buckets = 1 << max(16, min(22, (num_blocks - 1).bit_length()))
    self.mask = buckets - 1
    self.table = np.zeros((buckets, 4), np.int64)
    self.spilled = np.zeros((buckets,), np.int32)
    self.spill: dict[int, list[int]] = {}
    self.entry = np.zeros((num_blocks,), np.int32)  # block -> its table entry + 1, 0: spilled
    self.lru: collections.deque[np.ndarray] = collections.deque()
    self.head = self.queued = 0
    self.free = FreeBlocks(num_blocks)
    self.held = self.cached = 0
    self.sums: dict[int, tuple[int, int]] = {}
    self.host: HostIndex | None = None  # set by the cache (a host index has none)

  @classmethod
  def build(cls, c: "DedupKVCache") -> "BlockIndex":
    st = cls(c.num_blocks)
    reg, unheld = c.registered, c.refcount == 0
    ids = np.flatnonzero(reg)
    st.add(c.block_hash[ids].astype(np.int64), ids)
    cached = np.flatnonzero(reg & unheld)
    cached = cached[np.argsort(c.last_used[cached], kind="stable")]  # ties: lower id first
    st.push_cached(c, cached)
    st.free = FreeBlocks(c.num_blocks, ~reg & unheld)
    st.held = int(np.count_nonzero(~unheld))
    st.host = HostIndex.build(c)
    return st

  def copy(self) -> "BlockIndex":
    out = BlockIndex(self.free.num_blocks)
    out.table, out.spilled, out.entry = self.table.copy(), self.spilled.copy(), self.entry.copy()
    out.spill = {h: list(v) for h, v in self.spill.items()}
    out.lru = collections.deque([self.lru[0][self.head:], *list(self.lru)[1:]] if self.lru else [])
    out.queued, out.free = self.queued, self.free.copy()
    out.held, out.cached, out.sums = self.held, self.cached, dict(self.sums)
    out.host = self.host.copy() if self.host is not None else None
    return out

  def probe(self, keys: np.ndarray):
    """(the table's block with each key, -1 if none; whether there may be more: the
    bucket spilled, or holds the key twice)."""
    keys = keys.astype(np.int64, copy=False)
    buckets = (keys & self.mask).astype(np.intp)
    rows = self.table[buckets]  # [n, 4]
    match = (((rows >> 32) & _M32) == keys[:, None]) & (rows != 0)  # (the sign bit: & _M32)
    word = _any4(match)  # one byte per entry: two bytes set is the key twice
    one = (rows[np.arange(keys.size), match.argmax(axis=1)] & _M32) - 1
    one[word == 0] = -1
    return one, ((word & (word - np.uint32(1))) != 0) | (self.spilled[buckets] > 0)

  def candidates(self, key: int) -> list[int]:
    row = self.table[key & self.mask].tolist()
    return [(e & _M32) - 1 for e in row if e and (e >> 32) & _M32 == key] + self.spill.get(key, [])

  def add(self, keys: np.ndarray, blocks: np.ndarray) -> None:
    """Indexes registered `blocks` (int64) under `keys` (int64)."""
    buckets = (keys & self.mask).astype(np.intp)
    todo, spill = np.arange(keys.size), []
    entries = (keys << 32) | (blocks + 1)
    for _ in range(4):  # a bucket twice in the run: its last write holds, the others retry
      empty = self.table[buckets[todo]] == 0
      room = _any4(empty) != 0
      if not room.all():
        spill += todo[~room].tolist()
        todo, empty = todo[room], empty[room]
      if not todo.size:
        break
      col = empty.argmax(axis=1)
      self.table[buckets[todo], col] = entries[todo]
      held = self.table[buckets[todo], col] == entries[todo]
      self.entry[blocks[todo[held]]] = 4 * buckets[todo[held]] + col[held] + 1
      todo = todo[~held]
      if not todo.size:
        break
    for j in spill + todo.tolist():
      self.entry[blocks[j]] = 0
      self.spill.setdefault(int(keys[j]), []).append(int(blocks[j]))
      self.spilled[buckets[j]] += 1

  def remove(self, keys: np.ndarray, blocks: np.ndarray) -> None:
    """Drops registered `blocks` (int64) indexed under `keys` (int64)."""
    at = self.entry[blocks]
    mine = at > 0
    self.table.reshape(-1)[at[mine] - 1] = 0
    for j in np.flatnonzero(~mine).tolist():
      key = int(keys[j])
      spill = self.spill[key]
      spill.remove(int(blocks[j]))
      if not spill:
        del self.spill[key]
      self.spilled[key & self.mask] -= 1

  def push_cached(self, c: "DedupKVCache", blocks: np.ndarray) -> None:
    """`blocks` just became cached, in increasing `last_used` order."""
    self.lru.append((c.last_used[blocks].astype(np.int64) << 32) | blocks)
    self.queued += blocks.size
    self.cached += blocks.size
    if self.queued > 2 * self.cached + 1024:  # mostly stale: compact, O(len) amortized
      entries = np.concatenate([self.lru[0][self.head:], *list(self.lru)[1:]])
      entries = entries[self._live(c, entries)]
      self.lru, self.head, self.queued = collections.deque([entries]), 0, entries.size

  @staticmethod
  def _live(c: "DedupKVCache", entries: np.ndarray) -> np.ndarray:
    b = entries & _M32
    return c.registered[b] & (c.refcount[b] == 0) & (c.last_used[b] == (entries >> 32))

  def pop_lru(self, c: "DedupKVCache", n: int) -> np.ndarray:
    """The n least recently used cached blocks (the caller checked there are n), as an
    int64 array; queue entries are tested for liveness in vectorized runs."""
    out, got = [], 0
    while got < n:
      chunk = self.lru[0]
      entries = chunk[self.head:self.head + max(2 * (n - got), 64)]
      live = np.flatnonzero(self._live(c, entries))
      if live.size >= n - got:
        live = live[:n - got]
        step = int(live[-1]) + 1  # what follows the last taken stays queued
      else:
        step = entries.size
      self.head += step
      self.queued -= step
      if self.head == chunk.size:
        self.lru.popleft()
        self.head = 0
      out.append(entries[live] & _M32)
      got += live.size
    return np.concatenate(out) if out else np.zeros(0, np.int64)


class HostIndex:
  """Derived from the host tier's arrays, as `BlockIndex` from the device's.

  index: the registered host slots by key (a `BlockIndex` hash table of H slots: its
         `add` / `remove` / `candidates`; each candidate is verified before use);
  slot_of_gen: generation -> its host slot, -1 if none (a generation is on the host at
         most once; grown with the generations);
  lru:   registered host slots, least recently used first (`host_last_used` order);
  free:  unregistered host slots, lowest first;
  loads: device block -> the host slot with a pending copy into it (the slot is pinned);
  stores: host slots with a pending copy from the device.
  """

  def __init__(self, host_blocks: int):
    self.index = BlockIndex(max(host_blocks, 1))
    self.slot_of_gen = np.full((1024,), -1, np.int32)
    self.lru: collections.OrderedDict[int, None] = collections.OrderedDict()
    self.free = FreeBlocks(host_blocks)
    self.loads: dict[int, int] = {}
    self.stores: set[int] = set()

  @classmethod
  def build(cls, c: "DedupKVCache") -> "HostIndex":
    hb = cls(c.host_blocks)
    if not c.host_blocks:
      return hb
    reg = np.flatnonzero(c.host_registered)
    hb.index.add(c.host_hash[reg].astype(np.int64), reg.astype(np.int64))
    hb.set_gens(c.host_gen[reg], reg)
    order = reg[np.argsort(c.host_last_used[reg], kind="stable")]
    hb.lru = collections.OrderedDict.fromkeys(order.tolist())
    hb.free = FreeBlocks(c.host_blocks, ~c.host_registered)
    loads = np.flatnonzero(c.host_load >= 0)
    hb.loads = dict(zip(c.host_load[loads].tolist(), loads.tolist()))
    hb.stores = set(np.flatnonzero(c.host_store >= 0).tolist())
    return hb

  def copy(self) -> "HostIndex":
    out = HostIndex(0)
    out.index, out.slot_of_gen = self.index.copy(), self.slot_of_gen.copy()
    out.lru, out.free = self.lru.copy(), self.free.copy()
    out.loads, out.stores = dict(self.loads), set(self.stores)
    return out

  def slots_of(self, gens: np.ndarray) -> np.ndarray:
    """The host slot holding each generation, -1 where none."""
    gens = np.asarray(gens, np.int64)
    inside = gens < self.slot_of_gen.size
    out = np.full(gens.shape, -1, np.int32)
    out[inside] = self.slot_of_gen[gens[inside]]
    return out

  def set_gens(self, gens: np.ndarray, slots) -> None:
    gens = np.asarray(gens, np.int64)
    if gens.size and gens.max() >= self.slot_of_gen.size:
      grown = np.full((max(2 * self.slot_of_gen.size, int(gens.max()) + 1),), -1, np.int32)
      grown[:self.slot_of_gen.size] = self.slot_of_gen
      self.slot_of_gen = grown
    self.slot_of_gen[gens] = slots
