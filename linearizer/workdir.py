"""The workdir: where each stage writes, which stages are finished, the models a run
resolves (teacher, students, converted checkpoints), and the guard that keeps one run's
config per workdir.

Layout (the README's table): `DIR/config.json`; `DIR/<stage>/{ckpt,model,metrics.jsonl,tb}`
for the training stages; `DIR/<stage>/model` (see `models.saved`) marks a stage finished.
"""

import contextlib
import dataclasses
import json
import os
import shutil
import socket
import time
from typing import Optional

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from linearizer import convert, models
from linearizer.distillation import teacher_init
from linearizer.errors import UserError, log, main_process
from linearizer.models import saved

# The stages that train a model and end by writing DIR/<stage>/model.
TRAIN_STAGES = ("train_teacher", "distill", "finetune", "train_student")

# Config fields that may differ from those of the run already in a workdir: what to run,
# evaluation, logging, checkpointing, sharding, data loading speed.
SAFE_TO_CHANGE = (
  "stages",
  "eval",
  "bench",
  "log_every",
  "checkpoint",
  "mesh",
  "nan_policy",
  "data.workers",
  "data.eval_source",
  "data.eval_limit",
  "data.data_dir",
)


# ---------------------------------------------------------------------------------------
# Where things go.
# ---------------------------------------------------------------------------------------
def stage_dir(run_dir: str, stage: str) -> str:
  return os.path.join(run_dir, stage)


def model_dir(run_dir: str, stage: str) -> str:
  return os.path.join(run_dir, stage, "model")


def finished(run_dir: str, stage: str) -> bool:
  return os.path.isfile(os.path.join(model_dir(run_dir, stage), "model.json"))


def save_stage_model(run_dir: str, stage: str, model: nnx.Module) -> None:
  """Process 0 writes the stage's model; every process waits for it (the next stage reads
  it through `finished`)."""
  if main_process():
    saved.save(model, model_dir(run_dir, stage), overwrite=True)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"{stage} model saved")


def remove_partial_saves(run_dir: str) -> None:
  """Deletes what a save killed half-way left: `saved.save` writes `.<name>.<random>/`
  beside its target and renames it into place only when complete."""
  stage_dirs = [stage_dir(run_dir, s) for s in TRAIN_STAGES]
  for parent, prefix in [(run_dir, ".export.")] + [(d, ".model.") for d in stage_dirs]:
    if not os.path.isdir(parent):
      continue
    for name in os.listdir(parent):
      path = os.path.join(parent, name)
      if name.startswith(prefix) and os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
        log(f"removed {path}, left by a save that did not finish")


# ---------------------------------------------------------------------------------------
# Models.
# ---------------------------------------------------------------------------------------
def load_model(spec: str, overrides=None) -> nnx.Module:
  """A model from 'fmt:path' (fmt as in convert.load) or a directory written by saved.save.

  Args:
    spec: the checkpoint, as `teacher.init` / `student.init` name it.
    overrides: a config's `teacher.overrides` / `student.overrides`, applied as
      `convert.load` applies them: run-time fields (dtype, attention_impl, ...) always; one
      that contradicts what the checkpoint determines (depth, width, ...) is refused.
  Returns:
    The module.
  """
  fmt, sep, path = spec.partition(":")
  if not (sep and fmt in convert.FORMATS):
    fmt, path = "orbax", spec
  model = convert.load(path, fmt, **({} if overrides is None else dict(overrides)))
  log(f"[load] {spec}: {models.kind_of(model)} {convert.describe(model)}")
  return model


def teacher(config, run_dir: str, num_classes: int) -> nnx.Module:
  """The teacher: trained by this run's train_teacher stage, else loaded from teacher.init,
  else (when train_teacher is to run) a fresh one of `teacher.kind` and `teacher.variant`."""
  if finished(run_dir, "train_teacher"):
    return load_model(model_dir(run_dir, "train_teacher"), config.teacher.overrides)
  if config.teacher.init:
    return load_model(config.teacher.init, config.teacher.overrides)
  if "train_teacher" in config.stages:
    return models.build(
      config.teacher.kind,
      config.teacher.variant,
      seed=config.seed,
      image_size=config.data.image_size,
      num_classes=num_classes,
      **config.teacher.overrides,
    )
  raise UserError(
    "No teacher: set teacher.init to a checkpoint ('fmt:path' or a converted "
    "directory) or add 'train_teacher' to the stages."
  )


def new_student(config, num_classes: int, norm, **extra) -> nnx.Module:
  """A fresh student of `student.kind` / `student.variant`, normalised with `norm`."""
  fields = dict(config.student.overrides)
  fields.update(
    image_size=config.data.image_size,
    num_classes=num_classes,
    mean=tuple(norm[0]),
    std=tuple(norm[1]),
    **extra,
  )
  return models.build(config.student.kind, config.student.variant, seed=config.seed + 1, **fields)


