"""main.py refuses what it cannot run, with one clear line and before any stage trains:
mistyped or contradictory settings, missing or malformed data and teachers, a batch the
devices cannot split, a workdir of another config, a teacher cache of another setup.

Runs the train_teacher stage of train_teacher_run.py (the smoke config, 30 steps); the tests
with a teacher read the shared `reference` run's (conftest.py), and come last in the file,
so that another worker has usually finished that run by then.
"""

import json
import os
import shutil
import subprocess

import numpy as np
import pytest

from helpers import ROOT, assert_clean_error, env
from train_teacher_run import assert_same_run, command, run_main

BAD_INPUT = {  # name: (extra flags, phrases the message must hold)
  "mistyped key": (["--config.train_teacher.stepz=3"], ["stepz", "did you mean 'steps'"]),
  "teacher path missing": (
    ["--config.stages=('distill',)", "--config.teacher.init=/no/such"],
    ["/no/such"],
  ),
  "teacher of the wrong format": (
    ["--config.stages=('distill',)", "--config.teacher.init=big_vision:{tmp}/random.npz"],
    ["random.npz"],
  ),
  "data folder missing": (["--config.data.source=folder:/no/such/dir"], ["/no/such/dir"]),
  "data folder empty": (["--config.data.source=folder:{tmp}/empty"], ["has no images"]),
  "two-channel images": (["--config.data.source=npz:{tmp}/gray2.npz"], ["gray2.npz", "channels"]),
  "float images": (["--config.data.source=npz:{tmp}/float.npz"], ["float.npz", "uint8"]),
  "override of a field the config lacks": (
    ["--config.train_teacher.optim.total_steps=5"],
    ["--config.train_teacher.optim.total_steps", "no such field"],
  ),
  "unknown architecture": (["--config.teacher.kind=nope"], ["'nope'", "adventurer", "vit"]),
  "zero steps": (["--config.train_teacher.steps=0"], ["train_teacher.steps=0", "positive"]),
  "packed batches before a stage reads them": (
    ["--config.data.packing=True"],
    ["data.packing=True", "no stage trains on packed batches yet", "linearizer.aot"],
  ),
  "a packed row of no patches": (["--config.data.max_patches=0"], ["max_patches=0"]),
  "zero batch": (["--config.distill.batch_size=0"], ["distill.batch_size=0", "positive"]),
  "checkpoint every 0 steps, keep 0, log every 0": (
    ["--config.checkpoint.every_steps=0", "--config.checkpoint.keep=0", "--config.log_every=0"],
    ["checkpoint.every_steps=0", "checkpoint.keep=0", "log_every=0"],
  ),
  "values outside their ranges": (
    [
      "--config.distill.loss.mask_ratio=1.5",
      "--config.seed=-1",
      "--config.data.crop_scale=(0.9,0.1)",
      "--config.train_teacher.optim.ema_decay=1.0",
    ],
    [
      "distill.loss.mask_ratio=1.5: expected a number in [0, 1)",
      "seed=-1: expected an integer >= 0",
      "data.crop_scale=(0.9, 0.1): expected an ordered pair",
      "train_teacher.optim.ema_decay=1.0",
    ],
  ),
  "MLP copy into a student of another width": (
    [
      "--config.stages=('train_teacher','distill')",
      "--config.distill.student_init=teacher_mlp",
      "--config.student.overrides.width=48",
    ],
    ["student_init='teacher_mlp'", "student width 48 ≠ teacher width 32", "no narrower copy"],
  ),
  "mixer_out read from the teacher cache": (
    [
      "--config.stages=('train_teacher','distill')",
      "--config.distill.loss.w_mixer=1.0",
      "--config.distill.teacher_cache=write",
    ],
    ["w_mixer=1.0", "teacher_cache='off'"],
  ),
  "a dense column without a segment block": (
    ["--config.stages=('train_teacher','ablation')", "--config.ablation.dense=True"],
    ["ablation.dense=True", "configs/ablation.py"],
  ),
  "an unknown ablation row": (
    ["--config.stages=('train_teacher','ablation')", "--config.ablation.variants=('am_mp','mix')"],
    ["['mix']", "mixer_out"],
  ),
  "an ablation row the teacher cache cannot serve": (
    [
      "--config.stages=('train_teacher','ablation')",
      "--config.distill.teacher_cache=write",
      "--config.ablation.variants=('am_mp','mixer_out')",
    ],
    ["w_mixer=1.0", "teacher_cache='off'"],
  ),
  "unknown teacher input": (
    ["--config.stages=('train_teacher','distill')", "--config.distill.teacher_input=crop"],
    ["teacher_input='crop'", "resize"],
  ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_gets_one_clear_message(tmp_path, case):
  flags, phrases = BAD_INPUT[case]
  np.savez(tmp_path / "random.npz", a=np.zeros((3, 4), np.float32))
  (tmp_path / "empty" / "some_class").mkdir(parents=True)
  labels = np.zeros(8, np.int64)
  np.savez(tmp_path / "gray2.npz", images=np.zeros((8, 16, 16, 2), np.uint8), labels=labels)
  np.savez(tmp_path / "float.npz", images=np.zeros((8, 16, 16, 3), np.float32), labels=labels)
  proc = run_main(tmp_path / "workdir", *[f.format(tmp=tmp_path) for f in flags], code=2)
  assert_clean_error(proc, *phrases)


@pytest.mark.parametrize(
  "flag,phrases",
  [
    ("--config.eval.extra_models=('no_equals_sign',)", ("'no_equals_sign'", "name=fmt:path")),
    (  # the smoke student (expand 2, one group, MLP ratio 2.5) does not fit its teacher
      "--config.distill.student_init=teacher",
      ("student_init='teacher'", "ngroups 1 ≠ teacher num_heads 2", "teacher_init_partial=true"),
    ),
    ("--config.finetune.loss.kd=bogus", ("finetune.loss.kd='bogus'", "'soft', 'hard'")),
    ("--config.train_teacher.loss.kd=soft", ("train_teacher.loss.kd='soft'", "finetune")),
    ("--config.distill.teacher_cache=always", ("distill.teacher_cache='always'", "'auto'")),
    (  # before: a traceback from numpy's allocator after the teacher had trained
      "--config.eval.resolutions=(60000,)",
      ("eval of the teacher", "60000²", "needs at least", "free memory"),
    ),
  ],
)
def test_refused_before_any_stage_runs(tmp_path, flag, phrases):
  """Settings a later stage would refuse are refused before the first one trains."""
  proc = run_main(
    tmp_path / "workdir", "--config.stages=('train_teacher','distill','eval')", flag, code=2
  )
  assert_clean_error(proc, *phrases)
  assert not (tmp_path / "workdir" / "train_teacher").exists()


def test_a_batch_that_does_not_split_over_the_devices(tmp_path):
  """Three CPU devices, batch 16: one message naming the numbers, nothing written."""
  proc = subprocess.run(
    command(tmp_path / "workdir"),
    cwd=ROOT,
    env=dict(
      env(), XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=3"
    ),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert_clean_error(proc, "train_teacher.batch_size=16", "3 devices", "multiple of 3")
  assert not (tmp_path / "workdir" / "train_teacher").exists()


def test_workdir_of_another_config_is_refused_unless_restart(reference, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(reference, workdir)
  before = {d: sorted(os.listdir(workdir / d)) for d in ("train_teacher", "train_teacher/ckpt")}
  proc = run_main(
    workdir,
    "--config.seed=1",
    "--config.train_teacher.batch_size=8",
    "--config.log_every=2",
    code=2,
  )  # log_every may change: not listed
  assert_clean_error(
    proc,
    "holds a run of a different config",
    "seed: 0 -> 1",
    "train_teacher.batch_size: 16 -> 8",
    "--restart",
  )
  assert "log_every" not in proc.stderr
  assert {d: sorted(os.listdir(workdir / d)) for d in before} == before
  assert json.load(open(workdir / "config.json"))["seed"] == 0
  out = run_main(workdir, "--config.seed=1", "--restart").stdout
  aside = [p for p in os.listdir(tmp_path) if p.startswith("run.old-")]
  assert len(aside) == 1 and f"moved the previous contents of {workdir}" in out
  assert_same_run(tmp_path / aside[0], reference)  # the old run is intact
  assert json.load(open(workdir / "config.json"))["seed"] == 1


def test_teacher_and_student_that_cannot_be_paired(reference, tmp_path):
  """More AM stages than the (2-block) teacher has blocks: one message, nothing trained."""
  proc = run_main(
    tmp_path / "workdir",
    "--config.stages=('distill',)",
    f"--config.teacher.init={reference / 'train_teacher' / 'model'}",
    "--config.distill.loss.num_stages=5",
    code=2,
  )
  assert_clean_error(proc, "num_stages=5", "depth 2")
  assert not (tmp_path / "workdir" / "distill" / "ckpt").exists() or not os.listdir(
    tmp_path / "workdir" / "distill" / "ckpt"
  )


def test_teacher_overrides_that_contradict_its_checkpoint(reference, tmp_path):
  """teacher.overrides reach a loaded teacher: a depth the file contradicts is refused."""
  proc = run_main(
    tmp_path / "workdir",
    "--config.stages=('distill',)",
    f"--config.teacher.init={reference / 'train_teacher' / 'model'}",
    "--config.teacher.overrides.depth=3",
    code=2,
  )
  assert_clean_error(proc, "depth=3 (the file has 2)", "'dtype'")
  assert not (tmp_path / "workdir" / "distill").exists()


def test_a_teacher_cache_of_another_setup_or_none_at_all(reference, tmp_path):
  """A cache shared between runs (distill.teacher_cache_dir) is read by a run of the same
  setup and refused, fields named and files untouched, by a run of another seed; 'read'
  with no cache says so. Nothing is trained by a refused run."""
  teacher = f"--config.teacher.init={reference / 'train_teacher' / 'model'}"
  cache = tmp_path / "cache"
  shared = (teacher, "--config.stages=('distill',)", f"--config.distill.teacher_cache_dir={cache}")
  run_main(tmp_path / "a", *shared, "--config.distill.teacher_cache=write")
  files = {p: p.read_bytes() for p in cache.rglob("*") if p.is_file()}
  proc = run_main(tmp_path / "b", *shared, "--config.distill.teacher_cache=read")
  assert "(complete)" in proc.stdout and "teacher cache: batch" not in proc.stdout
  assert "teacher cache verified" in proc.stdout
  # a damaged byte: named, with how to write the cache anew, before anything trains
  (leaf,) = cache.glob("process0of1/leaf0.bin")
  damaged = bytearray(leaf.read_bytes())
  damaged[7] ^= 1
  leaf.write_bytes(bytes(damaged))
  proc = run_main(tmp_path / "b2", *shared, "--config.distill.teacher_cache=read", code=2)
  assert_clean_error(proc, "teacher cache is damaged", "leaf0.bin rows 0-", "Delete")
  assert leaf.read_bytes() == bytes(damaged)
  assert not (tmp_path / "b2" / "distill" / "ckpt").exists()
  damaged[7] ^= 1
  leaf.write_bytes(bytes(damaged))  # as written: the setup checks below read it
  proc = run_main(
    tmp_path / "c", *shared, "--config.distill.teacher_cache=auto", "--config.seed=1", code=2
  )
  assert_clean_error(proc, "another setup", "seed: cached 0 vs now 1", "teacher_cache_dir")
  assert {p: p.read_bytes() for p in cache.rglob("*") if p.is_file()} == files
  assert not (tmp_path / "c" / "distill" / "ckpt").exists()
  proc = run_main(
    tmp_path / "d",
    teacher,
    "--config.stages=('distill',)",
    "--config.distill.teacher_cache=read",
    code=2,
  )
  assert_clean_error(proc, "distill.teacher_cache='read'", "not there", "'write' or 'auto'")
  assert not (tmp_path / "d" / "distill" / "ckpt").exists()
  # 'auto' decides once per stage: resumed where it had chosen no cache (say, the disk was
  # full), it keeps the teacher-run stream even with a usable cache now at hand.
  (tmp_path / "e" / "distill").mkdir(parents=True)
  (tmp_path / "e" / "distill" / "teacher_cache.json").write_text('{"used": false}')
  proc = run_main(tmp_path / "e", *shared, "--config.distill.teacher_cache=auto")
  assert "resuming as the stage began: off" in proc.stdout
  assert "examples ×" not in proc.stdout  # the cache's size line: it was never opened
