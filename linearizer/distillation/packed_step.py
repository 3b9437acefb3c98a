"""The distillation step over packed batches (issue 43): images of their own sizes.

`distill.make_distill_step` for a `PackedBatch`: the teacher and the student read the same
images in the same rows and slots, each at its own patch (`packing.pack_views`); the
teacher's targets are brought onto the student's layout image by image
(`packed_losses.teacher_on_student`), masks are drawn per image, and every loss is the mean
over the images of that image's loss alone (packed_losses.py). The teacher sees the pixels
the student sees (`distill.teacher_input='resample'`); 'resize' gives each view other
pixels and is refused with packing.
"""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from linearizer import optim, train
from linearizer.distillation import distill, losses
from linearizer.distillation import packed_losses as pl
from linearizer.errors import UserError
from linearizer.models import packing


class PackedBatch(NamedTuple):
  """A packed distillation batch: the same images as each model reads them.

  teacher, student: `packing.Packed` views (the teacher's patch and layout, the
    student's), pixels normalised with the student's statistics.
  """

  teacher: packing.Packed
  student: packing.Packed


def views(teacher, student, sequence_length: int, max_images: int) -> list:
  """The two `packing.View`s of a packed distillation batch: each model's patch and layout,
  rows of `sequence_length` patches of the finer patch plus each image's extra tokens."""
  finest = min(teacher.cfg.patch, student.cfg.patch)
  out = []
  for model in (teacher, student):
    prefix, suffix = model.packing_layout
    extra = max_images * (len(prefix) + len(suffix))
    scale = (finest / model.cfg.patch) ** 2  # a coarser patch needs fewer tokens
    out.append(packing.View(model.cfg.patch, int(sequence_length * scale) + extra, prefix, suffix))
  return out


def make_teacher_targets(teacher: nnx.Module, student, config, levels) -> Callable:
  """`distill.make_teacher_targets` for packed batches: `targets(teacher_params, batch)`
  gives AM's levels, the final block and (with w_mixer) the mixers, each (B, Ts, Dt) on
  the student's layout."""
  if config.teacher_input != "resample":
    raise UserError(
      f"distill.teacher_input={config.teacher_input!r} with packed batches: each model reads "
      "the same pixels at its own patch; use 'resample'."
    )
  dcfg = config.loss
  graphdef, _, rest = nnx.split(teacher, nnx.Param, ...)
  s_norm = (tuple(student.cfg.mean), tuple(student.cfg.std))
  t_norm = (tuple(teacher.cfg.mean), tuple(teacher.cfg.std))
  prefix = len(teacher.packing_layout[0])

  def targets(teacher_params, batch: PackedBatch):
    view = batch.teacher
    if s_norm != t_norm:
      view = view.replace(pixels=distill.renormalise(view.pixels, s_norm, t_norm))
    t_model = nnx.merge(graphdef, teacher_params, rest)
    out = t_model(view)
    on_student = lambda x: pl.teacher_on_student(x, batch.teacher, batch.student, prefix)
    feats = lambda i: distill.am_tokens(t_model, out, i, dcfg.am_features)
    found = {"levels": [on_student(feats(i)) for i, _ in levels]}
    found["final"] = on_student(out.blocks[-1])
    if dcfg.get("w_mixer", 0.0):
      found["mixers"] = [on_student(out.mixers[i]) for i, _ in levels]
    return found

  return targets


def packed_losses(*, distiller, teacher_out, batch: PackedBatch, mask, cfg, levels, cls):
  """`distill.distill_losses` for a packed batch: (total, metrics)."""
  student, view = distiller.student, batch.student
  out = student(view, mask=mask, train=True)
  metrics, total = {}, 0.0
  where = pl.compared(view, cfg.scope, mask, cls)
  student_levels = [distill.am_tokens(student, out, j, cfg.am_features) for _, j in levels]
  if cfg.w_am:
    am, per_level = pl.am_loss(
      teacher_out["levels"], student_levels, view, cfg.scope, mask, cfg.am_features, cls
    )
    total += cfg.w_am * am
    metrics.update(am=am, **{f"am_stage{k}": v for k, v in enumerate(per_level)})
  if cfg.w_mp:
    prediction = distiller.predictor(out.tokens)
    mp = pl.mp_loss(prediction, teacher_out["final"], view, mask, beta=cfg.beta)
    total += cfg.w_mp * mp
    metrics.update(mp=mp)
  if cfg.w_final:
    final = out if cfg.final_view == "masked" else student(view, train=True)
    prediction = distiller.final_proj(final.tokens)
    final_loss = pl.final_loss(prediction, teacher_out["final"], view, cfg.final_target)
    total += cfg.w_final * final_loss
    metrics.update(final=final_loss)
  if cfg.w_blocks:
    blocks = pl.level_regression(
      distiller.block_projs, teacher_out["levels"], student_levels, view, where, cfg.final_target
    )
    total += cfg.w_blocks * blocks
    metrics.update(blocks=blocks)
  if cfg.w_mixer:
    mixers = [out.mixers[j] for _, j in levels]
    mixer_out = pl.level_regression(
      distiller.mixer_projs, teacher_out["mixers"], mixers, view, where, cfg.final_target
    )
    total += cfg.w_mixer * mixer_out
    metrics.update(mixer_out=mixer_out)
  metrics["loss"] = total
  return total, metrics


def make_packed_distill_step(distiller, teacher, tx, config, levels=None) -> Callable:
  """`distill.make_distill_step` for `PackedBatch`es: `step(state, teacher_params, batch,
  rng) -> (state, metrics)`."""
  dcfg, ocfg = config.loss, config.optim
  graphdef = nnx.graphdef(distiller)
  s_cfg, t_cfg = distiller.student.cfg, teacher.cfg
  levels = levels or losses.level_pairs(t_cfg.depth, s_cfg.depth, dcfg.num_stages)
  lr = optim.schedule(ocfg, config.steps)
  teacher_targets = make_teacher_targets(teacher, distiller.student, config, levels)
  cls = teacher.roles.cls is not None and distiller.student.roles.cls is not None

  def step(state: train.TrainState, teacher_params, batch: PackedBatch, rng):
    teacher_out = jax.lax.stop_gradient(teacher_targets(teacher_params, batch))
    rng = jax.random.fold_in(rng, state.step)

    def loss_fn(params, mb, rng):
      m_rng, d_rng = jax.random.split(rng)
      view = mb["batch"].student
      if dcfg.mask_ratio > 0:
        mask = pl.random_mask(m_rng, view, dcfg.mask_ratio)
      else:
        mask = jnp.zeros(view.kind.shape, bool)
      module = train.merge(graphdef, params, state.rest, d_rng)
      return packed_losses(
        distiller=module,
        teacher_out=mb["teacher"],
        batch=mb["batch"],
        mask=mask,
        cfg=dcfg,
        levels=levels,
        cls=cls,
      )

    micro = {"batch": batch, "teacher": teacher_out}
    (_, metrics), grads = train.accumulate(loss_fn, state.params, micro, rng, ocfg.grad_accum)
    metrics.update(grad_norm=optax.global_norm(grads), lr=lr(state.step))
    return train.apply_update(state, grads, tx, ocfg.ema_decay), metrics

  return step
