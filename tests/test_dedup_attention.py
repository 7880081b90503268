"""Shared-prefix decode attention and its planner.

`DedupAttentionTest` runs the kernels compiled (skipped without a GPU); the subclass
`DedupAttentionInterpretTest` runs the same bodies through the Pallas interpreter on CPU.
Inputs are random; unused blocks and slots past a request's length hold NaN, so any read
of them shows in the output.
"""

import dataclasses
import warnings

from absl.testing import absltest, parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hq_jax.kv import sharing
from hq_jax.kv.dedup import DedupKVCache
from hq_jax.kv.paged import AttentionView, KVLayout
from pallas_kernels import dedup_attention as da
from pallas_kernels import paged_attention as pa

warnings.filterwarnings("ignore", message=".*Pallas Triton backend is deprecated.*")

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}  # relative L2 error vs the f32 reference
BS = 4  # tokens per block in the kernel tests
# Small tiles: a tile of 16 rows (2 requests x G = 7, or 8 x G = 2) of 16 keys, splits of
# 32 keys (8 blocks of BS): the paged kernel under SMALL.split gives the same bits.
SMALL = da.TuningConfig(split=pa.TuningConfig(block_q=16, block_k=16, kv_split=32))


def make_batch(seed, requests, segments, *, kv_heads=2, group=2, head_dim=32,
               dtype=jnp.float32, max_blocks=24, num_layers=None, block_size=BS):
  """requests: [(segment names, private tokens)]; segments: {name: blocks}.

  Each segment is stored once (the same physical blocks for every request that names it);
  a request's table is its segments in order, then its own blocks for the private tokens.
  Pools are one layer's [NB, bs, K, D], or all layers' [L, NB, bs, K, D] with num_layers;
  block 0, unused blocks and slots past a request's length hold NaN.
  """
  rng = np.random.default_rng(seed)
  batch = len(requests)
  need = sum(segments.values()) + sum(-(-p // block_size) for _, p in requests)
  num_blocks = 1 + need + 3
  free = list(rng.permutation(np.arange(1, num_blocks)))
  seg_blocks = {name: [int(free.pop()) for _ in range(n)] for name, n in segments.items()}
  shape = (num_blocks, block_size, kv_heads, head_dim)
  shape = shape if num_layers is None else (num_layers, *shape)
  k = rng.standard_normal(shape).astype(np.float32)
  v = rng.standard_normal(shape).astype(np.float32)
  k[..., 0, :, :, :] = v[..., 0, :, :, :] = np.nan
  tables = np.zeros((batch, max_blocks), np.int32)
  kv_lens = np.zeros((batch,), np.int32)
  used = set()
  for b, (names, private) in enumerate(requests):
    row = [blk for n in names for blk in seg_blocks[n]]
    own = [int(free.pop()) for _ in range(-(-private // block_size))]
    tables[b, :len(row) + len(own)] = row + own
    kv_lens[b] = len(row) * block_size + private
    used.update(row + own)
    if private % block_size:
      tail = (..., own[-1], slice(private % block_size, None), slice(None), slice(None))
      k[tail] = v[tail] = np.nan
  for blk in set(range(1, num_blocks)) - used:
    k[..., blk, :, :, :] = v[..., blk, :, :, :] = np.nan
  q = rng.standard_normal((batch, 1, kv_heads * group, head_dim)).astype(np.float32)
  view = AttentionView(positions=jnp.asarray(kv_lens[:, None] - 1),
                       block_tables=jnp.asarray(tables),
                       write_slots=jnp.zeros((batch, 1), jnp.int32),
                       kv_lens=jnp.asarray(kv_lens))
  cast = lambda x: jnp.asarray(x, dtype)
  return cast(q), cast(k), cast(v), view


def arrays(view):
  """The kernels' plain-array arguments from a view."""
  return view.block_tables, view.positions, view.kv_lens


def rel_err(out, ref):
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  return np.linalg.norm(out - ref) / np.linalg.norm(ref)


CASES = dict(
    one_group=([(("sys",), 5), (("sys",), 9), (("sys",), 1)], {"sys": 6}),
    nested=([(("sys", "a"), 3), (("sys", "a"), 6), (("sys", "b"), 4), (("sys", "b"), 8),
             (("sys", "b"), 2), (("sys",), 7), ((), 13)], {"sys": 5, "a": 3, "b": 4}),
    no_sharing=([((), 9), ((), 21), ((), 40)], {}),
    partial_blocks=([(("sys",), 2), (("sys",), 4), (("sys",), 3)], {"sys": 3}),
    single_request=([(("sys",), 6)], {"sys": 4}),
    many_requests=([(("sys",), 1 + i) for i in range(11)], {"sys": 3}),  # tiles of 8 and 3
    # What the merge must handle: depth 2, requests whose private part is empty (they end
    # where their deepest node ends: 1 in "a", 3 in "b", 5 in "sys"), one with no node (7).
    merge=([(("sys", "a"), 3), (("sys", "a"), 0), (("sys", "b"), 4), (("sys", "b"), 0),
            (("sys", "b"), 9), (("sys",), 0), (("sys",), 7), ((), 13)],
           {"sys": 5, "a": 3, "b": 4}),
)


shared_splits = da.shared_split_count


def random_batch(seed, *, group, dtype=jnp.float32, kv_split=SMALL.split.kv_split):
  """A batch of 7 requests with random lengths (fixed shapes: one compile per group): three
  on a prefix "sys" + sub-prefix "a", two on "sys" alone, one on "c" alone (a node of one
  request is no node) and one sharing nothing. Shared lengths are random numbers of
  blocks, some whole splits (multiples of kv_split), private parts random (0 included)."""
  rng = np.random.default_rng(seed)
  per_split = kv_split // BS
  sys_blocks = int(rng.choice([per_split, 2 * per_split, rng.integers(1, 3 * per_split)]))
  a_blocks = int(rng.integers(1, 2 * per_split))
  if seed % 2:  # the sub-prefix ends on a split boundary
    a_blocks = -sys_blocks % per_split or per_split
  segments = {"sys": sys_blocks, "a": a_blocks, "c": int(rng.integers(1, per_split))}
  own = lambda: int(rng.integers(0, 3 * BS))
  requests = ([(("sys", "a"), own()) for _ in range(3)] + [(("sys",), own()) for _ in range(2)]
              + [(("c",), own()), ((), int(rng.integers(1, 12 * BS)))])
  return make_batch(seed, requests, segments, group=group, dtype=dtype, max_blocks=64)


class DedupAttentionTest(parameterized.TestCase):
  INTERPRET = False

  def setUp(self):
    super().setUp()
    if not self.INTERPRET and jax.default_backend() != "gpu":
      self.skipTest("compiled Pallas GPU kernels need a GPU")

  def plan(self, view, group, config=SMALL):
    return sharing.build_plan(np.asarray(view.block_tables), np.asarray(view.kv_lens), BS,
                              requests_per_tile=config.requests_per_tile(group))

  def check_equals_paged(self, q, k, v, view, plan, config=SMALL, **scales):
    """dedup == paged (same split config) bit for bit, no NaN; returns the output."""
    out = da.dedup_attention(q, k, v, *arrays(view), plan, config=config,
                             interpret=self.INTERPRET, **scales)
    chex.assert_shape(out, q.shape)
    self.assertFalse(np.isnan(np.asarray(out, np.float32)).any())
    paged = pa.paged_attention(q, k, v, *arrays(view), config=config.split,
                               interpret=self.INTERPRET, **scales)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(paged, np.float32))
    return out

  def run_case(self, case, *, group=2, dtype=jnp.float32, seed=0, config=SMALL):
    requests, segments = CASES[case]
    q, k, v, view = make_batch(seed, requests, segments, group=group, dtype=dtype)
    plan, summary = self.plan(view, group, config)
    out = self.check_equals_paged(q, k, v, view, plan, config)
    ref = pa.paged_attention_reference(q, k, v, *arrays(view))
    self.assertLess(rel_err(out, ref), TOL[dtype])
    # The decomposition's own oracle agrees with the plain one: the plan is right.
    self.assertLess(rel_err(da.dedup_attention_reference(q, k, v, *arrays(view), plan), ref), 1e-5)
    return out, summary, plan

  @parameterized.product(case=tuple(CASES), group=(2, 7))
  def test_equals_paged_and_reference_f32(self, case, group):
    _, summary, plan = self.run_case(case, group=group)
    if case in ("nested", "merge"):  # nodes of 20 keys, 32 and 36 with their sub-prefixes
      self.assertGreater(shared_splits(plan, SMALL.split.kv_split), 0)

  def test_random_shared_lengths_equal_paged(self):
    # Fresh random batches (shared lengths that are and are not whole splits, several
    # requests per node, one on a prefix of its own, one sharing nothing): the paged bits,
    # and the shared programs computed some splits (the test cannot pass by not sharing).
    # G = 7: a node spans several tiles (G = 2 runs through the engine in test_exactness).
    # One batch (a batch of other lengths compiles anew; the test below reuses it): "sys"
    # is 84 keys (2 whole splits and a straddling one), "sys" + "a" 96 (3 whole splits).
    group = 7
    q, k, v, view = random_batch(13, group=group)
    plan, summary = self.plan(view, group)
    self.assertGreater(summary.saved_tokens, 0)
    self.assertGreater(shared_splits(plan, SMALL.split.kv_split), 0)
    self.check_equals_paged(q, k, v, view, plan)

  def test_shared_splits_are_read_once_per_tile(self):
    # Blocks that only the shared programs read (whole splits inside a node) are replaced
    # by block 0 (NaN) in the tables of the requests no tile reads its table for: dedup
    # never reads them there (its bits are unchanged) while paged decode does (its output
    # changes: NaN, or other values where the CPU's max drops NaN).
    q, k, v, view = random_batch(13, group=7)
    plan, _ = self.plan(view, 7)
    self.assertGreater(shared_splits(plan, SMALL.split.kv_split), 0)
    clean = self.check_equals_paged(q, k, v, view, plan)
    tables = np.array(view.block_tables)
    per_split = SMALL.split.kv_split // BS
    reqs, starts = np.asarray(plan.tile_reqs), np.asarray(plan.private_start)
    firsts = set(reqs[:, 0].tolist())  # their tables are what the tiles read
    poisoned = 0
    for r in sorted(set(reqs[:, 1:].reshape(-1).tolist()) - firsts - {-1}):
      blocks = starts[r] // SMALL.split.kv_split * per_split  # below the straddling split
      tables[r, :blocks] = 0  # block 0 holds NaN
      poisoned += blocks
    self.assertGreater(poisoned, 0)
    dirty = dataclasses.replace(view, block_tables=jnp.asarray(tables))
    out = da.dedup_attention(q, k, v, *arrays(dirty), plan, config=SMALL,
                             interpret=self.INTERPRET)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(clean))
    paged = pa.paged_attention(q, k, v, *arrays(dirty), config=SMALL.split,
                               interpret=self.INTERPRET)
    self.assertFalse(np.array_equal(np.asarray(paged), np.asarray(clean), equal_nan=True))

  @parameterized.parameters("nested", "one_group")
  def test_equals_paged_bf16(self, case):
    _, summary, _ = self.run_case(case, group=7, dtype=jnp.bfloat16, seed=3)
    self.assertGreater(summary.saved_tokens, 0)

  @parameterized.parameters(jnp.float32, jnp.bfloat16)
  def test_fp8(self, dtype):
    # FP8 pools (e4m3 and a float32 scale per token and kv head) on fresh random inputs:
    # paged's bits, and the references over the dequantized values (NaN garbage quantizes
    # to NaN).
    from hq_jax.kv import paged
    q, k, v, view = make_batch(11, *CASES["nested"], group=7, dtype=dtype)
    (kq, ks), (vq, vs) = paged.quantize(k), paged.quantize(v)
    plan, _ = self.plan(view, 7)
    self.assertGreater(shared_splits(plan, SMALL.split.kv_split), 0)
    out = self.check_equals_paged(q, kq, vq, view, plan, k_scale=ks, v_scale=vs)
    ref = pa.paged_attention_reference(q, kq, vq, *arrays(view), k_scale=ks, v_scale=vs)
    self.assertLess(rel_err(out, ref), TOL[dtype])
    own = da.dedup_attention_reference(q, kq, vq, *arrays(view), plan, k_scale=ks,
                                       v_scale=vs)
    self.assertLess(rel_err(own, ref), 1e-5)

  @parameterized.parameters(2, 7)
  def test_merge_depth_empty_private_no_node(self, group):
    # Requests with 0, 1 or 2 nodes, private parts that may be empty: paged's bits.
    out, summary, plan = self.run_case("merge", group=group, seed=11)
    self.assertEqual(summary.depth, 2)
    rows = np.asarray(plan.req_rows)
    np.testing.assert_array_equal((rows >= 0).sum(1), [2, 2, 2, 2, 2, 1, 1, 0])
    q, k, v, view = make_batch(11, *CASES["merge"], group=group)
    np.testing.assert_array_equal(np.asarray(view.kv_lens) == np.asarray(plan.private_start),
                                  [0, 1, 0, 1, 0, 1, 0, 0])
    ref = da.dedup_attention_reference(q, k, v, *arrays(view), plan)
    self.assertLess(rel_err(out, ref), 1e-5)

  def test_block_placement_changes_no_bit(self):
    # The same logical batch with its blocks at other physical ids (so other node and tile
    # orders in the plan): every request's partials and merge order are the same.
    q, k, v, view = make_batch(13, *CASES["merge"], group=7)
    perm = np.r_[0, 1 + np.random.default_rng(0).permutation(k.shape[0] - 1)]
    k2 = jnp.zeros_like(k).at[perm].set(k)
    v2 = jnp.zeros_like(v).at[perm].set(v)
    view2 = AttentionView(view.positions, jnp.asarray(perm[np.asarray(view.block_tables)],
                                                      jnp.int32), view.write_slots,
                          view.kv_lens)
    outs = []
    for kk, vv, vw in ((k, v, view), (k2, v2, view2)):
      plan, _ = sharing.build_plan(np.asarray(vw.block_tables), np.asarray(vw.kv_lens), BS,
                                   requests_per_tile=2)
      outs.append(np.asarray(da.dedup_attention(q, kk, vv, *arrays(vw), plan, config=SMALL,
                                                interpret=self.INTERPRET)))
    np.testing.assert_array_equal(outs[0], outs[1])

  def test_nothing_shared_is_the_paged_kernel(self):
    q, k, v, view = make_batch(6, *CASES["no_sharing"], group=7, dtype=jnp.bfloat16)
    plan, summary = sharing.build_plan(np.asarray(view.block_tables),
                                       np.asarray(view.kv_lens), BS, requests_per_tile=2)
    self.assertFalse(plan.has_shared)
    self.assertEqual(summary.saved_tokens, 0)
    out = da.dedup_attention(q, k, v, *arrays(view), plan, config=SMALL, interpret=self.INTERPRET)
    paged = pa.paged_attention(q, k, v, *arrays(view), config=SMALL.split,
                               interpret=self.INTERPRET)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(paged, np.float32))

  def test_without_plan_or_with_a_chunk_is_the_paged_kernel(self):
    q, k, v, view = make_batch(1, *CASES["one_group"])
    plan, _ = sharing.build_plan(np.asarray(view.block_tables), np.asarray(view.kv_lens), BS,
                                 requests_per_tile=8)
    paged = pa.paged_attention(q, k, v, *arrays(view), interpret=self.INTERPRET)
    out = da.dedup_attention(q, k, v, *arrays(view), None, interpret=self.INTERPRET)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(paged))
    # Two query tokens (a chunk): the plan does not apply; the paged kernel runs.
    q2 = jnp.concatenate([q, q], axis=1)
    pos2 = jnp.concatenate([view.positions - 1, view.positions], axis=1)
    out2 = da.dedup_attention(q2, k, v, view.block_tables, pos2, view.kv_lens, plan,
                              interpret=self.INTERPRET)
    ref2 = pa.paged_attention_reference(q2, k, v, view.block_tables, pos2, view.kv_lens)
    self.assertLess(rel_err(out2, ref2), 1e-5)

  def test_layer_of_full_pool(self):
    # All layers' pools and a traced layer index: the bits of that layer's own pool.
    q, k, v, view = make_batch(8, *CASES["nested"], group=7, dtype=jnp.bfloat16)
    plan, _ = sharing.build_plan(np.asarray(view.block_tables), np.asarray(view.kv_lens), BS,
                                 requests_per_tile=2)
    alone = da.dedup_attention(q, k, v, *arrays(view), plan, config=SMALL,
                               interpret=self.INTERPRET)
    nan = jnp.full_like(k, jnp.nan)
    k3, v3 = jnp.stack([nan, k, nan]), jnp.stack([nan, v, nan])
    run = jax.jit(lambda layer: da.dedup_attention(q, k3, v3, *arrays(view), plan, layer,
                                                   config=SMALL, interpret=self.INTERPRET))
    np.testing.assert_array_equal(np.asarray(alone, np.float32),
                                  np.asarray(run(jnp.int32(1)), np.float32))

  def test_cached_plan_after_more_tokens(self):
    # A plan made when the private parts were shorter (as SharingPlanner keeps it) is
    # still exact: its private_tokens_hint only sets the number of split slots (a request
    # program loops over the splits past them).
    q, k, v, view = make_batch(4, *CASES["one_group"], group=7)
    lens = np.asarray(view.kv_lens)
    plan, _ = sharing.build_plan(np.asarray(view.block_tables), lens - 4, BS,
                                 requests_per_tile=2)
    plan = dataclasses.replace(plan, private_tokens_hint=4)  # far too small a hint
    self.assertLess(plan.private_tokens_hint, int(lens.max()) - 6 * BS)
    self.check_equals_paged(q, k, v, view, plan, config=da.TuningConfig(
        split=dataclasses.replace(SMALL.split, kv_split=16)))

  def test_rejects_bad_plan(self):
    q, k, v, view = make_batch(2, *CASES["one_group"], group=7)
    plan, _ = sharing.build_plan(np.asarray(view.block_tables), np.asarray(view.kv_lens), BS,
                                 requests_per_tile=4)  # 4 x 7 rows > block_q = 16
    with self.assertRaisesRegex(ValueError, "block_q"):
      da.dedup_attention(q, k, v, *arrays(view), plan, config=SMALL, interpret=self.INTERPRET)


class DedupAttentionInterpretTest(DedupAttentionTest):
  INTERPRET = True


class PlannerTest(parameterized.TestCase):

  def nodes(self, case):
    requests, segments = CASES[case]
    _, _, _, view = make_batch(0, requests, segments)
    return sharing.find_shared_nodes(np.asarray(view.block_tables), np.asarray(view.kv_lens),
                                     BS)

  def test_nested_groups_found_exactly(self):
    nodes, start = self.nodes("nested")
    got = sorted((n.requests, n.start, n.end) for n in nodes)
    # sys (5 blocks) by requests 0-5; then a (3) by 0, 1 and b (4) by 2, 3, 4.
    self.assertEqual(got, [((0, 1), 5, 8), ((0, 1, 2, 3, 4, 5), 0, 5), ((2, 3, 4), 5, 9)])
    np.testing.assert_array_equal(start, [8, 8, 9, 9, 9, 5, 0])
    root = [i for i, n in enumerate(nodes) if n.parent == -1]
    self.assertLen(root, 1)
    self.assertTrue(all(n.parent == root[0] for n in nodes if n.parent != -1))

  def test_partial_blocks_and_no_sharing(self):
    nodes, start = self.nodes("no_sharing")
    self.assertEqual(nodes, [])
    np.testing.assert_array_equal(start, 0)
    # Two requests holding the same partially written block share only full blocks.
    tables = np.array([[7, 8, 9, -1], [7, 8, 9, -1]], np.int32)
    nodes, start = sharing.find_shared_nodes(tables, np.array([10, 12]), 4)
    self.assertEqual([(n.requests, n.start, n.end) for n in nodes], [((0, 1), 0, 2)])
    np.testing.assert_array_equal(start, [2, 2])

  def test_single_request_and_min_node(self):
    nodes, start = self.nodes("single_request")
    self.assertEqual(nodes, [])
    tables = np.array([[1, 2, 3, 4], [1, 2, 5, 6], [1, 9, 5, 6]], np.int32)
    nodes, _ = sharing.find_shared_nodes(tables, np.array([16, 16, 16]), 4)
    self.assertEqual(sorted((n.requests, n.start, n.end) for n in nodes),
                     [((0, 1), 1, 2), ((0, 1, 2), 0, 1)])  # blocks 5, 6 differ in position 1
    nodes, start = sharing.find_shared_nodes(tables, np.array([16, 16, 16]), 4,
                                             min_node_blocks=2)
    self.assertEqual(nodes, [])
    np.testing.assert_array_equal(start, 0)

  def test_salts_and_prefixes_from_the_hq_cache(self):
    """Requests with another salt or another prefix do not share blocks, so are not grouped."""
    layout = KVLayout(num_layers=1, num_kv_heads=1, head_dim=16, block_size=4,
                      dtype="float32")
    cache = DedupKVCache.init(layout, num_blocks=64, max_requests=6, max_seq_len=40)
    rng = np.random.default_rng(0)
    prefix, other = rng.integers(0, 100, 12), rng.integers(0, 100, 12)
    prompts = [(np.r_[prefix, rng.integers(0, 100, 5)], 0),
               (np.r_[prefix, rng.integers(0, 100, 7)], 0),
               (np.r_[prefix, rng.integers(0, 100, 3)], 1),  # another tenant
               (np.r_[other, rng.integers(0, 100, 6)], 0)]  # another prefix
    slots = []
    for tokens, salt in prompts:
      cache, slot = cache.admit(tokens, salt)
      cache = cache.commit(slot, tokens.size)
      slots.append(slot)
    tables = np.asarray(cache.block_tables)[slots]
    lens = np.asarray(cache.seq_lens)[slots]
    nodes, start = sharing.find_shared_nodes(tables, lens, 4)
    self.assertEqual([(n.requests, n.start, n.end) for n in nodes], [((0, 1), 0, 3)])
    np.testing.assert_array_equal(start, [3, 3, 0, 0])
    summary = sharing.build_plan(tables, lens, 4, requests_per_tile=2)[1]
    self.assertEqual(summary.saved_tokens, 12)

  def test_plan_arrays_and_cache(self):
    _, _, _, view = make_batch(0, *CASES["nested"])
    tables, lens = np.asarray(view.block_tables), np.asarray(view.kv_lens)
    plan, summary = sharing.build_plan(tables, lens, BS, requests_per_tile=2)
    self.assertEqual(summary.depth, 2)
    self.assertEqual(summary.saved_tokens, BS * (5 * 5 + 3 * 1 + 4 * 2))
    # Tiles: sys 6 requests -> 3 tiles, a -> 1, b -> 2; padded to 8.
    self.assertEqual(plan.tile_node.shape, (8,))
    rows = np.asarray(plan.req_rows)
    reqs = np.asarray(plan.tile_reqs).reshape(-1)
    for b in range(len(lens)):
      self.assertTrue(all(reqs[r] == b for r in rows[b] if r >= 0))
    self.assertEqual(int((rows[6] >= 0).sum()), 0)
    planner = sharing.SharingPlanner(BS, requests_per_tile=2)
    planner.plan(tables, lens)
    planner.plan(tables, lens + (lens % BS < BS - 1))  # a token inside a block: same plan
    self.assertEqual(planner.builds, 1)
    changed = tables.copy()
    changed[0, 0] = tables[6, 0]
    planner.plan(changed, lens)
    self.assertEqual(planner.builds, 2)


@pytest.mark.parametrize("attention,kv_dtype", [
    ("reference", None), ("pallas_interpret", None), ("pallas", None),
    ("pallas_interpret", "float8_e4m3fn"), ("pallas", "float8_e4m3fn")])
def test_engine_decode_dedup_matches_paged(tiny, tiny_layout, attention, kv_dtype):
  """HQ cache, three requests on one 64-token prefix: dedup decode = paged, bit for bit;
  auto mode picks dedup above its threshold and paged below it (FP8 K/V too)."""
  from hq_jax.serve.engine import Engine
  if attention == "pallas" and jax.default_backend() != "gpu":
    pytest.skip("the compiled Pallas GPU kernels need a GPU")
  params, cfg = tiny
  if kv_dtype:
    tiny_layout = KVLayout.from_config(cfg, 16, kv_dtype)
  rng = np.random.default_rng(0)
  prefix = rng.integers(0, cfg.vocab_size, 64)
  reqs = [np.r_[prefix, rng.integers(0, cfg.vocab_size, n)] for n in (5, 19, 2)]
  logits = {}
  for mode, threshold in (("paged", 0), ("dedup", 0), ("auto", 10**9)):
    engine = Engine(params, cfg, chunk_size=32, attention=attention, decode_attention=mode,
                    auto_min_saved_tokens=threshold, kv_dtype=kv_dtype)
    cache = DedupKVCache.init(tiny_layout, num_blocks=32, max_requests=4, max_seq_len=128)
    slots = []
    for r in reqs:
      cache, res = engine.prefill(cache, r, logits="last")
      slots.append(res.slot)
    steps = []
    for step in range(2):
      cache, out = engine.decode(cache, slots, [7 + step, 8, 9])
      steps.append(np.asarray(out.logits))
      assert out.attention == {"paged": "paged", "dedup": "dedup", "auto": "paged"}[mode]
    logits[mode] = np.stack(steps)
  np.testing.assert_array_equal(logits["paged"], logits["auto"])
  # The same bits (the exactness contract; tests/test_exactness.py has prefixes long
  # enough for the kernel to share whole splits).
  np.testing.assert_array_equal(logits["dedup"], logits["paged"])


def test_engine_rejects_unknown_decode_attention(tiny):
  from hq_jax.serve.engine import Engine
  with pytest.raises(ValueError, match="decode_attention"):
    Engine(*tiny, decode_attention="cascade")


class TuningConfigTest(parameterized.TestCase):

  def test_default_is_the_paged_decode_config(self):
    # What the engine runs: the paged kernel's decode tiles for T = 1, so the same bits.
    for d, g in ((64, 7), (128, 7), (16, 2)):
      self.assertEqual(da.default_config(d, g).split, pa.default_config(g, d))
    self.assertEqual(da.default_config(64, 7).requests_per_tile(7), 2)
    self.assertEqual(da.default_config(16, 2).requests_per_tile(2), 8)
    with self.assertRaises(ValueError):
      SMALL.requests_per_tile(17)


if __name__ == "__main__":
  absltest.main()
