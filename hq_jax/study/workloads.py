"""Named workloads beyond the grid, on both backends: reuse factor, memory, prompt hits.

  system_prompt  users share one system prompt, each with their own turn (concurrent);
  few_shot       requests share the same examples, each with its own question (concurrent);
  multi_turn     one conversation, each turn extending the previous; a turn's request is
                 released when the next arrives, so reuse comes from cached blocks.
Memory columns are the peak over the run (after each admission).
"""

from __future__ import annotations

from hq_jax.config import ModelConfig
from hq_jax.study import requests as wl
from hq_jax.serve.engine import Engine
from hq_jax.study.errors import HarnessError, check_context_limit
from hq_jax.study.memory import make_cache
from hq_jax.kv.paged import KVLayout
from hq_jax.kv.stats import kv_stats

COLUMNS = ("workload", "backend", "model", "requests", "prompt_tokens", "kv_bytes_allocated",
           "kv_bytes_used", "physical_blocks", "logical_blocks", "reuse_factor", "hit_tokens",
           "query_tokens", "hit_rate", "computed_tokens", "metadata_bytes", "attention",
           "kv_dtype")
WORKLOADS = ("system_prompt", "few_shot", "multi_turn")
# Smallest valid value of each size (a system prompt may be empty; everything else not).
SIZE_MINIMUM = {"users": 1, "system_tokens": 0, "user_tokens": 1, "examples": 1,
                "example_tokens": 1, "turns": 1}


def check_sizes(sizes: dict) -> None:
  """Refuses a missing or too small workload size, naming its flag."""
  for name, minimum in SIZE_MINIMUM.items():
    if name not in sizes:
      raise ValueError(f"workload size --{name} is missing")
    if not isinstance(sizes[name], int) or sizes[name] < minimum:
      raise ValueError(f"--{name} must be an integer >= {minimum}, got {sizes[name]!r}")


def check_row(row: dict) -> None:
  """Raises HarnessError for a workload row whose numbers contradict each other."""
  if row["workload"] not in WORKLOADS or row["backend"] not in ("dense", "hq"):
    raise HarnessError(f"workload {row['workload']!r} / backend {row['backend']!r} is not one "
                       f"of {', '.join(WORKLOADS)} / dense, hq")
  where = f"{row['workload']} {row['backend']} row"
  derived = {"reuse_factor": round(row["logical_blocks"] / row["physical_blocks"], 6)
                             if row["physical_blocks"] else 1.0,
             "hit_rate": round(row["hit_tokens"] / row["query_tokens"], 6),
             "query_tokens": row["prompt_tokens"]}
  for column, value in derived.items():
    if row[column] != value:
      raise HarnessError(f"{where}: {column} {row[column]} is not {value}, what the row's own "
                         "blocks and token counts give")
  if row["kv_bytes_used"] > row["kv_bytes_allocated"]:
    raise HarnessError(f"{where}: kv_bytes_used {row['kv_bytes_used']} exceeds "
                       f"kv_bytes_allocated {row['kv_bytes_allocated']}")
  if row["hit_tokens"] > row["query_tokens"] or row["computed_tokens"] > row["prompt_tokens"]:
    raise HarnessError(f"{where}: hit_tokens/query_tokens {row['hit_tokens']}/"
                       f"{row['query_tokens']} or computed_tokens/prompt_tokens "
                       f"{row['computed_tokens']}/{row['prompt_tokens']} exceed their total")
  if row["backend"] == "dense" and (row["reuse_factor"] != 1.0 or row["hit_tokens"]):
    raise HarnessError(f"{where}: the dense cache never shares, yet reuse_factor "
                       f"{row['reuse_factor']}, hit_tokens {row['hit_tokens']}")


def check_rows(rows, config: dict) -> None:
  """Raises HarnessError unless `rows` are exactly the workloads a run of `config` (a
  memory-sweep record's config) makes: each workload once per backend, its model and
  request counts."""
  want = {(w, b) for w in WORKLOADS for b in ("dense", "hq")}
  got = [(r["workload"], r["backend"]) for r in rows]
  if sorted(got) != sorted(want):
    raise HarnessError(f"the rows are workloads x backends {sorted(got)}, not each of "
                       f"{sorted(want)} once")
  requests = {"system_prompt": config.get("users"), "few_shot": config.get("users"),
              "multi_turn": config.get("turns")}
  for i, r in enumerate(rows):
    if r["model"] != config.get("model") or r["requests"] != requests[r["workload"]]:
      raise HarnessError(f"data row {i + 1}: model {r['model']!r}, {r['requests']} requests; "
                         f"the run record's config says {config.get('model')!r}, "
                         f"{requests[r['workload']]}")


