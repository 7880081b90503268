"""hq-jax's side of the peer check (`make peers`), in the project's environment.

  export: the trace's prompts (`traces.request_tokens`, the 0.5B vocabulary, seed 0), the
          tokens both sides replay, as one .npz for `vllm_replay.py` (a separate venv).
  compare: the same policy through `DedupKVCache` (host-only, one slot): each request
          admitted, committed, released, so its full blocks become cached/evictable (the
          `--no_model` replay at concurrency 1 with no output tokens; `ReplayConfig` cannot
          say "no output", so the cache is driven directly), then the table against
          vllm_replay.py's CSVs: equal within `--tolerance` of the prompt tokens. vLLM caps
          a hit at n - 1 tokens (it recomputes the last token for its logits), HQ's admit at
          n, so a wholly cached prompt of whole blocks hits a block fewer in vLLM;
          `vllm_replay.py --full_hit` lifts the cap, and then the counts are equal.
Not part of the hq_jax package and never imported by it or its tests.
"""

import argparse
import csv
import sys
import time

import numpy as np

from hq_jax import config as config_lib
from hq_jax.kv.base import PoolFull
from hq_jax.kv.dedup import DedupKVCache
from hq_jax.kv.paged import KVLayout
from hq_jax.study import traces

BLOCK = 16


def prompts(trace: str, model: str):
  vocab = config_lib.get_config(model).vocab_size
  return [traces.request_tokens(r, vocab_size=vocab, seed=0) for r in traces.load_trace(trace)]


def export(a):
  ps = prompts(a.trace, a.model)
  np.savez(a.out, tokens=np.concatenate(ps).astype(np.int32),
           lengths=np.asarray([len(p) for p in ps], np.int64))
  print(f"{len(ps)} prompts, {sum(map(len, ps)):,} tokens -> {a.out}")


def hq_replay(ps, num_blocks: int, model: str) -> dict:
  layout = KVLayout.from_config(config_lib.get_config(model), BLOCK)
  cache = DedupKVCache.init(layout, num_blocks=num_blocks, max_requests=1,
                            max_seq_len=max(len(p) for p in ps), host_only=True)
  prompt_tokens = skipped = 0
  for p in ps:
    try:
      cache, slot = cache.admit(p)
    except PoolFull:  # longer than the pool: never fits (vLLM's allocate_slots gives None)
      skipped += 1
      continue
    prompt_tokens += len(p)
    cache = cache.commit(slot, len(p)).release(slot)
  return dict(pool_blocks=num_blocks, prompt_tokens=prompt_tokens,
              hit_tokens=int(cache.hit_tokens), skipped=skipped)


def _row(nb: int, hq: dict, v: dict, secs: float, tolerance: float) -> dict:
  diff = hq["hit_tokens"] - int(v["hit_tokens"])
  rel = abs(diff) / hq["prompt_tokens"]
  equal = (rel <= tolerance and hq["prompt_tokens"] == int(v["prompt_tokens"])
           and hq["skipped"] == int(v["skipped"]))
  return dict(pool_blocks=nb or "unbounded", vllm_full_hit=v["full_hit"],
              prompt_tokens=hq["prompt_tokens"], skipped=hq["skipped"],
              hq_hit_tokens=hq["hit_tokens"], vllm_hit_tokens=int(v["hit_tokens"]),
              difference=diff, of_prompt_tokens=f"{rel:.2e}", equal=equal, vllm=v["vllm"],
              hq_seconds=round(secs, 1), vllm_seconds=v["seconds"])


def compare(a):
  ps = prompts(a.trace, a.model)
  peers = []
  for path in a.vllm_csv.split(","):
    with open(path) as f:
      peers.append({int(r["pool_blocks"]): r for r in csv.DictReader(f)})
  unbounded = sum(-(-len(p) // BLOCK) for p in ps)
  rows, ok = [], True
  for nb in (int(x) for x in a.pool_blocks.split(",")):
    t = time.perf_counter()
    hq = hq_replay(ps, nb or unbounded, a.model)
    secs = time.perf_counter() - t
    for peer in peers:
      rows.append(_row(nb, hq, peer[nb], secs, a.tolerance))
      ok &= rows[-1]["equal"]
  with open(a.out, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
  cols = list(rows[0])
  print(" | ".join(cols))
  for r in rows:
    print(" | ".join(f"{r[c]:,}" if isinstance(r[c], int) and not isinstance(r[c], bool)
                     else str(r[c]) for c in cols))
  print(f"equal within {a.tolerance:g} of prompt tokens: {ok} ({a.out})")
  return 0 if ok else 1


def main():
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("step", choices=("export", "compare"))
  ap.add_argument("--trace", default="/work/shared/traces/mooncake_conversation_trace.jsonl")
  ap.add_argument("--model", default="0.5b", help="its vocabulary spells the tokens")
  ap.add_argument("--out", required=True)
  ap.add_argument("--vllm_csv", help="compare: vllm_replay.py's CSVs, comma-separated")
  ap.add_argument("--pool_blocks", default="65536,16384,4096,0", help="0: unbounded")
  ap.add_argument("--tolerance", type=float, default=5e-5)
  a = ap.parse_args()
  sys.exit(export(a) if a.step == "export" else compare(a))


if __name__ == "__main__":
  main()
