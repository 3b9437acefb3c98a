"""The one-config-per-workdir guard covers every stage that keeps trained state or results
(the stage table's `state`), as a user meets it: a segmentation run (no classification
stage at all) run again with another config is refused, fields named, before anything is
read or written; the user's workdir is byte-identical afterwards."""

import json
import shutil

import train_teacher_run
from configs import segment
from helpers import assert_clean_error, run_main, tree_digest


def test_a_segmentation_run_is_not_reused_by_another_config(tmp_path):
  workdir = tmp_path / "run"
  (workdir / "segment" / "teacher").mkdir(parents=True)
  (workdir / "segment" / "teacher" / "results.json").write_text('{"miou": 0.5}')
  config = segment.get_config("smoke")
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  before = tree_digest(workdir)
  proc = run_main(
    workdir,
    "--config.segment.steps=7",
    "--config.segment.data.canvas=48",
    config="configs/segment.py:smoke",
    code=2,
  )
  assert_clean_error(
    proc,
    "holds a run of a different config",
    f"segment.steps: {config.segment.steps} -> 7",
    "segment.data.canvas",
    "--restart",
  )
  assert tree_digest(workdir) == before
  assert json.loads((workdir / "config.json").read_text())["segment"]["steps"] != 7


def test_a_stopped_stage_resumes_with_the_learning_rate_the_advice_names(reference, tmp_path):
  """After a divergence the message says to lower the learning rate: on a stage that
  stopped (checkpoints, no model) that change is accepted and logged, and the stage
  resumes; once the stage has finished, the same kind of change is refused."""
  workdir = tmp_path / "run"
  shutil.copytree(reference, workdir)
  shutil.rmtree(workdir / "train_teacher" / "model")  # stopped after its step-27 save
  shutil.rmtree(workdir / "train_teacher" / "ckpt" / str(train_teacher_run.STEPS))
  out = train_teacher_run.run_main(workdir, "--config.train_teacher.optim.lr=1e-4").stdout
  assert "-> 0.0001; the stage resumes with the new value" in out
  assert "resumed from the checkpoint of step 27" in out
  assert (workdir / "train_teacher" / "model" / "model.json").is_file()
  before = tree_digest(workdir)
  proc = train_teacher_run.run_main(workdir, "--config.train_teacher.optim.lr=1e-5", code=2)
  assert_clean_error(
    proc, "holds a run of a different config", "train_teacher.optim.lr: 0.0001 -> 1e-05"
  )
  assert tree_digest(workdir) == before
