"""The distillation losses over packed batches (issue 43): each image's own maps and masks.

A packed teacher and student read the same images in the same rows and slots
(`packing.pack_views`), each with its own patch and layout. Everything here is computed on
the student's layout: the teacher's tokens are brought onto it image by image
(`teacher_on_student`: its CLS onto the student's CLS, its patches resampled from its grid
to the student's with `common.resample_grid`'s bicubic rule), and every loss is the mean
over the images in the batch of that image's loss alone, which is what the unpacked losses
compute for a batch of equal images (`losses.py`; tests/distillation/test_packed_losses.py
holds each packed loss against the unpacked one on every image alone).
"""

import jax
import jax.numpy as jnp
import optax

from linearizer.distillation import losses
from linearizer.errors import UserError
from linearizer.models import packing
from linearizer.models.packing import Packed


def teacher_on_student(tokens, teacher: Packed, student: Packed, teacher_prefix: int):
  """(B, Ts, D): the teacher's (B, Tt, D) tokens on the student's layout, image by image:
  at a student patch, the teacher's patches resampled to the student's grid (bicubic, as
  `losses.align` resamples a square batch); at a student CLS, the teacher's CLS (zeros if
  it has none, `teacher_prefix` 0); zeros elsewhere. `teacher_prefix`: the tokens the
  teacher puts before an image's patches."""
  m = teacher.grid.shape[1]
  slot = jnp.minimum(student.image, m - 1)
  t_grid, s_grid = (jnp.take_along_axis(p.grid, slot[..., None], 1) for p in (teacher, student))
  t_start = jnp.take_along_axis(teacher.start, slot, 1)
  ry, wy = packing.cubic_taps(t_grid[..., 0], s_grid[..., 0], student.row)  # (B, Ts, 4)
  rx, wx = packing.cubic_taps(t_grid[..., 1], s_grid[..., 1], student.col)
  first = t_start + teacher_prefix  # the image's first teacher patch
  where = first[..., None, None] + ry[..., :, None] * t_grid[..., 1, None, None] + rx[..., None, :]
  b, ts = student.kind.shape
  gathered = jnp.take_along_axis(tokens, where.reshape(b, ts * 16)[..., None], axis=1)
  weights = (wy[..., :, None] * wx[..., None, :]).reshape(b, ts, 16, 1)
  patches = jnp.sum(gathered.reshape(b, ts, 16, -1).astype(jnp.float32) * weights, axis=2)
  out = jnp.where((student.kind == packing.PATCH)[..., None], patches, 0.0)
  if teacher_prefix:
    cls = jnp.take_along_axis(tokens, jnp.take_along_axis(teacher.cls_at, slot, 1)[..., None], 1)
    out = jnp.where((student.kind == packing.CLS)[..., None], cls.astype(jnp.float32), out)
  return out


def random_mask(rng, student: Packed, ratio: float):
  """(B, T) bool, True = masked: round(ratio · n) of each image's n patches, uniformly at
  random per image (`losses.random_mask` per image; a fixed count per image, as there)."""
  b, t = student.kind.shape
  m = student.grid.shape[1]
  patch = student.kind == packing.PATCH
  key = jnp.where(patch, student.image, m + 1) + jax.random.uniform(rng, (b, t))
  order = jnp.argsort(key, axis=1)  # each image's patches together, in random order
  rank_sorted = jnp.zeros((b, t), jnp.int32).at[jnp.arange(b)[:, None], order].set(jnp.arange(t))
  counts = student.grid[..., 0] * student.grid[..., 1]  # (B, M) patches per image
  first = jnp.cumsum(counts, axis=1) - counts  # where each image's patches start in `order`
  slot = jnp.minimum(student.image, m - 1)
  rank = rank_sorted - jnp.take_along_axis(first, slot, 1)
  masked = jnp.round(jnp.take_along_axis(counts, slot, 1) * ratio)
  return patch & (rank < masked)


def per_image_mean(values, where, packed: Packed):
  """Mean over the images that have any `where` token of each image's mean of (B, T)
  `values` over its `where` tokens."""
  mean = packed.image_mean(values[..., None].astype(jnp.float32), where)[..., 0]  # (B, M)
  has = packed.image_tokens(where).any(axis=1)
  return jnp.sum(jnp.where(has, mean, 0.0)) / jnp.maximum(jnp.sum(has), 1)


