"""The workdir: where each stage writes, which stages are finished, the lock, and the guard
that keeps one run's config per workdir (the models a run resolves: `linearizer.resolve`).

Layout (the README's table): `DIR/config.json`; `DIR/<stage>/{ckpt,model,metrics.jsonl,tb}`
for the training stages; `DIR/<stage>/model` (see `models.saved`) marks a stage finished.
"""

import contextlib
import json
import math
import os
import shutil
import socket
import time
from typing import Optional, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from linearizer import schema
from linearizer.errors import UserError
from linearizer.log import log, main_process
from linearizer.models import saved

# The stages that train a model and end by writing DIR/<stage>/model.
TRAIN_STAGES = ("train_teacher", "distill", "finetune", "train_student")


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


def _same(a, b) -> bool:
  """Equal as config.json holds them; NaN equals NaN (a field never differs from itself)."""
  if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
    return True
  return a == b


def config_changes(old: dict, new: dict, run_dir: str) -> list:
  """Fields set differently in `old` and `new` (both as in config.json, every block of
  both), but for those the schema lets change (linearizer.schema.may_change): FINISHED
  ones always, STOPPED ones while their training stage has not finished in `run_dir`
  (logged, as the stage resumes with the new value). A field only one of them has counts,
  but for a field `old` predates set to the value it behaved as (`schema.Field.absent`), and
  a block `old` lacks that is none of its stages (nothing it ran read it)."""
  read = set(old) | set(old.get("stages", ()))  # the old run's blocks and stages
  unread = lambda key: key.partition(".")[0] not in read
  old, new = flatten(old), flatten(new)
  missing = "(absent)"
  changed = []
  for key in sorted(old.keys() | new.keys()):
    a, b = old.get(key, missing), new.get(key, missing)
    if _same(a, b) or schema.may_change(key, schema.FINISHED):
      continue
    if a == missing and (unread(key) or _same(json.loads(json.dumps(schema.absent_as(key))), b)):
      continue
    stage = key.partition(".")[0]
    if stage in TRAIN_STAGES and not finished(run_dir, stage):
      if schema.may_change(key, schema.STOPPED):
        log(f"[{stage}] {key}: {a!r} -> {b!r}; the stage resumes with the new value")
        continue
    changed.append(f"{key}: {a!r} -> {b!r}")
  return changed


def has_run(run_dir: str, state: Sequence[str]) -> bool:
  """Whether `run_dir` holds trained state or results: any of `state` (paths under it, from
  the stage table's `state`) a file, or a folder with something in it."""
  for rel in state:
    path = os.path.join(run_dir, rel)
    if os.path.isfile(path) or (os.path.isdir(path) and os.listdir(path)):
      return True
  return False


def claim(config, run_dir: str, state: Sequence[str], restart: bool = False) -> None:
  """Makes `run_dir` this config's: refuses one another live run holds (`locked`), and one
  holding trained state or results (`state`, paths under it) of another config (the
  differing fields listed); with `restart`, moves what is there to `<run_dir>.old-<time>`
  first. Then writes `run_dir/config.json`. Process 0 decides and the others follow it:
  when it refuses, every process raises."""
  refused = None
  if main_process():
    try:
      check_unlocked(run_dir)
      _check_or_move(config, run_dir, state, restart)
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


def _check_or_move(config, run_dir: str, state: Sequence[str], restart: bool) -> None:
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
  if not has_run(run_dir, state):
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
  changed = config_changes(old, json.loads(config.to_json_best_effort()), run_dir)
  if changed:
    raise UserError(
      f"{run_dir} holds a run of a different config ({path}); these fields "
      "differ:\n  " + "\n  ".join(changed) + "\nUse another --workdir, or pass "
      f"--restart to move the old run to {run_dir}.old-<time> and start over."
    )
