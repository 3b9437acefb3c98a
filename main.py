"""Runs an experiment from a config: python main.py --config configs/X.py[:args] --workdir DIR.

Override any field on the command line: --config.distill.steps=100. The config names the
stages to run (train_teacher, distill, finetune, train_student, eval, ...); each writes under
DIR/<stage>/, and running the same command again resumes or reuses what is there.

A workdir holding a run of a different config is refused; --restart moves its contents to
DIR.old-<time> and starts over (nothing is deleted). Bad input stops with one line,
`error: <what and what was expected>`, and exit code 2. This file is intentionally short:
the logic is in `linearizer.stages`, which a notebook calls the same way.
"""

import os
import re

from linearizer import cpu_malloc

if __name__ == "__main__":
  cpu_malloc.reexec()  # on the CPU: XLA's scratch memory reused between steps (see there)

# After the re-exec above (which must come before JAX is loaded).
import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from linearizer import preemption, sharding, stages  # noqa: E402
from linearizer.errors import UserError, exit_with, one_line_errors  # noqa: E402
from linearizer.log import library_noise_to  # noqa: E402

config_flags.DEFINE_config_file(
  "config", None, "Experiment config file (configs/*.py[:args]).", lock_config=True
)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics, plots and exports go.")
flags.DEFINE_bool(
  "restart",
  False,
  "Start over in a workdir that holds a run: its contents are moved to <workdir>.old-<time> first.",
)
flags.mark_flags_as_required(["config", "workdir"])


def error(message):
  exit_with(UserError(message))


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
      error(f"{flag.split('=')[0]}: the config has no field {hint[2]!r}; did you mean {hint[1]!r}?")
    named = [  # the overrides whose last key the message names
      a.split("=")[0]
      for a in argv
      if a.startswith("--config.") and repr(a.split("=")[0].rpartition(".")[2]) in message
    ]
    if named:
      error(f"{named[0]}: the config has no such field ({message}).")
    error(f"a --config override names no field of the config: {message}")


def use_compilation_cache(workdir):
  """Compiled steps are kept in workdir/jax_cache (unless JAX_COMPILATION_CACHE_DIR names
  another place): a resumed run, and runs that repeat a step (the ablation's seeds), skip
  the compile."""
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "jax_cache"))


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)  # library INFO chatter off; progress prints
  preemption.install()
  library_noise_to(os.path.join(flags.FLAGS.workdir, "logs", "libraries.log"))
  with one_line_errors():
    sharding.initialize_distributed()
    use_compilation_cache(flags.FLAGS.workdir)
    stages.run(flags.FLAGS.config, flags.FLAGS.workdir, restart=flags.FLAGS.restart)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
