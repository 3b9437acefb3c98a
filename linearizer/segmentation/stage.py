"""The `segment` stage (method.md §9): fine-tune a UperNet-style head on each backbone a run
has, score it, and export it.

The stage fine-tunes each of `segment.backbones` (this run's teacher, distilled student, a
fresh student as the from-scratch baseline, or any checkpoint) with the same head, data and
budget, each under DIR/segment/<name>/ (checkpoints and resume, metrics, TensorBoard,
`results.json`, `predictions.png`, and the model in `model/` with its `serve.jaxexport`);
DIR/segment/results.json holds the table. The step is in `step`, the metric in `metrics`,
inference in `inference`; `python -m linearizer.segment predict` (`cli`) segments images
with a finished model.
"""

import json
import os

import jax
import numpy as np
from flax import nnx

from linearizer import files, models, optim, plots, resolve, serving, train, workdir
from linearizer.errors import UserError
from linearizer.log import log, main_process
from linearizer.models.segmenter import Segmenter, SegmenterConfig
from linearizer.program import Program, abstract_batch
from linearizer.segmentation import pipeline as segdata  # the name fine_tune and sources use
from linearizer.segmentation.inference import (
  check_windows,
  evaluate,
  forward_fn,
  test_resize,
  throughput,
)
from linearizer.segmentation.metrics import segmentation_scores
from linearizer.segmentation.step import make_segment_step


