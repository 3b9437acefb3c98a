"""The paper's ablation at CPU scale: supervised vs MP vs AM vs both, and the AM scope.

  python main.py --config configs/ablation.py --workdir /tmp/ablation
  python main.py --config configs/ablation.py:data=npz:/path/my.npz,size=32,teacher_patch=8 ...

Args: `data` (any source `linearizer.data` reads: mnist, digits, npz:, folder:, tfds:),
`size` (image side), `teacher_patch` and `student_patch` (each must divide `size`),
`teacher_pool` ('gap' or 'cls': what the teacher's head reads), `teacher_steps`, `seeds`,
`labels` (the fine-tuning label budget), `steps` (every student's budget), `distill_steps`
(of `steps`; fine-tuning gets the rest), `mask_ratio`, `am_scope` (the tokens AM + MP and
AM only match: all, visible or cls), `layer_decay` (fine-tuning's layer-wise lr decay;
1 = off), `label_seed` (which labelled subset), `workers` (runs at once), `dense` (the
dense column: every run's student also fine-tuned and scored on configs/segment.py's dense
toy, at `canvas`), `smoke`.

Defaults: MNIST 28², the demo's models (configs/demo.py) with a GAP-head teacher trained
3000 steps, 100 labels, 3 seeds, 750 steps per student (distill 450 + fine-tune 300),
`mask_ratio` 0.5, `am_scope` all, no layer decay, 2 workers. Why each, with the measured
tables and the pilots behind them: docs/ablation.md ("Why each default"). About 54 min on
2 CPU cores (21 runs; 46 min before the AM-only-unmasked row).
"""

import ml_collections

from configs import common, demo, tool_blocks
from configs import segment as segment_config


def get_config(arg=None):
  arg = common.parse_arg(
    arg,
    smoke=False,
    data="mnist",
    size=28,
    teacher_patch=7,
    student_patch=4,
    seeds=3,
    labels=100,
    mask_ratio=0.5,
    am_scope="all",
    distill_steps=450,
    steps=750,
    teacher_steps=3000,
    teacher_pool="gap",
    layer_decay=1.0,
    label_seed=0,
    workers=2,
    dense=False,
    canvas=28,
  )
  # The demo's models, schedule and budget (an unlocked copy), as the docstring says why.
  c = ml_collections.ConfigDict(demo.get_config("smoke" if arg.smoke else None).to_dict())
  c.stages = ("train_teacher", "ablation")
  # The am_scope row is am_mp's runs: 7 runs per seed.
  # each row's train and inference GFLOPs (compiled once per row: seconds on a CPU)
  c.ablation = tool_blocks.ablation(
    seeds=arg.seeds, workers=arg.workers, gflops=not arg.smoke, dense=arg.dense
  )
  # the dense column's data, head and budget: the segmentation demo's (configs/segment.py)
  c.segment = tool_blocks.segment(backbones=())
  segment_config.demo_segment(c.segment, arg.canvas, arg.smoke)
  c.label_seed = arg.label_seed  # every seed fine-tunes on the same `labels` images
  c.distill.visualize_every = 0  # no pictures per run: 18 distillations
  c.distill.loss.mask_ratio = arg.mask_ratio
  if arg.am_scope not in common.AM_SCOPES:
    raise ValueError(f"am_scope={arg.am_scope!r}; expected one of {common.AM_SCOPES}.")
  c.distill.loss.scope = arg.am_scope
  if not arg.smoke:
    c.data.source, c.data.image_size = arg.data, arg.size
    c.teacher.variant = f"Ti/{arg.teacher_patch}"
    c.teacher.overrides.pool = arg.teacher_pool
    c.student.variant = f"Ti/{arg.student_patch}"
    c.finetune.num_labels = c.train_student.num_labels = arg.labels
    c.eval.speed_resolutions = ()
    # The same budget for everyone: distill + fine-tune steps = supervised steps.
    budget = c.train_student.steps = arg.steps
    c.train_teacher.steps = arg.teacher_steps
    if not 0 < arg.distill_steps < budget:
      raise ValueError(
        f"distill_steps={arg.distill_steps}; expected 1 to {budget - 1} (the "
        f"rest of the {budget}-step budget goes to fine-tuning)."
      )
    c.distill.steps = arg.distill_steps
    c.finetune.steps = budget - arg.distill_steps
    c.finetune.optim.warmup_steps = max(1, c.finetune.steps // 10)
    c.finetune.optim.layer_decay = arg.layer_decay
  return c.lock()
