"""The mesh ("data", "model"): flag parsing, tensor parallel logits, data-parallel shards,
their accounting and the cache-aware router.

The sharded runs need 8 devices: they run in one subprocess of their own
(tests/mesh_checks.py sets XLA_FLAGS=--xla_force_host_platform_device_count=8 before
importing JAX), once per attention path, so the rest of the suite keeps one CPU device.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from hq_jax import mesh as mesh_lib
from hq_jax.config import get_config
from hq_jax.kv.dedup import DedupKVCache
from hq_jax.kv.dense import DenseKVCache
from hq_jax.kv.paged import KVLayout
from hq_jax.serve.scheduler import DataParallel, Request
from hq_jax.study import traces

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# TP changes the order of the hidden-size sums (each shard's partial o_proj and down_proj
# products, then one psum): float32 logits of the tiny model move by a few 1e-6.
TP_ATOL = 2e-5


@pytest.mark.parametrize("attention", ["reference", "pallas_interpret"])
def test_on_8_simulated_devices(attention):
  """One subprocess per attention path, every sharded check on its output (one test, so
  that xdist workers never run the same subprocess twice)."""
  env = {**os.environ, "PYTHONPATH": ROOT}
  env.pop("XLA_FLAGS", None)
  out = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "mesh_checks.py"),
                        attention], env=env, cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  sharded = json.loads(out.stdout.strip().splitlines()[-1])
  _check_dense_and_hq_logits_bit_identical_at_every_mesh(sharded)
  _check_tensor_parallel_logits_match_one_device(sharded)
  _check_pools_are_split_over_kv_heads(sharded)
  if attention == "reference":  # the XLA run covers the rest
    _check_no_mesh_and_fp8_pools_on_the_mesh(sharded)
    _check_sweep_caches_and_e2e_bench_run_on_the_mesh(sharded)
    _check_shard_stats_sum_to_the_global(sharded)


def test_mesh_flag_parses_and_refuses_bad_values():
  assert mesh_lib.MeshSpec.parse("") == mesh_lib.MeshSpec(1, 1)
  assert mesh_lib.MeshSpec.parse("data:2,model:4") == mesh_lib.MeshSpec(2, 4)
  assert mesh_lib.MeshSpec.parse("model:2").label == "data:1,model:2"
  for bad, words in (("model:x", "AXIS:SIZE"), ("tensor:2", "AXIS:SIZE"),
                     ("model:0", "positive"), ("model:2,model:2", "twice")):
    with pytest.raises(ValueError, match=words):
      mesh_lib.MeshSpec.parse(bad)
  tiny = get_config("tiny")  # 2 kv heads
  with pytest.raises(ValueError, match="does not divide tiny's num_kv_heads 2"):
    mesh_lib.MeshSpec(1, 4).check(tiny, num_devices=8)
  with pytest.raises(ValueError, match="needs 8 devices, 1 are present"):
    mesh_lib.MeshSpec(2, 4).check(num_devices=1)
  mesh_lib.MeshSpec(2, 2).check(tiny, num_devices=4)


def test_fused_columns_go_shard_major():
  # [q0 q1 | k0 k1 | v0 v1] (widths 4, 2, 2) at 2 shards: [q0 k0 v0 | q1 k1 v1].
  order = mesh_lib._shard_major((4, 2, 2), 2)
  assert order.tolist() == [0, 1, 4, 6, 2, 3, 5, 7]


def _check_dense_and_hq_logits_bit_identical_at_every_mesh(sharded):
  assert sharded["devices"] == 8
  for tp, r in sharded["tp"].items():
    assert r["dense_hq_identical"], f"model:{tp}"
    assert r["hit_tokens"] == 48  # the second prompt's 3 shared blocks were hits
  if "dp" in sharded:  # the XLA run
    assert sharded["dp"]["dense_hq_identical"] == [True, True]
    assert set(sharded["tp"]) == {"1", "2", "4"}


def _check_no_mesh_and_fp8_pools_on_the_mesh(sharded):
  assert sharded["no_mesh_identical"]  # Engine(mesh=None) = the model:1 mesh, bit for bit
  assert sharded["fp8_tp2"] == dict(dense_hq_identical=True, scale_heads=[2])


def _check_tensor_parallel_logits_match_one_device(sharded):
  assert sharded["tp"]["1"]["max_abs_vs_tp1"] == 0.0
  for tp in set(sharded["tp"]) - {"1"}:
    assert sharded["tp"][tp]["max_abs_vs_tp1"] < TP_ATOL
  if "dp" in sharded:
    assert sharded["dp"]["shard0_vs_tp1_max_abs"] < TP_ATOL


def _check_pools_are_split_over_kv_heads(sharded):
  for tp in set(sharded["tp"]) - {"1"}:
    r = sharded["tp"][tp]
    assert r["pool_spec"][3] == "model" and r["pool_devices"] == int(tp)
    assert r["pool_shard_heads"] == [4 // int(tp)]
    assert r["mesh"] == f"data:1,model:{tp}"
  if "dp" not in sharded:
    return
  # Each data shard's cache lives on its own row of the mesh.
  assert sharded["dp"]["shard_devices"] == {"dense0": [0, 1], "hq0": [0, 1],
                                            "dense1": [2, 3], "hq1": [2, 3]}


def _check_sweep_caches_and_e2e_bench_run_on_the_mesh(sharded):
  assert sharded["make_cache_heads"] == [2]  # 4 kv heads over model:2
  assert [r["kind"] for r in sharded["e2e"]] == ["decode", "prefill"]
  for r in sharded["e2e"]:
    assert r["mesh"] == "data:1,model:2" and r["finite"], r


def _check_shard_stats_sum_to_the_global(sharded):
  st = sharded["dp"]["hq_stats"]
  for key in ("kv_bytes_allocated", "kv_bytes_used", "physical_blocks", "logical_blocks",
              "hit_tokens", "query_tokens", "active_requests", "pool_bytes"):
    assert st["total"][key] == sum(p[key] for p in st["per"]), key
    # One cache holding both shards' requests (no prefix crosses shards) holds the same.
    assert st["total"][key] == sharded["dp"]["one_cache_stats"][key], key
  assert st["total"]["reuse_factor"] == (st["total"]["logical_blocks"]
                                         / st["total"]["physical_blocks"])


# ------------------------------------------------------------ routing (one device)
def _layout():
  return KVLayout.from_config(get_config("tiny"), block_size=16)


def _hq(num_blocks=64):
  return DedupKVCache.init(_layout(), num_blocks=num_blocks, max_requests=4, max_seq_len=256,
                           host_only=True)


def test_router_sends_a_request_to_the_shard_with_its_prefix():
  rng = np.random.default_rng(0)
  prefix, other = rng.integers(0, 512, 64), rng.integers(0, 512, 64)
  caches = [_hq(), _hq()]
  # Shard 1 holds `prefix` cached (a finished request) and runs one request: busier.
  c, s = caches[1].admit(prefix)
  caches[1] = c.commit(s, prefix.size).release(s)
  c, _ = caches[1].admit(other[:20])
  caches[1] = c
  req = lambda i, p: Request(i, 0.0, p, 0)
  dp = DataParallel(caches, [], max_concurrency=4)
  dp.shards[1].running[0] = "busy"
  assert caches[1].cached_prefix_tokens(np.concatenate([prefix, other])) == 64
  hit = dp.route(req(0, np.concatenate([prefix, other])))
  assert (hit.shard, hit.prefix_tokens, hit.by_prefix) == (1, 64, True)
  miss = dp.route(req(1, other))  # cached nowhere: the least loaded shard
  assert (miss.shard, miss.prefix_tokens, miss.by_prefix) == (0, 0, False)
  assert DenseKVCache.init(_layout(), num_blocks=8, max_requests=2,
                           max_seq_len=64).cached_prefix_tokens(prefix) == 0


def _trace(n=40, seed=0):
  """Conversations: each request extends an earlier one's prefix of its conversation."""
  rng = np.random.default_rng(seed)
  out, chains, next_id = [], {}, 0
  for i in range(n):
    conv = int(rng.integers(0, 6))
    chain = list(chains.get(conv, []))
    for _ in range(int(rng.integers(1, 3))):
      chain.append(next_id)
      next_id += 1
    chains[conv] = chain
    length = 512 * (len(chain) - 1) + int(rng.integers(1, 513))
    out.append(traces.TraceRequest(i, 0.5 * i, length, int(rng.integers(1, 40)),
                                   tuple(chain)))
  return out


