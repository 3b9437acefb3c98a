"""The grain pipelines: the one training stream, and the eval pass.

Every training example is a pure function of (seed, global example index): the order comes
from grain's per-epoch shuffle and each example's transform draws from its own generator,
`np.random.default_rng([seed, g])` for global example g, so a run resumed at step s reads
exactly the batches an uninterrupted run would, and the batch of a step is the same whatever
the number of processes. `stream` is that stream for any per-example transform (classification's
`train_batches`, segmentation's `linearizer.segmentation.pipeline.train_batches`).
"""

from typing import Callable, Iterator, NamedTuple, Optional, Sequence

import grain
import numpy as np
from absl import flags

from linearizer.data.transforms import Transform
from linearizer.errors import UserError


class Batch(NamedTuple):
  """What every pipeline yields and every step consumes, as is (a pytree).

  image: (B, H, W, 3) float32, normalised with the model's mean/std.
  label: int32, (B,) class ids (classification) or (B, H, W) label maps (segmentation).
  valid: (B,) bool, False for the padding rows of a last eval batch; None in training
    (every row is real).
  """

  image: np.ndarray
  label: np.ndarray
  valid: Optional[np.ndarray] = None


class _Example:
  """Local example k of this process -> the global example g it stands for: source item
  `order[g]` through `transform(image, label, np.random.default_rng([seed, g]))`."""

  def __init__(self, source, order, transform, seed, global_batch, local_batch, offset):
    self.source, self.order, self.transform, self.seed = source, order, transform, seed
    self.global_batch, self.local_batch, self.offset = global_batch, local_batch, offset

  def __call__(self, k):
    step, row = divmod(int(k), self.local_batch)
    g = step * self.global_batch + self.offset + row  # index in the global stream
    image, label = self.source[self.order[g]]
    return self.transform(image, label, np.random.default_rng([self.seed, g]))


def stack(examples) -> Batch:
  """A batch of (image, label) examples: images stacked, labels as int32 (class ids or label
  maps alike)."""
  return Batch(np.stack([e[0] for e in examples]), np.asarray([e[1] for e in examples], np.int32))


def stream(
  source,
  transform: Callable,
  *,
  global_batch: int,
  seed: int,
  start_step: int = 0,
  process_index: int = 0,
  process_count: int = 1,
  workers: int = 0,
) -> Iterator[Batch]:
  """The one training stream: an infinite iterator of this process's share of each global
  batch, from `start_step`, for any per-example transform.

  Global example g (g = step · global_batch + row) is source item `order[g]`, `order` being
  grain's `MapDataset.range(len(source)).shuffle(seed=seed).repeat()`, through
  `transform(image, label, np.random.default_rng([seed, g]))`; rows [p·b, (p+1)·b) of every
  global batch go to process p (b = global_batch / P), stacked by `stack`.

  Args:
    source: `len()` and `[i] -> (image, label)`.
    transform: picklable `(image, label, rng) -> (image, label)` (grain's workers run it).
    global_batch: examples per step over all processes.
    seed: the shuffle and augmentation seed.
    start_step: the first step to yield (a resumed run's step).
    process_index, process_count: this process's share.
    workers: grain worker processes (0: in this process).
  Returns:
    An iterator of `Batch(image, label)` of `global_batch / process_count` rows each; the
    batch of step s is the same whatever `start_step`, `workers` and the number of processes.
  """
  if global_batch % process_count:
    raise UserError(f"batch size {global_batch} does not split over {process_count} processes.")
  local = global_batch // process_count
  order = grain.MapDataset.range(len(source)).shuffle(seed=seed).repeat()
  fn = _Example(source, order, transform, seed, global_batch, local, process_index * local)
  ds = grain.MapDataset.range(start_step * local, 2**62).map(fn).batch(local, batch_fn=stack)
  return iterate(ds, workers)


class _ImageOnly:
  """A transform of the image alone as the stream's `(image, label, rng) -> (image, label)`."""

  def __init__(self, transform):
    self.transform = transform

  def __call__(self, image, label, rng):
    return self.transform(image, rng), label


def train_batches(
  source,
  cfg,
  *,
  global_batch: int,
  seed: int,
  mean: Sequence[float],
  std: Sequence[float],
  start_step: int = 0,
  process_index: int = 0,
  process_count: int = 1,
) -> Iterator[Batch]:
  """Infinite iterator of this process's share of each global batch, from `start_step`: the
  one `stream` with the training `Transform`.

  Rows [p·b, (p+1)·b) of every global batch go to process p (b = global_batch / P).

  Args:
    source: a source (`get_source`): `len()` and `[i] -> (uint8 HWC image, label)`.
    cfg: the data config (configs/common.py `data`): image size, crop scale, flip, ...
    global_batch: examples per step over all processes.
    seed: the shuffle and augmentation seed.
    mean, std: the model's normalisation (per channel, on [0, 1] pixels).
    start_step: the first step to yield (a resumed run's step).
    process_index, process_count: this process's share.
  Returns:
    An iterator of `Batch(image, label)` of `global_batch / process_count` rows each; the
    batch of step s is the same whatever `start_step` and the number of processes.
  """
  transform = _ImageOnly(Transform(cfg, True, mean, std))
  return stream(
    source,
    transform,
    global_batch=global_batch,
    seed=seed,
    start_step=start_step,
    process_index=process_index,
    process_count=process_count,
    workers=cfg.workers,
  )


def iterate(ds: grain.MapDataset, workers: int) -> Iterator:
  """An iterator over `ds`, read by `workers` processes (0: in this one)."""
  it = ds.to_iter_dataset()
  if workers:
    # grain's workers read its absl flags, which raises outside absl.app (a notebook, a
    # test) unless they are marked parsed (google/grain#1355); the defaults are kept.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.multiprocessing.MultiprocessingOptions(num_workers=workers))
  return iter(it)


def eval_batches(
  source, cfg, *, batch_size, mean, std, process_index=0, process_count=1, limit=None
):
  """One pass in order over this process's examples (every P-th).

  Every process yields the same number of batches (multi-host steps must match); rows
  beyond the data are zeros and `valid` marks the real ones.
  """
  n = min(len(source), limit or len(source))
  transform = Transform(cfg, False, mean, std)
  per_process = -(-n // process_count)
  mine = [process_index + k * process_count for k in range(per_process)]
  for start in range(0, per_process, batch_size):
    idx = [i for i in mine[start : start + batch_size] if i < n]
    examples = [source[i] for i in idx]
    images = np.zeros((batch_size, cfg.image_size, cfg.image_size, 3), np.float32)
    labels, valid = np.zeros(batch_size, np.int32), np.zeros(batch_size, bool)
    for row, (image, label) in enumerate(examples):
      images[row], labels[row], valid[row] = transform(image, None), label, True
    yield Batch(images, labels, valid)
