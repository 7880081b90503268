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
