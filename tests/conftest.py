"""Shared fixtures: the tiny model with seeded random weights, and the shipped model."""

import json
import os

import jax
import pytest

from hq_jax import config, model
from hq_jax.kv.paged import KVLayout

# CPU computations run inline on the calling thread. The Mosaic GPU interpreter runs each
# warpgroup of a kernel as a jitted computation on its own Python thread, and their barrier
# callbacks block; dispatched asynchronously, those computations and callbacks share XLA's
# CPU thread pools (two threads each on the 2-core CI machine), and a kernel with two
# warpgroups could deadlock there (test_block_placement_changes_no_bit hung in 2 of 3 runs
# of the Mosaic and engine test files; 0 of 5 with this setting).
# Set before any test touches the CPU client, which reads the flag when it is created.
jax.config.update("jax_cpu_enable_async_dispatch", False)

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "coder05b_wiki512.json")


@pytest.fixture(scope="session")
def tiny():
  cfg = config.get_config("tiny")
  # Scale 0.1 (not 0.02) so attention is far from uniform and bugs show in the logits.
  return model.init_params(cfg, jax.random.key(0), scale=0.1), cfg


@pytest.fixture(scope="session")
def tiny_layout(tiny):
  return KVLayout.from_config(tiny[1], block_size=16)


@pytest.fixture(scope="session")
def shipped():
  """(params, cfg, tokenizer) of the shipped model. `make test` installs and converts it;
  a missing model is an error here, never a silent skip."""
  from hq_jax import weights
  return weights.load_shipped()


@pytest.fixture(scope="session")
def golden():
  with open(GOLDEN) as f:
    return json.load(f)
