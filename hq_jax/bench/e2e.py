"""End-to-end speed of the engine against its rooflines, measured in one run.

What the main job runs, timed as a user sees it: `Engine.decode` steps (host bookkeeping,
dispatch and device work, wall clock over a loop of steps with the last one synced) and
`Engine.prefill` (time to first token), on seeded weights at a Qwen2.5 shape. Beside each
time, the floor it is measured against, from ceilings measured in the same run:

  decode roofline = (parameter bytes + K/V bytes the step references) / XLA read rate,
                    the read rate of a jitted sum over a 2 GiB bfloat16 array (device time);
  prefill floor   = (the prefill's necessary FLOPs: 2 * non-embedding params * tokens, the
                    vocabulary projection of the last token, causal attention) / bf16
                    matmul peak,
                    with the peak from the datasheet-free in-run 8192^3 bf16 matmul.

Each decode point also reports the device time of one step without host work (steps run
back to back inside one jitted loop, pools donated), so a gap shows whether it is the host
or the device. K/V of the decode batch is random (its values do not change the
speed); the requests' bookkeeping is that of a real prefill (admit + commit). Outputs are
checked for finite logits only (the `finite` column); the kernels' numerics are checked
against their float32 references by kernel_bench and the compiled tests.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from hq_jax import config as config_lib
from hq_jax import mesh as mesh_lib
from hq_jax import model as model_lib
from hq_jax.serve.engine import DECODE_ROWS, Engine
from hq_jax.bench.timing import device_ms
from hq_jax.kv.dedup import DedupKVCache
from hq_jax.kv.dense import DenseKVCache
from hq_jax.kv.paged import KVLayout, KVPools, quantize


@dataclasses.dataclass(frozen=True)
class Ceilings:
  read_tb_s: float  # XLA reduction read rate, TB/s (device time)
  matmul_tflop_s: float  # bf16 matmul, TFLOP/s (device time)


def measure_ceilings(reps: int = 10, *, wall_clock: bool = False,
                     read_elements: int = 1 << 30, matmul_n: int = 8192) -> Ceilings:
  """In-run ceilings: a 2 GiB bf16 read and an 8192^3 bf16 matmul (random data; smaller
  sizes for a CPU smoke run)."""
  n = read_elements
  x = jax.random.normal(jax.random.key(1), (n,), jnp.bfloat16)
  ms = device_ms(lambda a: jnp.sum(a, dtype=jnp.float32), x, reps=reps, wall_clock=wall_clock)
  read = 2 * n / (ms * 1e-3) / 1e12
  del x
  m = matmul_n
  a = jax.random.normal(jax.random.key(2), (m, m), jnp.bfloat16)
  b = jax.random.normal(jax.random.key(3), (m, m), jnp.bfloat16)
  ms = device_ms(lambda a, b: a @ b, a, b, reps=reps, wall_clock=wall_clock)
  return Ceilings(read, 2 * m**3 / (ms * 1e-3) / 1e12)


def param_bytes(params) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))


def param_count(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))


def _random_pools(layout: KVLayout, num_blocks: int, seed: int, mesh=None) -> KVPools:
  """Normal K/V (FP8 layouts: quantized, with their scales); on `mesh`, made in place, each
  device its kv heads (a 32B pool never exists whole on one device)."""
  shape = layout.pool_shape(num_blocks)
  kk, kv = jax.random.split(jax.random.key(seed))
  out = {}
  if mesh is not None:
    sh = lambda spec: jax.sharding.NamedSharding(mesh, spec)
    out = dict(out_shardings=sh(mesh_lib.POOL_SPEC) if not layout.quantized else
               (sh(mesh_lib.POOL_SPEC), sh(mesh_lib.SCALE_SPEC)))
  if not layout.quantized:
    rand = jax.jit(lambda k: jax.random.normal(k, shape, layout.dtype), **out)
    return KVPools(rand(kk), rand(kv))
  rand = jax.jit(lambda k: quantize(jax.random.normal(k, shape, jnp.bfloat16)), **out)
  (k, ks), (v, vs) = rand(kk), rand(kv)
  return KVPools(k, v, ks, vs)


def decode_batch(cfg, *, backend: str, batch: int, context: int, shared_fraction: float,
                 steps: int, block_size: int, seed: int, kv_dtype: str | None = None,
                 mesh=None):
  """A cache holding `batch` requests of `context` tokens (the first shared_fraction of
  each shared, on HQ), bookkeeping as after prefill, K/V random (on `mesh`: split over its
  kv heads). Returns (cache, slots)."""
  layout = KVLayout.from_config(cfg, block_size, kv_dtype)
  rng = np.random.default_rng(seed)
  shared = int(context * shared_fraction) // block_size * block_size
  prefix = rng.integers(0, cfg.vocab_size, shared)
  max_seq = context + steps
  if backend == "dense":
    # Host-only first: the random pools below are the only K/V allocated.
    cache = DenseKVCache.init(layout, num_blocks=batch * layout.blocks_for(max_seq),
                              max_requests=batch, max_seq_len=max_seq, host_only=True)
  else:
    own = layout.blocks_for(max_seq) - shared // block_size
    cache = DedupKVCache.init(layout, num_blocks=shared // block_size + batch * own,
                              max_requests=batch, max_seq_len=max_seq, host_only=True)
  cache = dataclasses.replace(cache, pools=_random_pools(layout, cache.num_blocks, seed, mesh))
  slots = []
  for _ in range(batch):
    tokens = np.r_[prefix, rng.integers(0, cfg.vocab_size, context - shared)]
    cache, slot = cache.admit(tokens)
    cache = cache.commit(slot, context)  # as if prefilled: blocks registered, shareable
    slots.append(slot)
  return cache, slots


def bench_decode(engine: Engine, cache, slots, *, steps: int, ceilings: Ceilings,
                 reps: int) -> dict:
  """Wall time per decode step over `steps` steps, device time of one step, roofline."""
  cfg = engine.cfg
  layout = cache.layout
  tokens = [1] * len(slots)
  cache, out = engine.decode(cache, slots, tokens)  # compile
  jax.block_until_ready(out.logits)
  finite = bool(np.isfinite(np.asarray(out.logits)).all())
  t0 = time.perf_counter()
  for _ in range(steps):
    cache, out = engine.decode(cache, slots, tokens)
  jax.block_until_ready(out.logits)
  wall_ms = (time.perf_counter() - t0) / steps * 1e3
  kv_tokens = sum(int(cache.seq_lens[s]) + 1 for s in slots)
  kv_bytes = kv_tokens * layout.bytes_per_token
  pb = param_bytes(engine.params)
  # On a mesh: what one device reads (its weights, its kv heads of every block).
  tp = _tp(engine)
  pb_device = pb if tp == 1 else mesh_lib.param_bytes_per_device(cfg, tp)
  roofline_ms = (pb_device + kv_bytes / tp) / (ceilings.read_tb_s * 1e12) * 1e3
  # Device time of one step: the engine's jitted step (pools donated, as the engine runs
  # it: not donating would add a copy of the whole pool) on this step's view.
  lens = [int(cache.req_lens[s]) for s in slots]
  view, used = engine._decode_view(cache, slots, lens)
  step_tokens = jnp.ones((view.positions.shape[0], 1), jnp.int32)
  dev_ms, pools = _donated_step_ms(engine.params, cache.pools, step_tokens, view, cfg=cfg,
                                   attention_fn=engine._attention_fn, reps=reps,
                                   mesh=engine.mesh)
  cache = cache.with_pools(pools)
  return dict(wall_ms=wall_ms, device_ms=dev_ms, roofline_ms=roofline_ms,
              of_roofline_wall=roofline_ms / wall_ms, of_roofline_device=roofline_ms / dev_ms,
              param_gb=pb / 1e9, kv_gb=kv_bytes / 1e9, attention=used, finite=finite), cache


def _tp(engine: Engine) -> int:
  return mesh_lib.spec_of(engine.mesh).model


def _donated_step_ms(params, pools, tokens, view, *, cfg, attention_fn, reps: int,
                     mesh=None):
  """Device time (ms) of one engine step without host work: `reps` steps run back to back
  inside one jitted loop (pools carried and donated, as the engine runs them), timed by
  the wall clock once the result is ready, divided by reps. (CUPTI cannot time a donating
  call: its profiler runs the call twice on the same, by then donated, buffers.)"""
  step = functools.partial(model_lib.forward.__wrapped__, cfg=cfg, attention_fn=attention_fn,
                           **({} if mesh is None else dict(mesh=mesh)))

  def loop(params, pools):
    def body(_, carry):
      return step(params, carry[1], tokens, view)
    logits = jnp.zeros((tokens.shape[0], tokens.shape[1], cfg.vocab_size), jnp.float32)
    return jax.lax.fori_loop(0, reps, body, (logits, pools))

  loop = jax.jit(loop, donate_argnums=1, compiler_options=model_lib.STEP_COMPILER_OPTIONS)
  logits, pools = loop(params, pools)  # compile
  jax.block_until_ready(logits)
  t0 = time.perf_counter()
  logits, pools = loop(params, pools)
  jax.block_until_ready(logits)
  return (time.perf_counter() - t0) / reps * 1e3, pools


def prefill_flops(cfg, n_params: int, tokens: int) -> float:
  """The FLOPs a prefill must do: every weight matrix of the layers once per token, the
  vocabulary projection once (only the last token's prediction is needed), and causal
  attention (QK^T and PV). The embedding table (and an untied lm_head) is excluded from the
  per-token count: a lookup is no matmul, and the engine projects the last token only."""
  attn = 2 * 2 * cfg.num_layers * cfg.num_heads * cfg.head_dim * tokens * (tokens + 1) / 2
  vocab = cfg.vocab_size * cfg.hidden_size
  tables = vocab * (1 if cfg.tie_word_embeddings else 2)
  return 2 * (n_params - tables) * tokens + 2 * vocab + attn


def bench_prefill(engine: Engine, *, tokens: int, block_size: int, ceilings: Ceilings,
                  repeats: int, seed: int) -> dict:
  cfg = engine.cfg
  layout = KVLayout.from_config(cfg, block_size, engine.kv_dtype)
  rng = np.random.default_rng(seed)
  prompt = rng.integers(0, cfg.vocab_size, tokens)
  times = []
  finite = True
  for i in range(repeats + 1):  # the first run compiles
    cache = DenseKVCache.for_requests(layout, max_requests=1, max_seq_len=tokens)
    _, res = engine.prefill(cache, prompt, logits="last")
    finite &= bool(np.isfinite(np.asarray(res.last_logits)).all())
    if i:
      times.append(res.ttft_s * 1e3)
    del cache, res
  ttft = statistics.median(times)
  flops = prefill_flops(cfg, param_count(engine.params), tokens)
  peak = ceilings.matmul_tflop_s * _tp(engine)  # on a mesh: every device's peak
  return dict(ttft_ms=ttft, tflop_s=flops / (ttft * 1e-3) / 1e12,
              of_peak=flops / (ttft * 1e-3) / 1e12 / peak,
              floor_ms=flops / (peak * 1e12) * 1e3, finite=finite,
              chunk_size=engine.chunk_size)


def seeded_params(cfg, seed: int, mesh=None):
  """Seeded weights; on a mesh of model > 1, drawn in place shard by shard."""
  if mesh is None or int(mesh.shape["model"]) == 1:
    return model_lib.init_params(cfg, jax.random.key(seed))
  return mesh_lib.init_sharded_params(cfg, jax.random.key(seed), mesh)


def model_config(name: str, dtype: str):
  return config_lib.get_config(name, dtype=dtype)


def parse_points(specs, kind: str) -> list[tuple[str, int, int]]:
  """'7b:64x4096' (decode: model, batch, context) or '7b:16384' (prefill: model, tokens)."""
  out = []
  for spec in specs:
    try:
      model, rest = spec.split(":")
      if kind == "decode":
        batch, context = (int(x) for x in rest.lower().split("x"))
      else:
        batch, context = 1, int(rest)
      config_lib.get_config(model)
    except ValueError as e:
      raise ValueError(f"bad --{kind} point {spec!r} (want "
                       f"{'MODEL:BATCHxCONTEXT' if kind == 'decode' else 'MODEL:TOKENS'}): "
                       f"{e}") from None
    if batch <= 0 or context <= 1:
      raise ValueError(f"bad --{kind} point {spec!r}: sizes must be positive")
    out.append((model, batch, context))
  return out


COLUMNS = ("model", "mesh", "kind", "batch", "context", "backend", "kv_dtype", "attention",
           "decode_attention", "decode_rows", "invariance",
           "chunk_size", "wall_ms", "device_ms", "roofline_ms", "of_roofline_wall",
           "of_roofline_device", "ttft_ms", "tflop_s", "floor_ms", "of_peak", "param_gb",
           "kv_gb", "finite")


def run(*, decode_points, prefill_points, attention: str, dtype: str, steps: int, reps: int,
        prefill_repeats: int, chunk_sizes: dict[str, int], dedup_shared_fraction: float,
        block_size: int, seed: int, log=print, kv_dtype: str | None = None,
        decode_rows: tuple[int, ...] = (DECODE_ROWS,),
        mesh: str = "") -> tuple[Ceilings, list[dict]]:
  """Every point, shapes loaded once each; returns the in-run ceilings and the rows.
  kv_dtype: the K/V dtype (None: `dtype`; float8_e4m3fn: e4m3 with per-token scales).
  decode_rows: each decode point runs once per value (`Engine(decode_rows=)`: 0 is the
  bucketed opt-out), so the invariant step and the looser one are timed in one run.
  mesh: "model:M" (`hq_jax.mesh.MeshSpec`; one data shard): tensor parallel over M devices;
  rooflines and floors are then per device (its weights and kv heads; M devices' peak)."""
  spec = mesh_lib.MeshSpec.parse(mesh)
  if spec.data != 1:
    raise ValueError(f"--mesh={spec.label}: the e2e bench times one data shard (data:1); "
                     "data shards are independent copies")
  spec.check()
  device_mesh = None if spec.num_devices == 1 else spec.make()
  wall_clock = jax.default_backend() != "gpu"  # CUPTI exists only on the GPU
  small = dict(read_elements=1 << 22, matmul_n=512) if wall_clock else {}
  ceilings = measure_ceilings(reps, wall_clock=wall_clock, **small)
  log(f"ceilings: XLA read {ceilings.read_tb_s:.2f} TB/s, bf16 matmul "
      f"{ceilings.matmul_tflop_s:.0f} TFLOP/s")
  rows = []
  models = list(dict.fromkeys([m for m, _, _ in decode_points + prefill_points]))
  for name in models:
    cfg = model_config(name, dtype)
    spec.check(cfg)
    params = seeded_params(cfg, seed, device_mesh)
    chunk = chunk_sizes.get(name, chunk_sizes.get("*", 512))
    for model, batch, context in decode_points:
      if model != name:
        continue
      cases = [("dense", 0.0, "paged")]
      if dedup_shared_fraction > 0:
        cases += [("hq", dedup_shared_fraction, "paged"), ("hq", dedup_shared_fraction,
                                                            "dedup")]
      for (backend, frac, mode), rows_m in itertools.product(cases, decode_rows):
        engine = Engine(params, cfg, chunk_size=chunk, attention=attention,
                        decode_attention=mode, kv_dtype=kv_dtype, decode_rows=rows_m,
                        mesh=device_mesh)
        cache, slots = decode_batch(cfg, backend=backend, batch=batch, context=context,
                                    shared_fraction=frac, steps=steps + 2,
                                    block_size=block_size, seed=seed,
                                    kv_dtype=engine.kv_dtype, mesh=device_mesh)
        res, cache = bench_decode(engine, cache, slots, steps=steps, ceilings=ceilings,
                                  reps=reps)
        del cache
        row = dict(model=name, mesh=spec.label, kind="decode", batch=batch, context=context,
                   backend=f"{backend}{'' if not frac else f' {frac:.0%} shared'}",
                   kv_dtype=engine.kv_dtype, attention=engine.attention_label,
                   decode_attention=res.pop("attention"), decode_rows=rows_m,
                   invariance=engine.invariance, chunk_size=chunk, **res)
        rows.append(row)
        log(f"{name} decode {batch}x{context} {row['backend']} {row['decode_attention']} "
            f"({engine.invariance}, {rows_m} rows): "
            f"{row['wall_ms']:.2f} ms/step wall, {row['device_ms']:.2f} ms device, roofline "
            f"{row['roofline_ms']:.2f} ms -> {row['of_roofline_wall']:.2f} (wall), "
            f"{row['of_roofline_device']:.2f} (device)")
    for model, _, tokens in prefill_points:
      if model != name:
        continue
      # A timing at a shape (seeded weights): positions past the trained context cost the
      # same, so the context rule is waived explicitly here.
      engine = Engine(params, cfg, chunk_size=chunk, attention=attention,
                      allow_long_context=True, kv_dtype=kv_dtype, mesh=device_mesh)
      res = bench_prefill(engine, tokens=tokens, block_size=block_size, ceilings=ceilings,
                          repeats=prefill_repeats, seed=seed)
      row = dict(model=name, mesh=spec.label, kind="prefill", batch=1, context=tokens,
                 backend="dense",
                 kv_dtype=engine.kv_dtype, attention=engine.attention_label,
                 decode_attention="", decode_rows="", invariance=engine.invariance,
                 param_gb=param_bytes(params) / 1e9, **res)
      rows.append(row)
      log(f"{name} prefill {tokens}: TTFT {row['ttft_ms']:.1f} ms, {row['tflop_s']:.0f} "
          f"TFLOP/s = {row['of_peak']:.2f} of the in-run bf16 peak (chunk {chunk})")
    del params
  return ceilings, rows


def markdown(ceilings: Ceilings, rows: list[dict]) -> str:
  out = [f"In-run ceilings: XLA read {ceilings.read_tb_s:.2f} TB/s, bf16 matmul "
         f"{ceilings.matmul_tflop_s:.0f} TFLOP/s (one device).",
         *(f"Mesh {m}: rooflines and floors per device (its weights and kv heads; the "
           "peak of all its devices)." for m in dict.fromkeys(r["mesh"] for r in rows)
           if m != mesh_lib.MeshSpec().label), "",
         "| model | decode | backend | attention | step rows | ms/step (wall) | device ms "
         "| roofline ms | of roofline (wall) | of roofline (device) |",
         "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for r in rows:
    if r["kind"] == "decode":
      out.append(f"| {r['model']} | {r['batch']} x {r['context']} | {r['backend']} | "
                 f"{r['attention']}/{r['decode_attention']} | "
                 f"{r['decode_rows'] or 'bucketed'} | {r['wall_ms']:.2f} | "
                 f"{r['device_ms']:.2f} | {r['roofline_ms']:.2f} | {r['of_roofline_wall']:.2f}"
                 f" | {r['of_roofline_device']:.2f} |")
  out += ["", "| model | prefill tokens | chunk | TTFT ms | TFLOP/s | floor ms | of bf16 peak |",
          "| --- | --- | --- | --- | --- | --- | --- |"]
  for r in rows:
    if r["kind"] == "prefill":
      out.append(f"| {r['model']} | {r['context']} | {r['chunk_size']} | {r['ttft_ms']:.1f} | "
                 f"{r['tflop_s']:.0f} | {r['floor_ms']:.1f} | {r['of_peak']:.2f} |")
  return "\n".join(out) + "\n"
