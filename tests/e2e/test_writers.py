"""Outputs never land on inputs or on each other (reliability class 1): every CLI that
derives or takes output paths refuses, before reading a model or writing a byte, a target
that is one of its inputs (also through a link, `..` or a replaced folder) or that two
inputs share. Each case as a user types it: one `error:` line, exit 2, the user's files
byte-identical (hashed before and after).

The refusals come before any model is read, so the model paths here need not hold one.
"""

import os

import numpy as np
from PIL import Image

from helpers import assert_clean_error, run_cli, tree_digest


def image(path, value=0):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


def predict(tmp_path, inputs, output):
  return run_cli(
    "linearizer.segment", "predict", "--model", tmp_path / "model", "--input", inputs,
    "--output", output,
  )  # fmt: skip


def test_predict_never_writes_over_an_input(tmp_path):
  photos = tmp_path / "photos"
  image(photos / "street.png", 1)
  image(photos / "street.jpg", 2)  # one stem, two files: both label maps would be street.png
  image(tmp_path / "b" / "b.png", 3)
  image(tmp_path / "b" / "b_overlay.png", 4)  # b's overlay would land on this input
  os.symlink(photos, tmp_path / "link")  # the output folder is the input folder, by a link
  before = tree_digest(tmp_path)
  cases = [
    (photos / "street.png", photos, "is the input"),  # an image inside the output folder
    (photos / "street.png", tmp_path / "link", "is the input"),
    (photos, tmp_path / "out", "would both be written to"),
    (tmp_path / "b", tmp_path / "b" / ".." / "b", "is the input"),
    (tmp_path / "b", tmp_path / "out", "would both be written to"),
  ]
  for inputs, output, phrase in cases:
    assert_clean_error(predict(tmp_path, inputs, output), phrase)
    assert tree_digest(tmp_path) == before, (inputs, output)
  assert not (tmp_path / "out").exists()


def test_export_never_writes_over_its_input(tmp_path):
  export = tmp_path / "export"
  (export / "params").mkdir(parents=True)
  (export / "model.json").write_text('{"kind": "adventurer"}')
  (export / "params" / "x").write_bytes(b"weights")
  os.symlink(export / "model.json", tmp_path / "student.onnx")  # a link to an input file
  before = tree_digest(tmp_path)
  for fmt, output in [
    ("onnx", export / "model.json"),
    ("torch", export / "params" / "x"),
    ("onnx", tmp_path / "student.onnx"),
    ("torch", export),
  ]:
    proc = run_cli("linearizer.export", "--format", fmt, "--input", export, "--output", output)
    assert_clean_error(proc, "is the input")
    assert tree_digest(tmp_path) == before, output


def test_convert_never_replaces_the_folder_its_input_is_in(tmp_path):
  ckpt = tmp_path / "ckpt"
  ckpt.mkdir()
  np.savez(ckpt / "weights.npz", w=np.zeros(3))
  before = tree_digest(tmp_path)
  for output in (ckpt, tmp_path, tmp_path / "ckpt" / ".."):
    proc = run_cli(
      "linearizer.convert", "--format", "big_vision", "--input", ckpt / "weights.npz",
      "--output", output, "--overwrite",
    )  # fmt: skip
    assert_clean_error(proc, "would be replaced whole", "weights.npz")
    assert tree_digest(tmp_path) == before, output
