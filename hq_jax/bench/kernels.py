"""Paged attention on the GPU: our Pallas kernels vs the stock JAX kernel vs the XLA path.

The logic behind `scripts/kernel_bench.py` (arguments explicit, so a notebook can call it).

Decode, per shape (a preset of hq_jax.config: its query heads, kv heads and head_dim; page
16, bf16) and batch x context: every variant is first checked against the float32
reference on fresh random inputs, then timed with CUPTI (device time of all kernels the call
launches, median of `reps` after warm-up). Each timed call runs two independent request
sets over disjoint halves of the pool, so no call finds its K/V in L2. Effective bandwidth =
bytes of K/V referenced + q + out, over time. "ours" is the Triton-lowered kernel the engine
runs; "mosaic" our Mosaic GPU kernel of the same interface (`paged_attention_mgpu.py`,
default config).

Prefill: our kernels (Triton "ours", Mosaic GPU "mosaic": `paged_prefill_mgpu.py`) on one
chunk of N causal tokens (block tables, GQA rows) vs JAX's Mosaic GPU `attention_mgpu`
(contiguous, causal, float16 in JAX 0.11.2) on the same N.

Shared prefix (issue #5): per (shared, unique, batch) point, the dedup kernel (Triton; the
Mosaic GPU one in the mosaic_* columns) vs our paged kernel on the same batch, and paged on
unshared copies of the prefix; the ratio beside the ideal byte ratio C (P + S) / (P + C S).
Method in `hq_jax/bench/shared_prefix.py`.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import time
import warnings

import jax
import jax.numpy as jnp

from hq_jax.bench import shared_prefix
from hq_jax.bench.timing import device_ms, kernel_breakdown, rel_err
from hq_jax.bench.shared_prefix import attention_shape, kernel_args
from hq_jax.kv.paged import FP8, AttentionView, paged_attention_xla, quantize
from pallas_kernels import paged_attention as pa
from pallas_kernels import paged_attention_mgpu as pam
from pallas_kernels import paged_prefill_mgpu as ppm

warnings.filterwarnings("ignore", category=DeprecationWarning)

SECTIONS = ("decode", "prefill", "shared")
# K/V dtypes of our Triton kernels' rows: FP8 rows ("ours_fp8") beside the bf16 ones, same
# inputs quantized (e4m3 and a float32 scale per token and kv head), checked against the
# float32 reference over the dequantized values.
KV_DTYPES = ("bfloat16", FP8)


def _fp8_bytes(nbytes_bf16_kv: int, head_dim: int) -> int:
  """bf16 K/V bytes -> FP8's: half the values plus a 4-byte scale per head_dim of them."""
  return nbytes_bf16_kv // 2 + nbytes_bf16_kv // (2 * head_dim) * 4


def _with_view(kernel):
  """A kernel of plain arrays called as fn(q, k, v, view) (the timing helpers' form)."""
  return lambda q, k, v, view: kernel(q, k, v, *kernel_args(view))


# Small tuning grids (best median wins); every config is checked before it is timed.
# The last decode config: 64-row tiles, what paged decode would cost if its tiles were the
# shared-prefix kernel's "q64" (which is bit-exact only against a paged decode of its tiles).
OUR_DECODE_GRID = [pa.TuningConfig(block_q=bq, block_k=bk, kv_split=ks, num_warps=w,
                                   num_stages=st)
                   for bq, bk, ks, w, st in [(16, 128, None, 4, 3), (16, 128, 512, 4, 3),
                                             (16, 128, 1024, 4, 3), (16, 128, 2048, 4, 3),
                                             (16, 64, 1024, 4, 3), (16, 256, 2048, 8, 3),
                                             (64, 128, 1024, 4, 3)]]
OUR_PREFILL_GRID = [pa.TuningConfig(block_q=bq, block_k=bk, kv_split=None, num_warps=w,
                                    num_stages=st)
                    for bq, bk, w, st in [(64, 64, 4, 3), (64, 128, 4, 3), (128, 64, 8, 3),
                                          (128, 128, 8, 3)]]
STOCK_GRID = [dict(block_h=16, pages_per_compute_block=p, k_splits=s, num_warps=4,
                   num_stages=2) for p, s in itertools.product((8, 16), (1, 4, 16))]


