"""DigitScenes, the built-in segmentation dataset: canvases of 2–4 bold MNIST digits on a dark
noisy coloured background, label 0 = background and d + 1 = the ink of a digit d. Scene i is
a function of (seed, split, i) alone; train and test scenes draw on disjoint MNIST images
(`data.split_index`).
"""

import functools

import numpy as np
from PIL import Image, ImageFilter

from linearizer import data
from linearizer.errors import UserError
from linearizer.segmentation.sources import SPLITS, check_split


@functools.lru_cache(maxsize=1)
def _mnist():
  return data.mnist()  # read once per process, also in grain's workers


# The defaults of segment.data.digits / digit_side (configs/tool_blocks.py): digits per
# scene, and a digit's side as a fraction of the canvas's.
DIGITS = (2, 4)
DIGIT_SIDE = (0.25, 0.5)
# Backgrounds darker than this in every channel, digits lighter than 255 − this: MNIST's
# light strokes on dark, in colour, so a teacher trained on MNIST meets digits it knows.
DARK = 96


def bold_digit(digit: np.ndarray, side: int) -> Image.Image:
  """An MNIST digit with its strokes thickened (a 3×3 max filter at 28²), resized to
  `side`: thin strokes would leave a few per cent of a canvas labelled, and a model on a
  CPU budget learns to call everything background."""
  return (
    Image.fromarray(digit).filter(ImageFilter.MaxFilter(3)).resize((side, side), Image.BILINEAR)
  )


class DigitScenes:
  """Canvases of 2–4 bold MNIST digits, light on a dark noisy coloured background; label 0 = background,
  d + 1 = the ink of a digit d. Train and test scenes draw on disjoint MNIST images, and
  scene i is a function of (seed, split, i) alone."""

  num_classes = 11

  def __init__(
    self,
    split: str,
    size: int = 128,
    num_scenes: int = 0,
    seed: int = 0,
    digits: tuple = DIGITS,
    digit_side: tuple = DIGIT_SIDE,
  ):
    check_split(split, "digitscenes")
    if size < 16:
      raise UserError(f"digitscenes: size={size}; expected a canvas side of at least 16.")
    self.split, self.size, self.seed = split, int(size), int(seed)
    self.digits, self.digit_side = tuple(digits), tuple(digit_side)
    self.num_scenes = int(num_scenes) or (2000 if split == "train" else 200)
    self.pool = data.split_index(len(_mnist()[0]), split, data.TEST_FRACTION)
    self.name = f"digitscenes:{split}"

  def __len__(self) -> int:
    return self.num_scenes

  def __getitem__(self, i: int) -> tuple:
    image, label, _ = self._compose(i)
    return image, label

  def layout(self, i: int) -> list:
    """The digits of scene i in drawing order: [(MNIST index, (top, left, side)), ...]."""
    return self._compose(i)[2]

  def digits_of(self, i: int) -> list:
    """The MNIST indices scene i is made of (all from this split's share of MNIST)."""
    return [m for m, _ in self.layout(i)]

  def _compose(self, i):
    if not 0 <= i < self.num_scenes:
      raise IndexError(f"{self.name} has {self.num_scenes} scenes; asked for {i}.")
    digits, classes = _mnist()
    rng = np.random.default_rng([self.seed, SPLITS.index(self.split), int(i)])
    s = self.size
    base = rng.integers(0, DARK, 3).astype(np.float32)  # MNIST's light-on-dark, tinted
    image = base + rng.normal(0.0, 6.0, (s, s, 3)).astype(np.float32)  # RGB matters a little
    label = np.zeros((s, s), np.uint8)
    owner = np.full((s, s), -1, np.int16)  # which digit's ink each pixel shows
    placed, ink_of, count = [], [], rng.integers(self.digits[0], self.digits[1] + 1)
    for _ in range(4 * count):  # a digit that finds no place is drawn anew
      if len(placed) == count:
        break
      m = int(self.pool[rng.integers(len(self.pool))])
      side = max(4, round(s * rng.uniform(*self.digit_side)))
      glyph = bold_digit(digits[m], side)
      alpha = np.asarray(glyph, np.float32) / 255
      ink = alpha > 127 / 255
      if not ink.any():  # a thin stroke shrunk below the ink threshold: no digit to see
        continue
      colour = _contrasting(base, rng)
      # Overlap is fine, hiding an earlier digit is not: a place covering more than half of
      # an earlier digit's visible ink is redrawn, so every digit drawn keeps some labelled
      # pixels.
      for _ in range(20):
        y, x = rng.integers(0, s - side + 1, 2)
        window = owner[y : y + side, x : x + side]
        hidden = np.bincount(window[ink & (window >= 0)], minlength=len(placed))
        if all(2 * h <= n for h, n in zip(hidden, ink_of)):
          break
      else:
        continue
      ink_of = [n - h for n, h in zip(ink_of, hidden)] + [int(ink.sum())]
      view = image[y : y + side, x : x + side]
      view[:] = view * (1 - alpha[..., None]) + colour * alpha[..., None]  # anti-aliased
      label[y : y + side, x : x + side][ink] = classes[m] + 1
      window[ink] = len(placed)
      placed.append((m, (int(y), int(x), side)))
    return np.clip(np.round(image), 0, 255).astype(np.uint8), label, placed


def _contrasting(base, rng):
  """A light colour clearly unlike `base` (≥ 120 apart in RGB); else the farthest corner."""
  for _ in range(10):
    colour = rng.integers(256 - DARK, 256, 3).astype(np.float32)
    if np.linalg.norm(colour - base) >= 120:
      return colour
  return np.where(base < 128, 255.0, 0.0).astype(np.float32)
