"""The two distillation losses (method.md §2–3) and the glue that feeds them.

The losses are pure functions on arrays. The glue pairs the teacher's and the student's
depth *levels* (AM's K groups of blocks; the paper's "stages"), aligns their tokens
(each model's CLS and patches as its `ModelOutput.roles` name them, on possibly different
patch grids) and gathers the tokens the student can see, with static shapes.
"""

from typing import Literal

import jax
import jax.numpy as jnp
import optax

from linearizer.errors import UserError
from linearizer.models import common

Scope = Literal["visible", "cls", "all"]
SCOPES = ("visible", "cls", "all")
# What AM compares (distill_loss.am_features): each level's residual stream as it is, with
# each token set's mean subtracted, or through the next block's own pre-norm.
AmFeatures = Literal["raw", "centered", "next_ln"]
AM_FEATURES = ("raw", "centered", "next_ln")
# How `final` and `blocks` normalise their targets (distill_loss.final_target).
FEATURE_TARGETS = ("ln", "raw")
# What `final` reads of the student (distill_loss.final_view): its masked forward (the one
# AM and MP read: no extra cost) or a second, unmasked forward of the whole image.
FINAL_VIEWS = ("masked", "full")


# ---------------------------------------------------------------------------------------
# Losses.
# ---------------------------------------------------------------------------------------
def cosine_similarities(f):
  """(B, n, d) -> (B, n, n) cosine similarities between the n tokens.

  At HIGHEST precision: the default runs f32 matmuls as TF32 on NVIDIA GPUs (~1e-3
  relative) and bf16 passes on TPU; the maps are small (n ≤ 197 tokens at 224²), so full f32
  costs nothing that shows.
  """
  f = f.astype(jnp.float32)
  f = f * jax.lax.rsqrt(jnp.sum(f * f, axis=-1, keepdims=True) + 1e-12)
  return jnp.einsum("bid,bjd->bij", f, f, precision=jax.lax.Precision.HIGHEST)


def similarity_map(f):
  """(B, n, d) -> (B, n, n): cosine similarities, then every row ℓ2-normalised (§2)."""
  a = cosine_similarities(f)
  return a * jax.lax.rsqrt(jnp.sum(a * a, axis=-1, keepdims=True) + 1e-12)


def activation_matching(teacher_levels, student_levels, rows=None):
  """L_AM = mean over stages and map rows of (1 − ⟨Ā_teacher(i,:), Ā_student(i,:)⟩).

  teacher_levels / student_levels: lists of (B, n, Dt) / (B, n, Ds), the same tokens in the
  same order; widths may differ since only n × n maps are compared. `rows` (a slice)
  restricts the mean to some rows, e.g. the CLS row. Returns (loss, per-stage losses).
  """
  if len(teacher_levels) != len(student_levels):
    raise UserError(f"{len(teacher_levels)} teacher levels vs {len(student_levels)} student.")
  per_level = []
  for t, s in zip(teacher_levels, student_levels):
    if t.shape[:2] != s.shape[:2]:
      raise UserError(f"Level token sets differ: teacher {t.shape} vs student {s.shape}.")
    cos = jnp.sum(similarity_map(t) * similarity_map(s), axis=-1)  # (B, n) row cosines
    cos = cos if rows is None else cos[:, rows]
    per_level.append(jnp.mean(1.0 - cos))
  per_level = jnp.stack(per_level)
  return jnp.mean(per_level), per_level


def off_diagonal_cosines(f):
  """(mean, std) over images and token pairs i ≠ j of the cosine similarities of (B, n, d)
  tokens: near 1 with a small std, the maps carry little (CLIP's outlier channels)."""
  a = cosine_similarities(f)
  off = ~jnp.eye(a.shape[-1], dtype=bool)
  return jnp.mean(a[:, off]), jnp.std(a[:, off])


def centered(f):
  """(B, n, d) tokens minus their own mean over the n tokens (AM's `centered` features)."""
  f = f.astype(jnp.float32)
  return f - jnp.mean(f, axis=1, keepdims=True)


def layer_norm(x, eps=1e-6):
  """Parameter-free LayerNorm over features: the MP target normalisation (MaskDistill)."""
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps)


def masked_prediction(prediction, target, mask, beta=1.0):
  """Smooth-L1(prediction, LN(target)) averaged over masked tokens only (§3).

  prediction, target: (B, N, Dt); mask: (B, N) bool, True = masked.
  """
  err = optax.huber_loss(prediction.astype(jnp.float32), layer_norm(target), delta=beta) / beta
  per_token = jnp.mean(err, axis=-1)
  mask = mask.astype(jnp.float32)
  return jnp.sum(per_token * mask) / jnp.maximum(jnp.sum(mask), 1.0)


# ---------------------------------------------------------------------------------------
# Glue: masks, levels, alignment.
# ---------------------------------------------------------------------------------------
def num_masked(num_patches: int, ratio: float) -> int:
  return int(round(num_patches * ratio))


def random_mask(rng, batch: int, num_patches: int, ratio: float):
  """Uniform random masking per image (MAE), a fixed count so shapes stay static.

  Returns (mask (B, N) bool with True = masked, visible (B, N − round(ratio·N)) sorted
  indices of the unmasked patches).
  """
  n_vis = num_patches - num_masked(num_patches, ratio)
  order = jnp.argsort(jax.random.uniform(rng, (batch, num_patches)), axis=-1)
  visible = jnp.sort(order[:, :n_vis], axis=-1)
  mask = jnp.ones((batch, num_patches), bool)
  mask = mask.at[jnp.arange(batch)[:, None], visible].set(False)
  return mask, visible


