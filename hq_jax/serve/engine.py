"""Runs requests through chunked prefill and decode on either cache.

Prefill starts at the first uncached block (position 0 on the dense cache or a cold HQ
one) and runs from there in fixed-size chunks; the cached blocks are attended to, not
recomputed. The last prompt token is always computed, since its logits are the
request's first output. Each chunk is one jitted step of shape [1, chunk]: a step of one
fixed shape gives a token's row the same bits wherever the row sits in it (the exactness
contract, docs/architecture.md), so a token's K/V and logits do not depend on where its
chunk starts, which of its blocks were cached or which backend holds them.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hq_jax import mesh as mesh_lib
from hq_jax import model as model_lib
from hq_jax.config import ModelConfig
from hq_jax.kv import sharing, tiers
from hq_jax.kv.base import CacheError, PagedCache
from hq_jax.kv.paged import AttentionView, is_quantized, paged_attention_xla
from pallas_kernels import dedup_attention as dedup_kernel
from pallas_kernels import paged_attention as paged_kernel
from pallas_kernels import paged_attention_mgpu as mosaic_decode
from pallas_kernels import paged_prefill_mgpu as mosaic_prefill

# "auto" = "pallas" on a GPU, "reference" (the XLA path; with a sharing plan the float32
# shared-prefix oracle) elsewhere. "pallas" = the fastest correct kernels we have on this GPU:
# prefill chunks on the Mosaic GPU kernel (`paged_prefill_mgpu`) where it runs (Hopper,
# bf16/f16, head_dim a multiple of 64; faster than the Triton kernel there), else on
# Triton; paged and shared-prefix (dedup) decode on the Triton kernels. The Mosaic decode
# kernel (`paged_attention_mgpu`) wins at large batches but loses at small ones, and end to
# end it was no faster at the benchmark points (docs/results.md, "GPU kernels"); its split
# length is a static config (bits must not depend on the batch), so it cannot switch by
# batch size.
# "triton" = the Triton kernels throughout (the fallback). "mosaic" = prefill and paged
# decode on the Mosaic kernels always (an error where they cannot run).
# "pallas_interpret" = the Triton kernels through the Pallas interpreter (CPU tests).
# (`KernelAttention("mosaic_interpret")` runs the Mosaic kernels in the Mosaic GPU
# interpreter for tests; its callbacks cannot run inside the model's layer scan, so it is
# no engine option.)
ATTENTION = ("auto", "reference", "pallas", "triton", "mosaic", "pallas_interpret")
DECODE_ATTENTION = ("paged", "dedup", "auto")
# decode_attention="auto" reads shared runs once when the plan saves at least this many
# K/V tokens per kv head and layer (sum over nodes of tokens x (requests - 1)): the fewest
# saved tokens from which every point of the shared-prefix benchmark (both shapes) was at
# least 1.05x faster with dedup, so below it dedup decode does not reliably pay
# (`scripts/kernel_bench.py --sections=shared` prints the rule's value; the run behind it:
# docs/results.md, "GPU kernels"). That run timed the earlier dedup kernel (its own split
# lengths, 9 requests per tile), not today's exact one (the paged decode's splits and
# tiles): to be measured again.
AUTO_MIN_SAVED_TOKENS = 258_048


def resolve_attention(name: str) -> str:
  """The backend an `attention` name runs on this machine ("auto" resolved)."""
  if name not in ATTENTION:
    raise ValueError(f"attention must be one of {ATTENTION}, got {name!r}")
  if name == "auto":
    return "pallas" if jax.default_backend() == "gpu" else "reference"
  return name


def _mosaic_prefill(backend: str, dtype, head_dim: int, block_size: int,
                    fp8: bool = False) -> bool:
  """Whether `backend` runs prefill chunks on the Mosaic GPU kernel: "mosaic" (and its
  interpreter) always, "pallas" where that kernel compiles and reads the K/V (not FP8)."""
  return backend.startswith("mosaic") or (
      backend == "pallas" and not fp8
      and mosaic_prefill.supported(dtype, head_dim, block_size))


def prefill_kernel(attention: str, cfg: ModelConfig, block_size: int = 16,
                   kv_dtype: str | None = None) -> str:
  """What runs a prefill chunk's attention under the resolved backend `attention` over K/V
  of `kv_dtype` (None: the model's dtype): "xla", "triton" or "mosaic" (`KernelAttention`'s
  rule)."""
  if attention == "reference":
    return "xla"
  fp8 = is_quantized(kv_dtype or cfg.dtype)
  return ("mosaic" if _mosaic_prefill(attention, cfg.jnp_dtype, cfg.head_dim, block_size, fp8)
          else "triton")


def decode_kernel(attention: str) -> str:
  """What runs a paged decode step's attention (no sharing plan) under the resolved backend
  `attention` (or "mosaic_interpret"): "xla", "triton" or "mosaic". Unlike prefill's, the
  rule depends on the backend alone: "mosaic" (and its interpreter) only, "pallas" decodes
  on Triton (ATTENTION's comment)."""
  if attention == "reference":
    return "xla"
  return "mosaic" if attention.startswith("mosaic") else "triton"


# Rows of every decode step (`Engine(decode_rows=...)`): one fixed M, so that a request's
# logits do not depend on its batch. 64 is the largest batch of the benchmark points; a
# step's weights are read once whatever M, so padding a small batch costs little.
DECODE_ROWS = 64


# The kernels that read FP8 K/V (e4m3 values and per-token scales): the XLA path and the
# Triton kernels (paged and shared-prefix). The Mosaic GPU prefill and decode kernels do not
# yet: an engine refuses FP8 caches with them (`check_fp8`).
FP8_KERNELS = ("xla", "triton")


def check_fp8(attention: str, prefill: str, decode: str) -> None:
  """Raises ValueError, naming the kernel, if one the engine would run cannot read FP8 K/V."""
  for what, kernel, name in (("prefill", prefill, "paged_prefill_mgpu (Mosaic GPU)"),
                             ("decode", decode, "paged_attention_mgpu (Mosaic GPU)")):
    if kernel not in FP8_KERNELS:
      raise ValueError(f"FP8 K/V: the {what} kernel {name} of --attention={attention} does "
                       "not read float8_e4m3fn pools yet; use --attention=triton (or "
                       "pallas, which then prefills on Triton) or --kv_dtype=bfloat16")


def decode_bucket(batch: int) -> int:
  """`decode_rows=0`: batches padded to a power of two (a few compiled shapes, but a
  request's bits then depend on its batch's bucket)."""
  return 1 << max(batch - 1, 0).bit_length()


@functools.partial(jax.jit, static_argnums=1)
def _first_rows(logits: jax.Array, n: int) -> jax.Array:
  """[B, 1, V] -> [n, V]: the real rows of a padded decode batch (one cheap dispatch)."""
  return logits[:n, 0]


@dataclasses.dataclass(frozen=True)
class KernelAttention:
  """The model's attention function for one backend (hashable: part of the jit key).

  The one place where the cache's `AttentionView` meets the kernels' plain-array
  interface: q, all layers' pools and the layer index, block tables, positions, lengths
  and (decode with a sharing plan) the plan's arrays.
  """

  # "reference" | "pallas" | "triton" | "mosaic" | "pallas_interpret" | "mosaic_interpret"
  backend: str

  def __call__(self, q, k_pools, v_pools, layer, view: AttentionView, *, k_scales=None,
               v_scales=None):
    plan = view.sharing if q.shape[1] == 1 else None
    args = (q, k_pools, v_pools, view.block_tables, view.positions, view.kv_lens)
    fp8 = k_scales is not None
    scales = dict(k_scale=k_scales, v_scale=v_scales) if fp8 else {}
    if self.backend == "reference":
      # XLA has no shared-read variant: with a plan too it reads every request's keys, so
      # dedup decode is paged decode here (the exactness contract holds trivially).
      return paged_attention_xla(q, k_pools, v_pools, layer, view, k_scales=k_scales,
                                 v_scales=v_scales)
    interpret = self.backend.endswith("_interpret")
    if fp8:  # the Triton kernels (the engine refuses the Mosaic ones first: check_fp8)
      if self.backend.startswith("mosaic"):
        raise ValueError("FP8 K/V: the Mosaic GPU kernels (paged_prefill_mgpu, "
                         "paged_attention_mgpu) do not read float8_e4m3fn pools yet")
      if plan is not None:
        return dedup_kernel.dedup_attention(*args, plan, layer, **scales, interpret=interpret)
      return paged_kernel.paged_attention(*args, layer, **scales, interpret=interpret)
    if q.shape[1] > 1 and _mosaic_prefill(self.backend, q.dtype, q.shape[-1],
                                          k_pools.shape[-3]):
      # (The view's tables name a valid block past a request's blocks, as this kernel needs:
      # its last step may copy a page past kv_len, then masked, its V rows zeroed.)
      return mosaic_prefill.paged_prefill_attention_mgpu(
          q, k_pools, v_pools, view.block_tables, view.positions, view.kv_lens, layer,
          config=mosaic_prefill.tuned_config(q.shape[-1], interpret=interpret),
          interpret=mosaic_decode.strict_interpreter() if interpret else False)
    # The shared-read decode is the Triton paged decode's bits; where paged decode runs on
    # the Mosaic kernel, so does a step with a plan (no Mosaic variant has its bits).
    if plan is not None and decode_kernel(self.backend) == "triton":
      return dedup_kernel.dedup_attention(*args, plan, layer, interpret=interpret)
    if q.shape[1] == 1 and decode_kernel(self.backend) == "mosaic":
      return mosaic_decode.paged_decode_attention_mgpu(
          *args, layer,
          interpret=mosaic_decode.strict_interpreter() if interpret else False)
    return paged_kernel.paged_attention(*args, layer, interpret=interpret)


def _check_mesh(mesh, cfg: ModelConfig):
  """`Engine(mesh=)`: None, or a Mesh of axes ("data", "model") with one data row whose
  "model" size splits cfg's heads and MLP (ValueError otherwise)."""
  if mesh is None:
    return None
  if tuple(mesh.axis_names) != mesh_lib.AXES:
    raise ValueError(f"Engine(mesh=): axes must be {mesh_lib.AXES}, got {mesh.axis_names}")
  spec = mesh_lib.spec_of(mesh)
  if spec.data != 1:
    raise ValueError(f"Engine(mesh=) runs one data shard; --mesh={spec.label} has "
                     f"{spec.data}: make one Engine per hq_jax.mesh.data_shards(mesh)")
  spec.check(cfg, num_devices=mesh.devices.size)
  return mesh


def _on_mesh(params, mesh) -> bool:
  """Whether `params` already sit on `mesh` as `shard_params` puts them."""
  leaf = jax.tree_util.tree_leaves(params)[0]
  sharding = getattr(leaf, "sharding", None)
  return isinstance(sharding, jax.sharding.NamedSharding) and sharding.mesh == mesh


@dataclasses.dataclass(frozen=True)
class PrefillResult:
  slot: int
  prompt_tokens: int
  hit_tokens: int  # tokens whose blocks were found cached at admission
  cached_tokens: int  # tokens whose prefill was skipped (= hit_tokens, less the last
  #                    block when the whole prompt was cached)
  computed_tokens: int  # tokens run through the model (prompt_tokens - cached_tokens)
  first_position: int  # position of logits[0] (= cached_tokens)
  # [computed_tokens, vocab] float32 on the host (copied chunk by chunk: the device never
  # holds more than one chunk of logits), or None with logits="last".
  logits: np.ndarray | None
  last_logits: jax.Array  # [vocab] f32: the prediction after the last prompt token
  ttft_s: float  # admission + prefill until the last logits are ready


@dataclasses.dataclass(frozen=True)
class DecodeResult:
  logits: jax.Array  # [B, vocab] float32
  attention: str  # "paged" or "dedup": what this step's attention ran ("mixed" when a
  #               batch of more than decode_rows ran in steps that chose differently)


class Engine:
  """Holds the model (params are traced arguments of each jitted step, not constants)."""

  def __init__(self, params, cfg: ModelConfig, *, chunk_size: int = 64,
               attention: str = "auto", donate: bool | None = None,
               decode_attention: str = "paged",
               auto_min_saved_tokens: int = AUTO_MIN_SAVED_TOKENS,
               decode_rows: int = DECODE_ROWS, on_step=None, allow_long_context: bool = False,
               kv_dtype: str | None = None, mesh=None, time_transfers: bool = False):
    """attention: one of ATTENTION ("auto": the Pallas kernels on a GPU, XLA elsewhere).
    kv_dtype: the K/V dtype of the caches it runs (None: the model's); it picks the kernels
    (FP8: those of FP8_KERNELS, else an error naming the kernel), and a cache of another
    K/V dtype is refused.
    decode_attention: "paged" (the default), "dedup" (the Triton kernels read a shared run
    of blocks once for a tile of its requests; the same bits as paged: both compute the
    same fixed-position key splits with the same code and merge them alike) or "auto"
    (dedup when the batch's sharing plan saves at least `auto_min_saved_tokens` K/V tokens
    per kv head, else paged). The choice never changes a logit (docs/architecture.md,
    "The exactness contract"), only the time.
    decode_rows: rows of every decode step (a larger batch runs in several steps); padding
    rows read and write nothing. 0 opts out: the batch is padded to its power-of-two
    bucket, and a request's decode logits then depend on the batch size within float
    rounding (`invariance` says which).
    on_step: called as on_step(jitted_fn, args, kwargs) before every jitted model step
    (e.g. `bench.device_memory.PeakTracker`, which reads the step's compiled memory).
    allow_long_context: let `prefill` run prompts past cfg.max_position_embeddings
    (`ModelConfig.check_context`, the rule every script applies).
    mesh: a `jax.sharding.Mesh` of one data row (data:1, model:M; `hq_jax.mesh.data_shards`
    cuts a larger one): tensor parallel over "model". `params` in the standard layout are
    placed on it by `hq_jax.mesh.shard_params`; params already on this mesh are taken as
    they are (they must be in its shard-major layout: `shard_params` or
    `init_sharded_params`). Every cache's pools go onto it by `place_pools`. None: one
    device. Data parallel is one Engine and one cache per data row.

    Every step first runs the cache's pending copies between its tiers (`tiers.run_copies`:
    an HQ cache with a host tier); `time_transfers` waits for them and adds their wall
    time to `transfer_s` (else they are dispatched and overlap what follows)."""
    if chunk_size <= 0:
      raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if isinstance(decode_rows, bool) or not isinstance(decode_rows, int) or decode_rows < 0:
      raise ValueError(f"decode_rows must be an int >= 0, got {decode_rows!r}")
    if decode_attention not in DECODE_ATTENTION:
      raise ValueError(f"decode_attention must be one of {DECODE_ATTENTION}, got "
                       f"{decode_attention!r}")
    self.mesh = _check_mesh(mesh, cfg)
    if self.mesh is not None and not _on_mesh(params, self.mesh):
      params = mesh_lib.shard_params(params, cfg, self.mesh)
    self.params, self.cfg, self.chunk_size = params, cfg, chunk_size
    self.attention = resolve_attention(attention)  # what runs: never "auto"
    self.kv_dtype = kv_dtype or cfg.dtype
    # The kernels that run (the prefill's is picked at 16-token pages, the default).
    self.prefill_kernel = prefill_kernel(self.attention, cfg, kv_dtype=self.kv_dtype)
    self.decode_kernel = decode_kernel(self.attention)
    if is_quantized(self.kv_dtype):
      check_fp8(self.attention, self.prefill_kernel, self.decode_kernel)
    self._attention_fn = KernelAttention(self.attention)
    self.decode_attention = decode_attention
    self.decode_rows = decode_rows
    # What the engine's logits are invariant to, for study rows and run records:
    # "batch_invariant" (the exactness contract, docs/architecture.md) or "bucketed".
    self.invariance = "batch_invariant" if decode_rows else "bucketed"
    self.auto_min_saved_tokens = auto_min_saved_tokens
    self._planner = None  # built on the first shared-prefix decode (needs the block size)
    # Donating the pools lets XLA update the cache in place (GPU); the caller must then
    # not reuse the cache it passed in. Off on CPU so tests can compare old and new.
    self.donate = jax.default_backend() != "cpu" if donate is None else donate
    self._forward = model_lib.forward_donating if self.donate else model_lib.forward
    self.on_step = on_step
    self.allow_long_context = allow_long_context
    self.time_transfers = time_transfers
    # Copies between the tiers run by this engine (cumulative): blocks each way, seconds.
    self.blocks_to_host = self.blocks_to_device = 0
    self.transfer_s = 0.0

  @property
  def attention_label(self) -> str:
    """What attention runs, for the outputs: "pallas" names the kernels it picked here."""
    if self.attention == "pallas":
      return f"pallas(prefill={self.prefill_kernel},decode={self.decode_kernel})"
    return self.attention

  def _check_tokens(self, tokens) -> np.ndarray:
    arr = np.asarray(tokens)
    if arr.size and (arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer)):
      raise CacheError(f"token ids must be integers, got dtype {arr.dtype}")
    if arr.size:
      bad = (arr < 0) | (arr >= self.cfg.vocab_size)
      if bad.any():
        raise CacheError(f"token id {int(arr[bad][0])} is outside the vocabulary "
                         f"[0, {self.cfg.vocab_size})")
    return arr

  def _check_cache(self, cache: PagedCache) -> None:
    """The cache's K/V layout must be this model's (else writes to missing layers drop)."""
    if cache.host_only:
      raise CacheError("this cache was built host_only (no K/V pools): it cannot run a "
                       "model step")
    nl, _, _, nk, d = cache.pools.k.shape
    want = (self.cfg.num_layers, self.cfg.num_kv_heads, self.cfg.head_dim)
    if (nl, nk, d) != want:
      raise CacheError(f"the cache holds {nl} layers x {nk} kv heads x head_dim {d}, the "
                       f"model needs {want[0]} x {want[1]} x {want[2]}: build the cache "
                       "with KVLayout.from_config(cfg)")
    # FP8 picks other kernels: an FP8 cache needs an engine made for it, and back.
    if is_quantized(cache.pools.k.dtype) != is_quantized(self.kv_dtype):
      raise CacheError(f"the cache holds {cache.layout.dtype} K/V, the engine was made for "
                       f"{self.kv_dtype}: pass Engine(kv_dtype=...) of the cache's layout")

  @property
  def mesh_label(self) -> str:
    """The mesh this engine runs on, for rows and run records ("data:1,model:1")."""
    return mesh_lib.spec_of(self.mesh).label

  def _step(self, cache: PagedCache, tokens: np.ndarray, view, logits_at=None):
    # The copies between tiers first: a block moved to the host is read before this step
    # overwrites it, and a host hit is on the device before this step reads it.
    cache, moved = tiers.run_copies(cache, sync=self.time_transfers)
    self.blocks_to_host += moved.blocks_to_host
    self.blocks_to_device += moved.blocks_to_device
    self.transfer_s += moved.seconds
    pools = cache.pools
    if self.mesh is not None:  # each device its kv heads (a no-op once they are there)
      pools = mesh_lib.place_pools(pools, self.mesh)
    args = (self.params, pools, jnp.asarray(tokens, jnp.int32), view)
    if logits_at is not None:  # only these rows' logits: [B, 1, vocab]
      args += (jnp.asarray(logits_at, jnp.int32),)
    kwargs = dict(cfg=self.cfg, attention_fn=self._attention_fn)
    if self.mesh is not None:
      kwargs["mesh"] = self.mesh
    if self.on_step is not None:
      self.on_step(self._forward, args, kwargs)
    logits, pools = self._forward(*args, **kwargs)
    return logits, cache.with_pools(pools)

  def _decode_view(self, cache: PagedCache, slots, lens) -> tuple[AttentionView, str]:
    """The decode view (batch padded to decode_rows or its bucket), with the plan attached
    for dedup."""
    host = cache.host_view(slots, [n - 1 for n in lens], 1,
                           pad_to=self.decode_rows or decode_bucket(len(slots)))
    view = jax.device_put(host)
    if self.decode_attention == "paged":
      return view, "paged"
    if self._planner is None or self._planner.block_size != cache.block_size:
      group = self.cfg.num_heads // self.cfg.num_kv_heads
      config = dedup_kernel.default_config(self.cfg.head_dim, group)
      self._planner = sharing.SharingPlanner(
          cache.block_size, requests_per_tile=config.requests_per_tile(group))
    # The planner caches the plan until the batch's shared full blocks change. It reads
    # the host view (never the device one: no device round trip per step).
    plan, summary = self._planner.plan(host.block_tables, host.kv_lens)
    if self.decode_attention == "auto" and summary.saved_tokens < self.auto_min_saved_tokens:
      return view, "paged"
    return dataclasses.replace(view, sharing=plan), "dedup"

  def prefill(self, cache: PagedCache, tokens: Sequence[int], *, salt: int = 0,
              logits: str = "all", slot: int | None = None) -> tuple[PagedCache, PrefillResult]:
    """Admits a prompt and computes its K/V; returns (new cache, result).

    `slot`: the caller already admitted `tokens` there (`cache.admit`, e.g. to check the
    fit or pass admission options first), so only the prefill runs here. A prompt past the
    model's context is refused (`config.ContextLengthError`) unless `allow_long_context`."""
    self.cfg.check_context(int(np.size(tokens)), self.allow_long_context,
                           what="Engine.prefill: the prompt")
    if logits not in ("all", "last"):
      raise ValueError(f"logits must be 'all' or 'last', got {logits!r}")
    if self.chunk_size % cache.block_size:
      raise CacheError(f"chunk_size {self.chunk_size} is not a multiple of the cache's "
                       f"block_size {cache.block_size}")
    self._check_cache(cache)
    prompt = self._check_tokens(tokens)
    t0 = time.perf_counter()
    if slot is None:
      cache, slot = cache.admit(prompt, salt)
    elif not (0 <= slot < cache.max_requests and bool(cache.active[slot])
              and int(cache.req_lens[slot]) == prompt.size):
      raise CacheError(f"slot {slot} does not hold a just-admitted prompt of {prompt.size} tokens")
    n, c = prompt.size, self.chunk_size
    hit = int(cache.seq_lens[slot])  # whole blocks
    # A fully cached prompt recomputes only the block of its last token (as vLLM, whose
    # lookup stops at the last token): the fewest tokens that give its logits. Those
    # positions are already written, so the step writes nothing.
    skip = min(hit, (n - 1) // cache.block_size * cache.block_size)
    kept, last = [], None
    for start in range(skip, n, c):
      chunk = np.zeros((1, c), np.int32)
      valid = min(c, n - start)
      chunk[0, :valid] = prompt[start:start + valid]
      # logits="last": the vocabulary projection of the chunk's last token only.
      at = None if logits == "all" else [valid - 1]
      out, cache = self._step(cache, chunk, cache.view([slot], [start], c), at)
      if logits == "all":
        kept.append(np.asarray(out[0, :valid]))  # to the host: one chunk on the device
      last = out[0, valid - 1] if at is None else out[0, 0]
    cache = cache.commit_batch([slot], [n])
    last = last.block_until_ready()
    ttft = time.perf_counter() - t0
    return cache, PrefillResult(
        slot=slot, prompt_tokens=n, hit_tokens=hit, cached_tokens=skip,
        computed_tokens=n - skip, first_position=skip,
        logits=np.concatenate(kept) if logits == "all" else None, last_logits=last,
        ttft_s=ttft)

  def decode(self, cache: PagedCache, slots: Sequence[int],
             tokens: Sequence[int]) -> tuple[PagedCache, DecodeResult]:
    """Feeds one new token to each slot; returns (cache, DecodeResult: logits [B, vocab]
    and which attention ran). Runs in steps of `decode_rows` rows (the last one padded),
    or with decode_rows=0 in one step padded to `decode_bucket(B)` rows."""
    slots, tokens = list(slots), self._check_tokens(tokens).reshape(-1)
    if len(slots) != tokens.size or not slots:
      raise CacheError(f"decode needs one token per slot, got {len(slots)} slots and "
                       f"{tokens.size} tokens")
    if len(set(slots)) != len(slots):
      raise CacheError(f"decode got a slot twice: {slots}")
    self._check_cache(cache)
    cache = cache.append_batch(slots, [int(t) for t in tokens])
    lens = [int(cache.req_lens[s]) for s in slots]
    rows = self.decode_rows or len(slots)
    logits, used = [], set()
    for i in range(0, len(slots), rows):
      part = slots[i:i + rows]
      view, how = self._decode_view(cache, part, lens[i:i + rows])
      padded = np.zeros((view.positions.shape[0], 1), np.int32)
      padded[:len(part), 0] = tokens[i:i + rows]
      out, cache = self._step(cache, padded, view)
      logits.append(_first_rows(out, len(part)))
      used.add(how)
    return (cache.commit_batch(slots, lens),
            DecodeResult(logits[0] if len(logits) == 1 else jnp.concatenate(logits),
                         used.pop() if len(used) == 1 else "mixed"))

  def generate(self, cache: PagedCache, prompt: Sequence[int], steps: int, *, salt: int = 0):
    """Greedy decoding of `steps` tokens after `prompt`: (cache, slot, new token ids)."""
    cache, res = self.prefill(cache, prompt, salt=salt, logits="last")
    out = [int(jnp.argmax(res.last_logits))]
    for _ in range(steps - 1):
      cache, step = self.decode(cache, [res.slot], [out[-1]])
      out.append(int(jnp.argmax(step.logits[0])))
    return cache, res.slot, out
