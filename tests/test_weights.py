"""Loaders: GGUF and HF safetensors round trips on `tiny`, clear errors on bad files."""

import json
import os

import chex
import gguf
import numpy as np
import pytest
from safetensors.numpy import save_file

from hq_jax import weights
from hq_jax.weights import WeightsError


def _write_gguf(path, params, cfg, drop=()):
  w = gguf.GGUFWriter(str(path), "qwen2")
  w.add_block_count(cfg.num_layers)
  w.add_embedding_length(cfg.hidden_size)
  w.add_feed_forward_length(cfg.intermediate_size)
  w.add_head_count(cfg.num_heads)
  w.add_head_count_kv(cfg.num_kv_heads)
  w.add_rope_freq_base(cfg.rope_theta)
  w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  w.add_context_length(cfg.max_position_embeddings)
  for name, value in weights.to_state_dict(params, cfg, names="gguf").items():
    if name not in drop:
      w.add_tensor(name, value)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def test_gguf_round_trip(tiny, tmp_path):
  params, cfg = tiny
  _write_gguf(tmp_path / "tiny.gguf", params, cfg)
  loaded, lcfg, tok = weights.load_gguf(str(tmp_path / "tiny.gguf"), name="tiny")
  assert tok is None
  assert lcfg.replace(name="tiny") == cfg.replace(max_position_embeddings=4096)
  chex.assert_trees_all_equal(loaded, params)


def test_gguf_missing_tensor(tiny, tmp_path):
  params, cfg = tiny
  _write_gguf(tmp_path / "t.gguf", params, cfg, drop={"blk.1.ffn_up.weight"})
  with pytest.raises(WeightsError, match="missing tensor 'blk.1.ffn_up.weight'"):
    weights.load_gguf(str(tmp_path / "t.gguf"))