def test_one_shard_replay_is_the_single_cache_replay():
  cfg = traces.ReplayConfig(max_concurrency=4)
  reqs = _trace()
  layout = _layout()
  make = lambda: DedupKVCache.init(layout, num_blocks=400, max_requests=4, max_seq_len=4096,
                                   host_only=True)
  one = traces.replay(reqs, make(), cfg, vocab_size=512)
  dp = traces.replay_data_parallel(
      [make()], traces.scheduler_requests(reqs, cfg, vocab_size=512), cfg, vocab_size=512)
  assert dp.shards[0].stats.row(bytes_per_block=1) == one.row(bytes_per_block=1)


def test_data_parallel_replay_rows_sum_over_shards():
  from hq_jax.study import trace_outputs
  cfg = traces.ReplayConfig(max_concurrency=4)
  reqs, layout, per_shard = _trace(), _layout(), []
  budget = 300 * layout.bytes_per_block / 1e9
  rows = trace_outputs.run_budgets(reqs, [budget], model="tiny", layout=layout, cfg=cfg,
                                   vocab_size=512, mesh="data:2", shard_rows=per_shard)
  single = trace_outputs.run_budgets(reqs, [budget], model="tiny", layout=layout, cfg=cfg,
                                     vocab_size=512)
  for row in rows:
    trace_outputs.check_row({**row, "num_blocks": row["num_blocks"] or None})
    assert row["mesh"] == "data:2,model:1"
    shards = [r for r in per_shard if r["backend"] == row["backend"]]
    assert [r["shard"] for r in shards] == [0, 1]
    for key in ("requests", "prompt_tokens", "hit_tokens", "computed_prefill_tokens",
                "evicted_blocks"):
      assert row[key] == sum(r[key] for r in shards), (row["backend"], key)
    if row["backend"] == "hq":
      assert sum(r["num_blocks"] for r in shards) == row["num_blocks"] == 300
      assert sum(r["routed_by_prefix"] for r in shards) > 0
      # Conversations stay on their shard: the split cache loses few hits here.
      one = next(r for r in single if r["backend"] == "hq")
      assert row["hit_ratio"] > 0.5 * one["hit_ratio"]


