"""Mosaic GPU paged decode kernel vs the float32 reference; bit-exactness across placements,
batches and table widths.

`PagedDecodeMgpuTest` runs the kernel compiled (skipped without a GPU); the subclass
`PagedDecodeMgpuInterpretTest` runs the same bodies in the Mosaic GPU interpreter on CPU,
which also fails on races, out-of-bounds reads, and reads NaN from uninitialized SMEM.
"""

import dataclasses
import functools

from absl.testing import absltest, parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np

from hq_jax.bench import mosaic
from pallas_kernels import paged_attention_mgpu as pm
from pallas_kernels.paged_attention import paged_attention_reference

from mgpu_testing import (BLOCK_SIZE, SHAPES, TOL, MgpuTestCase, paged_pools, rel_err,
                          relabel)

# Small steps and splits: 64 keys per step (4 pages), 128 keys per split, 2 slots.
SMALL = pm.TuningConfig(pages_per_step=4, kv_split=128, max_concurrent_steps=2)
# Many steps per split (8) through 2 slots: every slot is refilled several times.
DEEP = pm.TuningConfig(pages_per_step=4, kv_split=512, max_concurrent_steps=2)
# One step per split and 3 slots (more slots than steps: a partially filled pipeline).
ONE_STEP = pm.TuningConfig(pages_per_step=4, kv_split=64, max_concurrent_steps=3)


def make_inputs(seed, *, lens, shape="0.5b", max_blocks=12, num_layers=2, positions=None):
  """Random bf16 q and poisoned pools of all layers (`mgpu_testing.paged_pools`); the
  query of request b sits at positions[b] (default kv_lens[b] - 1)."""
  nh, _, d = SHAPES[shape]
  rng = np.random.default_rng(seed)
  k, v, tables, kv_lens = paged_pools(rng, lens, shape=shape, max_blocks=max_blocks,
                                      num_layers=num_layers)
  q = rng.standard_normal((len(lens), 1, nh, d)).astype(np.float32)
  pos = kv_lens - 1 if positions is None else np.asarray(positions, np.int32)
  bf = lambda x: jnp.asarray(x, jnp.bfloat16)
  return (bf(q), bf(k), bf(v), jnp.asarray(tables), jnp.asarray(pos[:, None]),
          jnp.asarray(kv_lens))


def reference(q, k, v, tables, positions, kv_lens, layer):
  return paged_attention_reference(q, k, v, tables, positions, kv_lens, layer)


