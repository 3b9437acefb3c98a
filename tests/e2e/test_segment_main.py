"""The segment stage through main.py (configs/segment.py:smoke) and the `predict` CLI of
linearizer.segment: both backbones end to end, reuse, and the errors a user meets first."""

import json
import subprocess
import sys

import numpy as np
from PIL import Image

import helpers
from helpers import ROOT, assert_clean_error, sideways_jpeg
from linearizer.segmentation import scenes


def run_main(workdir, *flags, code=0):
  return helpers.run_main(workdir, *flags, config="configs/segment.py:smoke", code=code)


def test_the_segment_stage_through_main(tmp_path):
  """The smoke config end to end (a ViT teacher and a fresh Adventurer: both backbones;
  the distilled one is the same code path as `scratch`): every backbone's results, the
  table, the figure; the same command again reuses them."""
  workdir = tmp_path / "run"
  flags = (
    "--config.stages=('train_teacher','segment')",
    "--config.segment.backbones=('teacher','scratch')",
  )
  out = run_main(workdir, *flags).stdout
  assert "| backbone | mIoU | mAcc | aAcc | params | img/s |" in out
  table = json.loads((workdir / "segment" / "results.json").read_text())
  assert sorted(table) == ["scratch", "teacher"]
  for name, row in table.items():
    assert 0 <= row["miou"] <= 1 and 0 <= row["aacc"] <= 1 and len(row["iou"]) == 11
    assert row["pixels"] == 4 * 32 * 32  # every pixel of the 4 test canvases is labelled
    assert (workdir / "segment" / name / "predictions.png").stat().st_size > 0
    assert (workdir / "segment" / name / "ckpt").is_dir()
  again = run_main(workdir, *flags).stdout
  assert "[segment/teacher] already finished" in again
  check_the_exported_model_and_predict(workdir / "segment" / "scratch" / "model", tmp_path)
  proc = predict(workdir / "train_teacher" / "model", tmp_path / "images", tmp_path / "x", code=2)
  assert proc.stderr.startswith("error: ") and "'segmenter'" in proc.stderr, proc.stderr
  assert "Traceback" not in proc.stderr and not (tmp_path / "x").exists()


def predict(model, inputs, output, *flags, code=0):
  proc = subprocess.run(
    [sys.executable, "-m", "linearizer.segment", "predict", "--model", str(model)]
    + ["--input", str(inputs), "--output", str(output), *flags],
    cwd=ROOT,
    env=helpers.env(),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == code, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc


def check_the_exported_model_and_predict(model_dir, tmp_path):
  """load_segmenter and the serialised function agree; `predict` writes a label map and an
  overlay per image of a folder, at each image's own size."""
  import linearizer
  from linearizer import serving

  model = linearizer.load_segmenter(str(model_dir))
  x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  np.testing.assert_allclose(
    np.asarray(serving.load_serving(str(model_dir))(x)), np.asarray(model(x)[0]), atol=1e-5
  )
  (tmp_path / "images").mkdir()
  digit_scenes = scenes.DigitScenes("test", size=40, num_scenes=2, seed=3)
  for i in range(2):
    Image.fromarray(digit_scenes[i][0][: 40 - 8 * i]).save(tmp_path / "images" / f"scene{i}.png")
  sideways_jpeg(tmp_path / "images" / "photo.jpg", digit_scenes[0][0][:24])  # 40 wide, upright
  out = predict(model_dir, tmp_path / "images", tmp_path / "masks").stdout
  assert "3 label map(s)" in out
  for i in range(2):
    mask = np.asarray(Image.open(tmp_path / "masks" / f"scene{i}.png"))
    assert mask.shape == (40 - 8 * i, 40) and mask.max() < 11
    assert (tmp_path / "masks" / f"scene{i}_overlay.png").is_file()
  assert np.asarray(Image.open(tmp_path / "masks" / "photo.png")).shape == (24, 40)  # upright
  # an image past the pixel limit: one line naming it and the way round, nothing written
  proc = predict(model_dir, tmp_path / "images", tmp_path / "big", "--max_pixels", "100", code=2)
  assert_clean_error(proc, "decompression bombs", "--max_pixels")
  assert not (tmp_path / "big").exists()


def test_a_backbone_no_stage_produced_is_one_clear_error(tmp_path):
  proc = run_main(
    tmp_path / "run",
    "--config.stages=('segment',)",
    "--config.segment.backbones=('distill',)",
    code=2,
  )
  lines = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
  assert len(lines) == 1 and "'distill'" in lines[0] and "distill/model" in lines[0], proc.stderr
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "run" / "segment").exists()


def test_a_backbone_entry_that_is_not_a_name_is_refused_before_anything_runs(tmp_path):
  proc = run_main(tmp_path / "run", "--config.segment.backbones=('vit_b',)", code=2)
  assert "segment.backbones entry 'vit_b'" in proc.stderr and "Traceback" not in proc.stderr
  assert not (tmp_path / "run" / "train_teacher").exists()


def test_a_dataset_with_an_image_but_no_mask_is_refused_before_any_stage(tmp_path):
  root = tmp_path / "data"
  for sub in ("images", "masks"):
    (root / sub).mkdir(parents=True)
  for stem in ("a", "b", "c", "d", "e"):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "images" / f"{stem}.png")
    if stem != "c":
      Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "masks" / f"{stem}.png")
  proc = run_main(tmp_path / "run", f"--config.segment.data.source=segfolder:{root}", code=2)
  lines = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
  assert len(lines) == 1 and "c" in lines[0] and "mask" in lines[0], proc.stderr
  assert not (tmp_path / "run" / "train_teacher").exists()
