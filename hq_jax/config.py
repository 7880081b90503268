"""Model configuration: a frozen dataclass, named Qwen2/2.5 presets, HF and GGUF adapters."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and numerics of a Qwen2-family decoder.

  `dtype` is the dtype of parameters, activations and the KV cache; softmax,
  norms and accumulation are float32 whatever it is.
  """

  name: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 1_000_000.0
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  max_position_embeddings: int = 32768
  dtype: str = "float32"

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
          f"({self.num_kv_heads}) for grouped-query attention")
    if self.head_dim % 2:
      raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
    if self.dtype not in ("float32", "bfloat16", "float16"):
      raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")

  @property
  def jnp_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def q_per_kv(self) -> int:
    return self.num_heads // self.num_kv_heads

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def context_limit(self, allow_long_context: bool = False) -> int | None:
    """The most tokens a request may hold under the context rule (None: no limit)."""
    return None if allow_long_context else self.max_position_embeddings

  def check_context(self, tokens: int, allow_long_context: bool = False,
                    what: str = "a request") -> None:
    """The context rule, the one place it is written: a request longer than the trained
    context (`max_position_embeddings`) is refused unless explicitly allowed (RoPE
    positions past it run silently but mean nothing)."""
    limit = self.context_limit(allow_long_context)
    if limit is not None and tokens > limit:
      raise ContextLengthError(
          f"{what}: {tokens} tokens exceed {self.name}'s max_position_embeddings "
          f"{self.max_position_embeddings}; pass --allow_long_context (Engine("
          "allow_long_context=True)) to run them anyway", tokens=tokens,
          limit=self.max_position_embeddings)


class ContextLengthError(ValueError):
  """A request is longer than the model's trained context (`ModelConfig.check_context`);
  `tokens` and `limit` say by how much, so a caller can skip and count it."""

  def __init__(self, message: str, *, tokens: int, limit: int):
    super().__init__(message)
    self.tokens, self.limit = tokens, limit


def _qwen(name, hidden, inter, layers, heads, kv, *, vocab=151936, tie=True, eps=1e-6):
  return ModelConfig(
      name=name, vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
      num_layers=layers, num_heads=heads, num_kv_heads=kv, head_dim=hidden // heads,
      rms_norm_eps=eps, tie_word_embeddings=tie)


# Shapes from the HF config.json of each Qwen2.5 base model. Only the shipped
# Coder-0.5B has weights here; the others run with seeded random weights.
PRESETS: dict[str, ModelConfig] = {
    "qwen2.5-0.5b": _qwen("qwen2.5-0.5b", 896, 4864, 24, 14, 2),
    "qwen2.5-1.5b": _qwen("qwen2.5-1.5b", 1536, 8960, 28, 12, 2),
    "qwen2.5-3b": _qwen("qwen2.5-3b", 2048, 11008, 36, 16, 2),
    "qwen2.5-7b": _qwen("qwen2.5-7b", 3584, 18944, 28, 28, 4, vocab=152064, tie=False),
    "qwen2.5-14b": _qwen("qwen2.5-14b", 5120, 13824, 48, 40, 8, vocab=152064, tie=False,
                         eps=1e-5),
    "qwen2.5-32b": _qwen("qwen2.5-32b", 5120, 27648, 64, 40, 8, vocab=152064, tie=False,
                         eps=1e-5),
    "qwen2.5-72b": _qwen("qwen2.5-72b", 8192, 29568, 80, 64, 8, vocab=152064, tie=False,
                         eps=1e-5),
    # The shipped GGUF: same shape as 0.5B but with its own (untied) output matrix.
    "qwen2.5-coder-0.5b": _qwen("qwen2.5-coder-0.5b", 896, 4864, 24, 14, 2, tie=False),
    # Real Qwen2 structure (GQA 2:1, biases, untied head) at toy size, for fast tests.
    "tiny": ModelConfig(
        name="tiny", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10_000.0,
        max_position_embeddings=4096),
}
# Short aliases used by scripts (`--model=7b`).
_ALIASES = {"0.5b": "qwen2.5-0.5b", "1.5b": "qwen2.5-1.5b", "3b": "qwen2.5-3b",
            "7b": "qwen2.5-7b", "14b": "qwen2.5-14b", "32b": "qwen2.5-32b",
            "72b": "qwen2.5-72b", "coder-0.5b": "qwen2.5-coder-0.5b"}