@dataclasses.dataclass
class DecodeCase:
  q: jax.Array  # [B, 1, H, D]
  k: jax.Array  # [num_blocks, bs, K, D]
  v: jax.Array
  views: tuple[AttentionView, AttentionView]  # two disjoint sets of blocks

  @property
  def bytes(self) -> int:
    b, _, nh, d = self.q.shape
    kv = 2 * int(self.views[0].kv_lens.sum()) * self.k.shape[2] * d * self.k.dtype.itemsize
    return kv + 2 * b * nh * d * self.q.dtype.itemsize


def make_decode(key, batch, context, nh, nk, d, bs, dtype=jnp.bfloat16) -> DecodeCase:
  mb = context // bs
  nb = 2 * batch * mb
  kq, kk, kv, kp = jax.random.split(key, 4)
  q = jax.random.normal(kq, (batch, 1, nh, d), dtype)
  k = jax.random.normal(kk, (nb, bs, nk, d), dtype)
  v = jax.random.normal(kv, (nb, bs, nk, d), dtype)
  perm = jax.random.permutation(kp, nb).astype(jnp.int32).reshape(2, batch, mb)
  lens = jnp.full((batch,), context, jnp.int32)
  views = tuple(AttentionView(positions=(lens - 1)[:, None], block_tables=perm[i],
                              write_slots=jnp.zeros((batch, 1), jnp.int32), kv_lens=lens)
                for i in range(2))
  return DecodeCase(q, k, v, views)


def _pair(fn):
  """Runs fn on both views (disjoint K/V), so a timed call never hits L2."""
  return jax.jit(lambda q, k, v, va, vb: (fn(q, k, v, va), fn(q, k, v, vb)))


def _stock_fn(cfg):
  from jax.experimental.pallas.ops.gpu import paged_attention as stock

  def fn(q, k_pages, v_pages, view):  # stock layout: [K, num_blocks, bs, D], q [B, H, D]
    d = q.shape[-1]
    return stock.paged_attention((q[:, 0] * d ** -0.5).astype(q.dtype), k_pages, v_pages,
                                 view.block_tables, view.kv_lens, **cfg)[:, None]
  return fn


