"""main.py end to end on the smoke config: every stage, the files it writes, reuse, resume.

The tests read one run of `main.py --config configs/demo.py:smoke` (`demo_run`, conftest.py:
once per test session); one that runs main.py on it works on a copy.
"""

import json
import os
import shutil

import numpy as np
import pytest

import helpers

STAGES = ("train_teacher", "distill", "finetune", "train_student")


def run_main(workdir, *flags, code=0):
  """helpers.run_main on the smoke config; its stdout, or its stderr where it fails."""
  proc = helpers.run_main(workdir, *flags, code=code)
  return proc.stdout if code == 0 else proc.stderr


def params(directory):
  import jax

  from linearizer.models import saved

  return jax.tree.leaves(saved.read_params(directory))


def test_every_stage_writes_its_files(demo_run):
  workdir, out = demo_run
  assert json.load(open(workdir / "config.json"))["data"]["source"] == "digits"
  for stage in STAGES:
    d = workdir / stage
    assert (d / "model" / "model.json").is_file(), stage
    rows = [json.loads(line) for line in open(d / "metrics.jsonl")]
    rows = [r for r in rows if "loss" in r]  # (distill's scorecard rows are beside them)
    assert rows[-1]["step"] == 4 and np.isfinite(rows[-1]["loss"]), stage
    assert any(f.startswith("events") for f in os.listdir(d / "tb")), stage
    assert sorted(os.listdir(d / "ckpt")) == ["2", "4"], stage  # keep=2, every 2 steps
  distill_rows = [json.loads(line) for line in open(workdir / "distill" / "metrics.jsonl")]
  assert {"am", "mp", "am_stage0", "am_stage1", "grad_norm", "lr"} <= set(distill_rows[-2])
  # The scorecard at the end (scorecard_every=50 > 4 steps), logged beside the step's metrics
  card = distill_rows[-1]
  assert card["step"] == 4 and "loss" not in card
  assert {"scorecard/cka_level0", "scorecard/am_distance_level1", "scorecard/knn"} <= set(card)
  assert {"scorecard/probe", "scorecard/outliers", "scorecard/teacher_knn"} <= set(card)
  assert 0 <= card["scorecard/cka_level0"] <= 1 and 0 <= card["scorecard/knn"] <= 100
  assert (workdir / "distill" / "scorecard.png").is_file()
  assert "[distill] scorecard at step 4: CKA per level" in out
  results = json.load(open(workdir / "eval" / "results.json"))
  assert set(results) == {"teacher", "student (distilled)", "student (from scratch)"}
  assert "cka" not in results["teacher"]  # the students are compared with it
  for name, row in results.items():
    for key in ("knn", "probe", "knn_gap", "probe_gap", "outliers"):
      assert 0 <= row[key] <= 100, (name, key)
    if name != "teacher":
      assert len(row["cka"]) == len(row["am_distance"]) == 2  # the smoke models' depth
  for row in results.values():
    assert 0 <= row["@16"]["top1"] <= row["@16"]["top5"] <= 1
    assert row["@16"]["examples"] == 359  # digits: 20% of 1797 held out
    assert row["img_per_s@16"] > 0 and row["img_per_s@32"] > 0
    assert row["dtype"] == "float32"
  assert (workdir / "export" / "serve.jaxexport").is_file()
  assert (workdir / "plots" / "training.png").is_file()
  assert (workdir / "distill" / "maps" / "step_000004_0.png").is_file()  # maps at the end
  cosines = json.load(open(workdir / "distill" / "teacher_cosines.json"))
  assert set(cosines) == {"raw", "centered", "next_ln"}
  assert all(len(levels) == 2 and -1 <= levels[0][0] <= 1 for levels in cosines.values())
  assert "teacher's off-diagonal cosines per AM level, raw (used)" in out
  assert "top-1" in out and "Outputs:" in out
  # The demo's seed table: seed 0 of both rows is the run's own students, not trained again
  # (the smoke has one seed), and their top-1 is the eval stage's.
  summary = json.load(open(workdir / "ablation" / "ablation.json"))
  assert "[ablation] am_mp seed 0: the run's own finetuned student" in out
  assert "[ablation] supervised seed 0: the run's own scratch student" in out
  assert not (workdir / "ablation" / "am_mp" / "seed0" / "finetune").exists()
  for variant, row in (("am_mp", "student (distilled)"), ("supervised", "student (from scratch)")):
    assert summary["variants"][variant]["top1"] == [100 * results[row]["@16"]["top1"]]
  assert "AM + MP − supervised:" in out


def test_second_run_reuses_finished_stages(demo_run, tmp_path):
  workdir, _ = demo_run
  copy = tmp_path / "copy"
  shutil.copytree(workdir, copy)  # (the shared run stays as its first run left it)
  before = json.load(open(workdir / "eval" / "results.json"))
  out = run_main(copy)
  for stage in STAGES:
    assert f"[{stage}] already finished" in out
  after = json.load(open(copy / "eval" / "results.json"))
  for name in before:
    assert after[name]["@16"] == before[name]["@16"]


def test_interrupted_stage_resumes_to_the_same_weights(demo_run, tmp_path):
  """A distill stage cut after its step-2 checkpoint ends with the same weights."""
  workdir, _ = demo_run
  copy = tmp_path / "copy"
  shutil.copytree(workdir, copy)
  shutil.rmtree(copy / "distill" / "model")  # the stage never finished ...
  shutil.rmtree(copy / "distill" / "ckpt" / "4")  # ... and its last save never happened
  out = run_main(copy, "--config.stages=('train_teacher','distill')")
  assert "[distill] step 4/4" in out and "[distill] step 2/4" not in out  # resumed at 2
  for a, b in zip(params(workdir / "distill" / "model"), params(copy / "distill" / "model")):
    np.testing.assert_array_equal(a, b)


