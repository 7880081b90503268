# hq-jax: `make test` runs the test suite, `make demo` runs the main job.
# Both build .venv with Python >= 3.12 (found by scripts/find_python.sh) on first use.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# Tests run in this many worker processes (pytest-xdist): the 2-core box's two cores, which
# keeps `make test` under 10 minutes there. PYTEST_WORKERS=0 runs them in one process.
PYTEST_WORKERS ?= 2

.PHONY: test test-deep demo install data clean-venv peers

$(STAMP): pyproject.toml
	@base=$$(scripts/find_python.sh) || exit 1; \
	  echo "Using $$base ($$($$base --version))"; \
	  [ -x $(PY) ] || $$base -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,model]"
	touch $(STAMP)

install: $(STAMP)

# Real text (the Wikipedia articles inside the exllamav2 wheel, downloaded, never installed)
# and the shipped model (assembled from its wheels, sha256-checked, converted to orbax once).
# Both are cached in $HQ_JAX_CACHE (default ~/.cache/hq_jax), outside the repo.
data: $(STAMP)
	$(PY) -m hq_jax.data fetch
	$(PY) -m hq_jax.weights prepare

test: $(STAMP) data
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

# The same suite with the deeper settings `make test` trims to stay under 10 minutes on the
# 2-core box: 40 random programs per cache state machine, every unjitted model variant.
test-deep: $(STAMP) data
	HQ_JAX_DEEP_TESTS=1 $(PY) -m pytest -q -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

# The main job on this CPU machine: the shipped model on real text, both caches.
# --overwrite: a re-run replaces the previous demo's outputs (each script's own files).
DEMO_DIR ?= runs/demo
demo: $(STAMP) data
	$(PY) scripts/perplexity.py --num_tokens=512 --output_dir=$(DEMO_DIR) --overwrite
	$(PY) scripts/memory_sweep.py --model=shipped --context_lengths=128,256,512 \
	  --concurrency=1,4 --shared_prefix_fractions=0.5 --output_dir=$(DEMO_DIR) --overwrite
	$(PY) scripts/latency.py --model=shipped --context_lengths=256 --concurrency=4 \
	  --repeats=3 --output_dir=$(DEMO_DIR) --overwrite
	$(PY) scripts/report.py --run_dir=$(DEMO_DIR)

# The peer check (not part of `make test`): the Mooncake conversation trace's prompts through
# vLLM's own prefix cache (v1 KVCacheManager/BlockPool, CPU, in a separate venv outside the
# repo, pinned by tools/peers/vllm-requirements.txt) and through hq-jax's HQ cache, at the same
# pool sizes and policy (vLLM as it is, and with its n - 1 hit cap lifted: --full_hit); prints
# the table (tools/peers/compare.py) and writes it into $(PEERS_DIR).
PEERS_VENV ?= $(HOME)/.cache/hq_jax/peers-venv
PEERS_DIR ?= runs/peers
PEERS_TRACE ?= $(CURDIR)/../shared/traces/mooncake_conversation_trace.jsonl
PEERS_STAMP := $(PEERS_VENV)/.installed

$(PEERS_STAMP): tools/peers/vllm-requirements.txt
	@base=$$(scripts/find_python.sh) || exit 1; \
	  [ -x $(PEERS_VENV)/bin/python ] || $$base -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install -q --no-deps -r tools/peers/vllm-requirements.txt
	touch $(PEERS_STAMP)

peers: $(STAMP) $(PEERS_STAMP)
	mkdir -p $(PEERS_DIR)
	PYTHONPATH=$(CURDIR) $(PY) tools/peers/compare.py export --trace=$(PEERS_TRACE) \
	  --out=$(PEERS_DIR)/prompts.npz
	$(PEERS_VENV)/bin/python tools/peers/vllm_replay.py --prompts=$(PEERS_DIR)/prompts.npz \
	  --out=$(PEERS_DIR)/vllm.csv
	$(PEERS_VENV)/bin/python tools/peers/vllm_replay.py --prompts=$(PEERS_DIR)/prompts.npz \
	  --full_hit --out=$(PEERS_DIR)/vllm_full_hit.csv
	PYTHONPATH=$(CURDIR) $(PY) tools/peers/compare.py compare --trace=$(PEERS_TRACE) \
	  --vllm_csv=$(PEERS_DIR)/vllm.csv,$(PEERS_DIR)/vllm_full_hit.csv --out=$(PEERS_DIR)/peers.csv

clean-venv:
	rm -rf $(VENV)
