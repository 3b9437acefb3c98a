"""The simpler recipes of 2026 (issue: which recipe?): `final` and `blocks` against a float64
NumPy recomputation from the same models' outputs, by hand on a tiny example, and
`student_init='teacher_mlp'` (the MLPs copied, the mixer left at its own init).

Tolerances: hand values and the NumPy recomputation <= 1e-5 absolute (float32 maths).
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import common as cfg_common
from configs import demo
from linearizer import models
from linearizer.distillation import distill, losses, teacher_init
from linearizer.distillation import stage as distill_stage
from linearizer.errors import UserError

TOL = 1e-5
TEACHER = dict(width=32, depth=2, num_heads=2, mlp_dim=64, image_size=16)
FIT = dict(width=32, depth=2, expand=1, headdim=16, ngroups=2, d_state=16, mlp_ratio=2.0)
STUDENT = dict(image_size=16, chunk_size=8, **FIT)


def np_ln(x, eps=1e-6):
  x = np.asarray(x, np.float64)
  return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)


def test_feature_regression_by_hand():
  """Two tokens of two features: LN([1, 3]) = [-1, 1] (eps aside), LN([2, 2]) = [0, 0]."""
  pred = jnp.asarray([[[0.0, 1.0], [1.0, 1.0]]])
  target = jnp.asarray([[[1.0, 3.0], [2.0, 2.0]]])
  want_ln = ((0 + 1) ** 2 + (1 - 1) ** 2 + 1 + 1) / 4  # ≈ 0.5 (LN's eps shifts it < 1e-5)
  assert abs(float(losses.feature_regression(pred, target, "ln")) - want_ln) < TOL
  want_raw = ((0 - 1) ** 2 + (1 - 3) ** 2 + (1 - 2) ** 2 + (1 - 2) ** 2) / 4
  assert abs(float(losses.feature_regression(pred, target, "raw")) - want_raw) < TOL
  with pytest.raises(UserError, match="target 'zscore'"):
    losses.feature_regression(pred, target, "zscore")


def loss_config(**weights):
  return ml_collections.ConfigDict(cfg_common.distill_loss(num_stages=2, **weights).to_dict())


@functools.cache
def models_pair():
  teacher = models.build("vit", "Ti/4", seed=0, **TEACHER)
  student = models.build("adventurer", "Ti/4", seed=1, **STUDENT)
  return teacher, student


def step_terms(cfg, seed):
  """One batch of the distillation losses on the tiny pair: (distiller, images, the
  teacher's targets, levels, mask, visible, total, metrics)."""
  teacher, student = models_pair()
  distiller = distill.Distiller(student, teacher.cfg.width, rngs=nnx.Rngs(3), loss=cfg)
  images = jnp.asarray(np.random.default_rng(seed).standard_normal((2, 16, 16, 3)), jnp.float32)
  stage = ml_collections.ConfigDict(dict(loss=cfg, teacher_input="resample"))
  levels = losses.level_pairs(teacher.cfg.depth, student.cfg.depth, 2)
  targets = distill.make_teacher_targets(teacher, student.cfg, stage, levels)(
    nnx.state(teacher, nnx.Param), images
  )
  mask, visible = losses.random_mask(jax.random.key(0), 2, 16, 0.5)
  total, metrics = distill.distill_losses(
    distiller=distiller,
    teacher_levels=targets["levels"],
    teacher_final=targets["final"],
    images=images,
    mask=mask,
    visible=visible,
    cfg=cfg,
    teacher_grid=(4, 4),
    levels=levels,
    teacher_mixers=targets.get("mixers"),
  )
  return distiller, images, targets, levels, mask, visible, total, metrics


@pytest.mark.parametrize("view", ["full", "masked"])
def test_final_and_blocks_are_the_regressions_they_say(view):
  """The step's `final` and `blocks` terms equal a NumPy recomputation from the teacher's
  targets, the student's outputs and the distiller's own maps."""
  teacher, student = models_pair()
  cfg = loss_config(w_am=0.0, w_mp=0.0, w_final=1.0, w_blocks=0.5, final_view=view, scope="all")
  distiller, images, targets, levels, mask, _, total, metrics = step_terms(cfg, seed=0)
  assert len(distiller.block_projs) == 2
  out = student(images, mask=mask if view == "masked" else None, train=True)
  proj = lambda lin, x: (
    np.asarray(x, np.float64) @ np.asarray(lin.kernel[...]) + np.asarray(lin.bias[...])
  )
  want_final = np.mean((proj(distiller.final_proj, out.patches) - np_ln(targets["final"])) ** 2)
  assert abs(float(metrics["final"]) - want_final) < TOL
  masked = student(images, mask=mask, train=True)  # the blocks read AM's (masked) forward
  per_level = []
  for lin, (t_cls, t_patch), (_, j) in zip(distiller.block_projs, targets["levels"], levels):
    s = masked.blocks[j]
    s_tokens = np.concatenate([masked.roles.cls_of(s), masked.roles.patches_of(s)], axis=1)
    t_tokens = np.concatenate([t_cls, t_patch], axis=1)
    per_level.append(np.mean((proj(lin, s_tokens) - np_ln(t_tokens)) ** 2))
  assert abs(float(metrics["blocks"]) - np.mean(per_level)) < TOL
  assert abs(float(total) - (want_final + 0.5 * np.mean(per_level))) < 2 * TOL
  assert "am" not in metrics and "mp" not in metrics


def test_the_papers_distiller_is_unchanged_without_the_new_weights():
  """No new parameters unless a new loss is weighed: checkpoints of the paper's recipe keep
  their state."""
  teacher, student = models_pair()
  plain = distill.Distiller(student, 32, rngs=nnx.Rngs(3), loss=loss_config())
  assert plain.final_proj is None and plain.block_projs is None
  names = {".".join(map(str, k)) for k, _ in nnx.to_flat_state(nnx.state(plain, nnx.Param))}
  assert not {n for n in names if "final_proj" in n or "block_projs" in n}


def test_teacher_mlp_copies_the_mlps_and_leaves_the_mixer_random():
  teacher, _ = models_pair()
  fresh = models.build("adventurer", "Ti/4", seed=7, **STUDENT)
  copied = models.build("adventurer", "Ti/4", seed=7, **STUDENT)
  rows = teacher_init.init_from_teacher(copied, teacher, allow_partial=False, mixer=False)
  for a, b in zip(copied.layers, fresh.layers):
    np.testing.assert_array_equal(a.mixer.in_proj.kernel[...], b.mixer.in_proj.kernel[...])
    np.testing.assert_array_equal(a.mixer.conv_weight[...], b.mixer.conv_weight[...])
    np.testing.assert_array_equal(a.mixer.out_proj.kernel[...], b.mixer.out_proj.kernel[...])
  np.testing.assert_allclose(
    copied.layers[0].mlp.w3.kernel[...], teacher.blocks[0].fc2.kernel[...], rtol=0
  )
  np.testing.assert_array_equal(copied.patch_embed.kernel[...], teacher.patch_embed.kernel[...])
  text = teacher_init.format_table(rows, depth=2)
  assert "student_init='teacher_mlp': the mixer keeps its own init" in text


def test_an_unknown_final_view_or_target_is_refused_before_the_run():
  for name, bad in (("final_view", "sideways"), ("final_target", "zscore")):
    config = ml_collections.ConfigDict(demo.get_config("smoke").to_dict())
    config.distill.loss[name] = bad
    with pytest.raises(UserError, match=f"distill.loss.{name}='{bad}'"):
      distill_stage.check_config(config)


def branch_inputs(embedded, out):
  """Each block's input: the embedding, then the previous block's output."""
  return [embedded, *out.blocks[:-1]]


def test_mixers_are_each_blocks_token_mixing_branch():
  """`ModelOutput.mixers` against the branch recomputed from each block's input with the
  block's own pieces (attention after norm1 and layer scale; Adventurer's `mix`)."""
  teacher, student = models_pair()
  images = jnp.asarray(np.random.default_rng(1).standard_normal((2, 16, 16, 3)), jnp.float32)
  t_out = teacher(images)
  for block, x, mixed in zip(
    teacher.blocks, branch_inputs(teacher.embed(images), t_out), t_out.mixers
  ):
    np.testing.assert_allclose(
      mixed, block._scaled(block.attn(block.norm1(x)), block.ls1), atol=TOL
    )
  mask, _ = losses.random_mask(jax.random.key(1), 2, 16, 0.5)
  s_out = student(images, mask=mask)
  for layer, h, mixed in zip(
    student.layers, branch_inputs(student.embed(images, mask), s_out), s_out.mixers
  ):
    np.testing.assert_allclose(mixed, layer.mix(h), atol=TOL)


def test_mixer_out_is_the_regression_it_says():
  """The step's `mixer_out` term equals a NumPy recomputation: per AM level, the student's
  mixer branch (masked forward, AM's tokens) through its map onto the LN of the teacher's
  attention branch; no map and no target unless weighed."""
  teacher, student = models_pair()
  cfg = loss_config(w_am=0.0, w_mp=0.0, w_mixer=2.0, scope="visible")
  distiller, images, targets, levels, mask, visible, total, metrics = step_terms(cfg, seed=2)
  assert len(distiller.mixer_projs) == 2 and distiller.block_projs is None
  t_out, s_out = teacher(images), student(images, mask=mask, train=True)
  pick = lambda x: np.take_along_axis(np.asarray(x, np.float64), np.asarray(visible)[..., None], 1)
  per_level = []
  for lin, (i, j) in zip(distiller.mixer_projs, levels):
    t, s = t_out.mixers[i], s_out.mixers[j]
    t_tokens = np.concatenate([t[:, :1], pick(t[:, 1:])], axis=1)  # ViT: [cls, patches]
    s_tokens = np.concatenate([s[:, -1:], pick(s[:, :-1])], axis=1)  # Adventurer: [..., cls]
    pred = s_tokens @ np.asarray(lin.kernel[...], np.float64) + np.asarray(lin.bias[...])
    per_level.append(np.mean((pred - np_ln(t_tokens)) ** 2))
  assert abs(float(metrics["mixer_out"]) - np.mean(per_level)) < TOL
  assert abs(float(total) - 2.0 * np.mean(per_level)) < 2 * TOL
  paper = ml_collections.ConfigDict(dict(loss=loss_config(), teacher_input="resample"))
  plain = distill.make_teacher_targets(teacher, student.cfg, paper, levels)
  assert "mixers" not in plain(nnx.state(teacher, nnx.Param), images)


def test_mixer_out_with_the_teacher_cache_is_refused_by_name():
  config = ml_collections.ConfigDict(demo.get_config("smoke").to_dict())
  config.distill.loss.w_mixer, config.distill.teacher_cache = 1.0, "write"
  with pytest.raises(UserError, match="not its attention branches"):
    distill_stage.check_config(config)
