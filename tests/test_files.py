"""linearizer.files: a write is whole or not at all, and a path that cannot be written is
named in one UserError."""

import os

import pytest

from linearizer import files
from linearizer.errors import UserError


def test_a_write_replaces_the_file_whole(tmp_path):
  path = tmp_path / "deeper" / "results.json"
  files.write_json(path, {"a": [1, 2]}, indent=None)
  assert path.read_text() == '{"a": [1, 2]}'
  files.write_text(path, "second")
  assert path.read_text() == "second"
  assert os.listdir(path.parent) == ["results.json"]  # no temporary sibling left behind


def test_a_write_that_fails_half_way_keeps_what_was_there(tmp_path):
  path = tmp_path / "model.onnx"
  path.write_bytes(b"the old export")
  with pytest.raises(KeyboardInterrupt):
    with files.replacing(path) as tmp:
      tmp.write_bytes(b"half of the new")
      raise KeyboardInterrupt  # a stop mid-write
  assert path.read_bytes() == b"the old export"
  assert os.listdir(tmp_path) == ["model.onnx"]


def test_a_path_that_cannot_be_written_is_named(tmp_path):
  (tmp_path / "taken").mkdir()  # a directory where the file should go
  with pytest.raises(UserError, match=f"Cannot write {tmp_path / 'taken'}"):
    files.write_bytes(tmp_path / "taken", b"x")
  assert os.listdir(tmp_path / "taken") == []
  assert os.listdir(tmp_path) == ["taken"]


def test_outputs_are_compared_as_the_filesystem_names_them(tmp_path, monkeypatch):
  """Two outputs or an output and an input that differ only in case are one file where the
  filesystem folds case (macOS's, Windows' defaults); on a case-sensitive one they are two."""
  (tmp_path / "Photo.png").write_bytes(b"mine")
  outputs = [(tmp_path / "A.png", "A.jpg"), (tmp_path / "a.png", "a.jpg")]
  files.check_outputs(outputs)  # this filesystem keeps case: two files
  files.check_outputs([(tmp_path / "photo.png", "x")], inputs=[tmp_path / "Photo.png"])
  monkeypatch.setattr(files, "_case_blind", lambda folder: True)
  with pytest.raises(UserError, match="would both be written to"):
    files.check_outputs(outputs)
  with pytest.raises(UserError, match="is the input"):
    files.check_outputs([(tmp_path / "photo.png", "x")], inputs=[tmp_path / "Photo.png"])
  assert (tmp_path / "Photo.png").read_bytes() == b"mine"