def get_config(name: str, **overrides) -> ModelConfig:
  """Returns the named preset, with `overrides` (e.g. dtype="bfloat16") applied."""
  key = _ALIASES.get(name.lower(), name.lower())
  if key not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS) + sorted(_ALIASES)}")
  return PRESETS[key].replace(**overrides) if overrides else PRESETS[key]


def from_hf_config(config: str | os.PathLike | Mapping[str, Any], *, name: str | None = None,
                   dtype: str = "float32") -> ModelConfig:
  """Builds a config from an HF `config.json` (a path, a directory holding one, or a dict)."""
  where = "the HF config"
  if not isinstance(config, Mapping):
    path = where = os.fspath(config)
    if os.path.isdir(path):
      path = where = os.path.join(path, "config.json")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path}: no HF config.json there")
    try:
      with open(path, encoding="utf-8") as f:
        config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f"{path} is not valid JSON (truncated or corrupt?): {e}") from None
  if not isinstance(config, Mapping):
    raise ValueError(f"{where} is a JSON {type(config).__name__}, not an object of config keys")
  model_type = config.get("model_type", "qwen2")
  if model_type != "qwen2":
    raise ValueError(f"{where}: only qwen2 checkpoints are supported, got "
                     f"model_type={model_type!r}")
  missing = [k for k in ("num_attention_heads", "vocab_size", "hidden_size",
                         "intermediate_size", "num_hidden_layers") if k not in config]
  if missing:
    raise ValueError(f"{where} lacks {', '.join(missing)}: not a Qwen2 config.json")
  try:
    return _hf_model_config(config, name, dtype)
  except (TypeError, ValueError, ZeroDivisionError) as e:
    raise ValueError(f"{where}: {e}") from None


def _hf_model_config(config: Mapping[str, Any], name: str | None, dtype: str) -> ModelConfig:
  ints = {k: config[k] for k in ("num_attention_heads", "vocab_size", "hidden_size",
                                 "intermediate_size", "num_hidden_layers")}
  bad = [k for k, v in ints.items() if not isinstance(v, int) or isinstance(v, bool) or v < 1]
  if bad:
    raise ValueError(f"{bad[0]} must be a positive integer, got {config[bad[0]]!r}")
  heads = config["num_attention_heads"]
  return ModelConfig(
      name=name or config.get("_name_or_path") or "hf-qwen2",
      vocab_size=config["vocab_size"],
      hidden_size=config["hidden_size"],
      intermediate_size=config["intermediate_size"],
      num_layers=config["num_hidden_layers"],
      num_heads=heads,
      num_kv_heads=config.get("num_key_value_heads", heads),
      head_dim=config.get("head_dim") or config["hidden_size"] // heads,
      rope_theta=float(config.get("rope_theta", 10_000.0)),
      rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
      tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
      max_position_embeddings=config.get("max_position_embeddings", 32768),
      dtype=dtype)


def from_gguf(metadata: Mapping[str, Any], *, tied: bool, name: str | None = None,
              dtype: str = "float32") -> ModelConfig:
  """Builds a config from GGUF key/values (`hq_jax.weights.gguf_metadata`).

  `tied` says whether the file lacks `output.weight` (then the head reuses the
  embedding); GGUF metadata itself does not record it.
  """
  arch = metadata.get("general.architecture")
  if arch != "qwen2":
    raise ValueError(f"only qwen2 GGUF files are supported, got general.architecture={arch!r}")
  p = "qwen2."
  hidden = int(metadata[p + "embedding_length"])
  heads = int(metadata[p + "attention.head_count"])
  return ModelConfig(
      name=name or str(metadata.get("general.name", "gguf-qwen2")),
      vocab_size=int(metadata["vocab_size"]),
      hidden_size=hidden,
      intermediate_size=int(metadata[p + "feed_forward_length"]),
      num_layers=int(metadata[p + "block_count"]),
      num_heads=heads,
      num_kv_heads=int(metadata.get(p + "attention.head_count_kv", heads)),
      head_dim=hidden // heads,
      rope_theta=float(metadata.get(p + "rope.freq_base", 10_000.0)),
      # GGUF stores eps as float32 (9.99999997e-07); round back to the decimal it came from.
      rms_norm_eps=float(f"{float(metadata[p + 'attention.layer_norm_rms_epsilon']):.6g}"),
      tie_word_embeddings=tied,
      max_position_embeddings=int(metadata.get(p + "context_length", 32768)),
      dtype=dtype)
