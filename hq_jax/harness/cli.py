"""Plain absl flags mirrored from an ml_collections config, so that both
`--config=configs/x.py --config.num_tokens=256` and plain `--num_tokens=256` work,
and `--help` lists every field with its default."""

from __future__ import annotations

import datetime
import json
import os
import platform

import jax
import ml_collections
from absl import flags


# Help of the fields every script shares; a script's own text for a field wins.
COMMON_HELPS = {
    "model": "'shipped', a preset name (seeded random weights), a .gguf file or an HF dir",
    "block_size": "KV block size in tokens",
    "chunk_size": "prefill chunk (a multiple of block_size)",
    "dtype": "float32 | bfloat16",
}
REQUEST_TEXT_HELP = ("UTF-8 text the requests are cut from; empty = the shipped Wikipedia "
                     "articles")


def define_flags(defaults: ml_collections.ConfigDict, helps: dict[str, str]) -> None:
  """Defines one flag per top-level field, defaulting to None (= keep the config's value)."""
  helps = {**COMMON_HELPS, **helps}
  for name, value in defaults.items():
    help_ = f"{helps.get(name, '')} (config default: {value!r})"
    if isinstance(value, bool):
      flags.DEFINE_boolean(name, None, help_)
    elif isinstance(value, int):
      flags.DEFINE_integer(name, None, help_)
    elif isinstance(value, float):
      flags.DEFINE_float(name, None, help_)
    elif isinstance(value, (list, tuple)):
      flags.DEFINE_list(name, None, help_)
    else:
      flags.DEFINE_string(name, None, help_)


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config with every plain flag that was given on the command line applied."""
  config = ml_collections.ConfigDict(config.to_dict())
  for name, default in config.items():
    value = flags.FLAGS[name].value if name in flags.FLAGS else None
    if value is None:
      continue
    if isinstance(default, (list, tuple)):
      elem = type(default[0]) if default else str
      value = [elem(v) for v in value]
    config[name] = value
  return config


def run_metadata() -> dict:
  """Where and when a result was produced (goes into every output file)."""
  dev = jax.devices()[0]
  return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "jax_version": jax.__version__, "platform": dev.platform,
          "device": getattr(dev, "device_kind", str(dev)), "host": platform.node(),
          "python": platform.python_version()}


def write_json(path: str, obj) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f, indent=1)


def load_model_and_stream(cfg):
  """(params, model config, token stream of the text) for a sweep config."""
  from absl import logging

  from hq_jax import data, text_tokens, weights
  from hq_jax.workloads import TokenStream

  text = data.read_text(cfg.text_file)
  logging.info("loading model %s (%s)", cfg.model, cfg.dtype)
  params, model_cfg, tok = weights.load_model(cfg.model, dtype=cfg.dtype, seed=cfg.seed)
  if tok is None:
    tok = _shipped_tokenizer_if_it_fits(model_cfg)
  stream = TokenStream(text_tokens.tokenize(text, tok, model_cfg))
  logging.info("text: %d tokens", len(stream))
  return params, model_cfg, stream


def _shipped_tokenizer_if_it_fits(model_cfg):
  """Random-weight presets of the Qwen2.5 family read real Qwen2 token ids when available."""
  from hq_jax import config, weights
  # Decide from the preset's vocabulary before loading anything (`tiny` has 512 ids).
  if model_cfg.vocab_size < config.get_config("coder-0.5b").vocab_size:
    return None
  try:
    return weights.load_shipped()[2]
  except (FileNotFoundError, ValueError):
    return None


def command_line() -> str:
  import shlex
  import sys
  return " ".join(shlex.quote(a) for a in sys.argv)
