"""Qwen2/2.5 decoder in Flax (linen), reading and writing a paged KV cache.

Every forward pass processes a chunk of T tokens for B requests and is a pure
function of (params, kv pools, tokens, view): the attention of each layer writes
the chunk's K/V into the layer's slice of the pools and attends through per-request
block tables (`hq_jax.kv.paged.AttentionView`). Which cache manages the blocks
(dense or deduplicated) is invisible here: both hand the model the same view.

Layers are `nn.scan`-ned so a 24-layer model compiles one layer; parameters carry a
leading layer axis (`params["layers"][...]`). Linen rather than NNX because the
params are then a plain nested dict: what the GGUF/safetensors loaders produce and
what orbax saves, with no graph to split at the jit boundary.
"""

from __future__ import annotations

import functools
import itertools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from hq_jax import mesh as mesh_lib
from hq_jax.config import ModelConfig
from hq_jax.kv import paged
from hq_jax.kv.paged import AttentionView, KVPools

# (q [B,T,H,D], k_pools, v_pools [L,NB,bs,K,D] (all layers), layer (int32 scalar), view,
#  *, k_scales, v_scales [L,NB,bs,K] (FP8 pools) or None) -> out [B,T,H,D]. The function
# reads its layer out of the full pools: slicing pools[layer] here would make XLA copy the
# layer on every step.
AttentionFn = Callable[..., jax.Array]


def fused_parts(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Output widths of the parts of the fused projections, in order: `qkv_proj` = q, k, v and
  `gate_up_proj` = gate, up. Each is one Dense, so a step runs one GEMM for each: with three
  and two separate weights, XLA's GPU dot merger had concatenated them into a new buffer
  every step, a measurable share of a small-batch decode step (docs/log/, "Where the 0.5B
  decode step goes")."""
  q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  return {"qkv_proj": (q, kv, kv), "gate_up_proj": (cfg.intermediate_size,) * 2}


def _split(x: jax.Array, widths: tuple[int, ...]) -> list[jax.Array]:
  """x's last axis cut into consecutive parts of the given widths."""
  return jnp.split(x, list(itertools.accumulate(widths))[:-1], axis=-1)


class RMSNorm(nn.Module):
  eps: float
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.dtype)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return scale * x32.astype(self.dtype)  # HF: weight * hidden.to(input_dtype)


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float):
  """cos, sin of shape [..., head_dim] in float32 (HF rotate-half layout)."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [..., D/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  # x: [B, T, N, D]; cos/sin: [B, T, D]
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
  return x * cos + rotated * sin


class Attention(nn.Module):
  cfg: ModelConfig
  attention_fn: AttentionFn
  tp_axis: str | None = None  # inside shard_map: the axis the heads are split over

  @nn.compact
  def __call__(self, x, pools: KVPools, layer, view: AttentionView):
    cfg, dt = self.cfg, self.cfg.jnp_dtype
    b, t, _ = x.shape
    dense = functools.partial(nn.Dense, dtype=dt, param_dtype=dt)
    widths = fused_parts(cfg)["qkv_proj"]
    q, k, v = _split(dense(sum(widths), name="qkv_proj")(x), widths)
    q = q.reshape(b, t, cfg.num_heads, cfg.head_dim)  # [B, T, H, D]
    k = k.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)  # [B, T, K, D]
    v = v.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    cos, sin = rope_cos_sin(view.positions, cfg.head_dim, cfg.rope_theta)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    pools = paged.write_layer(pools, layer, k, v, view.write_slots)
    out = self.attention_fn(q, pools.k, pools.v, layer, view, k_scales=pools.k_scale,
                            v_scales=pools.v_scale)  # [B, T, H, D]
    out = out.astype(dt).reshape(b, t, cfg.num_heads * cfg.head_dim)
    out = nn.Dense(cfg.hidden_size, use_bias=False, dtype=dt, param_dtype=dt,
                   name="o_proj")(out)
    return _all_reduce(out, self.tp_axis), pools


def _all_reduce(x: jax.Array, axis: str | None) -> jax.Array:
  """The tensor shards' partial sums of a row-split projection, summed (one all-reduce)."""
  return x if axis is None else jax.lax.psum(x, axis)


class MLP(nn.Module):
  cfg: ModelConfig
  tp_axis: str | None = None

  @nn.compact
  def __call__(self, x):
    dt = self.cfg.jnp_dtype
    dense = functools.partial(nn.Dense, use_bias=False, dtype=dt, param_dtype=dt)
    widths = fused_parts(self.cfg)["gate_up_proj"]
    gate, up = _split(dense(sum(widths), name="gate_up_proj")(x), widths)
    out = dense(self.cfg.hidden_size, name="down_proj")(nn.silu(gate) * up)
    return _all_reduce(out, self.tp_axis)


class DecoderLayer(nn.Module):
  cfg: ModelConfig
  attention_fn: AttentionFn
  tp_axis: str | None = None

  @nn.compact
  def __call__(self, carry, view: AttentionView):
    x, pools, layer = carry
    norm = functools.partial(RMSNorm, self.cfg.rms_norm_eps, self.cfg.jnp_dtype)
    h, pools = Attention(self.cfg, self.attention_fn, self.tp_axis, name="attn")(
        norm(name="input_norm")(x), pools, layer, view)
    x = x + h
    x = x + MLP(self.cfg, self.tp_axis, name="mlp")(norm(name="post_attention_norm")(x))
    return (x, pools, layer + 1), None


