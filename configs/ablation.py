"""The paper's ablation at CPU scale: supervised vs MP vs AM vs both, and the AM scope.

  python main.py --config configs/ablation.py --workdir /tmp/ablation
  python main.py --config configs/ablation.py:data=npz:/path/my.npz,size=32,seeds=5 ...

Args: `data` (any source `linearizer.data` reads: mnist, digits, npz:, folder:, tfds:),
`size` (image side; a multiple of `patch`), `patch` (teacher and student), `seeds`,
`labels` (the fine-tuning label budget), `smoke`.

Why these defaults (MNIST 28², patch 4, 250 labels, ~40 minutes on a 2-core CPU):
- 28² images in 4² patches give 49 tokens: enough for token-to-token similarity maps to
  carry structure, few enough that one distillation step takes ~0.25 s here. (sklearn's
  8² `digits` would leave 4 tokens.)
- The teacher learns from all 4000 labelled training images; the students then see the
  same 4000 images without labels for distillation but only `labels`=250 of them for
  fine-tuning — the paper's situation (a teacher pretrained on far more than the
  student's labels) in miniature, and what makes the from-scratch student clearly worse.
- Every student gets the same budget: distillation 200 + fine-tuning 200 steps, or 400
  supervised steps from scratch, all at batch 64. Same student (width 64, depth 4,
  d_state 32), same masked input for every distillation variant (75%).
- Seeds change the student's initialisation, the data order, the masks and which
  `labels` images are labelled; the teacher is trained once (seed 0).
"""
from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, smoke=False, data="mnist", size=28, patch=4, seeds=3, labels=250)
  c = common.base()
  c.stages = ("train_teacher", "ablation")
  c.data = common.data(arg.data, arg.size, crop_scale=(0.6, 1.0), flip=False, crop_fraction=1.0)
  c.teacher.variant = c.student.variant = f"Ti/{arg.patch}"
  c.teacher.overrides = dict(width=96, depth=4, num_heads=4, mlp_dim=192)
  c.student.overrides = dict(width=64, depth=4, headdim=32, d_state=32, chunk_size=64)
  supervised = lambda: common.supervised_loss(label_smoothing=0.1, mixup_alpha=0.0,
                                              cutmix_alpha=0.0)
  c.train_teacher = common.stage(steps=1000, batch_size=64, lr=2e-3, warmup_steps=50,
                                 loss=supervised())
  c.distill = common.stage(steps=200, batch_size=64, lr=2e-3, warmup_steps=20,
                           loss=common.distill_loss())
  c.finetune = common.stage(steps=200, batch_size=64, lr=2e-3, warmup_steps=20,
                            num_labels=arg.labels, loss=supervised())
  c.train_student = common.stage(steps=400, batch_size=64, lr=2e-3, warmup_steps=40,
                                 num_labels=arg.labels, loss=supervised())
  c.ablation = dict(seeds=arg.seeds,
                    variants=("supervised", "mp", "am", "am_mp", "scope_cls", "scope_all"))
  c.eval.batch_size = 250
  c.checkpoint.every_steps = 200
  c.log_every = 50
  if arg.smoke:
    common.smoke(c)
  return c.lock()
