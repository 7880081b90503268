"""Paged attention kernel vs its float32 reference; bit-exactness across placements/batches.

`PagedAttentionTest` runs the kernel compiled (skipped without a GPU); the subclass
`PagedAttentionInterpretTest` runs the same bodies through the Pallas interpreter on CPU.
"""

import dataclasses
import functools
import warnings

from absl.testing import absltest, parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hq_jax import model as model_lib
from hq_jax.kv import paged
from hq_jax.kv.paged import AttentionView, KVLayout
from pallas_kernels import paged_attention as pa

warnings.filterwarnings("ignore", message=".*Pallas Triton backend is deprecated.*")

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}  # relative L2 error vs the f32 reference
# Small tiles; block_k = 16 over blocks of 4 tokens, splits of 32 keys.
SPLIT = pa.TuningConfig(block_q=16, block_k=16, kv_split=32)
NO_SPLIT = pa.TuningConfig(block_q=16, block_k=16, kv_split=None)
# One split per key tile: many splits, more than the merge reads per loop iteration.
MANY = pa.TuningConfig(block_q=16, block_k=16, kv_split=16)


def make_inputs(seed, *, starts, tokens, kv_heads=2, group=2, head_dim=32, block_size=4,
                max_blocks=16, dtype=jnp.float32, num_blocks=None):
  """Random q and pools; request b holds keys [0, starts[b] + tokens) at random blocks.

  Block 0 is never assigned and table entries past a request's blocks point to it; it and
  the slots past each request's length hold NaN, so any read of them shows in the output.
  """
  rng = np.random.default_rng(seed)
  batch = len(starts)
  kv_lens = np.asarray(starts, np.int32) + tokens
  num_blocks = num_blocks or 1 + batch * max_blocks
  shape = (num_blocks, block_size, kv_heads, head_dim)
  k = rng.standard_normal(shape).astype(np.float32)
  v = rng.standard_normal(shape).astype(np.float32)
  tables = np.zeros((batch, max_blocks), np.int32)
  free = rng.permutation(np.arange(1, num_blocks))
  for b, n in enumerate(kv_lens):
    used = -(-n // block_size)
    tables[b, :used], free = free[:used], free[used:]
    k[tables[b, used - 1], n % block_size or block_size:] = np.nan
    v[tables[b, used - 1], n % block_size or block_size:] = np.nan
  k[0] = v[0] = np.nan
  q = rng.standard_normal((batch, tokens, kv_heads * group, head_dim)).astype(np.float32)
  view = AttentionView(
      positions=jnp.asarray(np.asarray(starts, np.int32)[:, None] + np.arange(tokens)),
      block_tables=jnp.asarray(tables), write_slots=jnp.zeros((batch, tokens), jnp.int32),
      kv_lens=jnp.asarray(kv_lens))
  cast = lambda x: jnp.asarray(x, dtype)
  return cast(q), cast(k), cast(v), view


def relabel(k, v, view, seed):
  """The same logical content at another physical placement of the blocks."""
  num_blocks = k.shape[0]
  perm = np.concatenate([[0], 1 + np.random.default_rng(seed).permutation(num_blocks - 1)])
  inv = np.argsort(perm)  # new block inv[p] holds old block p
  tables = np.asarray(view.block_tables)
  new_tables = np.where(tables > 0, inv[tables], 0).astype(np.int32)
  return k[perm], v[perm], AttentionView(view.positions, jnp.asarray(new_tables),
                                         view.write_slots, view.kv_lens)


def arrays(view):
  """The kernels' plain-array arguments from a view."""
  return view.block_tables, view.positions, view.kv_lens


def ref_attend(q, k, v, view):
  return pa.paged_attention_reference(q, k, v, *arrays(view))


def rel_err(out, ref):
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  return np.linalg.norm(out - ref) / np.linalg.norm(ref)


class PagedAttentionTest(parameterized.TestCase):
  INTERPRET = False

  def setUp(self):
    super().setUp()
    if not self.INTERPRET and jax.default_backend() != "gpu":
      self.skipTest("compiled Pallas GPU kernels need a GPU")

  def attend(self, q, k, v, view, config, layer=None):
    return pa.paged_attention(q, k, v, *arrays(view), layer, config=config,
                              interpret=self.INTERPRET)

  def attend_private(self, q, k, v, view, config, **knobs):
    """The wrapper with its private test knobs (mask_every_tile, merge_block_d)."""
    fn = functools.partial(pa._paged_attention, config=config, interpret=self.INTERPRET,
                           **knobs)
    return jax.jit(fn)(q, k, v, *arrays(view))

  def check(self, q, k, v, view, config, dtype):
    out = self.attend(q, k, v, view, config)
    ref = ref_attend(q, k, v, view)
    chex.assert_shape(out, q.shape)
    self.assertFalse(np.isnan(np.asarray(out, np.float32)).any())
    self.assertLess(rel_err(out, ref), TOL[dtype])
    return out

  @parameterized.product(group=(1, 2, 7), dtype=(jnp.float32, jnp.bfloat16))
  def test_decode(self, group, dtype):
    # Lengths: a single token, a partial block, a split and a bit, a full table.
    q, k, v, view = make_inputs(group, starts=[0, 6, 36, 63], tokens=1, group=group,
                                dtype=dtype)
    self.check(q, k, v, view, SPLIT, dtype)

  @parameterized.product(config=(SPLIT, NO_SPLIT), dtype=(jnp.float32, jnp.bfloat16))
  def test_chunked_prefill(self, config, dtype):
    # A chunk of 5 after 0, 3, 8 and 29 cached tokens: causal within the chunk.
    q, k, v, view = make_inputs(7, starts=[0, 3, 8, 29], tokens=5, group=7, dtype=dtype)
    self.check(q, k, v, view, config, dtype)

  @parameterized.parameters((1, jnp.float32), (3, jnp.bfloat16))
  def test_many_splits(self, tokens, dtype):
    # kv_split = block_k = 16 over a table of 192 keys (12 splits), decode and a chunk of 3:
    # a request of length 1 (decode), partial blocks and splits, and 10 non-empty splits
    # (more than the merge reads per loop iteration).
    q, k, v, view = make_inputs(13, starts=[0, 6, 37, 150 - tokens], tokens=tokens, group=7,
                                max_blocks=48, dtype=dtype)
    self.check(q, k, v, view, MANY, dtype)

  @parameterized.parameters(SPLIT, NO_SPLIT, MANY)
  def test_rows_without_keys_are_zero(self, config):
    # Request 1 has kv_len 0; token 0 of request 2 has position -1 (sees no key).
    q, k, v, view = make_inputs(17, starts=[5, 0, 9], tokens=2, group=7)
    kv_lens = view.kv_lens.at[1].set(0)
    positions = view.positions.at[2, 0].set(-1)
    view = AttentionView(positions, view.block_tables, view.write_slots, kv_lens)
    out = np.asarray(self.attend(q, k, v, view, config))
    empty = np.zeros(out.shape[:2], bool)
    empty[1], empty[2, 0] = True, True
    np.testing.assert_array_equal(out[empty], 0.0)
    ref = np.asarray(ref_attend(q, k, v, view))
    self.assertLess(rel_err(out[~empty], ref[~empty]), TOL[jnp.float32])

  @parameterized.parameters((SPLIT, 1, jnp.bfloat16), (SPLIT, 20, jnp.float32),
                            (NO_SPLIT, 1, jnp.float32), (NO_SPLIT, 20, jnp.bfloat16),
                            (MANY, 20, jnp.bfloat16))
  def test_unmasked_tiles_bit_exact(self, config, tokens, dtype):
    # Tiles every row sees whole skip the mask; masking them too must not change a bit.
    q, k, v, view = make_inputs(19, starts=[0, 3, 43], tokens=tokens, group=2,
                                dtype=dtype)
    out = self.attend(q, k, v, view, config)
    masked = self.attend_private(q, k, v, view, config, mask_every_tile=True)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(masked, np.float32))
    self.assertLess(rel_err(out, ref_attend(q, k, v, view)), TOL[dtype])

  def test_merge_column_tiles_bit_exact(self):
    # The merge may split D into column tiles (for parallelism); the bits must not change.
    q, k, v, view = make_inputs(23, starts=[9, 70], tokens=2, group=7, max_blocks=24,
                                dtype=jnp.bfloat16)
    outs = [np.asarray(self.attend_private(q, k, v, view, MANY, merge_block_d=bd),
                       np.float32) for bd in (None, 16, 32)]
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])

  def test_matches_model_xla_path(self):
    q, k, v, view = make_inputs(11, starts=[2, 17], tokens=3, group=2)
    out = self.attend(q, k, v, view, SPLIT)
    ref = paged.paged_attention_xla(q, k, v, None, view)  # it zeroes the garbage it reads
    # The model's reference uses default matmul precision (TF32 on a GPU).
    self.assertLess(rel_err(out, ref), 1e-5 if jax.default_backend() == "cpu" else 3e-3)

  @parameterized.parameters(SPLIT, NO_SPLIT)
  def test_placement_bit_exact(self, config):
    q, k, v, view = make_inputs(3, starts=[5, 40, 0], tokens=2, group=7,
                                dtype=jnp.bfloat16)
    out = self.attend(q, k, v, view, config)
    k2, v2, view2 = relabel(k, v, view, seed=4)
    self.assertFalse(np.array_equal(view.block_tables, view2.block_tables))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(self.attend(q, k2, v2, view2,
                                                                          config)))

  @parameterized.parameters(SPLIT, MANY)
  def test_batch_independent(self, config):
    # Request 0 alone, then beside other requests, with a wider table and another pool.
    q, k, v, view = make_inputs(5, starts=[44], tokens=1, group=7, dtype=jnp.bfloat16)
    alone = self.attend(q, k, v, view, config)
    q2, k2, v2, view2 = make_inputs(6, starts=[44, 9, 60], tokens=1, group=7,
                                    dtype=jnp.bfloat16, max_blocks=24)
    # Put request 0's content into the bigger pool at request 0's new blocks.
    tables, tables2 = np.asarray(view.block_tables), np.asarray(view2.block_tables)
    used = -(-45 // 4)  # blocks of 45 keys
    k2 = k2.at[tables2[0, :used]].set(k[tables[0, :used]])
    v2 = v2.at[tables2[0, :used]].set(v[tables[0, :used]])
    q2 = q2.at[0].set(q[0])
    together = self.attend(q2, k2, v2, view2, config)
    np.testing.assert_array_equal(np.asarray(alone[0]), np.asarray(together[0]))

  @parameterized.parameters((SPLIT, jnp.float32), (NO_SPLIT, jnp.bfloat16),
                            (MANY, jnp.bfloat16))
  def test_chunk_start_changes_no_bit(self, config, dtype):
    # The same query rows in chunks of 8 that start at other block-aligned positions (so
    # in other row tiles, beside other rows, with other kv_lens): the same bits, also with
    # splits (fixed key positions).
    q, k, v, view = make_inputs(31, starts=[0], tokens=64, group=7, dtype=dtype)
    seen = {}
    for start in (20, 24, 28, 36, 40):
      chunk = AttentionView(view.positions[:, start:start + 8], view.block_tables,
                            view.write_slots[:, :8], jnp.full((1,), start + 8, jnp.int32))
      out = np.asarray(self.attend(q[:, start:start + 8], k, v, chunk, config), np.float32)
      for i in range(8):
        if start + i in seen:
          np.testing.assert_array_equal(out[0, i], seen[start + i])
        seen[start + i] = out[0, i]

  @parameterized.parameters(SPLIT, NO_SPLIT)
  def test_layer_of_full_pool(self, config):
    # All layers' pools and a traced layer index give the bits of that layer's own pool;
    # the other layers hold NaN, so a read of the wrong layer shows.
    q, k, v, view = make_inputs(29, starts=[7, 30], tokens=2, group=7, dtype=jnp.bfloat16)
    alone = self.attend(q, k, v, view, config)
    nan = jnp.full_like(k, jnp.nan)
    k3, v3 = jnp.stack([nan, nan, k]), jnp.stack([nan, nan, v])  # layer 2 holds the K/V
    run = jax.jit(lambda layer: self.attend(q, k3, v3, view, config, layer=layer))
    np.testing.assert_array_equal(np.asarray(alone, np.float32),
                                  np.asarray(run(jnp.int32(2)), np.float32))
    ref = pa.paged_attention_reference(q, k3, v3, *arrays(view), 2)
    self.assertLess(rel_err(alone, ref), TOL[jnp.bfloat16])

  # FP8 K/V: e4m3 pools with a float32 scale per token and kv head (`paged.quantize`), on
  # fresh random inputs; the reference attends over the dequantized values. Garbage past
  # each request (NaN K/V) quantizes to NaN values and NaN scales: a read of it shows.
  @parameterized.parameters((SPLIT, 1, jnp.float32), (SPLIT, 5, jnp.bfloat16),
                            (NO_SPLIT, 5, jnp.float32), (NO_SPLIT, 1, jnp.bfloat16))
  def test_fp8(self, config, tokens, dtype):
    q, k, v, view = make_inputs(31 + tokens, starts=[0, 6, 37], tokens=tokens, group=7,
                                dtype=dtype)
    (kq, ks), (vq, vs) = paged.quantize(k), paged.quantize(v)
    self.assertEqual(kq.dtype, jnp.float8_e4m3fn)
    out = pa.paged_attention(q, kq, vq, *arrays(view), k_scale=ks, v_scale=vs, config=config,
                             interpret=self.INTERPRET)
    ref = pa.paged_attention_reference(q, kq, vq, *arrays(view), k_scale=ks, v_scale=vs)
    self.assertFalse(np.isnan(np.asarray(out, np.float32)).any())
    self.assertLess(rel_err(out, ref), TOL[dtype])
    # The same as the reference over the dequantized K/V given unquantized.
    plain = pa.paged_attention_reference(q, paged.dequantize(kq, ks),
                                         paged.dequantize(vq, vs), *arrays(view))
    np.testing.assert_allclose(np.asarray(ref), np.asarray(plain), rtol=1e-6, atol=1e-6)

  def test_fp8_placement_and_layer_bit_exact(self):
    # Where blocks live changes no bit with FP8 either (scales move with their block), and
    # all layers' pools with a layer index read that layer's values and scales.
    q, k, v, view = make_inputs(37, starts=[5, 40], tokens=2, group=7, dtype=jnp.bfloat16)
    (kq, ks), (vq, vs) = paged.quantize(k), paged.quantize(v)
    attend = lambda kq, ks, vq, vs, view, layer=None: pa.paged_attention(
        q, kq, vq, *arrays(view), layer, k_scale=ks, v_scale=vs, config=SPLIT,
        interpret=self.INTERPRET)
    out = np.asarray(attend(kq, ks, vq, vs, view), np.float32)
    num_blocks = k.shape[0]
    perm = np.concatenate([[0], 1 + np.random.default_rng(4).permutation(num_blocks - 1)])
    inv = np.argsort(perm)
    tables = np.asarray(view.block_tables)
    view2 = AttentionView(view.positions, jnp.asarray(np.where(tables > 0, inv[tables], 0),
                                                      jnp.int32),
                          view.write_slots, view.kv_lens)
    np.testing.assert_array_equal(
        out, np.asarray(attend(kq[perm], ks[perm], vq[perm], vs[perm], view2), np.float32))
    stack = lambda x: jnp.stack([jnp.full_like(x, jnp.nan), x])  # layer 1 holds the K/V
    np.testing.assert_array_equal(
        out, np.asarray(attend(stack(kq), stack(ks), stack(vq), stack(vs), view, 1),
                        np.float32))

  def test_fp8_rejects_missing_or_stray_scales(self):
    q, k, v, view = make_inputs(0, starts=[3], tokens=1, group=2)
    (kq, ks), (vq, vs) = paged.quantize(k), paged.quantize(v)
    with self.assertRaisesRegex(ValueError, "need their k_scale"):
      self.attend(q, kq, vq, view, SPLIT)
    with self.assertRaisesRegex(ValueError, "only float8_e4m3fn"):
      pa.paged_attention(q, k, v, *arrays(view), k_scale=ks, v_scale=vs,
                         interpret=self.INTERPRET)
    with self.assertRaisesRegex(ValueError, "k_scale must be float32"):
      pa.paged_attention(q, kq, vq, *arrays(view), k_scale=ks[..., :1], v_scale=vs,
                         interpret=self.INTERPRET)

  def test_rejects_bad_shapes(self):
    q, k, v, view = make_inputs(0, starts=[3], tokens=1, group=2)
    with self.assertRaisesRegex(ValueError, "kv heads"):
      self.attend(q[:, :, :3], k, v, view, SPLIT)
    with self.assertRaisesRegex(ValueError, "must be equal"):
      self.attend(q, k, v[..., :16], view, SPLIT)
    with self.assertRaisesRegex(ValueError, "needs a layer index"):
      self.attend(q, k[None], v[None], view, SPLIT)
    with self.assertRaisesRegex(ValueError, "positions must be"):
      pa.paged_attention(q, k, v, view.block_tables, view.positions[:, :0], view.kv_lens,
                         interpret=True)


class PagedAttentionInterpretTest(PagedAttentionTest):
  INTERPRET = True


class TuningConfigTest(parameterized.TestCase):

  @parameterized.parameters(
      dict(block_q=8), dict(block_q=48), dict(block_k=0), dict(block_k=24),
      dict(kv_split=100), dict(kv_split=0), dict(num_warps=3), dict(num_stages=0))
  def test_rejects(self, **kwargs):
    with self.assertRaises(ValueError):
      pa.TuningConfig(**kwargs)

  def test_defaults_are_valid(self):
    self.assertEqual(pa.default_config(7), pa.DEFAULT_DECODE)
    self.assertEqual(pa.default_config(7 * 64), pa.DEFAULT_PREFILL)
    self.assertEqual(pa.default_config(7 * 64, 128), pa.DEFAULT_PREFILL_D128)
    self.assertEqual(pa.default_config(7, 128), pa.DEFAULT_DECODE)


if __name__ == "__main__":
  absltest.main()


@pytest.mark.parametrize("kv_dtype", [None, "float8_e4m3fn"])
@pytest.mark.parametrize("attention", ["pallas_interpret", "pallas", "triton", "mosaic"])
def test_engine_backend_dense_and_hq_bit_identical(tiny, tiny_layout, attention, kv_dtype):
  """The engine with the kernel (interpreted; compiled on a GPU): dense and HQ (prefix
  reuse) agree to the bit, and both match the reference backend within rounding. "mosaic"
  runs prefill and decode on the Mosaic GPU kernels, "pallas" on Hopper prefill on Mosaic
  and decode on Triton: bf16, head_dim 64. With FP8 K/V "pallas" runs Triton throughout
  and "mosaic" is refused, naming the kernel."""
  from hq_jax.serve.engine import Engine
  from hq_jax.kv.dedup import DedupKVCache
  from hq_jax.kv.dense import DenseKVCache
  if attention != "pallas_interpret" and jax.default_backend() != "gpu":
    pytest.skip("the compiled Pallas GPU kernel needs a GPU")
  params, cfg = tiny
  if attention in ("pallas", "mosaic"):
    cfg = dataclasses.replace(cfg, dtype="bfloat16", head_dim=64)
    params = model_lib.init_params(cfg, jax.random.key(0), scale=0.1)
  tiny_layout = KVLayout.from_config(cfg, block_size=16, dtype=kv_dtype)
  if kv_dtype and attention == "mosaic":
    with pytest.raises(ValueError, match="paged_prefill_mgpu"):
      Engine(params, cfg, chunk_size=32, attention=attention, kv_dtype=kv_dtype)
    return
  engine = Engine(params, cfg, chunk_size=32, attention=attention, kv_dtype=kv_dtype)
  rng = np.random.default_rng(0)
  prefix = rng.integers(0, cfg.vocab_size, 64)
  reqs = [np.concatenate([prefix, rng.integers(0, cfg.vocab_size, n)]) for n in (21, 9)]
  dense = DenseKVCache.for_requests(tiny_layout, max_requests=2, max_seq_len=128)
  hq = DedupKVCache.init(tiny_layout, num_blocks=16, max_requests=2, max_seq_len=128)
  hq, _ = engine.prefill(hq, reqs[0])
  hq, h = engine.prefill(hq, reqs[1])  # its first two chunks come from the cache
  dense, d = engine.prefill(dense, reqs[1])
  assert h.cached_tokens == 64
  np.testing.assert_array_equal(np.asarray(d.logits[64:]), np.asarray(h.logits))
  dense, dl = engine.decode(dense, [d.slot], [5])
  hq, hl = engine.decode(hq, [h.slot], [5])
  assert dl.attention == hl.attention == "paged"
  np.testing.assert_array_equal(np.asarray(dl.logits), np.asarray(hl.logits))
  ref = Engine(params, cfg, chunk_size=32, kv_dtype=kv_dtype)
  rcache, r = ref.prefill(
      DenseKVCache.for_requests(tiny_layout, max_requests=2, max_seq_len=128), reqs[1])
  if cfg.dtype == "bfloat16":  # bf16 activations: rounding, not a tolerance on every logit
    _, rl = ref.decode(rcache, [r.slot], [5])
    for got, want in ((d.logits, r.logits), (dl.logits, rl.logits)):
      got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
      assert np.linalg.norm(got - want) / np.linalg.norm(want) < 2e-2
    assert (engine.prefill_kernel, engine.decode_kernel) == (
        ("triton", "triton") if kv_dtype else
        ("mosaic", "triton" if attention == "pallas" else "mosaic"))
  else:
    atol = 1e-4 if jax.default_backend() == "cpu" else 5e-2  # GPU matmuls default to TF32
    np.testing.assert_allclose(np.asarray(d.logits), np.asarray(r.logits), atol=atol)