# ------------------------------------------------------------------ memory plans
def test_memory_plan_of_32b_and_72b_per_device():
  from hq_jax.study import memory
  points = [(4096, 64, 0.5, 1), (32768, 64, 0.5, 1)]
  gb = 10**9
  for name, tps_fit in (("32b", {1: [False, False], 2: [True, False], 4: [True, False],
                                 8: [True, False]}),
                        ("72b", {1: [False, False], 2: [False, False], 4: [True, False],
                                 8: [True, False]})):
    cfg = get_config(name, dtype="bfloat16")
    rows = memory.mesh_plan(cfg, points, tps=(1, 2, 4, 8), device_bytes=80 * gb)
    by = {(r["mesh"], r["context_length"]): r for r in rows}
    for tp, fits in tps_fit.items():
      got = [by[(f"data:1,model:{tp}", n)]["fits"] for n, *_ in points]
      assert got == fits, (name, tp)
      r = by[(f"data:1,model:{tp}", 4096)]
      # The dense pool of 64 x 4096 tokens, split over tp devices' kv heads.
      assert r["kv_pool_bytes_per_device"] == 64 * 4096 * 2 * cfg.num_layers * 8 * 128 * 2 // tp
      assert r["fits"] == (r["reason"] == "")
    w = {tp: by[(f"data:1,model:{tp}", 4096)]["param_bytes_per_device"] for tp in (1, 2, 8)}
    assert w[1] > 2 * w[2] * 0.9 and w[8] < w[2]  # split layers, replicated vocabulary
  one = memory.mesh_plan(get_config("72b", dtype="bfloat16"), points[:1], tps=(1,),
                         device_bytes=80 * gb)[0]
  assert "the weights (145.41 GB)" in one["reason"]
  bad = memory.mesh_plan(get_config("32b"), points[:1], tps=(16,), device_bytes=80 * gb)[0]
  assert not bad["fits"] and "model:16 does not divide" in bad["reason"]


