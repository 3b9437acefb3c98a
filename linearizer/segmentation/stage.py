"""Semantic segmentation with any backbone a run has: the metric, the fine-tuning step,
whole-image and sliding-window inference, and the `segment` stage (method.md §9).

The stage fine-tunes each of `segment.backbones` (this run's teacher, distilled student, a
fresh student as the from-scratch baseline, or any checkpoint) with the same head, data and
budget, each under DIR/segment/<name>/ (checkpoints and resume, metrics, TensorBoard,
`results.json`, `predictions.png`, and the model in `model/` with its `serve.jaxexport`);
DIR/segment/results.json holds the table.

Segment your own images with a finished model:

  python -m linearizer.segment predict --model DIR/segment/distill/model --input <image or
      folder> --output <folder> [--mode slide --crop 512 --stride 341] [--scale 2048,512]

writes `<name>.png` (the label map: a class id per pixel, 255 nowhere) and
`<name>_overlay.png` (the classes' colours over the image) for every image.
"""

import argparse
import json
import os
import sys
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from PIL import Image

from linearizer import data, metrics, optim, plots, serving, sharding, train, workdir
from linearizer.errors import UserError, log, main_process, one_line_errors
from linearizer.models.segmenter import Segmenter, SegmenterConfig, resize
from linearizer.segmentation import data as segdata

IGNORE = 255  # the label of pixels no loss or metric counts (mmseg's ignore_index)


# ---------------------------------------------------------------------------------------
# The metric (a contract: other code and tests call it).
# ---------------------------------------------------------------------------------------
def confusion_matrix(pred, label, num_classes: int, ignore_index: int = IGNORE) -> np.ndarray:
  """Counts of (truth, prediction) pairs over the pixels whose label is not `ignore_index`.

  Args:
    pred, label: integer class maps of the same shape (NumPy or JAX), not logits.
    num_classes: C; labels other than 0 … C−1 and `ignore_index` are refused.
    ignore_index: the label of pixels left out.
  Returns:
    A (C, C) int64 NumPy array, rows = ground truth, columns = prediction.
  """
  pred, label = np.asarray(pred), np.asarray(label)
  if pred.shape != label.shape:
    raise UserError(f"prediction {pred.shape} and label {label.shape} differ in shape.")
  keep = label != ignore_index
  t, p = label[keep].astype(np.int64), pred[keep].astype(np.int64)
  if t.size and (t.min() < 0 or t.max() >= num_classes or p.min() < 0 or p.max() >= num_classes):
    raise UserError(f"class ids outside 0 … {num_classes - 1} (and {ignore_index} = ignore).")
  return np.bincount(t * num_classes + p, minlength=num_classes**2).reshape(num_classes, -1)


def all_processes_sum(cm: np.ndarray) -> np.ndarray:
  """The confusion matrix of the whole eval set: each process's share summed once."""
  if jax.process_count() == 1:
    return cm
  # Gathered as two int32 halves: without jax_enable_x64 an int64 array would be cut to
  # int32 on the way (counts pass 2**31 on a large eval set).
  cm = np.asarray(cm, np.int64)
  low, high = (cm & 0x7FFFFFFF).astype(np.int32), (cm >> 31).astype(np.int32)
  low, high = (np.asarray(multihost_utils.process_allgather(h), np.int64) for h in (low, high))
  return (low + (high << 31)).sum(axis=0)


def segmentation_scores(cm: np.ndarray) -> dict:
  """mIoU, mAcc, aAcc (fractions in [0, 1]) and the per-class IoU of a confusion matrix.

  A class absent from both truth and prediction has IoU NaN and is left out of the mean
  (as mmseg); mAcc averages over the classes present in the truth.
  """
  cm = np.asarray(cm, np.float64)
  tp, truth, predicted = np.diag(cm), cm.sum(1), cm.sum(0)
  with np.errstate(invalid="ignore", divide="ignore"):
    iou = tp / (truth + predicted - tp)
    acc = tp / truth
  return dict(
    miou=float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
    macc=float(np.nanmean(acc)) if np.isfinite(acc).any() else float("nan"),
    aacc=float(tp.sum() / cm.sum()) if cm.sum() else float("nan"),
    iou=[float(x) for x in iou],
  )


def json_safe(tree):
  """NaN -> None (JSON `null`), recursively: an absent class's IoU."""
  if isinstance(tree, dict):
    return {k: json_safe(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [json_safe(v) for v in tree]
  return None if isinstance(tree, float) and np.isnan(tree) else tree


# ---------------------------------------------------------------------------------------
# Training.
# ---------------------------------------------------------------------------------------
def pixel_cross_entropy(logits, labels, ignore_index: int = IGNORE):
  """Mean cross-entropy over the labelled pixels (mmseg's CrossEntropyLoss with
  avg_non_ignore=True, which mmseg recommends; its default, False, divides by every pixel,
  ignored and padded ones included); 0 for a batch without one."""
  keep = labels != ignore_index
  safe = jnp.where(keep, labels, 0)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), safe)
  return jnp.sum(ce * keep) / jnp.maximum(keep.sum(), 1)


