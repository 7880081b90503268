"""The device mesh ("data", "model"): parsed and checked in one place, and the shardings of
the parameters and the K/V pools over it.

Tensor parallelism runs over kv heads on "model" (as MaxText shards its cache's kv-head
axis over tensor and jax-llm-examples runs heads with replicated activations): a device
holds its heads' q/k/v columns, its heads' rows of o_proj, its share of the MLP's
intermediate width, and its kv heads of every K/V block. So the block tables, refcounts
and hashes are host-side and identical for every device; only activations after o_proj and
down_proj cross devices (one psum each). Data parallelism runs over request slots: each
"data" row of the mesh serves its own cache (its own pool and slots) with its own copy of
the weights (`data_shards`), so HQ shares blocks within a row only.

The fused projections (`model.fused_parts`) hold [q | k | v] and [gate | up] side by side;
an even split of those columns would hand device 0 all of q. `shard_params` reorders the
columns shard-major ([q_0 | k_0 | v_0 | q_1 | ...]) so that an even split gives each device
the fused layout of its own heads, which `local_config` describes; the model then runs
unchanged per device inside `shard_map`.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from hq_jax.config import ModelConfig
from hq_jax.kv.paged import KVPools

AXES = ("data", "model")


@dataclasses.dataclass(frozen=True)
class MeshSpec:
  """`--mesh=data:D,model:M`: D data shards (request slots) x M tensor shards (kv heads)."""

  data: int = 1
  model: int = 1

  def __post_init__(self):
    for axis in AXES:
      n = getattr(self, axis)
      if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"--mesh: {axis} must be a positive integer, got {n!r}")

  @classmethod
  def parse(cls, text: str | None) -> "MeshSpec":
    """"data:2,model:4" (either axis may be left out: 1; empty: one device)."""
    sizes = {}
    for part in (text or "").replace(" ", "").split(","):
      if not part:
        continue
      m = re.fullmatch(r"([a-z]+):(\d+)", part)
      if m is None or m.group(1) not in AXES:
        raise ValueError(f"--mesh={text}: {part!r} is not AXIS:SIZE with AXIS one of "
                         f"{', '.join(AXES)} (e.g. --mesh=data:2,model:4)")
      if m.group(1) in sizes:
        raise ValueError(f"--mesh={text}: axis {m.group(1)} given twice")
      sizes[m.group(1)] = int(m.group(2))
    return cls(**sizes)

  @property
  def num_devices(self) -> int:
    return self.data * self.model

  @property
  def label(self) -> str:
    """What rows and run records carry ("data:1,model:1")."""
    return f"data:{self.data},model:{self.model}"

  def check(self, cfg: ModelConfig | None = None, num_devices: int | None = None) -> None:
    """Raises ValueError (one line naming the flag) if `cfg`'s heads or MLP do not split over
    "model", or the mesh needs more devices than `num_devices` (default: those present)."""
    have = len(jax.devices()) if num_devices is None else num_devices
    if self.num_devices > have:
      raise ValueError(f"--mesh={self.label} needs {self.num_devices} devices, "
                       f"{have} are present")
    if cfg is not None:
      for what, n in (("num_kv_heads", cfg.num_kv_heads), ("num_heads", cfg.num_heads),
                      ("intermediate_size", cfg.intermediate_size)):
        if n % self.model:
          raise ValueError(f"--mesh={self.label}: model:{self.model} does not divide "
                           f"{cfg.name}'s {what} {n}")

  def make(self, devices=None) -> Mesh:
    """The jax Mesh of the first num_devices devices (or `devices`), axes AXES."""
    devices = jax.devices()[:self.num_devices] if devices is None else list(devices)
    return Mesh(np.asarray(devices, dtype=object).reshape(self.data, self.model), AXES)


def spec_of(mesh: Mesh | None) -> MeshSpec:
  """The spec of `mesh` (None: one device, `MeshSpec()`)."""
  if mesh is None:
    return MeshSpec()
  return MeshSpec(int(mesh.shape["data"]), int(mesh.shape["model"]))


def data_shards(mesh: Mesh) -> list[Mesh]:
  """One mesh (data:1, model:M) per data row: what one Engine and one cache run on."""
  return [Mesh(mesh.devices[d:d + 1], AXES) for d in range(mesh.devices.shape[0])]


def local_config(cfg: ModelConfig, tp: int) -> ModelConfig:
  """The model one tensor shard runs: its heads and its share of the MLP."""
  if tp == 1:
    return cfg
  return cfg.replace(num_heads=cfg.num_heads // tp, num_kv_heads=cfg.num_kv_heads // tp,
                     intermediate_size=cfg.intermediate_size // tp)


# ------------------------------------------------------------------ shardings
# Parameter name (last two path keys) -> the axis split over "model" (negative: from the
# end); absent: replicated (embeddings, norms, the vocabulary head).
_SPLIT = {("qkv_proj", "kernel"): -1, ("qkv_proj", "bias"): -1,
          ("o_proj", "kernel"): -2, ("gate_up_proj", "kernel"): -1,
          ("down_proj", "kernel"): -2}


def _names(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", k)) for k in path)


def param_specs(params):
  """A PartitionSpec per parameter (the tree of `params`, arrays or shapes)."""
  def spec(path, leaf):
    axis = _SPLIT.get(_names(path)[-2:])
    if axis is None:
      return P()
    parts = [None] * leaf.ndim
    parts[axis] = "model"
    return P(*parts)
  return jax.tree_util.tree_map_with_path(spec, params)


# K/V pools [layers, blocks, block_size, kv_heads, head_dim] (FP8 scales: without head_dim).
POOL_SPEC = P(None, None, None, "model", None)
SCALE_SPEC = P(None, None, None, "model")


def pool_specs(pools):
  """The PartitionSpecs of a `KVPools` (same tree; scales None when unquantized)."""
  return dataclasses.replace(pools, k=POOL_SPEC, v=POOL_SPEC,
                             k_scale=None if pools.k_scale is None else SCALE_SPEC,
                             v_scale=None if pools.v_scale is None else SCALE_SPEC)


def place_pools(pools, mesh: Mesh):
  """The pools on `mesh`, each device holding its kv heads of every block (returned as they
  are when they are there already: a model step's pools come back so, and this runs before
  every step)."""
  if pools.k.sharding.is_equivalent_to(NamedSharding(mesh, POOL_SPEC), pools.k.ndim):
    return pools
  specs = pool_specs(pools)
  return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), pools, specs)


def zeros_pools(layout, num_blocks: int, mesh: Mesh):
  """An empty `KVPools` made in place on `mesh` (each device allocates its kv heads only)."""
  abstract = jax.eval_shape(lambda: KVPools.zeros(layout, num_blocks))
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), pool_specs(abstract))
  return jax.jit(lambda: KVPools.zeros(layout, num_blocks), out_shardings=shardings)()


def _shard_major(widths: tuple[int, ...], tp: int) -> np.ndarray:
  """Column order of a fused projection whose parts have `widths`: part by part within each
  shard, shard after shard."""
  starts = np.cumsum((0,) + tuple(widths[:-1]))
  return np.concatenate([s + np.arange(i * w // tp, (i + 1) * w // tp)
                         for i in range(tp) for s, w in zip(starts, widths)])


def shard_params(params, cfg: ModelConfig, mesh: Mesh):
  """Parameters in the standard layout (a loader's or `init_params`'s) -> on `mesh`: fused
  columns reordered shard-major, then each leaf placed by `param_specs` (replicated over
  "data"). At model:1 the order is unchanged."""
  from hq_jax.model import fused_parts  # (here: hq_jax.model imports this module)
  tp = int(mesh.shape["model"])
  spec_of(mesh).check(cfg, num_devices=mesh.devices.size)
  parts = fused_parts(cfg)

  def reorder(path, leaf):
    name = _names(path)[-2]
    if tp > 1 and name in parts:
      leaf = jnp.take(leaf, jnp.asarray(_shard_major(parts[name], tp)), axis=-1)
    return leaf

  params = jax.tree_util.tree_map_with_path(reorder, params)
  return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), params,
                      param_specs(params))


def init_sharded_params(cfg: ModelConfig, key: jax.Array, mesh: Mesh, *, scale: float = 0.02):
  """Seeded random parameters made in place on `mesh` (each device draws only its shard):
  a 32B or 72B shape never exists whole on one device. The values are `init_params`' in
  the shard-major layout's positions, so they are another (equally random) model than
  `shard_params(init_params(...))` at model > 1; speed and memory do not depend on it."""
  from hq_jax.model import abstract_params
  abstract = abstract_params(cfg)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  specs = jax.tree_util.tree_leaves(param_specs(abstract),
                                    is_leaf=lambda x: isinstance(x, P))
  keys = jax.random.split(key, len(leaves))
  out = []
  for (path, leaf), spec, k in zip(leaves, specs, keys):
    sharding = NamedSharding(mesh, spec)
    if "norm" in jax.tree_util.keystr(path):
      make = lambda k, leaf=leaf: jnp.ones(leaf.shape, leaf.dtype)
    else:
      make = lambda k, leaf=leaf: (scale * jax.random.normal(k, leaf.shape, jnp.float32)
                                   ).astype(leaf.dtype)
    out.append(jax.jit(make, out_shardings=sharding)(k))
  return jax.tree_util.tree_unflatten(treedef, out)


# -------------------------------------------------------------- memory plans
def param_bytes_per_device(cfg: ModelConfig, tp: int) -> int:
  """Weights one device of a tensor shard holds: its share of the split projections plus
  every replicated leaf (embeddings, norms, head)."""
  from hq_jax.model import abstract_params
  abstract = abstract_params(cfg)
  total = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
    n = int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
    total += n // tp if _names(path)[-2:] in _SPLIT else n
  return total
