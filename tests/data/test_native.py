"""Images at their own size (issue 43): the token budget and the mixed-size digits, packed."""

import math

import jax
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


def stream(**kw):
  digits, labels = data.mnist()
  source = data.ArraySource(digits[:200], labels[:200], "mnist")
  # unit 8: both patches divide every side; 16 patches of 8 are 64 of the student's 4
  transform = native.NativeTransform(
    8, 16, (0.5,) * 3, (0.5,) * 3, train=True, flip=True, mixed=True
  )
  views = [packing.View(4, 192, suffix=(packing.CLS,)), packing.View(8, 64, prefix=(packing.CLS,))]
  args = dict(max_images=8, rows=4, images_per_step=16, seed=3)
  return native.packed_stream(source, transform, views, **{**args, **kw})


def sizes_per_row(view):
  return [
    len({tuple(g) for g, ok in zip(np.asarray(grid), np.asarray(valid)) if ok})
    for grid, valid in zip(view.grid, view.valid)
  ]


def test_the_packed_stream_resumes_and_splits_over_processes():
  first = [next(it) for it in [stream()] for _ in range(3)]
  resumed = next(stream(start_step=2))
  for a, b in zip(first[2].views + (first[2].label,), resumed.views + (resumed.label,)):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_array_equal(x, y)
  for step in first:  # two views of the same images in the same slots
    s, t = step.views  # the student's (patch 4), the teacher's (patch 8)
    np.testing.assert_array_equal(t.grid * 8, s.grid * 4)
    assert step.dropped == 0 and (step.label >= 0).sum() == 16
  halves = [next(stream(process_index=p, process_count=2)) for p in (0, 1)]
  assert all(h.views[1].kind.shape[0] == 2 for h in halves)
  got = sorted(np.concatenate([h.label[h.label >= 0] for h in halves]).tolist())
  assert got == sorted(first[0].label[first[0].label >= 0].tolist())


def test_images_past_the_rows_are_dropped_and_counted():
  """Fewer rows than the images need: the rows are full (every one holds two image sizes
  or more, the mixed-size source's promise) and the rest are counted as dropped."""
  for step in [next(it) for it in [stream(rows=2)] for _ in range(4)]:
    assert step.views[1].kind.shape[0] == 2
    assert step.dropped == 16 - (step.label >= 0).sum() > 0
    assert min(sizes_per_row(step.views[0])) >= 2
