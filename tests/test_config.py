import json

import pytest

from hq_jax import config


def test_presets_have_real_qwen_shapes():
  c = config.get_config("qwen2.5-7b")
  assert (c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (
      3584, 28, 28, 4, 128)
  assert not c.tie_word_embeddings
  assert config.get_config("0.5b").tie_word_embeddings
  assert not config.get_config("coder-0.5b").tie_word_embeddings
  for name in ["0.5b", "1.5b", "3b", "7b", "14b", "32b", "72b", "coder-0.5b", "tiny"]:
    c = config.get_config(name)
    assert c.num_heads % c.num_kv_heads == 0 and c.head_dim * c.num_heads >= c.hidden_size // 2


def test_unknown_preset_and_bad_shapes_are_clear_errors():
  with pytest.raises(ValueError, match="unknown model preset 'qwen9'"):
    config.get_config("qwen9")
  with pytest.raises(ValueError, match="multiple of num_kv_heads"):
    config.get_config("tiny", num_kv_heads=3)
  with pytest.raises(ValueError, match="dtype"):
    config.get_config("tiny", dtype="int8")


def test_from_hf_config(tmp_path):
  hf = {"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896,
        "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
        "num_key_value_heads": 2, "rope_theta": 1000000.0, "rms_norm_eps": 1e-06,
        "tie_word_embeddings": True, "max_position_embeddings": 32768}
  (tmp_path / "config.json").write_text(json.dumps(hf))
  c = config.from_hf_config(tmp_path, name="qwen2.5-0.5b")
  assert c == config.get_config("0.5b")
  with pytest.raises(ValueError, match="model_type='llama'"):
    config.from_hf_config({**hf, "model_type": "llama"})


def test_from_gguf_metadata():
  meta = {"general.architecture": "qwen2", "qwen2.embedding_length": 896,
          "qwen2.attention.head_count": 14, "qwen2.attention.head_count_kv": 2,
          "qwen2.feed_forward_length": 4864, "qwen2.block_count": 24,
          "qwen2.rope.freq_base": 1e6, "qwen2.attention.layer_norm_rms_epsilon": 9.99999997e-07,
          "qwen2.context_length": 32768, "vocab_size": 151936}
  c = config.from_gguf(meta, tied=False, name="qwen2.5-coder-0.5b")
  assert c == config.get_config("coder-0.5b")
  with pytest.raises(ValueError, match="general.architecture='llama'"):
    config.from_gguf({**meta, "general.architecture": "llama"}, tied=False)


def test_sweep_configs_take_the_attention_flags():
  """Issue 11 item 1: every config names its attention; the GPU configs use Pallas."""
  import importlib
  for name in ("latency", "memory_sweep", "perplexity", "latency_gpu", "memory_sweep_gpu",
               "perplexity_gpu"):
    c = importlib.import_module(f"configs.{name}").get_config()
    gpu = name.endswith("_gpu")
    assert c.attention == ("pallas" if gpu else "auto"), name
    assert c.decode_attention == "paged" and c.overwrite is False, name
    longest = max(c.get("context_lengths", [c.get("num_tokens", 0)]))
    if name.startswith("latency"):  # its decode steps run past the prompt
      longest += c.warmup + c.repeats + 1
    limit = config.get_config(c.model if c.model != "shipped" else "coder-0.5b")
    # A config that runs past its model's trained context says so explicitly.
    assert c.allow_long_context == (longest > limit.max_position_embeddings), name
