"""The ablation (configs/ablation.py, linearizer/ablation.py): variants, summary, table.

The end-to-end test runs the real config on `digits` with one seed and a few steps through
main.py; the others check the bookkeeping against hand-computed numbers.
"""

import json
import os
import re

import numpy as np
import pytest

from configs import ablation as ablation_config
from helpers import run_main
from linearizer import ablation, models
from linearizer.distillation import teacher_fit

# the cost-matched baselines and the 2026 recipes' rows, opt-in: every new loss, init and
# baseline once. final_am and mlp_init only combine them (final with AM; mlp_final's init
# with AM + MP), so they stay out of the run (test_each_variant_changes_only_its_settings
# holds final_am's settings)
NEWER = (
  "supervised_matched",
  "supervised_tokens",
  "final",
  "blocks",
  "mixer_out",
  "mlp_final",
)


def test_ablation_smoke_run_writes_the_table(tmp_path):
  config_arg = "configs/ablation.py:smoke,seeds=1"
  config = ablation_config.get_config("smoke,seeds=1")
  variants = (*config.ablation.variants, *NEWER)  # the paper's rows, then the newer ones
  proc = run_main(
    tmp_path,
    "--config.ablation.workers=2",  # two workers
    f"--config.ablation.variants={variants!r}",
    config=config_arg,
  )
  out = tmp_path / "ablation"
  summary = json.load(open(out / "ablation.json"))
  assert summary["data"] == "digits" and summary["seeds"] == 1
  assert list(summary["variants"]) == list(variants)
  assert summary["scope"] == "all"  # AM + MP's own scope: its runs are the 'all tokens' row
  assert summary["variants"]["scope_all"] == summary["variants"]["am_mp"]
  assert not (out / "scope_all").exists()
  for variant, row in summary["variants"].items():
    assert len(row["top1"]) == 1 and 0 <= row["top1"][0] <= 100, variant
    assert row["mean"] == row["top1"][0] and row["std"] == 0.0
    run = out / ablation.runs_of(config, variant) / "seed0"
    scratch = variant in ablation.FROM_SCRATCH
    stage = "train_student" if scratch else "finetune"
    assert (run / stage / "model" / "model.json").is_file(), variant
    assert (run / "distill").is_dir() == (not scratch), variant
  assert 0 <= summary["teacher_top1"] <= 100
  assert {"gap", "spread", "am_mp_beats_supervised_by_2_std", "mp_between", "am_between"} <= set(
    summary["checks"]
  )
  table = (out / "ablation.md").read_text()
  rows = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")]
  assert rows == [
    "",
    "teacher",
    "**objective**",
    "supervised",
    "MP only",
    "AM only",
    "AM only, unmasked",
    "AM + MP",
    "**AM scope**",
    "CLS only",
    "visible",
    "all tokens (= AM + MP)",
    "**cost-matched baselines**",
    "supervised, AM + MP's training FLOPs",
    "supervised, half the patch (4x tokens)",
    "**newer recipes (2026)**",
    "final tokens only (GTR)",
    "block regression only (FitNets)",
    "mixer outputs only (AdaLA stage 1)",
    "teacher-shaped student, MLPs from the teacher, final tokens only",
  ]
  final = json.loads(
    (out / "final" / "seed0" / "distill" / "metrics.jsonl").read_text().splitlines()[0]
  )
  assert "final" in final and "am" not in final and "mp" not in final
  mixer = json.loads(
    (out / "mixer_out" / "seed0" / "distill" / "metrics.jsonl").read_text().splitlines()[0]
  )
  assert "mixer_out" in mixer and "am" not in mixer and "final" not in mixer
  assert "82.6" in table and "84.3" in table and "83.4" in table  # the paper's numbers
  assert (out / "ablation.png").stat().st_size > 10_000
  assert "(13/13 runs" in proc.stdout
  steps = re.search(r"supervised_matched: (\d+) train_student steps", proc.stdout)
  assert steps and int(steps[1]) > config.train_student.steps  # the teacher's share on top
  model = out / "supervised_tokens" / "seed0" / "train_student" / "model" / "model.json"
  half = int(config.student.variant.split("/")[1]) // 2  # Ti/4 -> patch 2, 4x the tokens
  assert json.loads(model.read_text())["config"]["patch"] == half
  # Run again in one process: only the run whose result is gone is redone, the same way.
  os.remove(tmp_path / "ablation" / "am" / "seed0" / "result.json")
  again = run_main(tmp_path, f"--config.ablation.variants={variants!r}", config=config_arg)
  assert "[ablation] am seed 0" in again.stdout and "(1/1 runs" in again.stdout
  assert json.load(open(out / "ablation.json"))["variants"] == summary["variants"]
  # The dense column on a finished distilled row (its fine-tuned student): only the
  # segmentation fine-tune runs, the top-1 stays, and the table gains the mIoU column.
  dense = run_main(
    tmp_path,
    "--config.ablation.dense=True",
    "--config.ablation.variants=('mixer_out',)",
    config=config_arg,
  )
  assert "(1/1 runs" in dense.stdout and "mixer_out seed 0: mIoU" in dense.stdout
  rows = json.load(open(out / "ablation.json"))["variants"]
  assert rows["mixer_out"]["top1"] == summary["variants"]["mixer_out"]["top1"]
  miou = json.load(open(out / "mixer_out" / "seed0" / "dense" / "results.json"))["miou"]
  assert rows["mixer_out"]["dense"]["miou"] == [100 * miou] and 0 <= miou <= 1
  assert (out / "mixer_out" / "seed0" / "dense" / "model" / "serve.jaxexport").is_file()
  assert "| dense toy mIoU (%) |" in (out / "ablation.md").read_text()


