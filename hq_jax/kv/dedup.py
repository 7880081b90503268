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
A block's generation is bumped on every allocation, so children registered under an
evicted parent can never be matched through the parent's new contents. A request's
partial last block is always private.

Blocks are registered only once their K/V is written (`commit`), so a hit always
points at computed K/V.
"""

from __future__ import annotations

import dataclasses
import hashlib

import jax
import numpy as np

from hq_jax.kv.base import CacheError, PagedCache, static_field
from hq_jax.kv.paged import KVLayout

_META_FIELDS = ("block_tables", "req_lens", "seq_lens", "active", "hit_tokens",
                "query_tokens", "salts", "refcount", "registered", "block_hash", "block_salt",
                "block_parent", "block_parent_gen", "block_gen", "block_tokens", "last_used",
                "clock")


def block_hash(salt: int, parent: int, parent_gen: int, tokens: np.ndarray, bits: int) -> int:
  """A `bits`-bit hash of a block's identity (0 bits: every block collides)."""
  if bits == 0:
    return 0
  data = np.asarray([salt, parent, parent_gen], np.int64).tobytes() + np.asarray(
      tokens, np.int32).tobytes()
  return int.from_bytes(hashlib.blake2b(data, digest_size=4).digest(), "little") & (
      (1 << bits) - 1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DedupKVCache(PagedCache):
  salts: np.ndarray  # [max_requests] int32 tenant id of each request
  refcount: np.ndarray  # [num_blocks] int32 block-table entries holding the block
  registered: np.ndarray  # [num_blocks] bool identity is set and findable
  block_hash: np.ndarray  # [num_blocks] uint32
  block_salt: np.ndarray  # [num_blocks] int32
  block_parent: np.ndarray  # [num_blocks] int32, -1 for a first block
  block_parent_gen: np.ndarray  # [num_blocks] int32 parent's generation at registration
  block_gen: np.ndarray  # [num_blocks] int32 bumped on every allocation
  block_tokens: np.ndarray  # [num_blocks, block_size] int32 token copies, -1 past the end
  last_used: np.ndarray  # [num_blocks] int32 LRU clock value of the last use
  clock: np.ndarray  # [] int32
  hash_bits: int = static_field(default=32)

  backend = "hq"

  @classmethod
  def init(cls, layout: KVLayout, *, num_blocks: int, max_requests: int, max_seq_len: int,
           hash_bits: int = 32) -> "DedupKVCache":
    if not 0 <= hash_bits <= 32:
      raise CacheError(f"hash_bits must be in [0, 32], got {hash_bits}")
    nb, bs = num_blocks, layout.block_size
    i32 = lambda *s, v=0: np.full(s, v, np.int32)
    return cls(
        **cls._base_arrays(layout, num_blocks, max_requests, max_seq_len),
        salts=i32(max_requests), refcount=i32(nb), registered=np.zeros((nb,), bool),
        block_hash=np.zeros((nb,), np.uint32), block_salt=i32(nb),
        block_parent=i32(nb, v=-1), block_parent_gen=i32(nb), block_gen=i32(nb),
        block_tokens=i32(nb, bs, v=-1), last_used=i32(nb), clock=np.zeros((), np.int32),
        hash_bits=hash_bits)

  # ------------------------------------------------------------ host planning
  def _meta(self, consume: bool = False) -> "_Meta":
    """Writable metadata: copies, or (consume) this cache's own arrays, for a caller that
    hands the cache over and never uses it again (the engine on a GPU, whose pools are
    donated anyway): a decode step then costs O(batch), not a copy of every array."""
    if consume:
      return _Meta(self, {name: getattr(self, name) for name in _META_FIELDS})
    return _Meta(self, {name: np.array(getattr(self, name)) for name in _META_FIELDS})

  def admit(self, tokens, salt: int = 0, *, reserve_tokens: int | None = None,
            keep_free: int = 0, consume: bool = False) -> tuple["DedupKVCache", int]:
    """Admits a prompt: references its longest cached chain of full blocks, allocates the rest.

    Returns (cache, slot). `reserve_tokens` is accepted for interface parity with the
    dense cache and ignored: HQ allocates a block when a token first needs it.
    `seq_lens[slot]` is the number of cached (hit) tokens: their K/V is already there; the
    caller computes and writes the rest, then `commit`s.
    `keep_free`: blocks that must stay allocatable afterwards (a server's running requests
    will need them), else "pool too small". `consume`: update this cache's arrays in place
    (see `_meta`): admission then costs O(prompt) plus a few vectorized scans, not a copy of
    every array. Everything is checked before anything changes, so on error the cache is
    unchanged either way.
    """
    del reserve_tokens
    if (isinstance(keep_free, bool) or not isinstance(keep_free, (int, np.integer))
        or keep_free < 0):
      raise CacheError(f"keep_free must be an int >= 0, got {keep_free!r}")
    prompt = self._check_prompt(tokens)
    salt = _check_salt(salt)
    a = {name: getattr(self, name) for name in _META_FIELDS}  # read only, until the checks pass
    slot = self._free_slot(a["active"])
    bs = self.block_size
    n_blocks = -(-prompt.size // bs)
    index = _Index(a, self.hash_bits)
    hits = []
    n_full = prompt.size // bs
    first = index.find(salt, -1, 0, prompt[:bs]) if n_full else None
    if first is not None:
      # Guessed continuations, verified in vectorized passes; then block by block.
      hits = _guessed_chain(a, first, prompt, salt, bs)
      for i in range(len(hits), n_full):
        parent = hits[-1]
        found = index.find(salt, parent, int(a["block_gen"][parent]),
                           prompt[i * bs:(i + 1) * bs])
        if found is None:
          break
        hits.append(found)
    need = n_blocks - len(hits)
    _check_room(a["refcount"], need, f"a request of {prompt.size} tokens", hits=hits,
                keep_free=keep_free)
    m = self._meta(consume)
    m.a["refcount"][hits] += 1
    new = m.allocate(need)
    for j, b in enumerate(new):
      chunk = prompt[(len(hits) + j) * bs:(len(hits) + j + 1) * bs]
      m.a["block_tokens"][b, :chunk.size] = chunk
      m.a["block_salt"][b] = salt
    m.touch(hits + new)
    m.a["block_tables"][slot, :n_blocks] = hits + new
    m.a["req_lens"][slot] = prompt.size
    m.a["seq_lens"][slot] = len(hits) * bs
    m.a["active"][slot] = True
    m.a["salts"][slot] = salt
    m.a["hit_tokens"] += len(hits) * bs
    m.a["query_tokens"] += prompt.size
    return m.build(), slot

  def commit_batch(self, slots, num_tokens, *, consume: bool = False) -> "DedupKVCache":
    """Marks K/V written and registers the blocks that became full (see `commit`).
    `consume`: update this cache's arrays in place (see `_meta`)."""
    old = {s: int(self.seq_lens[s]) for s in slots if 0 <= s < self.max_requests}
    cache = super().commit_batch(slots, num_tokens)
    bs = self.block_size
    grown = [(s, n) for s, n in zip(slots, num_tokens) if n // bs > old[s] // bs]
    if not grown:
      return cache
    m = cache._meta(consume)
    index = _Index(m.a, self.hash_bits)
    for slot, n in grown:
      m.register_full_blocks(index, slot, old[slot] // bs, n // bs, self.hash_bits)
    return m.build()

  def append(self, slot: int, token: int) -> "DedupKVCache":
    """Extends a request by one (decoded) token, allocating a private block when needed."""
    return self.append_batch([slot], [token])

  def append_batch(self, slots, tokens, *, consume: bool = False) -> "DedupKVCache":
    """`append` for a whole decode step with one copy of the metadata (none with
    `consume`: see `_meta`). Everything is checked before anything changes."""
    self._check_distinct(list(slots), len(tokens))
    lens = [self._check_append(s, t) for s, t in zip(slots, tokens)]
    bs = self.block_size
    need = sum(n % bs == 0 for n in lens)
    if need:
      _check_room(np.asarray(self.refcount), need, "this decode step")
    m = self._meta(consume)
    # One allocation for the step (one scan of the pool): the blocks, in the order one
    # allocation per slot would hand them out.
    fresh = iter(m.allocate(need) if need else ())
    for slot, token, n in zip(slots, tokens, lens):
      if n % bs == 0:
        b = next(fresh)
        m.a["block_salt"][b] = m.a["salts"][slot]
        m.a["block_tables"][slot, n // bs] = b
      b = int(m.a["block_tables"][slot, n // bs])
      m.a["block_tokens"][b, n % bs] = int(token)
      m.touch([b])
      m.a["req_lens"][slot] = n + 1
    return m.build()

  def release(self, slot: int, *, consume: bool = False) -> "DedupKVCache":
    """Drops the request's references. Registered blocks stay cached (LRU); private ones free.
    `consume`: update this cache's arrays in place (see `_meta`)."""
    self._check_slot(slot)
    m = self._meta(consume)
    n_blocks = -(-int(m.a["req_lens"][slot]) // self.block_size)
    blocks = [int(b) for b in m.a["block_tables"][slot, :n_blocks]]
    m.a["refcount"][blocks] -= 1
    # Tail blocks get the oldest timestamps, so eviction takes a chain from its end.
    m.touch(blocks[::-1])
    for b in blocks:
      if m.a["refcount"][b] == 0 and not m.a["registered"][b]:
        m.a["block_tokens"][b] = -1
    m.a["block_tables"][slot] = -1
    m.a["req_lens"][slot] = m.a["seq_lens"][slot] = 0
    m.a["active"][slot] = False
    m.a["salts"][slot] = 0
    return m.build()

  def evict(self, num_blocks: int | None = None) -> "DedupKVCache":
    """Evicts up to `num_blocks` (default: all) cached blocks, least recently used first."""
    m = self._meta()
    cached = m.cached_lru_order()
    m.unregister(cached if num_blocks is None else cached[:max(num_blocks, 0)])
    return m.build()

  # ------------------------------------------------------------------ queries
  def cached_free_blocks(self) -> int:
    """Registered blocks no request holds: reusable until evicted."""
    return int(np.sum(np.asarray(self.registered) & (np.asarray(self.refcount) == 0)))


def _guessed_chain(a: dict[str, np.ndarray], first: int, prompt: np.ndarray, salt: int,
                   bs: int) -> list[int]:
  """The prompt's hit chain from its verified first block `first`, as far as two cheap
  guesses reach: the table of the active request that starts with `first` and holds most
  blocks (requests being served with the same prefix), then consecutive block ids (a chain
  allocated in one run: `allocate` hands out free blocks in id order). Each guess is
  checked by `_verified_run` exactly as `_Index.find` checks a candidate, and no two
  registered blocks share an identity, so these are the blocks the walk would find; the
  walk goes on from the end. Returns at least [first]."""
  n_full = prompt.size // bs
  blocks = prompt[:n_full * bs].reshape(n_full, bs)
  chain = [first]
  rows = np.flatnonzero(a["active"] & (a["block_tables"][:, 0] == first))
  if rows.size:
    row = rows[np.argmax(a["req_lens"][rows])]
    n = min(n_full, -(-int(a["req_lens"][row]) // bs))
    chain += _verified_run(a, a["block_tables"][row, 1:n], first, blocks[1:n], salt)
  last, done = chain[-1], len(chain)
  n = min(n_full - done, a["registered"].size - 1 - last)
  if n > 0:
    chain += _verified_run(a, np.arange(last + 1, last + 1 + n), last,
                           blocks[done:done + n], salt)
  return chain


def _verified_run(a: dict[str, np.ndarray], guess, parent: int, blocks: np.ndarray,
                  salt: int) -> list[int]:
  """The leading blocks of `guess` [n] that continue a chain after the registered block
  `parent` with the tokens `blocks` [n, bs]: each registered, with this salt, its parent
  the block before it (and that block's current generation), its tokens equal. Vectorized."""
  guess = np.asarray(guess, np.int64)
  if guess.size == 0:
    return []
  safe = np.maximum(guess, 0)  # a -1 entry fails below; it only must not index badly
  parents = np.concatenate([[parent], guess[:-1]])
  ok = ((guess >= 0) & a["registered"][safe] & (a["block_salt"][safe] == salt)
        & (a["block_parent"][safe] == parents)
        & (a["block_parent_gen"][safe] == a["block_gen"][np.maximum(parents, 0)])
        & (a["block_tokens"][safe] == blocks).all(axis=1))
  n = guess.size if ok.all() else int(np.argmin(ok))
  return [int(b) for b in guess[:n]]


def _check_room(refcount: np.ndarray, need: int, what: str, *, hits=(),
                keep_free: int = 0) -> None:
  """Refuses, before any change, `need` new blocks (and `keep_free` left allocatable after)
  that the pool cannot supply: every block no request holds can be had (free, or cached and
  evicted), except `hits`, which the request is about to hold."""
  unheld = refcount == 0
  room = int(np.count_nonzero(unheld)) - int(np.count_nonzero(unheld[list(hits)]))
  if need + keep_free > room:
    kept = f" and {keep_free} kept free" if keep_free else ""
    raise CacheError(
        f"pool too small: {what} needs {need} new blocks{kept} but only {room} of "
        f"{unheld.size} can be had ({unheld.size - int(np.count_nonzero(unheld))} pinned by "
        "active requests)")


def _check_salt(salt) -> int:
  if isinstance(salt, bool) or not isinstance(salt, (int, np.integer)):
    raise CacheError(f"salt must be an int (a tenant id), got {type(salt).__name__}")
  if not -2**31 <= int(salt) < 2**31:
    raise CacheError(f"salt {salt} does not fit in int32")
  return int(salt)


class _Meta:
  """Writable numpy copies of a cache's metadata, for one host-side operation."""

  def __init__(self, cache: DedupKVCache, arrays: dict[str, np.ndarray]):
    self.cache, self.a = cache, arrays

  def build(self) -> DedupKVCache:
    return dataclasses.replace(self.cache, **self.a)

  def touch(self, blocks) -> None:
    """Marks `blocks` (distinct) used now, in order: the LRU clock ticks once per block."""
    blocks = np.asarray(blocks, np.int64)
    clock = int(self.a["clock"])
    self.a["last_used"][blocks] = clock + 1 + np.arange(blocks.size)
    self.a["clock"] = np.asarray(clock + blocks.size, np.asarray(self.a["clock"]).dtype)

  def cached_lru_order(self) -> np.ndarray:
    a = self.a
    cached = np.flatnonzero(a["registered"] & (a["refcount"] == 0))
    return cached[np.lexsort((cached, a["last_used"][cached]))]

  def register_full_blocks(self, index: "_Index", slot: int, first: int, end: int,
                           bits: int) -> None:
    """Registers logical blocks [first, end) of `slot` unless hit or already identical.

    A block can only have an identical registered twin if its parent could have other
    children: the root (-1), or a block registered before this call. A parent registered
    in this call, or one never registered (private to this request), has no other child
    with its current generation, so those blocks skip the lookup: committing a long
    prompt costs one lookup, not one per block."""
    a = self.a
    table, salt = a["block_tables"][slot], int(a["salts"][slot])
    registered_now = set()
    for i in range(first, end):
      b = int(table[i])
      if a["registered"][b]:
        continue  # A hit, or already registered.
      parent = int(table[i - 1]) if i else -1
      pgen = int(a["block_gen"][parent]) if parent >= 0 else 0
      toks = a["block_tokens"][b]
      may_have_twin = parent < 0 or (a["registered"][parent] and parent not in registered_now)
      if may_have_twin and index.find(salt, parent, pgen, toks) is not None:
        continue  # An identical block was registered meanwhile: this copy stays private.
      h = block_hash(salt, parent, pgen, toks, bits)
      a["registered"][b] = True
      a["block_hash"][b] = h
      a["block_salt"][b] = salt
      a["block_parent"][b] = parent
      a["block_parent_gen"][b] = pgen
      index.add(h, b)
      registered_now.add(b)

  def unregister(self, blocks) -> None:
    a = self.a
    a["registered"][blocks] = False
    a["block_hash"][blocks] = 0
    a["block_parent"][blocks] = -1
    a["block_parent_gen"][blocks] = 0
    a["block_tokens"][blocks] = -1

  def allocate(self, need: int) -> list[int]:
    """Takes `need` blocks: never-registered free ones first, then evicts cached LRU ones.
    The caller has checked, before any change, that the pool has them (`_check_room`)."""
    a = self.a
    free = np.flatnonzero(~a["registered"] & (a["refcount"] == 0))
    # The LRU order (a sort over cached blocks) only when free blocks do not suffice.
    cached = self.cached_lru_order() if free.size < need else np.zeros((0,), np.int64)
    assert free.size + cached.size >= need, "allocate without _check_room"
    taken = list(free[:need]) + list(cached[:max(0, need - free.size)])
    taken = [int(b) for b in taken]
    self.unregister(taken)
    a["refcount"][taken] = 1
    a["block_gen"][taken] += 1
    return taken


class _Index:
  """Hash -> registered blocks, derived from the cache arrays (never stored separately).

  A few lookups (a decode step registering the blocks it filled) scan the hash column
  (O(num_blocks), vectorized); many (admitting a long prompt) first bucket the registered
  blocks by the hash's low 16 bits, once (a radix argsort, O(num_blocks)), then look in one
  bucket. Either way a candidate is verified against the current arrays, and no two
  registered blocks share an identity, so both find the same block.
  """

  # Measured on the 2-core CPU box at 162,760 blocks: a scan 0.03 ms, bucketing 3 ms (a
  # comparison argsort of the hashes, the index before, 11 ms).
  _SCANS_BEFORE_INDEX = 32  # about a third of the build in scans, then build
  _BUCKET_BITS = 16

  def __init__(self, a: dict[str, np.ndarray], bits: int):
    self.a, self.bits = a, bits
    self.ids = self.starts = None  # the bucket index, built on demand
    self.scans = 0
    self.added: dict[int, list[int]] = {}  # registered after the index was built

  def _build(self) -> None:
    a = self.a
    ids = np.flatnonzero(a["registered"])
    buckets = (a["block_hash"][ids] & np.uint32((1 << self._BUCKET_BITS) - 1)).astype(np.uint16)
    self.ids = ids[np.argsort(buckets, kind="stable")]  # a radix sort for 16-bit keys
    self.starts = np.zeros((1 << self._BUCKET_BITS) + 1, np.int64)
    np.cumsum(np.bincount(buckets, minlength=1 << self._BUCKET_BITS), out=self.starts[1:])

  def add(self, h: int, block: int) -> None:
    if self.ids is not None:
      self.added.setdefault(int(h), []).append(block)

  def find(self, salt: int, parent: int, parent_gen: int, tokens: np.ndarray) -> int | None:
    a = self.a
    h = np.uint32(block_hash(salt, parent, parent_gen, tokens, self.bits))  # the column's
    # dtype: a Python int would make numpy convert the whole column on every comparison.
    if self.ids is None and self.scans < self._SCANS_BEFORE_INDEX:
      self.scans += 1
      candidates = np.flatnonzero((a["block_hash"] == h) & a["registered"])
    else:
      if self.ids is None:
        self._build()
      bucket = int(h) & ((1 << self._BUCKET_BITS) - 1)
      in_bucket = self.ids[self.starts[bucket]:self.starts[bucket + 1]]
      candidates = list(in_bucket[a["block_hash"][in_bucket] == h]) + self.added.get(int(h), [])
    for b in candidates:
      # Verify: a hash match alone is never trusted. (`_verified_run` is the same test,
      # vectorized over a guessed run; one scalar candidate is faster checked like this.)
      if (a["registered"][b] and a["block_salt"][b] == salt and a["block_parent"][b] == parent
          and a["block_parent_gen"][b] == parent_gen
          and np.array_equal(a["block_tokens"][b], tokens)):
        return int(b)
    return None
