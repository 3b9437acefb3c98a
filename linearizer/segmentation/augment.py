"""mmseg's ADE20K / Cityscapes train augmentation on uint8 (image, label map) pairs:
RandomResize → RandomCrop (cat_max_ratio) → RandomFlip → PhotoMetricDistortion → pad; and
`normalize`, the model's per-channel normalisation.
"""

from typing import Sequence

import numpy as np
from PIL import Image

from linearizer.segmentation.sources import IGNORE


def _augment(image, label, rng, crop, scale, ratio_range, cat_max_ratio, flip, photometric):
  """augment() before its padding: the crop may be smaller than `crop`."""
  # RandomResize(scale, ratio_range, keep_ratio=True): mmcv.imrescale into scale × ratio.
  ratio = rng.uniform(*ratio_range)
  long_side, short_side = max(scale) * ratio, min(scale) * ratio
  h, w = label.shape
  factor = min(long_side / max(h, w), short_side / min(h, w))
  size = (max(1, int(w * factor + 0.5)), max(1, int(h * factor + 0.5)))
  image = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
  label = np.asarray(Image.fromarray(label).resize(size, Image.NEAREST))  # never blended
  # RandomCrop(crop, cat_max_ratio): up to 10 tries for a crop no class dominates.
  box = _crop_box(label.shape, crop, rng)
  if cat_max_ratio < 1:
    for _ in range(10):
      ids, counts = np.unique(label[box], return_counts=True)
      counts = counts[ids != IGNORE]
      if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
        break
      box = _crop_box(label.shape, crop, rng)
  image, label = image[box], label[box]
  if flip and rng.random() < 0.5:  # RandomFlip(prob=0.5), horizontal
    image, label = np.ascontiguousarray(image[:, ::-1]), np.ascontiguousarray(label[:, ::-1])
  if photometric:
    image = photometric_distortion(image, rng)
  return np.ascontiguousarray(image), np.ascontiguousarray(label)


def _crop_box(shape, crop, rng):
  y = rng.integers(0, max(shape[0] - crop[0], 0) + 1)
  x = rng.integers(0, max(shape[1] - crop[1], 0) + 1)
  return slice(y, y + crop[0]), slice(x, x + crop[1])


def _pad(a, crop, value):
  out = np.full((*crop, *a.shape[2:]), value, a.dtype)
  out[: a.shape[0], : a.shape[1]] = a  # bottom / right, as mmseg's Pad
  return out


def augment(
  image: np.ndarray,
  label: np.ndarray,
  rng: np.random.Generator,
  *,
  crop: tuple,
  scale: tuple,
  ratio_range: tuple = (0.5, 2.0),
  cat_max_ratio: float = 0.75,
  flip: bool = True,
  photometric: bool = True,
) -> tuple:
  """mmseg's train pipeline: RandomResize → RandomCrop → RandomFlip → PhotoMetricDistortion
  → pad (image 0, label 255) to the crop.

  Args:
    image, label: uint8 (H, W, 3) and uint8 (H, W).
    rng: the example's generator.
    crop: (height, width) of the output.
    scale: (long, short) sides the image is rescaled to fit, keeping its aspect ratio,
      before a factor drawn from `ratio_range`.
    cat_max_ratio: the largest share one class may take of a crop's labelled pixels (up to
      10 tries); 1 disables the check.
    flip, photometric: whether to flip horizontally (p = 0.5) and distort colours.
  Returns:
    (uint8 (crop_h, crop_w, 3) image, uint8 (crop_h, crop_w) label).
  """
  image, label = _augment(
    image, label, rng, tuple(crop), scale, ratio_range, cat_max_ratio, flip, photometric
  )
  return _pad(image, tuple(crop), 0), _pad(label, tuple(crop), IGNORE)


def _convert(a, alpha=1.0, beta=0.0):
  return np.clip(a.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def photometric_distortion(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """mmseg's PhotoMetricDistortion, each step with p = 0.5: brightness ±32, contrast × 0.5–1.5
  (before or after the rest, at random), saturation × 0.5–1.5, hue ± 18 OpenCV hue steps
  (mmseg's hue_delta=18 on OpenCV's 0–180 scale: ±36°).

  Args:
    image: uint8 (H, W, 3) RGB.
    rng: the example's generator.
  Returns:
    The distorted uint8 image.
  """
  contrast = lambda im: _convert(im, alpha=rng.uniform(0.5, 1.5)) if rng.random() < 0.5 else im
  if rng.random() < 0.5:
    image = _convert(image, beta=rng.uniform(-32, 32))
  contrast_first = rng.random() < 0.5
  if contrast_first:
    image = contrast(image)
  hsv = None
  if rng.random() < 0.5:
    hsv = np.array(Image.fromarray(image).convert("HSV"))
    hsv[..., 1] = _convert(hsv[..., 1], alpha=rng.uniform(0.5, 1.5))
  if rng.random() < 0.5:
    hsv = np.array(Image.fromarray(image).convert("HSV")) if hsv is None else hsv
    shift = round(rng.integers(-18, 18) * 256 / 180)  # OpenCV hue steps -> PIL's 0–255
    hsv[..., 0] = (hsv[..., 0].astype(np.int64) + shift) % 256
  if hsv is not None:
    bands = [Image.fromarray(np.ascontiguousarray(hsv[..., c])) for c in range(3)]
    image = np.asarray(Image.merge("HSV", bands).convert("RGB"))
  if not contrast_first:
    image = contrast(image)
  return image


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """float32 (v / 255 − mean) / std of a uint8 image (mean, std per channel on [0, 1])."""
  mean, std = np.asarray(mean, np.float32) * 255, np.asarray(std, np.float32) * 255
  return (np.asarray(image, np.float32) - mean) / std
