"""Mosaic GPU shared-prefix decode attention vs the float32 oracles; bit-exactness across
physical placements; lowering for cuda at the model shapes.

`DedupMgpuTest` runs the kernels compiled (skipped without a GPU); the subclass
`DedupMgpuInterpretTest` runs the same bodies in the Mosaic GPU interpreter on CPU (races,
out-of-bounds reads and uninitialized SMEM as NaN are detected). Inputs are random; unused
blocks, block 0 and slots past a request's length hold NaN, so any read of them shows.
"""

import dataclasses
import functools

from absl.testing import absltest, parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np

from hq_jax.kv import sharing
from hq_jax.bench import mosaic
from pallas_kernels import dedup_attention as da
from pallas_kernels import dedup_attention_mgpu as dm
from pallas_kernels import paged_attention_mgpu as pm
from pallas_kernels.paged_attention import paged_attention_reference

from mgpu_testing import SHAPES, TOL, MgpuTestCase, rel_err, relabel
from mgpu_testing import BLOCK_SIZE as BS
from test_dedup_attention import make_batch as triton_batch
# Steps of 64 keys (4 pages) through 2 slots; nodes split into pieces of <= 64 keys, private
# remainders of <= 64 keys; no extra splits to fill a GPU.
SMALL = dm.TuningConfig(pages_per_step=4, shared_kv_split=64, private_kv_split=128,
                        max_concurrent_steps=2, min_programs=1)
# Two compute warpgroups per shared tile (18 requests at G = 7) and a copy warpgroup.
SMALL_WS = dataclasses.replace(SMALL, shared_warpgroups=2)
# One split of up to 512 keys per node: many steps through the 2 slots (each refilled).
DEEP = dataclasses.replace(SMALL, shared_kv_split=512)

CASES = dict(  # ([(segment names, private tokens)], {segment: blocks})
    # Depth 2, requests whose private part is empty, one with no node.
    nested=([(("sys", "a"), 3), (("sys", "a"), 0), (("sys", "b"), 20), (("sys", "b"), 0),
             (("sys", "b"), 9), (("sys",), 0), (("sys",), 70), ((), 13)],
            {"sys": 5, "a": 3, "b": 4}),
    many_requests=([(("sys",), 1 + 3 * i) for i in range(11)], {"sys": 3}),  # 9 + 2 (G=7)
    long_node=([(("sys",), 5), (("sys",), 17), (("sys",), 33)], {"sys": 20}),
    no_sharing=([((), 9), ((), 40), ((), 100)], {}),
)


def make_batch(seed, requests, segments, *, shape="0.5b", num_layers=2, max_blocks=12):
  """The Triton dedup tests' batch (segments stored once, NaN wherever no request may
  read) at a model shape, all layers' pools, bf16, as the kernels' plain arrays."""
  nh, nk, d = SHAPES[shape]
  q, k, v, view = triton_batch(seed, requests, segments, kv_heads=nk, group=nh // nk,
                               head_dim=d, dtype=jnp.bfloat16, max_blocks=max_blocks,
                               num_layers=num_layers, block_size=BS)
  return q, k, v, view.block_tables, view.positions, view.kv_lens


def plan_for(inputs, config=SMALL):
  q, k, _, tables, _, kv_lens = inputs
  group = q.shape[2] // k.shape[-2]
  return sharing.build_plan(np.asarray(tables), np.asarray(kv_lens), BS,
                            requests_per_tile=config.requests_per_tile(group))[0]




