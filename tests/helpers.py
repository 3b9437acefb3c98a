"""What many test files share: the repository's root, `main.py` as a user runs it, the check
of a clean one-line error, and models with random weights. (tests/ is on sys.path: the
suite's conftest.py lives there, so `import helpers` works from every test directory.)
"""

import hashlib
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
from flax import nnx
from PIL import Image

from linearizer import models
from linearizer.models import saved

ROOT = pathlib.Path(__file__).resolve().parent.parent
SMOKE = "configs/demo.py:smoke"


def env(**extra) -> dict:
  """The environment of a process the tests start: our package importable, the CPU, and
  conftest.py's compile flags and compilation cache (inherited through os.environ)."""
  return dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", **extra)


def main_command(workdir, *flags, config: str = SMOKE, python=("main.py",)) -> list:
  return [sys.executable, *python, "--config", config, "--workdir", str(workdir), *flags]


def run_main(workdir, *flags, config: str = SMOKE, code: int = 0, python=("main.py",)):
  """`python main.py --config CONFIG --workdir WORKDIR FLAGS...` from the repository root,
  as a user types it; asserts its exit status is `code` and returns the finished process."""
  return run_process(main_command(workdir, *flags, config=config, python=python), code, 900)


def run_process(command: list, code: int, timeout: int):
  """`command` from the repository root with `env()`; asserts its exit status."""
  proc = subprocess.run(
    command, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout
  )
  assert proc.returncode == code, proc.stdout[-3000:] + proc.stderr[-5000:]
  return proc


def assert_clean_error(proc, *phrases) -> None:
  """One `error:` line first, no traceback, and every phrase somewhere in stderr."""
  # Our message comes first of the lines that are neither a library's absl log line (a
  # process that does not run main.py keeps them on stderr) nor the note saying where
  # main.py sent them.
  ours = [
    line
    for line in proc.stderr.splitlines()
    if not re.match(r"[IWEF]\d{4} ", line) and not line.startswith("note: ")
  ]
  assert ours and ours[0].startswith("error: "), proc.stderr[-3000:]  # (it may wrap lines)
  assert sum(line.startswith("error: ") for line in ours) == 1, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  for phrase in phrases:
    assert phrase in proc.stderr, proc.stderr[-3000:]


def tree_digest(*roots) -> dict:
  """{path: sha256 of its bytes} of every file under `roots` (links listed as their target
  text): what a refused command must leave byte-identical."""
  out = {}
  for root in map(pathlib.Path, roots):
    for path in sorted([root, *root.rglob("*")] if root.is_dir() else [root]):
      if path.is_symlink():
        out[str(path)] = "link:" + os.readlink(path)
      elif path.is_file():
        out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
  return out


def run_cli(module: str, *args, code: int = 2):
  """`python -m MODULE ARGS...` from the repository root; asserts the exit status."""
  return run_process([sys.executable, "-m", module, *map(str, args)], code, 300)


def sideways_jpeg(path, upright: np.ndarray) -> None:
  """`upright` (H, W, 3) stored as a phone stores a photo taken sideways: the pixels turned a
  quarter, with the EXIF Orientation tag (6) that tells a viewer to turn them back."""
  exif = Image.Exif()
  exif[0x0112] = 6
  Image.fromarray(np.ascontiguousarray(np.rot90(upright, k=1))).save(path, exif=exif, quality=100)


def rel_err(ours, ref) -> float:
  """max |ours - ref| / max |ref|, in float64."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def random_model(cfg, seed: int = 0):
  """`cfg`'s model (an Adventurer's or a ViT's) with random values in every parameter, each
  of a size its role has in a trained model (decay rates, steps, norms, fan-in kernels)."""
  rng = np.random.default_rng(seed)

  def value(key, shape):
    if key[-1] == "A_log":
      return np.log(rng.uniform(1, 16, shape))
    if key[-1] == "dt_bias":  # softplus -> steps of about 0.01-0.1, as in training
      return rng.uniform(-4.5, -2.3, shape)
    if key[-1] in ("scale", "norm_weight", "D"):
      return 1 + 0.1 * rng.standard_normal(shape)
    if key[-1] == "kernel":
      return rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
    return 0.3 * rng.standard_normal(shape)

  abstract = nnx.state(nnx.eval_shape(lambda: models.from_config(cfg)), nnx.Param)
  return saved.from_params(
    cfg, {k: value(k, v.get_value().shape) for k, v in nnx.to_flat_state(abstract)}
  )


def normal_model(cfg, scale: float, seed: int = 0):
  """`cfg`'s model with every parameter drawn from N(0, scale²)."""
  abstract = nnx.state(nnx.eval_shape(lambda: models.from_config(cfg)), nnx.Param)
  rng = np.random.default_rng(seed)
  params = {
    path: (scale * rng.normal(size=v.shape)).astype(v.dtype)
    for path, v in nnx.to_flat_state(abstract)
  }
  return saved.from_params(cfg, params)
