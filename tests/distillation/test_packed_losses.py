"""The losses over packed batches (issue 43) against the unpacked losses on each image
alone: a teacher (patch 8, CLS first) and a student (patch 4, CLS last) read 5 images of 4
sizes packed into the same rows and slots; every packed loss is the mean over the images of
the unpacked loss on that image alone (losses.py, the second implementation)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linearizer.distillation import losses
from linearizer.distillation import packed_losses as pl
from linearizer.models import common, packing

SIZES = ((16, 8), (8, 24), (16, 16), (24, 16), (8, 8))  # every side a multiple of 8
TEACHER = packing.View(8, 16, prefix=(packing.CLS,))
STUDENT = packing.View(4, 40, suffix=(packing.CLS,))
D = 6


def batch():
  images = [np.zeros((h, w, 3), np.float32) for h, w in SIZES]
  (t, s), slots = packing.pack_views(images, [TEACHER, STUDENT], max_images=3)
  assert (slots >= 0).sum(axis=1).min() >= 1 and (slots >= 0).sum(axis=1).max() >= 2
  return t, s, slots


def alone_tokens(seed, view):
  """Each image's own (1, n, D) tokens in the model's layout alone: CLS, then the grid."""
  rng = np.random.default_rng(seed)
  out = []
  for h, w in SIZES:
    n = (h // view.patch) * (w // view.patch) + 1
    out.append(rng.normal(size=(1, n, D)).astype(np.float32))
  return out


def packed_tokens(alone, packed, slots):
  """The same tokens laid out as `packed` holds them."""
  b, t = packed.kind.shape
  out = np.zeros((b, t, D), np.float32)
  for row, m in zip(*np.nonzero(slots >= 0)):
    start = packed.start[row, m]
    out[row, start : start + alone[slots[row, m]].shape[1]] = alone[slots[row, m]][0]
  return jnp.asarray(out)


def split(alone, view):
  """(cls, patches) of a layout alone: the teacher's CLS first, the student's last."""
  if view.prefix:
    return alone[:, :1], alone[:, 1:]
  return alone[:, -1:], alone[:, :-1]


def image_slice(packed, slots, index):
  """(row, the image's token slice) in `packed`."""
  row, m = [int(v[0]) for v in np.nonzero(slots == index)]
  start = int(packed.start[row, m])
  return row, slice(start, start + int(np.sum(np.asarray(packed.image[row]) == m)))


def grids(index):
  h, w = SIZES[index]
  return (h // 8, w // 8), (h // 4, w // 4)


def test_teacher_tokens_land_on_the_students_layout_resampled_per_image():
  t, s, slots = batch()
  teacher = alone_tokens(0, TEACHER)
  got = pl.teacher_on_student(packed_tokens(teacher, t, slots), t, s, teacher_prefix=1)
  for i in range(len(SIZES)):
    cls, patches = split(teacher[i], TEACHER)
    want = common.resample_grid(jnp.asarray(patches), *grids(i))
    row, span = image_slice(s, slots, i)
    np.testing.assert_allclose(got[row, span][:-1], want[0], atol=2e-6)
    np.testing.assert_array_equal(got[row, span][-1], cls[0, 0])


def test_masks_cover_a_fixed_share_of_each_images_patches():
  t, s, slots = batch()
  mask = np.asarray(pl.random_mask(jax.random.key(0), s, 0.5))
  assert not (mask & (np.asarray(s.kind) != packing.PATCH)).any()
  for i, (h, w) in enumerate(SIZES):
    row, span = image_slice(s, slots, i)
    assert mask[row, span].sum() == losses.num_masked((h // 4) * (w // 4), 0.5)
  other = np.asarray(pl.random_mask(jax.random.key(1), s, 0.5))
  assert (mask != other).any()


def unpacked(i, teacher_levels, student_levels, scope, mask, features):
  """losses.am_loss on image i alone, its visible patches from the packed mask."""
  t_grid, s_grid = grids(i)
  visible = None
  if mask is not None:
    row, span = mask
    visible = jnp.asarray(np.flatnonzero(~np.asarray(row[span][:-1]))[None])
  pairs = [
    (split(a[i], TEACHER), split(b[i], STUDENT)) for a, b in zip(teacher_levels, student_levels)
  ]
  return losses.am_loss(
    [p[0] for p in pairs],
    [p[1] for p in pairs],
    t_grid,
    s_grid,
    scope=scope,
    visible=visible,
    features=features,
  )[1]


@pytest.mark.parametrize(
  "scope, features", [("all", "raw"), ("visible", "raw"), ("cls", "raw"), ("visible", "centered")]
)
def test_am_is_the_mean_of_each_images_am_alone(scope, features):
  t, s, slots = batch()
  teacher_levels = [alone_tokens(k, TEACHER) for k in (1, 2)]
  student_levels = [alone_tokens(k, STUDENT) for k in (3, 4)]
  mask = pl.random_mask(jax.random.key(5), s, 0.5)
  _, per_level = pl.am_loss(
    [pl.teacher_on_student(packed_tokens(a, t, slots), t, s, 1) for a in teacher_levels],
    [packed_tokens(a, s, slots) for a in student_levels],
    s,
    scope,
    mask,
    features,
  )
  want = []
  for i in range(len(SIZES)):
    row, span = image_slice(s, slots, i)
    want.append(unpacked(i, teacher_levels, student_levels, scope, (mask[row], span), features))
  np.testing.assert_allclose(per_level, np.mean(want, axis=0), atol=2e-6)


def test_mp_and_final_are_the_mean_of_each_images_loss_alone():
  t, s, slots = batch()
  teacher = alone_tokens(6, TEACHER)
  prediction = alone_tokens(7, STUDENT)
  target = pl.teacher_on_student(packed_tokens(teacher, t, slots), t, s, 1)
  mask = pl.random_mask(jax.random.key(8), s, 0.5)
  mp = pl.mp_loss(packed_tokens(prediction, s, slots), target, s, mask)
  final = pl.final_loss(packed_tokens(prediction, s, slots), target, s)
  want_mp, want_final = [], []
  for i in range(len(SIZES)):
    row, span = image_slice(s, slots, i)
    t_grid, s_grid = grids(i)
    patches = jnp.asarray(split(teacher[i], TEACHER)[1])
    pred = jnp.asarray(split(prediction[i], STUDENT)[1])
    image_mask = jnp.asarray(mask[row, span][:-1][None])
    want_mp.append(losses.mp_loss(pred, patches, t_grid, s_grid, image_mask))
    want_final.append(losses.final_loss(pred, patches, t_grid, s_grid))
  np.testing.assert_allclose(mp, np.mean(want_mp), atol=2e-6)
  np.testing.assert_allclose(final, np.mean(want_final), atol=2e-6)
