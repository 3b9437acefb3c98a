"""linearizer/costs.py: the FLOPs a recipe costs, XLA's count, held to what the programs
must satisfy whatever the counter: a supervised step is a forward and its backward (twice
the forward's matmuls) over the batch, 3 × batch × the forward per image, and a
distillation step costs more than a supervised one of the same student (the teacher's
forward, the losses); the ablation's cost-matched rows follow from them."""

import pytest

from configs import ablation as ablation_config
from linearizer import ablation, costs
from linearizer.errors import UserError

CLASSES = 10


@pytest.fixture(scope="module")
def smoke():
  config = ablation_config.get_config("smoke")
  return config, {s: costs.step_gflops(config, CLASSES, s) for s in ("distill", "train_student")}


def test_a_supervised_step_is_three_forwards_a_image(smoke):
  config, step = smoke
  forward = costs.inference_gflops(config, CLASSES)
  batch = config.train_student.batch_size
  assert step["train_student"] == pytest.approx(3 * batch * forward, rel=0.05)


def test_matched_steps_give_the_distilled_recipes_flops(smoke):
  config, step = smoke
  finetune = costs.step_gflops(config, CLASSES, "finetune")
  assert step["distill"] > step["train_student"]  # the teacher's forward and the losses
  distilled = config.distill.steps * step["distill"] + config.finetune.steps * finetune
  assert costs.train_gflops(config, CLASSES, costs.DISTILLED) == pytest.approx(distilled)
  assert ablation.matched_steps(config, CLASSES) == round(distilled / step["train_student"])


def test_half_the_patch():
  assert ablation.half_patch("Ti/4") == "Ti/2" and ablation.half_patch("B/16") == "B/8"
  with pytest.raises(UserError, match="odd one"):
    ablation.half_patch("Ti/7")
