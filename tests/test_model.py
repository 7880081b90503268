"""The Flax model on `tiny`: incremental decoding equals one full prefill, jitted or not."""

import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from hq_jax import config, model
from hq_jax.kv.paged import AttentionView, KVLayout, KVPools


def _contiguous_view(start, n, table):
  pos = jnp.arange(start, start + n, dtype=jnp.int32)[None]
  slots = table[0][pos // 16] * 16 + pos % 16
  return AttentionView(pos, table, slots, jnp.array([start + n], jnp.int32))


class IncrementalDecodeTest(chex.TestCase, parameterized.TestCase):

  # Unjitted, every config costs ~10 s on the 2-core box and repeats its jitted twin; the
  # unjitted run of all four is in `make test-deep` (HQ_JAX_DEEP_TESTS=1), one in `make test`.
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("untied", False, 2), ("tied", True, 2), ("mha", False, 4),
                                  ("gqa4", False, 1))
  def test_prefill_then_decode_matches_full_prefill(self, tied, kv_heads):
    if (not os.environ.get("HQ_JAX_DEEP_TESTS") and "without_jit" in self._testMethodName
        and not self._testMethodName.endswith("untied__without_jit")):
      self.skipTest("unjitted twin of a jitted case; run with HQ_JAX_DEEP_TESTS=1")
    cfg = config.get_config("tiny", tie_word_embeddings=tied, num_kv_heads=kv_heads)
    params = model.init_params(cfg, jax.random.key(1), scale=0.1)
    step = self.variant(lambda p, pools, tok, view: model.Qwen2(cfg).apply(
        {"params": p}, tok, pools, view))
    layout = KVLayout.from_config(cfg, 16)
    total, prompt = 37, 21
    tokens = jax.random.randint(jax.random.key(2), (1, total), 0, cfg.vocab_size)
    # Non-contiguous physical blocks: the model must only follow the table.
    table = jnp.array([[5, 2, 7, 0]], jnp.int32)
    full, _ = step(params, KVPools.zeros(layout, 8), tokens, _contiguous_view(0, total, table))

    pools = KVPools.zeros(layout, 8)
    out, pools = step(params, pools, tokens[:, :prompt], _contiguous_view(0, prompt, table))
    outs = [out]
    for i in range(prompt, total):
      out, pools = step(params, pools, tokens[:, i:i + 1], _contiguous_view(i, 1, table))
      outs.append(out)
    inc = jnp.concatenate(outs, axis=1)
    chex.assert_trees_all_close(inc, full, atol=1e-5, rtol=1e-5)
    # The check can fail: the logits are not flat, and differ across positions.
    assert float(jnp.std(full)) > 0.1

  def test_logits_are_float32_in_bfloat16(self):
    cfg = config.get_config("tiny", dtype="bfloat16")
    params = model.init_params(cfg, jax.random.key(1))
    assert jax.tree.leaves(params)[0].dtype == jnp.bfloat16
    layout = KVLayout.from_config(cfg, 16)
    table = jnp.array([[0, 1]], jnp.int32)
    logits, pools = model.forward(params, KVPools.zeros(layout, 2),
                                  jnp.ones((1, 5), jnp.int32), _contiguous_view(0, 5, table),
                                  cfg=cfg)
    assert logits.dtype == jnp.float32 and pools.k.dtype == jnp.bfloat16
    assert np.isfinite(np.asarray(logits)).all()


def test_unwritten_cache_slots_never_leak_into_the_output():
  """Slots past a request's length may hold anything, NaN included (reused blocks)."""
  cfg = config.get_config("tiny")
  params = model.init_params(cfg, jax.random.key(1), scale=0.1)
  layout = KVLayout.from_config(cfg, 16)
  table = jnp.array([[3, 1, 0, 2]], jnp.int32)
  tokens = jnp.arange(1, 21)[None]
  clean, _ = model.forward(params, KVPools.zeros(layout, 4), tokens,
                           _contiguous_view(0, 20, table), cfg=cfg)
  nan_pool = jnp.full(layout.pool_shape(4), jnp.nan, jnp.float32)
  dirty, _ = model.forward(params, KVPools(nan_pool, nan_pool), tokens,
                           _contiguous_view(0, 20, table), cfg=cfg)
  chex.assert_trees_all_equal(dirty, clean)


def test_init_params_is_seeded():
  cfg = config.get_config("tiny")
  a = model.init_params(cfg, jax.random.key(3))
  b = model.init_params(cfg, jax.random.key(3))
  c = model.init_params(cfg, jax.random.key(4))
  chex.assert_trees_all_equal(a, b)
  assert not np.array_equal(a["embed"]["embedding"], c["embed"]["embedding"])
  shapes = jax.tree.map(lambda x: x.shape, model.abstract_params(config.get_config("7b")))
  # q, k, v and gate, up are fused (`model.fused_parts`): one GEMM each.
  assert shapes["layers"]["attn"]["qkv_proj"]["kernel"] == (28, 3584, 3584 + 2 * 512)
  assert shapes["layers"]["attn"]["qkv_proj"]["bias"] == (28, 3584 + 2 * 512)
  assert shapes["layers"]["mlp"]["gate_up_proj"]["kernel"] == (28, 3584, 2 * 18944)
