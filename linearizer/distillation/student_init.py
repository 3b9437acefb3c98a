"""The student distillation starts from (`distill.student_init`, configs/common.py): a fresh
one, one built from the teacher's weights (`teacher_init`), or a checkpoint with its head
dropped; and the check that refuses a misfit before any stage runs.
"""

from typing import Optional

from flax import nnx

from linearizer import models, resolve
from linearizer.distillation import teacher_fit, teacher_init
from linearizer.log import log

# student_init values that copy from the teacher: everything, or all but the mixer.
FROM_TEACHER = ("teacher", "teacher_mlp")


def check_distill_init(config) -> None:
  """Refuses, before any stage runs, a `distill.student_init='teacher'` that would fail
  once the teacher is at hand: a pair of other kinds, or shapes that do not fit (unless
  `distill.teacher_init_partial`). Only a teacher the config builds (no teacher.init) is
  known here; a loaded one is checked when distillation starts."""
  if config.distill.student_init not in FROM_TEACHER:
    return
  student_arch = models.ARCHITECTURES.get(config.student.kind)
  teacher_arch = models.ARCHITECTURES.get(config.teacher.kind)
  if student_arch is None or (teacher_arch is None and not config.teacher.init):
    return  # an unknown kind: models.build names it when the stage builds the model
  size = dict(image_size=config.data.image_size)
  student_cfg = student_arch.variant(config.student.variant, **{**config.student.overrides, **size})
  if config.teacher.init:
    teacher_fit.check_kinds(student_cfg)  # the teacher's is checked once loaded
    return
  teacher_cfg = teacher_arch.variant(config.teacher.variant, **{**config.teacher.overrides, **size})
  mixer = config.distill.student_init == "teacher"
  teacher_fit.check_fit(
    student_cfg, teacher_cfg, allow_partial=config.distill.teacher_init_partial, mixer=mixer
  )


def distill_student(config, norm, teacher: Optional[nnx.Module] = None) -> nnx.Module:
  """The student distillation starts from (`distill.student_init`, configs/common.py).

  Args:
    config: the experiment config.
    norm: (mean, std), the teacher's statistics: a fresh student is normalised with them.
    teacher: the teacher, needed for `student_init='teacher'`.
  Returns:
    A fresh student (''); one with the teacher's weights copied in ('teacher', the table
    of what came from where logged); or a checkpoint loaded with student.overrides, its
    head dropped. Drop path from the distill stage in each case.
  """
  check_distill_init(config)
  init, drop_path = config.distill.student_init, config.distill.drop_path
  if init in ("", *FROM_TEACHER):
    student = resolve.new_student(config, 0, norm, drop_path=drop_path)
    if init in FROM_TEACHER:
      if teacher is None:
        raise ValueError(f"distill_student: student_init={init!r} needs the teacher passed")
      rows = teacher_init.init_from_teacher(
        student,
        teacher,
        allow_partial=config.distill.teacher_init_partial,
        mixer=init == "teacher",
      )
      log("[distill] the student starts from the teacher's weights:")
      log(teacher_init.format_table(rows, student.cfg.depth))
    return student
  overrides = {**config.student.overrides, "image_size": config.data.image_size}
  student = resolve.load_model(init, overrides)
  return resolve.with_new_head(student, 0, resolve.seed_of(config, "student"), drop_path=drop_path)
