"""The HQ cache's host tier: evicted blocks move to an LRU host pool with their identity,
come back bit for bit (K/V and FP8 scales) on a hit, and a request served from the host
tier gets exactly the logits of a cold one. Small shapes: host-only caches, the tiny
model on the XLA path."""

import jax
import numpy as np
import pytest

from hq_jax.kv import paged, tiers
from hq_jax.kv.base import CacheError
from hq_jax.kv.dedup import DedupKVCache
from hq_jax.kv.paged import KVLayout
from hq_jax.kv.stats import kv_stats
from hq_jax.serve.engine import Engine
from hq_jax.study import trace_outputs
from hq_jax.study.traces import ReplayConfig, TraceRequest

LAYOUT = KVLayout(num_layers=2, num_kv_heads=1, head_dim=4, block_size=4, dtype="float32")


def _cache(num_blocks=4, host_blocks=4, layout=LAYOUT, **kw):
  return DedupKVCache.init(layout, num_blocks=num_blocks, max_requests=2, max_seq_len=32,
                           host_blocks=host_blocks, **kw)


def _cycle(c, tokens):
  """Admits, commits and releases one prompt (its full blocks stay cached)."""
  c, slot = c.admit(np.asarray(tokens))
  return c.commit(slot, len(tokens)).release(slot)


def _one_block(i):
  return np.arange(4) + 10 * i  # one full block of its own


