"""The paper's ablation at CPU scale: supervised vs MP vs AM vs both, and the AM scope.

  python main.py --config configs/ablation.py --workdir /tmp/ablation
  python main.py --config configs/ablation.py:data=npz:/path/my.npz,size=32,teacher_patch=8 ...

Args: `data` (any source `linearizer.data` reads: mnist, digits, npz:, folder:, tfds:),
`size` (image side), `teacher_patch` and `student_patch` (each must divide `size`),
`teacher_pool` ('gap' or 'cls': what the teacher's head reads), `teacher_steps`, `seeds`,
`labels` (the fine-tuning label budget), `steps` (every student's budget), `distill_steps`
(of `steps`; fine-tuning gets the rest), `mask_ratio`, `am_scope` (the tokens AM + MP and
AM only match: all, visible or cls), `layer_decay` (fine-tuning's layer-wise lr decay;
1 = off), `label_seed` (which labelled subset), `workers` (runs at once), `smoke`.

Why these defaults (MNIST 28², 100 labels, 3 seeds; docs/ablation.md has the measured
tables, the time and the one-seed pilots behind each choice):
- The demo's model sizes (configs/demo.py): the teacher (ViT w96/d4, 7² patches) learns
  from all 4000 labelled training images; the students (Adventurer w64/d4, 4² patches: 49
  tokens, enough for the similarity maps to carry structure) see the same 4000 images
  without labels for distillation but only `labels` of them for fine-tuning — the paper's
  situation (a teacher pretrained on far more than the student's labels) in miniature.
  The teacher's 4×4 token grid is resampled to the student's 7×7, as for a ViT-L/14
  teacher and a patch-16 student. sklearn's 8² `digits` would leave a handful of tokens.
- The teacher's head reads its mean patch token ('gap', as big_vision's and timm's
  avg-pool ViTs), and it trains 3000 steps (48 epochs): 96.8%. Both losses take their
  targets from the teacher's patch tokens, so those must carry the class, as CLIP's do.
  With the demo's CLS head (1000 steps, 90.7%) a linear probe on 100 labels read 90.2%
  from the teacher's CLS token but 76.0% from its mean patch token, and the distilled
  student's features probed at 44% (random init: 36%): AM + MP then only tied scratch.
  From a GAP teacher the distilled student probes at 76%.
- 100 labels: with 500 the from-scratch student came within 1.6 points of the teacher,
  leaving distillation nothing to show.
- Every student gets the same budget, 750 steps at batch 64: distillation 450 +
  fine-tuning 300, or 750 supervised steps from scratch (long converged on 100 labels:
  480 epochs of them). Pilots: 450 + 300 86.5%, 300 + 450 84.8%, 450 + 100 78.7%; from
  scratch 80.8%. A 600-step budget (360 + 240, all 3 seeds) saved 12 min but cost AM + MP
  2.2 points and the 2-std margin (83.1 ± 1.8 against 79.6 ± 1.0). Every distillation
  variant sees the same masked input.
- `mask_ratio`=0.5, not the paper's 0.75 (82.8% in the same pilot): with ~7 epochs of
  distillation the student learns more from 24 visible patches of 49 than from 12.
  `:mask_ratio=0.75` is the paper's.
- `am_scope`='all', not the paper's 'visible': AM + MP matches the similarities of every
  token, masked positions too. At this scale it was the best row with the smallest spread
  on every set of seeds we ran, where the paper has it last: seeds 0–2 85.3 ± 1.0 against
  visible's 83.8 ± 2.5, held-out seeds 3–5 86.1 ± 0.6 against 83.4 ± 1.4, and another
  labelled subset 83.3 ± 0.4 against 82.4 ± 0.4. AM only then matches all tokens too (it
  is AM + MP without MP) and ties scratch (79.3 and 80.7 on the two seed sets, against
  79.9 and 80.5). `:am_scope=visible` is the paper's; the scope rows show all three.
- `layer_decay`=1 (off). BEiT's layer-wise lr decay (an option of Adventurer's recipe)
  steadied seeds 0–2 (re-fine-tuning the distilled AM + MP students, visible scope, at
  0.85: 84.8, 85.0, 83.0 against 86.5, 83.4, 81.6) but cost 0.8 points on seeds 3–5 with
  another labelled subset (`label_seed=3`): a choice fitted to the seeds it was picked on.
- Seeds change the student's initialisation, the data order and the masks; every seed
  fine-tunes on the same `labels` images, drawn with `label_seed` (as every ImageNet seed
  sees the same labels), so the std measures training noise; the teacher is trained once.
- `workers`=2: two runs at once, one process each. Each small-model process keeps a
  little over one core busy, so on 2 cores this saved about 20% of the wall time (measured
  before main.py's CPU memory fix, linearizer/cpu_malloc.py).
"""

import ml_collections

from configs import common, demo
from linearizer import losses


def get_config(arg=None):
  arg = common.parse_arg(arg, smoke=False, data="mnist", size=28, teacher_patch=7,
                         student_patch=4, seeds=3, labels=100, mask_ratio=0.5,
                         am_scope="all", distill_steps=450, steps=750, teacher_steps=3000,
                         teacher_pool="gap", layer_decay=1.0, label_seed=0, workers=2)
  # The demo's models, schedule and budget (an unlocked copy), as the docstring says why.
  c = ml_collections.ConfigDict(demo.get_config("smoke" if arg.smoke else None).to_dict())
  c.stages = ("train_teacher", "ablation")
  c.ablation = dict(seeds=arg.seeds,
                    variants=("supervised", "mp", "am", "am_mp", "scope_cls", "scope_visible",
                              "scope_all"),  # the am_scope row is am_mp's runs: 6 per seed
                    label_seed=arg.label_seed,  # which `labels` images every seed fine-tunes on
                    workers=arg.workers)  # runs at once, one process each (~1 core each)
  c.distill.visualize_every = 0  # no pictures per run: 15 distillations
  c.distill.loss.mask_ratio = arg.mask_ratio
  if arg.am_scope not in losses.SCOPES:
    raise ValueError(f"am_scope={arg.am_scope!r}; expected one of {losses.SCOPES}.")
  c.distill.loss.scope = arg.am_scope
  if not arg.smoke:
    c.data.source, c.data.image_size = arg.data, arg.size
    c.teacher.variant = f"Ti/{arg.teacher_patch}"
    c.teacher.overrides.pool = arg.teacher_pool
    c.student.variant = f"Ti/{arg.student_patch}"
    c.finetune.num_labels = c.train_student.num_labels = arg.labels
    c.eval.speed_resolutions = ()
    # The same budget for everyone: distill + fine-tune steps = supervised steps.
    budget = c.train_student.steps = c.train_student.optim.total_steps = arg.steps
    c.train_teacher.steps = c.train_teacher.optim.total_steps = arg.teacher_steps
    if not 0 < arg.distill_steps < budget:
      raise ValueError(f"distill_steps={arg.distill_steps}; expected 1 to {budget - 1} (the "
                       f"rest of the {budget}-step budget goes to fine-tuning).")
    c.distill.steps = c.distill.optim.total_steps = arg.distill_steps
    c.finetune.steps = c.finetune.optim.total_steps = budget - arg.distill_steps
    c.finetune.optim.warmup_steps = max(1, c.finetune.steps // 10)
    c.finetune.optim.layer_decay = arg.layer_decay
  return c.lock()
