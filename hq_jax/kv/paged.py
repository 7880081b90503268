"""The paged block layout shared by every cache, and the reference attention over it.

KV lives in a pool of physical blocks per layer, `[layers, num_blocks, block_size,
kv_heads, head_dim]`; a request's block table maps its logical block i to a physical
block. Dense and deduplicated caches differ only in how they fill block tables, so
the model, the writes and the attention below are shared by both.

FP8 K/V (`kv_dtype="float8_e4m3fn"`): the pools hold e4m3 values and, beside them, one
float32 scale per token and kv head (`[layers, num_blocks, block_size, kv_heads]`, the same
physical block index: the scales are part of the block). A row of head_dim values x is
stored as round(x / s) with s = max|x| / 448, so it is quantized on its own, when its
token is written, whatever else the block holds: a block filled token by token in decode
needs no requantization, and a token's stored K/V depends only on that token's K/V, so
dense and deduplicated caches still hold the same bits. (A per-block scale needs the block
complete before it can be written.)
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

KV_DTYPES = ("float32", "bfloat16", "float16", "float8_e4m3fn")
FP8 = "float8_e4m3fn"
FP8_MAX = 448.0  # the largest finite e4m3fn value; anything past 464 rounds to NaN
SCALE_DTYPE = "float32"


def is_quantized(dtype) -> bool:
  """Whether K/V of this dtype carry scales (FP8)."""
  return jnp.dtype(dtype) == jnp.dtype(FP8)


def check_kv_dtype(dtype: str) -> str:
  """`dtype` if it is a K/V dtype the caches hold, else a ValueError naming the choices."""
  if dtype not in KV_DTYPES:
    raise ValueError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}, got {dtype!r}")
  return dtype


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
    check_kv_dtype(self.dtype)

  @classmethod
  def from_config(cls, cfg: ModelConfig, block_size: int = 16, dtype: str | None = None):
    """`dtype`: the K/V dtype (`KV_DTYPES`); None or "" = the model's dtype."""
    return cls(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, block_size, dtype or cfg.dtype)

  @property
  def quantized(self) -> bool:
    """FP8 K/V: each (token, kv head) row of K and of V carries a float32 scale."""
    return is_quantized(self.dtype)

  @property
  def bytes_per_token(self) -> int:
    """K and V of one token over all layers, scales included (they are K/V bytes)."""
    itemsize = np.dtype(jnp.dtype(self.dtype)).itemsize
    row = self.head_dim * itemsize + (np.dtype(SCALE_DTYPE).itemsize if self.quantized else 0)
    return 2 * self.num_layers * self.num_kv_heads * row

  @property
  def bytes_per_block(self) -> int:
    return self.block_size * self.bytes_per_token

  def blocks_for(self, num_tokens: int) -> int:
    return math.ceil(num_tokens / self.block_size)

  def pool_shape(self, num_blocks: int) -> tuple[int, ...]:
    return (self.num_layers, num_blocks, self.block_size, self.num_kv_heads, self.head_dim)

  def scale_shape(self, num_blocks: int) -> tuple[int, ...]:
    return self.pool_shape(num_blocks)[:-1]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVPools:
  """The physical K/V blocks of all layers; with FP8, their scales (None otherwise)."""

  k: jax.Array  # [layers, num_blocks, block_size, kv_heads, head_dim]
  v: jax.Array  # [layers, num_blocks, block_size, kv_heads, head_dim]
  k_scale: jax.Array | None = None  # [layers, num_blocks, block_size, kv_heads] float32
  v_scale: jax.Array | None = None  # [layers, num_blocks, block_size, kv_heads] float32

  @classmethod
  def zeros(cls, layout: KVLayout, num_blocks: int) -> "KVPools":
    shape = layout.pool_shape(num_blocks)
    if not layout.quantized:
      return cls(jnp.zeros(shape, layout.dtype), jnp.zeros(shape, layout.dtype))
    scales = lambda: jnp.zeros(layout.scale_shape(num_blocks), SCALE_DTYPE)
    return cls(jnp.zeros(shape, layout.dtype), jnp.zeros(shape, layout.dtype), scales(),
               scales())

  @classmethod
  def abstract(cls, cfg: ModelConfig, num_blocks: int, block_size: int,
               dtype: str | None = None) -> "KVPools":
    layout = KVLayout.from_config(cfg, block_size, dtype)
    s = jax.ShapeDtypeStruct(layout.pool_shape(num_blocks), layout.dtype)
    if not layout.quantized:
      return cls(s, s)
    sc = jax.ShapeDtypeStruct(layout.scale_shape(num_blocks), SCALE_DTYPE)
    return cls(s, s, sc, sc)

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

  @property
  def quantized(self) -> bool:
    return self.k_scale is not None

  @property
  def nbytes(self) -> int:
    """The whole pool, scales included."""
    return sum(int(x.nbytes) for x in (self.k, self.v, self.k_scale, self.v_scale)
               if x is not None)


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


