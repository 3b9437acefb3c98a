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
import textwrap
import time

import jax
import ml_collections
import numpy as np

from linearizer import costs, data, evaluate, files, plots, resolve, supervised, workdir
from linearizer.ablation_variants import (  # noqa: F401 (ablation.* names too)
  FROM_SCRATCH,
  HALF_PATCH,
  MATCHED_STEPS,
  PAPER,
  TEACHER_SHAPE,
  VARIANTS,
)
from linearizer.distillation import stage as distill_stage
from linearizer.distillation import teacher_fit
from linearizer.errors import UserError
from linearizer.log import log, main_process


def scope_row(scope):
  """The scope row of AM + MP's own AM scope: the AM + MP runs themselves."""
  return f"scope_{scope}"


def runs_of(config, variant):
  """The variant whose runs give this row: the config's own scope row is AM + MP's."""
  return "am_mp" if variant == scope_row(config.distill.loss.scope) else variant


def out_dir(root):
  return os.path.join(root, "ablation")


def variant_dir(root, variant, seed_index):
  return os.path.join(out_dir(root), variant, f"seed{seed_index}")


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


def run_one(config, root, variant, k, teacher, train_src, eval_src, classes):
  """One (variant, seed) run; writes its result.json and returns its top-1."""
  sub = run_config(config, variant, k, teacher.cfg, classes)
  model = own_model(config, root, variant, k)
  if model is not None:
    log(f"[ablation] {variant} seed {k}: the run's own {OWN_ROLES[variant]} student")
  else:
    run_dir = variant_dir(root, variant, k)
    model = train_variant(sub, variant, run_dir, teacher, train_src, classes)
  acc = top1(sub, model, eval_src)
  if main_process():
    result = dict(variant=variant, seed=sub.seed, top1=acc)
    files.write_json(
      os.path.join(variant_dir(root, variant, k), "result.json"), result, indent=None
    )
  return acc


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


