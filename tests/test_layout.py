"""The layers of the tree (issue 24): each package imports only layers below it.

  pallas_kernels   jax, numpy and the standard library only (a leaf, like jax's pallas/ops)
  core             hq_jax/*.py and hq_jax/kv/: the model, weights and caches
  serve            hq_jax/serve/: the engine and the serving loop
  bench            hq_jax/bench/: timing a kernel or a step
  study            hq_jax/study/: runs, flags, outputs, sweeps, replays, ledger, report

`hq_jax/__init__.py` is the public facade: it re-exports `Engine` from serve, nothing higher.
Every import is checked, also those inside functions.
"""

import ast
import os
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")
ORDER = ["core", "serve", "bench", "study"]


def _layer(path: str) -> str:
  rel = os.path.relpath(path, ROOT).replace(os.sep, "/")
  if rel.startswith("pallas_kernels/"):
    return "pallas_kernels"
  parts = rel.split("/")
  if len(parts) > 2 and parts[1] in ("serve", "bench", "study"):
    return parts[1]
  return "core"


def _target(module: str) -> str | None:
  if module == "pallas_kernels" or module.startswith("pallas_kernels."):
    return "pallas_kernels"
  if module == "hq_jax" or not module.startswith("hq_jax."):
    return None if module != "hq_jax" else "core"
  sub = module.split(".")[1]
  return sub if sub in ("serve", "bench", "study") else "core"


def _imports(path: str):
  tree = ast.parse(open(path).read(), path)
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield node.lineno, alias.name
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      if node.module == "hq_jax":  # `from hq_jax import serve` names a package
        for alias in node.names:
          yield node.lineno, f"hq_jax.{alias.name}"
      else:
        yield node.lineno, node.module


def _sources():
  for package in ("hq_jax", "pallas_kernels"):
    for dirpath, _, files in os.walk(os.path.join(ROOT, package)):
      for f in sorted(files):
        if f.endswith(".py"):
          yield os.path.join(dirpath, f)


def test_every_import_goes_down_the_layers():
  stdlib = sys.stdlib_module_names
  bad = []
  for path in _sources():
    layer = _layer(path)
    facade = os.path.relpath(path, ROOT) == os.path.join("hq_jax", "__init__.py")
    for line, module in _imports(path):
      where = f"{os.path.relpath(path, ROOT)}:{line} imports {module}"
      top = module.split(".")[0]
      if layer == "pallas_kernels":
        if top not in ("jax", "jaxlib", "numpy", "pallas_kernels") and top not in stdlib:
          bad.append(f"{where} (pallas_kernels imports only jax and numpy)")
        continue
      target = _target(module)
      if target is None or target == "pallas_kernels":
        continue
      allowed = ORDER[:ORDER.index(layer) + 1]
      if facade and target == "serve":
        continue
      if target not in allowed:
        bad.append(f"{where} ({layer} may import only {', '.join(allowed)})")
  assert not bad, "\n".join(bad)


@pytest.mark.parametrize("path, module, layer_ok", [
    ("hq_jax/kv/dedup.py", "hq_jax.study.outputs", False),
    ("hq_jax/serve/engine.py", "hq_jax.bench.timing", False),
    ("hq_jax/study/memory.py", "hq_jax.bench.device_memory", True),
    ("pallas_kernels/x.py", "hq_jax.kv.paged", False),
])
def test_the_rule_itself(path, module, layer_ok):
  """The checker can fail: a known-bad import is refused, a known-good one allowed."""
  layer, target = _layer(os.path.join(ROOT, path)), _target(module)
  if layer == "pallas_kernels":
    assert not layer_ok and target is not None
    return
  assert (target in ORDER[:ORDER.index(layer) + 1]) == layer_ok


def test_no_script_edits_sys_path():
  scripts = os.path.join(ROOT, "scripts")
  offenders = [f for f in os.listdir(scripts) if f.endswith(".py")
               and "sys.path" in open(os.path.join(scripts, f)).read()]
  assert not offenders, offenders
