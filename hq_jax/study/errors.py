"""The study's errors and the input checks every script shares (one rule, one place)."""

from __future__ import annotations

from hq_jax.config import ModelConfig


class HarnessError(RuntimeError):
  """A measured row is inconsistent: the sweep stops rather than report it."""


def check_positive(flag: str, values, *, minimum: int | float = 1) -> list:
  """The values of a grid flag, refusing an empty list and values below `minimum`."""
  values = list(values)
  if not values:
    raise ValueError(f"--{flag} is empty: give at least one value")
  bad = [v for v in values if v < minimum]
  if bad:
    raise ValueError(f"--{flag}={','.join(str(v) for v in values)}: {bad[0]} is below "
                     f"{minimum}")
  return values


def check_context_limit(cfg: ModelConfig, tokens: int, flag: str,
                        allow_long_context: bool = False) -> None:
  """Refuses requests longer than the model's trained context unless explicitly allowed
  (RoPE positions past it run silently but mean nothing)."""
  if tokens > cfg.max_position_embeddings and not allow_long_context:
    raise ValueError(f"{flag}: requests of {tokens} tokens exceed {cfg.name}'s "
                     f"max_position_embeddings {cfg.max_position_embeddings}; pass "
                     "--allow_long_context to run them anyway")
