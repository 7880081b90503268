"""The Colab notebooks run top to bottom (as a reader would run them) and are saved clean.

Each notebook is executed by nbclient in a fresh kernel with notebooks/ as the working
directory (where Jupyter and Colab start it); a cell that raises fails the test, with the
cell's source and traceback in the message. The setup cell skips installing because hq_jax
is importable here; the data cell fetches the text only if it is not cached.
"""

import os
import time

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError

NOTEBOOK_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "notebooks")
NOTEBOOKS = ("quickstart.ipynb", "memory_sweep.ipynb", "kernels.ipynb")
CELL_TIMEOUT_S = 300  # per cell; each notebook takes about a minute on 2 CPU cores


def _read(name):
  return nbformat.read(os.path.join(NOTEBOOK_DIR, name), as_version=4)


def test_every_notebook_is_listed():
  on_disk = sorted(f for f in os.listdir(NOTEBOOK_DIR) if f.endswith(".ipynb"))
  assert on_disk == sorted(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_saved_without_outputs(name):
  nb = _read(name)
  nbformat.validate(nb)
  for i, cell in enumerate(nb.cells):
    if cell.cell_type == "code":
      assert not cell.outputs and cell.execution_count is None, (
          f"{name} cell {i} was saved with outputs: clear them before committing")
  assert "import hq_jax" in nb.cells[1].source and "%pip install" in nb.cells[1].source, (
      f"{name}: the first code cell must be the Colab install cell")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name):
  nb = _read(name)
  client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                          resources={"metadata": {"path": NOTEBOOK_DIR}})
  t0 = time.perf_counter()
  try:
    client.execute()
  except (CellExecutionError, CellTimeoutError) as e:
    pytest.fail(f"{name} failed:\n{e}", pytrace=False)
  print(f"{name}: {time.perf_counter() - t0:.1f} s")
