"""The run's models by role: the one place that decides where a teacher or a student comes
from (a stage of this run, a checkpoint the config names, or a fresh build), for every stage
and tool that needs one.

Roles: the teacher (`teacher`, `run_teacher`); a fresh student (`new_student`); the model a
finished stage wrote (`stage_model`: the distilled, fine-tuned or from-scratch student, the
trained teacher); the student fine-tuning starts from (`pretrained_student`); the student
the run exports (`final_student`); a model with a new head (`with_new_head`); a checkpoint
named by spec (`load_model`). Nothing here knows a feature: distillation's own starting
student (`student_init`) is built in `distillation/`, from these parts.
"""

import dataclasses
from typing import Optional

from flax import nnx

from linearizer import convert, models, workdir
from linearizer.errors import UserError
from linearizer.log import log
from linearizer.models import saved

# Every random initialisation draws from the run's seed plus its part's offset, so that one
# part's draw does not move when another changes.
SEED_OFFSETS = {
  "teacher": 0,  # a teacher built to be trained
  "student": 1,  # a fresh student (train_student, distillation's)
  "projection": 2,  # distillation's teacher-width projections
  "finetune_head": 3,  # the classifier fine-tuning puts on the distilled student
  "segment_backbone": 0,  # a backbone's head dropped for segmentation
  "segment_head": 7,  # the segmentation head
}

# The stage whose DIR/<stage>/model holds each role's model, and the config block whose
# overrides it is loaded with.
STAGE_OF = {
  "teacher": "train_teacher",
  "distilled": "distill",
  "finetuned": "finetune",
  "scratch": "train_student",
}


def seed_of(config, part: str) -> int:
  """The seed `part` (a key of SEED_OFFSETS) initialises from."""
  return config.seed + SEED_OFFSETS[part]


def load_model(spec: str, overrides=None) -> nnx.Module:
  """A model from 'fmt:path' (fmt as in convert.load) or a directory written by saved.save.

  Args:
    spec: the checkpoint, as `teacher.init` / `student.init` name it.
    overrides: a config's `teacher.overrides` / `student.overrides`, applied as
      `convert.load` applies them: run-time fields (dtype, attention_impl, ...) always; one
      that contradicts what the checkpoint determines (depth, width, ...) is refused.
  Returns:
    The module.
  """
  fmt, sep, path = spec.partition(":")
  if not (sep and fmt in convert.FORMATS):
    fmt, path = "orbax", spec
  model = convert.load(path, fmt, **({} if overrides is None else dict(overrides)))
  log(f"[load] {spec}: {models.kind_of(model)} {convert.describe(model)}")
  return model


def overrides_of(config, role: str):
  """The overrides a role's model is loaded with: the teacher's or the student's."""
  return config.teacher.overrides if role == "teacher" else config.student.overrides


def stage_model(config, run_dir: str, role: str, **overrides) -> Optional[nnx.Module]:
  """The model the stage of `role` (STAGE_OF) wrote in this run, else None."""
  stage = STAGE_OF[role]
  if not workdir.finished(run_dir, stage):
    return None
  return load_model(workdir.model_dir(run_dir, stage), {**overrides_of(config, role), **overrides})


def run_teacher(config, run_dir: str) -> Optional[nnx.Module]:
  """The teacher this run has: trained by its train_teacher stage, else teacher.init; None
  when it has neither."""
  trained = stage_model(config, run_dir, "teacher")
  if trained is not None or not config.teacher.init:
    return trained
  return load_model(config.teacher.init, config.teacher.overrides)


def initial_student(config) -> Optional[nnx.Module]:
  """The checkpoint student.init names (with student.overrides), else None."""
  return load_model(config.student.init, config.student.overrides) if config.student.init else None


