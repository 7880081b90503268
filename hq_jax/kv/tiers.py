"""The host tier's K/V: pools in host memory (JAX memory kinds) and the block copies.

An HQ cache with a host tier (`DedupKVCache.init(..., host_blocks=H)`) plans its moves on
the host, as it plans everything: evicting a cached block to the host tier records a copy
device -> host (`host_store`), and a hit on a host block records a copy host -> device
into the device block that takes it (`host_load`). The pools change only here, in one
jitted step that the engine runs before every model step (`run_copies`), so a copy is
always done before the step that reads (or overwrites) its blocks:

  phase 1  device -> host: each pending store reads its device block (not yet
           overwritten: no step ran since it was evicted);
  phase 2  host -> device: each pending load reads its host block after phase 1, so a
           block evicted and hit again before a step still arrives whole. A host block
           with a pending load is never dropped before it runs (the cache pins it).

Whole blocks move, all layers, K and V and (FP8) their scales. The host pools live in
`pinned_host` memory where the backend has it (page-locked: the copies are DMA, and
they are dispatched asynchronously like any jitted step); elsewhere in the device's
default memory (`host_memory_kind` says which, for the run records).
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from hq_jax.kv.paged import SCALE_DTYPE, KVLayout, KVPools

HOST_MEMORY_KINDS = ("auto", "pinned_host", "device")


def host_memory_kind(requested: str = "auto", device=None) -> str:
  """The memory kind the host pools get: "pinned_host" if `requested` is "auto" or
  "pinned_host" and the device offers it and runs the copy step there (`pinned_host_works`),
  else "device" (the device's default memory: the fallback a backend without host memory
  kinds gets; "auto" warns once, naming why)."""
  if requested not in HOST_MEMORY_KINDS:
    raise ValueError(f"host memory kind must be one of {HOST_MEMORY_KINDS}, got {requested!r}")
  if requested == "device":
    return "device"
  why = pinned_host_works(device or jax.devices()[0])
  if why is None:
    return "pinned_host"
  if requested == "pinned_host":
    raise ValueError(why)
  _warn_once(f"host tier: {why}; its pools are in the device's memory instead")
  return "device"


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
  import warnings
  warnings.warn(message, RuntimeWarning, stacklevel=3)


@functools.lru_cache(maxsize=None)
def pinned_host_works(device) -> str | None:
  """None if `device` has pinned_host memory and a block makes the round trip through it
  bit for bit (a one-block probe of the copy step, once per process); else why not."""
  try:
    kinds = {m.kind for m in device.addressable_memories()}
  except Exception:  # a backend without memory kinds
    kinds = set()
  if "pinned_host" not in kinds:
    return (f"{device.platform} device {device.id} has no pinned_host memory (it has "
            f"{sorted(kinds) or 'no memory kinds'})")
  try:
    layout = KVLayout(1, 1, 2, 1, "float32")
    pools = KVPools(jnp.asarray(np.arange(4, dtype=np.float32).reshape(1, 2, 1, 1, 2)),
                    jnp.zeros((1, 2, 1, 1, 2), jnp.float32))
    host = host_pools(layout, 1, "pinned_host", _checked=True)
    one, zero = np.ones(1, np.int32), np.zeros(1, np.int32)
    pools, host, _ = apply_copies(pools, host, CopyPlan(zero, zero, zero, one), sync=True)
    if not np.array_equal(np.asarray(pools.k)[0, 1].reshape(-1), [0.0, 1.0]):
      return "a block copied through pinned_host memory came back changed"
  except Exception as e:  # noqa: BLE001 - any failure means: not on this backend
    return f"the copy step through pinned_host memory fails here ({type(e).__name__}: {e})"
  return None


def _sharding(kind: str, device=None):
  device = device or jax.devices()[0]
  make = getattr(jax.sharding, "make_single_device_sharding", None)  # JAX >= 0.12
  if make is None:
    return jax.sharding.SingleDeviceSharding(device, memory_kind=kind)
  return make(device, memory_kind=kind)


def host_pools(layout: KVLayout, host_blocks: int, memory_kind: str = "auto", *,
               _checked: bool = False) -> KVPools:
  """Zeroed host pools of `host_blocks` blocks, made where they live (no host copy of the
  whole pool on the way)."""
  kind = memory_kind if _checked else host_memory_kind(memory_kind)
  shape = layout.pool_shape(host_blocks)
  # Zeros made on the host itself (`_on_host`): never a device buffer of the host pool's
  # size, and the arrays' type says host memory (what the copy step's gathers check).
  zeros = lambda s, d: (lambda: jnp.zeros(s, d))
  make = lambda s, d: jax.jit(_on_host(zeros(s, d)) if kind != "device" else zeros(s, d),
                              out_shardings=_sharding(kind))()
  if not layout.quantized:
    return KVPools(make(shape, layout.dtype), make(shape, layout.dtype))
  sc = layout.scale_shape(host_blocks)
  return KVPools(make(shape, layout.dtype), make(shape, layout.dtype),
                 make(sc, SCALE_DTYPE), make(sc, SCALE_DTYPE))


def pools_memory_kind(pools: KVPools) -> str:
  return getattr(pools.k.sharding, "memory_kind", None) or "device"


@dataclasses.dataclass(frozen=True)
class CopyPlan:
  """Pending copies of whole blocks: device blocks `store_src` into host slots
  `store_dst`, then host slots `load_src` into device blocks `load_dst` (int32 each)."""

  store_src: np.ndarray
  store_dst: np.ndarray
  load_src: np.ndarray
  load_dst: np.ndarray


@dataclasses.dataclass(frozen=True)
class CopyResult:
  blocks_to_host: int
  blocks_to_device: int
  seconds: float  # wall time of the copies (synced), 0.0 when not timed


def _pad(idx: np.ndarray, n: int, fill: int) -> np.ndarray:
  """Indices padded to `n` with `fill` (an out-of-range id: the scatter drops it, the
  gather clamps it)."""
  out = np.full((n,), fill, np.int32)
  out[:idx.size] = idx
  return out


def _padded_size(plan: CopyPlan) -> int:
  """Both phases padded to one power of two: a serving loop compiles one copy step per
  power of two (`warm_up` compiles them first), not one per pair of sizes."""
  n = max(plan.store_src.size, plan.load_src.size)
  return 1 << max(int(n) - 1, 0).bit_length() if n else 0


def _host_update(hpool, blk, store_dst, load_src):
  """Phase 1's writes into a host pool and phase 2's reads from it (after the writes)."""
  if store_dst.size:
    hpool = hpool.at[:, store_dst].set(blk, mode="drop")
  got = jnp.take(hpool, load_src, axis=1, mode="clip") if load_src.size else None
  return hpool, got


def _on_host(fn):
  """`fn` computed on the host, its outputs in host memory (`compute_on("device_host")`:
  a host pool is never brought to the device whole)."""
  from jax.experimental.compute_on import compute_on
  space = getattr(getattr(jax, "memory", None), "Space", None)
  if space is not None:  # JAX >= 0.12: a function transformation naming the outputs' memory
    try:
      return compute_on(compute_type="device_host", out_memory_spaces=space.Host)(fn)
    except TypeError:
      pass

  def wrapped(*args):  # older JAX: a context manager over a jitted call
    with compute_on("device_host"):
      return jax.jit(fn)(*args)
  return wrapped


@functools.lru_cache(maxsize=None)
def _mover(device_kind: str, host_kind: str, n: int):
  """The jitted copy step for `n` pool arrays in these memory kinds (outputs placed
  explicitly: the host pools stay in host memory)."""
  to_host, to_device = _sharding(host_kind), _sharding(device_kind)
  offload = host_kind != device_kind

  def move(pools, host, store_src, store_dst, load_src, load_dst):
    out_p, out_h = [], []
    for pool, hpool in zip(pools, host):
      # Phase 1 reads the device blocks (every layer at once: axis 1 is the block).
      blk = jnp.take(pool, store_src, axis=1, mode="clip") if store_src.size else None
      if offload:
        put = lambda x: None if x is None else jax.device_put(x, to_host)
        update = _on_host(lambda h, b, d, s: _host_update(h, b, d, s))
        hpool, got = update(hpool, put(blk), put(store_dst), put(load_src))
      else:
        hpool, got = _host_update(hpool, blk, store_dst, load_src)
      if got is not None:  # phase 2 lands on the device
        pool = pool.at[:, load_dst].set(jax.device_put(got, to_device), mode="drop")
      out_p.append(pool)
      out_h.append(hpool)
    return out_p, out_h

  return jax.jit(move, donate_argnums=(0, 1),
                 out_shardings=([to_device] * n, [to_host] * n))


def apply_copies(pools: KVPools, host: KVPools, plan: CopyPlan, *,
                 sync: bool = False) -> tuple[KVPools, KVPools, CopyResult]:
  """Runs `plan` on the pools (both donated); `sync` waits for the copies and times them
  (wall clock), else they are dispatched and overlap whatever runs next."""
  t0 = time.perf_counter()
  nb, nh, n = pools.num_blocks, host.num_blocks, _padded_size(plan)
  treedef = jax.tree.structure(pools)
  move = _mover(pools_memory_kind(pools), pools_memory_kind(host), treedef.num_leaves)
  new_p, new_h = move(jax.tree.leaves(pools), jax.tree.leaves(host),
                      *(jnp.asarray(_pad(idx, n, fill)) for idx, fill in (
                          (plan.store_src, nb), (plan.store_dst, nh), (plan.load_src, nh),
                          (plan.load_dst, nb))))
  pools, host = jax.tree.unflatten(treedef, new_p), jax.tree.unflatten(treedef, new_h)
  seconds = 0.0
  if sync:
    jax.block_until_ready((pools, host))
    seconds = time.perf_counter() - t0
  return pools, host, CopyResult(int(plan.store_src.size), int(plan.load_src.size), seconds)


def run_copies(cache, *, sync: bool = False):
  """(the cache with its pending copies done, CopyResult): what a step must run first.
  A cache without a host tier or pending copies is returned as it is (no device work)."""
  take = getattr(cache, "take_copies", None)
  if take is None or cache.host_blocks == 0 or not cache.has_pending_copies:
    return cache, CopyResult(0, 0, 0.0)
  cache, plan = take()
  pools, host, result = apply_copies(cache.pools, cache.host_pools, plan, sync=sync)
  return cache.with_pools(pools, host_pools=host), result


def warm_up(cache):
  """Compiles the copy step at every padded size a request can need (up to its most
  blocks), so that `transfer_s` times copies, not compilation; copies nothing (every index
  is out of range). A cache without a host tier is returned as it is."""
  if not getattr(cache, "host_blocks", 0) or cache.host_only:
    return cache
  pools, host = cache.pools, cache.host_pools
  n = 1
  while True:
    fill = lambda k: np.full((n,), k, np.int32)
    nb, nh = pools.num_blocks, host.num_blocks
    pools, host, _ = apply_copies(pools, host, CopyPlan(fill(nb), fill(nh), fill(nh), fill(nb)),
                                  sync=True)
    if n >= cache.max_blocks_per_seq:
      break
    n *= 2
  return cache.with_pools(pools, host_pools=host)
