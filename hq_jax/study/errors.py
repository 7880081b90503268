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
  """`ModelConfig.check_context` (the one context rule, which `Engine.prefill` applies
  too), its error naming the flag that asked for `tokens`."""
  cfg.check_context(tokens, allow_long_context, what=f"{flag}: requests")
