"""Shared-prefix decode on the GPU: dedup attention vs our paged kernel on the same batch.

The measurement behind `scripts/kernel_bench.py --sections=shared` (issue #5). For one
(shared P, unique S, batch C) point and model shape: C requests hold the same P-token
prefix (one copy of its blocks, as in the HQ cache) and S private tokens each; one decode
step of one layer, page 16, bf16, blocks shuffled in the pool, random values. Timed:

  paged           our paged kernel on that batch (its default decode config);
  paged_unshared  the same kernel where every request holds its own copy of the prefix
                  (what non-shared decode reads, the baseline of FlashInfer's cascade and
                  Hydragen numbers); its output must equal `paged` to the bit, since the
                  logical content is the same (the kernel's placement independence);
  dedup           `dedup_attention` under each config of CONFIGS (best kept; "exact" is
                  bit-identical to `paged`, which max_abs_vs_paged = 0 shows);
  mosaic          (with `mosaic=True`, compiled GPU only) the Mosaic GPU kernel
                  `dedup_attention_mgpu` under each of MOSAIC_CONFIGS, best kept beside
                  the Triton one (the engine's dedup decode runs the Triton kernel).

Checks before timing: paged and dedup against the float32 reference on the first
`check_requests` requests (relative L2 < 2e-2), dedup against paged on all. Timing: device
time of every kernel one call launches (CUPTI: the XLA fusions around the kernels count),
median of `reps` calls after a warm-up call. Each call sees the same batch, so part of its
K/V may still be in L2 from the call before, for every variant alike. (A first version
timed `reps` calls inside one jitted fori_loop by wall clock: on the GPU that read
noticeably more per call than the kernels' device time, we infer the loop's own cost, which
swamped the small points.) Ideal = byte ratio
C (P + S) / (P + C S).
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from hq_jax import config
from hq_jax.bench.timing import device_ms, kernel_breakdown, rel_err
from hq_jax.kv import sharing
from hq_jax.kv.paged import AttentionView
from pallas_kernels import dedup_attention as da
from pallas_kernels import dedup_attention_mgpu as dam
from pallas_kernels import paged_attention as pa

def attention_shape(model: str) -> tuple[int, int, int]:
  """(query heads, kv heads, head_dim) of a preset (hq_jax.config), e.g. "qwen2.5-7b"."""
  cfg = config.get_config(model)
  return cfg.num_heads, cfg.num_kv_heads, cfg.head_dim


def kernel_args(view: AttentionView):
  """The kernels' plain arrays of a view: block tables, positions, lengths."""
  return view.block_tables, view.positions, view.kv_lens

# The dedup configs. "exact": the paged decode's own tiles (block_q 16, block_k 128, splits
# of 1024 keys), so the output is paged's to the bit: what the engine runs. "q64": 64-row
# shared tiles (9 requests at G = 7, not 2), exact only against a paged decode of the same
# tiles; it shows what raising the paged decode's block_q would buy.
CONFIGS = {
    "exact": da.TuningConfig(),
    "q64": da.TuningConfig(split=dataclasses.replace(pa.DEFAULT_DECODE, block_q=64)),
}
# The Mosaic GPU kernel's configs: one computing warpgroup, and two on twice the requests.
MOSAIC_CONFIGS = {"mgpu": dam.DEFAULT, "mgpu_ws2": dam.DEFAULT_WS}
COLUMNS = ("kind", "shape", "shared", "unique", "batch", "config", "paged_ms",
           "paged_unshared_ms", "dedup_ms", "speedup", "speedup_vs_unshared", "ideal",
           "of_ideal", "saved_tokens", "plan_ms", "err_paged_vs_ref", "err_dedup_vs_ref",
           "err_dedup_vs_paged", "max_abs_vs_paged", "all_configs_ms", "dedup_kernels_us",
           "paged_kernels_us", "mosaic_ms", "mosaic_config", "mosaic_speedup",
           "mosaic_of_ideal", "err_mosaic_vs_ref", "mosaic_all_configs_ms")


