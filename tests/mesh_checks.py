"""The sharded checks of tests/test_mesh.py, run in their own process on 8 simulated CPU
devices (JAX reads XLA_FLAGS at import, so the rest of the suite keeps one device).

Prints one JSON object: for each mesh, whether dense and HQ logits are bit-identical, the
largest difference from the one-device logits, and how the pools are laid out.
"""

import json
import os
import sys

if __name__ == "__main__":
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from hq_jax import mesh as mesh_lib  # noqa: E402
from hq_jax import model as model_lib  # noqa: E402
from hq_jax.config import get_config  # noqa: E402
from hq_jax.kv.dedup import DedupKVCache  # noqa: E402
from hq_jax.kv.dense import DenseKVCache  # noqa: E402
from hq_jax.kv.paged import KVLayout  # noqa: E402
from hq_jax.kv.stats import kv_stats, sharded_kv_stats  # noqa: E402
from hq_jax.serve.engine import Engine  # noqa: E402

# The tiny model with 4 kv heads (GQA 2:1) so that model:4 splits them.
CFG = get_config("tiny").replace(num_heads=8, num_kv_heads=4, head_dim=8)
BS, CHUNK = 16, 32


def prompts(seed: int):
  """Two prompts sharing 3 full blocks (HQ hits them for the second)."""
  rng = np.random.default_rng(seed)
  shared = rng.integers(0, CFG.vocab_size, 48)
  return [np.concatenate([shared, rng.integers(0, CFG.vocab_size, n)]) for n in (37, 21)]


def run(engine: Engine, backend: str, reqs, kv_dtype=None):
  """Prefills `reqs` in one cache, then two decode steps of both: the logits of every
  computed position (full-prompt positions for comparison across backends) and the cache."""
  layout = KVLayout.from_config(CFG, BS, kv_dtype)
  kind = DenseKVCache if backend == "dense" else DedupKVCache
  cache = kind.init(layout, num_blocks=64, max_requests=4, max_seq_len=256)
  out, slots = [], []
  for p in reqs:
    cache, res = engine.prefill(cache, p)
    # Positions [first_position, n): HQ skipped its hits, so compare that tail.
    out.append((res.first_position, res.logits))
    slots.append(res.slot)
  dec = []
  for step in range(2):
    cache, d = engine.decode(cache, slots, [7 + step, 11 + step])
    dec.append(np.asarray(d.logits))
  return out, np.stack(dec), cache


def compare(a, b) -> tuple[bool, float]:
  """(bit-identical, max |a - b|) over the positions both computed and the decode steps."""
  (pa, da), (pb, db) = a, b
  same, diff = True, 0.0
  for (fa, la), (fb, lb) in zip(pa, pb):
    start = max(fa, fb)
    xa, xb = la[start - fa:], lb[start - fb:]
    same &= np.array_equal(xa, xb)
    diff = max(diff, float(np.abs(xa - xb).max()))
  same &= np.array_equal(da, db)
  return bool(same), max(diff, float(np.abs(da - db).max()))


