"""Shared-prefix decode: dedup attention vs our paged kernel on the same batch (GPU).

For each (shared P, unique S, batch C) and model shape (Qwen-0.5B: 14 q / 2 kv heads, d 64;
Qwen-7B: 28 q / 4 kv, d 128; page 16, bf16): C requests hold the same P-token prefix (one
copy of its blocks, as in the HQ cache) and S private tokens each; one decode step. Both
kernels are first checked against the float32 reference on fresh random inputs (the first
--check_requests requests, to bound the reference's memory) and against each other on all
requests; then timed: `--reps` calls back to back inside one jitted loop (no host
dispatch between them; each call's q depends on the previous output, so nothing is
hoisted), median over --rounds rounds after a warm-up round. The ideal ratio is the byte
ratio C (P + S) / (P + C S). The 'sweep' points (small sharing) set the engine's
decode_attention="auto" threshold: the fewest saved tokens at which dedup wins.

  python scripts/dedup_bench.py --output_dir=runs/dedup_bench
"""

from __future__ import annotations

import csv
import datetime
import os
import statistics
import sys
import time
import warnings

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from hq_jax.kv import sharing  # noqa: E402
from hq_jax.kv.paged import AttentionView  # noqa: E402
from pallas_kernels import dedup_attention as da  # noqa: E402
from pallas_kernels import paged_attention as pa  # noqa: E402

warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", message=".*Pallas Triton backend is deprecated.*")

SHAPES = {"qwen2.5-0.5b": (14, 2, 64), "qwen2.5-7b": (28, 4, 128)}  # (q heads, kv heads, d)
CONFIGS = {
    "bq64": da.TuningConfig(),
    "bq128": da.TuningConfig(shared_block_q=128, shared_num_warps=8),
}

FLAGS = flags.FLAGS
flags.DEFINE_string("output_dir", os.environ.get("OUT", "runs/dedup_bench"),
                    "Where CSV and Markdown go.")
flags.DEFINE_list("shapes", list(SHAPES), "Model shapes.")
flags.DEFINE_list("points", ["32768:256:128", "4096:512:64", "2048:512:16", "0:4096:64"],
                  "shared:unique:batch points.")
flags.DEFINE_list("sweep", ["256:512:4", "1024:512:8", "1024:1024:16"],
                  "Small-sharing points for the auto threshold (empty: skip).")
flags.DEFINE_list("configs", list(CONFIGS), "Dedup tuning configs (best median is kept).")
flags.DEFINE_list("sweep_configs", ["bq64"], "Dedup tuning configs for the sweep points.")
flags.DEFINE_integer("block_size", 16, "Tokens per KV block (page).")
flags.DEFINE_integer("reps", 10, "Calls per timed loop.")
flags.DEFINE_integer("rounds", 5, "Timed loops (median reported).")
flags.DEFINE_integer("check_requests", 16, "Requests checked against the f32 reference.")
flags.DEFINE_integer("seed", 0, "Seed of all random inputs.")
flags.DEFINE_bool("interpret", False, "Run the kernels in the Pallas interpreter (CPU smoke).")


def rel_err(out, ref) -> float:
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def make_batch(seed, shared, unique, batch, nh, nk, d, bs, dtype=jnp.bfloat16):
  """One shared prefix stored once + private blocks, shuffled in the pool; random values."""
  if shared % bs or unique % bs:
    raise ValueError(f"shared {shared} and unique {unique} must be multiples of {bs}")
  ps, pu = shared // bs, unique // bs
  nb = ps + batch * pu
  rng = np.random.default_rng(seed)
  perm = rng.permutation(nb).astype(np.int32)
  tables = np.concatenate([np.broadcast_to(perm[:ps], (batch, ps)),
                           perm[ps:].reshape(batch, pu)], axis=1)
  key = jax.random.key(seed)
  kq, kk, kv = jax.random.split(key, 3)
  q = jax.random.normal(kq, (batch, 1, nh, d), dtype)
  k = jax.random.normal(kk, (nb, bs, nk, d), dtype)
  v = jax.random.normal(kv, (nb, bs, nk, d), dtype)
  lens = np.full((batch,), shared + unique, np.int32)
  view = AttentionView(positions=jnp.asarray(lens - 1)[:, None],
                       block_tables=jnp.asarray(tables),
                       write_slots=jnp.zeros((batch, 1), jnp.int32), kv_lens=jnp.asarray(lens))
  return q, k, v, view, tables, lens


def timed_ms(fn, q, k, v, view, plan, reps, rounds) -> float:
  """Median ms per call: `reps` dependent calls in one jitted loop, `rounds` loops."""
  @jax.jit
  def loop(q, k, v, view, plan):
    def body(_, carry):
      qq, acc = carry
      out = fn(qq, k, v, view, plan)
      # The next q depends on this output (times 0), so no call is hoisted or merged.
      return qq + (out[0, 0, 0, 0] * 0).astype(qq.dtype), acc + out[0, 0, 0, 0].astype(
          jnp.float32)
    return jax.lax.fori_loop(0, reps, body, (q, jnp.float32(0)))[1]

  jax.block_until_ready(loop(q, k, v, view, plan))  # compile + warm-up
  times = []
  for _ in range(rounds):
    t0 = time.perf_counter()
    jax.block_until_ready(loop(q, k, v, view, plan))
    times.append((time.perf_counter() - t0) / reps * 1e3)
  return statistics.median(times)


