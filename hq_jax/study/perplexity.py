"""Perplexity of real text, dense vs HQ, with the logit difference between them.

Three runs over the same `token_ids`:
  dense          one request, full chunked prefill on the dense cache;
  hq             the same on the HQ cache ("full_prefill" difference);
  prefix reuse   on a fresh HQ cache, a request holding the first half (chunk-aligned)
                 is prefilled first, then the full text: its first chunks are skipped
                 and the rest attend to the cached K/V ("prefix_reuse" difference,
                 over the positions it computed).
All three hold K/V in `kv_dtype` (default: the model's dtype). When that is another dtype
(FP8, or bfloat16 K/V under a float32 model), the dense run is repeated with bfloat16 K/V
and with the model's dtype ("kv_dtype_baselines"), so that one run gives what the FP8
ledger row compares.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from hq_jax.config import ModelConfig
from hq_jax.serve.engine import Engine
from hq_jax.study.errors import check_context_limit
from hq_jax.kv.dedup import DedupKVCache
from hq_jax.kv.dense import DenseKVCache
from hq_jax.kv.paged import KVLayout, check_kv_dtype


@jax.jit
def _chunk_nll(logits, next_ids):
  """NLL of `next_ids` under one chunk of logits: [chunk, vocab] -> [chunk] float32."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp, next_ids[:, None], axis=-1)[:, 0]


def token_nll(logits, token_ids, *, chunk: int = 512) -> np.ndarray:
  """NLL of token i+1 given tokens <= i, for each i: [len(token_ids) - 1] float64.

  `logits` ([tokens, vocab], on the host or the device) is scored `chunk` rows at a time,
  padded to one shape (one compile), so the device never holds a [tokens, vocab] float32
  log-softmax. Each row's result does not depend on the others, so the numbers are those
  of a single whole-array log-softmax.
  """
  ids = np.asarray(token_ids, np.int32)
  n = ids.size - 1
  out = np.empty(n, np.float64)
  for start in range(0, n, chunk):
    stop = min(start + chunk, n)
    rows = np.asarray(logits[start:stop])
    nxt = ids[start + 1:stop + 1]
    if stop - start < chunk:  # Pad the last chunk to the common shape.
      rows = np.concatenate([rows, np.zeros((chunk - rows.shape[0], rows.shape[1]), rows.dtype)])
      nxt = np.concatenate([nxt, np.zeros(chunk - nxt.size, np.int32)])
    out[start:stop] = np.asarray(_chunk_nll(rows, nxt), np.float64)[:stop - start]
  return out


def ppl(nll: np.ndarray) -> float:
  return float(np.exp(np.mean(nll)))


def logit_mismatches(a, b, *, chunk: int = 512) -> int:
  """How many entries differ: counts every position where `a == b` is false, so a NaN on
  either side (or both) is a difference, and bit-identical means exactly 0."""
  if a.shape != b.shape:
    raise ValueError(f"logit shapes differ: {a.shape} vs {b.shape}")
  count = 0
  for start in range(0, a.shape[0], chunk):
    x, y = np.asarray(a[start:start + chunk]), np.asarray(b[start:start + chunk])
    count += int(np.count_nonzero(~(x == y)))
  return count


def max_abs_diff(a, b, *, chunk: int = 512) -> float:
  """max |a - b|, NaN-aware: NaN when either side holds a NaN (np.max propagates it, where a
  NaN-dropping reduction would report 0.0 for a corrupted row); inf for an infinite gap."""
  worst = 0.0
  for start in range(0, a.shape[0], chunk):
    x = np.asarray(a[start:start + chunk], np.float64)
    y = np.asarray(b[start:start + chunk], np.float64)
    if np.isnan(x).any() or np.isnan(y).any():
      return float("nan")
    with np.errstate(invalid="ignore"):
      d = np.abs(x - y)
    d = np.where(x == y, 0.0, d)  # Equal infinities are no difference; inf - inf is NaN.
    worst = max(worst, float(np.max(d)) if d.size else 0.0)
  return worst


def _dense_ppl(params, cfg, ids, *, chunk_size, block_size, attention, kv_dtype,
               allow_long_context, mesh=None) -> float:
  """Perplexity of one dense prefill with K/V held in `kv_dtype`."""
  layout = KVLayout.from_config(cfg, block_size, kv_dtype)
  engine = Engine(params, cfg, chunk_size=chunk_size, attention=attention, kv_dtype=kv_dtype,
                  allow_long_context=allow_long_context, mesh=mesh)
  cache = DenseKVCache.for_requests(layout, max_requests=1, max_seq_len=ids.size)
  _, d = engine.prefill(cache, ids)
  return ppl(token_nll(d.logits, ids))