def test_gguf_corrupted_and_wrong_sha(tiny, tmp_path):
  params, cfg = tiny
  good = tmp_path / "t.gguf"
  _write_gguf(good, params, cfg)
  data = good.read_bytes()
  (tmp_path / "truncated.gguf").write_bytes(data[:len(data) // 3])
  with pytest.raises(WeightsError, match="not a readable GGUF"):
    weights.load_gguf(str(tmp_path / "truncated.gguf"))
  (tmp_path / "garbage.gguf").write_bytes(b"not a gguf at all" * 10)
  with pytest.raises(WeightsError, match="not a readable GGUF"):
    weights.load_gguf(str(tmp_path / "garbage.gguf"))
  with pytest.raises(WeightsError, match="sha256"):
    weights.load_gguf(str(good), expected_sha256="0" * 64)
  with pytest.raises(FileNotFoundError):
    weights.load_gguf(str(tmp_path / "absent.gguf"))


def _hf_config(cfg):
  return {"model_type": "qwen2", "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
          "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
          "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
          "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.rms_norm_eps,
          "tie_word_embeddings": cfg.tie_word_embeddings,
          "max_position_embeddings": cfg.max_position_embeddings}


def test_hf_single_file_and_sharded(tiny, tmp_path):
  params, cfg = tiny
  state = weights.to_state_dict(params, cfg)
  single = tmp_path / "single"
  single.mkdir()
  (single / "config.json").write_text(json.dumps(_hf_config(cfg)))
  save_file(state, str(single / "model.safetensors"))
  loaded, lcfg, tok = weights.load_hf(str(single))
  chex.assert_trees_all_equal(loaded, params)
  assert tok is None and lcfg.num_layers == cfg.num_layers

  sharded = tmp_path / "sharded"
  sharded.mkdir()
  (sharded / "config.json").write_text(json.dumps(_hf_config(cfg)))
  names = sorted(state)
  halves = {"model-00001-of-00002.safetensors": names[::2],
            "model-00002-of-00002.safetensors": names[1::2]}
  for fname, keys in halves.items():
    save_file({k: state[k] for k in keys}, str(sharded / fname))
  index = {"weight_map": {k: f for f, keys in halves.items() for k in keys}}
  (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
  loaded, _, _ = weights.load_hf(str(sharded))
  chex.assert_trees_all_equal(loaded, params)

  del index["weight_map"]["model.layers.0.self_attn.q_proj.bias"]
  (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
  with pytest.raises(WeightsError, match="missing tensor 'model.layers.0.self_attn.q_proj.bias'"):
    weights.load_hf(str(sharded))


def test_hf_tensor_of_the_wrong_shape_is_named(tiny, tmp_path):
  """A part of a fused projection (here one layer's k_proj) of the wrong shape: one
  WeightsError naming that tensor, not a numpy error from stacking or concatenating."""
  params, cfg = tiny
  state = weights.to_state_dict(params, cfg)
  name = f"model.layers.{cfg.num_layers - 1}.self_attn.k_proj.weight"
  state[name] = state[name][:-1]
  (tmp_path / "config.json").write_text(json.dumps(_hf_config(cfg)))
  save_file(state, str(tmp_path / "model.safetensors"))
  with pytest.raises(WeightsError, match=f"tensor {name} has shape"):
    weights.load_hf(str(tmp_path))


def test_orbax_round_trip(tiny, tmp_path):
  params, cfg = tiny
  weights.save_params(str(tmp_path / "ckpt"), params)
  chex.assert_trees_all_equal(weights.restore_params(str(tmp_path / "ckpt"), cfg), params)


def test_shipped_parts_missing_or_corrupt(tmp_path, monkeypatch):
  monkeypatch.setenv("HQ_JAX_CACHE", str(tmp_path / "cache"))
  monkeypatch.setattr(weights, "_part_path", lambda pkg: None)
  with pytest.raises(FileNotFoundError, match=r"hq-jax\[model\]"):
    weights.shipped_gguf_path()
  parts = []
  for i in range(6):
    p = tmp_path / f"part{i}.bin"
    p.write_bytes(os.urandom(1000))
    parts.append(str(p))
  monkeypatch.setattr(weights, "_part_path", lambda pkg: parts[int(pkg[-1]) - 1])
  with pytest.raises(WeightsError, match="expected 1d9614638d"):
    weights.shipped_gguf_path()
  # Nothing half-assembled is left where a later load would find it.
  assert not os.listdir(tmp_path / "cache" / "models")


def _largest_file(directory):
  files = [os.path.join(d, f) for d, _, fs in os.walk(directory) for f in fs]
  return max(files, key=os.path.getsize)


def test_converted_cache_is_verified_on_every_load(tiny, tmp_path):
  """Issue 14 defect 1: a bit flip in the orbax params or an edited config.json was used
  silently (ppl nan or a wrong model, rc 0)."""
  params, cfg = tiny
  gguf_path = str(tmp_path / "tiny.gguf")
  _write_gguf(gguf_path, params, cfg)
  cache = str(tmp_path / "cache")
  loaded, lcfg, _ = _load_tiny_cached(gguf_path, cache)
  chex.assert_trees_all_equal(loaded, params)
  again, _, _ = _load_tiny_cached(gguf_path, cache)  # From the cache, verified.
  chex.assert_trees_all_equal(again, params)

  victim = _largest_file(os.path.join(cache, "orbax-float32"))
  data = bytearray(open(victim, "rb").read())
  data[len(data) // 2] ^= 0x01  # One bit.
  open(victim, "wb").write(bytes(data))
  with pytest.raises(WeightsError, match=r"corrupt.*prepare --force"):
    _load_tiny_cached(gguf_path, cache)
  loaded, _, _ = _load_tiny_cached(gguf_path, cache, force=True)  # The rebuild command.
  chex.assert_trees_all_equal(loaded, params)

  cfg_path = os.path.join(cache, "config.json")
  good = open(cfg_path).read()
  edited = json.loads(good)
  edited["rope_theta"] = edited["rope_theta"] / 100
  open(cfg_path, "w").write(json.dumps(edited))
  with pytest.raises(WeightsError, match="config.json does not match its sha256"):
    _load_tiny_cached(gguf_path, cache)
  # Even with the manifest updated to match, the GGUF header disagrees.
  manifest_path = os.path.join(cache, "manifest-float32.json")
  manifest = json.loads(open(manifest_path).read())
  manifest["files"]["config.json"] = weights._sha256_file(cfg_path)
  open(manifest_path, "w").write(json.dumps(manifest))
  with pytest.raises(WeightsError, match="disagrees with the GGUF on rope_theta"):
    _load_tiny_cached(gguf_path, cache)


def _load_tiny_cached(gguf_path, cache, force=False):
  """`load_converted` on a GGUF without a vocabulary: the cached tokenizer is a stub."""
  import tokenizers
  real = weights.load_gguf

  def with_stub_tokenizer(*a, **kw):
    params, cfg, tok = real(*a, **kw)
    stub = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    return params, cfg, tok or weights.Tokenizer(stub)

  weights.load_gguf = with_stub_tokenizer
  try:
    return weights.load_converted(gguf_path, cache, name="tiny", force=force)
  finally:
    weights.load_gguf = real


def test_gguf_header_config_matches_the_gguf_reader(tiny, tmp_path):
  params, cfg = tiny
  _write_gguf(tmp_path / "t.gguf", params, cfg)
  _, full_cfg, _ = weights.load_gguf(str(tmp_path / "t.gguf"), name="tiny")
  assert weights._gguf_header_config(str(tmp_path / "t.gguf"), "tiny") == full_cfg


def test_uppercase_sha256_is_accepted(tiny, tmp_path):
  """Issue 14 defect 8: an uppercase sha256 was rejected."""
  params, cfg = tiny
  path = tmp_path / "t.gguf"
  _write_gguf(path, params, cfg)
  digest = weights._sha256_file(str(path))
  weights.verify_sha256(str(path), digest.upper())
  with pytest.raises(WeightsError, match="sha256"):
    weights.verify_sha256(str(path), "F" * 64)


def test_load_model_always_returns_a_tokenizer():
  """Issue 14 structure 3: presets read UTF-8 bytes through a tokenizer, not `None`."""
  from hq_jax.tokenizer import ByteTokenizer, encode_text
  _, cfg, tok = weights.load_model("tiny")
  assert isinstance(tok, ByteTokenizer) and tok.name == "utf8-bytes"
  ids = encode_text(tok, "héllo", vocab_size=cfg.vocab_size)
  assert ids.tolist() == list("héllo".encode()) and tok.decode(ids) == "héllo"
  with pytest.raises(ValueError, match="fewer than num_tokens=99"):
    encode_text(tok, "short", vocab_size=cfg.vocab_size, num_tokens=99)
  with pytest.raises(ValueError, match="UTF-8 bytes do not fit"):
    encode_text(tok, "abc", vocab_size=128)

  class Big(ByteTokenizer):  # A tokenizer larger than the model (issue 14 defect 6).
    def encode(self, text):
      return [1, 2, 2**31 + 5]

  with pytest.raises(ValueError, match=r"id 2147483653 at position 2, outside the model's"):
    encode_text(Big(), "abc", vocab_size=cfg.vocab_size)


def test_prepare_command_usage(capsys):
  """The rebuild command named by every cache error parses (--force, nothing else)."""
  assert weights.main(["weights", "prepare", "--bogus"]) == 2
  assert "prepare [--force]" in capsys.readouterr().out
  assert weights.REBUILD_COMMAND == "python -m hq_jax.weights prepare --force"
