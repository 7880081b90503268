"""What the Mosaic GPU kernel tests share: shapes, poisoned random pools, the strict
interpreter, a test base that runs compiled on a GPU and interpreted on CPU, and the slow
interpreter cases that only `make test-deep` (HQ_JAX_DEEP_TESTS=1) runs."""

import os

from absl.testing import parameterized
import jax
import numpy as np

from pallas_kernels.paged_attention_mgpu import strict_interpreter

TOL = 2e-2  # relative L2 error of bf16 vs the f32 reference
BLOCK_SIZE = 16
SHAPES = {"0.5b": (14, 2, 64), "7b": (28, 4, 128), "g2": (4, 2, 64)}  # (H, K, D)


def paged_pools(rng, lens, *, shape="0.5b", max_blocks=12, num_layers=2):
  """Float32 pools of all layers [L, NB, 16, K, D]; request b holds lens[b] keys at random
  blocks of its table row. Block 0 of every layer is all NaN and never assigned; table
  entries past a request's blocks point to random blocks (block 0 among them), and the slots
  past each request's length hold NaN: any read of them that reaches the output shows as
  NaN. Returns (k, v, tables, kv_lens) as numpy arrays."""
  _, nk, d = SHAPES[shape]
  batch = len(lens)
  kv_lens = np.asarray(lens, np.int32)
  num_blocks = 1 + sum(-(-n // BLOCK_SIZE) for n in lens) + 3
  pool_shape = (num_layers, num_blocks, BLOCK_SIZE, nk, d)
  k = rng.standard_normal(pool_shape).astype(np.float32)
  v = rng.standard_normal(pool_shape).astype(np.float32)
  tables = rng.integers(0, num_blocks, (batch, max_blocks)).astype(np.int32)
  free = rng.permutation(np.arange(1, num_blocks))
  for b, n in enumerate(kv_lens):
    used = -(-n // BLOCK_SIZE)
    tables[b, :used], free = free[:used], free[used:]
    if used:
      k[:, tables[b, used - 1], n % BLOCK_SIZE or BLOCK_SIZE:] = np.nan
      v[:, tables[b, used - 1], n % BLOCK_SIZE or BLOCK_SIZE:] = np.nan
  k[:, 0] = v[:, 0] = np.nan
  for p in free:  # blocks no request holds
    k[:, p] = v[:, p] = np.nan
  return k, v, tables, kv_lens


def rel_err(out, ref):
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  return np.linalg.norm(out - ref) / np.linalg.norm(ref)


def relabel(k, v, tables, seed):
  """The same logical content at another physical placement of the blocks (block 0 kept)."""
  num_blocks = k.shape[1]
  perm = np.concatenate([[0], 1 + np.random.default_rng(seed).permutation(num_blocks - 1)])
  inv = np.argsort(perm)  # new block inv[p] holds old block p
  return k[:, perm], v[:, perm], jax.numpy.asarray(inv[np.asarray(tables)].astype(np.int32))


class MgpuTestCase(parameterized.TestCase):
  """Compiled on a GPU (skipped elsewhere); a subclass with INTERPRET = True runs the same
  bodies in the interpreter on CPU, except the SLOW_INTERPRETED ones outside test-deep."""

  INTERPRET = False
  SLOW_INTERPRETED: tuple[str, ...] = ()

  def setUp(self):
    super().setUp()
    if not self.INTERPRET and jax.default_backend() != "gpu":
      self.skipTest("compiled Mosaic GPU kernels need a GPU")
    if (self.INTERPRET and not os.environ.get("HQ_JAX_DEEP_TESTS")
        and self._testMethodName in self.SLOW_INTERPRETED):
      self.skipTest("slow interpreter variant; run with HQ_JAX_DEEP_TESTS=1")

  @property
  def interpret(self):
    return strict_interpreter() if self.INTERPRET else False
