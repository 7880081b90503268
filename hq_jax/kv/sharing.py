"""Sharing plans: which requests of a decode batch read the same physical K/V blocks.

The HQ cache stores a block shared by several requests once; its block tables show it as
the same physical id in several rows. For a decode batch (rows b = 0..B-1 of the view,
`tables [B, MB]`, `kv_lens [B]`) this module derives a trie over the block sequences:

  node = (requests R with |R| >= 2, logical blocks [start, end)) such that every request of
         R holds the same physical block at each logical block of the run, and every block
         of the run is full (below kv_len // block_size) for every request of R.

The root level groups requests by their first block; a node ends where its requests stop
agreeing (or one of them runs out of full blocks), and its children are the sub-groups that
still agree on the next block: a system prompt shared by all, then sub-prefixes shared by
some. Each request's keys are then its chain of nodes (root to deepest) followed by a
private remainder `[private_start, kv_len)` that the paged machinery reads as usual.

`build_plan` is host-side numpy (O(B * MB) per level; well under a millisecond for
B = 128 at 32k tokens). `SharingPlan` (pallas_kernels.dedup_attention, the kernel's input
format) holds the result as int32 arrays padded to power-of-two sizes, so jitted code sees
few distinct shapes. `SharingPlanner` caches the
plan until the shared part of the batch changes.

Tiling: the kernel processes a node's queries in tiles of `requests_per_tile` requests
(all G query heads of a kv head for each: rows = requests_per_tile * G); a tile is one
row of `tile_reqs`. `req_rows[b, d]` names where request b's partial for its d-th node
lands: flat row `tile * requests_per_tile + slot`, -1 for none.
"""

from __future__ import annotations

import dataclasses
import hashlib

import jax.numpy as jnp
import numpy as np

# The plan's array format is the kernel's input contract, defined beside the kernel.
from pallas_kernels.dedup_attention import SharingPlan


# Smallest private-length hint (tokens): one private split of the default tiles, so short
# remainders growing during decode share one compiled shape.
PRIVATE_HINT_MIN = 1024