def make_segment_step(model: Segmenter, tx, scfg) -> Callable:
  """`step(state, batch, rng) -> (state, metrics)`: the head's loss plus the auxiliary
  head's, weighted `scfg.head.aux_weight` (mmseg's 0.4).

  Args:
    model: the segmenter (its graph; the weights come with the state).
    tx: the optimizer.
    scfg: the `segment` block (configs/common.py): steps, head, optim.
  """
  graphdef, aux_weight = nnx.graphdef(model), scfg.head.aux_weight
  lr = optim.schedule(scfg.optim, scfg.steps)

  def step(state: train.TrainState, batch, rng):
    rng = jax.random.fold_in(rng, state.step)

    def loss_fn(params, mb, rng):
      model = train.merge(graphdef, params, state.rest, rng)
      logits, aux = model(mb.image, train=True)
      main = pixel_cross_entropy(logits, mb.label)
      loss = main + (aux_weight * pixel_cross_entropy(aux, mb.label) if aux is not None else 0)
      keep = mb.label != IGNORE
      hits = jnp.sum((jnp.argmax(logits, -1) == mb.label) & keep) / jnp.maximum(keep.sum(), 1)
      return loss, {"loss": loss, "ce": main, "pixel_accuracy": hits}

    (_, out), grads = train.accumulate(loss_fn, state.params, batch, rng, scfg.optim.grad_accum)
    new_state = train.apply_update(state, grads, tx, scfg.optim.ema_decay)
    out.update(grad_norm=optax.global_norm(grads), lr=lr(state.step))
    return new_state, out

  return step


# ---------------------------------------------------------------------------------------
# Inference.
# ---------------------------------------------------------------------------------------
def windows(hw: tuple, crop: tuple, stride: tuple) -> list:
  """mmseg's slide_inference grid: (y0, y1, x0, x1) windows of at most `crop` every
  `stride`, the last of each row and column flush with the border."""
  out = []
  rows = max(hw[0] - crop[0] + stride[0] - 1, 0) // stride[0] + 1
  cols = max(hw[1] - crop[1] + stride[1] - 1, 0) // stride[1] + 1
  for i in range(rows):
    for j in range(cols):
      y1, x1 = min(i * stride[0] + crop[0], hw[0]), min(j * stride[1] + crop[1], hw[1])
      out.append((max(y1 - crop[0], 0), y1, max(x1 - crop[1], 0), x1))
  return out


def check_windows(crop, stride) -> None:
  """Sliding windows must cover every pixel: 0 < stride ≤ crop (mmseg asserts the same)."""
  crop, stride = tuple(crop), tuple(stride)
  if len(crop) != 2 or len(stride) != 2 or not all(0 < t <= c for c, t in zip(crop, stride)):
    raise UserError(
      f"sliding windows crop={crop}, stride={stride}: expected (h, w) pairs with "
      "0 < stride ≤ crop, so that every pixel is covered."
    )


