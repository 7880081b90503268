"""Token ids from text for a model: its own tokenizer, or UTF-8 bytes for random presets."""

from __future__ import annotations

import numpy as np
from absl import logging

from hq_jax.config import ModelConfig


def tokenize(text: str, tokenizer, cfg: ModelConfig, num_tokens: int | None = None) -> np.ndarray:
  """The first `num_tokens` ids of `text` (all when None); a clear error if it is shorter.

  A model without a tokenizer (a preset with random weights) reads UTF-8 bytes, which
  fit any vocabulary of >= 256 entries; perplexity of random weights means nothing, but
  memory and speed do not depend on what the ids are.
  """
  if tokenizer is not None:
    ids = np.asarray(tokenizer.encode(text), np.int32)
  else:
    if cfg.vocab_size < 256:
      raise ValueError(f"{cfg.name} has no tokenizer and a vocabulary of {cfg.vocab_size} < 256")
    logging.warning("%s has no tokenizer: using UTF-8 bytes as token ids", cfg.name)
    ids = np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)
  if num_tokens is not None:
    if num_tokens < 2:
      raise ValueError(f"num_tokens must be >= 2, got {num_tokens}")
    if ids.size < num_tokens:
      raise ValueError(f"the text has only {ids.size} tokens, fewer than num_tokens={num_tokens}")
    ids = ids[:num_tokens]
  return ids
