"""The two distillation losses (method.md §2–3) and the glue that feeds them.

The losses are pure functions on arrays. The glue picks the stages, aligns teacher and
student tokens (teacher `[cls, patches]`, student `[patches, cls]`, possibly on different
patch grids) and gathers the tokens the student can see, with static shapes.
"""
import jax
import jax.numpy as jnp
import optax

from linearizer.models import common

SCOPES = ("visible", "cls", "all")


# ---------------------------------------------------------------------------------------
# Losses.
# ---------------------------------------------------------------------------------------
def cosine_similarities(f):
  """(B, n, d) -> (B, n, n) cosine similarities between the n tokens."""
  f = f.astype(jnp.float32)
  f = f * jax.lax.rsqrt(jnp.sum(f * f, axis=-1, keepdims=True) + 1e-12)
  return jnp.einsum("bid,bjd->bij", f, f)


def similarity_map(f):
  """(B, n, d) -> (B, n, n): cosine similarities, then every row ℓ2-normalised (§2)."""
  a = cosine_similarities(f)
  return a * jax.lax.rsqrt(jnp.sum(a * a, axis=-1, keepdims=True) + 1e-12)


def activation_matching(teacher_stages, student_stages, rows=None):
  """L_AM = mean over stages and map rows of (1 − ⟨Ā_teacher(i,:), Ā_student(i,:)⟩).

  teacher_stages / student_stages: lists of (B, n, Dt) / (B, n, Ds), the same tokens in the
  same order; widths may differ since only n × n maps are compared. `rows` (a slice)
  restricts the mean to some rows, e.g. the CLS row. Returns (loss, per-stage losses).
  """
  if len(teacher_stages) != len(student_stages):
    raise ValueError(f"{len(teacher_stages)} teacher stages vs {len(student_stages)} student.")
  per_stage = []
  for t, s in zip(teacher_stages, student_stages):
    if t.shape[:2] != s.shape[:2]:
      raise ValueError(f"Stage token sets differ: teacher {t.shape} vs student {s.shape}.")
    cos = jnp.sum(similarity_map(t) * similarity_map(s), axis=-1)  # (B, n) row cosines
    cos = cos if rows is None else cos[:, rows]
    per_stage.append(jnp.mean(1.0 - cos))
  per_stage = jnp.stack(per_stage)
  return jnp.mean(per_stage), per_stage


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
# Glue: masks, stages, alignment.
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


def stage_ends(depth: int, num_stages: int) -> list:
  """Index of the last block of each of K equal stages: 12 blocks, K=4 -> [2, 5, 8, 11]."""
  if not 1 <= num_stages <= depth:
    raise ValueError(f"num_stages={num_stages} must be between 1 and the depth {depth}.")
  return [round(depth * (k + 1) / num_stages) - 1 for k in range(num_stages)]


def teacher_patches(tokens, teacher_grid, student_grid):
  """Teacher patch tokens (without CLS) on the student's patch grid (§4: resample)."""
  return common.resample_grid(tokens[:, 1:], teacher_grid, student_grid)


def align(teacher_tokens, student_tokens, teacher_grid, student_grid, scope, visible=None):
  """Both token sets as `[cls, patches…]` in raster order, restricted by the AM scope.

  `visible` and `cls` keep CLS and the visible patches; `all` keeps every patch.
  """
  if scope not in SCOPES:
    raise ValueError(f"Unknown AM scope {scope!r}; expected one of {SCOPES}.")
  t_patch = teacher_patches(teacher_tokens, teacher_grid, student_grid)
  s_patch = student_tokens[:, :-1]
  if t_patch.shape[1] != s_patch.shape[1]:
    raise ValueError(f"Teacher grid {student_grid} gives {t_patch.shape[1]} patches but the "
                     f"student has {s_patch.shape[1]}.")
  if scope != "all" and visible is not None:
    t_patch = jnp.take_along_axis(t_patch, visible[..., None], axis=1)
    s_patch = jnp.take_along_axis(s_patch, visible[..., None], axis=1)
  t = jnp.concatenate([teacher_tokens[:, :1], t_patch], axis=1)
  s = jnp.concatenate([student_tokens[:, -1:], s_patch], axis=1)
  return t, s


def am_loss(teacher_stages, student_stages, teacher_grid, student_grid, *, scope="visible",
            visible=None):
  """Activation matching between stage outputs picked with `stage_ends` on each side."""
  pairs = [align(t, s, teacher_grid, student_grid, scope, visible)
           for t, s in zip(teacher_stages, student_stages)]
  rows = slice(0, 1) if scope == "cls" else None
  return activation_matching([t for t, _ in pairs], [s for _, s in pairs], rows=rows)


def mp_loss(prediction, teacher_final_block, teacher_grid, student_grid, mask, beta=1.0):
  """Masked prediction of the teacher's final-block patch tokens (on the student's grid)."""
  target = teacher_patches(teacher_final_block, teacher_grid, student_grid)
  return masked_prediction(prediction, target, mask, beta)
