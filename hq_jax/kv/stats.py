"""ONE accounting for both caches: the same code reads a dense or an HQ cache.

Everything is derived from the block tables and lengths, which both backends keep in
the same form, so the two can never be measured differently (the seed's mistake was
dense reporting a reservation and HQ reporting inserted bytes).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from hq_jax.kv.base import PagedCache, metadata_leaves


@dataclasses.dataclass(frozen=True)
class KVStats:
  kv_bytes_allocated: int  # blocks reserved by active requests (each physical block once)
  kv_bytes_used: int  # K/V actually held for active requests (each physical block once)
  physical_blocks: int  # distinct blocks holding >= 1 written token of an active request
  logical_blocks: int  # (request, logical block) pairs holding >= 1 written token
  reuse_factor: float  # logical / physical (1.0 when nothing is shared)
  metadata_bytes: int  # every cache array that is not K/V
  pool_bytes: int  # the whole preallocated K/V pool (FP8: scales included)
  hit_tokens: int  # prompt tokens found cached at admission (cumulative, as vLLM counts)
  query_tokens: int  # prompt tokens looked up at admission (cumulative)
  evicted_blocks: int  # cached blocks evicted to make room or by `evict` (cumulative; 0 dense)
  # The host tier (HQ with host_blocks > 0; 0 otherwise). hit_tokens = device + host hits.
  device_hit_tokens: int  # hit tokens found in device blocks (cumulative)
  host_hit_tokens: int  # hit tokens found in host blocks, copied back (cumulative)
  host_blocks: int  # slots of the host tier
  host_cached_blocks: int  # blocks it holds now
  host_pool_bytes: int  # its whole K/V pool (as pool_bytes)
  host_evicted_blocks: int  # host blocks dropped to make room (cumulative)
  bytes_to_host: int  # K/V moved device -> host (whole blocks, scales included; cumulative)
  bytes_to_device: int  # K/V moved host -> device (cumulative)
  bytes_per_token: int  # K/V of one token over all layers (FP8: scales included)
  bytes_per_block: int
  active_requests: int

  def asdict(self) -> dict:
    return dataclasses.asdict(self)


def kv_stats(cache: PagedCache) -> KVStats:
  cache._check_live()  # a consumed cache's arrays belong to its successor
  layout = cache.layout
  bs = layout.block_size
  active = np.asarray(cache.active)
  tables = np.asarray(cache.block_tables)[active]  # [A, MB]
  seq = np.asarray(cache.seq_lens)[active]  # [A]
  logical = np.arange(tables.shape[1])[None]
  fill = np.clip(seq[:, None] - logical * bs, 0, bs)  # written tokens per table entry
  held = tables >= 0
  allocated = np.unique(tables[held])
  holding = held & (fill > 0)
  # A shared block holds the same tokens for all its holders; count it once, at its fill.
  phys_fill = np.zeros(cache.num_blocks, np.int64)
  np.maximum.at(phys_fill, tables[holding], fill[holding])
  physical = int(np.count_nonzero(phys_fill))
  logical_blocks = int(np.count_nonzero(holding))
  host_blocks = getattr(cache, "host_blocks", 0)
  host_hits = int(getattr(cache, "host_hit_tokens", 0))
  meta = sum(int(np.asarray(x).nbytes) for x in metadata_leaves(cache).values())
  return KVStats(
      kv_bytes_allocated=int(allocated.size) * layout.bytes_per_block,
      kv_bytes_used=int(phys_fill.sum()) * layout.bytes_per_token,
      physical_blocks=physical,
      logical_blocks=logical_blocks,
      reuse_factor=logical_blocks / physical if physical else 1.0,
      metadata_bytes=meta,
      pool_bytes=cache.num_blocks * layout.bytes_per_block,  # K and V (also host-only)
      hit_tokens=int(cache.hit_tokens),
      query_tokens=int(cache.query_tokens),
      evicted_blocks=int(getattr(cache, "evicted_blocks", 0)),
      device_hit_tokens=int(cache.hit_tokens) - host_hits,
      host_hit_tokens=host_hits,
      host_blocks=host_blocks,
      host_cached_blocks=int(getattr(cache, "host_cached_blocks", 0)),
      host_pool_bytes=host_blocks * layout.bytes_per_block,
      host_evicted_blocks=int(getattr(cache, "host_evicted_blocks", 0)),
      bytes_to_host=int(getattr(cache, "blocks_to_host", 0)) * layout.bytes_per_block,
      bytes_to_device=int(getattr(cache, "blocks_to_device", 0)) * layout.bytes_per_block,
      bytes_per_token=layout.bytes_per_token,
      bytes_per_block=layout.bytes_per_block,
      active_requests=int(active.sum()))


def sum_stats(per_shard) -> KVStats:
  """The global accounting of data-parallel shards (one cache each): every byte, block,
  token and request summed (no block is shared across shards, so the sums are exact),
  the reuse factor recomputed from the summed blocks. All shards share one layout."""
  per_shard = list(per_shard)
  if not per_shard:
    raise ValueError("sum_stats needs at least one shard's stats")
  layouts = {(s.bytes_per_token, s.bytes_per_block) for s in per_shard}
  if len(layouts) != 1:
    raise ValueError(f"shards of different K/V layouts cannot be summed: {sorted(layouts)}")
  total = {f.name: sum(getattr(s, f.name) for s in per_shard)
           for f in dataclasses.fields(KVStats)}
  physical, logical = total["physical_blocks"], total["logical_blocks"]
  total.update(reuse_factor=logical / physical if physical else 1.0,
               bytes_per_token=per_shard[0].bytes_per_token,
               bytes_per_block=per_shard[0].bytes_per_block)
  return KVStats(**total)


def sharded_kv_stats(caches) -> tuple[list[KVStats], KVStats]:
  """(`kv_stats` of each data shard's cache, their `sum_stats`)."""
  per = [kv_stats(c) for c in caches]
  return per, sum_stats(per)
