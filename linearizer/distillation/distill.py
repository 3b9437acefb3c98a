"""The method in one file (method.md §1–3): a frozen ViT teacher, an Adventurer student,
activation matching + masked prediction, read top to bottom.

  Distiller          what is trained: the student, MP's prediction head and the newer
                     losses' projections
  distill_losses     L = w_am · L_AM + w_mp · L_MP (+ w_final · L_final + w_blocks ·
                     L_blocks + w_mixer · L_mixer_out, the simpler recipes of 2026) for
                     one micro-batch
  make_distill_step  teacher forward (frozen, outside the gradient) → student forward and
                     backward → update
  run_distill        the stage: build the student, run `train.fit`, save the result

As in big_vision's distillation trainer, the teacher is an argument of its own: its
parameters are passed to the step beside the train state, never optimised and never
checkpointed.
"""

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from linearizer import convert, data, optim, train
from linearizer.distillation import losses
from linearizer.errors import UserError


class Distiller(nnx.Module):
  """What distillation trains: the student, the MP prediction head (student → teacher) and,
  where `loss` weighs them, the linear maps of `final` (one), `blocks` and `mixer_out` (one
  per AM level each) into the teacher's width; absent otherwise, so the paper's state is
  unchanged."""

  def __init__(self, student, teacher_width: int, *, rngs: nnx.Rngs, loss=None):
    self.student = student
    self.predictor = nnx.Linear(student.cfg.width, teacher_width, rngs=rngs)
    width = student.cfg.width
    weigh = lambda name: loss is not None and loss.get(name, 0.0)
    per_level = lambda: nnx.List(
      [nnx.Linear(width, teacher_width, rngs=rngs) for _ in range(loss.num_stages)]
    )
    self.final_proj = nnx.Linear(width, teacher_width, rngs=rngs) if weigh("w_final") else None
    self.block_projs = per_level() if weigh("w_blocks") else None
    self.mixer_projs = per_level() if weigh("w_mixer") else None


# ---------------------------------------------------------------------------------------
# The losses of one micro-batch.
# ---------------------------------------------------------------------------------------
def am_tokens(model, out, index: int, features: str):
  """Block `index`'s tokens as AM compares them: the residual stream, or with `next_ln`
  through the model's next pre-norm (LayerNorm in the ViT, RMSNorm in Adventurer)."""
  x = out.blocks[index]
  return model.next_norm(index, x) if features == "next_ln" else x


