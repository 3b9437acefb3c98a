"""The paper's ablation (method.md §7) on your own data: which loss and which AM scope.

One teacher is trained (or loaded); then, for the same student and the same budget, each
variant is distilled and fine-tuned over several seeds:

  supervised     the student trained from scratch on the labels (train_student stage)
  mp             masked prediction only          (distill.loss.w_am = 0)
  am             activation matching only        (distill.loss.w_mp = 0)
  am_unmasked    AM only on unmasked input        (w_mp = 0, mask_ratio = 0: the paper
                 does not say whether its AM-only row masked the student's input)
  am_mp          both, AM over the config's tokens (distill.loss.scope)
  scope_cls      both, AM over the CLS row only
  scope_visible  both, AM over the visible tokens (the paper's choice)
  scope_all      both, AM over all tokens

The scope row that is the config's own scope is the AM + MP runs, not trained twice. The
rows beyond the paper (KD, the teacher cache, teacher init, the simpler recipes of 2026)
and what each sets: `ablation_variants.py`.
Every variant but am_unmasked sees the same masked input (distill.loss.mask_ratio): only the
loss differs.
Seeds change the student's initialisation, data order and masks; every seed fine-tunes on
the same labelled subset (`label_seed`), so the spread measures training noise.
Each run works in `workdir/ablation/<variant>/seed<k>/` and writes `result.json` when done,
so an interrupted ablation resumes where it stopped. The summary is `ablation.json`,
`ablation.md` (a table in the paper's layout, mean ± std with the paper's numbers beside)
and `ablation.png`, all in `workdir/ablation/`.
"""

import contextlib
import json
import multiprocessing
import os
import time

import jax
import ml_collections

from linearizer import costs, data, evaluate, files, resolve, supervised, workdir
from linearizer.ablation_table import (  # noqa: F401 (ablation.* names too)
  bar_plot,
  checks,
  summarize,
  table,
  write_summary,
)
from linearizer.ablation_variants import (  # noqa: F401 (ablation.* names too)
  FROM_SCRATCH,
  HALF_PATCH,
  MATCHED_STEPS,
  PAPER,
  TEACHER_SHAPE,
  VARIANTS,
  dense_path,
  out_dir,
  runs_of,
  scope_row,
  variant_dir,
)
from linearizer.distillation import stage as distill_stage
from linearizer.distillation import teacher_cache, teacher_fit
from linearizer.errors import UserError
from linearizer.log import log, main_process
from linearizer.segmentation import stage as seg_stage

_MATCHED = {}  # config JSON -> the steps of supervised_matched, worked out once a process


def matched_steps(config, classes: int) -> int:
  """The train_student steps whose FLOPs equal AM + MP's training (the config's own
  distillation, teacher forwards included, and fine-tuning): linearizer/costs.py."""
  key = config.to_json()
  if key not in _MATCHED:
    distilled = costs.train_gflops(config, classes, costs.DISTILLED)
    step = costs.step_gflops(config, classes, "train_student")
    _MATCHED[key] = max(1, round(distilled / step))
    log(
      f"[ablation] supervised_matched: {_MATCHED[key]} train_student steps = AM + MP's "
      f"{distilled:,.2f} training GFLOPs / {step:.4f} a step"
    )
  return _MATCHED[key]


def half_patch(variant: str) -> str:
  """'Ti/4' -> 'Ti/2': the student at half its patch (4x the tokens)."""
  name, _, patch = variant.partition("/")
  if not patch.isdigit() or int(patch) % 2:
    raise UserError(
      f"ablation variant supervised_tokens halves the student's patch: {variant!r} has an "
      "odd one; use an even student patch."
    )
  return f"{name}/{int(patch) // 2}"


def run_config(config, variant, seed_index, teacher_cfg=None, classes=None):
  """The config of one run: the base one with this seed and this variant's settings
  (TEACHER_SHAPE: the student's overrides with `teacher_cfg`'s width, depth, heads and
  MLP put in, so every teacher weight has a counterpart; MATCHED_STEPS: `matched_steps`,
  which needs `classes`; HALF_PATCH: `half_patch`)."""
  sub = ml_collections.ConfigDict(config.to_dict())
  sub.seed = config.seed + seed_index
  for path, value in VARIANTS[variant][1].items():
    if value == TEACHER_SHAPE:
      value = {**config.student.overrides, **teacher_fit.fitting_overrides(teacher_cfg)}
    elif value == MATCHED_STEPS:
      value = matched_steps(config, classes)
    elif value == HALF_PATCH:
      value = half_patch(config.student.variant)
    *parents, leaf = path.split(".")
    node = sub
    for key in parents:
      node = node[key]
    node[leaf] = value
  return sub


