"""Evaluation: top-1/top-5 of every model, student–teacher agreement, speed, a table."""

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from linearizer import data, files, memory, models, resolve
from linearizer.distillation import scorecard
from linearizer.errors import UserError
from linearizer.log import log, main_process
from linearizer.metrics import time_compiled


def predict_fn(model):
  """A jitted `images -> logits` for a model with a head."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def predict(state, images):
    return nnx.merge(graphdef, state)(images).logits

  return lambda images: predict(state, images)


def crop_fraction(config, image_size: int) -> float:
  """The centre-crop fraction eval uses at `image_size` (eval.crop_fractions, else data's)."""
  return dict(config.eval.crop_fractions).get(image_size, config.data.crop_fraction)


def accuracy(config, model, source, *, image_size, teacher_logits=None):
  """(top-1, top-5, agreement with the teacher's top-1 (None without teacher_logits), the
  crop fraction, whether the model was resampled from its own size; all top-1 predictions)."""
  fraction = crop_fraction(config, image_size)
  cfg = data.override(config.data, image_size=image_size, crop_fraction=fraction)
  predict = predict_fn(model)
  top1 = top5 = count = 0
  agree = None
  preds = []
  for batch in data.eval_batches(
    source,
    cfg,
    batch_size=config.eval.batch_size,
    mean=model.cfg.mean,
    std=model.cfg.std,
    limit=config.data.eval_limit or None,
  ):
    logits = np.asarray(predict(jnp.asarray(batch.image)))
    valid, labels = batch.valid, batch.label
    top = np.argsort(-logits, axis=-1)[:, :5]
    top1 += np.sum((top[:, 0] == labels) & valid)
    top5 += np.sum(np.any(top == labels[:, None], axis=-1) & valid)
    preds.append(top[valid, 0])
    count += valid.sum()
  preds = np.concatenate(preds)
  if teacher_logits is not None:
    agree = float(np.mean(preds == teacher_logits))
  return dict(
    top1=float(top1 / count),
    top5=float(top5 / count),
    agreement=agree,
    examples=int(count),
    crop_fraction=fraction,
    # a model evaluated away from the size it holds position embeddings for (e.g. the
    # 224-trained student at 448) runs with them resampled: say so beside the number
    resampled_from=None if image_size == model.cfg.image_size else model.cfg.image_size,
  ), preds


def throughput(model, image_size, batch_size, repeats=5):
  """Images per second of the jitted forward (median of `repeats`, after a warm-up)."""
  images = jnp.zeros((batch_size, image_size, image_size, 3), jnp.float32)
  return batch_size / time_compiled(predict_fn(model), (images,), repeats)


def extra_models(config) -> dict:
  """{name: checkpoint} from `eval.extra_models` ('name=fmt:path' entries), checked."""
  found = {}
  for entry in config.eval.extra_models:
    name, sep, spec = (part.strip() for part in str(entry).partition("="))
    if not sep or not name or not spec:
      raise UserError(
        f"eval.extra_models entry {entry!r}: expected 'name=fmt:path' (or 'name=<model "
        "dir>'), e.g. 'clip_b16_ft=timm:/ckpt/vit_base_patch16_clip_224.openai_ft_in1k.pth'."
      )
    if name in found or name.startswith(("teacher", "student")):
      raise UserError(
        f"eval.extra_models: the name {name!r} is taken; give each extra model its own, "
        "other than the run's 'teacher' and 'student ...' rows."
      )
    found[name] = spec
  return found


def check_config(config) -> None:
  """What the eval stage would refuse half-way: `eval.extra_models` entries, and a size the
  configured teacher or student cannot run at here (linearizer.memory), at every eval and
  speed resolution, before any stage trains."""
  extra_models(config)
  per_device = lambda batch: -(-batch // jax.local_device_count())
  sizes = [(s, config.eval.batch_size) for s in (config.data.image_size, *config.eval.resolutions)]
  sizes += [(s, config.eval.speed_batch) for s in config.eval.speed_resolutions]
  for role in ("teacher", "student"):
    block = config[role]
    if block.kind not in models.ARCHITECTURES:
      continue  # refused by name where the model is built
    cfg = models.ARCHITECTURES[block.kind].variant(block.variant, **block.overrides)
    for size, batch in sizes:
      memory.check(
        f"eval of the {role} ({block.kind} {block.variant})", cfg, size, per_device(batch)
      )


def models_to_evaluate(config, run_dir, num_classes):
  """{name: model}: what this run's stages produced, else teacher.init / student.init, and
  `eval.extra_models`. A model without a head, or whose head is not a classifier over the
  data's `num_classes` (a CLIP image projection, a head for other classes), is skipped."""
  found = {}
  for name, role in (
    ("teacher", "teacher"),
    ("student (distilled)", "finetuned"),
    ("student (from scratch)", "scratch"),
  ):
    model = resolve.stage_model(config, run_dir, role)
    if model is not None:
      found[name] = model
  if "teacher" not in found and config.teacher.init:
    found["teacher"] = resolve.run_teacher(config, run_dir)
  if "student (distilled)" not in found and config.student.init:
    found["student"] = resolve.initial_student(config)
  teacher = config.teacher.overrides
  # Extra classifiers run in the teacher's dtype, when its overrides set one.
  dtype = {"dtype": teacher.dtype} if "dtype" in teacher else {}
  for name, spec in extra_models(config).items():
    found[name] = resolve.load_model(spec, dtype)
  for name, model in list(found.items()):
    if model.head is None:
      log(f"[eval] skipping {name}: it has no classification head.")
      del found[name]
    elif model.cfg.num_classes != num_classes:
      log(
        f"[eval] skipping {name}: its head has {model.cfg.num_classes} outputs and the data "
        f"{num_classes} classes; it is not a classifier of this data (a CLIP image "
        "projection is an embedding). Name a fine-tuned classifier in eval.extra_models."
      )
      del found[name]
  return found


def reference_teacher(config, run_dir, found):
  """The teacher students are compared with by the scorecard: the evaluated one, else the
  run's (trained, or teacher.init, head or not); None when the run has none."""
  if "teacher" in found:
    return found["teacher"]
  return resolve.run_teacher(config, run_dir)


def add_scorecard(config, run_dir, found, rows, train_source, source) -> str:
  """Each row gets `knn`, `probe`, `knn_gap`, `probe_gap`, `outliers` (its own pooled
  features and tokens, `scorecard.own_measures`), and
  every model but the teacher `cka` and `am_distance` per level against it. Returns the
  table to print."""
  teacher = reference_teacher(config, run_dir, found)
  lines = [
    f"{'scorecard':<24} {'kNN':>7} {'probe':>7} {'kNN gap':>8} {'pr. gap':>8} {'outl.%':>7}"
    "  CKA / AM distance per level"
  ]
  for name, model in found.items():
    row = rows[name]
    row.update(scorecard.own_measures(model, train_source, source, config))
    if teacher is not None and model is not teacher:
      row.update(scorecard.compare(teacher, model, source, config))
    levels = (
      "  ".join(f"{c:.3f}/{a:.3f}" for c, a in zip(row["cka"], row["am_distance"]))
      if "cka" in row
      else ""
    )
    lines.append(
      f"{name:<24} {row['knn']:>7.2f} {row['probe']:>7.2f} {row['knn_gap']:>8.2f} "
      f"{row['probe_gap']:>8.2f} {row['outliers']:>7.2f}  {levels}"
    )
  return "\n".join(lines)


def run_eval(config, run_dir, source, num_classes, train_source=None):
  """Evaluates every model found; writes eval/results.json and prints a table.

  With `scorecard.eval` (and `train_source`, which the kNN and probe fit on) each model's
  row also holds the representation scorecard (`add_scorecard`)."""
  found = models_to_evaluate(config, run_dir, num_classes)
  if not found:
    raise UserError(
      "Nothing to evaluate: no finished stage in the workdir, and neither teacher.init, "
      f"student.init nor eval.extra_models names a classifier of the data's {num_classes} "
      "classes."
    )
  sizes = [config.data.image_size] + [
    s for s in config.eval.resolutions if s != config.data.image_size
  ]
  speed_sizes = list(config.eval.speed_resolutions) or [config.data.image_size]
  rows, teacher_preds = {}, None
  order = sorted(found, key=lambda n: n != "teacher")  # the teacher first, for agreement
  for name in order:
    model = found[name]
    row = dict(params=models.num_params(model), kind=models.kind_of(model), dtype=model.cfg.dtype)
    for size in sizes:
      acc, preds = accuracy(
        config,
        model,
        source,
        image_size=size,
        teacher_logits=None if name == "teacher" else teacher_preds,
      )
      if name == "teacher" and size == config.data.image_size:
        teacher_preds = preds
      row[f"@{size}"] = acc
    for size in speed_sizes:
      row[f"img_per_s@{size}"] = throughput(model, size, config.eval.speed_batch)
    rows[name] = row
  scores = None
  if config.scorecard.eval and train_source is not None:
    scores = add_scorecard(config, run_dir, found, rows, train_source, source)
  out = os.path.join(run_dir, "eval")
  os.makedirs(out, exist_ok=True)
  if main_process():
    files.write_json(os.path.join(out, "results.json"), rows)
    log(table(rows, config.data.image_size, speed_sizes))
    for size in sizes[1:]:
      log(other_size(rows, size))
    if scores:
      log(scores)
  return rows


def other_size(rows, size):
  """One line of top-1 at an extra eval size, each model marked when it ran resampled."""

  def entry(name, acc):
    resampled = acc["resampled_from"]
    return f"{name} {100 * acc['top1']:.2f}" + (
      f" (trained at {resampled}, resampled)" if resampled else ""
    )

  fraction = next(iter(rows.values()))[f"@{size}"]["crop_fraction"]
  return f"top-1 @{size} (crop {fraction}): " + ", ".join(
    entry(name, r[f"@{size}"]) for name, r in rows.items()
  )


def table(rows, size, speed_sizes):
  head = f"{'model':<24} {'top-1':>7} {'top-5':>7} {'agree':>7} {'params':>9}" + "".join(
    f" {'img/s@' + str(s):>12}" for s in speed_sizes
  )
  lines = [head, "-" * len(head)]
  for name, r in rows.items():
    acc = r[f"@{size}"]
    agree = "" if acc["agreement"] is None else f"{100 * acc['agreement']:.1f}"
    lines.append(
      f"{name:<24} {100 * acc['top1']:>7.2f} {100 * acc['top5']:>7.2f} {agree:>7} "
      f"{r['params'] / 1e6:>8.2f}M" + "".join(f" {r[f'img_per_s@{s}']:>12.1f}" for s in speed_sizes)
    )
  return "\n".join(lines)
