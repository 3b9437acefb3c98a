"""The one-config-per-workdir guard's decisions (linearizer.workdir.config_changes), by the
schema's declarations (linearizer.schema, written beside each field in configs/): which
fields may differ on a finished run, which on a stopped one, and that a field never
differs from itself. The refusals as a user meets them: tests/e2e/test_workdir_guard.py.
"""

import json
import math

import pytest

from configs import ablation as ablation_config
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
  new["segment"] = seg["segment"]  # a block only the new config has: nothing old read it
  assert workdir.config_changes(old, new, str(run)) == []
  old["stages"] = [*old["stages"], "segment"]  # unless it is one of the old run's stages
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


def test_fields_added_later_keep_older_workdirs_when_set_as_they_behaved(tmp_path):
  """A config saved before the newer loss weights, the dense toy's scene fields and the
  ablation's segment block existed resumes under today's config; setting one of them to
  something else than what the old code did is still a change."""
  new = json.loads(ablation_config.get_config().to_json_best_effort())
  old = json.loads(json.dumps(new))
  for name in ("w_final", "w_blocks", "w_mixer", "final_target", "final_view"):
    del old["distill"]["loss"][name]
  del old["segment"], old["ablation"]["dense"]
  assert workdir.config_changes(old, new, str(tmp_path)) == []
  new["distill"]["loss"]["w_mixer"] = 1.0
  assert workdir.config_changes(old, new, str(tmp_path)) == [
    "distill.loss.w_mixer: '(absent)' -> 1.0"
  ]
  seg = json.loads(segment.get_config().to_json_best_effort())  # a run of the segment stage
  seg_old = json.loads(json.dumps(seg))
  del seg_old["segment"]["data"]["digit_count"]
  assert workdir.config_changes(seg_old, seg, str(tmp_path)) == [
    "segment.data.digit_count: '(absent)' -> [1, 1]"  # the demo's new scenes: not the old (2, 4)
  ]
  assert schema.absent_as("segment.data.digit_side") == (0.25, 0.5)
