"""Images at their own size, for packed batches (issue 43; docs/packing.md).

`budget_size` is the size an image is read at: its own, rounded to the patch, unless it has
more than the token budget's patches, when it shrinks (aspect ratio kept) until it fits.
SigLIP 2's NaFlex also resizes to a patch budget, but grows small images to fill it; here a
small image keeps its size, so a packed row holds images at their own resolutions.
`rescale` makes a mixed-size source of a square one (the demo's and the smoke's digits):
each image's side scaled by a random factor and its aspect ratio drawn, both log-uniform.
`packed_stream` is the training stream of packed batches (`pipeline.stream`'s numbering).
"""

import math
from typing import Iterator, NamedTuple

import grain
import numpy as np
from PIL import Image

from linearizer.data import pipeline
from linearizer.errors import UserError
from linearizer.models import packing


def budget_size(h: int, w: int, unit: int, max_patches: int) -> tuple:
  """(h', w'): multiples of `unit` (the patch), at most `max_patches` patches of it.

  Args:
    h, w: the image's size in pixels; each at least `unit`.
    unit: the patch side (the least common multiple of the models' patches).
    max_patches: the budget, in patches of `unit`.
  Returns:
    (h, w) rounded down to `unit` when that fits the budget; else both scaled by
    sqrt(budget / patches) and rounded down, the longer side cut further if the shorter
    one had to be raised to one patch.
  """
  if max_patches < 1:
    raise UserError(f"max_patches={max_patches}; expected a positive number of patches.")
  if h < unit or w < unit:
    raise UserError(f"An image of {h}x{w} px is smaller than one {unit}-px patch.")
  scale = min(1.0, math.sqrt(max_patches / ((h / unit) * (w / unit))))
  rows, cols = (max(1, int(side * scale / unit)) for side in (h, w))
  if rows * cols > max_patches:  # a thin image: its short side was raised to one patch
    rows, cols = min(rows, max_patches // cols or 1), min(cols, max_patches // rows or 1)
  return rows * unit, cols * unit


def rescale(image: np.ndarray, rng, side=(0.5, 2.0), aspect=(0.5, 2.0)) -> np.ndarray:
  """A uint8 (h, w, C) image resized (bicubic) to a random size: its side scaled by a
  factor and its aspect ratio set to a ratio, each log-uniform in its range."""
  h, w = image.shape[:2]
  factor = math.exp(rng.uniform(*np.log(side)))
  ratio = math.exp(rng.uniform(*np.log(aspect)))
  size = math.sqrt(h * w) * factor
  new_h, new_w = max(1, round(size * math.sqrt(ratio))), max(1, round(size / math.sqrt(ratio)))
  return _resized(image, (new_h, new_w))


def _resized(image: np.ndarray, size: tuple) -> np.ndarray:
  """A uint8 (h, w, C) image resized (bicubic, PIL) to `size` = (h', w')."""
  squeeze = image[..., 0] if image.shape[-1] == 1 else image
  out = np.asarray(Image.fromarray(squeeze).resize(size[::-1], Image.BICUBIC))
  return out.reshape(*size, -1)


def fit(image: np.ndarray, unit: int, max_patches: int) -> np.ndarray:
  """A uint8 (h, w, C) image resized (bicubic) to its `budget_size`, or as it is there."""
  h, w = image.shape[:2]
  size = budget_size(h, w, unit, max_patches)
  if size == (h, w):
    return image
  return _resized(image, size)


class PackedExamples(NamedTuple):
  """One step's packed images: a `packing.Packed` per view (each model's), the label of
  each image slot (rows, M) (-1: empty), and how many of the step's images did not fit."""

  views: tuple
  label: np.ndarray
  dropped: int


class NativeTransform:
  """Picklable per-example transform for packed batches: grey to RGB, the mixed-size
  rescale (`rescale`, with `mixed`), the patch budget (`fit`), a random flip in training,
  then the model's normalisation; float32 (h, w, 3) of the image's own size."""

  def __init__(self, unit, max_patches, mean, std, *, train: bool, flip: bool, mixed: bool):
    self.unit, self.max_patches, self.train, self.flip, self.mixed = (
      unit,
      max_patches,
      train,
      flip,
      mixed,
    )
    self.mean = np.asarray(mean, np.float32) * 255
    self.std = np.asarray(std, np.float32) * 255

  def __call__(self, image: np.ndarray, rng) -> np.ndarray:
    image = image[..., None] if image.ndim == 2 else image
    image = np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image
    if self.mixed:
      image = rescale(image, rng)
    image = fit(image, self.unit, self.max_patches)
    if self.train and self.flip and rng.random() < 0.5:
      image = image[:, ::-1]
    return (image.astype(np.float32) - self.mean) / self.std


class _PackedStep:
  """Step s -> this process's share of step s's images (global example g = s·K + row, as
  `pipeline.stream` numbers them), transformed and packed into `rows` rows; images past
  the rows are dropped and counted (every step keeps its static shapes)."""

  def __init__(
    self, source, order, transform, seed, views, max_images, rows, per_step, local, offset
  ):
    self.source, self.order, self.transform, self.seed = source, order, transform, seed
    self.views, self.max_images, self.rows = views, max_images, rows
    self.per_step, self.local, self.offset = per_step, local, offset

  def __call__(self, step) -> PackedExamples:
    images, labels = [], []
    for row in range(self.local):
      g = int(step) * self.per_step + self.offset + row
      image, label = self.source[self.order[g]]
      images.append(self.transform(image, np.random.default_rng([self.seed, g])))
      labels.append(int(label))
    packed, slots = packing.pack_views(images, self.views, self.max_images, self.rows, drop=True)
    label = np.asarray(labels + [-1], np.int32)[slots]  # slot -1 (empty) reads the -1
    return PackedExamples(tuple(packed), label, len(images) - int((slots >= 0).sum()))


def packed_stream(
  source,
  transform,
  views,
  *,
  max_images: int,
  rows: int,
  images_per_step: int,
  seed: int,
  start_step: int = 0,
  process_index: int = 0,
  process_count: int = 1,
  workers: int = 0,
) -> Iterator[PackedExamples]:
  """The packed training stream: an infinite iterator of this process's `PackedExamples`
  from `start_step`. Step s reads global examples [s·K, (s+1)·K) (K = images_per_step, in
  grain's shuffled order, each transformed with `np.random.default_rng([seed, g])`), as
  `pipeline.stream` does, so a resumed run reads the steps an uninterrupted one would;
  process p packs its K/P of them into rows / P rows."""
  for name, n in (("images per step", images_per_step), ("rows", rows)):
    if n % process_count:
      raise UserError(f"{name} {n} do not split over {process_count} processes.")
  local = images_per_step // process_count
  order = grain.MapDataset.range(len(source)).shuffle(seed=seed).repeat()
  fn = _PackedStep(
    source,
    order,
    transform,
    seed,
    views,
    max_images,
    rows // process_count,
    images_per_step,
    local,
    process_index * local,
  )
  return pipeline.iterate(grain.MapDataset.range(start_step, 2**62).map(fn), workers)
