"""The teacher cache's rows (`teacher_cache`): which example and augmented view each holds,
and the batches that read them back with the teacher's stored outputs.
"""

import math
from typing import Any, NamedTuple

import numpy as np

from linearizer import data
from linearizer.distillation.cache_files import open_arrays
from linearizer.errors import UserError


class CachedBatch(NamedTuple):
  """A training batch read from the cache (a pytree, as `data.Batch`).

  image: (B, H, W, 3) float32 views, normalised with the student's statistics.
  label: (B,) int32 (unused by distillation).
  teacher: the teacher's outputs for these views (`distill.make_teacher_targets`'s tree).
  """

  image: np.ndarray
  label: np.ndarray
  teacher: Any


# ---------------------------------------------------------------------------------------
# The views: which example and augmentation each cache row holds.
# ---------------------------------------------------------------------------------------
class Views:
  """This process's cached views: row k is view k mod V of example `examples[k // V]`."""

  def __init__(self, source, cfg, *, seed, views, mean, std, process_index, process_count):
    self.source, self.seed, self.views = source, seed, views
    self.examples = np.arange(process_index, len(source), process_count)
    self.transform = data.Transform(cfg, True, mean, std)

  def __len__(self) -> int:
    return len(self.examples) * self.views

  def view(self, k: int) -> tuple:
    """(image, label, pixel sum) of row k: the same image whenever it is drawn."""
    position, v = divmod(int(k), self.views)
    j = int(self.examples[position])
    image, label = self.source[j]
    image = self.transform(image, np.random.default_rng([self.seed, j, v]))
    return image, label, float(image.sum(dtype=np.float64))


class WriteExample:
  """Row k -> (image, pixel sum); the rows past the end (the last batch's padding) zeros."""

  def __init__(self, views: Views, shape):
    self.views, self.shape = views, shape

  def __call__(self, k):
    if k >= len(self.views):
      return np.zeros(self.shape, np.float32), 0.0
    image, _, check = self.views.view(k)
    return image, check


class ReadExample:
  """Local stream index g -> (image, label, the cached teacher outputs of its view).

  Epoch e = g // N visits this process's N examples in a per-epoch shuffled order and
  reads view e mod V of each; the arrays are opened in whichever process reads them.
  """

  def __init__(self, views: Views, order, directory: str, leaves: list, dtype):
    self.views, self.order, self.directory = views, order, directory
    self.leaves, self.dtype, self.arrays = leaves, dtype, None

  def __getstate__(self):  # memory maps are reopened in a worker, never pickled
    return {**self.__dict__, "arrays": None}

  def __call__(self, g):
    if self.arrays is None:
      self.arrays = open_arrays(self.directory, self.leaves, self.dtype, len(self.views), "r")
    n = len(self.views.examples)
    k = int(self.order[int(g)]) * self.views.views + (int(g) // n) % self.views.views
    image, label, check = self.views.view(k)
    stored = float(self.arrays["checks"][k])
    if not math.isclose(check, stored, rel_tol=1e-5, abs_tol=1e-3):
      raise UserError(
        f"teacher cache {self.directory}: view {k} no longer draws the image it was written "
        f"for (pixel sum {check:.6g} vs {stored:.6g}; another Pillow or numpy?): delete the "
        "directory to write it again."
      )
    return image, label, [np.asarray(a[k]) for a in self.arrays["leaves"]]


def stack_written(rows):
  return np.stack([r[0] for r in rows]), np.asarray([r[1] for r in rows], np.float64)


def stack_read(rows):
  leaves = [np.stack([r[2][i] for r in rows]) for i in range(len(rows[0][2]))]
  return np.stack([r[0] for r in rows]), np.asarray([r[1] for r in rows], np.int32), leaves
