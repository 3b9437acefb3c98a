"""Runs an experiment from a config: python main.py --config configs/X.py[:args] --workdir DIR.

Override any field on the command line: --config.distill.steps=100. The config names the
stages to run (train_teacher, distill, finetune, train_student, eval); each writes under
DIR/<stage>/, and running the same command again resumes or reuses what is there.
"""
import os

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py[:args]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics, plots and exports go.")
flags.mark_flags_as_required(["config", "workdir"])


def write_config(config, workdir):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
    f.write(config.to_json_best_effort(indent=2) + "\n")


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)  # library INFO chatter off; progress prints
  from linearizer import preemption, sharding, stages  # pylint: disable=import-outside-toplevel
  preemption.install()
  sharding.initialize_distributed()
  config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  write_config(config, workdir)
  stages.run(config, workdir)


if __name__ == "__main__":
  app.run(main)