class PagedDecodeMgpuTest(MgpuTestCase):
  # Interpreted kernels of two threads (warp_specialized) can deadlock the 2-core CI box's
  # XLA CPU pools (tests/conftest.py): `make test-deep` runs them; a GPU runs them compiled.
  SLOW_INTERPRETED = ("test_one_step_per_split", "test_deep_pipeline1")

  def attend(self, q, k, v, tables, positions, kv_lens, layer=0, config=SMALL):
    return pm.paged_decode_attention_mgpu(q, k, v, tables, positions, kv_lens, layer,
                                          config=config, interpret=self.interpret)

  def check(self, inputs, layer=0, config=SMALL):
    out = self.attend(*inputs, layer, config=config)
    ref = reference(*inputs, layer)
    chex.assert_shape(out, inputs[0].shape)
    self.assertEqual(out.dtype, jnp.bfloat16)
    self.assertFalse(np.isnan(np.asarray(out, np.float32)).any())
    self.assertLess(rel_err(out, ref), TOL)
    return out

  @parameterized.parameters("0.5b", "7b")
  def test_decode(self, shape):
    # A single key, a partial page, a split and a bit (partial step), a full table; the
    # third query sits before the end of its cache (it sees keys <= 120 of 170, and keys
    # 121.. hold real data).
    inputs = make_inputs(1, lens=[1, 7, 170, 192], positions=[0, 6, 120, 191], shape=shape)
    self.check(inputs, layer=1)

  def test_one_step_per_split(self):
    # Warp specialized: more slots than steps, so the memory warpgroup only prefetches.
    inputs = make_inputs(3, lens=[3, 64, 65, 190])
    self.check(inputs, config=dataclasses.replace(ONE_STEP, warp_specialized=True))

  @parameterized.parameters(False, True)
  def test_deep_pipeline(self, warp_specialized):
    inputs = make_inputs(7, lens=[450, 300], max_blocks=32)
    out = self.check(inputs, config=DEEP)
    if warp_specialized:  # the other schedule of the same steps: the same bits
      ws = self.attend(*inputs, config=dataclasses.replace(DEEP, warp_specialized=True))
      np.testing.assert_array_equal(np.asarray(ws, np.float32), np.asarray(out, np.float32))

  def test_empty_request(self):
    # kv_len 0 (nothing visible: every split is empty) gives zeros, not NaN; its neighbour
    # is unaffected.
    q, k, v, tables, positions, kv_lens = make_inputs(9, lens=[0, 70], positions=[-1, 69])
    out = np.asarray(self.attend(q, k, v, tables, positions, kv_lens), np.float32)
    np.testing.assert_array_equal(out[0], 0)
    ref = reference(q[1:], k, v, tables[1:], positions[1:], kv_lens[1:], 0)
    self.assertLess(rel_err(out[1:], ref), TOL)

  def test_traced_layer(self):
    # Three layers of different content; the layer index is a traced argument.
    inputs = make_inputs(4, lens=[33, 120], num_layers=3)
    fn = jax.jit(functools.partial(self.attend, config=SMALL))
    outs = []
    for layer in range(3):
      out = fn(*inputs, jnp.int32(layer))
      self.assertLess(rel_err(out, reference(*inputs, layer)), TOL)
      outs.append(np.asarray(out, np.float32))
    self.assertFalse(np.array_equal(outs[0], outs[1]))

  def test_placement_and_batch_give_same_bits(self):
    q, k, v, tables, positions, kv_lens = make_inputs(5, lens=[5, 140, 77, 192])
    out = np.asarray(self.check((q, k, v, tables, positions, kv_lens)), np.float32)
    # Another physical placement of the same logical blocks.
    k2, v2, tables2 = relabel(k, v, tables, seed=6)
    out2 = self.attend(q, k2, v2, tables2, positions, kv_lens)
    np.testing.assert_array_equal(np.asarray(out2, np.float32), out)
    # Each request alone, with a wider table (one more split, past every length).
    wide = jnp.concatenate([tables, jnp.zeros_like(tables)], axis=1)
    for b in (1, 3):
      one = self.attend(q[b:b + 1], k, v, wide[b:b + 1], positions[b:b + 1],
                        kv_lens[b:b + 1])
      np.testing.assert_array_equal(np.asarray(one, np.float32)[0], out[b])


  @parameterized.parameters("0.5b", "g2")
  def test_fold_kv_heads(self, shape):
    # All kv heads in one program: against the reference (an empty request, a single key,
    # partial steps, a query before the end of its cache), and the same bits at another
    # placement and for a request alone with a wider table.
    fold = dataclasses.replace(SMALL, fold_kv_heads=True)
    q, k, v, tables, positions, kv_lens = make_inputs(
        11, lens=[0, 1, 70, 170, 192], positions=[-1, 0, 69, 120, 191], shape=shape)
    out = np.asarray(self.attend(q, k, v, tables, positions, kv_lens, 1, config=fold),
                     np.float32)
    np.testing.assert_array_equal(out[0], 0)
    ref = reference(q, k, v, tables, positions, kv_lens, 1)
    self.assertFalse(np.isnan(out).any())
    self.assertLess(rel_err(out[1:], np.asarray(ref)[1:]), TOL)
    k2, v2, tables2 = relabel(k, v, tables, seed=12)
    out2 = self.attend(q, k2, v2, tables2, positions, kv_lens, 1, config=fold)
    np.testing.assert_array_equal(np.asarray(out2, np.float32), out)
    wide = jnp.concatenate([tables, jnp.zeros_like(tables)], axis=1)
    one = self.attend(q[3:4], k, v, wide[3:4], positions[3:4], kv_lens[3:4], 1, config=fold)
    np.testing.assert_array_equal(np.asarray(one, np.float32)[0], out[3])


class PagedDecodeMgpuInterpretTest(PagedDecodeMgpuTest):
  INTERPRET = True


class ReferenceTest(absltest.TestCase):

  def test_own_reference_matches_shared(self):
    inputs = make_inputs(8, lens=[1, 7, 170, 192], positions=[0, 6, 120, 191])
    own = pm.paged_decode_attention_reference(*inputs, 1)
    np.testing.assert_allclose(own, reference(*inputs, 1), rtol=1e-5, atol=1e-6)

  def test_random_inputs(self):
    # main()'s generator, at a small context: distinct blocks, block 0 unused.
    q, k, v, tables, pos, lens = mosaic.decode_inputs(jax.random.key(0), 3, 40, "0.5b")
    self.assertEqual(len(set(np.asarray(tables).ravel())), tables.size)
    self.assertNotIn(0, np.asarray(tables))
    self.assertLess(rel_err(pm.paged_decode_attention_reference(q, k, v, tables, pos, lens),
                            reference(q, k, v, tables, pos, lens, 0)), 1e-5)


