"""The host tier's copies: whole blocks device -> host and back, timed and checked.

A device pool and a host pool (`tiers.host_pools`: pinned host memory where the backend
has it) of the sizes given; each repeat moves `--blocks` random device blocks to random
host slots and as many host slots back to random device blocks, in one `apply_copies` step
(the engine's), synced and timed; the first, compiling, step is not counted. Before the
timing, a round trip (device -> host -> another device block) is checked bit for bit.

    python -m hq_jax.bench.host_tier [--device_gb 32] [--host_gb 64] [--blocks 256]
        [--kv_dtype float8_e4m3fn] [--host_memory auto]

prints the memory kind, the median step time and GB/s each way (0.5B K/V shape).
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from hq_jax import config as config_lib
from hq_jax.kv import tiers
from hq_jax.kv.paged import KVLayout, KVPools


def _plan(rng, n: int, nb: int, nh: int) -> tiers.CopyPlan:
  pick = lambda hi: rng.choice(hi, n, replace=False).astype(np.int32)
  return tiers.CopyPlan(pick(nb), pick(nh), pick(nh), pick(nb))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", default="0.5b")
  parser.add_argument("--kv_dtype", default="bfloat16")
  parser.add_argument("--device_gb", type=float, default=32.0)
  parser.add_argument("--host_gb", type=float, default=64.0)
  parser.add_argument("--blocks", type=int, default=256, help="blocks each way per step")
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--host_memory", default="auto", choices=tiers.HOST_MEMORY_KINDS)
  args = parser.parse_args(argv)
  layout = KVLayout.from_config(config_lib.get_config(args.model), 16, args.kv_dtype)
  nb = int(args.device_gb * 1e9) // layout.bytes_per_block
  nh = int(args.host_gb * 1e9) // layout.bytes_per_block
  if min(nb, nh) < 2 * args.blocks:
    raise SystemExit(f"--blocks {args.blocks} needs pools of at least {2 * args.blocks} blocks")
  t0 = time.perf_counter()
  key = jax.random.key(0)
  # Random K/V (and scales) in block 0 only: what the round trip below checks.
  fill = jax.jit(lambda x: x.at[:, 0].set(
      jax.random.uniform(key, (x.shape[0], *x.shape[2:])).astype(x.dtype)), donate_argnums=0)
  pools = jax.tree.map(fill, KVPools.zeros(layout, nb))
  host = tiers.host_pools(layout, nh, args.host_memory)
  jax.block_until_ready((pools, host))
  print(f"pools: device {nb:,} blocks, host {nh:,} blocks in {tiers.pools_memory_kind(host)} "
        f"memory ({time.perf_counter() - t0:.1f} s to make)")
  # The check: block 0 -> host slot 0 -> device block 1 (phase 2 reads phase 1's write).
  want = [np.asarray(x[:, 0]) for x in jax.tree.leaves(pools)]
  one = np.zeros(1, np.int32)
  pools, host, _ = tiers.apply_copies(pools, host, tiers.CopyPlan(one, one, one, one + 1),
                                      sync=True)
  got = [np.asarray(x[:, 1]) for x in jax.tree.leaves(pools)]
  ok = all(np.array_equal(a.view(np.uint8), b.view(np.uint8)) for a, b in zip(want, got))
  print(f"round trip device -> host -> device bit-identical: {ok}")
  rng = np.random.default_rng(0)
  times = []
  for i in range(args.repeats + 1):
    pools, host, res = tiers.apply_copies(pools, host, _plan(rng, args.blocks, nb, nh),
                                          sync=True)
    if i:
      times.append(res.seconds)
  t = float(np.median(times))
  moved = args.blocks * layout.bytes_per_block
  print(f"{args.blocks} blocks each way ({moved / 1e6:.1f} MB each way, {args.kv_dtype}): "
        f"median {1e3 * t:.2f} ms per step (p90 {1e3 * np.percentile(times, 90):.2f}), "
        f"{2 * moved / t / 1e9:.2f} GB/s both ways together")
  if not ok:
    raise SystemExit(1)


def run(argv=None) -> None:
  main(None if argv is None else argv[1:])


if __name__ == "__main__":
  main()
