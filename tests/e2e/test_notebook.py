"""notebooks/quickstart.ipynb runs top to bottom and does real work.

The notebook is executed as a user would run it: a fresh IPython kernel whose working
directory is notebooks/, nothing added to its import path (the notebook finds the repository
itself). The kernel is this interpreter (a kernelspec written here, so no `ipykernel
install` and no user-level kernelspec is needed or used), on the CPU.
"""

import json
import os
import pathlib
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402 (after the skips)
from jupyter_client.manager import AsyncKernelManager  # noqa: E402

from helpers import ROOT  # noqa: E402

NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"


def kernel_manager(tmp_path):
  """A kernel manager whose 'python3' kernel is this interpreter, with JAX on the CPU and
  temporary files (the notebook's workdir) under tmp_path."""
  spec_dir = tmp_path / "kernels" / "python3"
  spec_dir.mkdir(parents=True)
  (spec_dir / "kernel.json").write_text(
    json.dumps(
      dict(
        argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        display_name="Python 3",
        language="python",
        env=dict(JAX_PLATFORMS="cpu", TMPDIR=str(tmp_path)),
      )
    )
  )
  specs = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")], ensure_native_kernel=False)
  return AsyncKernelManager(kernel_name="python3", kernel_spec_manager=specs)


def text_of(cell):
  """Everything a code cell printed or returned, as one string."""
  parts = []
  for out in cell.get("outputs", []):
    if out.output_type == "stream":
      parts.append(out.text)
    elif out.output_type in ("execute_result", "display_data"):
      parts.append(out.data.get("text/plain", ""))
  return "".join(parts)


def test_quickstart_notebook_runs(tmp_path):
  nb = nbformat.read(NOTEBOOK, as_version=4)
  # Stored without outputs, so the repository stays small.
  assert all(
    not c.get("outputs") and c.get("execution_count") is None
    for c in nb.cells
    if c.cell_type == "code"
  )
  client = nbclient.NotebookClient(
    nb,
    km=kernel_manager(tmp_path),
    kernel_name="python3",
    timeout=600,
    resources={"metadata": {"path": str(NOTEBOOK.parent)}},
  )
  client.execute()  # raises CellExecutionError naming the cell on any error

  code = [c for c in nb.cells if c.cell_type == "code"]
  out = "\n".join(text_of(c) for c in code)
  # The kernel was this interpreter, and the notebook found this repository by itself.
  assert f"python: {sys.executable}" in out
  assert f"repository: {NOTEBOOK.parent.parent}" in out
  # Every stage ran; the eval table has the three models.
  for stage in ("train_teacher", "distill", "finetune", "train_student", "eval"):
    assert f"[{stage}] starting" in out
  for row in ("teacher", "student (distilled)", "student (from scratch)"):
    assert any(line.startswith(row + " ") for line in out.splitlines()), row
  # The AM distances, the benchmark and the reload / serving checks.
  assert "AM distance to the teacher, distilled:" in out
  assert "AM distance to the teacher, from scratch:" in out
  assert "[bench] wrote" in out
  assert "reloaded student: logits match" in out
  assert "serving function: logits match" in out
  # Pictures inline: the curves, two images' maps and the speed plot.
  images = sum("image/png" in o.get("data", {}) for c in code for o in c.get("outputs", []))
  assert images >= 4, images

  # The run learned something: well above chance (10%) on held-out digits.
  workdir = next(
    line.split("workdir:", 1)[1].strip() for line in out.splitlines() if line.startswith("workdir:")
  )
  assert pathlib.Path(workdir).is_relative_to(tmp_path)
  results = json.loads((pathlib.Path(workdir) / "eval" / "results.json").read_text())
  size = next(k for k in results["teacher"] if k.startswith("@"))
  for name in ("teacher", "student (distilled)", "student (from scratch)"):
    assert results[name][size]["top1"] > 0.5, (name, results[name][size])
  assert os.path.isfile(os.path.join(workdir, "my_student", "serve.jaxexport"))
