"""Images at their own size, for packed batches (issue 43; docs/packing.md).

`budget_size` is the size an image is read at: its own, rounded to the patch, unless it has
more than the token budget's patches, when it shrinks (aspect ratio kept) until it fits.
SigLIP 2's NaFlex also resizes to a patch budget, but grows small images to fill it; here a
small image keeps its size, so a packed row holds images at their own resolutions.
`rescale` makes a mixed-size source of a square one (the demo's and the smoke's digits):
each image's side scaled by a random factor and its aspect ratio drawn, both log-uniform.
"""

import math

import numpy as np
from PIL import Image

from linearizer.errors import UserError


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
