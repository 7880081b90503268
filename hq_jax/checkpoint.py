"""Orbax save/restore for any pytree of arrays: converted params and warm caches.

Static fields of a cache (layout ints such as `hash_bits` and `max_seq_len`) live in its
tree structure, not in orbax's arrays, so `restore` takes a `like` tree (a cache built
with the same layout) to rebuild the structure around the restored arrays. `save` also
writes what `like` must match (`LAYOUT_FILE`: the classes, static fields, and every leaf's
shape and dtype), and `restore` refuses, with one error naming the first field that
differs, a `like` that does not match: never a cast, a truncation, or a cache that
silently finds nothing (a warm cache saved with 32 hash bits looked up with 8).
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np

LAYOUT_FILE = "hq_jax_layout.json"


class CheckpointMismatch(ValueError):
  """`like` does not describe the checkpoint; `field` names the first difference."""

  def __init__(self, message: str, field: str):
    super().__init__(message)
    self.field = field


def _checkpointer():
  import orbax.checkpoint as ocp
  return ocp.StandardCheckpointer()


def _json_value(v):
  return v if isinstance(v, (bool, int, float, str, type(None))) else repr(v)


def describe(tree) -> dict:
  """What a restore into `tree`'s structure must match: {"classes", "static", "leaves"}."""
  classes, static = {}, {}

  def walk(node, path):
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
      classes[path or "."] = f"{type(node).__module__}.{type(node).__qualname__}"
      for f in dataclasses.fields(node):
        if f.metadata.get("static"):
          static[f"{path}.{f.name}"] = _json_value(getattr(node, f.name))
        else:
          walk(getattr(node, f.name), f"{path}.{f.name}")
    elif isinstance(node, dict):
      for k, v in node.items():
        walk(v, f"{path}[{k!r}]")
    elif isinstance(node, (list, tuple)):
      for i, v in enumerate(node):
        walk(v, f"{path}[{i}]")

  walk(tree, "")
  leaves = {jax.tree_util.keystr(p) or ".": [list(x.shape), str(np.dtype(x.dtype))]
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
  return {"classes": classes, "static": static, "leaves": leaves}


def save(directory: str, tree) -> None:
  """Saves `tree` (orbax writes to a temporary name and renames when complete), then its
  layout (`LAYOUT_FILE`, written atomically)."""
  directory = os.path.abspath(directory)
  if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(tree)):
    raise ValueError("a tree with shapes but no arrays (a host_only cache's pools) cannot be "
                     "saved: there is nothing to restore its K/V from")
  desc = describe(tree)
  ckpt = _checkpointer()
  ckpt.save(directory, tree)
  ckpt.wait_until_finished()
  tmp = os.path.join(directory, LAYOUT_FILE + ".partial")
  with open(tmp, "w") as f:
    json.dump(desc, f, indent=1, sort_keys=True)
  os.replace(tmp, os.path.join(directory, LAYOUT_FILE))


def _key_names(path) -> tuple[str, ...]:
  """A key path as plain names (orbax stores a dataclass as a dict of its fields)."""
  return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _saved_leaves(directory: str) -> dict[tuple, tuple[list, str]] | None:
  """{key names: (shape, dtype)} of each saved array from orbax's own metadata (for a
  checkpoint written before `LAYOUT_FILE` existed); None if unreadable."""
  try:
    meta = _checkpointer().metadata(directory)
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    leaves = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))[0]
    return {_key_names(p): (list(x.shape), str(np.dtype(x.dtype))) for p, x in leaves}
  except Exception:  # an orbax layout this does not know: orbax's own checks remain
    return None


def check(directory: str, like) -> None:
  """Raises CheckpointMismatch naming the first field where `like` differs from the
  checkpoint at `directory`: its classes (backend), static fields, leaf shapes, dtypes."""
  want = describe(like)
  path = os.path.join(directory, LAYOUT_FILE)
  where = f"checkpoint {directory}"
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    for kind, what in (("classes", "class"), ("static", "static field"),
                       ("leaves", "array")):
      got, exp = saved.get(kind, {}), want[kind]
      for name in sorted(set(got) | set(exp)):
        if name not in got:
          raise CheckpointMismatch(f"{where} has no {what} {name} (`like` has "
                                   f"{exp[name]})", name)
        if name not in exp:
          raise CheckpointMismatch(f"{where} has {what} {name} = {got[name]}, which `like` "
                                   "lacks", name)
        if kind == "leaves" and got[name] != exp[name]:
          (gs, gd), (es, ed) = got[name], exp[name]
          part = "shape" if gs != es else "dtype"
          raise CheckpointMismatch(
              f"{where}: {name} has {part} {gs if part == 'shape' else gd} but `like` "
              f"has {es if part == 'shape' else ed}: build `like` with the layout it was "
              "saved with (never cast or truncated)", name)
        if got[name] != exp[name]:
          raise CheckpointMismatch(f"{where}: {what} {name} is {got[name]} in the "
                                   f"checkpoint but {exp[name]} in `like`", name)
    return
  saved = _saved_leaves(directory)
  like_leaves = {_key_names(p): (jax.tree_util.keystr(p) or ".", list(x.shape),
                                 str(np.dtype(x.dtype)))
                 for p, x in jax.tree_util.tree_flatten_with_path(like)[0]}
  if saved is None or set(saved) != set(like_leaves):
    return  # another structure, or names this cannot match: orbax's own checks remain
  for key, (name, es, ed) in sorted(like_leaves.items(), key=lambda kv: kv[1][0]):
    shape, dtype = saved[key]
    if shape != es or dtype != ed:
      raise CheckpointMismatch(f"{where}: {name} is {shape} {dtype} but `like` has "
                               f"{es} {ed}: build `like` with the layout it was saved "
                               "with (never cast or truncated)", name)


def restore(directory: str, like):
  """Restores a tree saved by `save`, with the structure, shapes and dtypes of `like`,
  after `check`ing that `like` describes it."""
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no checkpoint at {directory}")
  directory = os.path.abspath(directory)
  check(directory, like)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), like)
  restored = _checkpointer().restore(directory, abstract)
  # Host-side leaves (a cache's metadata) come back as numpy, as they were saved.
  return jax.tree.map(lambda r, x: np.asarray(r) if isinstance(x, np.ndarray) else r,
                      restored, like)