class ConfigTest(absltest.TestCase):

  def test_rejects_bad_tiles(self):
    with self.assertRaisesRegex(ValueError, "multiple of 64"):
      pm.TuningConfig(pages_per_step=2, kv_split=128).block_kv(BLOCK_SIZE)
    with self.assertRaisesRegex(ValueError, "kv_split"):
      pm.TuningConfig(pages_per_step=4, kv_split=96).block_kv(BLOCK_SIZE)
    with self.assertRaisesRegex(ValueError, "max_concurrent_steps"):
      pm.TuningConfig(max_concurrent_steps=0)

  def test_fold_kv_heads_limits(self):
    fold = pm.TuningConfig(pages_per_step=4, kv_split=512, fold_kv_heads=True)
    q, k, v, tables, positions, kv_lens = make_inputs(0, lens=[5], shape="7b")
    with self.assertRaisesRegex(ValueError, "K \\* D = 512 > 256"):
      pm.paged_decode_attention_mgpu(q, k, v, tables, positions, kv_lens, config=fold,
                                     interpret=pm.strict_interpreter())
    # The 0.5B shape folded has the SMEM of a D = 128 program.
    self.assertEqual(pm.smem_bytes(fold, 64, num_kv_heads=2),
                     pm.smem_bytes(pm.TuningConfig(pages_per_step=4, kv_split=512), 128))

  def test_defaults_fit_two_programs_per_sm(self):
    # Mosaic GPU lays the defaults out in 92,200 bytes (lowered for cuda on a CPU, jax 0.12).
    for d in (64, 128):
      self.assertLessEqual(2 * (pm.smem_bytes(pm.default_config(d), d) + 4096),
                           pm.SMEM_PER_SM)

  def test_merge_ignores_empty_splits(self):
    rng = np.random.default_rng(0)
    acc = jnp.asarray(rng.standard_normal((2, 3, 8, 4)), jnp.float32)
    m = jnp.asarray(rng.standard_normal((2, 3, 8)), jnp.float32)
    l = jnp.asarray(rng.random((2, 3, 8)) + 0.5, jnp.float32)
    pad = lambda x, fill: jnp.concatenate([x, jnp.full_like(x[:, :2], fill)], axis=1)
    np.testing.assert_array_equal(pm.merge_splits(acc, m, l),
                                  pm.merge_splits(pad(acc, 0), pad(m, -jnp.inf), pad(l, 0)))


def _d64_config():
  from hq_jax import config as config_lib
  return config_lib.ModelConfig(
      name="tiny-d64", vocab_size=256, hidden_size=128, intermediate_size=256, num_layers=2,
      num_heads=4, num_kv_heads=2, head_dim=64, rope_theta=10_000.0, dtype="bfloat16")


def test_engine_decode_on_a_real_hq_view():
  """The engine's adapter (`KernelAttention("mosaic_interpret")`) on a decode view of a
  real HQ cache, padded to a bucket of 2 rows (the padding row has no keys; the table is
  wider than the request's blocks; the interpreter raises on out-of-bounds reads): the real
  row equals the reference, the padding row reads nothing and gives zeros."""
  from hq_jax.serve.engine import KernelAttention
  from hq_jax.kv.dedup import DedupKVCache
  from hq_jax.kv.paged import KVLayout
  cfg = _d64_config()
  cache = DedupKVCache.init(KVLayout.from_config(cfg, block_size=16), num_blocks=12,
                            max_requests=2, max_seq_len=128)
  cache, slot = cache.admit(np.arange(70) % cfg.vocab_size)
  view = cache.view([slot], [69], 1, pad_to=2)  # the last prompt token: 70 keys, 5 blocks
  assert view.sharing is None
  rng = np.random.default_rng(6)
  shape = cache.pools.k.shape
  k = jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
  v = jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
  q = jnp.asarray(rng.standard_normal((2, 1, cfg.num_heads, cfg.head_dim)), jnp.bfloat16)
  out = np.asarray(KernelAttention("mosaic_interpret")(q, k, v, 1, view), np.float32)
  ref = np.asarray(KernelAttention("reference")(q, k, v, 1, view), np.float32)
  assert np.isfinite(out).all()
  assert rel_err(out[0], ref[0]) < TOL
  np.testing.assert_array_equal(out[1], 0.0)


def test_engine_decode_step_with_mosaic_lowers_for_cuda():
  """`Engine(attention="mosaic")`'s jitted decode step (one token per request), layer scan
  included, lowers for a GPU on this CPU machine with the Mosaic decode kernel in it."""
  from hq_jax import model as model_lib
  from hq_jax.serve.engine import KernelAttention
  from hq_jax.kv.dense import DenseKVCache
  from hq_jax.kv.paged import KVLayout
  cfg = _d64_config()
  params = model_lib.init_params(cfg, jax.random.key(3), scale=0.1)
  cache = DenseKVCache.for_requests(KVLayout.from_config(cfg, 16), max_requests=2,
                                    max_seq_len=96)
  cache, slot = cache.admit(np.arange(40))
  step = jax.jit(model_lib.forward.__wrapped__, static_argnames=("cfg", "attention_fn"))
  text = step.trace(params, cache.pools, jnp.zeros((2, 1), jnp.int32),
                    cache.view([slot], [39], 1, pad_to=2), cfg=cfg,
                    attention_fn=KernelAttention("mosaic")).lower(
                        lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text
  assert "xla.gpu.triton" not in text  # no Triton kernel: the decode runs on Mosaic


if __name__ == "__main__":
  absltest.main()
