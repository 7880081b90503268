"""Qwen2 byte-level BPE via the `tokenizers` library, from a GGUF vocab or a tokenizer.json.

The GGUF path rebuilds exactly what Qwen2's tokenizer.json describes: BPE with no
byte fallback, NFC normalization, a Split on Qwen2's pre-tokenizer regex (isolated)
then ByteLevel without its own regex, a ByteLevel decoder, control tokens as
special tokens. No BOS is added (Qwen2 sets add_bos_token false).
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers

# Qwen2's pre-tokenizer pattern (tokenizer.json of every Qwen2/2.5 checkpoint).
QWEN2_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_GGUF_CONTROL = 3  # llama.cpp token type: CONTROL.


class Tokenizer:
  """Thin wrapper: `encode(text) -> list[int]`, `decode(ids) -> str`."""

  name = "qwen2-bpe"

  def __init__(self, tok: tokenizers.Tokenizer, *, eos_id: int | None = None):
    self._tok = tok
    self.eos_id = eos_id

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode(list(ids), skip_special_tokens=False)

  def to_json(self) -> str:
    return self._tok.to_str()

  def save(self, path: str) -> None:
    self._tok.save(path)

  @classmethod
  def from_file(cls, path: str) -> "Tokenizer":
    """From an HF `tokenizer.json` (or a directory holding one)."""
    if os.path.isdir(path):
      path = os.path.join(path, "tokenizer.json")
    if not os.path.exists(path):
      raise FileNotFoundError(f"no tokenizer.json at {path}")
    return cls(tokenizers.Tokenizer.from_file(path))

  @classmethod
  def from_gguf_metadata(cls, metadata: Mapping[str, Any]) -> "Tokenizer":
    """From GGUF `tokenizer.ggml.*` fields (see `hq_jax.weights.gguf_metadata`)."""
    model = metadata.get("tokenizer.ggml.model")
    pre = metadata.get("tokenizer.ggml.pre")
    if model != "gpt2" or pre != "qwen2":
      raise ValueError(
          f"expected a Qwen2 byte-level BPE (tokenizer.ggml.model=gpt2, pre=qwen2), got "
          f"model={model!r}, pre={pre!r}")
    tokens: list[str] = list(metadata["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in metadata["tokenizer.ggml.merges"]]
    types = list(metadata["tokenizer.ggml.token_type"])
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=False,
                                          fuse_unk=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated",
                             invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False,
                                     use_regex=False)
    special = [tokenizers.AddedToken(t, special=True, normalized=False)
               for t, ty in zip(tokens, types) if ty == _GGUF_CONTROL]
    tok.add_special_tokens(special)
    eos = metadata.get("tokenizer.ggml.eos_token_id")
    return cls(tok, eos_id=None if eos is None else int(eos))


class ByteTokenizer:
  """UTF-8 bytes as token ids: the tokenizer of a model that ships none (a preset with
  random weights). Same interface as `Tokenizer`, so callers never branch on "no tokenizer";
  its ids fit any vocabulary of >= 256 entries. Perplexity of random weights means nothing,
  but memory and speed do not depend on what the ids are."""

  name = "utf8-bytes"
  eos_id = None
  vocab_size = 256

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def decode(self, ids: Sequence[int]) -> str:
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def encode_text(tokenizer, text: str, *, vocab_size: int,
                num_tokens: int | None = None) -> np.ndarray:
  """The first `num_tokens` ids of `text` (all when None) as int32, checked to be valid ids
  of a model with `vocab_size` entries (a tokenizer larger than the model's vocabulary would
  otherwise index past the embedding table)."""
  if num_tokens is not None and num_tokens < 2:
    raise ValueError(f"num_tokens must be >= 2, got {num_tokens}")
  if tokenizer.vocab_size > vocab_size and isinstance(tokenizer, ByteTokenizer):
    raise ValueError(f"the model has a vocabulary of {vocab_size} < 256 entries: UTF-8 bytes "
                     "do not fit")
  ids = np.asarray(tokenizer.encode(text), np.int64)
  if num_tokens is not None:
    if ids.size < num_tokens:
      raise ValueError(f"the text has only {ids.size} tokens, fewer than num_tokens={num_tokens}")
    ids = ids[:num_tokens]
  bad = np.flatnonzero((ids < 0) | (ids >= vocab_size))
  if bad.size:
    raise ValueError(f"{tokenizer.name} tokenizer produced id {int(ids[bad[0]])} at position "
                     f"{int(bad[0])}, outside the model's vocabulary [0, {vocab_size})")
  return ids.astype(np.int32)
