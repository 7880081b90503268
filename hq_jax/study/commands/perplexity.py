"""Perplexity of real text on the dense and the HQ cache, and the logit difference.

  hq-jax perplexity --text_file=PATH --num_tokens=256 --output_dir=DIR

writes DIR/perplexity.json: model, text_file, num_tokens, token_ids, dense {ppl, nll},
hq {ppl, nll}, max_abs_logit_diff and logit_mismatches {full_prefill, prefix_reuse},
attention, kv_dtype, kv_dtype_baselines (with --kv_dtype=float8_e4m3fn: the dense
perplexity with bfloat16 and model-dtype K/V, for the ledger's FP8 row), run metadata and
run_id; and DIR/perplexity.run.json (the run record).
"""

import time


from absl import flags, logging
from ml_collections import config_flags

from configs import perplexity as default_config
from hq_jax import data, tokenizer, weights
from hq_jax.study import cli, perplexity

_CONFIG = config_flags.DEFINE_config_file(
    "config", cli.config_path("perplexity.py"),
    "Config file; its fields can also be set by the plain flags below.")
cli.define_flags(default_config.get_config(), {
    "text_file": "UTF-8 text to score; empty = the shipped Wikipedia articles",
    "num_tokens": "tokens to score (the text's first num_tokens tokens)",
    "seed": "seed of random weights for presets",
    "output_dir": "where perplexity.json is written (required)",
})
flags.adopt_module_key_flags(cli)  # So that --help lists the plain flags too.


def main(argv):
  del argv
  cfg = cli.resolve(_CONFIG.value)
  cli.validate(cfg)  # Every flag, and the output directory, before anything is loaded.
  cli.model_mesh(cfg, what="perplexity")  # syntax and devices, before any loading
  run = cli.open_run(cfg, "perplexity", ["perplexity.json"])
  # The text, the model and the tokens are checked before the run opens.
  text = data.read_text(cfg.text_file)
  logging.info("loading model %s", cfg.model)
  params, model_cfg, tok = weights.load_model(cfg.model, dtype=cfg.dtype, seed=cfg.seed)
  ids = tokenizer.encode_text(tok, text, vocab_size=model_cfg.vocab_size,
                              num_tokens=cfg.num_tokens)
  perplexity.check_tokens(model_cfg, ids, cfg.allow_long_context)
  mesh = cli.model_mesh(cfg, model_cfg, "perplexity")
  logging.info("scoring %d tokens with %s (dense, HQ, HQ with prefix reuse)", len(ids),
               model_cfg.name)
  with run:
    t0 = time.perf_counter()
    result = perplexity.run(params, model_cfg, ids, chunk_size=cfg.chunk_size,
                            block_size=cfg.block_size, attention=cfg.attention,
                            allow_long_context=cfg.allow_long_context,
                            kv_dtype=cfg.kv_dtype or None, mesh=mesh)
    out = {"model": cfg.model, "model_name": model_cfg.name,
           "text_file": cfg.text_file or "wiki (exllamav2-0.3.2 standard_cal_data/wiki.utf8)",
           "tokenizer": tok.name, "token_ids": [int(i) for i in ids], **result,
           "config": cfg.to_dict(), "elapsed_s": time.perf_counter() - t0,
           **cli.run_metadata()}
    path = run.write_json("perplexity.json", out)
    run.finish(attention=result["attention"])
  print(f"{model_cfg.name}: {len(ids)} tokens  dense ppl {result['dense']['ppl']:.4f}  "
        f"hq ppl {result['hq']['ppl']:.4f}  max |dlogit| full prefill "
        f"{result['max_abs_logit_diff']['full_prefill']}, prefix reuse "
        f"{result['max_abs_logit_diff']['prefix_reuse']}; differing logits "
        f"{result['logit_mismatches']['full_prefill']}, "
        f"{result['logit_mismatches']['prefix_reuse']}; K/V {result['kv_dtype']}"
        + "".join(f", dense ppl with {k} K/V {v['ppl']:.4f}"
                  for k, v in result["kv_dtype_baselines"].items())
        + f"\nwrote {path}")



def run(argv=None):
  """`hq-jax perplexity` and `scripts/perplexity.py`."""
  cli.run_command(cli.exit_on_error(main), __name__, argv)
