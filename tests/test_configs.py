"""The paper's setups (configs/imagenet.py) as the paper ran them (method.md §7)."""

import pytest

from configs import custom, imagenet
from linearizer import evaluate

# method.md §7: every student from CLIP ViT-B/16, L also from CLIP ViT-L/14.
PAPER = {
  "clip_b16_to_S": ("B/16", "S/16"),
  "clip_b16_to_B": ("B/16", "B/16"),
  "clip_b16_to_L": ("B/16", "L/16"),
  "clip_l14_to_L": ("L/14", "L/16"),
}


@pytest.mark.parametrize("setup", sorted(PAPER))
def test_every_setup_has_the_papers_clip_teacher(setup):
  c = imagenet.get_config(f"setup={setup}")
  assert (c.teacher.variant, c.student.variant) == PAPER[setup]
  assert c.teacher.overrides.style == "clip"  # QuickGELU, eps 1e-5, ln_pre, CLIP statistics


def test_the_setups_are_the_papers():
  assert set(imagenet.SETUPS) == set(PAPER)


@pytest.mark.parametrize("res", [224, 448])
def test_fine_tuning_resolution_and_eval_crop(res):
  """res=448 fine-tunes at 448 (the paper's 85.0 @448²); eval crops 0.875 at 224, 1.0 above
  it, as Adventurer evaluates."""
  c = imagenet.get_config(f"setup=clip_b16_to_L,res={res}")
  assert c.finetune.augment.image_size == res and c.data.image_size == 224  # distil at 224
  assert evaluate.crop_fraction(c, 224) == 0.875 and evaluate.crop_fraction(c, 448) == 1.0
  with pytest.raises(ValueError, match="res=384"):
    imagenet.get_config("res=384")
  smoke = imagenet.get_config(f"res={res},smoke")
  assert "image_size" not in smoke.finetune.augment


def test_fine_tuning_follows_adventurers_recipe():
  """Adventurer's --clip-grad default is None: no clipping when fine-tuning; distillation
  keeps the project's 1.0 (docs/method-fidelity.md)."""
  c = imagenet.get_config("setup=clip_b16_to_B")
  assert c.finetune.optim.clip_norm == 0 and c.distill.optim.clip_norm == 1.0
  assert c.finetune.augment.randaugment and c.finetune.optim.min_lr == 1e-5
  assert c.finetune.optim.lr == 5e-4 * c.finetune.batch_size / 512


def test_custom_data_without_eval_data_holds_some_out():
  """configs/custom.py used to evaluate on its training folder when eval_data was not given."""
  c = custom.get_config("teacher=/ckpt/t,data=/data/imgs")
  assert c.data.source == "folder:/data/imgs" and c.data.eval_source == ""
  assert 0 < c.data.test_fraction < 1
  c = custom.get_config("teacher=/ckpt/t,data=/data/imgs,eval_data=/data/val")
  assert c.data.eval_source == "folder:/data/val"


def test_the_console_marks_a_resampled_number():
  """The @448 line says which models ran away from their training size."""
  acc = lambda top1, resampled: dict(top1=top1, crop_fraction=1.0, resampled_from=resampled)
  rows = {"teacher": {"@448": acc(0.8, 224)}, "student": {"@448": acc(0.85, None)}}
  line = evaluate.other_size(rows, 448)
  assert line == "top-1 @448 (crop 1.0): teacher 80.00 (trained at 224, resampled), student 85.00"