def test_eval_only_on_exported_student_and_converted_teacher(demo_run, tmp_path):
  workdir, _ = demo_run
  out = run_main(
    tmp_path / "eval_only",
    "--config.stages=('eval',)",
    f"--config.teacher.init={workdir / 'train_teacher' / 'model'}",
    f"--config.student.init={workdir / 'export'}",
  )
  results = json.load(open(tmp_path / "eval_only" / "eval" / "results.json"))
  reference = json.load(open(workdir / "eval" / "results.json"))
  assert results["teacher"]["@16"] == reference["teacher"]["@16"]
  assert results["student"]["@16"] == reference["student (distilled)"]["@16"]
  assert "student" in out


def test_logit_distillation_in_fine_tuning(demo_run, tmp_path):
  """Fine-tuning the distilled student with soft KD from the run's teacher logs both terms;
  naming the distilled student (no head) as the KD teacher is one message, and the
  finetune stage never starts."""
  workdir, _ = demo_run
  flags = [
    "--config.stages=('finetune',)",
    f"--config.teacher.init={workdir / 'train_teacher' / 'model'}",
    f"--config.student.init={workdir / 'distill' / 'model'}",
    "--config.finetune.loss.kd=soft",
  ]
  out = run_main(tmp_path / "kd", *flags)
  assert "[finetune] soft logit distillation" in out
  rows = [json.loads(line) for line in open(tmp_path / "kd" / "finetune" / "metrics.jsonl")]
  assert {"ce", "kd", "loss"} <= set(rows[-1]) and rows[-1]["kd"] > 0
  # loss = (1 − α)·CE + α·KD, α = 0.5 by default
  assert rows[-1]["loss"] == pytest.approx(0.5 * rows[-1]["ce"] + 0.5 * rows[-1]["kd"], rel=1e-5)
  bad = f"--config.finetune.loss.kd_teacher={workdir / 'distill' / 'model'}"
  err = run_main(tmp_path / "bad", *flags, bad, code=2)
  ours = [line for line in err.splitlines() if line.startswith("error: ")]
  assert len(ours) == 1 and "finetune.loss.kd='soft'" in ours[0], err[-2000:]
  assert "no classification head" in err and "kd_teacher" in err
  assert not (tmp_path / "bad" / "finetune").exists()


def test_eval_skips_non_classifiers_and_takes_extra_models(demo_run, tmp_path):
  """A teacher whose head is not over the data's classes (as a CLIP projection) is skipped,
  not scored; eval.extra_models adds classifiers beside the run's."""
  from linearizer import models
  from linearizer.models import saved

  workdir, _ = demo_run
  embed = tmp_path / "embedder"
  saved.save(
    models.build(
      "vit", "Ti/4", width=32, depth=2, num_heads=2, mlp_dim=64, image_size=16, num_classes=7
    ),
    embed,
  )
  out = run_main(
    tmp_path / "eval_only",
    "--config.stages=('eval',)",
    f"--config.teacher.init={embed}",
    f"--config.student.init={workdir / 'export'}",
    f"--config.eval.extra_models=('again={workdir / 'train_teacher' / 'model'}',)",
  )
  results = json.load(open(tmp_path / "eval_only" / "eval" / "results.json"))
  reference = json.load(open(workdir / "eval" / "results.json"))
  assert set(results) == {"student", "again"}
  assert "skipping teacher: its head has 7 outputs and the data 10 classes" in out
  assert results["again"]["@16"]["top1"] == reference["teacher"]["@16"]["top1"]
  assert results["student"]["@16"]["agreement"] is None  # no teacher to agree with


def test_export_follows_its_stage_and_half_saves_are_cleaned(demo_run, tmp_path):
  """An export made from the distilled student (a 'train_teacher,distill' run) is redone
  once fine-tuning has finished; what a killed save left (.export.*, .model.*) is removed."""
  from linearizer import serving
  from linearizer.models import saved

  workdir, _ = demo_run
  copy = tmp_path / "copy"
  shutil.copytree(workdir, copy)
  distilled = saved.restore(copy / "distill" / "model")
  serving.export_student(distilled, copy / "export", source="distill")
  (copy / ".export.k9abc").mkdir()
  (copy / "distill" / ".model.k9xyz").mkdir()
  out = run_main(copy, "--config.stages=('train_teacher',)")
  assert "[export] the finetune student is in" in out
  assert serving.exported_from(copy / "export") == "finetune"
  assert saved.load_config(copy / "export")[1].num_classes == 10  # the classifier now
  for a, b in zip(params(copy / "export"), params(workdir / "finetune" / "model")):
    np.testing.assert_array_equal(a, b)
  assert not (copy / ".export.k9abc").exists() and not (copy / "distill" / ".model.k9xyz").exists()


def test_a_run_without_its_config_record_is_refused(demo_run, tmp_path):
  """config.json deleted from a run with finished stages: any config would have been
  accepted and every stage reused; now it is refused and nothing is touched."""
  workdir, _ = demo_run
  copy = tmp_path / "copy"
  shutil.copytree(workdir, copy)
  (copy / "config.json").unlink()
  err = run_main(copy, code=2)
  assert err.startswith("error: "), err[-2000:]
  assert "no config.json" in err and not (copy / "config.json").exists()