def forward_fn(model: Segmenter) -> Callable:
  """`logits(images)`: the jitted eval forward (the main head only), (B, H, W, C)."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def logits(state, images):
    return nnx.merge(graphdef, state)(images, train=False)[0]

  return lambda images: logits(state, images)


def infer(logits_fn: Callable, image: np.ndarray, mode: str, crop=(), stride=()) -> np.ndarray:
  """(H, W, C) logits of one normalised (H, W, 3) image: in one pass ('whole') or averaged
  over overlapping windows ('slide', crop and stride as (h, w))."""
  if mode == "whole":
    return np.asarray(logits_fn(image[None]))[0]
  if mode != "slide":
    raise UserError(f"segment.eval.mode={mode!r}; expected 'whole' or 'slide'.")
  check_windows(crop, stride)
  total, count = None, np.zeros(image.shape[:2] + (1,), np.float32)
  for y0, y1, x0, x1 in windows(image.shape[:2], tuple(crop), tuple(stride)):
    part = np.asarray(logits_fn(image[None, y0:y1, x0:x1]))[0]
    total = np.zeros(image.shape[:2] + part.shape[-1:], np.float32) if total is None else total
    total[y0:y1, x0:x1] += part
    count[y0:y1, x0:x1] += 1
  return total / count


def test_resize(image: np.ndarray, scale) -> np.ndarray:
  """mmseg's test Resize(scale, keep_ratio=True): the image fit into (long, short); () or
  (0, 0) keeps it as it is."""
  if not scale or not all(scale):
    return image
  h, w = image.shape[:2]
  f = min(max(scale) / max(h, w), min(scale) / min(h, w))
  size = (max(1, round(w * f)), max(1, round(h * f)))
  return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))


def label_map(logits_fn: Callable, image: np.ndarray, ecfg, norm) -> np.ndarray:
  """(H, W) uint8 class ids of a uint8 image: resized for the test (`ecfg.scale`),
  normalised with `norm`, inferred as `ecfg` says, the logits resized back to the image's
  own size (where labels are scored, as mmseg does)."""
  x = segdata.normalize(test_resize(image, ecfg.scale), *norm)
  logits = infer(logits_fn, x, ecfg.mode, ecfg.crop, ecfg.stride)
  if logits.shape[:2] != image.shape[:2]:  # bilinear, no antialiasing: F.interpolate's
    logits = np.asarray(resize(jnp.asarray(logits)[None], image.shape[:2]))[0]
  return logits.argmax(-1).astype(np.uint8)


def evaluate(logits_fn: Callable, source, ecfg, *, num_classes: int, norm, keep: int = 0):
  """The confusion matrix of `logits_fn` (`forward_fn`) on `source` (every process's share
  counted once) and up to `keep` (image, truth, prediction) triples for the figure."""
  cm, shown = np.zeros((num_classes,) * 2, np.int64), []
  items = segdata.eval_items(
    source,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    limit=ecfg.limit or None,
  )
  for _, image, label in items:
    pred = label_map(logits_fn, image, ecfg, norm)
    cm += confusion_matrix(pred, label, num_classes)
    if len(shown) < keep:
      shown.append((image, label, pred))
  return all_processes_sum(cm), shown


def throughput(logits_fn: Callable, hw: tuple, repeats: int = 5) -> float:
  """Images per second of `logits_fn` (`forward_fn`) at (1, h, w) (median of `repeats`)."""
  return 1.0 / metrics.time_compiled(logits_fn, (jnp.zeros((1, *hw, 3)),), repeats)


# ---------------------------------------------------------------------------------------
# The stage.
# ---------------------------------------------------------------------------------------
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


def load_backbone(config, run_dir: str, name: str, spec: str) -> nnx.Module:
  """The backbone `name` stands for, without a classification head."""
  if spec:
    model = workdir.load_model(spec)
  elif name == "scratch":  # the student as distillation would start it: random weights
    t = workdir.teacher(config, run_dir, 0)
    model = workdir.new_student(config, 0, (t.cfg.mean, t.cfg.std))
  elif workdir.finished(run_dir, MADE_BY[name]):
    overrides = config.teacher.overrides if name == "teacher" else config.student.overrides
    model = workdir.load_model(workdir.model_dir(run_dir, MADE_BY[name]), overrides)
  elif name == "teacher" and config.teacher.init:
    model = workdir.load_model(config.teacher.init, config.teacher.overrides)
  else:
    raise UserError(
      f"segment.backbones names {name!r}, but no stage of this run produced it "
      f"({workdir.model_dir(run_dir, MADE_BY[name])} is missing): add the "
      f"'{MADE_BY[name]}' stage before 'segment', or name a checkpoint as "
      f"'{name}=fmt:path'."
    )
  # every backbone with the stage's stochastic depth (mmseg's ViT-B: drop_path_rate 0.1)
  return workdir.with_new_head(model, 0, config.seed, drop_path=config.segment.drop_path)


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
  return train.fit(
    directory,
    model,
    make_segment_step(model, tx, scfg),
    tx=tx,
    batches=batches,
    steps=scfg.steps,
    batch_size=scfg.batch_size,
    mesh=sharding.make_mesh(config.mesh.data, config.mesh.fsdp),
    rules=[tuple(r) for r in config.mesh.rules],
    fsdp_min_size=config.mesh.fsdp_min_size,
    ema=scfg.optim.ema_decay > 0,
    seed=config.seed,
    checkpoint_every=config.checkpoint.every_steps,
    keep=config.checkpoint.keep,
    log_every=config.log_every,
    nan_policy=config.nan_policy,
    name=f"segment/{os.path.basename(directory)}",
  )


def write_json(path: str, tree) -> None:
  """`tree` as JSON (NaN as null), written beside `path` and renamed into place: a stop
  half-way never leaves a truncated results file for the next run to trip on."""
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(json_safe(tree), f, indent=1)
  os.replace(path + ".tmp", path)


def run_segment(config, run_dir: str) -> dict:
  """The `segment` stage: every backbone fine-tuned and scored; the table printed.

  Returns:
    {backbone name: its results (miou, macc, aacc, iou, params, img_per_s, ...)}.
  """
  scfg = config.segment
  specs = backbone_specs(config)
  train_source, test_source = sources(config)
  classes = train_source.num_classes
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
    path = os.path.join(directory, "results.json")
    norm = (backbone.cfg.mean, backbone.cfg.std)
    model = Segmenter(backbone, segmenter_config(scfg, classes), rngs=nnx.Rngs(config.seed + 7))
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
    rows[name] = dict(
      segmentation_scores(cm),
      backbone=specs[name] or name,
      params=inference_params(model),
      img_per_s=throughput(logits_fn, hw, scfg.eval.speed_repeats),
      speed_size=list(hw),
      eval_mode=scfg.eval.mode,
      pixels=int(cm.sum()),
    )
    if main_process():
      serving.export_segmenter(model, os.path.join(directory, "model"), image_size=hw)
      plots.segmentation_figure(
        shown,
        f"{name}: mIoU {100 * rows[name]['miou']:.1f}",
        os.path.join(directory, "predictions.png"),
      )
      write_json(path, rows[name])
  table = format_table(rows)
  log(table)
  if main_process():
    out = os.path.join(workdir.stage_dir(run_dir, "segment"), "results.json")
    write_json(out, rows)
  return rows


def inference_params(model: Segmenter) -> int:
  """Parameters of the backbone, neck and head: the auxiliary head, used in training
  only, is not counted (as the papers' tables)."""
  count = lambda m: int(sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param))))
  return count(model) - (count(model.aux) if model.aux is not None else 0)


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