def longest_request(sizes: dict) -> int:
  s = sizes
  return max(s["system_tokens"] + s["user_tokens"],
             s["examples"] * s["example_tokens"] + s["user_tokens"],
             s["turns"] * s["user_tokens"])


def build(stream: wl.TokenStream, sizes: dict, seed: int) -> dict[str, tuple[list, bool]]:
  """name -> (requests, sequential) from a `sizes` dict (see configs/memory_sweep.py)."""
  s = sizes
  return {
      "system_prompt": (wl.system_prompt(stream, users=s["users"],
                                         system_tokens=s["system_tokens"],
                                         user_tokens=s["user_tokens"], seed=seed), False),
      "few_shot": (wl.few_shot(stream, requests=s["users"], examples=s["examples"],
                               example_tokens=s["example_tokens"],
                               question_tokens=s["user_tokens"], seed=seed), False),
      "multi_turn": (wl.multi_turn(stream, turns=s["turns"], tokens_per_turn=s["user_tokens"],
                                   seed=seed), True),
  }


def check(cfg: ModelConfig, stream: wl.TokenStream, sizes: dict, seed: int = 0,
          allow_long_context: bool = False) -> dict[str, tuple[list, bool]]:
  """Every check `run` makes before any compute; returns the workloads (`build`)."""
  check_sizes(sizes)
  check_context_limit(cfg, longest_request(sizes), "the workload sizes", allow_long_context)
  return build(stream, sizes, seed)


def run(params, cfg: ModelConfig, stream: wl.TokenStream, *, model: str, sizes: dict,
        block_size: int = 16, chunk_size: int = 64, seed: int = 0, attention: str = "auto",
        decode_attention: str = "paged", allow_long_context: bool = False,
        kv_dtype: str | None = None, mesh=None) -> list[dict]:
  """Every workload on both backends; `mesh`: `Engine(mesh=)` (one data row)."""
  workloads = check(cfg, stream, sizes, seed, allow_long_context)
  layout = KVLayout.from_config(cfg, block_size, kv_dtype)
  engine = Engine(params, cfg, chunk_size=chunk_size, attention=attention,
                  decode_attention=decode_attention, allow_long_context=allow_long_context,
                  kv_dtype=layout.dtype, mesh=mesh)
  rows = []
  for name, (requests, sequential) in workloads.items():
    longest = max(len(r) for r in requests)
    for backend in ("dense", "hq"):
      cache = make_cache(backend, layout, mesh=mesh, concurrency=len(requests),
                         context_length=longest,
                         max_seq_len=longest)
      peak, computed, prev = None, 0, None
      for r in requests:
        if sequential and prev is not None:
          cache = cache.release(prev)
        cache, res = engine.prefill(cache, r.tokens, salt=r.salt, logits="last")
        prev, computed = res.slot, computed + res.computed_tokens
        s = kv_stats(cache)
        if peak is None or s.kv_bytes_used > peak.kv_bytes_used:
          peak = s
      end = kv_stats(cache)
      rows.append({
          "workload": name, "backend": backend, "model": model, "requests": len(requests),
          "prompt_tokens": sum(len(r) for r in requests),
          "kv_bytes_allocated": peak.kv_bytes_allocated, "kv_bytes_used": peak.kv_bytes_used,
          "physical_blocks": peak.physical_blocks, "logical_blocks": peak.logical_blocks,
          "reuse_factor": round(peak.reuse_factor, 6), "hit_tokens": end.hit_tokens,
          "query_tokens": end.query_tokens,
          "hit_rate": round(end.hit_tokens / end.query_tokens, 6),
          "computed_tokens": computed, "metadata_bytes": end.metadata_bytes,
          "kv_dtype": layout.dtype,
          "attention": engine.attention_label})
      check_row(rows[-1])
  return rows