def make_batch(seed: int, shared: int, unique: int, batch: int, nh: int, nk: int, d: int,
               bs: int, *, dtype=jnp.bfloat16):
  """The shared batch and its unshared twin (the prefix copied once per request).

  Returns q, (k, v, view, tables, lens) shared, (k, v, view) unshared. Both pools hold the
  same logical K/V for every request, in shuffled blocks.
  """
  if shared % bs or unique % bs:
    raise ValueError(f"shared {shared} and unique {unique} must be multiples of the block "
                     f"size {bs}")
  ps, pu = shared // bs, unique // bs
  nb = ps + batch * pu
  rng = np.random.default_rng(seed)
  perm = rng.permutation(nb).astype(np.int32)
  tables = np.concatenate([np.broadcast_to(perm[:ps], (batch, ps)),
                           perm[ps:].reshape(batch, pu)], axis=1)
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(kq, (batch, 1, nh, d), dtype)
  k = jax.random.normal(kk, (nb, bs, nk, d), dtype)
  v = jax.random.normal(kv, (nb, bs, nk, d), dtype)
  lens = np.full((batch,), shared + unique, np.int32)

  def view_of(t):
    return AttentionView(positions=jnp.asarray(lens - 1)[:, None],
                         block_tables=jnp.asarray(t),
                         write_slots=jnp.zeros((batch, 1), jnp.int32),
                         kv_lens=jnp.asarray(lens))

  # Unshared twin: request b's blocks are copies at new, shuffled ids.
  nbu = batch * (ps + pu)
  new_ids = rng.permutation(nbu).astype(np.int32).reshape(batch, ps + pu)
  src = np.zeros((nbu,), np.int32)
  src[new_ids.reshape(-1)] = tables.reshape(-1)
  ku, vu = k[jnp.asarray(src)], v[jnp.asarray(src)]
  return (q, (k, v, view_of(tables), tables, lens), (ku, vu, view_of(new_ids)))