def quantize(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """x [..., D] -> (e4m3 values [..., D], float32 scales [...]): one scale per row of D,
  s = max|x| / 448, values round(x / s) (a row of zeros: scale 0, values 0)."""
  x = x.astype(jnp.float32)
  scale = jnp.max(jnp.abs(x), axis=-1) / FP8_MAX
  safe = jnp.where(scale > 0, scale, 1.0)[..., None]
  # The clip only absorbs rounding of x / s past 448 (464 and beyond would become NaN).
  values = jnp.clip(x / safe, -FP8_MAX, FP8_MAX).astype(FP8)
  return values, scale


def dequantize(values: jax.Array, scale: jax.Array | None) -> jax.Array:
  """float32 K/V from stored values [..., D] and their scales [...] (None: unquantized)."""
  x = values.astype(jnp.float32)
  return x if scale is None else x * scale[..., None]


def write_layer(pools: KVPools, layer, k: jax.Array, v: jax.Array,
                write_slots: jax.Array) -> KVPools:
  """Writes a chunk's K/V ([B, T, K, D]) into `layer` at flat slots (FP8 pools: quantized,
  with their scales at the same slots); OOB slots are dropped."""
  nl, nb, bs, nk, d = pools.k.shape
  slots = write_slots.reshape(-1)

  def put(pool, x):
    flat = pool.reshape(nl, nb * bs, *pool.shape[3:])
    return flat.at[layer, slots].set(x.astype(pool.dtype), mode="drop").reshape(pool.shape)

  k, v = k.reshape(-1, nk, d), v.reshape(-1, nk, d)
  if not pools.quantized:
    return KVPools(put(pools.k, k), put(pools.v, v))
  (kq, ks), (vq, vs) = quantize(k), quantize(v)
  return KVPools(put(pools.k, kq), put(pools.v, vq), put(pools.k_scale, ks),
                 put(pools.v_scale, vs))


def gather(pool: jax.Array, block_tables: jax.Array) -> jax.Array:
  """[num_blocks, bs, ...] pool, [B, MB] tables -> [B, MB * bs, ...] in logical order
  (K/V [.., K, D] or their scales [.., K])."""
  b, mb = block_tables.shape
  return pool[block_tables].reshape(b, mb * pool.shape[1], *pool.shape[2:])


def paged_attention_xla(q: jax.Array, k_pools: jax.Array, v_pools: jax.Array, layer,
                        view: AttentionView, *, k_scales: jax.Array | None = None,
                        v_scales: jax.Array | None = None) -> jax.Array:
  """The model's XLA attention path: causal GQA through block tables, float32 softmax.

  k_pools, v_pools: all layers `[L, NB, bs, K, D]` (layer picks one, inside the gather: no
  copy of the layer) or one layer's `[NB, bs, K, D]` (layer ignored). k_scales, v_scales:
  FP8 pools' scales (`[L, NB, bs, K]` or `[NB, bs, K]`), dequantized after the gather. Query t of request b
  attends to logical key positions <= positions[b, t] and < kv_lens[b]. Keys are gathered
  in logical block order over the full table width, so the reduction order depends only
  on logical positions: dense and deduplicated caches give identical bits. (The float32
  oracle the kernels are tested against is `pallas_kernels.paged_attention.
  paged_attention_reference`; this is the path the model runs without a kernel.)
  """
  b, t, nh, d = q.shape
  if k_pools.ndim == 5:
    bs, nk = k_pools.shape[2:4]
    # One fused gather each: [B, S, K, D] (or [B, S, K] of scales).
    take = lambda p: p[layer, view.block_tables].reshape(b, -1, *p.shape[3:])
  else:
    bs, nk = k_pools.shape[1:3]
    take = lambda p: gather(p, view.block_tables)
  key_pos = jnp.arange(view.block_tables.shape[1] * bs, dtype=jnp.int32)
  present = (key_pos[None, :] < view.kv_lens[:, None])[:, :, None, None]  # [B, S, 1, 1]
  take_kv = lambda p, s: dequantize(take(p), None if s is None else take(s))
  # Slots past a request's length may hold anything (stale or never written K/V, even
  # NaN): zero them so that a masked key contributes exactly nothing.
  k = jnp.where(present, take_kv(k_pools, k_scales), 0.0)
  v = jnp.where(present, take_kv(v_pools, v_scales), 0.0)
  qg = q.astype(jnp.float32).reshape(b, t, nk, nh // nk, d)  # [B, T, K, G, D]
  scores = jnp.einsum("btkgd,bskd->bkgts", qg, k) * (d ** -0.5)
  mask = ((key_pos[None, None, :] <= view.positions[:, :, None])
          & present[:, None, :, 0, 0])  # [B, T, S]
  scores = jnp.where(mask[:, None, None], scores, -jnp.inf)
  probs = jax.nn.softmax(scores, axis=-1)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
  return out.reshape(b, t, nh, d)
