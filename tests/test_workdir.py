"""The one-config-per-workdir guard's decisions (linearizer.workdir.config_changes), by the
schema's declarations (linearizer.schema, written beside each field in configs/): which
fields may differ on a finished run, which on a stopped one, and that a field never
differs from itself. The refusals as a user meets them: tests/e2e/test_workdir_guard.py.
"""

import json
import math

import pytest

from configs import demo, segment
from linearizer import schema, workdir


def as_saved(config) -> dict:
  return json.loads(config.to_json_best_effort())


@pytest.fixture
def run(tmp_path):
  """A workdir whose train_teacher finished and whose distill stopped at a checkpoint."""
  (tmp_path / "train_teacher" / "model").mkdir(parents=True)
  (tmp_path / "train_teacher" / "model" / "model.json").write_text("{}")
  (tmp_path / "distill" / "ckpt" / "4").mkdir(parents=True)
  return tmp_path


def changes(old, new, run_dir):
  return workdir.config_changes(as_saved(old), as_saved(new), str(run_dir))


def test_what_may_change_and_when(run):
  old = demo.get_config("smoke")
  new = demo.get_config("smoke")
  new.log_every, new.eval.batch_size, new.data.workers = 7, 8, 2  # no trained weight moves
  new.scorecard.knn_k, new.distill.scorecard_every = 5, 3
  new.ablation.seeds = 5  # more runs beside those there: each stands for its own config
  assert changes(old, new, run) == []
  new.distill.optim.lr = old.distill.optim.lr / 10  # distill stopped: it resumes with it
  new.distill.optim.clip_norm = 0.5
  assert changes(old, new, run) == []
  new.train_teacher.optim.lr = 1.0  # train_teacher finished: its model came from the old one
  new.distill.loss.mask_ratio = 0.25  # what the stopped stage learns: never
  assert changes(old, new, run) == [
    f"distill.loss.mask_ratio: {old.distill.loss.mask_ratio!r} -> 0.25",
    f"train_teacher.optim.lr: {old.train_teacher.optim.lr!r} -> 1.0",
  ]


def test_every_block_is_compared_and_nan_equals_nan(run):
  old, new = as_saved(demo.get_config("smoke")), as_saved(demo.get_config("smoke"))
  old["distill"]["loss"]["w_am"] = new["distill"]["loss"]["w_am"] = math.nan
  assert workdir.config_changes(old, new, str(run)) == []
  seg = as_saved(segment.get_config("smoke"))
  new["segment"] = seg["segment"]  # a block only the new config has
  found = workdir.config_changes(old, new, str(run))
  assert f"segment.steps: '(absent)' -> {seg['segment']['steps']}" in found
  seg_new = as_saved(segment.get_config("smoke"))
  seg_new["segment"]["eval"]["limit"] = 3  # segment's eval feeds its stored results
  assert workdir.config_changes(seg, seg_new, str(run)) == [
    f"segment.eval.limit: {seg['segment']['eval']['limit']!r} -> 3"
  ]


def test_the_schema_refuses_two_meanings_for_one_name():
  with pytest.raises(TypeError, match="one name, one meaning"):
    schema.register("lr", schema.Field(1.0, schema.COUNT), "test")
