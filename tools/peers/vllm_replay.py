"""The trace's prompts replayed through vLLM's own prefix cache (v1 KVCacheManager/BlockPool).

Runs in the separate vLLM environment (`make peers`), never in the project's: it reads the
prompts that `compare.py export` wrote (the same tokens hq-jax replays) and writes one CSV
row per pool size. Policy: concurrency 1, prompt only. Each request looks up its computed
blocks, allocates the rest (which registers its full blocks), then is freed, so its blocks
become cached/evictable; vLLM's null block is added on top, so `pool_blocks` usable blocks.
"""

import argparse
import csv
import time

import numpy as np
import torch
import vllm
from vllm.sampling_params import SamplingParams
from vllm.utils.hashing import get_hash_fn_by_name
from vllm.v1.core.kv_cache_manager import KVCacheManager
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.request import Request

BLOCK = 16


def replay(prompts, num_blocks: int, hash_algo: str, full_hit: bool) -> dict:
  spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=1, head_size=1, dtype=torch.float32)
  config = KVCacheConfig(num_blocks=num_blocks + 1,  # + vLLM's null block (block 0)
                         kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(["l0"], spec)])
  longest = max(len(p) for p in prompts)
  mgr = KVCacheManager(config, max_model_len=longest + BLOCK, scheduler_block_size=BLOCK,
                       hash_block_size=BLOCK, enable_caching=True)
  hasher = get_request_block_hasher(BLOCK, get_hash_fn_by_name(hash_algo))
  sp = SamplingParams(max_tokens=1)
  prompt_tokens = hit_tokens = skipped = 0
  for i, p in enumerate(prompts):
    req = Request(str(i), p.tolist(), sp, None, block_hasher=hasher)
    # vLLM recomputes the last token for its logits (hit <= n - 1); `full_hit` lifts that
    # cap to n, the rule of a cache that is only looked up (hq-jax's admit).
    blocks, hit, _ = mgr.get_computed_blocks(
        req, max_cache_hit_length=len(p) if full_hit else None)
    new = mgr.allocate_slots(req, len(p) - hit, num_new_computed_tokens=hit,
                             new_computed_blocks=blocks)
    if new is None:  # longer than the pool: never fits, as hq-jax skips it
      skipped += 1
      continue
    prompt_tokens += len(p)
    hit_tokens += hit
    req.num_computed_tokens = len(p)
    mgr.free(req)
  return dict(pool_blocks=num_blocks, prompt_tokens=prompt_tokens, hit_tokens=hit_tokens,
              skipped=skipped)


def main():
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--prompts", required=True, help="compare.py export's .npz")
  ap.add_argument("--pool_blocks", default="65536,16384,4096,0", help="0: unbounded")
  ap.add_argument("--hash_algo", default="sha256", help="vLLM's default prefix-cache hash")
  ap.add_argument("--full_hit", action="store_true",
                  help="allow a hit of the whole prompt (default: vLLM's n - 1 cap)")
  ap.add_argument("--out", required=True)
  a = ap.parse_args()
  init_none_hash(get_hash_fn_by_name(a.hash_algo))
  z = np.load(a.prompts)
  prompts = np.split(z["tokens"], np.cumsum(z["lengths"])[:-1])
  unbounded = int(sum(-(-len(p) // BLOCK) for p in prompts))
  rows = []
  for nb in (int(x) for x in a.pool_blocks.split(",")):
    t = time.perf_counter()
    row = replay(prompts, nb or unbounded, a.hash_algo, a.full_hit)
    row.update(pool_blocks=nb, vllm=vllm.__version__, full_hit=a.full_hit,
               seconds=round(time.perf_counter() - t, 1))
    print(row, flush=True)
    rows.append(row)
  with open(a.out, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)


if __name__ == "__main__":
  main()
