"""The run the fault and bad-input files (test_robustness.py, test_bad_input.py) start from:
the smoke config's train_teacher stage only (the loop every stage shares), longer than the
smoke default so that there is time to interrupt it, a checkpoint every 3 steps. conftest.py's
`reference` fixture is this run, uninterrupted, once per test session.
"""

import json

import numpy as np

import helpers

STEPS = 30
FLAGS = (
  "--config.stages=('train_teacher',)",
  f"--config.train_teacher.steps={STEPS}",
  "--config.checkpoint.every_steps=3",
  "--config.log_every=1",
)


def command(workdir, *flags, python=("main.py",)):
  return helpers.main_command(workdir, *FLAGS, *flags, python=python)


def run_main(workdir, *flags, code=0, python=("main.py",)):
  return helpers.run_main(workdir, *FLAGS, *flags, code=code, python=python)


def params(workdir):
  import jax

  from linearizer.models import saved

  return jax.tree.leaves(saved.read_params(workdir / "train_teacher" / "model"))


def last_metrics(workdir):
  with open(workdir / "train_teacher" / "metrics.jsonl", encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  return {k: v for k, v in rows[-1].items() if k != "img_per_s"}


def assert_same_run(workdir, reference):
  for a, b in zip(params(reference), params(workdir), strict=True):
    np.testing.assert_array_equal(a, b)
  assert last_metrics(workdir) == last_metrics(reference)
