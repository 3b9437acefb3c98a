"""Runs an experiment from a config: python main.py --config configs/X.py[:args] --workdir DIR.

Override any field on the command line: --config.distill.steps=100. The config names the
stages to run (train_teacher, distill, finetune, train_student, eval); each writes under
DIR/<stage>/, and running the same command again resumes or reuses what is there.

A workdir holding a run of a different config (other than in SAFE_TO_CHANGE) is refused;
--restart moves its contents to DIR.old-<time> and starts over (nothing is deleted). Bad
input stops with one line, `error: <what and what was expected>`, and exit code 2.
"""
import json
import os
import re
import sys
import time
import traceback

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py[:args]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics, plots and exports go.")
flags.DEFINE_bool("restart", False, "Start over in a workdir that holds a run: its contents "
                  "are moved to <workdir>.old-<time> first.")
flags.mark_flags_as_required(["config", "workdir"])

ROOT = os.path.dirname(os.path.abspath(__file__))
# Config fields that may differ from those of the run already in a workdir: what to run,
# evaluation, logging, checkpointing, sharding, data loading speed.
SAFE_TO_CHANGE = ("stages", "eval", "bench", "log_every", "checkpoint", "mesh", "nan_policy",
                  "data.workers", "data.eval_source", "data.eval_limit", "data.data_dir")
# Raised by this project for bad input (user errors), reported without a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, FileExistsError, ImportError,
               FloatingPointError, OSError)


def error(message, code=2):
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(code)


def parse_flags(argv):
  """absl's flag parsing, with a config error (an unknown key, a bad value) in one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    message = str(e)
    if "Traceback" in message:  # an error in the config file: its last line says what
      message = [line for line in message.splitlines() if line.strip()][-1]
    error(f"{message}\nPass --helpshort or --helpfull to see help on flags.")
  except (KeyError, AttributeError, ValueError, TypeError) as e:  # ml_collections overrides
    message = str(e.args[0] if e.args else e).replace("\\'", "'")
    hint = re.search(r'Did you mean "(\S+)" instead of "(\S+)"\?', message)
    if hint:
      flag = next((a for a in argv if a.startswith("--config.") and hint[2] in a), "--config.*")
      error(f"{flag.split('=')[0]}: the config has no field {hint[2]!r}; did you mean "
            f"{hint[1]!r}?")
    error(f"a --config override names no field of the config: {message}")


def flatten(tree, prefix=""):
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
  return [f"{k}: {old[k]!r} -> {new[k]!r}" for k in sorted(old.keys() & new.keys())
          if old[k] != new[k] and not safe(k)]


def has_run(workdir) -> bool:
  """Whether a training stage left checkpoints or a model in `workdir`."""
  from linearizer import stages  # pylint: disable=import-outside-toplevel
  for stage in stages.TRAIN_STAGES:
    ckpt = os.path.join(workdir, stage, "ckpt")
    if stages.finished(workdir, stage) or (os.path.isdir(ckpt) and os.listdir(ckpt)):
      return True
  return False


def prepare_workdir(config, workdir, restart):
  """Refuses a workdir whose run has another config; with `restart`, moves it aside."""
  if not os.path.isdir(workdir) or not os.listdir(workdir):
    return
  if restart:
    aside = f"{os.path.abspath(workdir)}.old-{time.strftime('%Y%m%d-%H%M%S')}"
    os.rename(workdir, aside)
    print(f"--restart: moved the previous contents of {workdir} to {aside}", flush=True)
    return
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path) or not has_run(workdir):
    return
  try:
    with open(path, encoding="utf-8") as f:
      old = json.load(f)
  except ValueError as e:
    raise ValueError(f"{path} is not readable JSON ({e}); pass --restart to start over in "
                     f"{workdir}, or use another --workdir.") from None
  changed = config_changes(old, json.loads(config.to_json_best_effort()))
  if changed:
    raise ValueError(f"{workdir} holds a run of a different config ({path}); these fields "
                     "differ:\n  " + "\n  ".join(changed) + "\nUse another --workdir, or pass "
                     f"--restart to move the old run to {workdir}.old-<time> and start over.")


def write_config(config, workdir):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
    f.write(config.to_json_best_effort(indent=2) + "\n")


def ours(e: BaseException) -> bool:
  """Whether `e` was raised by this project's code (a checked error), not inside a library."""
  tb = traceback.extract_tb(e.__traceback__)
  return bool(tb) and os.path.abspath(tb[-1].filename).startswith(ROOT + os.sep) \
      and "site-packages" not in tb[-1].filename


def use_compilation_cache(workdir):
  """Compiled steps are kept in workdir/jax_cache (unless JAX_COMPILATION_CACHE_DIR names
  another place): a resumed run, and runs that repeat a step (the ablation's seeds), skip
  the compile."""
  import jax  # pylint: disable=import-outside-toplevel
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "jax_cache"))


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)  # library INFO chatter off; progress prints
  from linearizer import preemption, sharding, stages  # pylint: disable=import-outside-toplevel
  preemption.install()
  sharding.initialize_distributed()
  config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  try:
    import jax  # pylint: disable=import-outside-toplevel
    if jax.process_index() == 0:
      prepare_workdir(config, workdir, flags.FLAGS.restart)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      multihost_utils.sync_global_devices("workdir checked")
    write_config(config, workdir)
    use_compilation_cache(workdir)
    stages.run(config, workdir)
  except USER_ERRORS as e:
    if not ours(e):
      raise  # a bug, or a library failing: the traceback says where
    error(e)


if __name__ == "__main__":
  from linearizer import cpu_malloc  # pylint: disable=import-outside-toplevel
  cpu_malloc.reexec()  # on the CPU: XLA's scratch memory reused between steps (see there)
  app.run(main, flags_parser=parse_flags)
