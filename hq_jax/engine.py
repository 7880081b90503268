"""Runs requests through chunked prefill and decode on either cache.

Prefill runs in fixed-size chunks aligned from position 0 (a multiple of the block
size). With the HQ cache, leading chunks whose blocks were all found cached are
skipped (compute reuse) and the remaining chunks attend to the cached K/V; the last
chunk is always computed, since its logits are the request's first output. Each chunk
is one jitted step of shape [1, chunk], so a token's K/V and logits do not depend on
which other requests exist or which backend holds the blocks: dense and HQ give
bit-identical logits.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hq_jax import model as model_lib
from hq_jax.config import ModelConfig
from hq_jax.kv.base import CacheError, PagedCache
from hq_jax.kv.paged import paged_attention_reference


def _pallas_attention(q, k_pool, v_pool, view):
  """The Pallas GPU kernel (imported on first use, so a CPU-only import stays fast)."""
  from pallas_kernels.paged_attention import paged_attention
  return paged_attention(q, k_pool, v_pool, view)


def _pallas_interpret_attention(q, k_pool, v_pool, view):
  """The same kernel through the Pallas interpreter (CPU tests)."""
  from pallas_kernels.paged_attention import paged_attention
  return paged_attention(q, k_pool, v_pool, view, interpret=True)


ATTENTION_BACKENDS = {"reference": paged_attention_reference, "pallas": _pallas_attention,
                      "pallas_interpret": _pallas_interpret_attention}


def _dedup_attention(q, k_pool, v_pool, view):
  """Shared-prefix decode attention (pallas_kernels/dedup_attention.py), plan in the view."""
  from pallas_kernels.dedup_attention import dedup_attention
  return dedup_attention(q, k_pool, v_pool, view)


def _dedup_interpret_attention(q, k_pool, v_pool, view):
  from pallas_kernels.dedup_attention import dedup_attention
  return dedup_attention(q, k_pool, v_pool, view, interpret=True)


def _dedup_reference_attention(q, k_pool, v_pool, view):
  from pallas_kernels.dedup_attention import dedup_attention_reference
  if q.shape[1] != 1:
    return paged_attention_reference(q, k_pool, v_pool, view)
  return dedup_attention_reference(q, k_pool, v_pool, view)


# The shared-prefix decode attention that goes with each backend.
DEDUP_BACKENDS = {"reference": _dedup_reference_attention, "pallas": _dedup_attention,
                  "pallas_interpret": _dedup_interpret_attention}
DECODE_ATTENTION = ("paged", "dedup", "auto")
# decode_attention="auto" reads shared runs once when the plan saves at least this many
# K/V tokens per kv head and layer (sum over nodes of tokens x (requests - 1)). From the
# H200 run in docs/benchmarks.md (scripts/kernel_bench.py --sections=shared, 2026-11-29):
# the fewest saved tokens from which every measured point (both shapes) was >= 1.05x faster
# with dedup; below it the 0.5B shape tied or lost at 30,720 and 122,880.
AUTO_MIN_SAVED_TOKENS = 258_048


@dataclasses.dataclass(frozen=True)
class PrefillResult:
  slot: int
  prompt_tokens: int
  hit_tokens: int  # tokens whose blocks were found cached at admission
  cached_tokens: int  # tokens whose prefill was skipped (whole chunks of hits)
  computed_tokens: int  # tokens run through the model (prompt_tokens - cached_tokens)
  first_position: int  # position of logits[0] (= cached_tokens)
  logits: jax.Array | None  # [computed_tokens, vocab] f32, or None with logits="last"
  last_logits: jax.Array  # [vocab] f32: the prediction after the last prompt token
  ttft_s: float  # admission + prefill until the last logits are ready


class Engine:
  """Holds the model (params are traced arguments of each jitted step, not constants)."""

  def __init__(self, params, cfg: ModelConfig, *, chunk_size: int = 64,
               attention: str = "reference", donate: bool | None = None,
               decode_attention: str = "paged",
               auto_min_saved_tokens: int = AUTO_MIN_SAVED_TOKENS):
    """decode_attention: "paged" (exact, the default: bit-identical for dense and HQ),
    "dedup" (shared runs of blocks read once for all their requests; equal to paged within
    float rounding, not bit-exact) or "auto" (dedup when the batch's sharing plan saves at
    least `auto_min_saved_tokens` K/V tokens per kv head, else paged)."""
    if chunk_size <= 0:
      raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if attention not in ATTENTION_BACKENDS:
      raise ValueError(f"attention must be one of {sorted(ATTENTION_BACKENDS)}, got "
                       f"{attention!r}")
    if decode_attention not in DECODE_ATTENTION:
      raise ValueError(f"decode_attention must be one of {DECODE_ATTENTION}, got "
                       f"{decode_attention!r}")
    self.params, self.cfg, self.chunk_size = params, cfg, chunk_size
    self.attention_fn = ATTENTION_BACKENDS[attention]
    self.decode_attention = decode_attention
    self.dedup_attention_fn = DEDUP_BACKENDS[attention]
    self.auto_min_saved_tokens = auto_min_saved_tokens
    self._planner = None  # built on the first shared-prefix decode (needs the block size)
    self.last_decode_attention = None  # "paged" or "dedup": what the last decode step used
    # Donating the pools lets XLA update the cache in place (GPU); the caller must then
    # not reuse the cache it passed in. Off on CPU so tests can compare old and new.
    self.donate = jax.default_backend() != "cpu" if donate is None else donate
    self._forward = model_lib.forward_donating if self.donate else model_lib.forward

  def _check_tokens(self, tokens) -> np.ndarray:
    arr = np.asarray(tokens)
    if arr.size and np.issubdtype(arr.dtype, np.integer):
      bad = (arr < 0) | (arr >= self.cfg.vocab_size)
      if bad.any():
        raise CacheError(f"token id {int(arr[bad][0])} is outside the vocabulary "
                         f"[0, {self.cfg.vocab_size})")
    return arr

  def _step(self, cache: PagedCache, tokens: np.ndarray, view, attention_fn=None):
    logits, pools = self._forward(self.params, cache.pools, jnp.asarray(tokens, jnp.int32),
                                  view, cfg=self.cfg,
                                  attention_fn=attention_fn or self.attention_fn)
    return logits, cache.with_pools(pools)

  def _decode_view(self, cache: PagedCache, slots, lens):
    """The decode view and attention function: the plan attached when dedup is chosen."""
    view = cache.view(slots, [n - 1 for n in lens], 1)
    if self.decode_attention == "paged":
      self.last_decode_attention = "paged"
      return view, self.attention_fn
    from hq_jax.kv import sharing
    if self._planner is None or self._planner.block_size != cache.block_size:
      from pallas_kernels.dedup_attention import default_config
      group = self.cfg.num_heads // self.cfg.num_kv_heads
      self._planner = sharing.SharingPlanner(
          cache.block_size,
          requests_per_tile=default_config(self.cfg.head_dim).requests_per_tile(group))
    plan, summary = self._planner.plan(np.asarray(cache.block_tables)[slots], lens)
    if self.decode_attention == "auto" and summary.saved_tokens < self.auto_min_saved_tokens:
      self.last_decode_attention = "paged"
      return view, self.attention_fn
    self.last_decode_attention = "dedup"
    return dataclasses.replace(view, sharing=plan), self.dedup_attention_fn

  def prefill(self, cache: PagedCache, tokens: Sequence[int], *, salt: int = 0,
              logits: str = "all") -> tuple[PagedCache, PrefillResult]:
    """Admits a prompt and computes its K/V; returns (new cache, result)."""
    if logits not in ("all", "last"):
      raise ValueError(f"logits must be 'all' or 'last', got {logits!r}")
    if self.chunk_size % cache.block_size:
      raise CacheError(f"chunk_size {self.chunk_size} is not a multiple of the cache's "
                       f"block_size {cache.block_size}")
    prompt = self._check_tokens(tokens)
    t0 = time.perf_counter()
    cache, slot = cache.admit(prompt, salt)
    n, c = prompt.size, self.chunk_size
    hit = int(cache.seq_lens[slot])
    first_chunk = min(hit // c, (n - 1) // c)
    kept = []
    for start in range(first_chunk * c, n, c):
      chunk = np.zeros((1, c), np.int32)
      valid = min(c, n - start)
      chunk[0, :valid] = prompt[start:start + valid]
      out, cache = self._step(cache, chunk, cache.view([slot], [start], c))
      kept.append(out[0, :valid] if logits == "all" else out[0, valid - 1:valid])
    cache = cache.commit(slot, n)
    last = kept[-1][-1].block_until_ready()
    ttft = time.perf_counter() - t0
    return cache, PrefillResult(
        slot=slot, prompt_tokens=n, hit_tokens=hit, cached_tokens=first_chunk * c,
        computed_tokens=n - first_chunk * c, first_position=first_chunk * c,
        logits=jnp.concatenate(kept) if logits == "all" else None, last_logits=last,
        ttft_s=ttft)

  def decode(self, cache: PagedCache, slots: Sequence[int],
             tokens: Sequence[int]) -> tuple[PagedCache, jax.Array]:
    """Feeds one new token to each slot; returns (cache, logits [B, vocab])."""
    slots, tokens = list(slots), self._check_tokens(tokens).reshape(-1)
    if len(slots) != tokens.size or not slots:
      raise CacheError(f"decode needs one token per slot, got {len(slots)} slots and "
                       f"{tokens.size} tokens")
    if len(set(slots)) != len(slots):
      raise CacheError(f"decode got a slot twice: {slots}")
    cache = cache.append_batch(slots, [int(t) for t in tokens])
    lens = [int(cache.req_lens[s]) for s in slots]
    view, attention_fn = self._decode_view(cache, slots, lens)
    out, cache = self._step(cache, tokens[:, None], view, attention_fn)
    return cache.commit_batch(slots, lens), out[:, 0]

  def generate(self, cache: PagedCache, prompt: Sequence[int], steps: int, *, salt: int = 0):
    """Greedy decoding of `steps` tokens after `prompt`: (cache, slot, new token ids)."""
    cache, res = self.prefill(cache, prompt, salt=salt, logits="last")
    out = [int(jnp.argmax(res.last_logits))]
    for _ in range(steps - 1):
      cache, logits = self.decode(cache, [res.slot], [out[-1]])
      out.append(int(jnp.argmax(logits[0])))
    return cache, res.slot, out
