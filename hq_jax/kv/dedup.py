"""The HQ cache: deduplicated 16-token blocks with chained, verified identity.

A full block's identity is (salt, parent block, parent's generation, its tokens).
The parent is a physical block whose own identity was verified the same way, so two
requests reach the same physical block only if their salt and *all* tokens up to the
end of that block are equal. The hash only narrows the search: every candidate's
salt, parent and tokens are compared before a hit is taken, so a hash collision can
never reuse the wrong K/V (`hash_bits` can be lowered to force collisions in tests).

Lifecycle of a physical block:
  free (unregistered) -> private (refcount 1, being written) -> registered on commit
  (findable, shareable; refcount = number of block-table entries holding it) ->
  cached (refcount 0, still findable, in LRU order by `last_used`) -> evicted
  (unregistered) when the pool needs space, or by `evict`.
A block gets a new generation on every allocation (`gen_clock`: never one used before), so
children registered under an evicted parent can never be matched through the parent's new
contents. A request's
partial last block is always private.

Blocks are registered only once their K/V is written (`commit`), so a hit always
points at computed K/V.

Allocation takes never-registered free blocks first (lowest id first), then evicts
cached blocks, least recently used first (`evicted_blocks` counts them). Every
operation costs O(blocks it touches): the arrays are the state, and what makes lookups
and allocation cheap is derived from them (`hq_jax.kv.index.BlockIndex`: a hash table of
the registered blocks, the free list, the cached blocks in LRU order, counters), as vLLM's
BlockPool keeps a hash map and a free queue beside its blocks.

Host tier (`host_blocks` > 0). An evicted block moves to a host pool of `host_blocks`
blocks instead of being dropped, its identity kept: tokens, salt, key, its generation and
its parent's. Generations are unique (`gen_clock` hands them out), so a host block's
parent is named by its generation alone, wherever the parent is: on the device, on the
host, or back on the device after a hit (a block brought back keeps its generation). The
host pool is LRU too (a move or a hit is a use) and drops its least recently used block
when full (`host_evicted_blocks`); a block is not moved when its identity is on the host
already, or when its chain cannot be found any more (its parent neither on the device nor
on the host). Admission walks the chain on the device first; where it goes on in host
blocks, it takes device blocks for them, registers them at once and records copies host
-> device (`host_load`), as eviction records copies device -> host (`host_store`): the
engine runs them before the next model step (`hq_jax.kv.tiers`). A host block with a
pending copy is not dropped. Hits count device and host tokens (`hit_tokens` both,
`host_hit_tokens` the host's, as SGLang's HiCache and vLLM's offloading connector do);
`blocks_to_host` / `blocks_to_device` count blocks moved (planned, in a host-only cache).
The host tier's derived state is `HostIndex`, rebuilt from its arrays as `BlockIndex` is.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from hq_jax.kv.base import (CacheError, PagedCache, PoolFull, check_int, check_salt,
                            static_field)
from hq_jax.kv import tiers
from hq_jax.kv.index import BlockIndex, HostIndex, block_keys, prefix_sums, rows_equal
from hq_jax.kv.paged import KVLayout, KVPools

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DedupKVCache(PagedCache):
  salts: np.ndarray  # [max_requests] int32 tenant id of each request
  refcount: np.ndarray  # [num_blocks] int32 block-table entries holding the block
  registered: np.ndarray  # [num_blocks] bool identity is set and findable
  block_hash: np.ndarray  # [num_blocks] uint32 `block_keys` key of a registered block
  block_salt: np.ndarray  # [num_blocks] int32
  block_parent: np.ndarray  # [num_blocks] int32, -1 for a first block
  block_parent_gen: np.ndarray  # [num_blocks] int32 parent's generation at registration
  block_gen: np.ndarray  # [num_blocks] int32 a new one on every allocation (unique)
  block_tokens: np.ndarray  # [num_blocks, block_size] int32 token copies, -1 past the end
  last_used: np.ndarray  # [num_blocks] int32 LRU clock value of the last use
  clock: np.ndarray  # [] int32
  evicted_blocks: np.ndarray  # [] int32 cached blocks evicted (cumulative, as hit_tokens)
  gen_clock: np.ndarray  # [] int32 the last generation handed out (each is used once)
  # The host tier: H = max(host_blocks, 1) slots. K/V as the device's (`hq_jax.kv.tiers`).
  host_pools: KVPools | None  # [layers, H, block_size, kv_heads, head_dim] (+ FP8 scales);
  #                            None without a host tier
  host_registered: np.ndarray  # [H] bool the slot holds a block's identity and K/V
  host_hash: np.ndarray  # [H] uint32 the block's key (its `block_hash` on the device)
  host_salt: np.ndarray  # [H] int32
  host_gen: np.ndarray  # [H] int32 the block's generation (its identity on any tier)
  host_parent_gen: np.ndarray  # [H] int32 its parent's generation, 0 for a first block
  host_tokens: np.ndarray  # [H, block_size] int32
  host_last_used: np.ndarray  # [H] int32 LRU clock value of the last move or hit
  host_store: np.ndarray  # [H] int32 device block to copy into the slot first, -1 none
  host_load: np.ndarray  # [H] int32 device block to copy the slot into first, -1 none
  host_hit_tokens: np.ndarray  # [] int32 hit tokens found in host blocks (cumulative)
  blocks_to_host: np.ndarray  # [] int32 blocks moved device -> host (cumulative)
  blocks_to_device: np.ndarray  # [] int32 blocks moved host -> device (cumulative)
  host_evicted_blocks: np.ndarray  # [] int32 host blocks dropped (cumulative)
  hash_bits: int = static_field(default=32)
  # Slots of the host tier (0: none; its arrays then keep one unused slot: orbax saves no
  # zero-size array, and a cache without a tier must still checkpoint).
  host_blocks: int = static_field(default=0)

  backend = "hq"
  POOL_FIELDS = ("pools", "host_pools")

  @classmethod
  def init(cls, layout: KVLayout, *, num_blocks: int, max_requests: int, max_seq_len: int,
           hash_bits: int = 32, host_only: bool = False, host_blocks: int = 0,
           host_memory: str = "auto") -> "DedupKVCache":
    """`host_only`: no K/V pools (bookkeeping only, e.g. a no-model replay).
    `host_blocks`: slots of the host tier (0: none); `host_memory`: where its pools live
    (`tiers.HOST_MEMORY_KINDS`: "auto" = pinned host memory where the backend has it)."""
    if check_int(hash_bits, "hash_bits") < 0 or hash_bits > 32:
      raise CacheError(f"hash_bits must be in [0, 32], got {hash_bits}")
    if check_int(host_blocks, "host_blocks") < 0 or host_blocks >= 2**31:
      raise CacheError(f"host_blocks must be in [0, 2**31), got {host_blocks}")
    base = cls._base_arrays(layout, num_blocks, max_requests, max_seq_len, host_only)
    nb, bs, nh = num_blocks, layout.block_size, max(host_blocks, 1)
    i32 = lambda *s, v=0: np.full(s, v, np.int32) if v else np.zeros(s, np.int32)  # lazy pages
    if host_only and host_blocks:
      host = KVPools.host_only(layout, host_blocks)
    elif host_blocks:
      try:
        host = tiers.host_pools(layout, host_blocks, host_memory)
      except ValueError as e:
        raise CacheError(str(e)) from None
    else:
      host = None  # no host tier (orbax saves no zero-size array)
    zero = lambda: np.zeros((), np.int32)
    cache = cls(
        **base,
        salts=i32(max_requests), refcount=i32(nb), registered=np.zeros((nb,), bool),
        block_hash=np.zeros((nb,), np.uint32), block_salt=i32(nb),
        block_parent=i32(nb, v=-1), block_parent_gen=i32(nb), block_gen=i32(nb),
        block_tokens=i32(nb, bs, v=-1), last_used=i32(nb), clock=np.zeros((), np.int32),
        evicted_blocks=zero(), gen_clock=zero(), host_pools=host,
        host_registered=np.zeros((nh,), bool), host_hash=np.zeros((nh,), np.uint32),
        host_salt=i32(nh), host_gen=i32(nh), host_parent_gen=i32(nh),
        host_tokens=i32(nh, bs, v=-1), host_last_used=i32(nh), host_store=i32(nh, v=-1),
        host_load=i32(nh, v=-1), host_hit_tokens=zero(), blocks_to_host=zero(),
        blocks_to_device=zero(), host_evicted_blocks=zero(), hash_bits=hash_bits,
        host_blocks=host_blocks)
    state = BlockIndex(nb)
    state.host = HostIndex(host_blocks)
    object.__setattr__(cache, "_derived", state)
    return cache

  def _build_state(self) -> BlockIndex:
    return BlockIndex.build(self)

  def _copy_state(self, state: BlockIndex) -> BlockIndex:
    return state.copy()

  # ------------------------------------------------------------ host planning
  def _touch(self, blocks) -> None:
    """Marks `blocks` (distinct) used now, in order: the LRU clock ticks once per block."""
    blocks = np.asarray(blocks, np.int64)
    clock = int(self.clock)
    self.last_used[blocks] = clock + 1 + np.arange(blocks.size)
    self.clock[...] = clock + blocks.size

  def _verify(self, b: int, salt: int, parent: int, parent_gen: int, tokens) -> bool:
    return bool(self.registered[b] and self.block_salt[b] == salt
                and self.block_parent[b] == parent and self.block_parent_gen[b] == parent_gen
                and np.array_equal(self.block_tokens[b], tokens))

  def _find(self, candidates, salt: int, parent: int, parent_gen: int, tokens) -> int | None:
    """The candidate of an index entry that verifies (no two registered blocks share an
    identity: at most one does)."""
    for b in candidates:
      if self._verify(b, salt, parent, parent_gen, tokens):
        return b
    return None

  def _lookup(self, blocks: np.ndarray, salt: int) -> list[int]:
    """The longest chain of registered blocks matching `blocks` [n, bs] under `salt`."""
    return self._lookup_sums(blocks, salt)[0]

  def _lookup_sums(self, blocks: np.ndarray, salt: int) -> tuple[list[int], int]:
    """(`_lookup`, the running `prefix_sums` value to the end of the last hit, 0 if none):
    committing the prompt then hashes only the blocks after its hits.

    A single candidate per key is taken on its key and the whole chain verified at the
    end in one vectorized pass (cut at its first failure: a single candidate that fails
    means no block matches there); several candidates (collisions, or stale children of
    an evicted parent) are verified one by one as they come. Either way only verified
    blocks are returned."""
    st, gen_of = self._state, self.block_gen.item
    hits, runs = [], []
    start, run, before = 0, 256, 0  # keys in growing runs: a prompt that misses early
    while start < len(blocks):     # hashes little of itself
      sums = prefix_sums(blocks[start:start + run], start, before)
      runs.append(sums)
      keys = block_keys(sums, salt, self.hash_bits)
      one, more = st.probe(keys)
      cut = np.flatnonzero((one < 0) & ~more)  # nothing under this key: the chain ends
      cut = int(cut[0]) if cut.size else keys.size
      done = 0
      for i in np.flatnonzero(more[:cut]).tolist():  # maybe several: verified one by one
        hits += one[done:i].tolist()
        parent = hits[-1] if hits else -1
        b = self._find(st.candidates(int(keys[i])), salt, parent,
                       gen_of(parent) if hits else 0, blocks[start + i])
        if b is None:
          done = cut = i
          break
        hits.append(b)
        done = i + 1
      hits += one[done:cut].tolist()
      if len(hits) < start + sums.size:
        break
      start, run, before = start + sums.size, 2 * run, int(sums[-1])
    if not hits:
      return hits, 0
    h = np.asarray(hits, np.int64)
    parents = np.concatenate([[-1], h[:-1]])
    ok = (self.registered[h] & (self.block_salt[h] == salt) & (self.block_parent[h] == parents)
          & (self.block_parent_gen[h] == np.where(parents >= 0, self.block_gen[np.maximum(parents, 0)], 0))
          & rows_equal(self.block_tokens[h], blocks[:h.size]))
    if not ok.all():
      hits = hits[:int(np.argmin(ok))]
    return hits, (int(np.concatenate(runs)[len(hits) - 1]) if hits else 0)

  def _check_room(self, need: int, what: str, *, hits=(), keep_free: int = 0) -> None:
    """Refuses, before any change, `need` new blocks (and `keep_free` left allocatable
    after) that the pool cannot supply: every block no request holds can be had (free, or
    cached and evicted), except `hits`, which the request is about to hold."""
    st = self._state
    hits = np.asarray(hits, np.int64)
    pinned = int(np.count_nonzero(self.refcount[hits] == 0)) if hits.size else 0
    room = self.num_blocks - st.held - pinned
    if need + keep_free > room:
      kept = f" and {keep_free} kept free" if keep_free else ""
      raise PoolFull(
          f"pool too small: {what} needs {need} new blocks{kept} but only {room} of "
          f"{self.num_blocks} can be had ({st.held} pinned by active requests)",
          need=need, available=room, what=what, keep_free=keep_free)

  def _allocate(self, need: int) -> np.ndarray:
    """Takes `need` blocks (an int64 array): never-registered free ones first (lowest id
    first), then evicts cached ones, least recently used first. The caller ran
    `_check_room`."""
    st = self._state
    taken = st.free.take(min(need, len(st.free)))
    if taken.size < need:
      taken = np.concatenate([taken, self._evict_lru(need - taken.size)])
    if taken.size:
      self.refcount[taken] = 1
      gen = int(self.gen_clock)
      self.block_gen[taken] = gen + 1 + np.arange(taken.size)
      self.gen_clock[...] = gen + taken.size
      st.held += need
    return taken

  def _evict_lru(self, n: int, *, to_host: bool = True) -> np.ndarray:
    """Evicts the `n` least recently used cached blocks (moved to the host tier first, if
    there is one and `to_host`); returns them, unregistered and counted."""
    st = self._state
    blocks = st.pop_lru(self, n)
    if self.host_blocks and to_host:
      self._to_host(blocks)
    self._unregister(blocks)
    st.cached -= blocks.size
    self.evicted_blocks[...] += blocks.size
    return blocks

  def _unregister(self, blocks: np.ndarray) -> None:
    loads = self._state.host.loads
    if loads:  # a block leaving before its copy ran: the copy is moot (its slot unpinned)
      for b in blocks.tolist():
        h = loads.pop(b, None)
        if h is not None:
          self.host_load[h] = -1
    self._state.remove(self.block_hash[blocks].astype(np.int64), blocks)
    self.registered[blocks] = False
    self.block_hash[blocks] = 0
    self.block_parent[blocks] = -1
    self.block_parent_gen[blocks] = 0
    self.block_tokens[blocks] = -1

  def _register_full_blocks(self, slot: int, first: int, end: int) -> None:
    """Registers logical blocks [first, end) of `slot` unless hit or already identical
    (a twin registered meanwhile: this copy then stays private)."""
    table, salt = self.block_tables[slot], int(self.salts[slot])
    ids = table[first:end]
    todo = np.flatnonzero(~self.registered[ids])
    if not todo.size:
      return
    st = self._state
    # The keys hash every token up to a block's end: the running sum of the request's
    # blocks, from where the last registration left it.
    k, before = st.sums.get(slot, (0, 0))
    if k > first:
      k, before = 0, 0
    sums = prefix_sums(self.block_tokens[table[k:end]], k, before)
    st.sums[slot] = (end, int(sums[-1]))
    keys = block_keys(sums[first - k:], salt, self.hash_bits)[todo]
    pos = first + todo  # logical positions of the blocks to register
    parents = np.where(pos > 0, table[np.maximum(pos - 1, 0)], -1).astype(np.int64)
    pgens = np.where(parents >= 0, self.block_gen[np.maximum(parents, 0)], 0)
    new = ids[todo].astype(np.int64)
    keys = keys.astype(np.int64)
    # A twin (an identical registered block: this copy then stays private) can only be a
    # block registered before this call (one of this call has another parent): verified
    # in bulk where the table has the key, one by one where the spill may.
    one, more = st.probe(keys)
    twin = np.zeros(new.size, bool)
    j = np.flatnonzero(one >= 0)
    if j.size:
      t = one[j]
      twin[j] = ((self.block_salt[t] == salt) & (self.block_parent[t] == parents[j])
                 & (self.block_parent_gen[t] == pgens[j])
                 & rows_equal(self.block_tokens[t], self.block_tokens[new[j]]))
    for j in np.flatnonzero(more & ~twin).tolist():
      twin[j] = self._find(st.candidates(int(keys[j])), salt, int(parents[j]),
                           int(pgens[j]), self.block_tokens[new[j]]) is not None
    if twin.any():
      keep = ~twin
      new, parents, pgens, keys = new[keep], parents[keep], pgens[keep], keys[keep]
    st.add(keys, new)
    self.registered[new] = True
    self.block_hash[new] = keys
    self.block_salt[new] = salt
    self.block_parent[new] = parents
    self.block_parent_gen[new] = pgens

  # ------------------------------------------------------------ host tier
  def _touch_host(self, slots: list[int]) -> None:
    """Marks host `slots` used now, in order (the same clock as the device's LRU)."""
    lru = self._state.host.lru
    clock = int(self.clock)
    self.host_last_used[slots] = clock + 1 + np.arange(len(slots))
    self.clock[...] = clock + len(slots)
    for h in slots:
      lru[h] = None
      lru.move_to_end(h)

  def _drop_host(self, n: int) -> list[int]:
    """Frees the n least recently used host slots that no pending copy pins (the caller
    checked there are n); returns them."""
    hb = self._state.host
    out, pinned = [], []
    while len(out) < n:
      h = hb.lru.popitem(last=False)[0]
      (pinned if self.host_load[h] >= 0 else out).append(h)
    for h in reversed(pinned):  # back at the front, in their order
      hb.lru[h] = None
      hb.lru.move_to_end(h, last=False)
    dropped = np.asarray(out, np.int64)
    hb.index.remove(self.host_hash[dropped].astype(np.int64), dropped)
    hb.set_gens(self.host_gen[dropped], -1)
    self.host_registered[out] = False
    self.host_evicted_blocks[...] += len(out)
    return out

  def _to_host(self, blocks: np.ndarray) -> None:
    """Moves evicted device `blocks` (registered, least recently used first; still
    registered here) to the host tier: those whose identity is not there already and whose
    chain can still be found. Only the most recent fit when the tier is short."""
    hb = self._state.host
    parents, pgens = self.block_parent[blocks], self.block_parent_gen[blocks]
    p = np.maximum(parents, 0)
    parent_here = (parents < 0) | (self.registered[p] & (self.block_gen[p] == pgens))
    gens = self.block_gen[blocks]
    keep = np.flatnonzero((hb.slots_of(gens) < 0) & (parent_here | (hb.slots_of(pgens) >= 0)))
    # One copy per identity (two device copies of one generation can be evicted together).
    _, first = np.unique(gens[keep][::-1], return_index=True)
    keep = np.sort(keep[::-1][first])
    room = self.host_blocks - len(hb.loads)  # pinned slots stay
    keep = keep[max(keep.size - room, 0):]
    if not keep.size:
      return
    src = blocks[keep]
    slots = hb.free.take(min(keep.size, len(hb.free))).tolist()
    if len(slots) < keep.size:
      slots += self._drop_host(keep.size - len(slots))
    self.host_registered[slots] = True
    self.host_hash[slots] = self.block_hash[src]
    self.host_salt[slots] = self.block_salt[src]
    self.host_gen[slots] = self.block_gen[src]
    self.host_parent_gen[slots] = self.block_parent_gen[src]
    self.host_tokens[slots] = self.block_tokens[src]
    new = np.asarray(slots, np.int64)
    hb.index.add(self.host_hash[new].astype(np.int64), new)
    hb.set_gens(self.host_gen[new], new)
    self._touch_host(slots)
    if not self.host_only:  # the K/V to copy (a host-only cache plans the moves only)
      self.host_store[slots] = src
      hb.stores.update(slots)
    self.blocks_to_host[...] += len(slots)

  def _lookup_host(self, blocks: np.ndarray, salt: int, hits: list[int],
                   before: int) -> tuple[list[int], int]:
    """Where the device chain `hits` ends, its continuation in host blocks: (host slots,
    the running `prefix_sums` value to the end of the last one). Each is verified (salt,
    parent's generation, tokens); a slot with a pending copy to the device is not taken
    (its block is on the device already)."""
    hb = self._state.host
    prev = int(self.block_gen[hits[-1]]) if hits else 0
    start, run, out, last = len(hits), 64, [], before

    def verified(c: np.ndarray, first_prev: int, rows: np.ndarray) -> np.ndarray:
      """Whether host slots `c` (a chain, -1 = none) verify one after the other."""
      cs = np.maximum(c, 0)
      prevs = np.r_[first_prev, self.host_gen[cs[:-1]]]
      return ((c >= 0) & (self.host_parent_gen[cs] == prevs) & (self.host_salt[cs] == salt)
              & (self.host_load[cs] < 0) & rows_equal(self.host_tokens[cs], rows))

    while start < len(blocks):
      sums = prefix_sums(blocks[start:start + run], start, last)
      keys = block_keys(sums, salt, self.hash_bits).astype(np.int64)
      one, more = hb.index.probe(keys)
      sum_before = lambda i: int(sums[i - 1]) if i else last
      j, ambiguous = 0, np.flatnonzero(more).tolist() + [sums.size]
      for stop in ambiguous:
        if stop > j:  # single candidates: verified as a chain, in one pass
          ok = verified(one[j:stop], prev, blocks[start + j:start + stop])
          k = int(np.argmin(ok)) if not ok.all() else ok.size
          out += one[j:j + k].tolist()
          if k < ok.size:
            return out, sum_before(j + k)
          prev = int(self.host_gen[one[stop - 1]])
        if stop == sums.size:
          break
        found = next((h for h in hb.index.candidates(int(keys[stop]))  # several
                      if verified(np.asarray([h]), prev, blocks[start + stop][None])[0]), None)
        if found is None:
          return out, sum_before(stop)
        out.append(found)
        prev, j = int(self.host_gen[found]), stop + 1
      start, run, last = start + sums.size, 2 * run, int(sums[-1])
    return out, last

  def _from_host(self, slot_hits: list[int], blocks: np.ndarray, parent: int, salt: int) -> None:
    """Registers device `blocks` (just allocated) as the host blocks `slot_hits` (the same
    identities, their generations kept), and records the copies into them."""
    hb = self._state.host
    parents = np.r_[parent, blocks[:-1]].astype(np.int64)
    self.registered[blocks] = True
    self.block_hash[blocks] = self.host_hash[slot_hits]
    self.block_salt[blocks] = salt
    self.block_parent[blocks] = parents
    self.block_parent_gen[blocks] = self.host_parent_gen[slot_hits]
    self.block_gen[blocks] = self.host_gen[slot_hits]
    self._state.add(self.host_hash[slot_hits].astype(np.int64), blocks)
    if not self.host_only:
      self.host_load[slot_hits] = blocks
      hb.loads.update(zip(blocks.tolist(), slot_hits))
    self.blocks_to_device[...] += len(slot_hits)

  @property
  def has_pending_copies(self) -> bool:
    """Copies between the tiers that must run before the next model step."""
    self._check_live()
    state = self.__dict__.get("_derived")
    if state is not None:
      return bool(state.host.loads or state.host.stores)
    return bool(np.any(self.host_load >= 0) or np.any(self.host_store >= 0))

  def take_copies(self) -> tuple["DedupKVCache", tiers.CopyPlan]:
    """(the cache with no copy pending, the copies to run before the next step: the
    caller runs them, `tiers.run_copies`)."""
    self._check_live()
    c = self._begin()
    hb = c._state.host
    stores = np.asarray(sorted(hb.stores), np.int64)
    loads = np.asarray(sorted(hb.loads), np.int64)
    plan = tiers.CopyPlan(
        store_src=c.host_store[stores].astype(np.int32), store_dst=stores.astype(np.int32),
        load_src=np.asarray([hb.loads[q] for q in loads.tolist()], np.int32),
        load_dst=loads.astype(np.int32))
    c.host_store[stores] = -1
    c.host_load[plan.load_src] = -1
    hb.stores, hb.loads = set(), {}
    return self._finish(c, "take_copies"), plan

  # ------------------------------------------------------------ operations
  def admit(self, tokens, salt: int = 0, *, keep_free: int = 0,
            then_extend=None) -> tuple["DedupKVCache", int]:
    """Admits a prompt: references its longest cached chain of full blocks, allocates the rest.

    Returns (cache, slot). `seq_lens[slot]` is the number of cached (hit) tokens: their
    K/V is already there; the caller computes and writes the rest, then `commit`s.
    `keep_free`: blocks that must stay allocatable afterwards (a server's running
    requests will need them), else `PoolFull`. Hit blocks are pinned before allocating.
    `then_extend`: tokens to `extend` the request by at once (the same cache as admit
    with `keep_free` + their blocks, then `extend`; checked whole before any change, one
    allocation and one registration: a no-model replay's request in one operation).
    """
    self._check_live()
    if (isinstance(keep_free, bool) or not isinstance(keep_free, (int, np.integer))
        or keep_free < 0):
      raise CacheError(f"keep_free must be an int >= 0, got {keep_free!r}")
    prompt = self._check_prompt(tokens)
    salt = check_salt(salt)
    slot = self._free_slot(self.active)
    more = None
    if then_extend is not None:
      more = np.asarray(then_extend)
      if more.ndim != 1:
        raise CacheError(f"extend's tokens must be 1-D, got shape {more.shape}")
      more = self._check_token_array(more, f"extension of {more.size} tokens")
      if prompt.size + more.size > self.max_seq_len:
        raise CacheError(f"a request of {prompt.size} tokens: {more.size} more exceed "
                         f"max_seq_len ({self.max_seq_len})")
    c = self._begin()
    bs = self.block_size
    n_full, n_blocks = prompt.size // bs, -(-prompt.size // bs)
    later = -(-(prompt.size + more.size) // bs) - n_blocks if more is not None else 0
    blocks = prompt[:n_full * bs].reshape(n_full, bs)
    hits, hit_sum = c._lookup_sums(blocks, salt) if n_full else ([], 0)
    host_hits = []
    if c.host_blocks and c._state.host.lru and len(hits) < n_full:
      host_hits, hit_sum = c._lookup_host(blocks, salt, hits, hit_sum)
    hits = np.asarray(hits, np.int64)
    need = n_blocks - hits.size  # host hits take device blocks too
    c._check_room(need, f"a request of {prompt.size} tokens", hits=hits,
                  keep_free=keep_free + later)
    # Everything checked: from here on the arrays change.
    if hits.size:
      newly = int(np.count_nonzero(c.refcount[hits] == 0))
      c.refcount[hits] += 1
      c._state.held += newly
      c._state.cached -= newly  # their LRU entries are stale now
    hb = c._state.host
    if host_hits:  # pinned first: the allocation's moves to the host must not drop them
      c.host_load[host_hits] = c.num_blocks
      hb.loads.update((-1 - i, h) for i, h in enumerate(host_hits))
    new = c._allocate(need + later)  # as two allocations: the prompt's blocks come first
    new, new_later = new[:need], new[need:]
    for i in range(len(host_hits)):
      del hb.loads[-1 - i]
    n_hit = hits.size
    if new.size:
      full = new[:n_full - n_hit]
      c.block_tokens[full] = blocks[n_hit:]
      if n_blocks > n_full:  # the partial last block: the rest stays -1
        tail = prompt[n_full * bs:]
        c.block_tokens[new[-1], :tail.size] = tail
      c.block_salt[new] = salt
    if host_hits:
      c.host_load[host_hits] = -1
      c._from_host(host_hits, new[:len(host_hits)], int(hits[-1]) if n_hit else -1, salt)
      c._touch_host(host_hits)
      c.host_hit_tokens[...] += len(host_hits) * bs
      n_hit += len(host_hits)
    table = np.concatenate([hits, new])
    c._touch(table)
    c.block_tables[slot, :n_blocks] = table
    c.req_lens[slot] = prompt.size
    c.seq_lens[slot] = n_hit * bs
    c.active[slot] = True
    c.salts[slot] = salt
    c._state.sums[slot] = (n_hit, hit_sum)  # the hits' running sum: commit goes on from it
    c.hit_tokens[...] += n_hit * bs
    c.query_tokens[...] += prompt.size
    if more is not None and more.size:
      c._append_committed(slot, prompt.size, more, new_later)
    return self._finish(c, "admit"), slot

  def cached_prefix_tokens(self, tokens, salt: int = 0) -> int:
    """Tokens of `tokens` an admission would find cached now (its longest verified chain of
    full blocks), without admitting: what a cache-aware router compares across shards."""
    self._check_live()
    prompt = self._check_prompt(tokens)
    n_full = prompt.size // self.block_size
    if not n_full:
      return 0
    blocks = prompt[:n_full * self.block_size].reshape(n_full, self.block_size)
    return len(self._begin()._lookup(blocks, check_salt(salt))) * self.block_size

  def commit_batch(self, slots, num_tokens) -> "DedupKVCache":
    """Marks K/V written and registers the blocks that became full (findable from now)."""
    self._check_live()
    slots, num_tokens = self._check_commits(slots, num_tokens)
    c = self._begin()
    bs = self.block_size
    old = c.seq_lens[slots] // bs
    c.seq_lens[slots] = num_tokens
    grown = np.flatnonzero(num_tokens // bs > old)
    for i in grown.tolist():  # in slot order
      c._register_full_blocks(int(slots[i]), int(old[i]), int(num_tokens[i]) // bs)
    return self._finish(c, "commit")

  def append_batch(self, slots, tokens) -> "DedupKVCache":
    """Extends each slot by one (decoded) token, allocating a private block where one is
    needed (one decode step). Everything is checked before anything changes."""
    self._check_live()
    self._check_distinct(list(slots), len(tokens))
    checked = [self._check_append(s, t) for s, t in zip(slots, tokens)]
    c = self._begin()
    bs = self.block_size
    slots = np.asarray([s for s, _ in checked], np.int64)
    lens = np.asarray([n for _, n in checked], np.int64)
    starts = lens % bs == 0
    need = int(np.count_nonzero(starts))
    if need:
      c._check_room(need, "this decode step")
      # The blocks, in the order one allocation per slot would hand them out.
      new = c._allocate(need)
      c.block_salt[new] = c.salts[slots[starts]]
      c.block_tables[slots[starts], lens[starts] // bs] = new
    blocks = c.block_tables[slots, lens // bs]
    c.block_tokens[blocks, lens % bs] = np.asarray([int(t) for t in tokens], np.int64)
    c._touch(blocks)  # distinct: a slot's last block is private
    c.req_lens[slots] = lens + 1
    return self._finish(c, "append")

  def extend(self, slot: int, tokens) -> "DedupKVCache":
    """Appends `tokens` to `slot` and commits them (their K/V counted as written): the
    same cache as `append` + `commit` token by token, in one call (vectorized)."""
    self._check_live()
    slot, n, arr = self._check_extend(slot, tokens)
    c = self._begin()
    if not arr.size:
      return self._finish(c, "extend")
    bs, end = self.block_size, n + arr.size
    first_new = -(-n // bs)
    need = -(-end // bs) - first_new
    c._check_room(need, f"extending slot {slot} by {arr.size} tokens")
    c._append_committed(slot, n, arr, c._allocate(need))
    return self._finish(c, "extend")

  def _append_committed(self, slot: int, n: int, arr: np.ndarray, new: np.ndarray) -> None:
    """`extend`'s changes: `new`, the blocks it needs, are allocated."""
    c, bs, end = self, self.block_size, n + arr.size
    if new.size:
      first_new = -(-n // bs)
      c.block_salt[new] = c.salts[slot]
      c.block_tables[slot, first_new:first_new + new.size] = new
    pos = np.arange(n, end)
    blocks = c.block_tables[slot, pos // bs]
    c.block_tokens[blocks, pos % bs] = arr
    # One tick per token, as one append per token: a block's last use is its last token.
    clock = int(c.clock)
    last = np.r_[pos[1:] // bs != pos[:-1] // bs, True]
    c.last_used[blocks[last]] = clock + 1 + np.flatnonzero(last)
    c.clock[...] = clock + arr.size
    c.req_lens[slot] = end
    old = int(c.seq_lens[slot])
    c.seq_lens[slot] = end
    if end // bs > old // bs:
      c._register_full_blocks(slot, old // bs, end // bs)

  def release(self, slot: int) -> "DedupKVCache":
    """Drops the request's references. Registered blocks stay cached (LRU); private ones free."""
    self._check_live()
    slot = self._check_slot(slot)
    c = self._begin()
    st = c._state
    n_blocks = -(-int(c.req_lens[slot]) // self.block_size)
    blocks = c.block_tables[slot, :n_blocks][::-1].astype(np.int64)
    c.refcount[blocks] -= 1
    # Tail blocks get the oldest timestamps, so eviction takes a chain from its end.
    c._touch(blocks)
    dropped = blocks[c.refcount[blocks] == 0]
    st.held -= dropped.size
    reg = c.registered[dropped]
    freed = dropped[~reg]
    c.block_tokens[freed] = -1
    st.free.put(freed.tolist())
    if reg.any():
      st.push_cached(c, dropped[reg])  # in touch order: increasing last_used
    c.block_tables[slot] = -1
    c.req_lens[slot] = c.seq_lens[slot] = 0
    c.active[slot] = False
    c.salts[slot] = 0
    st.sums.pop(slot, None)
    return self._finish(c, "release")

  def evict(self, num_blocks: int | None = None, *, to_host: bool = True) -> "DedupKVCache":
    """Evicts up to `num_blocks` (default: all) cached blocks, least recently used first
    (to the host tier, if there is one, unless `to_host` is False)."""
    self._check_live()
    if num_blocks is not None:
      num_blocks = max(check_int(num_blocks, "num_blocks"), 0)
    c = self._begin()
    st = c._state
    n = st.cached if num_blocks is None else min(num_blocks, st.cached)
    st.free.put(c._evict_lru(n, to_host=to_host).tolist())
    return self._finish(c, "evict")

  # ------------------------------------------------------------------ queries
  @property
  def cached_blocks(self) -> int:
    """Registered blocks no request holds: reusable until evicted."""
    self._check_live()
    state = self.__dict__.get("_derived")
    if state is not None:
      return state.cached
    return int(np.sum(np.asarray(self.registered) & (np.asarray(self.refcount) == 0)))

  def _count_held(self) -> int:
    return int(np.count_nonzero(np.asarray(self.refcount)))

  @property
  def host_cached_blocks(self) -> int:
    """Blocks the host tier holds."""
    self._check_live()
    return int(np.count_nonzero(np.asarray(self.host_registered)))