def flat_config(c, prefix=""):
  """{dotted path: value} of every leaf of a config dict."""
  out = {}
  for key, value in c.items():
    if isinstance(value, dict):
      out.update(flat_config(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def test_each_variant_changes_only_its_settings():
  config = ablation_config.get_config("smoke,seeds=3,am_scope=visible")
  base = flat_config(config.to_dict())
  markers = (ablation.TEACHER_SHAPE, ablation.MATCHED_STEPS, ablation.HALF_PATCH)
  for variant, (_, overrides) in ablation.VARIANTS.items():
    if set(markers) & set(overrides.values()):
      continue  # below, and tests/test_costs.py
    sub = ablation.run_config(config, variant, 2)
    assert sub.seed == config.seed + 2 and sub.label_seed == config.label_seed == 0
    changed = {k: v for k, v in flat_config(sub.to_dict()).items() if base[k] != v}
    wanted = {k: v for k, v in overrides.items() if base[k] != v}  # (scope_visible)
    assert changed == {"seed": config.seed + 2, **wanted}, variant
  assert ablation.run_config(config, "mp", 0).distill.loss.w_am == 0
  assert ablation.run_config(config, "am", 0).distill.loss.w_mp == 0
  assert ablation.run_config(config, "am", 0).distill.loss.scope == "visible"
  assert ablation.run_config(config, "scope_cls", 0).distill.loss.scope == "cls"
  assert ablation.run_config(config, "scope_all", 0).distill.loss.scope == "all"
  assert ablation.run_config(config, "kd_hard", 0).finetune.loss.kd == "hard"
  assert ablation.run_config(config, "teacher_cache", 0).distill.teacher_cache == "write"


@pytest.mark.parametrize("arg", ["smoke", None])
def test_teacher_shaped_variants_build_a_student_every_teacher_weight_fits(arg):
  """teacher_init and teacher_shape differ only in the init; their student is the config's
  with the teacher's width, depth, heads and MLP, which check_fit accepts in full."""
  config = ablation_config.get_config(arg)
  teacher_cfg = models.ARCHITECTURES[config.teacher.kind].variant(
    config.teacher.variant, **config.teacher.overrides, image_size=config.data.image_size
  )
  init = ablation.run_config(config, "teacher_init", 1, teacher_cfg)
  shape = ablation.run_config(config, "teacher_shape", 1, teacher_cfg)
  assert init.distill.student_init == "teacher" and shape.distill.student_init == ""
  assert init.student.overrides.to_dict() == shape.student.overrides.to_dict()
  assert init.student.overrides.width == teacher_cfg.width
  assert init.student.overrides.ngroups == teacher_cfg.num_heads
  assert init.student.overrides.chunk_size == config.student.overrides.chunk_size  # kept
  student_cfg = models.ARCHITECTURES[init.student.kind].variant(
    init.student.variant, **init.student.overrides, image_size=config.data.image_size
  )
  assert teacher_fit.check_fit(student_cfg, teacher_cfg, allow_partial=False) == []


def test_am_scope_picks_which_scope_row_is_the_am_mp_runs():
  assert ablation_config.get_config().distill.loss.scope == "all"  # the default, see docstring
  for scope in ("all", "visible", "cls"):
    config = ablation_config.get_config(f"am_scope={scope}")
    assert config.distill.loss.scope == scope
    rows = {v: ablation.runs_of(config, v) for v in config.ablation.variants}
    assert rows[f"scope_{scope}"] == "am_mp"
    assert {v for v, r in rows.items() if r != v} == {f"scope_{scope}"}
  with pytest.raises(ValueError, match="am_scope='tokens'"):
    ablation_config.get_config("am_scope=tokens")


def write_results(workdir, accs):
  for variant, values in accs.items():
    for k, v in enumerate(values):
      d = ablation.variant_dir(str(workdir), variant, k)
      os.makedirs(d)
      json.dump(dict(variant=variant, seed=k, top1=v), open(os.path.join(d, "result.json"), "w"))


def test_summary_statistics_and_checks_by_hand(tmp_path):
  config = ablation_config.get_config("seeds=3")
  accs = {
    "supervised": [0.80, 0.82, 0.81],
    "mp": [0.84, 0.85, 0.86],
    "am": [0.90, 0.91, 0.92],
    "am_unmasked": [0.82, 0.84, 0.86],
    "am_mp": [0.86, 0.87, 0.88],
    "scope_cls": [0.85] * 3,
    "scope_visible": [0.83, 0.84, 0.85],
  }  # the 'all' row is AM + MP's runs
  write_results(tmp_path, accs)
  s = ablation.summarize(config, str(tmp_path), 0.95)
  sup = s["variants"]["supervised"]
  assert sup["top1"] == pytest.approx([80, 82, 81])
  assert sup["mean"] == pytest.approx(81) and sup["std"] == pytest.approx(1.0)  # ddof=1
  c = s["checks"]
  assert c["gap"] == pytest.approx(6) and c["spread"] == pytest.approx(1.0)
  assert c["am_mp_beats_supervised_by_2_std"]  # 6 > 2 × 1
  assert c["mp_between"] and not c["am_between"]  # AM only (91) is above AM + MP (87)
  assert "| AM + MP | 87.00 ± 1.00 | 84.3 |" in s["table"]
  assert "| AM only, unmasked | 84.00 ± 2.00 | — |" in s["table"]  # no paper row
  assert "| all tokens (= AM + MP) | 87.00 ± 1.00 | 83.4 |" in s["table"]  # AM + MP's runs
  assert "| visible | 84.00 ± 1.00 | 84.3 |" in s["table"]
  assert "| teacher | 95.00 |" in s["table"]
  assert "AM only between supervised and AM + MP: no." in s["table"]
  ablation.write_summary(s, str(tmp_path / "out"))
  assert json.load(open(tmp_path / "out" / "ablation.json"))["checks"] == json.loads(json.dumps(c))
  # A gap within 2 std is reported as such.
  write_results(tmp_path / "close", dict(accs, am_mp=[0.79, 0.84, 0.81]))
  assert not ablation.summarize(config, str(tmp_path / "close"), 0.95)["checks"][
    "am_mp_beats_supervised_by_2_std"
  ]
  assert np.isclose(
    ablation.summarize(config, str(tmp_path / "close"), 0.95)["checks"]["gap"], 0.333333, atol=1e-4
  )


def test_the_gflops_columns(tmp_path):
  """With ablation.gflops each row carries its training and inference GFLOPs (the teacher's
  row none): two columns, the teacher's and the section rows left blank."""
  config = ablation_config.get_config("seeds=1")
  config.ablation.variants = ("supervised", "am_mp")
  write_results(tmp_path, {"supervised": [0.80], "am_mp": [0.86]})
  gflops = {
    "supervised": dict(train=4442.4, inference=0.03091),
    "am_mp": dict(train=5031.0, inference=0.03091),
  }
  table = ablation.summarize(config, str(tmp_path), 0.95, gflops)["table"]
  assert (
    "| | top-1 (%), mean ± std over 1 seed | paper, ImageNet-1k | train GFLOPs | inference GFLOPs |"
    in table
  )
  assert "| teacher | 95.00 | 84.7 (CLIP ViT-B/16) | | |" in table
  assert "| supervised | 80.00 ± 0.00 | 82.6 | 4,442 | 0.0309 |" in table
  assert "| AM + MP | 86.00 ± 0.00 | 84.3 | 5,031 | 0.0309 |" in table


def test_unknown_variant_is_refused_by_name(tmp_path):
  config = ablation_config.get_config("smoke,seeds=1")
  with config.unlocked():
    config.ablation.variants = ("supervised", "am_only")
    config.stages = ("ablation",)
    config.teacher.init = "/nonexistent"
  with pytest.raises(ValueError, match="am_only"):
    ablation.run(config, str(tmp_path), None, None, 10)


def test_every_student_gets_the_same_step_budget():
  config = ablation_config.get_config("distill_steps=300,mask_ratio=0.75,labels=50")
  assert config.distill.steps + config.finetune.steps == config.train_student.steps == 750
  assert (config.distill.steps, config.finetune.steps) == (300, 450)
  assert "total_steps" not in config.distill.optim  # the schedule ends at the stage's steps
  assert config.distill.loss.mask_ratio == 0.75
  assert config.finetune.num_labels == config.train_student.num_labels == 50
  config = ablation_config.get_config(
    "steps=600,distill_steps=400,teacher_steps=200,teacher_pool=cls"
  )
  assert (config.distill.steps, config.finetune.steps, config.train_student.steps) == (
    400,
    200,
    600,
  )
  assert config.train_teacher.steps == 200
  assert config.teacher.overrides.pool == "cls"
  # Layer-wise lr decay is a fine-tuning tool: the from-scratch baseline never gets it.
  config = ablation_config.get_config("layer_decay=0.7,label_seed=3")
  assert config.finetune.optim.layer_decay == 0.7 and config.label_seed == 3
  assert config.train_student.optim.layer_decay == config.distill.optim.layer_decay == 1.0
  with pytest.raises(ValueError, match="distill_steps=750"):
    ablation_config.get_config("distill_steps=750")