def check_distill_init(config) -> None:
  """Refuses, before any stage runs, a `distill.student_init='teacher'` that would fail
  once the teacher is at hand: a pair of other kinds, or shapes that do not fit (unless
  `distill.teacher_init_partial`). Only a teacher the config builds (no teacher.init) is
  known here; a loaded one is checked when distillation starts."""
  if config.distill.student_init != "teacher":
    return
  student_arch = models.ARCHITECTURES.get(config.student.kind)
  teacher_arch = models.ARCHITECTURES.get(config.teacher.kind)
  if student_arch is None or (teacher_arch is None and not config.teacher.init):
    return  # an unknown kind: models.build names it when the stage builds the model
  size = dict(image_size=config.data.image_size)
  student_cfg = student_arch.variant(config.student.variant, **{**config.student.overrides, **size})
  if config.teacher.init:
    teacher_init.check_kinds(student_cfg)  # the teacher's is checked once loaded
    return
  teacher_cfg = teacher_arch.variant(config.teacher.variant, **{**config.teacher.overrides, **size})
  teacher_init.check_fit(
    student_cfg, teacher_cfg, allow_partial=config.distill.teacher_init_partial
  )


def distill_student(config, norm, teacher: Optional[nnx.Module] = None) -> nnx.Module:
  """The student distillation starts from (`distill.student_init`, configs/common.py).

  Args:
    config: the experiment config.
    norm: (mean, std), the teacher's statistics: a fresh student is normalised with them.
    teacher: the teacher, needed for `student_init='teacher'`.
  Returns:
    A fresh student (''); one with the teacher's weights copied in ('teacher', the table
    of what came from where logged); or a checkpoint loaded with student.overrides, its
    head dropped. Drop path from the distill stage in each case.
  """
  check_distill_init(config)
  init, drop_path = config.distill.student_init, config.distill.drop_path
  if init in ("", "teacher"):
    student = new_student(config, 0, norm, drop_path=drop_path)
    if init == "teacher":
      if teacher is None:
        raise ValueError("distill_student: student_init='teacher' needs the teacher passed")
      rows = teacher_init.init_from_teacher(
        student, teacher, allow_partial=config.distill.teacher_init_partial
      )
      log("[distill] the student starts from the teacher's weights:")
      log(teacher_init.format_table(rows, student.cfg.depth))
    return student
  overrides = {**config.student.overrides, "image_size": config.data.image_size}
  return with_new_head(load_model(init, overrides), 0, config.seed + 1, drop_path=drop_path)


def with_new_head(base: nnx.Module, num_classes: int, seed: int, **changes) -> nnx.Module:
  """A copy of `base` with a fresh `num_classes` head (and other config changes)."""
  model = models.from_config(
    dataclasses.replace(base.cfg, num_classes=num_classes, **changes), seed=seed
  )
  params = nnx.state(base, nnx.Param).to_pure_dict()
  params.pop("head", None)
  nnx.update(model, nnx.State(params))
  return model


def pretrained_student(config, run_dir: str, num_classes: int) -> nnx.Module:
  """The student to fine-tune: this run's distilled one, else student.init (with
  student.overrides, as `load_model` applies them)."""
  init = model_dir(run_dir, "distill") if finished(run_dir, "distill") else config.student.init
  if not init:
    raise UserError(
      "finetune needs a distilled student: run the 'distill' stage first or set student.init."
    )
  # Fine-tuning at its own resolution (finetune.augment.image_size, e.g. 448) starts from
  # position embeddings resampled once to it, as Adventurer fine-tunes at 448.
  size = config.finetune.augment.get("image_size", config.data.image_size)
  return with_new_head(
    load_model(init, {**config.student.overrides, "image_size": size}),
    num_classes,
    config.seed + 3,
    drop_path=config.finetune.drop_path,
  )


# ---------------------------------------------------------------------------------------
# One run per workdir.
# ---------------------------------------------------------------------------------------
LOCK_FILE = ".lock"  # {host, pid, started} of the run working in the directory


def _holder(run_dir: str, quiet: bool = False) -> Optional[dict]:
  """The live run holding `run_dir`'s lock, or None (no lock, or a stale one: its process
  is gone from this host)."""
  try:
    with open(os.path.join(run_dir, LOCK_FILE), encoding="utf-8") as f:
      holder = json.load(f)
  except (OSError, ValueError):
    return None
  if holder.get("host") == socket.gethostname():
    try:
      os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
      if not quiet:
        log(f"warning: {run_dir} was locked by pid {holder['pid']}, which is gone: taking over.")
      return None
    except (PermissionError, KeyError, ValueError):
      pass  # alive under another user, or unreadable: treat as held
  return holder


def _in_use(run_dir: str, holder: dict) -> UserError:
  return UserError(
    f"{run_dir} is in use by another run (pid {holder.get('pid')} on {holder.get('host')}, "
    f"since {holder.get('started')}): wait for it, stop it, or use another --workdir. If "
    f"that run is dead on another machine, delete {os.path.join(run_dir, LOCK_FILE)}."
  )


def check_unlocked(run_dir: str) -> None:
  """Refuses (process 0, inside `claim`) a workdir another live run holds, before
  --restart could move its files."""
  holder = None if "://" in run_dir else _holder(run_dir)
  if holder is not None:
    raise _in_use(run_dir, holder)