def check_tokens(cfg: ModelConfig, token_ids, allow_long_context: bool = False) -> np.ndarray:
  """The token ids `run` scores, checked (integers in the vocabulary, >= 2, within the
  context rule) before any compute; a script calls it before opening its run."""
  raw = np.asarray(token_ids)
  if raw.dtype.kind not in "iu":
    raise ValueError(f"token ids must be integers, got dtype {raw.dtype}")
  n = raw.size
  if n < 2:
    raise ValueError(f"perplexity needs at least 2 tokens, got {n}")
  if raw.min() < 0 or raw.max() >= cfg.vocab_size:
    bad = int(raw.min()) if raw.min() < 0 else int(raw.max())
    raise ValueError(f"token id {bad} is outside {cfg.name}'s vocabulary [0, {cfg.vocab_size})")
  ids = raw.astype(np.int32)
  check_context_limit(cfg, n, "--num_tokens", allow_long_context)
  return ids


def run(params, cfg: ModelConfig, token_ids, *, chunk_size: int = 64, block_size: int = 16,
        attention: str = "auto", allow_long_context: bool = False,
        kv_dtype: str | None = None, mesh=None) -> dict:
  """Dense, HQ and HQ-with-reuse perplexity of `token_ids` (`mesh`: `Engine(mesh=)`, one
  data row; the result records it)."""
  ids = check_tokens(cfg, token_ids, allow_long_context)
  n = ids.size
  kv_dtype = check_kv_dtype(kv_dtype or cfg.dtype)
  layout = KVLayout.from_config(cfg, block_size, kv_dtype)
  engine = Engine(params, cfg, chunk_size=chunk_size, attention=attention,
                  allow_long_context=allow_long_context, kv_dtype=kv_dtype, mesh=mesh)

  dense = DenseKVCache.for_requests(layout, max_requests=1, max_seq_len=n)
  _, d = engine.prefill(dense, ids)
  hq = DedupKVCache.init(layout, num_blocks=layout.blocks_for(n), max_requests=1,
                         max_seq_len=n)
  _, h = engine.prefill(hq, ids)

  prefix = (n // 2) // chunk_size * chunk_size
  reuse = DedupKVCache.init(layout, num_blocks=2 * layout.blocks_for(n), max_requests=2,
                            max_seq_len=n)
  if prefix:
    reuse, _ = engine.prefill(reuse, ids[:prefix], logits="last")
  _, r = engine.prefill(reuse, ids)

  dense_nll, hq_nll = token_nll(d.logits, ids), token_nll(h.logits, ids)
  dense_reused = d.logits[r.first_position:]
  baselines = {}
  for other in dict.fromkeys(("bfloat16", cfg.dtype)):
    if other != kv_dtype and kv_dtype != cfg.dtype:
      baselines[other] = {"ppl": _dense_ppl(params, cfg, ids, chunk_size=chunk_size,
                                            block_size=block_size, attention=attention,
                                            kv_dtype=other, mesh=mesh,
                                            allow_long_context=allow_long_context)}
  return {
      "num_tokens": int(n),
      "chunk_size": chunk_size,
      "block_size": block_size,
      "attention": engine.attention_label,
      "mesh": engine.mesh_label,
      "model_dtype": cfg.dtype,
      "kv_dtype": kv_dtype,
      # Dense perplexity with K/V in other dtypes (bfloat16, the model's), same tokens.
      "kv_dtype_baselines": baselines,
      "dense": {"ppl": ppl(dense_nll), "nll": dense_nll.tolist()},
      "hq": {"ppl": ppl(hq_nll), "nll": hq_nll.tolist()},
      "max_abs_logit_diff": {
          "full_prefill": max_abs_diff(d.logits, h.logits),
          "prefix_reuse": max_abs_diff(dense_reused, r.logits),
      },
      # The exact test behind "bit-identical": entries where dense == HQ is false.
      "logit_mismatches": {
          "full_prefill": logit_mismatches(d.logits, h.logits),
          "prefix_reuse": logit_mismatches(dense_reused, r.logits),
      },
      "prefix_reuse": {"prefix_tokens": prefix, "cached_tokens": r.cached_tokens,
                       "computed_tokens": r.computed_tokens},
  }
