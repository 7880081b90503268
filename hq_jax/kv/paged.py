"""The paged block layout shared by every cache, and the reference attention over it.

KV lives in a pool of physical blocks per layer, `[layers, num_blocks, block_size,
kv_heads, head_dim]`; a request's block table maps its logical block i to a physical
block. Dense and deduplicated caches differ only in how they fill block tables, so
the model, the writes and the attention below are shared by both.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from hq_jax.config import ModelConfig

if TYPE_CHECKING:
  from pallas_kernels.dedup_attention import SharingPlan


@dataclasses.dataclass(frozen=True)
class KVLayout:
  """Bytes of K/V per token and per block, for any config and dtype."""

  num_layers: int
  num_kv_heads: int
  head_dim: int
  block_size: int
  dtype: str

  def __post_init__(self):
    if self.block_size <= 0:
      raise ValueError(f"block_size must be positive, got {self.block_size}")

  @classmethod
  def from_config(cls, cfg: ModelConfig, block_size: int = 16, dtype: str | None = None):
    return cls(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, block_size, dtype or cfg.dtype)

  @property
  def bytes_per_token(self) -> int:
    """K and V of one token over all layers."""
    itemsize = np.dtype(jnp.dtype(self.dtype)).itemsize
    return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize

  @property
  def bytes_per_block(self) -> int:
    return self.block_size * self.bytes_per_token

  def blocks_for(self, num_tokens: int) -> int:
    return math.ceil(num_tokens / self.block_size)

  def pool_shape(self, num_blocks: int) -> tuple[int, ...]:
    return (self.num_layers, num_blocks, self.block_size, self.num_kv_heads, self.head_dim)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVPools:
  """The physical K/V blocks of all layers."""

  k: jax.Array  # [layers, num_blocks, block_size, kv_heads, head_dim]
  v: jax.Array  # [layers, num_blocks, block_size, kv_heads, head_dim]

  @classmethod
  def zeros(cls, layout: KVLayout, num_blocks: int) -> "KVPools":
    shape = layout.pool_shape(num_blocks)
    return cls(jnp.zeros(shape, layout.dtype), jnp.zeros(shape, layout.dtype))

  @classmethod
  def abstract(cls, cfg: ModelConfig, num_blocks: int, block_size: int) -> "KVPools":
    shape = KVLayout.from_config(cfg, block_size).pool_shape(num_blocks)
    s = jax.ShapeDtypeStruct(shape, cfg.jnp_dtype)
    return cls(s, s)

  @classmethod
  def host_only(cls, layout: KVLayout, num_blocks: int) -> "KVPools":
    """Shapes without storage, for a cache that only plans on the host (a no-model trace
    replay): its bookkeeping and accounting are a real cache's, at any pool size."""
    s = jax.ShapeDtypeStruct(layout.pool_shape(num_blocks), jnp.dtype(layout.dtype))
    return cls(s, s)

  @property
  def is_host_only(self) -> bool:
    return isinstance(self.k, jax.ShapeDtypeStruct)

  @property
  def num_blocks(self) -> int:
    return self.k.shape[1]

  @property
  def block_size(self) -> int:
    return self.k.shape[2]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionView:
  """What one forward step needs to know about the cache, for B requests x T tokens."""

  positions: jax.Array  # [B, T] int32 logical position of each query token
  block_tables: jax.Array  # [B, max_blocks] int32 physical block of each logical block
  write_slots: jax.Array  # [B, T] int32 flat pool slot (block * block_size + offset);
  #                         num_blocks * block_size (out of range) means "do not write".
  kv_lens: jax.Array  # [B] int32 tokens in the cache once this chunk is written
  # Optional: which requests of the batch share runs of blocks (hq_jax.kv.sharing), for
  # shared-prefix decode attention; None for every other attention function.
  sharing: "SharingPlan | None" = None

  @classmethod
  def abstract(cls, batch: int, chunk: int, max_blocks: int) -> "AttentionView":
    i = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)
    return cls(i(batch, chunk), i(batch, max_blocks), i(batch, chunk), i(batch))


def write_layer(pools: KVPools, layer, k: jax.Array, v: jax.Array,
                write_slots: jax.Array) -> KVPools:
  """Writes a chunk's K/V ([B, T, K, D]) into `layer` at flat slots; OOB slots are dropped."""
  nl, nb, bs, nk, d = pools.k.shape
  flat = lambda p: p.reshape(nl, nb * bs, nk, d)
  slots = write_slots.reshape(-1)
  new_k = flat(pools.k).at[layer, slots].set(k.reshape(-1, nk, d).astype(pools.k.dtype),
                                             mode="drop")
  new_v = flat(pools.v).at[layer, slots].set(v.reshape(-1, nk, d).astype(pools.v.dtype),
                                             mode="drop")
  return KVPools(new_k.reshape(pools.k.shape), new_v.reshape(pools.v.shape))


def gather(pool: jax.Array, block_tables: jax.Array) -> jax.Array:
  """[num_blocks, bs, K, D] pool, [B, MB] tables -> [B, MB * bs, K, D] in logical order."""
  b, mb = block_tables.shape
  _, bs, nk, d = pool.shape
  return pool[block_tables].reshape(b, mb * bs, nk, d)


def paged_attention_xla(q: jax.Array, k_pools: jax.Array, v_pools: jax.Array, layer,
                        view: AttentionView) -> jax.Array:
  """The model's XLA attention path: causal GQA through block tables, float32 softmax.

  k_pools, v_pools: all layers `[L, NB, bs, K, D]` (layer picks one, inside the gather: no
  copy of the layer) or one layer's `[NB, bs, K, D]` (layer ignored). Query t of request b
  attends to logical key positions <= positions[b, t] and < kv_lens[b]. Keys are gathered
  in logical block order over the full table width, so the reduction order depends only
  on logical positions: dense and deduplicated caches give identical bits. (The float32
  oracle the kernels are tested against is `pallas_kernels.paged_attention.
  paged_attention_reference`; this is the path the model runs without a kernel.)
  """
  b, t, nh, d = q.shape
  if k_pools.ndim == 5:
    bs, nk = k_pools.shape[2:4]
    take = lambda p: p[layer, view.block_tables].reshape(b, -1, nk, d)  # one fused gather
  else:
    bs, nk = k_pools.shape[1:3]
    take = lambda p: gather(p, view.block_tables)
  key_pos = jnp.arange(view.block_tables.shape[1] * bs, dtype=jnp.int32)
  present = (key_pos[None, :] < view.kv_lens[:, None])[:, :, None, None]  # [B, S, 1, 1]
  # Slots past a request's length may hold anything (stale or never written K/V, even
  # NaN): zero them so that a masked key contributes exactly nothing.
  k = jnp.where(present, take(k_pools).astype(jnp.float32), 0.0)
  v = jnp.where(present, take(v_pools).astype(jnp.float32), 0.0)
  qg = q.astype(jnp.float32).reshape(b, t, nk, nh // nk, d)  # [B, T, K, G, D]
  scores = jnp.einsum("btkgd,bskd->bkgts", qg, k) * (d ** -0.5)
  mask = ((key_pos[None, None, :] <= view.positions[:, :, None])
          & present[:, None, :, 0, 0])  # [B, T, S]
  scores = jnp.where(mask[:, None, None], scores, -jnp.inf)
  probs = jax.nn.softmax(scores, axis=-1)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
  return out.reshape(b, t, nh, d)