def level_ends(depth: int, num_levels: int) -> list:
  """Index of the last block of each of K equal levels: 12 blocks, K=4 -> [2, 5, 8, 11]."""
  if not 1 <= num_levels <= depth:
    raise UserError(f"num_stages={num_levels} must be between 1 and the depth {depth}.")
  return [round(depth * (k + 1) / num_levels) - 1 for k in range(num_levels)]


def level_pairs(teacher_depth: int, student_depth: int, num_levels: int) -> list:
  """[(teacher block, student block)] at the end of each of the K levels (method.md §2).

  The one pairing of depths that distillation, the pictures and the AM distance share.
  """
  return list(zip(level_ends(teacher_depth, num_levels), level_ends(student_depth, num_levels)))


def split_roles(x: jax.Array, roles) -> tuple:
  """(cls (B, 1, D) or None, patches (B, N, D)) of one block's tokens, by the model's roles."""
  return roles.cls_of(x), roles.patches_of(x)


def align(teacher, student, teacher_grid, student_grid, scope: Scope, visible=None):
  """Both token sets as `[cls, patches…]` in raster order, restricted by the AM scope.

  teacher, student: (cls (B, 1, D) or None, patches (B, N, D)) pairs (`split_roles`); the
  teacher's patches are resampled to the student's grid (§4). `visible` and `cls` keep
  CLS and the visible patches; `all` keeps every patch. CLS is matched only where both
  models have one; the `cls` scope needs both.
  """
  if scope not in SCOPES:
    raise UserError(f"Unknown AM scope {scope!r}; expected one of {SCOPES}.")
  (t_cls, t_patch), (s_cls, s_patch) = teacher, student
  t_patch = common.resample_grid(t_patch, teacher_grid, student_grid)
  if t_patch.shape[1] != s_patch.shape[1]:
    raise UserError(
      f"Teacher grid {student_grid} gives {t_patch.shape[1]} patches but the "
      f"student has {s_patch.shape[1]}."
    )
  if scope != "all" and visible is not None:
    t_patch = jnp.take_along_axis(t_patch, visible[..., None], axis=1)
    s_patch = jnp.take_along_axis(s_patch, visible[..., None], axis=1)
  if t_cls is None or s_cls is None:
    if scope == "cls":
      raise UserError(
        "AM scope 'cls' needs a CLS token in both teacher and student; use 'visible' or 'all'."
      )
    return t_patch, s_patch
  return jnp.concatenate([t_cls, t_patch], axis=1), jnp.concatenate([s_cls, s_patch], axis=1)


def am_loss(
  teacher_levels,
  student_levels,
  teacher_grid,
  student_grid,
  *,
  scope: Scope = "visible",
  visible=None,
  features: AmFeatures = "raw",
):
  """Activation matching between paired levels, each a (cls, patches) pair (`align`).

  features='centered' subtracts each compared token set's mean before the cosines (on both
  sides); 'next_ln' is applied by the caller, which holds the models' norms.
  """
  if features not in AM_FEATURES:
    raise UserError(f"Unknown am_features {features!r}; expected one of {AM_FEATURES}.")
  pairs = [
    align(t, s, teacher_grid, student_grid, scope, visible)
    for t, s in zip(teacher_levels, student_levels)
  ]
  if features == "centered":
    pairs = [(centered(t), centered(s)) for t, s in pairs]
  rows = slice(0, 1) if scope == "cls" else None
  return activation_matching([t for t, _ in pairs], [s for _, s in pairs], rows=rows)


def feature_regression(prediction, target, normalise: str = "ln"):
  """Mean squared error between (B, n, D) predictions and targets over every token and
  feature: FitNets' hint loss (Romero et al. 2015, eq. 3, averaged rather than summed), the
  `final` and `blocks` losses. normalise='ln' compares with the parameter-free LayerNorm of
  each target token (MP's normalisation; a residual stream's scale grows with depth and
  would weigh the deep levels most), 'raw' with the targets as they are."""
  if normalise not in FEATURE_TARGETS:
    raise UserError(f"Unknown target {normalise!r}; expected one of {FEATURE_TARGETS}.")
  target = layer_norm(target) if normalise == "ln" else target.astype(jnp.float32)
  return jnp.mean(jnp.square(prediction.astype(jnp.float32) - target))


def final_loss(prediction, teacher_patches, teacher_grid, student_grid, normalise: str = "ln"):
  """`final`: the student's final patch tokens through a linear map (the caller's) against
  the teacher's final-block patch tokens (on the student's grid), squared L2 over every
  patch (GTR's single loss; ViT-AdaLA's final-feature alignment)."""
  target = common.resample_grid(teacher_patches, teacher_grid, student_grid)
  return feature_regression(prediction, target, normalise)


def mp_loss(prediction, teacher_patches, teacher_grid, student_grid, mask, beta: float = 1.0):
  """Masked prediction of the teacher's final-block patch tokens (on the student's grid)."""
  target = common.resample_grid(teacher_patches, teacher_grid, student_grid)
  return masked_prediction(prediction, target, mask, beta)
