"""Orbax save/restore for any pytree of arrays: converted params and warm caches.

Static fields of a cache (layout ints) live in its tree structure, not in the
checkpoint, so `restore` takes a `like` tree (a cache built with the same layout)
to rebuild the structure around the restored arrays.
"""

from __future__ import annotations

import os

import jax
import numpy as np


def _checkpointer():
  import orbax.checkpoint as ocp
  return ocp.StandardCheckpointer()


def save(directory: str, tree) -> None:
  """Saves `tree` (orbax writes to a temporary name and renames when complete)."""
  ckpt = _checkpointer()
  ckpt.save(os.path.abspath(directory), tree)
  ckpt.wait_until_finished()


def restore(directory: str, like):
  """Restores a tree saved by `save`, with the structure, shapes and dtypes of `like`."""
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no checkpoint at {directory}")
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), like)
  restored = _checkpointer().restore(os.path.abspath(directory), abstract)
  # Host-side leaves (a cache's metadata) come back as numpy, as they were saved.
  return jax.tree.map(lambda r, x: np.asarray(r) if isinstance(x, np.ndarray) else r,
                      restored, like)
