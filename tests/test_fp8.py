"""FP8 K/V (float8_e4m3fn with a float32 scale per token and kv head): the layout and its
bytes, quantization, the memory sweep's rows, the perplexity run's baselines and ledger row,
and the engine refusing kernels that cannot read it. (Dense/HQ bit identity with FP8 is in
test_engine.py, the kernel's FP8 tests in test_paged_attention.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hq_jax.kv import paged
from hq_jax.kv.base import CacheError
from hq_jax.kv.dense import DenseKVCache
from hq_jax.kv.paged import FP8, KVLayout, KVPools
from hq_jax.kv.stats import kv_stats
from hq_jax.serve.engine import Engine, check_fp8
from hq_jax.study import ledger, memory, perplexity
from hq_jax.study.requests import TokenStream


def test_layout_counts_scales_as_kv_bytes(tiny):
  _, cfg = tiny
  fp8, bf16 = KVLayout.from_config(cfg, 16, FP8), KVLayout.from_config(cfg, 16, "bfloat16")
  rows = 2 * cfg.num_layers * cfg.num_kv_heads  # K and V rows of head_dim per token
  assert fp8.quantized and not bf16.quantized
  assert fp8.bytes_per_token == rows * (cfg.head_dim * 1 + 4)
  assert bf16.bytes_per_token == rows * cfg.head_dim * 2
  pools = KVPools.zeros(fp8, 3)
  assert pools.k_scale.shape == (cfg.num_layers, 3, 16, cfg.num_kv_heads)
  assert pools.nbytes == 3 * fp8.bytes_per_block  # the pool is its blocks, scales included
  cache = DenseKVCache.for_requests(fp8, max_requests=1, max_seq_len=32)
  assert cache.layout == fp8 and kv_stats(cache).pool_bytes == cache.pools.nbytes
  with pytest.raises(ValueError, match="kv_dtype must be one of"):
    KVLayout.from_config(cfg, 16, "int8")


def test_quantize_per_row():
  x = jax.random.normal(jax.random.key(0), (64, 3, 32), jnp.float32) * 10.0 ** jnp.arange(
      -3, 3, 6 / 64)[:, None, None]  # rows from 1e-3 to 1e2: the scale follows each row
  x = x.at[5, 1].set(0.0)
  values, scale = paged.quantize(x)
  assert values.dtype == jnp.float8_e4m3fn and scale.shape == (64, 3)
  back = np.asarray(paged.dequantize(values, scale))
  x, scale = np.asarray(x), np.asarray(scale)
  assert scale[5, 1] == 0 and np.all(back[5, 1] == 0)
  # Each row's largest |x| becomes exactly +-448; e4m3 keeps 3 mantissa bits (relative
  # error <= 2^-4 for normals, absolute <= 2^-10 * scale for subnormals).
  amax = np.abs(np.asarray(values, np.float32)).max(-1)
  assert np.all((amax == 448) | (scale == 0))
  assert np.all(np.abs(back - x) <= 2.0 ** -4 * np.abs(x) + 2.0 ** -10 * scale[..., None])


def test_write_layer_puts_scales_beside_their_values(tiny):
  _, cfg = tiny
  layout = KVLayout.from_config(cfg, 4, FP8)
  pools = KVPools.zeros(layout, 4)
  k = jax.random.normal(jax.random.key(1), (1, 3, cfg.num_kv_heads, cfg.head_dim))
  slots = jnp.asarray([[5, 6, 4 * 4]], jnp.int32)  # block 1 offsets 1, 2; the last dropped
  new = paged.write_layer(pools, 1, k, 2 * k, slots)
  values, scale = paged.quantize(k[0, :2])
  np.testing.assert_array_equal(new.k[1, 1, 1:3], values)
  np.testing.assert_array_equal(new.k_scale[1, 1, 1:3], scale)
  np.testing.assert_array_equal(new.v_scale[1, 1, 1:3], 2 * scale)
  assert int(jnp.count_nonzero(new.k_scale)) == 2 * cfg.num_kv_heads  # nothing else written


def test_memory_sweep_fp8_rows_are_bf16_rows_times_scale_overhead_over_two(tiny):
  """K/V bytes used with FP8 = the bfloat16 rows' x (1 + scale bytes / K/V bytes) / 2, on
  every row, and every row equal to its prediction (the sweep checks that itself)."""
  params, cfg = tiny
  stream = TokenStream((np.arange(5000) * 7919) % cfg.vocab_size)
  grid = dict(model="tiny", context_lengths=[64], concurrency=[1, 3],
              shared_prefix_fractions=[0.5], chunk_size=32)
  bf16 = memory.sweep(params, cfg, stream, kv_dtype="bfloat16", **grid)
  fp8 = memory.sweep(params, cfg, stream, kv_dtype=FP8, **grid)
  factor = (1 + 4 / (cfg.head_dim * 1)) / 2  # a float32 scale per head_dim e4m3 values
  assert len(fp8) == len(bf16) == 4
  for b, f in zip(bf16, fp8):
    assert (b["kv_dtype"], f["kv_dtype"]) == ("bfloat16", FP8)
    assert (b["backend"], b["concurrency"]) == (f["backend"], f["concurrency"])
    for col in ("kv_bytes_used", "kv_bytes_predicted", "kv_bytes_allocated", "pool_bytes"):
      assert f[col] == b[col] * factor, col
    assert f["kv_bytes_used"] == f["kv_bytes_predicted"]
  assert "kv_dtype" in memory.COLUMNS


def test_perplexity_fp8_run_records_its_baselines_and_the_ledger_row(tiny):
  params, cfg = tiny
  ids = (np.arange(96) * 7919) % cfg.vocab_size
  out = perplexity.run(params, cfg, ids, chunk_size=32, kv_dtype=FP8)
  assert out["kv_dtype"] == FP8 and out["model_dtype"] == "float32"
  assert set(out["kv_dtype_baselines"]) == {"bfloat16", "float32"}
  assert out["logit_mismatches"] == {"full_prefill": 0, "prefix_reuse": 0}
  row = ledger.fp8_perplexity(out)
  delta = max(abs(out["dense"]["ppl"] / b["ppl"] - 1) for b in out["kv_dtype_baselines"].values())
  assert row["supported"] == (ledger.SUPPORTED if delta <= 0.003 else ledger.REFUTED)
  assert "float8_e4m3fn" in row["verdict"] and row["evidence"] == "perplexity.json"
  # The verdict follows the numbers; a run without FP8 leaves the claim untested.
  fake = {**out, "dense": {"ppl": 10.0}, "kv_dtype_baselines": {"bfloat16": {"ppl": 10.02},
                                                               "float32": {"ppl": 10.01}}}
  assert ledger.fp8_perplexity(fake)["supported"] == ledger.SUPPORTED
  fake["kv_dtype_baselines"]["float32"]["ppl"] = 9.9
  assert ledger.fp8_perplexity(fake)["supported"] == ledger.REFUTED
  assert ledger.fp8_perplexity({**out, "kv_dtype": "float32"})["supported"] == ledger.UNTESTED
  assert ledger.fp8_perplexity(None)["supported"] == ledger.UNTESTED


def test_engine_refuses_fp8_where_a_kernel_cannot_read_it(tiny):
  params, cfg = tiny
  with pytest.raises(ValueError, match="paged_prefill_mgpu"):
    Engine(params, cfg, attention="mosaic", kv_dtype=FP8)
  with pytest.raises(ValueError, match="paged_attention_mgpu"):  # a Mosaic decode alone
    check_fp8("mosaic", "triton", "mosaic")
  # "pallas" prefills FP8 on Triton (the Mosaic prefill kernel cannot read it); the
  # shared-prefix decode kernel reads it.
  Engine(params, cfg, attention="pallas_interpret", decode_attention="dedup", kv_dtype=FP8)
  assert Engine(params, cfg, attention="pallas", kv_dtype=FP8).prefill_kernel == "triton"
  # A cache of FP8 K/V needs an engine made for it, and back.
  fp8_cache = DenseKVCache.for_requests(KVLayout.from_config(cfg, 16, FP8), max_requests=1,
                                        max_seq_len=32)
  with pytest.raises(CacheError, match="kv_dtype"):
    Engine(params, cfg, chunk_size=16).prefill(fp8_cache, [1, 2, 3])


def test_every_config_has_kv_dtype_and_validate_checks_it():
  import importlib

  import ml_collections

  from hq_jax.study import cli
  for name in ("memory_sweep", "latency", "perplexity", "trace_replay", "memory_sweep_gpu",
               "latency_gpu", "perplexity_gpu", "trace_replay_gpu"):
    assert importlib.import_module(f"configs.{name}").get_config().kv_dtype == "", name
  cli.validate(ml_collections.ConfigDict({"dtype": "float32", "kv_dtype": FP8}))
  with pytest.raises(ValueError, match="--kv_dtype"):
    cli.validate(ml_collections.ConfigDict({"dtype": "float32", "kv_dtype": "fp8"}))