def train_variant(config, variant, run_dir, teacher, train_src, classes):
  """Distill + fine-tune (or train from scratch) one student; returns it."""
  norm = (teacher.cfg.mean, teacher.cfg.std)
  if variant in FROM_SCRATCH:
    student = resolve.new_student(config, classes, norm, drop_path=config.train_student.drop_path)
    return supervised.run_supervised("train_student", config, run_dir, student, train_src, teacher)
  if not workdir.finished(run_dir, "distill"):
    distill_stage.run_distill(config, run_dir, teacher, train_src)
  student = resolve.pretrained_student(config, run_dir, classes)
  return supervised.run_supervised("finetune", config, run_dir, student, train_src, teacher)


def top1(config, model, eval_src):
  return evaluate.accuracy(config, model, eval_src, image_size=config.data.image_size)[0]["top1"]


# The run's own models that are seed 0 of a row (the same config, nothing overridden): a
# config that runs their stages before `ablation` (the demo) does not train them twice.
OWN_ROLES = {"am_mp": "finetuned", "supervised": "scratch"}


def own_model(config, root, variant, k):
  """The run's own finished model that is (variant, seed k), or None."""
  role = OWN_ROLES.get(variant)
  if k != 0 or role is None or resolve.STAGE_OF[role] not in config.stages:
    return None
  return resolve.stage_model(config, root, role)


def final_model(config, root, variant, k):
  """The model run (variant, seed k) scored for its top-1, from its directory."""
  model = own_model(config, root, variant, k)
  stage = "train_student" if variant in FROM_SCRATCH else "finetune"
  return model or resolve.load_model(workdir.model_dir(variant_dir(root, variant, k), stage))


def dense_miou(config, root, variant, k, model) -> float:
  """The ablation's dense column: `model` (its classification head dropped) fine-tuned with
  `segment.head` on `segment.data` for `segment.steps` and scored there (the segment
  stage's `train_and_score`); results in the run's `dense/`. Returns its mIoU."""
  seed = resolve.seed_of(config, "segment_backbone")
  backbone = resolve.with_new_head(model, 0, seed, drop_path=config.segment.drop_path)
  directory = os.path.dirname(dense_path(root, variant, k))
  row = seg_stage.train_and_score(config, directory, backbone, seg_stage.sources(config))
  if main_process():
    seg_stage.write_json(dense_path(root, variant, k), row)
  return row["miou"]


def run_one(config, root, variant, k, teacher, train_src, eval_src, classes):
  """One (variant, seed) run: trained and scored unless its result.json is there, then with
  `ablation.dense` its dense column unless that is there; returns its top-1."""
  sub = run_config(config, variant, k, teacher.cfg, classes)
  done = os.path.join(variant_dir(root, variant, k), "result.json")
  model = None
  if os.path.isfile(done):
    with open(done, encoding="utf-8") as f:
      acc = json.load(f)["top1"]
  else:
    model = own_model(config, root, variant, k)
    if model is not None:
      log(f"[ablation] {variant} seed {k}: the run's own {OWN_ROLES[variant]} student")
    else:
      model = train_variant(
        sub, variant, variant_dir(root, variant, k), teacher, train_src, classes
      )
    acc = top1(sub, model, eval_src)
    if main_process():
      files.write_json(done, dict(variant=variant, seed=sub.seed, top1=acc), indent=None)
  if config.ablation.dense and not os.path.isfile(dense_path(root, variant, k)):
    model = model or final_model(sub, root, variant, k)
    log(
      f"[ablation] {variant} seed {k}: mIoU {100 * dense_miou(sub, root, variant, k, model):.2f}%"
    )
  return acc


def missing(config, root, variant, k) -> bool:
  """Whether run (variant, seed k) has something left to do (`run_one`)."""
  if not os.path.isfile(os.path.join(variant_dir(root, variant, k), "result.json")):
    return True
  return bool(config.ablation.dense) and not os.path.isfile(dense_path(root, variant, k))


_WORKER = {}  # in a worker process: what every run shares, loaded once by _start_worker


