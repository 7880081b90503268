"""Requests for the harness, cut from real text: the grid and the named workloads.

All requests are slices of one token stream (the shipped Wikipedia articles, or any
text). A request of the memory grid has exactly `context_length` tokens: a shared
prefix of round_down_to_block(fraction * context_length) tokens, then a unique suffix.
Suffixes start at distinct offsets of the stream, so no two requests share a block
beyond their common prefix (block identity chains from the first token: two suffixes
would have to be equal from their first token on). The stream wraps around when a
large sweep needs more tokens than the text has.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Request:
  tokens: np.ndarray  # [n] int32
  salt: int = 0
  group: int = 0  # Which shared prefix it carries (-1: none).

  def __len__(self):
    return int(self.tokens.size)


class TokenStream:
  """Deterministic slices of a token stream: `take(offset, n)` wraps around."""

  def __init__(self, ids: np.ndarray, vocab_size: int | None = None):
    ids = np.asarray(ids)
    if ids.dtype.kind not in "iu":
      raise ValueError(f"token ids must be integers, got dtype {ids.dtype}")
    if ids.size and (ids.min() < 0 or (vocab_size is not None and ids.max() >= vocab_size)
                     or ids.max() > np.iinfo(np.int32).max):
      bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
      raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab_size})")
    ids = ids.astype(np.int32)
    if ids.size < 64:
      raise ValueError(f"the text has only {ids.size} tokens; need at least 64")
    self.ids = ids

  def __len__(self):
    return int(self.ids.size)

  def take(self, offset: int, n: int) -> np.ndarray:
    idx = (offset + np.arange(n)) % self.ids.size
    return self.ids[idx]


def shared_prefix_tokens(context_length: int, fraction: float, block_size: int) -> int:
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f"shared_prefix_fraction must be in [0, 1], got {fraction}")
  return int(fraction * context_length) // block_size * block_size


def grid_requests(stream: TokenStream, *, context_length: int, concurrency: int,
                  shared_prefix_fraction: float, num_prefixes: int = 1, block_size: int = 16,
                  seed: int = 0) -> list[Request]:
  """`concurrency` requests of exactly `context_length` tokens; request i carries prefix
  i % num_prefixes. Offsets are drawn from `seed`, distinct for every slice."""
  if context_length <= 0 or concurrency <= 0 or num_prefixes <= 0:
    raise ValueError("context_length, concurrency and num_prefixes must be positive, got "
                     f"{context_length}, {concurrency}, {num_prefixes}")
  p = shared_prefix_tokens(context_length, shared_prefix_fraction, block_size)
  rng = np.random.default_rng(seed)
  # Distinct starting offsets for every prefix and suffix (so no accidental sharing).
  n_slices = num_prefixes + concurrency
  offsets = rng.choice(len(stream), size=n_slices, replace=n_slices > len(stream))
  prefixes = [stream.take(int(o), p) for o in offsets[:num_prefixes]]
  out = []
  for i in range(concurrency):
    g = i % num_prefixes
    suffix = stream.take(int(offsets[num_prefixes + i]), context_length - p)
    out.append(Request(np.concatenate([prefixes[g], suffix]).astype(np.int32),
                       group=g if p else -1))
  return out


def check_grid_distinct(requests: Sequence[Request], *, shared_tokens: int,
                        block_size: int) -> None:
  """Raises ValueError when two requests would share a whole block beyond their common
  prefix: a text so repetitive that slices at distinct offsets are equal. The memory
  prediction assumes they differ, so the sweep would otherwise fail later with a
  misleading accounting error. (Block identity chains, so comparing the first whole block
  after the shared prefix is enough.)"""
  seen: dict[tuple, int] = {}
  if shared_tokens >= block_size:
    for i, r in enumerate(requests):  # Distinct prefixes must differ from their first block.
      key = ("prefix", r.tokens[:block_size].tobytes())
      if key in seen and requests[seen[key]].group != r.group:
        raise ValueError(_repetitive(seen[key], i))
      seen.setdefault(key, i)
  for i, r in enumerate(requests):
    first = r.tokens[shared_tokens:shared_tokens + block_size]
    if first.size < block_size:
      continue  # A partial block is never shared.
    key = (r.group if shared_tokens else -1, first.tobytes())
    if key in seen:
      raise ValueError(_repetitive(seen[key], i))
    seen[key] = i


def _repetitive(i: int, j: int) -> str:
  return (f"the text is too repetitive for distinct requests: requests {i} and {j} would be "
          "equal beyond their shared prefix (slices at different offsets hold the same "
          "tokens); use a longer, less repetitive --text_file")


# ------------------------------------------------------------- named workloads


def system_prompt(stream: TokenStream, *, users: int, system_tokens: int, user_tokens: int,
                  seed: int = 0) -> list[Request]:
  """One system prompt shared by all users, then each user's own turn."""
  rng = np.random.default_rng(seed)
  offs = rng.choice(len(stream), size=users + 1, replace=False)
  system = stream.take(int(offs[0]), system_tokens)
  return [Request(np.concatenate([system, stream.take(int(o), user_tokens)]), group=0)
          for o in offs[1:]]


def multi_turn(stream: TokenStream, *, turns: int, tokens_per_turn: int,
               seed: int = 0) -> list[Request]:
  """A conversation: request k is turns 1..k, each extending the previous request."""
  rng = np.random.default_rng(seed)
  convo = stream.take(int(rng.integers(len(stream))), turns * tokens_per_turn)
  return [Request(convo[:(k + 1) * tokens_per_turn], group=0) for k in range(turns)]


def few_shot(stream: TokenStream, *, requests: int, examples: int, example_tokens: int,
             question_tokens: int, seed: int = 0) -> list[Request]:
  """The same few-shot examples, then a distinct question per request."""
  rng = np.random.default_rng(seed)
  offs = rng.choice(len(stream), size=examples + requests, replace=False)
  shots = np.concatenate([stream.take(int(o), example_tokens) for o in offs[:examples]])
  return [Request(np.concatenate([shots, stream.take(int(o), question_tokens)]), group=0)
          for o in offs[examples:]]
