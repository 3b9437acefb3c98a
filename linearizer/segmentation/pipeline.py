"""Segmentation data as a run reads it: a source named by a string (`seg_source`), the training
batches and the eval items.

A source is named `digitscenes` (canvases of MNIST digits, built in), `segfolder:<root>`
(`images/` + `masks/`), `ade20k:<root>` (ADEChallengeData2016), `cityscapes:<root>` or
`tfds:scene_parse150` / `tfds:cityscapes`. Every source has `name`, `num_classes`, `len()`
and `[i] -> (uint8 (H, W, 3) RGB image, uint8 (H, W) label map)`, labels being class ids or
255 (ignore).

The training batches are the data package's one grain stream (`data.stream`) with
`SegTransform` as its per-example transform: every training example is a pure function of
(seed, global example index), so a resumed or multi-process run reads the batches an
uninterrupted single-process one would, drawn in the same order as classification's.
"""

from typing import Iterator, Optional, Sequence

import numpy as np

from linearizer import data
from linearizer.errors import UserError
from linearizer.segmentation import scenes
from linearizer.segmentation.augment import _augment, _pad, normalize
from linearizer.segmentation.sources import (
  ADE20K,
  IGNORE,
  Cityscapes,
  SegFolder,
  TfdsSegmentation,
)


def seg_source(
  spec: str,
  split: str,
  *,
  num_classes: int = 0,
  size: int = 128,
  num_scenes: int = 0,
  seed: int = 0,
  data_dir: str = "",
  digits: tuple = scenes.DIGITS,
  digit_side: tuple = scenes.DIGIT_SIDE,
):
  """The segmentation source `spec` names, one split of it.

  Args:
    spec: `digitscenes`, `segfolder:<root>`, `ade20k:<root>`, `cityscapes:<root>`, or
      `tfds:scene_parse150` / `tfds:cityscapes` (prepared under `data_dir`).
    split: 'train' or 'test' (ADE20K / Cityscapes: their training / validation split).
    num_classes: a segfolder's class count (0: from its masks); for the others, 0 or at
      least their own (a head that small would drop labels).
    size, num_scenes, seed: digitscenes' canvas side, scene count (0: its default), seed.
    digits, digit_side: digitscenes' (fewest, most) digits a canvas and (smallest,
      largest) digit side as a fraction of the canvas's.
  Returns:
    A source of (uint8 (H, W, 3) image, uint8 (H, W) label) with `name` and `num_classes`.
  """
  kind, colon, root = spec.partition(":")
  if kind == "digitscenes" and not colon:
    source = scenes.DigitScenes(split, size, num_scenes, seed, digits, digit_side)
  elif kind == "tfds" and root:
    source = TfdsSegmentation(root, split, data_dir)
  elif kind in ("segfolder", "ade20k", "cityscapes") and root:
    if kind == "segfolder":
      return SegFolder(root, split, num_classes)
    source = (ADE20K if kind == "ade20k" else Cityscapes)(root, split)
  else:
    raise UserError(
      f"Unknown segmentation source {spec!r}; expected digitscenes, segfolder:<root>, "
      "ade20k:<root>, cityscapes:<root>, tfds:scene_parse150 or tfds:cityscapes."
    )
  if num_classes and num_classes < source.num_classes:
    raise UserError(
      f"num_classes={num_classes}, but {source.name} has {source.num_classes} classes: set "
      f"it to at least {source.num_classes} (or 0, the source's own)."
    )
  return source


class SegTransform:
  """Picklable per-example training transform (grain may run it in worker processes):
  augment, normalise, then pad (image 0 after normalisation, label 255), as mmseg's
  SegDataPreProcessor pads normalised images."""

  def __init__(self, mean, std, crop, **augmentation):
    self.mean, self.std, self.crop, self.augmentation = mean, std, tuple(crop), augmentation

  def __call__(self, image, label, rng) -> tuple:
    image, label = _augment(image, label, rng, self.crop, **self.augmentation)
    image = _pad(normalize(image, self.mean, self.std), self.crop, 0.0)
    return image, _pad(label, self.crop, IGNORE).astype(np.int32)


def train_batches(
  source,
  *,
  crop: tuple,
  scale: tuple,
  global_batch: int,
  seed: int,
  mean: Sequence[float],
  std: Sequence[float],
  start_step: int = 0,
  process_index: int = 0,
  process_count: int = 1,
  flip: bool = True,
  photometric: bool = True,
  cat_max_ratio: float = 0.75,
  ratio_range: tuple = (0.5, 2.0),
  workers: int = 0,
) -> Iterator[data.Batch]:
  """Infinite iterator of this process's share of each global batch, from `start_step`: the
  data package's one stream (`data.stream`) with `SegTransform`.

  Rows [p·b, (p+1)·b) of every global batch go to process p (b = global_batch / P).

  Args:
    source: a segmentation source (`seg_source`).
    crop, scale, flip, photometric, cat_max_ratio, ratio_range: the augmentation (`augment`).
    global_batch: examples per step over all processes.
    seed: the shuffle and augmentation seed.
    mean, std: the model's normalisation (per channel, on [0, 1] pixels).
    start_step: the first step to yield (a resumed run's step).
    process_index, process_count: this process's share.
    workers: grain worker processes (0: in this process).
  Returns:
    An iterator of `data.Batch(image float32 (b, crop_h, crop_w, 3), label int32 (b, crop_h,
    crop_w), valid None)`; the batch of step s is the same whatever `start_step` and the
    number of processes.
  """
  transform = SegTransform(
    mean, std, crop, scale=tuple(scale), ratio_range=tuple(ratio_range),
    cat_max_ratio=cat_max_ratio, flip=flip, photometric=photometric,
  )  # fmt: skip
  return data.stream(
    source,
    transform,
    global_batch=global_batch,
    seed=seed,
    start_step=start_step,
    process_index=process_index,
    process_count=process_count,
    workers=workers,
  )


def eval_items(
  source, *, process_index: int = 0, process_count: int = 1, limit: Optional[int] = None
) -> Iterator[tuple]:
  """One pass, in order, over this process's items: process_index + k·process_count.

  Args:
    source: a segmentation source.
    process_index, process_count: this process's share.
    limit: read only the first `limit` items of the source (None: all).
  Returns:
    An iterator of (index, uint8 image, uint8 label) at full resolution.
  """
  n = len(source) if limit is None else min(len(source), limit)
  for i in range(process_index, n, process_count):
    image, label = source[i]
    yield i, image, label
