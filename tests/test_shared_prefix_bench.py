"""The shared-prefix benchmark harness (hq_jax.bench.shared_prefix), run in interpret mode.

The GPU numbers come from scripts/kernel_bench.py; here the harness's own logic is checked:
the batch it builds, the unshared twin, the row it reports and the auto threshold rule.
"""

import warnings

import numpy as np
import pytest

from hq_jax.bench import shared_prefix as sp
from hq_jax.kv.paged import gather

warnings.filterwarnings("ignore", message=".*Pallas Triton backend is deprecated.*")


def test_batch_and_unshared_twin_hold_the_same_keys():
  q, (k, v, view, tables, lens), (ku, vu, viewu) = sp.make_batch(0, 32, 16, 3, 4, 2, 16, 16)
  assert tables.shape == (3, 3) and (tables[:, :2] == tables[0, :2]).all()  # prefix shared
  assert len(set(np.asarray(viewu.block_tables).ravel())) == 9  # every block its own copy
  np.testing.assert_array_equal(np.asarray(gather(k, view.block_tables)),
                                np.asarray(gather(ku, viewu.block_tables)))
  np.testing.assert_array_equal(np.asarray(gather(v, view.block_tables)),
                                np.asarray(gather(vu, viewu.block_tables)))
  with pytest.raises(ValueError, match="multiples of the block size"):
    sp.make_batch(0, 30, 16, 3, 4, 2, 16, 16)


def test_bench_point_row():
  logs = []
  row = sp.bench_point("qwen2.5-0.5b", 32, 16, 3, kind="target",
                       configs=["exact", "q64"], seed=1, reps=1, interpret=True,
                       log=logs.append)
  assert row["config"] in ("exact", "q64")
  assert row["ideal"] == round(3 * 48 / (32 + 3 * 16), 2)
  assert row["saved_tokens"] == 32 * 2
  assert float(row["err_dedup_vs_ref"]) < 2e-2 and float(row["max_abs_vs_paged"]) < 1e-2
  assert set(row["all_configs_ms"].split()) and "FAILED" not in " ".join(logs)


def test_auto_threshold():
  rows = [dict(saved_tokens=0, speedup=0.9), dict(saved_tokens=100, speedup=0.8),
          dict(saved_tokens=1000, speedup=1.2), dict(saved_tokens=5000, speedup=3.0)]
  assert sp.auto_threshold(rows) == 1000
  rows.append(dict(saved_tokens=9000, speedup=1.0))  # a loss above: no safe threshold
  assert sp.auto_threshold(rows) is None