def _start_worker(config_json, root, cache_dir):
  """A fresh worker process: the config, data and teacher, once for all its runs."""
  if cache_dir:
    jax.config.update("jax_compilation_cache_dir", cache_dir)
  config = ml_collections.ConfigDict(json.loads(config_json))
  train_src, eval_src = data.sources(config.data)
  classes = data.num_classes(config.data, train_src)
  _WORKER.update(
    config=config,
    root=root,
    train_src=train_src,
    eval_src=eval_src,
    classes=classes,
    teacher=resolve.teacher(config, root, classes),
  )


def _worker(task):
  variant, k = task
  w = _WORKER
  return (
    variant,
    k,
    run_one(
      w["config"], w["root"], variant, k, w["teacher"], w["train_src"], w["eval_src"], w["classes"]
    ),
  )


def check_config(config) -> None:
  """Refuses, before any stage runs, unknown variants and a dense column without the
  `segment` block it fine-tunes with (configs/ablation.py declares one)."""
  unknown = sorted(set(config.ablation.variants) - set(VARIANTS))
  if unknown:
    raise UserError(f"ablation.variants: unknown {unknown}; expected some of {list(VARIANTS)}.")
  for variant in config.ablation.variants:  # a row's loss the config's cache cannot serve
    sub = ml_collections.ConfigDict(config.distill.to_dict())
    for path, value in VARIANTS[variant][1].items():
      if path.startswith("distill.loss."):
        sub.loss[path.rpartition(".")[2]] = value
    teacher_cache.check_config(sub)
  if config.ablation.dense:
    if "segment" not in config:
      raise UserError(
        "ablation.dense=True fine-tunes every run on the `segment` block's data and head, "
        "and this config has none: use configs/ablation.py (:dense=True), or add a segment "
        "block (configs/tool_blocks.segment)."
      )
    seg_stage.check_head_and_data(config)


def run(config, root, train_src, eval_src, classes):
  """Trains every (variant, seed) not yet done, then writes the summary; returns it.

  With ablation.workers > 1 (one process), that many runs go at once, each in its own
  process: small models keep about one CPU core busy each.
  """
  check_config(config)
  if "train_teacher" in config.stages and not workdir.finished(root, "train_teacher"):
    raise UserError("ablation: the 'train_teacher' stage must come before 'ablation'.")
  teacher = resolve.teacher(config, root, classes)
  variants = list(dict.fromkeys(runs_of(config, v) for v in config.ablation.variants))
  todo = [
    (v, k) for k in range(config.ablation.seeds) for v in variants if missing(config, root, v, k)
  ]
  start = time.time()
  workers = min(config.ablation.workers, len(todo))
  pool = None
  if workers > 1 and jax.process_count() == 1:  # a fresh JAX in every worker
    pool = multiprocessing.get_context("spawn").Pool(
      workers, _start_worker, (config.to_json(), root, jax.config.jax_compilation_cache_dir)
    )
  with pool or contextlib.nullcontext():
    if pool:
      results = pool.imap_unordered(_worker, todo)
    else:
      results = (
        (v, k, run_one(config, root, v, k, teacher, train_src, eval_src, classes)) for v, k in todo
      )
    for done, (variant, k, acc) in enumerate(results, 1):
      log(
        f"[ablation] {variant} seed {k}: top-1 {100 * acc:.2f}% ({done}/{len(todo)} runs, "
        f"{(time.time() - start) / 60:.1f} min)"
      )
  gflops = row_gflops(config, root, teacher.cfg, classes) if config.ablation.gflops else None
  summary = summarize(config, root, top1(config, teacher, eval_src), gflops)
  if main_process():
    write_summary(summary, out_dir(root))
    log(summary["table"])
  return summary


def row_gflops(config, root, teacher_cfg, classes) -> dict:
  """{variant: {'train': GFLOPs, 'inference': GFLOPs per image}} of each row's recipe (its
  seed-0 config), XLA's count (linearizer/costs.py); kept in ablation/gflops.json, so a
  resumed ablation compiles only rows it has not counted."""
  path = os.path.join(out_dir(root), "gflops.json")
  known = {}
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      known = json.load(f)
  for variant in dict.fromkeys(runs_of(config, v) for v in config.ablation.variants):
    if variant not in known:
      sub = run_config(config, variant, 0, teacher_cfg, classes)
      stages = costs.FROM_SCRATCH if variant in FROM_SCRATCH else costs.DISTILLED
      known[variant] = dict(
        train=costs.train_gflops(sub, classes, stages),
        inference=costs.inference_gflops(sub, classes),
      )
      if main_process():
        files.write_json(path, known)
  return {v: known[runs_of(config, v)] for v in config.ablation.variants}