class DedupMgpuTest(MgpuTestCase):
  # The interpreter is slow on the 2-core box: `make test` runs the reference check at one
  # shape and the placement bits; `make test-deep` runs every case (two warpgroups, other
  # shapes, a traced layer). Compiled (GPU) runs all.
  SLOW_INTERPRETED = ("test_against_reference1", "test_against_reference2",
                      "test_against_reference3", "test_against_reference4",
                      "test_traced_layer", "test_deep_pipeline_one_or_two_warpgroups",
                      # two warpgroups: can deadlock the 2-core box (tests/conftest.py)
                      "test_block_placement_changes_no_bit")

  def attend(self, inputs, plan, layer=1, config=SMALL):
    return dm.dedup_attention_mgpu(*inputs, plan, layer, config=config,
                                   interpret=self.interpret)

  def check(self, inputs, plan, layer=1, config=SMALL):
    out = self.attend(inputs, plan, layer, config)
    chex.assert_shape(out, inputs[0].shape)
    self.assertEqual(out.dtype, jnp.bfloat16)
    self.assertFalse(np.isnan(np.asarray(out, np.float32)).any())
    ref = da.dedup_attention_reference(*inputs, plan, layer)
    self.assertLess(rel_err(out, ref), TOL)
    # The decomposition's oracle agrees with plain paged attention: the plan is right.
    self.assertLess(rel_err(ref, paged_attention_reference(*inputs, layer)), 1e-5)
    return np.asarray(out, np.float32)

  @parameterized.parameters(("nested", "0.5b", SMALL), ("nested", "g2", SMALL),
                            ("nested", "7b", SMALL), ("many_requests", "0.5b", SMALL_WS),
                            ("nested", "7b", SMALL_WS))
  def test_against_reference(self, case, shape, config):
    inputs = make_batch(0, *CASES[case], shape=shape)
    plan = plan_for(inputs, config)
    self.assertTrue(plan.has_shared)
    self.check(inputs, plan, config=config)

  def test_deep_pipeline_one_or_two_warpgroups(self):
    # Five steps through two slots (each refilled). Two warpgroups split the same tile's
    # rows between them and run the same steps in the same order: the same bits.
    inputs = make_batch(1, *CASES["long_node"], max_blocks=24)
    outs = []
    for warpgroups in (1, 2):
      config = dataclasses.replace(DEEP, shared_warpgroups=warpgroups)
      outs.append(self.check(inputs, plan_for(inputs, config), config=config))
    np.testing.assert_array_equal(outs[0], outs[1])

  def test_block_placement_changes_no_bit(self):
    # The same logical batch at other physical block ids (so another node and tile order
    # in the plan): each request's partials and merge order are the same, so are its bits.
    # Two warpgroups per tile: the same steps and bits as one (test_deep_pipeline_...).
    config = SMALL_WS
    q, k, v, tables, pos, lens = inputs = make_batch(2, *CASES["nested"])
    out = self.check(inputs, plan_for(inputs, config), config=config)
    k2, v2, tables2 = relabel(k, v, tables, seed=0)
    moved = (q, k2, v2, tables2, pos, lens)
    out2 = np.asarray(self.attend(moved, plan_for(moved, config), config=config), np.float32)
    np.testing.assert_array_equal(out2, out)

  def test_nothing_shared_is_the_paged_kernel(self):
    inputs = make_batch(3, *CASES["no_sharing"])
    plan = plan_for(inputs)
    self.assertFalse(plan.has_shared)
    out = self.attend(inputs, plan, config=SMALL)
    paged = pm.paged_decode_attention_mgpu(*inputs, 1, interpret=self.interpret)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(paged, np.float32))

  def test_traced_layer(self):
    inputs = make_batch(4, *CASES["many_requests"], num_layers=3)
    plan = plan_for(inputs)
    fn = jax.jit(functools.partial(self.attend, config=SMALL))
    outs = []
    for layer in (0, 2):
      out = fn(inputs, plan, jnp.int32(layer))
      self.assertLess(rel_err(out, da.dedup_attention_reference(*inputs, plan, layer)), TOL)
      outs.append(np.asarray(out, np.float32))
    self.assertFalse(np.array_equal(outs[0], outs[1]))
    # One layer's pools with layer None: that layer's bits from the full pools.
    q, k, v, tables, pos, lens = inputs
    one = self.attend((q, k[2], v[2], tables, pos, lens), plan, None)
    np.testing.assert_array_equal(np.asarray(one, np.float32), outs[1])


  def test_chunk_is_the_triton_paged_kernel(self):
    # T = 2 (a chunk): the plan does not apply, the Triton paged kernel runs.
    q, k, v, tables, pos, lens = inputs = make_batch(8, *CASES["many_requests"])
    plan = plan_for(inputs)
    q2 = jnp.concatenate([q, q], axis=1)
    pos2 = jnp.concatenate([pos - 1, pos], axis=1)
    chunk = dm.dedup_attention_mgpu(q2, k, v, tables, pos2, lens, plan, 1,
                                    interpret=self.interpret)
    self.assertLess(rel_err(chunk, paged_attention_reference(q2, k, v, tables, pos2, lens, 1)),
                    TOL)