class Qwen2(nn.Module):
  """`apply(params, tokens [B,T], pools, view) -> (logits [B,T,V] f32, new pools)`.

  With `logits_at` (int32 [B]: one chunk position per row), only those rows reach the
  final norm and the vocabulary projection: logits [B, 1, V]. A prefill that needs only
  the prediction after its last token then skips the [T, hidden] x [hidden, V] matmul and
  the [T, V] float32 logits (at 4,096 tokens of the 0.5B shape: 1.1 TFLOP and 2.5 GB)."""

  cfg: ModelConfig
  attention_fn: AttentionFn = paged.paged_attention_xla
  tp_axis: str | None = None  # inside shard_map (`forward(mesh=...)`): cfg is one shard's

  @nn.compact
  def __call__(self, tokens, pools: KVPools, view: AttentionView, logits_at=None):
    cfg, dt = self.cfg, self.cfg.jnp_dtype
    embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dt, param_dtype=dt, name="embed")
    x = embed(tokens)
    layers = nn.scan(DecoderLayer, variable_axes={"params": 0}, split_rngs={"params": True},
                     in_axes=nn.broadcast, length=cfg.num_layers)
    (x, pools, _), _ = layers(cfg, self.attention_fn, self.tp_axis, name="layers")(
        (x, pools, jnp.int32(0)), view)
    if logits_at is not None:
      x = jnp.take_along_axis(x, logits_at[:, None, None], axis=1)
    x = RMSNorm(cfg.rms_norm_eps, dt, name="final_norm")(x)
    if cfg.tie_word_embeddings:
      logits = embed.attend(x)
    else:
      logits = nn.Dense(cfg.vocab_size, use_bias=False, dtype=dt, param_dtype=dt,
                        name="lm_head")(x)
    return logits.astype(jnp.float32), pools


def init_params(cfg: ModelConfig, key: jax.Array, *, scale: float = 0.02):
  """Seeded random parameters for any preset (memory and speed do not depend on values).

  Normal(0, scale) weights and unit norm scales, built shape-by-shape so a 72B
  config does not need a full-model init graph.
  """
  abstract = abstract_params(cfg)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  keys = jax.random.split(key, len(leaves))
  out = []
  for (path, leaf), k in zip(leaves, keys):
    name = jax.tree_util.keystr(path)
    if "norm" in name:
      out.append(jnp.ones(leaf.shape, leaf.dtype))
    else:
      out.append((scale * jax.random.normal(k, leaf.shape, jnp.float32)).astype(leaf.dtype))
  return jax.tree_util.tree_unflatten(treedef, out)


def abstract_params(cfg: ModelConfig):
  """ShapeDtypeStructs of the parameter tree (no memory allocated)."""
  pools = KVPools.abstract(cfg, num_blocks=1, block_size=1)
  view = AttentionView.abstract(batch=1, chunk=1, max_blocks=1)
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  shapes = jax.eval_shape(lambda t, p, v: Qwen2(cfg).init(jax.random.key(0), t, p, v),
                          tokens, pools, view)
  return shapes["params"]


# XLA options of the jitted step. The layer scan slices each layer's weights out of the
# stacked parameters; by default XLA's GPU backend copies every such slice into a temporary
# buffer before its Triton GEMM (the weights read three times: a large share of a
# 7B-shape decode step). With cuBLAS GEMMs and dynamic-slice fusion the GEMM reads the
# layer's weights in place (the measurements: docs/log/, "End to end"). The options are
# GPU-only debug flags, ignored by the CPU backend, and they change no result on CPU.
STEP_COMPILER_OPTIONS = {"xla_gpu_enable_dynamic_slice_fusion": True,
                         "xla_gpu_enable_triton_gemm": False}


def _apply(params, pools, tokens, view, logits_at, cfg, attention_fn, mesh):
  if mesh is None:
    return Qwen2(cfg, attention_fn).apply({"params": params}, tokens, pools, view, logits_at)
  # Tensor parallel: each device runs the model of its heads (`mesh.local_config`) on its
  # shard of the weights and pools; activations, views and logits are replicated.
  local = mesh_lib.local_config(cfg, int(mesh.shape["model"]))
  step = lambda p, kv, t, v, at: Qwen2(local, attention_fn, "model").apply(
      {"params": p}, t, kv, v, at)
  pool_specs = mesh_lib.pool_specs(pools)
  # check_vma off: the Pallas kernels inside carry no varying-axes rules; the logits are
  # replicated by construction (computed after the last all-reduce from replicated weights).
  return jax.shard_map(step, mesh=mesh, check_vma=False,
                       in_specs=(mesh_lib.param_specs(params), pool_specs, P(), P(),
                                 None if logits_at is None else P()),
                       out_specs=(P(), pool_specs))(params, pools, tokens, view, logits_at)


@functools.partial(jax.jit, static_argnames=("cfg", "attention_fn", "mesh"),
                   compiler_options=STEP_COMPILER_OPTIONS)
def forward(params, pools: KVPools, tokens: jax.Array, view: AttentionView,
            logits_at: jax.Array | None = None, *, cfg: ModelConfig,
            attention_fn: AttentionFn = paged.paged_attention_xla, mesh=None):
  """One jitted step: logits for a chunk (or, with `logits_at`, for one position per row)
  and the pools with its K/V written. `mesh` (a `jax.sharding.Mesh` of one data row,
  `hq_jax.mesh.data_shards`): tensor parallel over its "model" axis, params and pools as
  `hq_jax.mesh.shard_params` / `place_pools` put them."""
  return _apply(params, pools, tokens, view, logits_at, cfg, attention_fn, mesh)


forward_donating = jax.jit(forward.__wrapped__, static_argnames=("cfg", "attention_fn", "mesh"),
                           donate_argnames=("pools",), compiler_options=STEP_COMPILER_OPTIONS)
forward_donating.__doc__ = "`forward` that donates the pools (in-place cache update on GPU)."