def main():
  params = model_lib.init_params(CFG, jax.random.key(0), scale=0.1)
  reqs = prompts(0)
  result = {"devices": len(jax.devices()), "tp": {}}
  one = None
  attention = sys.argv[1] if len(sys.argv) > 1 else "reference"
  # The interpreter (slow) runs the kernels per device at model:1 and 2 only; the XLA path
  # covers every mesh.
  full = attention == "reference"
  for tp in (1, 2, 4) if full else (1, 2):
    mesh = mesh_lib.MeshSpec(1, tp).make()
    engine = Engine(params, CFG, chunk_size=CHUNK, attention=attention, mesh=mesh)
    dense = run(engine, "dense", reqs)
    hq = run(engine, "hq", reqs)
    exact, _ = compare(dense[:2], hq[:2])
    one = one or dense[:2]
    _, vs_one = compare(dense[:2], one)
    k = hq[2].pools.k
    result["tp"][tp] = dict(
        dense_hq_identical=exact, max_abs_vs_tp1=vs_one,
        pool_spec=[str(a) for a in k.sharding.spec],
        pool_shard_heads=sorted({s.data.shape[3] for s in k.addressable_shards}),
        pool_devices=len(k.sharding.device_set), mesh=engine.mesh_label,
        hit_tokens=int(hq[2].hit_tokens))
  if not full:
    print(json.dumps(result))
    return
  # No mesh at all gives the model:1 mesh's bits.
  plain = run(Engine(params, CFG, chunk_size=CHUNK, attention=attention), "dense", reqs)
  result["no_mesh_identical"] = compare(plain[:2], one)[0]
  # FP8 pools (values and scales both split over kv heads) at model:2: dense = HQ.
  fp8 = Engine(params, CFG, chunk_size=CHUNK, attention=attention, kv_dtype="float8_e4m3fn",
               mesh=mesh_lib.MeshSpec(1, 2).make())
  fd, fh = (run(fp8, b, reqs, "float8_e4m3fn") for b in ("dense", "hq"))
  result["fp8_tp2"] = dict(dense_hq_identical=compare(fd[:2], fh[:2])[0],
                           scale_heads=sorted({s.data.shape[3] for s in
                                               fh[2].pools.k_scale.addressable_shards}))
  result["dp"] = {}
  # Data parallel: data:2 x model:2, one engine and one cache per data row; each shard
  # serves its own requests (prefix pairs of its own).
  mesh = mesh_lib.MeshSpec(2, 2).make()
  shards = mesh_lib.data_shards(mesh)
  caches = {"dense": [], "hq": []}
  logits = {"dense": [], "hq": []}
  for d, sub in enumerate(shards):
    engine = Engine(params, CFG, chunk_size=CHUNK, attention=attention, mesh=sub)
    for backend in ("dense", "hq"):
      out = run(engine, backend, prompts(d))
      logits[backend].append(out[:2])
      caches[backend].append(out[2])
      devices = sorted(dev.id for dev in out[2].pools.k.sharding.device_set)
      result["dp"].setdefault("shard_devices", {})[f"{backend}{d}"] = devices
  result["dp"]["dense_hq_identical"] = [compare(a, b)[0] for a, b in
                                        zip(logits["dense"], logits["hq"])]
  # Shard 0 runs the same requests as the one-device run: the same bits.
  result["dp"]["shard0_vs_tp1_max_abs"] = compare(logits["dense"][0], one)[1]
  per, total = sharded_kv_stats(caches["hq"])
  result["dp"]["hq_stats"] = dict(per=[s.asdict() for s in per], total=total.asdict())
  # One cache holding both shards' requests holds the same blocks (no prefix crosses them).
  layout = KVLayout.from_config(CFG, BS)
  both = DedupKVCache.init(layout, num_blocks=128, max_requests=8, max_seq_len=256,
                           host_only=True)
  for d in range(2):
    for p in prompts(d):
      both, s = both.admit(p)
      both = both.commit(s, p.size).extend(s, [7, 8])  # as the two decode steps
  result["dp"]["one_cache_stats"] = kv_stats(both).asdict()
  # The sweep's caches are made in place on the mesh (never whole on one device).
  from hq_jax.study import memory
  tp2 = mesh_lib.MeshSpec(1, 2).make()
  cache = memory.make_cache("hq", layout, concurrency=2, context_length=64, max_seq_len=64,
                            mesh=tp2)
  result["make_cache_heads"] = sorted({s.data.shape[3] for s in cache.pools.k.addressable_shards})
  # The e2e bench at model:2 (its own engine, weights and pools made on the mesh).
  from hq_jax.bench import e2e
  _, rows = e2e.run(decode_points=[("tiny", 2, 64)], prefill_points=[("tiny", 1, 64)],
                    attention="reference", dtype="float32", steps=1, reps=1,
                    prefill_repeats=1, chunk_sizes={"*": 32}, dedup_shared_fraction=0,
                    block_size=BS, seed=0, log=lambda m: None, decode_rows=(8,),
                    mesh="model:2")
  result["e2e"] = [dict(mesh=r["mesh"], kind=r["kind"], finite=r["finite"]) for r in rows]
  print(json.dumps(result))


if __name__ == "__main__":
  main()