class DedupMgpuInterpretTest(DedupMgpuTest):
  INTERPRET = True


class MainInputsTest(parameterized.TestCase):

  @parameterized.parameters((9, 0), (18, 40), (9, 16))
  def test_single_prefix_plan_is_the_planners(self, rpt, own):
    inputs, shared_ids = mosaic.shared_prefix_inputs(jax.random.key(0), 64, own, 11,
                                                 shape=SHAPES["0.5b"])
    tables, lens = np.asarray(inputs[3]), np.asarray(inputs[5])
    got = mosaic.single_prefix_plan(shared_ids, own, 11, BS, requests_per_tile=rpt)
    want = sharing.build_plan(tables, lens, BS, requests_per_tile=rpt)[0]
    chex.assert_trees_all_equal(got, want)

  def test_main_reference(self):
    inputs, _ = mosaic.shared_prefix_inputs(jax.random.key(1), 32, 20, 3, shape=SHAPES["0.5b"])
    self.assertLess(rel_err(mosaic._shared_reference(*inputs, 1), paged_attention_reference(*inputs, 1)),
                    1e-5)


class LoweringTest(parameterized.TestCase):

  @parameterized.parameters("0.5b", "7b")
  def test_lowers_for_cuda(self, shape):
    # Compiled mode (P through SMEM and from registers), the default tiles: Mosaic GPU
    # lowering runs on a CPU machine; only the SASS compile needs the GPU.
    inputs = make_batch(5, *CASES["nested"], shape=shape)
    for config in (dm.DEFAULT, dataclasses.replace(dm.DEFAULT, p_in_registers=True),
                   dm.DEFAULT_WS):
      plan = plan_for(inputs, config)
      f = functools.partial(dm.dedup_attention_mgpu, config=config)
      lowered = jax.jit(f).trace(*inputs, plan, 1).lower(lowering_platforms=("cuda",))
      self.assertIn("mosaic_gpu", lowered.as_text())


class ConfigTest(absltest.TestCase):

  def test_rejects_bad_tiles(self):
    with self.assertRaisesRegex(ValueError, "multiple of 64"):
      dm.TuningConfig(pages_per_step=2).block_kv(BS)
    with self.assertRaisesRegex(ValueError, "shared_kv_split"):
      dm.TuningConfig(shared_kv_split=96).block_kv(BS)
    with self.assertRaisesRegex(ValueError, "max_concurrent_steps"):
      dm.TuningConfig(max_concurrent_steps=0)

  def test_requests_per_tile(self):
    self.assertEqual(SMALL.requests_per_tile(7), 9)
    self.assertEqual(SMALL.requests_per_tile(2), 32)
    self.assertEqual(SMALL_WS.requests_per_tile(7), 18)
    with self.assertRaises(ValueError):
      SMALL.requests_per_tile(65)

  def test_rejects_plan_with_too_many_rows(self):
    inputs = make_batch(6, *CASES["many_requests"])
    plan = sharing.build_plan(np.asarray(inputs[3]), np.asarray(inputs[5]), BS,
                              requests_per_tile=10)[0]  # 10 x 7 rows > 64
    with self.assertRaisesRegex(ValueError, "rows"):
      dm.dedup_attention_mgpu(*inputs, plan, 1, config=SMALL)


if __name__ == "__main__":
  absltest.main()