def similarity_rows(f, where, packed: Packed):
  """(B, T, T): `losses.similarity_map` of each image's `where` tokens among themselves
  (zero between images and at every other token)."""
  same = (packed.image[:, :, None] == packed.image[:, None, :]) & where[:, :, None]
  same = same & where[:, None, :]
  a = jnp.where(same, losses.cosine_similarities(f), 0.0)
  return a * jax.lax.rsqrt(jnp.sum(a * a, axis=-1, keepdims=True) + 1e-12)


def compared(student: Packed, scope, mask=None, cls=True):
  """(B, T) bool: the tokens AM (and `blocks`, `mixer_out`) compare, as `losses.align`
  picks them: CLS where both models have one (`cls`), and every patch (scope 'all') or the
  unmasked ones ('visible', 'cls')."""
  if scope not in losses.SCOPES:
    raise UserError(f"Unknown AM scope {scope!r}; expected one of {losses.SCOPES}.")
  if scope == "cls" and not cls:
    raise UserError(
      "AM scope 'cls' needs a CLS token in both teacher and student; use 'visible' or 'all'."
    )
  where = (student.kind == packing.PATCH) | ((student.kind == packing.CLS) & cls)
  return where & ~mask if scope != "all" and mask is not None else where


def am_loss(
  teacher_levels, student_levels, student: Packed, scope, mask=None, features="raw", cls=True
):
  """`losses.am_loss` per image, averaged over the images: the teacher's levels already on
  the student's layout (`teacher_on_student`), the student's (B, T, D) as they are.

  scope 'all' compares CLS and every patch, 'visible' CLS and the unmasked patches, 'cls'
  the CLS row of the 'visible' maps; CLS only with `cls` (both models have one).
  """
  where = compared(student, scope, mask, cls)
  rows = student.kind == packing.CLS if scope == "cls" else where
  per_level = []
  for t, s in zip(teacher_levels, student_levels, strict=True):
    if features == "centered":
      t, s = (centered(f, where, student) for f in (t, s))
    cos = jnp.sum(similarity_rows(t, where, student) * similarity_rows(s, where, student), -1)
    per_level.append(per_image_mean(1.0 - cos, rows, student))
  per_level = jnp.stack(per_level)
  return jnp.mean(per_level), per_level


def centered(f, where, packed: Packed):
  """(B, T, D): f minus each image's mean over its `where` tokens (`losses.centered`)."""
  means = packed.image_mean(f.astype(jnp.float32), where)  # (B, M, D)
  slot = jnp.minimum(packed.image, packed.grid.shape[1] - 1)
  return f.astype(jnp.float32) - jnp.take_along_axis(means, slot[..., None], 1)


def mp_loss(prediction, target, student: Packed, mask, beta: float = 1.0):
  """`losses.masked_prediction` per image, averaged over the images with masked patches:
  Smooth-L1 between the student's (B, T, Dt) predictions and LN of the teacher's final
  patches on the student's layout (`teacher_on_student`), at the masked patches."""
  err = optax.huber_loss(prediction.astype(jnp.float32), losses.layer_norm(target), delta=beta)
  return per_image_mean(jnp.mean(err / beta, axis=-1), mask, student)


def final_loss(prediction, target, student: Packed, normalise: str = "ln"):
  """`losses.feature_regression` per image over its patches, averaged over the images."""
  if normalise not in losses.FEATURE_TARGETS:
    raise UserError(f"Unknown target {normalise!r}; expected one of {losses.FEATURE_TARGETS}.")
  target = losses.layer_norm(target) if normalise == "ln" else target.astype(jnp.float32)
  err = jnp.mean(jnp.square(prediction.astype(jnp.float32) - target), axis=-1)
  return per_image_mean(err, student.kind == packing.PATCH, student)


def level_regression(projs, teacher_levels, student_levels, student: Packed, where, target):
  """`distill.level_regression` per image: the mean over levels of each image's mean
  squared error between proj(student) and the teacher (LN'd with target 'ln') over its
  `where` tokens (`compared`), averaged over the images."""
  per_level = []
  for proj, t, s in zip(projs, teacher_levels, student_levels, strict=True):
    t = losses.layer_norm(t) if target == "ln" else t.astype(jnp.float32)
    err = jnp.mean(jnp.square(proj(s).astype(jnp.float32) - t), axis=-1)
    per_level.append(per_image_mean(err, where, student))
  return jnp.mean(jnp.stack(per_level))
