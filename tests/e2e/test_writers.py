"""Outputs never land on inputs or on each other (reliability class 1): every CLI that
derives or takes output paths refuses, before reading a model or writing a byte, a target
that is one of its inputs (also through a link, `..` or a replaced folder) or that two
inputs share. The first case of each CLI runs as a user types it (a process); the others
go through the same `main` in-process (each process start imports JAX: seconds). Each: one
`error:` line, exit 2, the user's files byte-identical (hashed before and after).

The refusals come before any model is read, so the model paths here need not hold one.
"""

import os

import numpy as np
import pytest
from PIL import Image

from helpers import assert_clean_error, run_cli, tree_digest
from linearizer import convert
from linearizer.export import cli as export_cli
from linearizer.segmentation import cli as segment_cli


def image(path, value=0):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


def refused_in_process(main, args, capsys, phrase):
  with pytest.raises(SystemExit) as exit_:
    main([str(a) for a in args])
  err = capsys.readouterr().err
  assert exit_.value.code == 2 and sum(x.startswith("error: ") for x in err.splitlines()) == 1
  assert phrase in err, err


def test_predict_never_writes_over_an_input(tmp_path, capsys):
  photos = tmp_path / "photos"
  image(photos / "street.png", 1)
  image(photos / "street.jpg", 2)  # one stem, two files: both label maps would be street.png
  image(tmp_path / "b" / "b.png", 3)
  image(tmp_path / "b" / "b_overlay.png", 4)  # b's overlay would land on this input
  os.symlink(photos, tmp_path / "link")  # the output folder is the input folder, by a link
  before = tree_digest(tmp_path)
  predict = ["predict", "--model", tmp_path / "model", "--input"]
  proc = run_cli("linearizer.segment", *predict, photos / "street.png", "--output", photos)
  assert_clean_error(proc, "is the input")  # an image inside the output folder
  for inputs, output, phrase in [
    (photos / "street.png", tmp_path / "link", "is the input"),
    (photos, tmp_path / "out", "would both be written to"),
    (tmp_path / "b", tmp_path / "b" / ".." / "b", "is the input"),
    (tmp_path / "b", tmp_path / "out", "would both be written to"),
  ]:
    refused_in_process(segment_cli.main, [*predict, inputs, "--output", output], capsys, phrase)
  assert tree_digest(tmp_path) == before
  assert not (tmp_path / "out").exists()


def test_export_never_writes_over_its_input(tmp_path, capsys):
  export = tmp_path / "export"
  (export / "params").mkdir(parents=True)
  (export / "model.json").write_text('{"kind": "adventurer"}')
  (export / "params" / "x").write_bytes(b"weights")
  os.symlink(export / "model.json", tmp_path / "student.onnx")  # a link to an input file
  before = tree_digest(tmp_path)
  proc = run_cli(
    "linearizer.export", "--format", "onnx", "--input", export, "--output", export / "model.json"
  )
  assert_clean_error(proc, "is the input")
  for fmt, output in [
    ("torch", export / "params" / "x"),
    ("onnx", tmp_path / "student.onnx"),
    ("torch", export),
  ]:
    args = ["--format", fmt, "--input", export, "--output", output]
    refused_in_process(export_cli.main, args, capsys, "is the input")
  assert tree_digest(tmp_path) == before


def test_convert_never_replaces_the_folder_its_input_is_in(tmp_path, capsys):
  ckpt = tmp_path / "ckpt"
  ckpt.mkdir()
  np.savez(ckpt / "weights.npz", w=np.zeros(3))
  before = tree_digest(tmp_path)
  flags = ["--format", "big_vision", "--input", ckpt / "weights.npz", "--overwrite", "--output"]
  proc = run_cli("linearizer.convert", *flags, ckpt)
  assert_clean_error(proc, "would be replaced whole", "weights.npz")
  for output in (tmp_path, tmp_path / "ckpt" / ".."):
    refused_in_process(convert.main, [*flags, output], capsys, "would be replaced whole")
  assert tree_digest(tmp_path) == before
