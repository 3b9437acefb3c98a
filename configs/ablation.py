"""The paper's ablation at CPU scale: supervised vs MP vs AM vs both, and the AM scope.

  python main.py --config configs/ablation.py --workdir /tmp/ablation
  python main.py --config configs/ablation.py:data=npz:/path/my.npz,size=32,teacher_patch=8 ...

Args: `data` (any source `linearizer.data` reads: mnist, digits, npz:, folder:, tfds:),
`size` (image side), `teacher_patch` and `student_patch` (each must divide `size`),
`seeds`, `labels` (the fine-tuning label budget), `workers` (runs at once), `smoke`.

Why these defaults (MNIST 28², 500 labels, 3 seeds, 49 minutes on a 2-core CPU):
- The demo's setting (configs/demo.py), where distillation paid off for seed 0 (+2.8
  points; over 3 seeds only +0.4, within the spread: docs/ablation.md): the
  teacher (ViT w96/d4, 7² patches) learns from all 4000 labelled training images; the
  students (Adventurer w64/d4, 4² patches: 49 tokens, enough for the similarity maps to
  carry structure) see the same 4000 images without labels for distillation but only
  `labels`=500 of them for fine-tuning — the paper's situation (a teacher pretrained on
  far more than the student's labels) in miniature. sklearn's 8² `digits` would leave a
  handful of tokens. The teacher's 4×4 token grid is resampled to the student's 7×7, as
  for a ViT-L/14 teacher and a patch-16 student.
- Every student gets the same budget: distillation 250 + fine-tuning 300 steps, or 550
  supervised steps from scratch, all at batch 64; the same masked input (75%) for every
  distillation variant. A pilot with a 4²-patch teacher, 250 labels and 200 + 200 steps
  left the fine-tuned students under-trained (train accuracy 86–92% after fine-tuning vs
  100% from scratch) and behind the from-scratch student: the fine-tuning budget matters.
- Seeds change the student's initialisation, the data order and the masks; every seed
  fine-tunes on the same `labels` images (as every ImageNet seed sees the same labels),
  so the std measures training noise; the teacher is trained once (seed 0). (With a new
  label subset per seed, the from-scratch student alone moved from 88.1% to 90.5%.)
- `workers`=2: these small models keep about one core busy each, so two runs at once
  halve the wall time on 2 cores.
"""

import ml_collections

from configs import common, demo


def get_config(arg=None):
  arg = common.parse_arg(arg, smoke=False, data="mnist", size=28, teacher_patch=7,
                         student_patch=4, seeds=3, labels=500, workers=2)
  # The demo's models, schedule and budget (an unlocked copy), as the docstring says why.
  c = ml_collections.ConfigDict(demo.get_config("smoke" if arg.smoke else None).to_dict())
  c.stages = ("train_teacher", "ablation")
  c.ablation = dict(seeds=arg.seeds,
                    variants=("supervised", "mp", "am", "am_mp", "scope_cls", "scope_all"),
                    workers=arg.workers)  # runs at once, one process each (~1 core each)
  c.distill.visualize_every = 0  # no pictures per run: 15 distillations
  if not arg.smoke:
    c.data.source, c.data.image_size = arg.data, arg.size
    c.teacher.variant = f"Ti/{arg.teacher_patch}"
    c.student.variant = f"Ti/{arg.student_patch}"
    c.finetune.num_labels = c.train_student.num_labels = arg.labels
    c.eval.speed_resolutions = ()
  return c.lock()
