"""`python -m linearizer.export` as a user runs it: a directory that is not an export is one
clean error and writes nothing. (The exports themselves: tests/export/.)"""

import subprocess
import sys

import pytest

pytest.importorskip("torch")  # as tests/export/test_torch_export.py: --format torch
import helpers  # noqa: E402
from helpers import ROOT, assert_clean_error  # noqa: E402


def test_cli_refuses_a_directory_that_is_not_an_export(tmp_path):
  (tmp_path / "notes.txt").write_text("not a model")
  output = tmp_path / "x.pth"
  proc = subprocess.run(
    [sys.executable, "-m", "linearizer.export", "--format", "torch"]
    + ["--input", str(tmp_path), "--output", str(output)],
    cwd=ROOT,
    env=helpers.env(),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert_clean_error(proc, str(tmp_path), "holds no model.json", "DIR/export")
  assert not output.exists()