@contextlib.contextmanager
def locked(run_dir: str):
  """Process 0 holds `run_dir/.lock` while the run works (its other processes and the
  ablation's workers work under it); a second run is refused by `check_unlocked`.
  A workdir that is not a local path (gs://...) takes no lock."""
  if not main_process() or "://" in run_dir:
    if "://" in run_dir and main_process():
      log(f"note: {run_dir} is not a local directory: no lock is taken against a second run.")
    yield
    return
  path = os.path.join(run_dir, LOCK_FILE)
  holder = _holder(run_dir, quiet=True)
  if holder is not None:  # taken since `claim` looked
    raise _in_use(run_dir, holder)
  if os.path.exists(path):  # stale (claim said so)
    os.remove(path)
  me = dict(host=socket.gethostname(), pid=os.getpid(), started=time.strftime("%Y-%m-%d %H:%M:%S"))
  try:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  except FileExistsError:
    raise _in_use(run_dir, _holder(run_dir, quiet=True) or {}) from None
  with os.fdopen(fd, "w", encoding="utf-8") as f:
    json.dump(me, f)
  try:
    yield
  finally:
    if _holder(run_dir, quiet=True) == me:
      os.remove(path)


def flatten(tree, prefix: str = "") -> dict:
  if not isinstance(tree, dict):
    return {prefix: tree}
  out = {}
  for k, v in tree.items():
    out.update(flatten(v, f"{prefix}{k}."))
  return {k.rstrip("."): v for k, v in out.items()}


def config_changes(old: dict, new: dict) -> list:
  """Fields set differently in `old` and `new` (both as in config.json), but for safe ones.

  Fields one of them lacks (added or removed by another version of the code) are not compared.
  """
  old, new = flatten(old), flatten(new)
  safe = lambda k: any(k == s or k.startswith(s + ".") for s in SAFE_TO_CHANGE)
  return [
    f"{k}: {old[k]!r} -> {new[k]!r}"
    for k in sorted(old.keys() & new.keys())
    if old[k] != new[k] and not safe(k)
  ]


def has_run(run_dir: str) -> bool:
  """Whether a training stage left checkpoints or a model in `run_dir`."""
  for stage in TRAIN_STAGES:
    ckpt = os.path.join(run_dir, stage, "ckpt")
    if finished(run_dir, stage) or (os.path.isdir(ckpt) and os.listdir(ckpt)):
      return True
  return False


def claim(config, run_dir: str, restart: bool = False) -> None:
  """Makes `run_dir` this config's: refuses one another live run holds (`locked`), and one
  holding a run of another config (the differing fields listed); with `restart`, moves what
  is there to `<run_dir>.old-<time>` first. Then writes `run_dir/config.json`. Process 0 decides and the others follow it:
  when it refuses, every process raises."""
  refused = None
  if main_process():
    try:
      check_unlocked(run_dir)
      _check_or_move(config, run_dir, restart)
    except UserError as e:
      refused = e
  if jax.process_count() > 1:
    flag = multihost_utils.broadcast_one_to_all(np.int32(refused is not None))
    if int(flag) and refused is None:
      refused = UserError(f"process 0 refused the workdir {run_dir} (its log says why).")
  if refused is not None:
    raise refused
  try:
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.json"), "w", encoding="utf-8") as f:
      f.write(config.to_json_best_effort(indent=2) + "\n")
  except OSError as e:
    raise UserError(f"--workdir {run_dir} cannot be written: {e.strerror or e}.") from e


def _check_or_move(config, run_dir: str, restart: bool) -> None:
  if not os.path.isdir(run_dir) or not os.listdir(run_dir):
    return
  if restart:
    aside = f"{os.path.abspath(run_dir)}.old-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
      os.rename(run_dir, aside)
    except OSError as e:
      raise UserError(f"--restart could not move {run_dir} to {aside}: {e.strerror or e}.") from e
    log(f"--restart: moved the previous contents of {run_dir} to {aside}")
    return
  path = os.path.join(run_dir, "config.json")
  if not has_run(run_dir):
    return
  if not os.path.isfile(path):
    raise UserError(
      f"{run_dir} holds trained stages or checkpoints but no config.json, so which config "
      "made them cannot be checked. Put the run's config.json back, use another "
      f"--workdir, or pass --restart to move the old run to {run_dir}.old-<time>."
    )
  try:
    with open(path, encoding="utf-8") as f:
      old = json.load(f)
  except ValueError as e:
    raise UserError(
      f"{path} is not readable JSON ({e}); pass --restart to start over in "
      f"{run_dir}, or use another --workdir."
    ) from None
  changed = config_changes(old, json.loads(config.to_json_best_effort()))
  if changed:
    raise UserError(
      f"{run_dir} holds a run of a different config ({path}); these fields "
      "differ:\n  " + "\n  ".join(changed) + "\nUse another --workdir, or pass "
      f"--restart to move the old run to {run_dir}.old-<time> and start over."
    )