def json_safe(tree):
  """NaN -> None (JSON `null`), recursively: an absent class's IoU."""
  if isinstance(tree, dict):
    return {k: json_safe(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [json_safe(v) for v in tree]
  return None if isinstance(tree, float) and np.isnan(tree) else tree


# segment.backbones names -> the stage whose model/ it is
MADE_BY = {n: n for n in ("distill", "finetune", "train_student")} | {"teacher": "train_teacher"}


def backbone_specs(config) -> dict:
  """{name: spec} of `segment.backbones`: a stage name, 'scratch', or 'name=fmt:path'."""
  found = {}
  for entry in config.segment.backbones:
    name, sep, spec = (part.strip() for part in str(entry).partition("="))
    if not sep:
      name, spec = name, ""
      if name not in MADE_BY and name != "scratch":
        raise UserError(
          f"segment.backbones entry {entry!r}: expected one of {sorted(MADE_BY)}, 'scratch' "
          "(a fresh student) or 'name=fmt:path' / 'name=<model dir>'."
        )
    if not name or (sep and not spec) or name in found:
      raise UserError(f"segment.backbones entry {entry!r}: each needs its own name and a path.")
    found[name] = spec
  return found


def check_config(config) -> None:
  """What the stage would refuse half-way, refused before any stage runs."""
  if not backbone_specs(config):  # names and 'name=path' entries
    raise UserError(
      "segment.backbones is empty: name the backbones to fine-tune, e.g. "
      "\"--config.segment.backbones=('student=/runs/imagenet/distill/model',)\"."
    )
  check_head_and_data(config)


def check_head_and_data(config) -> None:
  """The `segment` block's data, head, evaluation and schedule (what `train_and_score`
  reads), refused before any stage runs."""
  train_source, _ = sources(config)  # the dataset's layout: a missing folder, a lone image
  segmenter_config(config.segment, train_source.num_classes)  # the head's fields
  if config.segment.eval.mode == "slide":
    check_windows(config.segment.eval.crop, config.segment.eval.stride)
  if not all(s > 0 for s in config.segment.head.pool_scales):
    raise UserError(
      f"segment.head.pool_scales={config.segment.head.pool_scales}: expected sizes ≥ 1."
    )
  SegmenterConfig(num_classes=2, head=config.segment.head.kind)  # the head's kind
  if config.segment.eval.mode not in ("whole", "slide"):
    raise UserError(f"segment.eval.mode={config.segment.eval.mode!r}; expected 'whole' or 'slide'.")
  if config.segment.optim.schedule not in optim.SCHEDULES:
    raise UserError(
      f"segment.optim.schedule={config.segment.optim.schedule!r}; expected one of "
      f"{optim.SCHEDULES}."
    )


# segment.backbones names -> the resolver's role of the model a stage of the run wrote
ROLE_OF = {"teacher": "teacher", "distill": "distilled", "finetune": "finetuned"}
ROLE_OF["train_student"] = "scratch"


def load_backbone(config, run_dir: str, name: str, spec: str) -> nnx.Module:
  """The backbone `name` stands for, without a classification head."""
  if spec:
    model = resolve.load_model(spec)
  elif name == "scratch":  # the student as distillation would start it: random weights
    t = resolve.teacher(config, run_dir, 0)
    model = resolve.new_student(config, 0, (t.cfg.mean, t.cfg.std))
  elif name == "teacher":
    model = resolve.run_teacher(config, run_dir)
  else:
    model = resolve.stage_model(config, run_dir, ROLE_OF[name])
  if model is None:
    raise UserError(
      f"segment.backbones names {name!r}, but no stage of this run produced it "
      f"({workdir.model_dir(run_dir, MADE_BY[name])} is missing): add the "
      f"'{MADE_BY[name]}' stage before 'segment', or name a checkpoint as "
      f"'{name}=fmt:path'."
    )
  # every backbone with the stage's stochastic depth (mmseg's ViT-B: drop_path_rate 0.1)
  seed = resolve.seed_of(config, "segment_backbone")
  return resolve.with_new_head(model, 0, seed, drop_path=config.segment.drop_path)


def programs(config, classes: int) -> dict:
  """{'segment/<backbone>': its fine-tuning step} with abstract models, for the compile-only
  tool: the teacher backbone as `teacher.kind/variant`, every other (a stage's student,
  'scratch', or a checkpoint named by path) as `student.kind/variant`, each with the head of
  `segment.head` over `segment.data.num_classes` classes (ADE20K's 150 in its config; the
  data's own where 0 and the host can open it); batches of `segment.data.crop`."""
  del classes  # (the classification head's; segmentation has its own)
  scfg = config.segment
  seg_classes = scfg.data.num_classes or sources(config)[0].num_classes
  crop = tuple(scfg.data.crop)
  teacher = nnx.eval_shape(lambda: resolve.configured_teacher(config, 0))
  norm = (teacher.cfg.mean, teacher.cfg.std)
  found = {}
  for name in backbone_specs(config):

    def build(name=name):
      if name == "teacher":
        backbone = resolve.configured_teacher(config, 0)
      else:
        backbone = resolve.new_student(config, 0, norm, drop_path=scfg.drop_path)
      rngs = nnx.Rngs(resolve.seed_of(config, "segment_head"))
      return Segmenter(backbone, segmenter_config(scfg, seg_classes), rngs=rngs)

    model = nnx.eval_shape(build)
    tx = optim.make_optimizer(scfg.optim, scfg.steps)
    batch = lambda n: abstract_batch(n, crop, crop)
    step = make_segment_step(model, tx, scfg)
    found[f"segment/{name}"] = Program(model, step, tx, (), batch, scfg)
  return found


def segmenter_config(scfg, num_classes: int) -> SegmenterConfig:
  h = scfg.head
  return SegmenterConfig(
    num_classes=num_classes,
    head=h.kind,
    channels=h.channels,
    out_indices=tuple(h.out_indices),
    pool_scales=tuple(h.pool_scales),
    aux_channels=h.aux_channels if h.aux_weight else 0,
    dropout=h.dropout,
    groups=h.groups,
  )


def sources(config) -> tuple:
  """(train, test) sources of `segment.data`."""
  d = config.segment.data
  make = lambda split, n: segdata.seg_source(
    d.source,
    split,
    num_classes=d.num_classes,
    size=d.canvas,
    num_scenes=n,
    seed=config.seed,
    data_dir=d.data_dir,
    digits=tuple(d.digit_count),
    digit_side=tuple(d.digit_side),
  )
  return make("train", d.train_scenes), make("test", d.test_scenes)


def fine_tune(config, directory: str, model: Segmenter, source, norm) -> Segmenter:
  """`model` trained by `train.fit` in `directory` on `source` (resumable)."""
  scfg, d = config.segment, config.segment.data
  tx = optim.make_optimizer(scfg.optim, scfg.steps)
  batches = lambda start: segdata.train_batches(
    source,
    crop=tuple(d.crop),
    scale=tuple(d.scale),
    global_batch=scfg.batch_size,
    seed=config.seed,
    mean=norm[0],
    std=norm[1],
    start_step=start,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    flip=d.flip,
    photometric=d.photometric,
    cat_max_ratio=d.cat_max_ratio,
    ratio_range=tuple(d.ratio_range),
    workers=d.workers,
  )
  name = f"segment/{os.path.basename(directory)}"
  settings = train.loop_settings(config, scfg, directory, name)
  return train.fit(settings, model, make_segment_step(model, tx, scfg), tx, batches)


def write_json(path: str, tree) -> None:
  """`tree` as JSON (NaN as null), written beside `path` and renamed into place: a stop
  half-way never leaves a truncated results file for the next run to trip on."""
  files.write_json(path, json_safe(tree), indent=1)


def train_and_score(config, directory: str, backbone: nnx.Module, data: tuple) -> dict:
  """`backbone` (no classification head) with `segment.head` fine-tuned in `directory` on
  data[0] and scored on data[1]; exported to `directory/model` with `predictions.png`.

  Returns:
    Its results: `segmentation_scores` (miou, macc, aacc, iou), params, img/s, eval size.
  """
  scfg = config.segment
  train_source, test_source = data
  classes = train_source.num_classes
  norm = (backbone.cfg.mean, backbone.cfg.std)
  model = Segmenter(
    backbone,
    segmenter_config(scfg, classes),
    rngs=nnx.Rngs(resolve.seed_of(config, "segment_head")),
  )
  model = fine_tune(config, directory, model, train_source, norm)
  logits_fn = forward_fn(model)
  cm, shown = evaluate(
    logits_fn,
    test_source,
    scfg.eval,
    num_classes=classes,
    norm=norm,
    keep=scfg.eval.figure_images,
  )
  first = test_resize(test_source[0][0], scfg.eval.scale).shape[:2]  # the eval resolution
  hw = tuple(scfg.eval.crop) if scfg.eval.mode == "slide" else first
  row = dict(
    segmentation_scores(cm),
    params=inference_params(model),
    img_per_s=throughput(logits_fn, hw, scfg.eval.speed_repeats),
    speed_size=list(hw),
    eval_mode=scfg.eval.mode,
    pixels=int(cm.sum()),
  )
  if main_process():
    serving.export_segmenter(model, os.path.join(directory, "model"), image_size=hw)
    title = f"{os.path.basename(directory)}: mIoU {100 * row['miou']:.1f}"
    plots.segmentation_figure(shown, title, os.path.join(directory, "predictions.png"))
  return row


def run_segment(config, run_dir: str) -> dict:
  """The `segment` stage: every backbone fine-tuned and scored; the table printed.

  Returns:
    {backbone name: its results (miou, macc, aacc, iou, params, img_per_s, ...)}.
  """
  specs = backbone_specs(config)
  train_source, test_source = sources(config)
  rows, todo = {}, {}
  for name, spec in specs.items():
    path = os.path.join(workdir.stage_dir(run_dir, "segment"), name, "results.json")
    if os.path.isfile(path):
      with open(path, encoding="utf-8") as f:
        rows[name] = json.load(f)
      log(f"[segment/{name}] already finished: {path}")
    else:  # every backbone is found before the first is trained
      todo[name] = load_backbone(config, run_dir, name, spec)
  for name, backbone in todo.items():
    directory = os.path.join(workdir.stage_dir(run_dir, "segment"), name)
    rows[name] = train_and_score(config, directory, backbone, (train_source, test_source))
    rows[name]["backbone"] = specs[name] or name
    if main_process():
      write_json(os.path.join(directory, "results.json"), rows[name])
  table = format_table(rows)
  log(table)
  if main_process():
    out = os.path.join(workdir.stage_dir(run_dir, "segment"), "results.json")
    write_json(out, rows)
  return rows


def inference_params(model: Segmenter) -> int:
  """Parameters of the backbone, neck and head: the auxiliary head, used in training
  only, is not counted (as the papers' tables)."""
  return models.num_params(model) - (models.num_params(model.aux) if model.aux is not None else 0)


def format_table(rows: dict) -> str:
  """The printed table: percent, as the segmentation papers report."""
  pct = lambda v: "  n/a" if v is None or np.isnan(v) else f"{100 * v:5.1f}"
  lines = [
    "| backbone | mIoU | mAcc | aAcc | params | img/s |",
    "|---|---:|---:|---:|---:|---:|",
  ]
  for name, r in rows.items():
    size = "×".join(map(str, r["speed_size"]))
    lines.append(
      f"| {name} | {pct(r['miou'])} | {pct(r['macc'])} | {pct(r['aacc'])} | "
      f"{r['params'] / 1e6:.2f}M | {r['img_per_s']:.1f} @ {size} |"
    )
  return "\n".join(lines)
