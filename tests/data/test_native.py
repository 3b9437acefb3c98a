"""Images at their own size (issue 43): the token budget and the mixed-size digits, packed."""

import math

import numpy as np
import pytest

from linearizer import data
from linearizer.data import native
from linearizer.errors import UserError
from linearizer.models import packing


@pytest.mark.parametrize(
  "h, w, budget, want",
  [
    (56, 28, 100, (56, 28)),  # 8 x 4 patches of 7 fit: kept
    (60, 30, 100, (56, 28)),  # rounded down to the patch
    (280, 140, 50, (70, 35)),  # 40 x 20 patches shrink by sqrt(50/800) = 1/4: 10 x 5
    (280, 140, 49, (63, 28)),  # by sqrt(49/800): 9.9 x 4.95, rounded down: 9 x 4
    (7, 700, 10, (7, 70)),  # thin: the short side stays one patch, the long one is cut
  ],
)
def test_budget_size_keeps_small_images_and_shrinks_large_ones(h, w, budget, want):
  got = native.budget_size(h, w, 7, budget)
  assert got == want
  assert (got[0] // 7) * (got[1] // 7) <= budget


def test_budget_size_keeps_the_aspect_ratio_within_a_patch():
  rng = np.random.default_rng(0)
  for _ in range(200):
    h, w = rng.integers(16, 2000, 2)
    budget = int(rng.integers(1, 400))
    gh, gw = native.budget_size(int(h), int(w), 16, budget)
    assert gh % 16 == gw % 16 == 0 and (gh // 16) * (gw // 16) <= budget
    if (h // 16) * (w // 16) > budget and min(gh, gw) > 32:  # shrunk, both sides > 2 patches
      assert abs(math.log((gh / gw) / (h / w))) < math.log(1 + 2 * 16 / min(gh, gw))


def test_budget_size_refuses_what_it_cannot_size():
  with pytest.raises(UserError, match="smaller than one 16-px patch"):
    native.budget_size(8, 100, 16, 10)
  with pytest.raises(UserError, match="max_patches=0"):
    native.budget_size(64, 64, 16, 0)


def test_mixed_size_digits_pack_rows_of_at_least_two_sizes():
  """MNIST digits rescaled to sides in [1/2, 2] x 28 and aspect ratios in [1/2, 2]: sizes
  vary, and every packed row holds at least two image sizes."""
  digits, _ = data.mnist()
  rng = np.random.default_rng(0)
  images = []
  for digit in digits[:24]:
    image = native.fit(native.rescale(digit[..., None], rng), 4, 64)
    assert image.dtype == np.uint8 and (image.shape[0] // 4) * (image.shape[1] // 4) <= 64
    images.append(image.astype(np.float32))
  sizes = {im.shape[:2] for im in images}
  assert len(sizes) > 12 and min(min(s) for s in sizes) >= 8
  batch, slots = packing.pack(images, 4, 192, 8, suffix=(packing.CLS,))
  for row in slots:
    assert len({images[i].shape[:2] for i in row if i >= 0}) >= 2
