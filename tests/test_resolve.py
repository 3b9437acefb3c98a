"""How a run resolves its models (linearizer.resolve; distillation.student_init for the distilled student): overrides reach every loaded model,
fine-tuning starts at its own resolution."""

import numpy as np
import pytest

from configs import common
from linearizer import models, resolve
from linearizer.distillation import student_init
from linearizer.errors import UserError
from linearizer.models import saved

TINY_VIT = dict(width=32, depth=2, num_heads=2, mlp_dim=64, image_size=16, num_classes=10)
TINY_STUDENT = dict(width=32, depth=2, headdim=16, d_state=16, chunk_size=16, image_size=16)


def config(**changes):
  c = common.base()
  c.data = common.data("digits", 16)
  c.finetune = common.stage(steps=1, batch_size=8, lr=1e-3, loss=common.supervised_loss())
  c.update(changes)
  return c


def test_teacher_init_takes_the_configs_run_time_overrides(tmp_path):
  """The ImageNet setups' dtype='bfloat16' used to be dropped for a loaded teacher."""
  saved.save(models.build("vit", "Ti/4", **TINY_VIT), tmp_path / "t")
  c = config()
  c.teacher.init = str(tmp_path / "t")
  c.teacher.overrides = dict(dtype="bfloat16", attention_impl="xla", depth=2)
  teacher = resolve.teacher(c, str(tmp_path / "run"), 10)
  assert (teacher.cfg.dtype, teacher.cfg.attention_impl) == ("bfloat16", "xla")
  c.teacher.overrides = dict(num_heads=4)
  with pytest.raises(UserError, match=r"num_heads=4 \(the file has 2\)"):
    resolve.teacher(c, str(tmp_path / "run"), 10)


def test_finetune_starts_at_its_own_resolution(tmp_path):
  """finetune.augment.image_size: the student's position embeddings resampled once to it."""
  base = models.build("adventurer", "Ti/4", num_classes=0, **TINY_STUDENT)
  saved.save(base, tmp_path / "s")
  c = config()
  c.student.init = str(tmp_path / "s")
  c.student.overrides = dict(dtype="bfloat16")
  c.finetune.augment = dict(image_size=32)
  c.finetune.drop_path = 0.1
  student = resolve.pretrained_student(c, str(tmp_path / "run"), 10)
  assert (student.cfg.image_size, student.cfg.dtype, student.cfg.drop_path) == (32, "bfloat16", 0.1)
  assert student.cfg.num_classes == 10
  want = models.resample_pos_embed(base.pos_embed[...], (4, 4), (8, 8), cls_at="last")
  np.testing.assert_allclose(student.pos_embed[...], want, rtol=1e-6, atol=1e-7)


def test_distillation_can_start_from_a_checkpoint(tmp_path):
  """distill.student_init: a supervised student's weights, its head dropped, its own
  normalisation kept (the batches follow it; the teacher's view is re-normalised)."""
  base = models.build(
    "adventurer", "Ti/4", num_classes=10, mean=(0.5,) * 3, std=(0.25,) * 3, **TINY_STUDENT
  )
  saved.save(base, tmp_path / "s")
  c = config()
  c.distill = common.distill_stage(
    steps=1, batch_size=8, lr=1e-3, loss=common.distill_loss(), drop_path=0.1
  )
  fresh = student_init.distill_student(c, ((0.1,) * 3, (0.2,) * 3))
  assert fresh.cfg.mean == (0.1,) * 3 and fresh.head is None
  c.distill.student_init = str(tmp_path / "s")
  student = student_init.distill_student(c, ((0.1,) * 3, (0.2,) * 3))
  assert student.head is None and student.cfg.drop_path == 0.1
  assert student.cfg.mean == (0.5,) * 3 and student.cfg.std == (0.25,) * 3
  np.testing.assert_array_equal(student.pos_embed[...], base.pos_embed[...])
  np.testing.assert_array_equal(student.layers[1].mixer.A_log[...], base.layers[1].mixer.A_log[...])


def test_distillation_can_start_from_the_teachers_weights(tmp_path, capsys):
  """distill.student_init='teacher': a fresh student with the teacher's weights copied in
  (linearizer/distillation/teacher_init.py), the table logged; a student they do not fit is refused from
  the config alone (before any stage runs) unless distill.teacher_init_partial."""
  c = config()
  c.distill = common.distill_stage(
    steps=1, batch_size=8, lr=1e-3, loss=common.distill_loss(), student_init="teacher"
  )
  c.teacher.variant, c.teacher.overrides = "Ti/4", dict(TINY_VIT)
  del c.teacher.overrides["image_size"], c.teacher.overrides["num_classes"]
  c.student.variant = "Ti/4"
  c.student.overrides = dict(TINY_STUDENT, expand=1, ngroups=2, mlp_ratio=2.0)
  del c.student.overrides["image_size"]
  student_init.check_distill_init(c)
  teacher = models.build("vit", "Ti/4", **TINY_VIT)
  norm = ((0.1,) * 3, (0.2,) * 3)
  student = student_init.distill_student(c, norm, teacher)
  assert student.cfg.mean == (0.1,) * 3 and student.head is None
  np.testing.assert_array_equal(student.cls_token[...], teacher.cls_token[...])
  np.testing.assert_array_equal(
    student.layers[1].mixer.out_proj.kernel[...], teacher.blocks[1].attn.proj.kernel[...]
  )
  assert "blocks.{i}.attn.qkv.kernel[:, 64:96] (V)" in capsys.readouterr().out
  c.student.overrides = dict(TINY_STUDENT)  # expand 2, one group, MLP ratio 2.5
  del c.student.overrides["image_size"]
  for check in (
    lambda: student_init.check_distill_init(c),
    lambda: student_init.distill_student(c, norm, teacher),
  ):
    with pytest.raises(UserError, match=r"ngroups 1 ≠ teacher num_heads 2.*teacher_init_partial"):
      check()
  c.distill.teacher_init_partial = True
  student_init.check_distill_init(c)
  student = student_init.distill_student(c, norm, teacher)
  np.testing.assert_array_equal(student.cls_token[...], teacher.cls_token[...])