def _pow2(n: int, minimum: int = 1) -> int:
  n = max(int(n), minimum)
  return 1 << (n - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class SharedNode:
  """One node of the trie: `requests` (batch rows) share logical blocks [start, end)."""

  requests: tuple[int, ...]
  start: int  # first logical block
  end: int  # one past the last logical block
  blocks: tuple[int, ...]  # physical blocks of the run (the same for every request)
  parent: int  # index of the parent node, -1 at the root level

  @property
  def num_blocks(self) -> int:
    return self.end - self.start


def find_shared_nodes(tables: np.ndarray, kv_lens: np.ndarray, block_size: int, *,
                      min_node_blocks: int = 1) -> tuple[list[SharedNode], np.ndarray]:
  """The trie of shared block runs, and each request's private start (in blocks).

  tables: [B, MB] physical blocks (-1 = none); kv_lens: [B] keys each request attends to.
  Only full blocks (logical block < kv_len // block_size) with a valid id can be shared.
  A run shorter than `min_node_blocks` is not made a node (nor is anything below it).
  """
  tables = np.asarray(tables, np.int64)
  kv_lens = np.asarray(kv_lens, np.int64)
  if tables.ndim != 2 or kv_lens.shape != tables.shape[:1]:
    raise ValueError(f"tables [B, MB] and kv_lens [B] expected, got {tables.shape} and "
                     f"{kv_lens.shape}")
  b, mb = tables.shape
  full = np.minimum(kv_lens // block_size, mb)  # [B] full blocks of each request
  # A request can share no block past its first invalid entry.
  invalid = np.where(tables < 0, np.arange(mb)[None], mb).min(axis=1) if mb else full
  full = np.minimum(full, invalid)
  private_start = np.zeros((b,), np.int64)
  nodes: list[SharedNode] = []

  def split(members: np.ndarray, at: int, parent: int) -> None:
    """Groups `members` (all sharing blocks < at) by their block at `at`; recurses."""
    live = members[full[members] > at]
    if live.size < 2:
      return
    ids = tables[live, at]
    order = np.argsort(ids, kind="stable")
    live, ids = live[order], ids[order]
    cuts = np.flatnonzero(np.diff(ids)) + 1
    for group in np.split(live, cuts):
      if group.size >= 2:
        grow(np.sort(group), at, parent)

  def grow(group: np.ndarray, start: int, parent: int) -> None:
    stop = int(full[group].min())
    run = tables[group, start:stop]  # [|R|, n] all full for every member
    agree = np.all(run == run[:1], axis=0)
    end = start + (int(np.argmin(agree)) if not agree.all() else run.shape[1])
    if end - start < min_node_blocks:
      return
    nodes.append(SharedNode(tuple(int(r) for r in group), start, end,
                            tuple(int(x) for x in tables[group[0], start:end]), parent))
    private_start[group] = end
    split(group, end, len(nodes) - 1)

  split(np.arange(b), 0, -1)
  return nodes, private_start.astype(np.int32)


@dataclasses.dataclass(frozen=True)
class PlanSummary:
  """Host-side numbers about a plan (what the engine's auto mode decides on)."""

  nodes: tuple[SharedNode, ...]
  total_tokens: int  # sum of kv_lens: K/V tokens the paged kernel reads per kv head
  saved_tokens: int  # tokens not re-read: sum over nodes of tokens * (requests - 1)

  @property
  def ideal_byte_ratio(self) -> float:
    """Paged bytes over dedup bytes: C (P + S) / (P + C S) for one shared prefix."""
    return self.total_tokens / max(self.total_tokens - self.saved_tokens, 1)

  @property
  def depth(self) -> int:
    depth = {}
    for i, n in enumerate(self.nodes):
      depth[i] = 1 + (depth[n.parent] if n.parent >= 0 else 0)
    return max(depth.values(), default=0)


def build_plan(tables, kv_lens, block_size: int, *, requests_per_tile: int,
               min_node_blocks: int = 1) -> tuple[SharingPlan, PlanSummary]:
  """The plan for one decode batch; sizes padded to powers of two (fewer recompiles).

  The private-length hint (a static field: it sets the private part's split count) is the
  longest private remainder rounded up to a power of two, at least PRIVATE_HINT_MIN tokens:
  a decode loop over a fixed batch recompiles only when a remainder crosses a power of two
  above that floor, not as each remainder grows.
  """
  if requests_per_tile < 1:
    raise ValueError(f"requests_per_tile must be >= 1, got {requests_per_tile}")
  tables = np.asarray(tables)
  kv_lens = np.asarray(kv_lens)
  nodes, private_blocks = find_shared_nodes(tables, kv_lens, block_size,
                                            min_node_blocks=min_node_blocks)
  b = tables.shape[0]
  rpt = requests_per_tile
  n_pad = _pow2(len(nodes))
  nb_pad = _pow2(max((n.num_blocks for n in nodes), default=1))
  node_tables = np.zeros((n_pad, nb_pad), np.int32)
  node_lens = np.zeros((n_pad,), np.int32)
  node_start = np.zeros((n_pad,), np.int32)
  tile_node, tile_reqs = [], []
  chains: list[list[int]] = [[] for _ in range(b)]
  for i, n in enumerate(nodes):
    node_tables[i, :n.num_blocks] = n.blocks
    node_lens[i] = n.num_blocks * block_size
    node_start[i] = n.start * block_size
    for j in range(0, len(n.requests), rpt):
      reqs = n.requests[j:j + rpt]
      for slot, r in enumerate(reqs):
        chains[r].append(len(tile_node) * rpt + slot)
      tile_node.append(i)
      tile_reqs.append(list(reqs) + [-1] * (rpt - len(reqs)))
  tl_pad = _pow2(len(tile_node))
  tile_node_a = np.zeros((tl_pad,), np.int32)
  tile_reqs_a = np.full((tl_pad, rpt), -1, np.int32)
  if tile_node:
    tile_node_a[:len(tile_node)] = tile_node
    tile_reqs_a[:len(tile_reqs)] = tile_reqs
  dep = _pow2(max((len(c) for c in chains), default=1))
  req_rows = np.full((b, dep), -1, np.int32)
  for r, c in enumerate(chains):
    req_rows[r, :len(c)] = c
  plan = SharingPlan(
      node_tables=jnp.asarray(node_tables), node_lens=jnp.asarray(node_lens),
      tile_node=jnp.asarray(tile_node_a), tile_reqs=jnp.asarray(tile_reqs_a),
      req_rows=jnp.asarray(req_rows),
      private_start=jnp.asarray(private_blocks * block_size, dtype=jnp.int32),
      node_start=jnp.asarray(node_start),
      requests_per_tile=rpt,
      private_tokens_hint=_pow2(int(np.max(kv_lens - private_blocks * block_size,
                                           initial=1)), PRIVATE_HINT_MIN),
      has_shared=bool(nodes))
  saved = sum(n.num_blocks * block_size * (len(n.requests) - 1) for n in nodes)
  summary = PlanSummary(tuple(nodes), int(np.sum(kv_lens)), int(saved))
  return plan, summary


class SharingPlanner:
  """Caches the plan until the shared part of the batch changes.

  The plan depends only on the full blocks of each request (a decode step adds keys to
  the private remainder, which the kernel reads up to the view's kv_lens), so the cache
  key is the tables masked to each request's full blocks. Recomputing the key is one pass
  over the tables; the trie is rebuilt only when a full block appears or the batch changes.
  """

  def __init__(self, block_size: int, *, requests_per_tile: int, min_node_blocks: int = 1):
    self.block_size, self.rpt, self.min_node_blocks = (block_size, requests_per_tile,
                                                       min_node_blocks)
    self._key: bytes | None = None
    self._value: tuple[SharingPlan, PlanSummary] | None = None
    self.builds = 0

  def plan(self, tables, kv_lens) -> tuple[SharingPlan, PlanSummary]:
    tables = np.asarray(tables, np.int32)
    full = np.asarray(kv_lens, np.int64) // self.block_size
    masked = np.where(np.arange(tables.shape[1])[None] < full[:, None], tables, -2)
    key = hashlib.blake2b(masked.tobytes() + str(masked.shape).encode(),
                          digest_size=16).digest()
    if key != self._key:
      self._value = build_plan(tables, kv_lens, self.block_size,
                               requests_per_tile=self.rpt,
                               min_node_blocks=self.min_node_blocks)
      self._key = key
      self.builds += 1
    return self._value