def distill_losses(
  *,
  distiller,
  teacher_levels,
  teacher_final,
  images,
  mask,
  visible,
  cfg,
  teacher_grid,
  levels,
  teacher_mixers=None,
):
  """L = w_am · L_AM + w_mp · L_MP + w_final · L_final + w_blocks · L_blocks + w_mixer ·
  L_mixer_out and its terms, for one batch (the student trains).

  teacher_levels: the teacher's (cls, patches) at the end of each AM level; teacher_final:
  its final-block patch tokens (MP's target); teacher_mixers: its attention branch in the
  same blocks as (cls, patches) (`mixer_out` only); levels: the (teacher, student) block
  pairs of `losses.level_pairs`.
  """
  student = distiller.student
  out = student(images, mask=mask, train=True)
  grid = (images.shape[1] // student.cfg.patch, images.shape[2] // student.cfg.patch)
  metrics, total = {}, 0.0
  align = dict(
    grids=(teacher_grid, grid), scope=cfg.scope, visible=visible, target=cfg.final_target
  )
  if cfg.w_am or cfg.w_blocks:
    student_levels = [
      losses.split_roles(am_tokens(student, out, j, cfg.am_features), out.roles) for _, j in levels
    ]
  if cfg.w_am:  # §2: K levels of n × n similarity maps
    am, per_level = losses.am_loss(
      teacher_levels,
      student_levels,
      teacher_grid,
      grid,
      scope=cfg.scope,
      visible=visible,
      features=cfg.am_features,
    )
    total += cfg.w_am * am
    metrics.update(am=am, **{f"am_stage{k}": v for k, v in enumerate(per_level)})
  if cfg.w_mp:  # §3: the masked patches' final teacher features, from the visible ones
    prediction = distiller.predictor(out.patches)
    mp = losses.mp_loss(prediction, teacher_final, teacher_grid, grid, mask, beta=cfg.beta)
    total += cfg.w_mp * mp
    metrics.update(mp=mp)
  if cfg.w_final:  # GTR / ViT-AdaLA: the final patch tokens, regressed
    final = out if cfg.final_view == "masked" else student(images, train=True)
    prediction = distiller.final_proj(final.patches)
    final_loss = losses.final_loss(prediction, teacher_final, teacher_grid, grid, cfg.final_target)
    total += cfg.w_final * final_loss
    metrics.update(final=final_loss)
  if cfg.w_blocks:  # FitNets at AM's levels: the same tokens, regressed through a map each
    blocks = level_regression(distiller.block_projs, teacher_levels, student_levels, **align)
    total += cfg.w_blocks * blocks
    metrics.update(blocks=blocks)
  if cfg.w_mixer:  # ViT-AdaLA stage 1: the mixer branch onto the attention branch
    if not out.mixers or not teacher_mixers:
      raise UserError(
        "distill.loss.w_mixer > 0 reads every block's token-mixer branch "
        "(ModelOutput.mixers), and the student or teacher model returns none."
      )
    student_mixers = [losses.split_roles(out.mixers[j], out.roles) for _, j in levels]
    mixer_out = level_regression(distiller.mixer_projs, teacher_mixers, student_mixers, **align)
    total += cfg.w_mixer * mixer_out
    metrics.update(mixer_out=mixer_out)
  metrics["loss"] = total
  return total, metrics


def level_regression(projs, teacher_levels, student_levels, *, grids, scope, visible, target):
  """The mean over AM's levels of `feature_regression(proj(student), teacher)` on AM's
  tokens (`losses.align`): the `blocks` and `mixer_out` losses."""
  per_level = []
  for proj, t, s in zip(projs, teacher_levels, student_levels):
    t_tokens, s_tokens = losses.align(t, s, *grids, scope, visible)
    per_level.append(losses.feature_regression(proj(s_tokens), t_tokens, target))
  return jnp.mean(jnp.stack(per_level))


# ---------------------------------------------------------------------------------------
# The step.
# ---------------------------------------------------------------------------------------
def renormalise(images, src, dst):
  """Images normalised with src (mean, std) re-expressed with dst's statistics."""
  (sm, ss), (dm, ds) = src, dst
  sm, ss, dm, ds = (jnp.asarray(v, images.dtype) for v in (sm, ss, dm, ds))
  return (images * ss + sm - dm) / ds


TEACHER_INPUTS = ("resample", "resize")  # distill.teacher_input (configs/common.py)


def teacher_view(images, student_cfg, teacher_cfg, teacher_input: str = "resample"):
  """The student's images as the teacher sees them: re-normalised with the teacher's
  statistics, or as they are when both models share them (decided once, at trace time;
  the identity round trip would only add rounding); with `teacher_input='resize'`, resized
  (bicubic) to the student's patch grid × the teacher's patch. Training and the maps both
  use it. (`check_config` refuses another `teacher_input` before the run.)"""
  s_norm = (tuple(student_cfg.mean), tuple(student_cfg.std))
  t_norm = (tuple(teacher_cfg.mean), tuple(teacher_cfg.std))
  out = images if s_norm == t_norm else renormalise(images, s_norm, t_norm)
  b, h, w, c = images.shape
  size = teacher_size(h, w, student_cfg, teacher_cfg, teacher_input)
  if size != (h, w):
    out = jax.image.resize(out, (b, *size, c), "bicubic")
  return out


def teacher_size(h: int, w: int, student_cfg, teacher_cfg, teacher_input: str) -> tuple:
  """The (height, width) of the images the teacher sees for the student's (h, w)."""
  if teacher_input == "resize":
    return (h // student_cfg.patch * teacher_cfg.patch, w // student_cfg.patch * teacher_cfg.patch)
  return (h, w)


def make_teacher_targets(teacher: nnx.Module, student_cfg, config, levels=None) -> Callable:
  """What the losses need of the frozen teacher, as a pure function of its parameters.

  Args:
    teacher: the frozen teacher (its graph; the parameters are the function's argument).
    student_cfg: the student's config (its patch and normalisation).
    config: the stage's settings: `loss` (am_features, num_stages) and `teacher_input`.
    levels: the (teacher, student) block pairs of AM's levels (`losses.level_pairs`, which
      the stage computes once); None computes them here.
  Returns:
    `targets(teacher_params, images) -> {'levels': [(cls, patches)] per AM level, 'final':
    the last block's patch tokens}` for `images` normalised with the student's statistics:
    the distillation step computes it every step, and `teacher_cache` stores it per view.
  """
  dcfg = config.loss
  # The teacher's non-Param state (drop-path RNG streams, unused in eval mode) is kept as a
  # constant: callers pass only its nnx.Param state.
  graphdef, _, rest = nnx.split(teacher, nnx.Param, ...)
  t_cfg = teacher.cfg
  levels = levels or losses.level_pairs(t_cfg.depth, student_cfg.depth, dcfg.num_stages)

  def targets(teacher_params, images):
    t_images = teacher_view(images, student_cfg, t_cfg, config.teacher_input)
    t_model = nnx.merge(graphdef, teacher_params, rest)
    out = t_model(t_images)
    t_levels = [
      losses.split_roles(am_tokens(t_model, out, i, dcfg.am_features), out.roles) for i, _ in levels
    ]
    targets = {"levels": t_levels, "final": out.roles.patches_of(out.blocks[-1])}
    if dcfg.get("w_mixer", 0.0):  # only where weighed: the cache's layout is unchanged
      targets["mixers"] = [losses.split_roles(out.mixers[i], out.roles) for i, _ in levels]
    return targets

  return targets


def make_distill_step(
  distiller: Distiller,
  teacher: nnx.Module,
  tx: optax.GradientTransformation,
  config,
  cached: bool = False,
  levels=None,
) -> Callable:
  """The distillation step: teacher forward (frozen), student forward and backward, update.

  Args:
    distiller: the trained modules (its graph is used; the weights come with the state).
    teacher: the frozen teacher (its graph; its nnx.Param state is the step's argument).
    tx: the optimizer (`optim.make_optimizer`).
    config: the stage's settings: `steps` (where the lr schedule ends), `loss`
      (configs.common.distill_loss), `optim` (configs.common.optim) and `teacher_input`.
    cached: the teacher's outputs come with the batch (`teacher_cache.CachedBatch`, read
      from the teacher-feature cache) instead of being computed by the step.
    levels: AM's (teacher, student) block pairs, as `make_teacher_targets` takes them.
  Returns:
    `step(state, teacher_params, batch, rng) -> (state, metrics)`, or with `cached`
    `step(state, batch, rng)`; `batch` normalised with the student's statistics.
  """
  dcfg, ocfg = config.loss, config.optim
  graphdef = nnx.graphdef(distiller)
  s_cfg, t_cfg = distiller.student.cfg, teacher.cfg
  levels = levels or losses.level_pairs(t_cfg.depth, s_cfg.depth, dcfg.num_stages)
  lr = optim.schedule(ocfg, config.steps)
  teacher_targets = make_teacher_targets(teacher, s_cfg, config, levels)

  def update(state: train.TrainState, images, teacher_out, rng):
    b, h, w, _ = images.shape
    rng = jax.random.fold_in(rng, state.step)
    t_size = teacher_size(h, w, s_cfg, t_cfg, config.teacher_input)
    teacher_grid = (t_size[0] // t_cfg.patch, t_size[1] // t_cfg.patch)
    n = (h // s_cfg.patch) * (w // s_cfg.patch)

    def loss_fn(params, mb, rng):
      m_rng, d_rng = jax.random.split(rng)
      mb_size = mb["image"].shape[0]
      if dcfg.mask_ratio > 0:
        mask, visible = losses.random_mask(m_rng, mb_size, n, dcfg.mask_ratio)
      else:
        mask, visible = jnp.zeros((mb_size, n), bool), None
      distiller = train.merge(graphdef, params, state.rest, d_rng)
      return distill_losses(
        distiller=distiller,
        teacher_levels=mb["teacher"]["levels"],
        teacher_final=mb["teacher"]["final"],
        images=mb["image"],
        mask=mask,
        visible=visible,
        cfg=dcfg,
        teacher_grid=teacher_grid,
        levels=levels,
        teacher_mixers=mb["teacher"].get("mixers"),
      )

    # The teacher ran once on the whole batch; its outputs are split into micro-batches
    # with the images (train.accumulate).
    micro = {"image": images, "teacher": teacher_out}
    (_, metrics), grads = train.accumulate(loss_fn, state.params, micro, rng, ocfg.grad_accum)
    metrics.update(grad_norm=optax.global_norm(grads), lr=lr(state.step))
    return train.apply_update(state, grads, tx, ocfg.ema_decay), metrics

  def step(state: train.TrainState, teacher_params, batch: data.Batch, rng):
    # The teacher is frozen: its forward sits outside value_and_grad, under stop_gradient.
    teacher_out = jax.lax.stop_gradient(teacher_targets(teacher_params, batch.image))
    return update(state, batch.image, teacher_out, rng)

  def cached_step(state: train.TrainState, batch, rng):  # a teacher_cache.CachedBatch
    # Stored in bf16 (distill.teacher_cache_dtype) to halve the disk; the losses run in f32.
    teacher_out = jax.tree.map(lambda x: x.astype(jnp.float32), batch.teacher)
    return update(state, batch.image, teacher_out, rng)

  return cached_step if cached else step


# ---------------------------------------------------------------------------------------
# What the teacher must offer.
# ---------------------------------------------------------------------------------------
def check_teacher(teacher, scope: str) -> None:
  """Refuses, before anything is written, an AM scope the teacher's tokens cannot serve:
  `cls` matches CLS tokens, and a teacher without one (SigLIP) has none to match."""
  if scope == "cls" and teacher.roles.cls is None:
    raise UserError(
      "distill.loss.scope='cls' matches the teacher's CLS token, but this teacher has none "
      f"({convert.describe(teacher)}: cls_token=False, as SigLIP's); use 'visible' or 'all'."
    )
