"""Host cost of the HQ block manager's operations in a full pool (no model, no device).

A host-only `DedupKVCache` of 162,760 blocks (the 0.5B model's pool at about 32 GB) is
filled with released, cached chains, so every allocation evicts. Then, repeated:
  admit    a prompt whose first 256 blocks are a cached chain, plus one new full block
           and a partial one (the chain is hit and pinned, two blocks are allocated);
  commit   of that prompt (registers its new full block);
  release  of it (the chain and the new block go back to the LRU, the partial block free);
and a decode step of 64 running requests (`append_batch`, then `commit_batch`).

    python -m hq_jax.bench.block_manager [--repeats N] [--host_blocks H]

(`--host_blocks`: with a host tier of H blocks, so every eviction is a move to it.)

prints the median and p90 of each, in milliseconds. Timings are wall clock on the host:
run it on an idle machine.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from hq_jax.kv.dedup import DedupKVCache
from hq_jax.kv.paged import KVLayout

NUM_BLOCKS = 162_760
CHAIN_BLOCKS = 256
DECODE_BATCH = 64
LAYOUT = KVLayout(num_layers=24, num_kv_heads=2, head_dim=64, block_size=16,
                  dtype="bfloat16")


def full_cache(rng: np.random.Generator, *, chain_blocks: int = CHAIN_BLOCKS,
               num_blocks: int = NUM_BLOCKS, host_blocks: int = 0):
  """A host-only cache whose every block is cached (registered, refcount 0), and the
  tokens of a cached chain of `chain_blocks` blocks, the most recently used."""
  bs = LAYOUT.block_size
  cache = DedupKVCache.init(LAYOUT, num_blocks=num_blocks, max_requests=2 * DECODE_BATCH,
                            max_seq_len=(chain_blocks + 64) * bs, host_only=True,
                            host_blocks=host_blocks)
  while cache.held_blocks + cache.cached_blocks < num_blocks:
    tokens = rng.integers(0, 150_000, chain_blocks * bs)
    cache, slot = cache.admit(tokens)
    cache = cache.commit(slot, tokens.size).release(slot)
  chain = rng.integers(0, 150_000, chain_blocks * bs)
  cache, slot = cache.admit(chain)
  cache = cache.commit(slot, chain.size).release(slot)
  return cache, chain


def _ms(times) -> str:
  t = np.asarray(times) * 1e3
  return f"median {np.median(t):7.3f} ms   p90 {np.percentile(t, 90):7.3f} ms"


def measure(repeats: int = 200, seed: int = 0, host_blocks: int = 0) -> dict[str, list[float]]:
  rng = np.random.default_rng(seed)
  cache, chain = full_cache(rng, host_blocks=host_blocks)
  bs = LAYOUT.block_size
  times = {"admit": [], "commit": [], "release": [], "append_batch": [], "commit_batch": []}
  clock = time.perf_counter
  for _ in range(repeats):
    prompt = np.r_[chain, rng.integers(0, 150_000, bs + 5)]
    t0 = clock()
    cache, slot = cache.admit(prompt)
    t1 = clock()
    cache = cache.commit(slot, prompt.size)
    t2 = clock()
    cache = cache.release(slot)
    t3 = clock()
    assert int(cache.seq_lens[slot]) == 0
    times["admit"].append(t1 - t0)
    times["commit"].append(t2 - t1)
    times["release"].append(t3 - t2)
  slots = []
  for i in range(DECODE_BATCH):  # running requests: the chain plus their own tokens
    prompt = np.r_[chain, rng.integers(0, 150_000, 3 + i)]
    cache, slot = cache.admit(prompt)
    cache = cache.commit(slot, prompt.size)
    slots.append(slot)
  for _ in range(repeats):
    tokens = rng.integers(0, 150_000, len(slots)).tolist()
    t0 = clock()
    cache = cache.append_batch(slots, tokens)
    t1 = clock()
    lens = [int(cache.req_lens[s]) for s in slots]
    t2 = clock()
    cache = cache.commit_batch(slots, lens)
    t3 = clock()
    times["append_batch"].append(t1 - t0)
    times["commit_batch"].append(t3 - t2)
  return times


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--repeats", type=int, default=200)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--host_blocks", type=int, default=0,
                      help="blocks of a host tier (0: none)")
  args = parser.parse_args(argv)
  t0 = time.perf_counter()
  times = measure(args.repeats, args.seed, args.host_blocks)
  tier = f", host tier of {args.host_blocks:,} blocks" if args.host_blocks else ""
  print(f"HQ block manager, host only: {NUM_BLOCKS:,} blocks{tier}, all cached; "
        f"{args.repeats} repeats ({time.perf_counter() - t0:.1f} s with setup)")
  labels = {"admit": f"admit ({CHAIN_BLOCKS}-block cached chain + 2 new blocks)",
            "commit": "commit of that prompt", "release": "release of it",
            "append_batch": f"decode step append_batch ({DECODE_BATCH} slots)",
            "commit_batch": f"decode step commit_batch ({DECODE_BATCH} slots)"}
  for name, label in labels.items():
    print(f"  {label:<48s} {_ms(times[name])}")


def run(argv=None) -> None:
  """`hq-jax bench blocks` (argv[0] is the command's name)."""
  main(None if argv is None else argv[1:])


if __name__ == "__main__":
  main()
