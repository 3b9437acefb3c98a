"""The distill stage (method.md §4): the checks a config gets before the run, then the
starting student, the teacher diagnostic, the teacher cache and `train.fit` around the
method's step (`distill.make_distill_step`). AM's level pairs are worked out once here and
passed to everything that needs them.
"""

import os
from typing import Sequence

import jax
from flax import nnx

from linearizer import files, optim, resolve, train, workdir
from linearizer.distillation import (
  distill,
  losses,
  packed_step,
  scorecard,
  student_init,
  teacher_cache,
)
from linearizer.distillation.cache_views import CachedBatch
from linearizer.errors import UserError
from linearizer.log import log, main_process
from linearizer.models import packing
from linearizer.program import Program, abstract_batch


def check_config(config) -> None:
  """The distill stage's settings, refused before any stage runs: `teacher_input`, the
  starting student (`student_init`) and the teacher cache."""
  dcfg = config.distill
  if dcfg.teacher_input not in distill.TEACHER_INPUTS:
    raise UserError(
      f"distill.teacher_input={dcfg.teacher_input!r}; expected one of {distill.TEACHER_INPUTS}."
    )
  for name, allowed in (
    ("final_target", losses.FEATURE_TARGETS),
    ("final_view", losses.FINAL_VIEWS),
  ):
    if dcfg.loss[name] not in allowed:
      raise UserError(f"distill.loss.{name}={dcfg.loss[name]!r}; expected one of {allowed}.")
  student_init.check_distill_init(config)
  teacher_cache.check_config(dcfg)


def run_distill(
  config, run_dir: str, teacher: nnx.Module, source, hooks: Sequence[train.Hook] = ()
) -> nnx.Module:
  """The `distill` stage: a student (fresh, or `distill.student_init`) distilled from
  `teacher` on `source`'s images.

  Args:
    config: the experiment config (its `distill` block, `student`, `data`, `mesh`, ...).
    run_dir: the run's workdir; the stage writes under `run_dir/distill/`.
    teacher: the frozen teacher.
    source: the training images (labels unused).
    hooks: `train.Hook`s, `fn(step, distiller)` called every `every` steps before the last
      and once at the end; the stage table passes the maps' drawer (every
      `distill.visualize_every`) and the scorecard (every `distill.scorecard_every`).
  Returns:
    The distilled student (also saved to `run_dir/distill/model`).
  """
  dcfg = config.distill
  distill.check_teacher(teacher, dcfg.loss.scope)
  student = student_init.distill_student(config, (teacher.cfg.mean, teacher.cfg.std), teacher)
  levels = losses.level_pairs(teacher.cfg.depth, student.cfg.depth, dcfg.loss.num_stages)
  if dcfg.diagnose_images and main_process():
    report_teacher_cosines(config, run_dir, teacher, student, source, levels)
  # Batches come normalised for the student; the teacher's view is re-normalised from them.
  norm = (student.cfg.mean, student.cfg.std)
  rngs = nnx.Rngs(resolve.seed_of(config, "projection"))
  distiller = distill.Distiller(student, teacher.cfg.width, rngs=rngs, loss=dcfg.loss)
  tx = optim.make_optimizer(dcfg.optim, dcfg.steps)
  targets = distill.make_teacher_targets(teacher, student.cfg, dcfg, levels)
  cache = teacher_cache.for_stage(config, run_dir, teacher, student, source, targets, levels)
  step = distill.make_distill_step(
    distiller, teacher, tx, dcfg, cached=cache is not None, levels=levels
  )
  if cache:  # the teacher never runs: its weights stay off the devices
    batches, frozen = cache.batches(config.seed, config.data.workers), ()
  else:
    batches = train.stage_batches(config, "distill", source, norm)
    frozen = (nnx.state(teacher, nnx.Param),)
  distiller = train.fit_stage(
    config, run_dir, "distill", distiller, step, tx, batches=batches, frozen=frozen, hooks=hooks
  )
  workdir.save_stage_model(run_dir, "distill", distiller.student)
  return distiller.student


def programs(config, classes: int) -> dict:
  """{'distill': the step} with abstract models, for the compile-only tool: the teacher of
  `teacher.kind/variant`, a fresh student of `student.kind/variant`, the MP head; `classes`
  sizes the teacher's head. With `teacher_cache` 'write' or 'read' the step reads the
  teacher's outputs with the batch (the teacher off the chips); with 'auto' or 'off' the
  teacher runs in the step, the larger of the two programs."""
  dcfg = config.distill
  teacher = nnx.eval_shape(lambda: resolve.configured_teacher(config, classes))
  norm = (teacher.cfg.mean, teacher.cfg.std)
  distiller = nnx.eval_shape(
    lambda: distill.Distiller(
      resolve.new_student(config, 0, norm, drop_path=dcfg.drop_path),
      teacher.cfg.width,
      rngs=nnx.Rngs(resolve.seed_of(config, "projection")),
      loss=dcfg.loss,
    )
  )
  levels = losses.level_pairs(teacher.cfg.depth, distiller.student.cfg.depth, dcfg.loss.num_stages)
  tx = optim.make_optimizer(dcfg.optim, dcfg.steps)
  cached = dcfg.teacher_cache in ("write", "read")
  params = nnx.state(teacher, nnx.Param)
  if config.data.packing:  # n rows of packed images, each model at its own patch
    if cached:
      raise UserError("data.packing=True with a teacher_cache: the cache stores square views.")
    step = packed_step.make_packed_distill_step(distiller, teacher, tx, dcfg, levels)
    d = config.data
    views = packed_step.views(teacher, distiller.student, d.sequence_length, d.max_images)
    packed = lambda n: packed_step.PackedBatch(
      *(packing.abstract(n, v, d.max_images) for v in views)
    )
    return {"distill": Program(distiller, step, tx, (params,), packed, dcfg)}
  step = distill.make_distill_step(distiller, teacher, tx, dcfg, cached=cached, levels=levels)
  size = (config.data.image_size,) * 2
  targets = distill.make_teacher_targets(teacher, distiller.student.cfg, dcfg, levels)
  dtype = teacher_cache.DTYPES[dcfg.teacher_cache_dtype]

  def batch(n):
    images = abstract_batch(n, size)
    if not cached:
      return images
    outputs = jax.eval_shape(targets, params, images.image)
    stored = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), outputs)
    return CachedBatch(images.image, images.label, stored)

  return {"distill": Program(distiller, step, tx, () if cached else (params,), batch, dcfg)}


def report_teacher_cosines(config, run_dir: str, teacher, student, source, levels) -> None:
  """Logs the teacher's token cosines per AM level (`scorecard.teacher_cosines`) and writes
  them to `run_dir/distill/teacher_cosines.json`."""
  stats = scorecard.teacher_cosines(config, teacher, student, source, levels)
  for mode, per_level in stats.items():
    chosen = " (used)" if mode == config.distill.loss.am_features else ""
    log(
      f"[distill] teacher's off-diagonal cosines per AM level, {mode}{chosen}: "
      + "  ".join(f"{m:.3f}±{sd:.3f}" for m, sd in per_level)
    )
  directory = workdir.stage_dir(run_dir, "distill")
  os.makedirs(directory, exist_ok=True)
  files.write_json(os.path.join(directory, "teacher_cosines.json"), stats)