def bench_decode(shape: str, batch: int, context: int, key, rows: list[dict], *,
                 block_size: int = 16, reps: int = 20, stock: bool = True, xla: bool = True,
                 kv_dtypes=("bfloat16",)):
  nh, nk, d = attention_shape(shape)
  kc, kt = jax.random.split(key)
  check = make_decode(kc, batch, context, nh, nk, d, block_size)
  ref = jax.jit(_with_view(pa.paged_attention_reference))(check.q, check.k, check.v,
                                                         check.views[0])
  case = make_decode(kt, batch, context, nh, nk, d, block_size)
  base = dict(shape=shape, mode="decode", batch=batch, context=context,
              bytes=case.bytes, flops=4 * batch * context * nh * d)

  def run(name, fn, cfg, k, v, check_kv, ref=ref, nbytes=case.bytes):
    try:
      err = rel_err(jax.jit(fn)(check.q, *check_kv, check.views[0]), ref)
      if not err < 2e-2:
        raise AssertionError(f"relative error {err:.3g} vs the float32 reference")
      ms = device_ms(_pair(fn), case.q, k, v, *case.views, reps=reps) / 2
      row = dict(base, kernel=name, config=str(cfg), rel_err=err, time_us=ms * 1e3,
                 bytes=nbytes, tb_s=nbytes / (ms * 1e-3) / 1e12, error="")
    except Exception as e:  # noqa: BLE001 - a failed variant is a row, not a crash
      row = dict(base, kernel=name, config=str(cfg), error=f"{type(e).__name__}: {e}"[:300])
    rows.append(row)
    print(f"  {name:8s} {row.get('time_us', float('nan')):10.1f} us "
          f"{row.get('tb_s', float('nan')):6.3f} TB/s err={row.get('rel_err', float('nan')):.2e}"
          f" {cfg} {row['error'][:200]}", flush=True)

  for cfg in OUR_DECODE_GRID:
    run("ours", _with_view(functools.partial(pa.paged_attention, config=cfg)), cfg, case.k,
        case.v,
        (check.k, check.v))
  ours = [r for r in rows[-len(OUR_DECODE_GRID):] if not r["error"]]
  if ours:  # where the best config's time goes, kernel by kernel (attention vs merge)
    best = min(ours, key=lambda r: r["time_us"])
    cfg = next(c for c in OUR_DECODE_GRID if str(c) == best["config"])
    best["kernels"] = kernel_breakdown(
        _pair(_with_view(functools.partial(pa.paged_attention, config=cfg))), case.q, case.k,
        case.v, *case.views, calls=2, reps=reps)
    print(f"    kernels of the best ({cfg}), per call: {best['kernels']}", flush=True)
  if FP8 in kv_dtypes:  # the same kernels on FP8 pools: (values, scales) as one argument
    q8 = jax.jit(quantize)
    fp8 = lambda c: tuple(zip(q8(c.k), q8(c.v)))  # ((k, v) values, (k, v) scales)
    (ck, cv), (cks, cvs) = fp8(check)
    (tk, tv), (tks, tvs) = fp8(case)
    ref8 = jax.jit(lambda q, view: pa.paged_attention_reference(
        q, ck, cv, *kernel_args(view), k_scale=cks, v_scale=cvs))(check.q, check.views[0])
    q_bytes = 2 * batch * nh * d * check.q.dtype.itemsize
    nbytes = _fp8_bytes(case.bytes - q_bytes, d) + q_bytes
    for cfg in OUR_DECODE_GRID:
      def fn(q, kv, ks, view, cfg=cfg):  # kv = (k, v) values, ks = (k, v) scales
        return pa.paged_attention(q, *kv, *kernel_args(view), k_scale=ks[0], v_scale=ks[1],
                                  config=cfg)
      run("ours_fp8", fn, cfg, (tk, tv), (tks, tvs), ((ck, cv), (cks, cvs)), ref=ref8,
          nbytes=nbytes)
    del tk, tv, tks, tvs
  # Our Mosaic GPU decode kernel (default config): pools with a layer axis of 1 (free).
  run("mosaic", lambda q, k, v, view: pam.paged_decode_attention_mgpu(
      q, k[None], v[None], *kernel_args(view)), "default", case.k, case.v, (check.k, check.v))
  if stock:
    to_stock = jax.jit(lambda p: p.transpose(2, 0, 1, 3))
    sk, sv = to_stock(case.k), to_stock(case.v)
    ck, cv = to_stock(check.k), to_stock(check.v)
    for cfg in STOCK_GRID:
      if (context // block_size) % (cfg["k_splits"] * cfg["pages_per_compute_block"]):
        continue
      run("stock", _stock_fn(cfg), cfg, sk, sv, (ck, cv))
    del sk, sv, ck, cv
  if xla:
    run("xla", lambda q, k, v, view: paged_attention_xla(q, k, v, None, view).astype(q.dtype),
        "gather",
        case.k, case.v, (check.k, check.v))


def make_prefill(key, n, nh, nk, d, bs, dtype):
  kq, kk, kv, kp = jax.random.split(key, 4)
  q = jax.random.normal(kq, (1, n, nh, d), dtype)
  k = jax.random.normal(kk, (1, n, nk, d), dtype)
  v = jax.random.normal(kv, (1, n, nk, d), dtype)
  mb = n // bs
  perm = jax.random.permutation(kp, mb).astype(jnp.int32)
  inv = jnp.argsort(perm)  # physical block inv[i] holds logical block i
  to_pool = lambda x: x[0].reshape(mb, bs, nk, d)[perm]  # pool[j] = logical block perm[j]
  view = AttentionView(positions=jnp.arange(n, dtype=jnp.int32)[None],
                       block_tables=inv.astype(jnp.int32)[None],
                       write_slots=jnp.zeros((1, n), jnp.int32),
                       kv_lens=jnp.full((1,), n, jnp.int32))
  return q, k, v, to_pool(k), to_pool(v), view


def bench_prefill(shape: str, n: int, key, rows: list[dict], *, block_size: int = 16,
                  check_tokens: int = 2048, reps: int = 20, kv_dtypes=("bfloat16",)):
  from jax.experimental.pallas.ops.gpu import attention_mgpu as mgpu
  nh, nk, d = attention_shape(shape)
  bs, nc = block_size, check_tokens
  flops = 4 * n * n // 2 * nh * d  # causal: half of the QK^T and PV products
  base = dict(shape=shape, mode="prefill", batch=1, context=n, flops=flops,
              bytes=2 * n * (nh + nk) * d * 2)
  kc, kt = jax.random.split(key)

  def run(name, fn, cfg, dtype, ref_fn, prepare=lambda *args: args):
    # prepare: the inputs' form for fn and ref_fn (FP8: pools quantized), made untimed.
    try:
      args = prepare(*make_prefill(kc, nc, nh, nk, d, bs, dtype))
      err = rel_err(fn(*args), ref_fn(*args))
      if not err < 2e-2:
        raise AssertionError(f"relative error {err:.3g} vs the float32 reference")
      args = prepare(*make_prefill(kt, n, nh, nk, d, bs, dtype))
      ms = device_ms(jax.jit(fn), *args, reps=max(3, reps // 4))
      row = dict(base, kernel=name, config=str(cfg), rel_err=err, time_us=ms * 1e3,
                 tflop_s=flops / (ms * 1e-3) / 1e12, error="")
    except Exception as e:  # noqa: BLE001
      row = dict(base, kernel=name, config=str(cfg), error=f"{type(e).__name__}: {e}"[:300])
    rows.append(row)
    print(f"  {name:8s} {row.get('time_us', float('nan')):10.1f} us "
          f"{row.get('tflop_s', float('nan')):6.1f} TFLOP/s {cfg} {row['error'][:200]}",
          flush=True)

  ours_ref = jax.jit(lambda q, k, v, kp, vp, view: pa.paged_attention_reference(
      q, kp, vp, *kernel_args(view)))
  for cfg in OUR_PREFILL_GRID:
    run("ours", jax.jit(lambda q, k, v, kp, vp, view, cfg=cfg: pa.paged_attention(
        q, kp, vp, *kernel_args(view), config=cfg)), cfg, jnp.bfloat16, ours_ref)
  if FP8 in kv_dtypes:  # the same kernels on FP8 pools (quantized before the timed call)
    q8 = jax.jit(quantize)
    prepare = lambda q, k, v, kp, vp, view: (q, *q8(kp), *q8(vp), view)
    ref8 = jax.jit(lambda q, kq, ks, vq, vs, view: pa.paged_attention_reference(
        q, kq, vq, *kernel_args(view), k_scale=ks, v_scale=vs))
    for cfg in OUR_PREFILL_GRID:
      run("ours_fp8", jax.jit(lambda q, kq, ks, vq, vs, view, cfg=cfg: pa.paged_attention(
          q, kq, vq, *kernel_args(view), k_scale=ks, v_scale=vs, config=cfg)), cfg,
          jnp.bfloat16, ref8, prepare)
  mos_cfg = ppm.tuned_config(d)  # the engine's config
  run("mosaic", jax.jit(lambda q, k, v, kp, vp, view: ppm.paged_prefill_attention_mgpu(
      q, kp[None], vp[None], *kernel_args(view), config=mos_cfg)), mos_cfg, jnp.bfloat16,
      ours_ref)
  mgpu_ref = jax.jit(lambda q, k, v, kp, vp, view: mgpu.attention_reference(q, k, v,
                                                                           causal=True))
  for bkv in (64, 128):
    cfg = mgpu.TuningConfig(block_q=64, block_kv=bkv, max_concurrent_steps=2, causal=True)
    run("mgpu", jax.jit(lambda q, k, v, kp, vp, view, cfg=cfg: mgpu.attention(
        q, k, v, cfg)), cfg, jnp.float16, mgpu_ref)


def best_rows(rows):
  best = {}
  for r in rows:
    if r["error"]:
      continue
    key = (r["shape"], r["mode"], r["batch"], r["context"], r["kernel"])
    if key not in best or r["time_us"] < best[key]["time_us"]:
      best[key] = r
  return best


def markdown(rows) -> str:
  best = best_rows(rows)
  out = ["| shape | batch x context | ours (us) | ours TB/s | Mosaic (us) | Mosaic TB/s | "
         "stock (us) | stock TB/s | XLA (us) | XLA TB/s | ours / stock | ours vs 3.4 TB/s |",
         "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  cases = sorted({k[:4] for k in best if k[1] == "decode"}, key=lambda k: (k[0], -k[2]))
  for shape, _, b, c in cases:
    get = lambda kernel: best.get((shape, "decode", b, c, kernel))
    ours, mosaic, stock, xla = get("ours"), get("mosaic"), get("stock"), get("xla")
    f = lambda r, k, fmt: format(r[k], fmt) if r else "n/a"
    speedup = f"{stock['time_us'] / ours['time_us']:.2f}x" if ours and stock else "n/a"
    target = f"{ours['tb_s'] / 3.4:.0%}" if ours else "n/a"
    out.append(f"| {shape} | {b}x{c} | {f(ours, 'time_us', '.1f')} | {f(ours, 'tb_s', '.2f')} "
               f"| {f(mosaic, 'time_us', '.1f')} | {f(mosaic, 'tb_s', '.2f')} "
               f"| {f(stock, 'time_us', '.1f')} | {f(stock, 'tb_s', '.2f')} | "
               f"{f(xla, 'time_us', '.1f')} | {f(xla, 'tb_s', '.2f')} | {speedup} | {target} |")
  pre = sorted({k[:4] for k in best if k[1] == "prefill"})
  if pre:
    out += ["", "| shape | causal tokens | ours (us) | ours TFLOP/s | Mosaic (us) | "
            "Mosaic TFLOP/s | attention_mgpu (us) | mgpu TFLOP/s | ours / mgpu time | "
            "Mosaic / mgpu time |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for shape, _, b, c in pre:
      ours, mos, mg = (best.get((shape, "prefill", b, c, k)) for k in ("ours", "mosaic", "mgpu"))
      f = lambda r, k, fmt: format(r[k], fmt) if r else "n/a"
      ratio = lambda a: f"{a['time_us'] / mg['time_us']:.2f}" if a and mg else "n/a"
      out.append(f"| {shape} | {c} | {f(ours, 'time_us', '.0f')} | {f(ours, 'tflop_s', '.0f')} "
                 f"| {f(mos, 'time_us', '.0f')} | {f(mos, 'tflop_s', '.0f')} "
                 f"| {f(mg, 'time_us', '.0f')} | {f(mg, 'tflop_s', '.0f')} | {ratio(ours)} | "
                 f"{ratio(mos)} |")
  fp8 = sorted({k[:4] for k in best if k[4] == "ours_fp8"})
  if fp8:  # the acceptance ratios of issue 27: FP8 over bf16, best config each, same run
    out += ["", "| shape | mode | batch x context | ours bf16 (us) | ours FP8 (us) | FP8 / bf16 "
            "| FP8 TB/s or TFLOP/s |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for shape, mode, b, c in fp8:
      bf, f8 = (best.get((shape, mode, b, c, k)) for k in ("ours", "ours_fp8"))
      rate = f"{f8['tb_s']:.2f}" if mode == "decode" else f"{f8['tflop_s']:.0f}"
      ratio = f"{f8['time_us'] / bf['time_us']:.2f}" if bf else "n/a"
      out.append(f"| {shape} | {mode} | {b}x{c} | {bf['time_us'] if bf else float('nan'):.1f} "
                 f"| {f8['time_us']:.1f} | {ratio} | {rate} |")
  out += ["", "Best configs:", ""]
  out += [f"- {k[0]} {k[1]} {k[2]}x{k[3]} {k[4]}: `{r['config']}`" for k, r in best.items()]
  split = [(k, r) for k, r in best.items() if r.get("kernels")]
  if split:
    out += ["", "Device time per kernel of our best decode config (CUPTI, median, per call):",
            ""]
    out += [f"- {k[0]} {k[2]}x{k[3]}: {r['kernels']}" for k, r in split]
  return "\n".join(out) + "\n"


FIELDS = ["shape", "mode", "batch", "context", "kernel", "config", "time_us", "tb_s",
          "tflop_s", "rel_err", "bytes", "flops", "error", "kernels"]


OUTPUTS = ["kernel_bench.csv", "kernel_bench.md", "kernel_bench_shared.csv"]


def _header() -> str:
  return f"{time.strftime('%Y-%m-%d')} on {jax.devices()[0].device_kind}, JAX {jax.__version__}\n\n"


def write(rows, run, shared_text: str = "") -> None:
  """The rows so far (rewritten after every point, so a cut run keeps what it measured)."""
  run.write_csv("kernel_bench.csv", [{k: r.get(k) for k in FIELDS} for r in rows], FIELDS)
  run.write_text("kernel_bench.md", _header() + (markdown(rows) if rows else "")
                 + ("\n" + shared_text if shared_text else ""))


def bench_shared(run, *, points, sweep, shapes, configs, seed: int,
                 block_size: int, reps: int, check_requests: int) -> str:
  """Shared-prefix section: dedup vs paged per point and shape; CSV + Markdown text."""
  rows = []
  parse = lambda p: tuple(int(x) for x in p.split(":"))
  for kind, kind_points in (("target", points), ("sweep", sweep)):
    for point in kind_points:
      for shape in shapes:
        print(f"{shape} shared {point} ({kind})", flush=True)
        try:
          row = shared_prefix.bench_point(
              shape, *parse(point), kind=kind, configs=configs, seed=seed + len(rows),
              block_size=block_size, reps=reps, check_requests=check_requests,
              mosaic=True, log=lambda m: print("   ", m, flush=True))
        except Exception as e:  # noqa: BLE001 - a failing point is reported, not fatal
          print(f"    FAILED: {type(e).__name__}: {e}", flush=True)
          continue
        if row is not None:
          rows.append(row)
          run.write_csv("kernel_bench_shared.csv",
                        [{k: r.get(k) for k in shared_prefix.COLUMNS} for r in rows],
                        shared_prefix.COLUMNS)
  threshold = shared_prefix.auto_threshold(rows)
  text = ("## Shared-prefix decode: dedup vs paged (device time per call, ms)\n\n"
          + shared_prefix.markdown(rows)
          + f"\n\nauto threshold (fewest saved tokens from which every point is >= 1.05x): "
          f"{threshold}\n\nKernels per call (CUPTI, median):\n\n"
          + "\n".join(f"- {r['shape']} {r['shared']}:{r['unique']}:{r['batch']} dedup "
                       f"{r['config']}: {r.get('dedup_kernels_us')}; paged: "
                       f"{r.get('paged_kernels_us')}" for r in rows) + "\n")
  print(text, flush=True)
  return text


def check_args(*, shapes, sections=SECTIONS, shared_configs=()) -> None:
  """Refuses unknown sections, shared configs and shapes, before any work."""
  unknown = set(sections) - set(SECTIONS)
  if unknown:
    raise ValueError(f"unknown sections {sorted(unknown)}; use {', '.join(SECTIONS)}")
  bad = [c for c in shared_configs if c not in shared_prefix.CONFIGS]
  if bad:
    raise ValueError(f"unknown shared configs {bad}; known: {', '.join(shared_prefix.CONFIGS)}")
  for shape in shapes:
    attention_shape(shape)  # an unknown preset fails here, before any work


def run(out, *, shapes, cases, sections=SECTIONS, prefill_tokens=(32768,),
        block_size: int = 16, reps: int = 20, seed: int = 0, stock: bool = True,
        xla: bool = True, prefill_check_tokens: int = 2048, shared_points=(),
        shared_sweep=(), shared_configs=(), shared_check_requests: int = 16,
        log=print, kv_dtypes=KV_DTYPES) -> list[dict]:
  """Every section asked for, written to `out` (a study `outputs.Run`: its write_csv /
  write_text) after every point as kernel_bench.csv/.md and kernel_bench_shared.csv."""
  check_args(shapes=shapes, sections=sections, shared_configs=shared_configs)
  log(f"jax {jax.__version__} on {jax.devices()[0].device_kind}")
  key = jax.random.key(seed)
  rows: list[dict] = []
  for shape in shapes:
    for batch, context in cases if "decode" in sections else ():
      log(f"{shape} decode {batch}x{context}")
      key, sub = jax.random.split(key)
      bench_decode(shape, batch, context, sub, rows, block_size=block_size, reps=reps,
                   stock=stock, xla=xla, kv_dtypes=kv_dtypes)
      write(rows, out)
    for n in prefill_tokens if "prefill" in sections else ():
      log(f"{shape} prefill {n}")
      key, sub = jax.random.split(key)
      bench_prefill(shape, int(n), sub, rows, block_size=block_size,
                    check_tokens=prefill_check_tokens, reps=reps, kv_dtypes=kv_dtypes)
      write(rows, out)
  if rows:
    log(markdown(rows))
  if "shared" in sections:
    text = bench_shared(out, points=shared_points, sweep=shared_sweep, shapes=shapes,
                        configs=shared_configs, seed=seed, block_size=block_size, reps=reps,
                        check_requests=shared_check_requests)
    write(rows, out, text)
  return rows
