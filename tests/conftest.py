"""Shared fixtures: the tiny model with seeded random weights, and the shipped model."""

import json
import os

import jax
import pytest

from hq_jax import config, model
from hq_jax.kv.paged import KVLayout

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