def run(config, root, train_src, eval_src, classes):
  """Trains every (variant, seed) not yet done, then writes the summary; returns it.

  With ablation.workers > 1 (one process), that many runs go at once, each in its own
  process: small models keep about one CPU core busy each.
  """
  unknown = sorted(set(config.ablation.variants) - set(VARIANTS))
  if unknown:
    raise UserError(f"ablation.variants: unknown {unknown}; expected some of {list(VARIANTS)}.")
  if "train_teacher" in config.stages and not workdir.finished(root, "train_teacher"):
    raise UserError("ablation: the 'train_teacher' stage must come before 'ablation'.")
  teacher = resolve.teacher(config, root, classes)
  variants = list(dict.fromkeys(runs_of(config, v) for v in config.ablation.variants))
  todo = [
    (v, k)
    for k in range(config.ablation.seeds)
    for v in variants
    if not os.path.isfile(os.path.join(variant_dir(root, v, k), "result.json"))
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


# ---------------------------------------------------------------------------------------
# The summary: numbers, a table in the paper's layout, a bar plot.
# ---------------------------------------------------------------------------------------
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


def summarize(config, root, teacher_top1, gflops=None):
  """Per variant the top-1 of every seed, mean and std (in %), the checks, the table;
  `gflops` ({variant: {'train', 'inference'}}) adds two columns."""
  variants = {}
  for variant in config.ablation.variants:
    accs = []
    for k in range(config.ablation.seeds):
      path = os.path.join(variant_dir(root, runs_of(config, variant), k), "result.json")
      with open(path, encoding="utf-8") as f:
        accs.append(100 * json.load(f)["top1"])
    variants[variant] = dict(
      top1=accs,
      mean=float(np.mean(accs)),
      std=float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0,
      **({"gflops": gflops[variant]} if gflops else {}),
    )
  out = dict(
    teacher_top1=100 * teacher_top1,
    seeds=config.ablation.seeds,
    data=config.data.source,
    scope=config.distill.loss.scope,
    variants=variants,
    checks=checks(variants),
  )
  out["table"] = table(out)
  return out


def checks(variants):
  """The issue's claims, as numbers: does AM+MP beat supervised by > 2 std, and do MP-only
  and AM-only sit between them? 'std' is the larger of the two rows' seed std."""
  if "supervised" not in variants or "am_mp" not in variants:
    return {}
  sup, both = variants["supervised"], variants["am_mp"]
  spread = max(sup["std"], both["std"])
  out = dict(
    gap=both["mean"] - sup["mean"],
    spread=spread,
    am_mp_beats_supervised_by_2_std=both["mean"] - sup["mean"] > 2 * spread,
  )
  for v in ("mp", "am"):
    if v in variants:
      out[f"{v}_between"] = sup["mean"] <= variants[v]["mean"] <= both["mean"]
  return out


def table(summary):
  """Markdown in the paper's layout: objective rows, then AM-scope rows."""
  variants, n = summary["variants"], summary["seeds"]
  costs_on = any("gflops" in v for v in variants.values())
  extra = " train GFLOPs | inference GFLOPs |" if costs_on else ""
  blank = " | |" * costs_on
  lines = [
    f"| | top-1 (%), mean ± std over {n} seed{'s' * (n > 1)} | paper, ImageNet-1k |{extra}",
    "|---|---|---|" + "---|---|" * costs_on,
    f"| teacher | {summary['teacher_top1']:.2f} | 84.7 (CLIP ViT-B/16) |{blank}",
  ]
  for section, rows in PAPER.items():
    rows = [row for row in rows if row[1] in variants]
    if rows:  # (a section none of whose rows was run is left out)
      lines.append(f"| **{section}** | | |{blank}")
    for label, variant, paper in rows:
      v = variants[variant]
      label += " (= AM + MP)" * (variant == scope_row(summary["scope"]))
      paper = "—" if paper is None else paper  # a row the paper does not report
      cost = f" {v['gflops']['train']:,.0f} | {v['gflops']['inference']:.4f} |" if costs_on else ""
      lines.append(f"| {label} | {v['mean']:.2f} ± {v['std']:.2f} | {paper} |{cost}")
  c = summary["checks"]
  if c:
    lines.append("")
    beats = "yes" if c["am_mp_beats_supervised_by_2_std"] else "no"
    spread = (
      f"larger seed std {c['spread']:.2f}; > 2 std: {beats}"
      if n > 1
      else "one seed: no spread to hold it against (seeds >= 2)"
    )
    lines.append(f"AM + MP − supervised: {c['gap']:+.2f} points; {spread}.")
    for v, label in (("mp", "MP only"), ("am", "AM only")):
      if f"{v}_between" in c:
        lines.append(
          f"{label} between supervised and AM + MP: {'yes' if c[f'{v}_between'] else 'no'}."
        )
  return "\n".join(lines)


def write_summary(summary, directory):
  os.makedirs(directory, exist_ok=True)
  files.write_json(os.path.join(directory, "ablation.json"), summary)
  files.write_text(os.path.join(directory, "ablation.md"), summary["table"] + "\n")
  bar_plot(summary, os.path.join(directory, "ablation.png"))


def bar_plot(summary, path):
  """Two panels like the paper's tables: objectives, AM scope; error bars = seed std."""
  plt = plots.plt
  variants = summary["variants"]
  panels = [(s, [r for r in rows if r[1] in variants]) for s, rows in PAPER.items()]
  panels = [(s, rows) for s, rows in panels if rows]
  counts = [len(rows) for _, rows in panels]  # a panel's width follows its bars
  fig, axes = plt.subplots(
    1,
    len(panels),
    figsize=(2 + 1.5 * sum(counts), 4),
    squeeze=False,
    gridspec_kw=dict(width_ratios=[max(2, n) for n in counts]),
  )
  for ax, (section, rows) in zip(axes[0], panels):
    means = [variants[v]["mean"] for _, v, _ in rows]
    stds = [variants[v]["std"] for _, v, _ in rows]
    ax.bar(range(len(rows)), means, yerr=stds, capsize=4, color="tab:blue", alpha=0.8)
    for i, (_, v, _) in enumerate(rows):  # every seed as a dot
      ax.plot([i] * len(variants[v]["top1"]), variants[v]["top1"], "k.", ms=4)
    ax.axhline(summary["teacher_top1"], color="tab:red", ls="--", label="teacher")
    ax.set_xticks(range(len(rows)), [textwrap.fill(label, 16) for label, _, _ in rows], fontsize=8)
    low = min(min(variants[v]["top1"]) for _, v, _ in rows)
    ax.set_ylim(max(0, low - 3), max(summary["teacher_top1"], max(means)) + 1.5)
    ax.set_ylabel("top-1 (%)")
    ax.set_title(section)
    ax.legend(loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