def teacher(config, run_dir: str, num_classes: int) -> nnx.Module:
  """The teacher: trained by this run's train_teacher stage, else loaded from teacher.init,
  else (when train_teacher is to run) a fresh one of `teacher.kind` and `teacher.variant`."""
  found = run_teacher(config, run_dir)
  if found is not None:
    return found
  if "train_teacher" in config.stages:
    return configured_teacher(config, num_classes)
  raise UserError(
    "No teacher: set teacher.init to a checkpoint ('fmt:path' or a converted "
    "directory) or add 'train_teacher' to the stages."
  )


def configured_teacher(config, num_classes: int) -> nnx.Module:
  """A fresh teacher of `teacher.kind` / `teacher.variant` with `teacher.overrides`."""
  return models.build(
    config.teacher.kind,
    config.teacher.variant,
    seed=seed_of(config, "teacher"),
    image_size=config.data.image_size,
    num_classes=num_classes,
    **config.teacher.overrides,
  )


def new_student(config, num_classes: int, norm, **extra) -> nnx.Module:
  """A fresh student of `student.kind` / `student.variant`, normalised with `norm`."""
  fields = dict(config.student.overrides)
  fields.update(
    image_size=config.data.image_size,
    num_classes=num_classes,
    mean=tuple(norm[0]),
    std=tuple(norm[1]),
  )
  fields.update(extra)  # (drop_path; the compile-only tool's image_size)
  return models.build(
    config.student.kind, config.student.variant, seed=seed_of(config, "student"), **fields
  )


def with_new_head(base: nnx.Module, num_classes: int, seed: int, **changes) -> nnx.Module:
  """A copy of `base` with a fresh `num_classes` head (and other config changes)."""
  model = models.from_config(
    dataclasses.replace(base.cfg, num_classes=num_classes, **changes), seed=seed
  )
  params = nnx.state(base, nnx.Param).to_pure_dict()
  params.pop("head", None)
  nnx.update(model, nnx.State(params))
  return model


def pretrained_student(config, run_dir: str, num_classes: int) -> nnx.Module:
  """The student to fine-tune: this run's distilled one, else student.init (with
  student.overrides, as `load_model` applies them)."""
  distilled = workdir.finished(run_dir, "distill")
  init = workdir.model_dir(run_dir, "distill") if distilled else config.student.init
  if not init:
    raise UserError(
      "finetune needs a distilled student: run the 'distill' stage first or set student.init."
    )
  # Fine-tuning at its own resolution (finetune.augment.image_size, e.g. 448) starts from
  # position embeddings resampled once to it, as Adventurer fine-tunes at 448.
  size = config.finetune.augment.get("image_size", config.data.image_size)
  return with_new_head(
    load_model(init, {**config.student.overrides, "image_size": size}),
    num_classes,
    seed_of(config, "finetune_head"),
    drop_path=config.finetune.drop_path,
  )


def final_student(run_dir: str) -> Optional[tuple]:
  """(stage, model directory) of the student a run exports: the fine-tuned one, else the
  distilled one; None before either has finished."""
  for stage in ("finetune", "distill"):
    if workdir.finished(run_dir, stage):
      return stage, workdir.model_dir(run_dir, stage)
  return None


def restore(directory: str) -> nnx.Module:
  """A model directory written by `models.saved.save`, as it was saved (no overrides)."""
  return saved.restore(directory)


def drawn_models(run_config, run_dir: str, teacher_spec: str, students: dict) -> tuple:
  """The models a finished run's pictures compare (the visualize tool).

  Args:
    run_config: the config the run in `run_dir` was made with (its config.json).
    run_dir: that run's workdir.
    teacher_spec: a checkpoint to use as the teacher instead of the run's ('' = the run's).
    students: {stage: label} of the students to draw.
  Returns:
    (the teacher or None, {label: student} of the stages that finished).
  """
  if teacher_spec:
    teacher = load_model(teacher_spec, run_config.teacher.overrides)
  else:
    teacher = run_teacher(run_config, run_dir)
  found = {
    label: load_model(workdir.model_dir(run_dir, stage), run_config.student.overrides)
    for stage, label in students.items()
    if workdir.finished(run_dir, stage)
  }
  return teacher, found
