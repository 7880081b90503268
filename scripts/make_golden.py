"""Writes tests/golden/coder05b_wiki512.json from HF transformers (the independent oracle).

Run once, by hand, in a separate venv (CI never needs torch):

    python3 -m venv /tmp/goldenv
    /tmp/goldenv/bin/pip install torch==2.13.0 transformers accelerate gguf numpy
    make data                                   # caches the Wikipedia text
    .venv/bin/python -c "from hq_jax import weights; print(weights.shipped_gguf_path())"
    PYTHONPATH=. /tmp/goldenv/bin/python scripts/make_golden.py

transformers loads the GGUF itself (its own dequantization and its own tokenizer
conversion), so token ids, logits and perplexity are checked against code that
shares nothing with ours but the file.
"""

import datetime
import json
import math
import os
import platform
import sys

import numpy as np
import torch
import transformers

from hq_jax import data, paths

NUM_TOKENS = 512
PASSAGE_CHARS = 4000  # Enough characters for > NUM_TOKENS tokens.
POSITIONS = [0, 1, 2, 15, 16, 63, 127, 255, 383, 510, 511]
TOP_K = 20
OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "golden", "coder05b_wiki512.json")


def main():
  gguf_dir = os.path.join(paths.cache_dir(), "models")
  gguf_file = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
  passage = data.wiki_text()[:PASSAGE_CHARS]
  tok = transformers.AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
  ids = tok(passage, add_special_tokens=False)["input_ids"]
  assert len(ids) > NUM_TOKENS, len(ids)
  ids = ids[:NUM_TOKENS]
  model = transformers.AutoModelForCausalLM.from_pretrained(
      gguf_dir, gguf_file=gguf_file, torch_dtype=torch.float32)
  model.eval()
  with torch.no_grad():
    logits = model(torch.tensor([ids])).logits[0].float()  # [T, V]
  logp = torch.log_softmax(logits, dim=-1)
  nll = -logp[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
  ppl = math.exp(nll.double().mean().item())
  top = {}
  for p in POSITIONS:
    vals, idx = torch.topk(logits[p], TOP_K)
    top[str(p)] = {"ids": idx.tolist(), "logits": [float(v) for v in vals]}
  golden = {
      "generated_by": "scripts/make_golden.py",
      "generated_on": datetime.date.today().isoformat(),
      "how": ("HF transformers AutoModelForCausalLM.from_pretrained(dir, gguf_file=...) in "
              "float32 on CPU, full-sequence forward, no BOS; tokenizer from the same GGUF "
              "via AutoTokenizer"),
      "versions": {"python": platform.python_version(), "torch": torch.__version__,
                   "transformers": transformers.__version__, "numpy": np.__version__},
      "model_file": gguf_file,
      "passage_chars": PASSAGE_CHARS,
      "passage": passage,
      "num_tokens": NUM_TOKENS,
      "token_ids": ids,
      "top_k": TOP_K,
      "top_logits": top,
      "nll": [float(x) for x in nll],
      "perplexity": ppl,
  }
  with open(OUT, "w") as f:
    json.dump(golden, f, indent=1)
  print(f"wrote {OUT}: perplexity {ppl:.4f} over {NUM_TOKENS - 1} predictions", file=sys.stderr)


if __name__ == "__main__":
  main()