def test_param_bytes_per_device_sum_to_the_model():
  from hq_jax import model as model_lib
  cfg = get_config("7b", dtype="bfloat16")
  total = sum(x.size * x.dtype.itemsize for x in
              __import__("jax").tree.leaves(model_lib.abstract_params(cfg)))
  assert mesh_lib.param_bytes_per_device(cfg, 1) == total
  table = 2 * cfg.vocab_size * cfg.hidden_size * 2  # embed + lm_head, replicated
  assert mesh_lib.param_bytes_per_device(cfg, 4) < total / 4 + table


def test_one_engine_commands_refuse_data_shards_with_one_line():
  import ml_collections
  from hq_jax.study import cli
  cfg = ml_collections.ConfigDict({"mesh": "data:2"})
  with pytest.raises(ValueError, match="the latency sweep runs one data shard"):
    cli.model_mesh(cfg, what="the latency sweep")
  cfg.mesh = "model:2"
  with pytest.raises(ValueError, match="needs 2 devices, 1 are present"):
    cli.model_mesh(cfg)
  cfg.mesh = ""
  assert cli.model_mesh(cfg, get_config("tiny")) is None


def test_model_mode_data_parallel_serves_the_same_tokens(tiny):
  """Two data shards (two engines, here on one device) serve every request to the same
  greedy tokens as one cache: a request's bits do not depend on its batch or its shard
  (fixed decode rows), and the router sends a request to the shard holding its prefix."""
  from hq_jax.serve.engine import Engine
  from hq_jax.study import trace_outputs
  params, cfg = tiny
  layout = KVLayout.from_config(cfg, block_size=16)
  tr = lambda i, ids, n, out, t: traces.TraceRequest(i, t, n, out, tuple(ids))
  reqs = [tr(0, [1], 200, 3, 0.0), tr(1, [2], 180, 3, 0.05), tr(2, [1], 300, 2, 0.1),
          tr(3, [2], 250, 2, 0.15)]
  rcfg = traces.ReplayConfig(max_concurrency=2)
  budget = 200 * layout.bytes_per_block / 1e9  # 100 blocks a shard: room for all four
  engine = Engine(params, cfg, chunk_size=64, attention="reference", decode_rows=4)
  out = {}
  for mesh, engines in (("", engine), ("data:2", [engine, engine])):
    gen, shard_rows = {}, []
    rows = trace_outputs.run_budgets(reqs, [budget], model="tiny", layout=layout, cfg=rcfg,
                                     vocab_size=cfg.vocab_size, engine=engines,
                                     generated=gen, mesh=mesh, shard_rows=shard_rows)
    out[mesh] = {r["backend"]: r for r in rows}, gen, shard_rows
  (one, gen1, _), (two, gen2, shards) = out[""], out["data:2"]
  assert gen1 == gen2  # every request, dense and HQ: the same greedy tokens
  hq = [r for r in shards if r["backend"] == "hq"]
  assert sum(r["requests"] for r in hq) == two["hq"]["requests"] == 4
  assert two["hq"]["decode_steps"] == sum(r["decode_steps"] for r in hq)
  # Requests 2 and 3 find their conversation's blocks wherever 0 and 1 ran.
  # (12 full blocks of request 0's 200 tokens, 11 of request 1's 180.)
  assert two["hq"]["hit_tokens"] == one["hq"]["hit_tokens"] == 192 + 176
  assert sum(r["routed_by_prefix"] for r in hq) == 2
