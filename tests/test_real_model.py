"""The shipped Qwen2.5-Coder-0.5B against HF transformers (golden file), and dense == HQ."""

import numpy as np
import pytest

from hq_jax.serve.engine import Engine
from hq_jax.study import perplexity
from hq_jax.kv.dedup import DedupKVCache
from hq_jax.kv.dense import DenseKVCache
from hq_jax.kv.paged import KVLayout

pytestmark = pytest.mark.real_model


def test_tokenizer_matches_transformers(shipped, golden):
  _, _, tok = shipped
  ids = tok.encode(golden["passage"])[:golden["num_tokens"]]
  assert ids == golden["token_ids"]
  assert tok.decode(tok.encode(golden["passage"])) == golden["passage"]


@pytest.fixture(scope="module")
def report(shipped, golden):
  params, cfg, _ = shipped
  return perplexity.run(params, cfg, golden["token_ids"], chunk_size=128)


@pytest.fixture(scope="module")
def dense_logits(shipped, golden):
  params, cfg, _ = shipped
  ids = golden["token_ids"]
  layout = KVLayout.from_config(cfg)
  cache = DenseKVCache.for_requests(layout, max_requests=1, max_seq_len=len(ids))
  return Engine(params, cfg, chunk_size=128).prefill(cache, ids)[1].logits


def test_logits_match_transformers(dense_logits, golden):
  worst = 0.0
  for pos, ref in golden["top_logits"].items():
    row = np.asarray(dense_logits[int(pos)])
    ours_top5 = np.argsort(-row, kind="stable")[:5].tolist()
    assert ours_top5 == ref["ids"][:5], f"position {pos}"
    worst = max(worst, float(np.max(np.abs(row[ref["ids"]] - np.asarray(ref["logits"])))))
  print(f"max |logit - transformers| over golden top-{golden['top_k']}: {worst:.2e}")
  assert worst <= 1e-3


def test_perplexity_matches_transformers(report, golden):
  ours, ref = report["dense"]["ppl"], golden["perplexity"]
  print(f"perplexity: ours {ours:.4f}, transformers {ref:.4f}")
  assert abs(ours - ref) / ref < 1e-3
  assert len(report["dense"]["nll"]) == golden["num_tokens"] - 1


def test_hq_logits_bit_identical_to_dense(report):
  diffs = report["max_abs_logit_diff"]
  print("max abs logit diff, dense vs HQ:", diffs)
  assert diffs == {"full_prefill": 0.0, "prefix_reuse": 0.0}
  assert report["logit_mismatches"] == {"full_prefill": 0, "prefix_reuse": 0}  # NaN-aware.
  assert report["prefix_reuse"]["cached_tokens"] == 256  # Compute was really skipped.
  assert report["hq"]["nll"] == report["dense"]["nll"]


def test_concurrent_requests_sharing_a_prefix_bit_identical(shipped, golden):
  params, cfg, _ = shipped
  ids = np.asarray(golden["token_ids"])
  prefix = ids[:128]
  reqs = [np.concatenate([prefix, ids[128 + 48 * i:128 + 48 * (i + 1)]]) for i in range(3)]
  layout = KVLayout.from_config(cfg)
  engine = Engine(params, cfg, chunk_size=64)
  dense = DenseKVCache.for_requests(layout, max_requests=3, max_seq_len=192)
  hq = DedupKVCache.init(layout, num_blocks=64, max_requests=3, max_seq_len=192)
  mismatches = 0  # Exact: entries where dense == HQ is false (a NaN is a difference).
  for i, r in enumerate(reqs):
    dense, d = engine.prefill(dense, r)
    hq, h = engine.prefill(hq, r)
    assert h.cached_tokens == (0 if i == 0 else 128)
    mismatches += perplexity.logit_mismatches(d.logits[h.first_position:], h.logits)
  dense, dl = engine.decode(dense, [0, 1, 2], [11, 12, 13])
  hq, hl = engine.decode(hq, [0, 1, 2], [11, 12, 13])
  mismatches += perplexity.logit_mismatches(dl.logits, hl.logits)
  print(f"concurrent shared prefix: {mismatches} differing logits")
  assert mismatches == 0