def test_evicted_blocks_move_to_the_host_and_its_lru_drops_the_oldest():
  c = _cache(num_blocks=1, host_blocks=2, host_only=True)
  for i in range(4):  # each evicts the one before it from the single device block
    c = _cycle(c, _one_block(i))
  # Blocks 0, 1, 2 moved in turn; the host holds 2: block 0 (the oldest) was dropped.
  assert (int(c.evicted_blocks), int(c.blocks_to_host), int(c.host_evicted_blocks)) == (3, 3, 1)
  assert c.host_cached_blocks == 2
  held = {int(c.host_tokens[h, 0]) // 10 for h in np.flatnonzero(c.host_registered)}
  assert held == {1, 2}
  # A hit on block 1 is a use: it moves to the back of the host LRU, so block 2 goes next.
  c, slot = c.admit(_one_block(1))
  assert int(c.seq_lens[slot]) == 4 and int(c.host_hit_tokens) == 4
  c = c.commit(slot, 4).release(slot)
  c = _cycle(c, _one_block(5))  # evicts block 1 (on the host already: not moved again)
  c = _cycle(c, _one_block(6))  # evicts block 5 into the host: block 2 is dropped
  held = {int(c.host_tokens[h, 0]) // 10 for h in np.flatnonzero(c.host_registered)}
  assert held == {1, 5} and c.host_cached_blocks <= c.host_blocks


def test_device_and_host_hits_add_up_to_the_hits():
  c = _cache(num_blocks=3, host_blocks=8, host_only=True)
  prompt = np.arange(12)  # three blocks
  c = _cycle(c, prompt)
  c = _cycle(c, np.arange(100, 108))  # evicts the prompt's two tail blocks to the host
  c, slot = c.admit(prompt)
  s = kv_stats(c)
  assert (s.device_hit_tokens, s.host_hit_tokens, s.hit_tokens) == (4, 8, 12)
  assert s.device_hit_tokens + s.host_hit_tokens == s.hit_tokens
  assert s.bytes_to_device == 2 * LAYOUT.bytes_per_block
  assert s.bytes_to_host == int(c.blocks_to_host) * LAYOUT.bytes_per_block
  assert s.host_pool_bytes == 8 * LAYOUT.bytes_per_block
  assert int(c.seq_lens[slot]) == 12


def test_a_salt_or_another_parent_never_hits_on_the_host():
  c = _cache(num_blocks=2, host_blocks=8, host_only=True)
  c = _cycle(c, np.arange(8))
  c = _cycle(c, np.arange(100, 108))  # both blocks of the first prompt go to the host
  for tokens, salt in ((np.arange(8), 1), (np.r_[np.arange(4) + 50, np.arange(4, 8)], 0)):
    c, slot = c.admit(tokens, salt)
    assert int(c.seq_lens[slot]) == 0
    c = c.release(slot)
  c, slot = c.admit(np.arange(8))
  assert int(c.seq_lens[slot]) == 8


def _write_random(c, slot, rng):
  """Random K/V (and so, in FP8, random scales) for the slot's unwritten tokens."""
  view = c.view([slot], [int(c.seq_lens[slot])], int(c.req_lens[slot]) - int(c.seq_lens[slot]))
  pools = c.pools
  t = view.positions.shape[1]
  for layer in range(c.layout.num_layers):
    k = rng.standard_normal((1, t, 1, 4)).astype(np.float32) * (layer + 1)
    pools = paged.write_layer(pools, layer, k, -2 * k, view.write_slots)
  return c.with_pools(pools).commit(slot, int(c.req_lens[slot]))


@pytest.mark.parametrize("dtype", ["float32", "float8_e4m3fn"])
@pytest.mark.parametrize("memory", ["auto", "device"])
def test_a_block_back_from_the_host_is_bit_identical(dtype, memory):
  """K, V and (FP8) their scales, stored values compared raw, after a round trip through
  the host pool (pinned host memory, or the device fallback)."""
  layout = KVLayout(2, 1, 4, 4, dtype)
  rng = np.random.default_rng(0)
  c = _cache(num_blocks=3, host_blocks=4, layout=layout, host_memory=memory)
  want = "pinned_host" if memory == "auto" else "device"
  assert tiers.pools_memory_kind(c.host_pools) == want
  prompt = np.arange(12)
  c, slot = c.admit(prompt)
  c = _write_random(c, slot, rng)
  before = [np.asarray(x)[:, c.block_tables[slot, :3]].copy() for x in jax.tree.leaves(c.pools)]
  c = c.release(slot)
  c, other = c.admit(np.arange(100, 112))  # evicts all three to the host
  assert c.has_pending_copies
  c, moved = tiers.run_copies(c, sync=True)
  assert moved.blocks_to_host == 3 and not c.has_pending_copies
  c = _write_random(c, other, rng)  # overwrites the device blocks
  c = c.release(other)
  c, slot = c.admit(prompt)
  assert int(c.seq_lens[slot]) == 12 and int(c.host_hit_tokens) >= 8
  c, moved = tiers.run_copies(c, sync=True)
  assert moved.blocks_to_device == int(c.blocks_to_device) and moved.seconds >= 0
  after = [np.asarray(x)[:, c.block_tables[slot, :3]] for x in jax.tree.leaves(c.pools)]
  assert len(before) == (4 if layout.quantized else 2)
  for b, a in zip(before, after):
    assert b.dtype == a.dtype
    np.testing.assert_array_equal(b.view(np.uint8), a.view(np.uint8))


@pytest.mark.parametrize("kv_dtype", ["float32", "float8_e4m3fn"])
def test_a_host_hit_gives_exactly_the_cold_logits(tiny, kv_dtype):
  params, cfg = tiny
  engine = Engine(params, cfg, chunk_size=8, attention="reference", donate=False,
                  kv_dtype=kv_dtype, time_transfers=True)
  layout = KVLayout.from_config(cfg, block_size=4, dtype=kv_dtype)
  rng = np.random.default_rng(1)
  prompt, other = rng.integers(0, cfg.vocab_size, 37), rng.integers(0, cfg.vocab_size, 40)
  make = lambda **kw: DedupKVCache.init(layout, num_blocks=11, max_requests=2,
                                        max_seq_len=48, **kw)
  _, cold = engine.prefill(make(), prompt)
  c, r = engine.prefill(make(host_blocks=16), prompt[:33])  # 8 full blocks cached
  c = c.release(r.slot)
  c, r = engine.prefill(c, other)  # takes the pool: the 8 go to the host
  c = c.release(r.slot)
  c, warm = engine.prefill(c, prompt)
  s = kv_stats(c)
  assert s.host_hit_tokens > 0 and s.hit_tokens == warm.hit_tokens == 32
  assert engine.blocks_to_device * layout.block_size == s.host_hit_tokens
  assert engine.transfer_s > 0
  np.testing.assert_array_equal(warm.logits, cold.logits[warm.first_position:])
  np.testing.assert_array_equal(np.asarray(warm.last_logits), np.asarray(cold.last_logits))


def test_bad_host_tier_arguments_are_refused():
  with pytest.raises(CacheError, match="host_blocks"):
    _cache(host_blocks=-1)
  with pytest.raises(CacheError, match="host_blocks must be an int"):
    _cache(host_blocks=2.0)
  with pytest.raises(ValueError, match="host memory kind"):
    tiers.host_memory_kind("gpu")
  with pytest.raises(ValueError, match="less than one KV block"):
    trace_outputs.host_pool_blocks(1e-12, LAYOUT.bytes_per_block)
  assert trace_outputs.host_pool_blocks(0, LAYOUT.bytes_per_block) == 0


def test_without_a_host_tier_nothing_moves():
  c = _cache(num_blocks=1, host_blocks=0, host_only=True)
  for i in range(3):
    c = _cycle(c, _one_block(i))
  s = kv_stats(c)
  assert (s.evicted_blocks, s.bytes_to_host, s.host_hit_tokens, s.host_blocks) == (2, 0, 0, 0)
  assert not c.has_pending_copies


def test_replay_host_rows_respect_their_budget_and_pass_the_checks():
  """A no-model replay whose device pool holds little: the host tier's rows find more,
  at most what the unbounded cache finds, within the host budget; every row passes the
  report's checks."""
  rng = np.random.default_rng(3)
  reqs, t = [], 0.0
  for i in range(24):  # conversations: each turn extends an earlier one
    base = list(reqs[int(rng.integers(len(reqs)))].hash_ids) if reqs and i % 3 else []
    reqs.append(TraceRequest(i, t, 512 * (len(base) + 1), 4, tuple(base + [1000 + i])))
    t += 1.0
  layout = KVLayout(2, 1, 4, 16, "float32")
  gb = lambda blocks: blocks * layout.bytes_per_block / 1e9
  budgets, hosts = [gb(170.5)], [0.0, gb(96.5), gb(4096.5)]
  cfg = ReplayConfig(max_concurrency=2)
  rows = trace_outputs.run_budgets(reqs, budgets, model="tiny", layout=layout, cfg=cfg,
                                   vocab_size=1000, host_budgets_gb=hosts)
  rows = [{k: None if v == "" else v for k, v in r.items()} for r in rows]  # as the CSV reads
  for r in rows:
    trace_outputs.check_row(r)
  trace_outputs.check_rows(rows, dict(kv_budget_gb=budgets, host_kv_budget_gb=hosts,
                                      model="tiny", block_size=16, max_concurrency=2),
                           bytes_per_block=layout.bytes_per_block, trace_requests=len(reqs))
  hq = [r for r in rows if r["backend"] == "hq"]
  unbounded = rows[0]["hit_tokens"]
  assert [r["host_kv_budget_gb"] for r in hq] == hosts
  assert hq[0]["host_hit_tokens"] == 0 and hq[0]["bytes_to_host"] == 0
  assert hq[0]["hit_tokens"] < hq[1]["hit_tokens"] <= hq[2]["hit_tokens"] <= unbounded
  assert hq[2]["hit_tokens"] == unbounded  # a host tier that never drops finds everything
  bad = dict(hq[1], host_hit_tokens=hq[1]["host_hit_tokens"] + 16)
  with pytest.raises(ValueError, match="is not hit_tokens"):
    trace_outputs.check_row(bad)


def test_the_peer_advantage_verdict_is_computed_from_replay_rows():
  from hq_jax.study import ledger
  row = lambda backend, budget, host, hit, computed: dict(
      backend=backend, kv_budget_gb=budget, host_kv_budget_gb=host, kv_dtype="bfloat16",
      hit_ratio=hit, computed_prefill_tokens=computed)
  assert ledger.peer_advantage([row("hq_unbounded", 0.0, 0.0, 0.4, 60)])["supported"] == (
      ledger.UNTESTED)
  rows = [row("hq_unbounded", 0.0, 0.0, 0.4, 60), row("dense", 32.0, 0.0, 0.0, 100),
          row("hq", 32.0, 0.0, 0.2, 80), row("hq", 32.0, 64.0, 0.3, 70)]
  out = ledger.peer_advantage(rows)
  assert out["supported"] == ledger.REFUTED and "vLLM's own KVCacheManager" in out["verdict"]
  assert "hit 20.0% device-only, 30.0% with a 64 GB host tier (12.5% fewer" in out["verdict"]
  assert out["evidence"] == "trace_replay.csv#3, trace_replay.csv#4"


def test_model_mode_host_rows_equal_the_no_model_ones_and_decode_the_same(tiny):
  """Requests far apart (timing cannot matter), chunk = block: served through the engine
  with a host tier, the hits (device and host), blocks moved and evictions are the
  no-model replay's; the greedy tokens equal the device-only row's; transfers are timed."""
  from hq_jax.serve import scheduler
  params, cfg = tiny
  layout = KVLayout.from_config(cfg, block_size=16)
  engine = Engine(params, cfg, chunk_size=16, attention="reference", time_transfers=True)
  reqs = [TraceRequest(0, 0.0, 200, 3, (1,)), TraceRequest(1, 50.0, 200, 3, (2,)),
          TraceRequest(2, 100.0, 200, 3, (1,))]
  budget, host = 20.5 * layout.bytes_per_block / 1e9, 30.5 * layout.bytes_per_block / 1e9
  cfg_r = ReplayConfig(max_concurrency=2)
  run = lambda eng, gen=None: trace_outputs.run_budgets(
      reqs, [budget], model="tiny", layout=layout, cfg=cfg_r, vocab_size=cfg.vocab_size,
      engine=eng, host_budgets_gb=[0.0, host], generated=gen)
  generated = {}
  model, no_model = run(engine, generated), run(None)
  same = ("hit_tokens", "device_hit_tokens", "host_hit_tokens", "host_hit_requests",
          "bytes_to_host", "bytes_to_device", "evicted_blocks", "computed_prefill_tokens")
  for m, n in zip(model, no_model):
    assert {k: m[k] for k in same} == {k: n[k] for k in same}, m["backend"]
  tiered = model[-1]
  assert tiered["host_hit_tokens"] > 0 and tiered["transfer_s"] > 0
  assert tiered["host_memory_kind"] == "pinned_host"
  assert generated[("hq", budget)] == generated[("hq", budget, host)]
  # The warm-up leaves a host-tier cache with nothing cached, nothing to copy.
  c = scheduler.warm_up(engine, DedupKVCache.init(layout, num_blocks=64, max_requests=2,
                                                  max_seq_len=400, host_blocks=8), 2)
  assert not c.has_pending_copies and c.host_cached_blocks == 0 and c.cached_blocks == 0
