"""Shared-prefix ("deduplicated block") decode attention as a Pallas GPU kernel.

Three parts, as in `paged_attention.py`: the kernel body (`_partials_kernel`), the jitted
wrapper `dedup_attention` with its `TuningConfig`, and the float32
`dedup_attention_reference`.

The HQ cache stores a block shared by C requests once, but paged decode still reads it C
times (once per request). Here a sharing plan (`hq_jax.kv.sharing`) names the shared runs
of blocks (trie nodes) and their requests; decode attention is split, as in FlashInfer's
cascade attention and Hydragen, into

  1. shared part: one program per (tile of a node's requests, kv head, split of the run).
     Its query rows are all G query heads of the kv head for `requests_per_tile` requests
     (row = slot * G + g), so each K/V tile is read once for all of them and the score and
     value products are matrix work;
  2. private part: one program per (request, kv head, split) over the request's keys after
     its deepest node, `[private_start, kv_len)`: paged decode with a shifted start;
  3. an exact log-sum-exp merge of each request's partials (acc, m, l) in XLA.

Both parts run the same kernel body (one launch each, with their own tile sizes). An item
(a tile or a request) reads keys [0, len) of one row of a block table, from a block offset;
its splits have a per-item length (cdiv(len, splits) rounded to block_k), so a short item
never launches long empty loops and the static split count only sets parallelism.

The reduction order differs from the paged kernel's (other splits, and the shared part is
merged in separately), so outputs are equal within floating-point tolerance, not bit-exact:
the engine keeps exact paged decode as its default. Decode (T = 1) only; anything else is
handed to the paged kernel.

Backend: the Triton lowering of Pallas, like `paged_attention.py` (same gather loads through
block tables, which is what works in both Triton and the interpreter today).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu_triton

from hq_jax.kv.paged import AttentionView, gather
from hq_jax.kv.sharing import SharingPlan
from pallas_kernels.paged_attention import check_inputs, online_softmax_step, paged_attention

_WARPS = (1, 2, 4, 8, 16)


def _is_pow2(x: int) -> bool:
  return x > 0 and x & (x - 1) == 0


@dataclasses.dataclass(frozen=True)
class TuningConfig:
  """Tile sizes for the shared and private launches.

  shared_block_q: query rows per shared program (>= requests_per_tile * G of the plan).
  shared_block_k / private_block_k: keys per inner step (powers of two >= 16).
  shared_kv_split / private_kv_split: target keys per split; the static split count is
    cdiv(longest node or private hint, kv_split), capped by max_splits.
  private_block_q: rows per private program (>= G: one request's query heads).
  """

  shared_block_q: int = 64
  shared_block_k: int = 64
  shared_kv_split: int = 2048
  shared_num_warps: int = 4
  shared_num_stages: int = 2
  private_block_q: int = 16
  private_block_k: int = 128
  private_kv_split: int = 1024
  private_num_warps: int = 4
  private_num_stages: int = 3
  max_splits: int = 64

  def __post_init__(self):
    for name in ("shared_block_q", "shared_block_k", "private_block_q", "private_block_k"):
      v = getattr(self, name)
      if not _is_pow2(v) or v < 16:
        raise ValueError(f"{name} must be a power of two >= 16 (a Triton dot needs 16), "
                         f"got {v}")
    for name, block in (("shared_kv_split", "shared_block_k"),
                        ("private_kv_split", "private_block_k")):
      v = getattr(self, name)
      if v <= 0 or v % getattr(self, block):
        raise ValueError(f"{name} must be a positive multiple of {block}="
                         f"{getattr(self, block)}, got {v}")
    for name in ("shared_num_warps", "private_num_warps"):
      if getattr(self, name) not in _WARPS:
        raise ValueError(f"{name} must be one of {_WARPS}, got {getattr(self, name)}")
    for name in ("shared_num_stages", "private_num_stages", "max_splits"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

  def requests_per_tile(self, group: int) -> int:
    """Requests whose G query heads fill one shared tile (what the planner needs)."""
    if group > self.shared_block_q:
      raise ValueError(f"a group of {group} query heads does not fit shared_block_q="
                       f"{self.shared_block_q}")
    return self.shared_block_q // group


DEFAULT = TuningConfig()


# ----------------------------------------------------------------------------- kernel
def _partials_kernel(
    item_table_ref,  # [I] int32 row of tables_ref each item reads
    item_offset_ref,  # [I] int32 first logical block of the item within that row
    item_len_ref,  # [I] int32 keys of the item (0: empty)
    item_reqs_ref,  # [I, RPT] int32 batch row of each request of the item, -1 = none
    tables_ref,  # [NT, MBt] int32 physical blocks
    q_ref,  # [B, H, D]
    k_ref,  # [num_blocks, block_size, D] (this program's kv head)
    v_ref,  # [num_blocks, block_size, D]
    acc_ref, m_ref, l_ref,  # [block_q, D], [block_q], [block_q] of this (item, head, split)
    *, block_q: int, block_k: int, num_splits: int, group: int, scale: float, precision):
  i, h, s = (pl.program_id(a) for a in range(3))
  rpt = item_reqs_ref.shape[1]
  num_tables = tables_ref.shape[1]
  block_size, head_dim = k_ref.shape[1], k_ref.shape[2]

  # Row = slot * G + g: request item_reqs[i, slot], query head h * G + g.
  rows = jnp.arange(block_q, dtype=jnp.int32)
  slot, g = rows // group, rows % group
  row_ok = rows < rpt * group
  req = plgpu_triton.load(item_reqs_ref.at[i, jnp.minimum(slot, rpt - 1)], mask=row_ok,
                          other=-1)  # [bq]
  row_ok = row_ok & (req >= 0)
  req = jnp.maximum(req, 0)
  cols = jnp.arange(head_dim, dtype=jnp.int32)[None, :]
  q = plgpu_triton.load(q_ref.at[req[:, None], (h * group + g)[:, None], cols],
                        mask=row_ok[:, None], other=0)  # [bq, D]

  n = item_len_ref[i]
  table = item_table_ref[i]
  offset = item_offset_ref[i] * block_size  # in keys
  split_len = ((n + num_splits - 1) // num_splits + block_k - 1) // block_k * block_k
  lo = s * split_len
  hi = jnp.minimum(n, lo + split_len)
  num_steps = (jnp.maximum(hi - lo, 0) + block_k - 1) // block_k

  def step(j, carry):
    # carry = (acc [bq, D], m [bq], l [bq]) float32
    keys = lo + j * block_k + jnp.arange(block_k, dtype=jnp.int32)  # [bk] item keys
    key_ok = keys < hi  # past the item: other requests' blocks or garbage (NaN too)
    logical = (offset + keys) // block_size
    pages = plgpu_triton.load(tables_ref.at[table, jnp.minimum(logical, num_tables - 1)],
                              mask=key_ok & (logical < num_tables), other=0)
    kv_idx = (pages[:, None], ((offset + keys) % block_size)[:, None], cols)
    k = plgpu_triton.load(k_ref.at[kv_idx], mask=key_ok[:, None], other=0)  # [bk, D]
    v = plgpu_triton.load(v_ref.at[kv_idx], mask=key_ok[:, None], other=0)
    return online_softmax_step(carry, q, k, v, key_ok[None, :], scale=scale,
                               precision=precision)

  init = (jnp.zeros((block_q, head_dim), jnp.float32),
          jnp.full((block_q,), -jnp.inf, jnp.float32), jnp.zeros((block_q,), jnp.float32))
  acc, m, l = jax.lax.fori_loop(0, num_steps, step, init)
  acc_ref[...] = acc
  m_ref[...] = m
  l_ref[...] = l


def _partials(q3, k_pool, v_pool, tables, item_table, item_offset, item_len, item_reqs, *,
              block_q, block_k, num_splits, num_warps, num_stages, interpret, name):
  """One launch over items: returns split-merged (acc, m, l) [I, K, block_q, (D)], m in log2."""
  b, nh, d = q3.shape
  nb, bs, nk, _ = k_pool.shape
  group = nh // nk
  num_items = item_table.shape[0]
  grid = (num_items, nk, num_splits)  # items fastest: a node's tiles read a split together
  full = lambda shape: pl.BlockSpec(shape, lambda *_: (0,) * len(shape))
  kv_spec = pl.BlockSpec((nb, bs, None, d), lambda i, h, s: (0, 0, h, 0))
  in_specs = [full(item_table.shape), full(item_offset.shape), full(item_len.shape),
              full(item_reqs.shape), full(tables.shape), full(q3.shape), kv_spec, kv_spec]
  out_shape = [jax.ShapeDtypeStruct((num_items, nk, num_splits, block_q, d), jnp.float32),
               jax.ShapeDtypeStruct((num_items, nk, num_splits, block_q), jnp.float32),
               jax.ShapeDtypeStruct((num_items, nk, num_splits, block_q), jnp.float32)]
  out_specs = [
      pl.BlockSpec((None, None, None, block_q, d), lambda i, h, s: (i, h, s, 0, 0)),
      pl.BlockSpec((None, None, None, block_q), lambda i, h, s: (i, h, s, 0)),
      pl.BlockSpec((None, None, None, block_q), lambda i, h, s: (i, h, s, 0))]
  precision = (jax.lax.Precision.HIGHEST if q3.dtype == jnp.float32
               else jax.lax.Precision.DEFAULT)
  kernel = functools.partial(
      _partials_kernel, block_q=block_q, block_k=block_k, num_splits=num_splits, group=group,
      scale=d ** -0.5 * math.log2(math.e), precision=precision)
  acc, m, l = pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=plgpu_triton.CompilerParams(num_warps=num_warps,
                                                  num_stages=num_stages),
      interpret=interpret, name=name,
  )(item_table, item_offset, item_len, item_reqs, tables, q3, k_pool, v_pool)
  return _merge(acc, m, l, axis=2)


def _merge(acc, m, l, axis):
  """Exact log-sum-exp merge (m in log2 units) along `axis` of m; acc has a trailing D."""
  m_max = jnp.max(m, axis=axis, keepdims=True)
  m_max = jnp.where(m_max == -jnp.inf, 0.0, m_max)
  w = jnp.exp2(m - m_max)  # an empty partial has m = -inf, weight 0
  acc = jnp.sum(acc * w[..., None], axis=axis)
  l = jnp.sum(l * w, axis=axis)
  return acc, jnp.squeeze(m_max, axis), l


def _num_splits(tokens: int, kv_split: int, cap: int) -> int:
  return max(1, min(-(-tokens // kv_split), cap))


# ---------------------------------------------------------------------------- wrapper
@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def dedup_attention(q: jax.Array, k_pool: jax.Array, v_pool: jax.Array, view: AttentionView,
                    plan: SharingPlan | None = None, *, config: TuningConfig | None = None,
                    interpret: bool = False) -> jax.Array:
  """Decode attention of q [B, 1, H, D] over one layer's pools, shared runs read once.

  `plan` (default `view.sharing`) must come from the same batch's block tables (see
  `hq_jax.kv.sharing.build_plan`). Without a plan, or with T > 1, this is the paged kernel.
  Returns [B, 1, H, D] in q's dtype; float32 softmax and accumulation.
  """
  plan = plan if plan is not None else getattr(view, "sharing", None)
  check_inputs(q, k_pool, v_pool)
  b, t, nh, d = q.shape
  nb, bs, nk, _ = k_pool.shape
  if plan is None or t != 1:
    return paged_attention(q, k_pool, v_pool, view, interpret=interpret)
  config = config or DEFAULT
  group = nh // nk
  rpt = plan.requests_per_tile
  if rpt * group > config.shared_block_q:
    raise ValueError(f"the plan's tiles hold {rpt} requests x {group} heads = {rpt * group} "
                     f"rows, more than shared_block_q={config.shared_block_q}")
  if group > config.private_block_q:
    raise ValueError(f"{group} query heads per kv head exceed private_block_q="
                     f"{config.private_block_q}")
  if plan.req_rows.shape[0] != b:
    raise ValueError(f"the plan is for {plan.req_rows.shape[0]} requests, q has {b}")
  q3 = q[:, 0]  # [B, H, D]
  i32 = jnp.int32

  # 1. Shared runs: one item per tile of a node's requests. Padding tiles are empty.
  num_tiles = plan.tile_node.shape[0]
  tile_used = jnp.any(plan.tile_reqs >= 0, axis=1)
  s_acc, s_m, s_l = _partials(
      q3, k_pool, v_pool, plan.node_tables, plan.tile_node, jnp.zeros((num_tiles,), i32),
      jnp.where(tile_used, plan.node_lens[plan.tile_node], 0), plan.tile_reqs,
      block_q=config.shared_block_q, block_k=config.shared_block_k,
      num_splits=_num_splits(plan.node_tables.shape[1] * bs, config.shared_kv_split,
                             config.max_splits),
      num_warps=config.shared_num_warps, num_stages=config.shared_num_stages,
      interpret=interpret, name="dedup_attention_shared")

  # 2. Private remainders: one item per request, its table read from private_start.
  mb = view.block_tables.shape[1]
  start = plan.private_start
  p_acc, p_m, p_l = _partials(
      q3, k_pool, v_pool, view.block_tables, jnp.arange(b, dtype=i32), start // bs,
      jnp.maximum(view.kv_lens - start, 0), jnp.arange(b, dtype=i32)[:, None],
      block_q=config.private_block_q, block_k=config.private_block_k,
      num_splits=_num_splits(min(mb * bs, plan.private_tokens_hint or mb * bs),
                             config.private_kv_split, config.max_splits),
      num_warps=config.private_num_warps, num_stages=config.private_num_stages,
      interpret=interpret, name="dedup_attention_private")

  # 3. Gather each request's node partials and merge them with its private one.
  rows = lambda x: x[:, :, :rpt * group].reshape(num_tiles, nk, rpt, group, *x.shape[3:])
  flat = lambda x: jnp.moveaxis(rows(x), 2, 1).reshape(num_tiles * rpt, nk, group,
                                                       *x.shape[3:])
  s_acc, s_m, s_l = flat(s_acc), flat(s_m), flat(s_l)  # [TL * RPT, K, G, (D)]
  idx = jnp.maximum(plan.req_rows, 0)  # [B, DEP]
  has = (plan.req_rows >= 0)[:, :, None, None]
  g_acc = s_acc[idx]  # [B, DEP, K, G, D]
  g_m = jnp.where(has, s_m[idx], -jnp.inf)
  g_l = s_l[idx]
  acc = jnp.concatenate([g_acc, p_acc[:, None, :, :group]], axis=1)
  m = jnp.concatenate([g_m, p_m[:, None, :, :group]], axis=1)
  l = jnp.concatenate([g_l, p_l[:, None, :, :group]], axis=1)
  acc, _, l = _merge(acc, m, l, axis=1)  # [B, K, G, D], [B, K, G]
  out = jnp.where(l[..., None] > 0, acc / l[..., None], 0.0)
  return out.reshape(b, 1, nh, d).astype(q.dtype)


def dedup_attention_interpret(q, k_pool, v_pool, view, plan=None, *, config=None):
  """The same kernels run by the Pallas interpreter (CPU tests, the engine on CPU)."""
  return dedup_attention(q, k_pool, v_pool, view, plan, config=config, interpret=True)


# -------------------------------------------------------------------------- reference
def dedup_attention_reference(q: jax.Array, k_pool: jax.Array, v_pool: jax.Array,
                              view: AttentionView, plan: SharingPlan | None = None
                              ) -> jax.Array:
  """float32 oracle of the same decomposition: node partials, private partial, LSE merge.

  Each node's keys come from the plan's node table (not the requests' tables), so a plan
  whose nodes do not match the requests' blocks gives a wrong answer here too; comparing
  with `paged_attention_reference` checks the plan, comparing with the kernel checks it.
  """
  plan = plan if plan is not None else view.sharing
  hp = jax.lax.Precision.HIGHEST
  b, t, nh, d = q.shape
  if t != 1:
    raise ValueError(f"decode only (T = 1), got T = {t}")
  nk = k_pool.shape[2]
  group = nh // nk
  bs = k_pool.shape[1]
  rpt = plan.requests_per_tile
  qg = q[:, 0].astype(jnp.float32).reshape(b, nk, group, d) * d ** -0.5  # [B, K, G, D]

  def partial(qx, k, v, ok):  # qx [..., K, G, D]; k, v [..., S, K, D]; ok [..., S]
    s = jnp.einsum("...kgd,...skd->...kgs", qx, k, precision=hp)
    s = jnp.where(ok[..., None, None, :], s, -jnp.inf)
    m = jnp.max(s, axis=-1)
    m_safe = jnp.where(m == -jnp.inf, 0.0, m)
    p = jnp.exp(s - m_safe[..., None])
    v = jnp.where(ok[..., :, None, None], v, 0.0)
    return jnp.einsum("...kgs,...skd->...kgd", p, v, precision=hp), m, jnp.sum(p, -1)

  # Node partials for every (tile, slot), then gathered per request.
  nk_ = gather(k_pool, plan.node_tables).astype(jnp.float32)  # [N, S_n, K, D]
  nv_ = gather(v_pool, plan.node_tables).astype(jnp.float32)
  node_ok = jnp.arange(nk_.shape[1])[None] < plan.node_lens[:, None]  # [N, S_n]
  reqs = plan.tile_reqs.reshape(-1)  # [TL * RPT]
  nodes = jnp.repeat(plan.tile_node, rpt)
  n_acc, n_m, n_l = partial(qg[jnp.maximum(reqs, 0)], nk_[nodes], nv_[nodes],
                            node_ok[nodes] & (reqs >= 0)[:, None])
  idx = jnp.maximum(plan.req_rows, 0)
  has = (plan.req_rows >= 0)[:, :, None, None]
  # Private remainder [private_start, kv_len) of each request's own table.
  k = gather(k_pool, view.block_tables).astype(jnp.float32)  # [B, S, K, D]
  v = gather(v_pool, view.block_tables).astype(jnp.float32)
  keys = jnp.arange(k.shape[1])[None]
  ok = (keys >= plan.private_start[:, None]) & (keys < view.kv_lens[:, None])
  p_acc, p_m, p_l = partial(qg, k, v, ok)
  acc = jnp.concatenate([n_acc[idx], p_acc[:, None]], axis=1)  # [B, DEP + 1, K, G, D]
  m = jnp.concatenate([jnp.where(has, n_m[idx], -jnp.inf), p_m[:, None]], axis=1)
  l = jnp.concatenate([n_l[idx], p_l[:, None]], axis=1)
  m_max = jnp.max(m, axis=1, keepdims=True)
  w = jnp.exp(m - jnp.where(m_max == -jnp.inf, 0.0, m_max))
  acc, l = jnp.sum(acc * w[..., None], axis=1), jnp.sum(l * w, axis=1)
  out = jnp.where(l[..., None] > 0, acc / l[..., None], 0.0)
  del bs
  return out.reshape(b, 1, nh, d)