def bench_point(shape, shared, unique, batch, kind, seed):
  nh, nk, d = SHAPES[shape]
  bs = FLAGS.block_size
  q, k, v, view, tables, lens = make_batch(seed, shared, unique, batch, nh, nk, d, bs)
  paged_fn = lambda q, k, v, view, plan: pa.paged_attention(q, k, v, view,
                                                             interpret=FLAGS.interpret)
  paged = paged_fn(q, k, v, view, None)
  n = min(FLAGS.check_requests, batch)
  sub = AttentionView(view.positions[:n], view.block_tables[:n], view.write_slots[:n],
                      view.kv_lens[:n])
  ref = pa.paged_attention_reference(q[:n], k, v, sub)
  err_paged = rel_err(paged[:n], ref)
  t_paged = timed_ms(paged_fn, q, k, v, view, None, FLAGS.reps, FLAGS.rounds)
  best = None
  for name in (FLAGS.configs if kind == "target" else FLAGS.sweep_configs):
    try:
      row = _bench_config(name, shape, shared, unique, batch, kind, q, k, v, view, tables,
                          lens, paged, ref, n, err_paged, t_paged)
    except Exception as e:  # noqa: BLE001 - one failing config must not lose the others
      print(f"FAILED {shape} {shared}:{unique}:{batch} {name}: {type(e).__name__}: {e}",
            flush=True)
      continue
    if best is None or row["dedup_ms"] < best["dedup_ms"]:
      best = row
  return best


def _bench_config(name, shape, shared, unique, batch, kind, q, k, v, view, tables, lens,
                  paged, ref, n, err_paged, t_paged):
  nh, nk, d = SHAPES[shape]
  bs = FLAGS.block_size
  cfg = CONFIGS[name]
  t0 = time.perf_counter()
  plan, summary = sharing.build_plan(tables, lens, bs,
                                     requests_per_tile=cfg.requests_per_tile(nh // nk))
  plan_ms = (time.perf_counter() - t0) * 1e3
  dd_fn = lambda q, k, v, view, plan, cfg=cfg: da.dedup_attention(
      q, k, v, view, plan, config=cfg, interpret=FLAGS.interpret)
  out = dd_fn(q, k, v, view, plan)
  assert not np.isnan(np.asarray(out, np.float32)).any(), "NaN in dedup output"
  err_ref, err_vs_paged = rel_err(out[:n], ref), rel_err(out, paged)
  max_abs = float(jnp.max(jnp.abs(out.astype(jnp.float32) - paged.astype(jnp.float32))))
  if err_ref > 2e-2:
    raise AssertionError(f"{shape} {shared}:{unique}:{batch} {name}: rel err {err_ref:.2e}")
  t = timed_ms(dd_fn, q, k, v, view, plan, FLAGS.reps, FLAGS.rounds)
  row = dict(kind=kind, shape=shape, shared=shared, unique=unique, batch=batch,
             config=name, paged_ms=round(t_paged, 4), dedup_ms=round(t, 4),
             speedup=round(t_paged / t, 2), ideal=round(summary.ideal_byte_ratio, 2),
             of_ideal=round(t_paged / t / summary.ideal_byte_ratio, 2),
             saved_tokens=summary.saved_tokens, plan_ms=round(plan_ms, 2),
             err_paged_vs_ref=f"{err_paged:.1e}", err_dedup_vs_ref=f"{err_ref:.1e}",
             err_dedup_vs_paged=f"{err_vs_paged:.1e}", max_abs_vs_paged=f"{max_abs:.1e}")
  print(row, flush=True)
  return row


def markdown(rows) -> str:
  cols = ["shape", "shared", "unique", "batch", "paged_ms", "dedup_ms", "speedup", "ideal",
          "of_ideal", "saved_tokens", "config", "err_dedup_vs_ref", "max_abs_vs_paged"]
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
  return "\n".join(lines)


def main(argv):
  del argv
  os.makedirs(FLAGS.output_dir, exist_ok=True)
  header = (f"{datetime.date.today()} jax {jax.__version__} {jax.devices()[0].device_kind}, "
            f"bf16, page {FLAGS.block_size}, median of {FLAGS.rounds} loops x {FLAGS.reps}")
  print(header, flush=True)
  rows = []
  parse = lambda p: tuple(int(x) for x in p.split(":"))
  for kind, points in (("target", FLAGS.points), ("sweep", FLAGS.sweep)):
    for point in points:
      for shape in FLAGS.shapes:
        row = bench_point(shape, *parse(point), kind, FLAGS.seed + len(rows))
        if row is not None:
          rows.append(row)
          write_csv(rows)
  write_csv(rows)
  # Auto threshold: the fewest saved tokens such that every point (any shape) saving at
  # least that many is >= 5% faster with dedup.
  saved = sorted({r["saved_tokens"] for r in rows if r["saved_tokens"] > 0})
  threshold = next((t for t in saved if all(r["speedup"] >= 1.05 for r in rows
                                            if r["saved_tokens"] >= t)), None)
  table = markdown(rows)
  text = f"{header}\n\n{table}\n\nauto threshold (saved tokens): {threshold}\n"
  with open(os.path.join(FLAGS.output_dir, "dedup_bench.md"), "w") as f:
    f.write(text)
  print(text, flush=True)


def write_csv(rows):
  if not rows:
    return
  with open(os.path.join(FLAGS.output_dir, "dedup_bench.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)


if __name__ == "__main__":
  app.run(main)
