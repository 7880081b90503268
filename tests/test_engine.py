"""The engine on `tiny`: dense and HQ logits are bit-identical, and reuse really skips work."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hq_jax import model as model_lib
from hq_jax.serve.engine import Engine, decode_bucket, resolve_attention
from hq_jax.kv.base import CacheError
from hq_jax.kv.dedup import DedupKVCache
from hq_jax.kv.dense import DenseKVCache
from hq_jax.kv.paged import KVLayout


def _caches(layout, n=4, max_seq=192):
  return (DenseKVCache.for_requests(layout, max_requests=n, max_seq_len=max_seq),
          DedupKVCache.init(layout, num_blocks=n * max_seq // 16, max_requests=n,
                            max_seq_len=max_seq))


def _diff(a, b):
  return float(jnp.max(jnp.abs(a - b)))


@pytest.mark.parametrize("chunk,kv_dtype", [(16, None), (32, None), (64, None),
                                            (32, "float8_e4m3fn")])
def test_dense_and_hq_bit_identical(tiny, tiny_layout, chunk, kv_dtype):
  params, cfg = tiny
  engine = Engine(params, cfg, chunk_size=chunk, kv_dtype=kv_dtype)
  if kv_dtype:  # FP8 K/V: each token's values and scale depend on that token alone
    tiny_layout = KVLayout.from_config(cfg, 16, kv_dtype)
  rng = np.random.default_rng(chunk)
  prefix = rng.integers(0, cfg.vocab_size, 80)
  reqs = [np.concatenate([prefix, rng.integers(0, cfg.vocab_size, n)]) for n in (37, 50, 3)]

  # (a) full prefill of one request.
  dense, hq = _caches(tiny_layout)
  dense, d = engine.prefill(dense, reqs[0])
  hq, h = engine.prefill(hq, reqs[0])
  assert h.cached_tokens == 0 and _diff(d.logits, h.logits) == 0.0

  # (b) a second request sharing the prefix, its cached blocks skipped (chunks start at
  # the first uncached block), vs dense from scratch.
  hq, h2 = engine.prefill(hq, reqs[1])
  _, d2 = engine.prefill(_caches(tiny_layout)[0], reqs[1])
  assert h2.cached_tokens == h2.hit_tokens == 80
  assert h2.computed_tokens == len(reqs[1]) - h2.cached_tokens
  assert _diff(d2.logits[h2.first_position:], h2.logits) == 0.0

  # (c) several concurrent requests sharing the prefix, then batched decode steps.
  dense, d2 = engine.prefill(dense, reqs[1])
  dense, d3 = engine.prefill(dense, reqs[2])
  hq, h3 = engine.prefill(hq, reqs[2])
  assert _diff(d3.logits[h3.first_position:], h3.logits) == 0.0
  slots = [d.slot, d2.slot, d3.slot]
  assert slots == [h.slot, h2.slot, h3.slot]
  tokens = [1, 2, 3]
  for _ in range(20):  # Crosses block boundaries: new private blocks on the HQ side.
    dense, dl = engine.decode(dense, slots, tokens)
    hq, hl = engine.decode(hq, slots, tokens)
    assert _diff(dl.logits, hl.logits) == 0.0
    tokens = [int(t) for t in jnp.argmax(hl.logits, axis=-1)]


def test_last_logits_project_only_the_last_token(tiny, tiny_layout):
  """logits="last" projects one row per chunk: the same prediction as the full chunk's last
  row (within float rounding: another matmul shape), bit-identical between the caches."""
  params, cfg = tiny
  engine = Engine(params, cfg, chunk_size=32)
  prompt = np.random.default_rng(5).integers(0, cfg.vocab_size, 75)
  lasts = []
  # GPU float32 matmuls may round through TF32, shape-dependently.
  tol = 1e-5 if jax.default_backend() == "cpu" else 2e-2
  # Fresh caches per prefill: on a GPU the engine donates (consumes) the cache it is given.
  for kind in range(2):
    _, full = engine.prefill(_caches(tiny_layout)[kind], prompt, logits="all")
    _, last = engine.prefill(_caches(tiny_layout)[kind], prompt, logits="last")
    assert last.logits is None and last.last_logits.shape == (cfg.vocab_size,)
    np.testing.assert_allclose(last.last_logits, full.logits[-1], rtol=tol, atol=tol)
    np.testing.assert_array_equal(full.last_logits, full.logits[-1])
    lasts.append(np.asarray(last.last_logits))
  np.testing.assert_array_equal(*lasts)


def test_reuse_changes_nothing_but_the_work(tiny, tiny_layout):
  """The same prompt twice on HQ: the second prefill computes only its last block."""
  params, cfg = tiny
  engine = Engine(params, cfg, chunk_size=32)
  prompt = np.arange(100) % cfg.vocab_size
  hq = _caches(tiny_layout)[1]
  hq, first = engine.prefill(hq, prompt)
  hq, second = engine.prefill(hq, prompt)
  assert (second.hit_tokens, second.cached_tokens, second.computed_tokens) == (96, 96, 4)
  assert _diff(first.last_logits, second.last_logits) == 0.0


def test_generate_is_deterministic_and_matches_prefill(tiny, tiny_layout):
  params, cfg = tiny
  engine = Engine(params, cfg, chunk_size=16)
  prompt = list(range(1, 21))
  _, _, a = engine.generate(_caches(tiny_layout)[0], prompt, steps=6)
  _, _, b = engine.generate(_caches(tiny_layout)[1], prompt, steps=6)
  assert a == b and len(a) == 6
  # Re-prefilling prompt + generated tokens predicts the same continuation.
  _, res = engine.prefill(_caches(tiny_layout)[0], prompt + a[:-1])
  assert [int(t) for t in jnp.argmax(res.logits[len(prompt) - 1:], -1)] == a


def test_engine_rejects_bad_settings(tiny, tiny_layout):
  params, cfg = tiny
  with pytest.raises(ValueError, match="attention must be one of"):
    Engine(params, cfg, attention="flash")
  with pytest.raises(ValueError, match="not a multiple of the cache's block_size"):
    Engine(params, cfg, chunk_size=24).prefill(_caches(tiny_layout)[0], [1, 2])


def test_auto_attention_is_the_reference_on_cpu(tiny):
  assert resolve_attention("auto") == ("pallas" if jax.default_backend() == "gpu"
                                       else "reference")
  assert Engine(*tiny).attention == resolve_attention("auto")
  assert Engine(*tiny, attention="pallas_interpret").attention == "pallas_interpret"


def test_pallas_picks_its_prefill_kernel_per_device(tiny):
  """"pallas" = Mosaic GPU prefill only where it compiles (Hopper, bf16/f16, head_dim a
  multiple of 64); "triton" never; "reference" runs XLA."""
  from hq_jax.serve.engine import prefill_kernel
  params, cfg = tiny
  hopper = (jax.default_backend() == "gpu"
            and getattr(jax.devices()[0], "compute_capability", None) == "9.0")
  bf16_64 = dataclasses.replace(cfg, dtype="bfloat16", head_dim=64)
  assert prefill_kernel("pallas", bf16_64) == ("mosaic" if hopper else "triton")
  assert prefill_kernel("pallas", dataclasses.replace(bf16_64, head_dim=32)) == "triton"
  assert prefill_kernel("pallas", dataclasses.replace(bf16_64, dtype="float32")) == "triton"
  assert prefill_kernel("pallas", bf16_64, block_size=4) == "triton"  # 32-key steps
  assert prefill_kernel("triton", bf16_64) == "triton"
  assert prefill_kernel("mosaic", cfg) == "mosaic"
  assert prefill_kernel("reference", bf16_64) == "xla"


def test_decode_kernel_per_backend(tiny, monkeypatch):
  """"pallas" decodes on the Triton kernel on every GPU, also where the Mosaic one compiles
  (Hopper, faked here: it is slower at small batches, and its split length cannot follow
  the batch); "mosaic" decodes on Mosaic, "triton" on Triton, "reference" on XLA. The
  prefill rule still picks Mosaic on the faked H200."""
  import types
  from hq_jax.serve.engine import decode_kernel, prefill_kernel
  params, cfg = tiny
  bf16_64 = dataclasses.replace(cfg, dtype="bfloat16", head_dim=64)
  h200 = types.SimpleNamespace(platform="gpu", compute_capability="9.0")
  monkeypatch.setattr(jax, "devices", lambda *a, **k: [h200])
  assert prefill_kernel("pallas", bf16_64) == "mosaic"
  assert decode_kernel("pallas") == "triton"
  assert decode_kernel("triton") == "triton"
  assert decode_kernel("mosaic") == "mosaic"
  assert decode_kernel("reference") == "xla"
  assert Engine(params, bf16_64, attention="pallas").decode_kernel == "triton"
  assert Engine(params, bf16_64, attention="mosaic").decode_kernel == "mosaic"


def test_cache_of_another_layout_is_refused(tiny, tiny_layout):
  params, cfg = tiny
  engine = Engine(params, cfg, chunk_size=16)
  one_layer = dataclasses.replace(tiny_layout, num_layers=1)
  for cache in (DenseKVCache.for_requests(one_layer, max_requests=1, max_seq_len=32),
                DedupKVCache.init(one_layer, num_blocks=4, max_requests=1, max_seq_len=32)):
    with pytest.raises(CacheError, match="the model needs 2 x"):
      engine.prefill(cache, [1, 2, 3])
  good = DedupKVCache.init(tiny_layout, num_blocks=4, max_requests=1, max_seq_len=32)
  good, res = engine.prefill(good, [1, 2, 3])
  bad = dataclasses.replace(good, pools=model_lib.KVPools(good.pools.k[:1], good.pools.v[:1]))
  with pytest.raises(CacheError, match="layers"):
    engine.decode(bad, [res.slot], [4])


def test_decode_token_ids_must_be_integers(tiny, tiny_layout):
  params, cfg = tiny
  engine = Engine(params, cfg, chunk_size=16)
  for cache in _caches(tiny_layout):
    cache, res = engine.prefill(cache, [1, 2, 3])
    before = np.array(cache.req_lens)
    for bad in ([1.0], [True], np.array([2.5])):
      with pytest.raises(CacheError, match="integers"):
        engine.decode(cache, [res.slot], bad)
    np.testing.assert_array_equal(cache.req_lens, before)
    with pytest.raises(CacheError, match="int32"):
      cache.admit([1, 2**31])
    with pytest.raises(CacheError, match="int"):
      cache.append(res.slot, 2**31)


def test_decode_bucket():
  assert [decode_bucket(b) for b in (1, 2, 3, 4, 5, 8, 9, 64)] == [1, 2, 4, 4, 8, 8, 16, 64]


def test_padded_decode_batch_changes_no_bit(tiny, tiny_layout):
  """Three requests decode in one step of decode_rows rows: each one's logits equal its
  decode alone bit for bit (every step has the same shape, so no GEMM sees another M)."""
  params, cfg = tiny
  engine = Engine(params, cfg, chunk_size=16)
  rng = np.random.default_rng(3)
  reqs = [rng.integers(0, cfg.vocab_size, n) for n in (20, 33, 7)]
  together, slots = _caches(tiny_layout)[0], []
  for r in reqs:
    together, res = engine.prefill(together, r, logits="last")
    slots.append(res.slot)
  _, out = engine.decode(together, slots, [4, 5, 6])
  assert out.logits.shape == (3, cfg.vocab_size)
  for i, r in enumerate(reqs):
    alone, res = engine.prefill(_caches(tiny_layout)[0], r, logits="last")
    _, one = engine.decode(alone, [res.slot], [4 + i])
    np.testing.assert_array_equal(np.asarray(one.logits[0]), np.asarray(out.logits[i]))


def test_decode_rows_is_validated_and_recorded(tiny):
  params, cfg = tiny
  assert Engine(params, cfg).invariance == "batch_invariant"
  assert Engine(params, cfg, decode_rows=0).invariance == "bucketed"
  for bad in (-1, 2.0, True):
    with pytest.raises(ValueError, match="decode_rows"):
      Engine(params, cfg, decode_rows=bad)


@pytest.mark.parametrize("decode_attention", ["paged", "dedup"])
def test_steady_decode_loop_never_recompiles(tiny, tiny_layout, decode_attention):
  """Count XLA compilations over a decode loop whose batch size moves within one bucket
  (3 and 4 requests share the bucket of 4) and whose requests cross block boundaries and
  grow their private remainders: after the first step, none may compile."""
  params, cfg = tiny
  engine = Engine(params, cfg, chunk_size=16, decode_attention=decode_attention)
  rng = np.random.default_rng(5)
  prefix = rng.integers(0, cfg.vocab_size, 48)
  cache = DedupKVCache.init(tiny_layout, num_blocks=64, max_requests=4, max_seq_len=192)
  slots = []
  for n in (5, 12, 9, 3):
    cache, res = engine.prefill(cache, np.r_[prefix, rng.integers(0, cfg.vocab_size, n)],
                                logits="last")
    slots.append(res.slot)
  cache, out = engine.decode(cache, slots, [1, 2, 3, 4])  # compiles the step
  assert out.attention == decode_attention
  # The step is one shape (decode_rows) for both batch sizes; taking a batch's real rows
  # out of it compiles once per batch size (a slice), so 3 requests are warmed up too.
  cache, _ = engine.decode(cache, slots[:3], [1, 2, 3])
  compiles = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, _, **kw: compiles.append(event)
      if event == "/jax/core/compile/backend_compile_duration" else None)
  try:
    for step in range(40):
      batch = slots if step % 3 else slots[:3]  # 4 and 3 requests: one bucket
      cache, out = engine.decode(cache, batch, [step % cfg.vocab_size] * len(batch))
      assert out.logits.shape == (len(batch), cfg.vocab_size)
  finally:
    jax.monitoring.clear_event_listeners()
  assert compiles == [], f"{len(compiles)} compilations in a steady decode loop"


def test_donating_engine_equals_copying_engine(tiny, tiny_layout):
  """The engine as it runs on a GPU (pools donated, HQ metadata updated in place) gives the
  same logits and the same cache as the copying engine, over prefills and decode steps that
  allocate and register blocks."""
  params, cfg = tiny
  rng = np.random.default_rng(11)
  prefix = rng.integers(0, cfg.vocab_size, 40)
  reqs = [np.r_[prefix, rng.integers(0, cfg.vocab_size, n)] for n in (9, 30, 3)]
  results = []
  for donate in (False, True):
    engine = Engine(params, cfg, chunk_size=16, donate=donate)
    outs = []
    for cache in _caches(tiny_layout):
      slots = []
      for r in reqs:
        cache, res = engine.prefill(cache, r, logits="last")
        slots.append(res.slot)
        outs.append(np.asarray(res.last_logits))
      for step in range(20):
        cache, out = engine.decode(cache, slots, [step % cfg.vocab_size] * 3)
        outs.append(np.asarray(out.logits))
      outs.append(jax.tree.map(np.asarray, cache))
    results.append(outs)
  for copying, donating in zip(*results):
    jax.tree.map(np.testing.assert_array_equal, copying, donating)
