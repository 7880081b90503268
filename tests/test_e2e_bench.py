"""The end-to-end benchmark's logic on CPU (tiny model, small ceilings): the GPU numbers come
from scripts/e2e_bench.py on the H200; here its rows, floors and flag checks are tested."""

import pytest

from hq_jax import config
from hq_jax.bench import e2e as e2e_bench


def test_rows_and_floors_on_tiny():
  ceilings, rows = e2e_bench.run(
      decode_points=[("tiny", 3, 40)], prefill_points=[("tiny", 1, 64)],
      attention="reference", dtype="float32", steps=2, reps=1, prefill_repeats=1,
      chunk_sizes={"*": 32}, dedup_shared_fraction=0.5, block_size=16, seed=0,
      log=lambda m: None)
  assert ceilings.read_tb_s > 0 and ceilings.matmul_tflop_s > 0
  decode = [r for r in rows if r["kind"] == "decode"]
  assert [(r["backend"], r["decode_attention"]) for r in decode] == [
      ("dense", "paged"), ("hq 50% shared", "paged"), ("hq 50% shared", "dedup")]
  cfg = config.get_config("tiny")
  for r in decode:
    assert r["finite"] and r["wall_ms"] > 0 and r["device_ms"] > 0
    # The roofline counts each request's K/V once, as the next step references it: 40
    # prompt tokens, 3 decoded (a compile step and 2 timed), plus the new one.
    kv = 3 * (40 + 3 + 1) * 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4
    assert r["kv_gb"] == pytest.approx(kv / 1e9)
    assert r["of_roofline_wall"] == pytest.approx(r["roofline_ms"] / r["wall_ms"])
  (pre,) = [r for r in rows if r["kind"] == "prefill"]
  assert pre["finite"] and pre["ttft_ms"] > 0
  flops = e2e_bench.prefill_flops(cfg, e2e_bench.param_count(
      e2e_bench.seeded_params(cfg, 0)), 64)
  assert pre["floor_ms"] == pytest.approx(flops / (ceilings.matmul_tflop_s * 1e12) * 1e3)
  assert "| tiny | 3 x 40 |" in e2e_bench.markdown(ceilings, rows)


@pytest.mark.parametrize("spec,kind,message", [
    ("7b:64", "decode", "MODEL:BATCHxCONTEXT"), ("nope:4x64", "decode", "unknown model"),
    ("7b:0x64", "decode", "positive"), ("7b", "prefill", "MODEL:TOKENS")])
def test_bad_points_name_the_flag(spec, kind, message):
  with pytest.raises(ValueError, match=message):
    e2e_bench.parse_points([spec], kind)
  with pytest.raises(ValueError, match=f"--{kind}"):
    e2e_bench.parse_points([spec], kind)