# ---------------------------------------------------------------------------------------
# python -m linearizer.segment predict
# ---------------------------------------------------------------------------------------
def predict_folder(model_dir: str, inputs: str, output: str, ecfg) -> list:
  """Label maps and overlays of every image in `inputs` (a file or a folder), written to
  `output`; returns the paths of the label maps."""
  model = serving.load_segmenter(model_dir)
  norm = (model.backbone.cfg.mean, model.backbone.cfg.std)
  if os.path.isdir(inputs):
    paths = sorted(
      os.path.join(inputs, f)
      for f in os.listdir(inputs)
      if f.lower().endswith(segdata.IMAGE_SUFFIXES)
    )
    if not paths:
      raise UserError(f"{inputs} holds no {'/'.join(segdata.IMAGE_SUFFIXES)} image.")
  elif os.path.isfile(inputs):
    paths = [inputs]
  else:
    raise UserError(f"--input {inputs}: no such image or folder.")
  os.makedirs(output, exist_ok=True)
  logits_fn, colours, written = forward_fn(model), plots.palette(), []
  for path in paths:
    try:
      with Image.open(path) as im:
        image = data.rgb8(im)
    except OSError as e:
      raise UserError(f"{path}: not a readable image ({e}).") from e
    pred = label_map(logits_fn, image, ecfg, norm)
    stem = os.path.join(output, os.path.splitext(os.path.basename(path))[0])
    Image.fromarray(pred).save(stem + ".png")
    overlay = (0.5 * image + 0.5 * colours[pred]).astype(np.uint8)
    Image.fromarray(overlay).save(stem + "_overlay.png")
    written.append(stem + ".png")
  return written


def main(argv=None) -> None:
  """The CLI; bad input prints one `error: ...` line and exits 2."""
  parser = argparse.ArgumentParser(prog="python -m linearizer.segment")
  commands = parser.add_subparsers(dest="command", required=True)
  p = commands.add_parser("predict", help="label maps and overlays of your own images")
  p.add_argument("--model", required=True, help="a segment stage's DIR/segment/<name>/model")
  p.add_argument("--input", required=True, help="an image, or a folder of them")
  p.add_argument("--output", required=True, help="the folder to write")
  p.add_argument("--mode", default="whole", choices=("whole", "slide"))
  p.add_argument("--crop", type=int, default=512, help="slide: the window side")
  p.add_argument("--stride", type=int, default=341, help="slide: the step between windows")
  p.add_argument("--scale", default="", help="resize to fit (long,short) first, e.g. 2048,512")
  args = parser.parse_args(argv)
  with one_line_errors():
    try:
      scale = tuple(int(v) for v in args.scale.split(",")) if args.scale else ()
    except ValueError:
      scale = None
    if scale is None or (scale and (len(scale) != 2 or min(scale) < 1)):
      raise UserError(f"--scale {args.scale!r}: expected two positive integers, e.g. 2048,512.")
    if args.mode == "slide":
      check_windows((args.crop,) * 2, (args.stride,) * 2)
    if os.path.abspath(args.output) == os.path.abspath(args.input):
      raise UserError(f"--output {args.output} is the input folder: name another.")
    ecfg = argparse.Namespace(
      mode=args.mode, crop=(args.crop,) * 2, stride=(args.stride,) * 2, scale=scale
    )
    written = predict_folder(args.model, args.input, args.output, ecfg)
  print(f"{len(written)} label map(s) and overlay(s) in {args.output}")


if __name__ == "__main__":
  main(sys.argv[1:])