def bench_point(shape: str, shared: int, unique: int, batch: int, *, kind: str,
                configs: list[str], seed: int, block_size: int = 16, reps: int = 10,
                check_requests: int = 16, unshared: bool = True,
                interpret: bool = False, mosaic: bool = False, log=print) -> dict | None:
  """One row: the best dedup config's time beside paged (and paged on unshared copies);
  with `mosaic`, the best Mosaic GPU dedup config's too (mosaic_* columns)."""
  nh, nk, d = attention_shape(shape)
  bs = block_size
  q, (k, v, view, tables, lens), (ku, vu, viewu) = make_batch(
      seed, shared, unique, batch, nh, nk, d, bs)
  paged_fn = lambda q, k, v, view, plan: pa.paged_attention(q, k, v, *kernel_args(view),
                                                             interpret=interpret)
  paged = paged_fn(q, k, v, view, None)
  n = min(check_requests, batch)
  sub = AttentionView(view.positions[:n], view.block_tables[:n], view.write_slots[:n],
                      view.kv_lens[:n])
  ref = pa.paged_attention_reference(q[:n], k, v, *kernel_args(sub))
  err_paged = rel_err(paged[:n], ref)
  if not err_paged < 2e-2:
    raise AssertionError(f"{shape} {shared}:{unique}:{batch}: paged rel err {err_paged:.2e}")
  t_paged = device_ms(paged_fn, q, k, v, view, None, reps=reps, wall_clock=interpret)
  t_unshared = float("nan")
  if unshared:
    out_u = paged_fn(q, ku, vu, viewu, None)
    if not np.array_equal(np.asarray(out_u, np.float32), np.asarray(paged, np.float32)):
      raise AssertionError(f"{shape} {shared}:{unique}:{batch}: paged over unshared copies "
                           "differs from paged over the shared blocks (placement dependence)")
    t_unshared = device_ms(paged_fn, q, ku, vu, viewu, None, reps=reps, wall_clock=interpret)
  del ku, vu

  times, best, best_run = {}, None, None
  for name in configs:
    cfg = CONFIGS[name]
    try:
      t0 = time.perf_counter()
      plan, summary = sharing.build_plan(tables, lens, bs,
                                         requests_per_tile=cfg.requests_per_tile(nh // nk))
      plan_ms = (time.perf_counter() - t0) * 1e3
      dd_fn = lambda q, k, v, view, plan, cfg=cfg: da.dedup_attention(
          q, k, v, *kernel_args(view), plan, config=cfg, interpret=interpret)
      out = dd_fn(q, k, v, view, plan)
      if np.isnan(np.asarray(out, np.float32)).any():
        raise AssertionError("NaN in the dedup output")
      err_ref, err_vs_paged = rel_err(out[:n], ref), rel_err(out, paged)
      if not (err_ref < 2e-2 and err_vs_paged < 2e-2):
        raise AssertionError(f"rel err vs reference {err_ref:.2e}, vs paged {err_vs_paged:.2e}")
      max_abs = float(jnp.max(jnp.abs(out.astype(jnp.float32) - paged.astype(jnp.float32))))
      t = device_ms(dd_fn, q, k, v, view, plan, reps=reps, wall_clock=interpret)
    except Exception as e:  # noqa: BLE001 - one failing config must not lose the others
      log(f"FAILED {shape} {shared}:{unique}:{batch} {name}: {type(e).__name__}: {e}")
      continue
    times[name] = round(t, 4)
    if best is None or t < best["dedup_ms"]:
      best_run = (dd_fn, plan)
      best = dict(
          kind=kind, shape=shape, shared=shared, unique=unique, batch=batch, config=name,
          paged_ms=round(t_paged, 4), paged_unshared_ms=round(t_unshared, 4),
          dedup_ms=round(t, 4), speedup=round(t_paged / t, 2),
          speedup_vs_unshared=round(t_unshared / t, 2),
          ideal=round(summary.ideal_byte_ratio, 2),
          of_ideal=round(t_paged / t / summary.ideal_byte_ratio, 2),
          saved_tokens=summary.saved_tokens, plan_ms=round(plan_ms, 2),
          err_paged_vs_ref=f"{err_paged:.1e}", err_dedup_vs_ref=f"{err_ref:.1e}",
          err_dedup_vs_paged=f"{err_vs_paged:.1e}", max_abs_vs_paged=f"{max_abs:.1e}")
  if best is not None and mosaic and not interpret:
    best.update(_bench_mosaic(q, k, v, view, tables, lens, ref, n, nh // nk, bs, reps=reps,
                              ideal=summary.ideal_byte_ratio, paged_ms=t_paged, log=log))
  if best is not None:
    best["all_configs_ms"] = " ".join(f"{k}={v}" for k, v in times.items())
    if not interpret:
      dd_fn, plan = best_run
      best["dedup_kernels_us"] = kernel_breakdown(dd_fn, q, k, v, view, plan)
      best["paged_kernels_us"] = kernel_breakdown(
          lambda q, k, v, view: pa.paged_attention(q, k, v, *kernel_args(view)), q, k, v,
          view)
    log(str(best))
  return best


def _bench_mosaic(q, k, v, view, tables, lens, ref, n: int, group: int, bs: int, *,
                  reps: int, ideal: float, paged_ms: float, log=print) -> dict:
  """The mosaic_* columns: each Mosaic config checked against the reference, timed."""
  times, best = {}, {}
  for name, cfg in MOSAIC_CONFIGS.items():
    try:
      plan, _ = sharing.build_plan(tables, lens, bs,
                                   requests_per_tile=cfg.requests_per_tile(group))
      fn = lambda q, k, v, view, plan, cfg=cfg: dam.dedup_attention_mgpu(
          q, k, v, *kernel_args(view), plan, config=cfg)
      out = fn(q, k, v, view, plan)
      err = rel_err(out[:n], ref)
      if not err < 2e-2:
        raise AssertionError(f"rel err vs reference {err:.2e}")
      t = device_ms(fn, q, k, v, view, plan, reps=reps)
    except Exception as e:  # noqa: BLE001 - one failing config must not lose the others
      log(f"FAILED mosaic {name}: {type(e).__name__}: {str(e)[:300]}")
      continue
    times[name] = round(t, 4)
    if not best or t < best["mosaic_ms"]:
      best = dict(mosaic_ms=round(t, 4), mosaic_config=name,
                  mosaic_speedup=round(paged_ms / t, 2),
                  mosaic_of_ideal=round(paged_ms / t / ideal, 2),
                  err_mosaic_vs_ref=f"{err:.1e}")
  best["mosaic_all_configs_ms"] = " ".join(f"{k}={v}" for k, v in times.items())
  return best


def auto_threshold(rows: list[dict], min_speedup: float = 1.05) -> int | None:
  """Fewest saved tokens such that every measured point saving at least that many (any
  shape) is `min_speedup` faster with dedup; None if no such point."""
  saved = sorted({r["saved_tokens"] for r in rows if r["saved_tokens"] > 0})
  return next((t for t in saved
               if all(r["speedup"] >= min_speedup for r in rows if r["saved_tokens"] >= t)),
              None)


def markdown(rows: list[dict]) -> str:
  cols = ["shape", "shared", "unique", "batch", "paged_ms", "paged_unshared_ms", "dedup_ms",
          "speedup", "speedup_vs_unshared", "ideal", "of_ideal", "saved_tokens", "config",
          "err_dedup_vs_ref", "max_abs_vs_paged"]
  if any("mosaic_ms" in r for r in rows):
    cols += ["mosaic_ms", "mosaic_speedup", "mosaic_of_ideal", "mosaic_config"]
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
  return "\n".join(lines)
