"""Parity with wangf3014/Adventurer's own model code, both ways, through the files users move.

Their `models_mamba.Adventurer` is read from a git checkout named by the environment
variable LINEARIZER_ADVENTURER_REPO (it is not on PyPI, and none of its code is copied
here); without one the test skips. What their code imports from mamba-ssm and timm comes
from tests/models/adventurer_standins/ (pure torch; the SSM is the sequential scan, in float64),
put first on sys.path only in the subprocess that runs their code: the stand-ins never
shadow an installed timm (or mamba-ssm) in this process. `einops` (their mamba_custom.py
imports it) is the real package.

  ours -> theirs: an Adventurer built by `models.build` with every parameter perturbed
    randomly, exported (`serving.export_student`) and written by `torch_export.to_torch`,
    loads strictly into their model; their logits match the export's (`load_student`).
  theirs -> ours: their model, randomly initialised and every parameter perturbed, saved as
    their checkpoints are ({"model": state_dict}), read by `convert.load(..., "adventurer",
    flip_pattern="released")`; our logits match theirs.

Their forward flips blocks `n // 2 == 1` ("released"); depth 8 tells it from "alternate"
(1, 3, 5, 7), "pairs" (2, 3, 6, 7) and "none". 6x6 patches (38 tokens with the heading mean)
in JAX chunks of 8: the state crosses chunks, the last one ragged.

Tolerance: 1e-4 relative to the largest |logit| (float32 against their float64 scan).
"""

import importlib.util
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
from linearizer import convert, models, serving  # noqa: E402
from linearizer.export import to_torch as torch_export  # noqa: E402
from linearizer.models import saved  # noqa: E402

ENV = "LINEARIZER_ADVENTURER_REPO"
STANDINS = pathlib.Path(__file__).resolve().parent / "adventurer_standins"
THEIR_FILES = ("models_mamba.py", "mamba_custom.py")
RTOL = 1e-4
SIZE = dict(
  image_size=24, patch=4, width=32, depth=8, headdim=16, d_state=8, expand=2, num_classes=5
)

# Runs in the subprocess: torch, einops, the stand-ins and their checkout only (no JAX).
THEIRS = """
import pathlib, sys
standins, repo, work = sys.argv[1:4]
sys.path[:0] = [standins, repo]
import torch
import mamba_ssm, models_mamba, timm
for module in (mamba_ssm, timm):
  assert pathlib.Path(module.__file__).is_relative_to(standins), module.__file__
work = pathlib.Path(work)
size = dict(image_size=%(image_size)d, patch=%(patch)d, width=%(width)d, depth=%(depth)d,
            headdim=%(headdim)d, d_state=%(d_state)d, expand=%(expand)d,
            num_classes=%(num_classes)d)

def theirs():
  return models_mamba.Adventurer(
    img_size=size["image_size"], patch_size=size["patch"], depth=size["depth"],
    embed_dim=size["width"], num_classes=size["num_classes"], rms_norm=True,
    mamba_d_state=size["d_state"], mamba_expand=size["expand"],
    ssm_cfg={"headdim": size["headdim"]},
  )

images = torch.load(work / "images.pt", weights_only=True)  # NCHW
model = theirs().eval()
model.load_state_dict(torch.load(work / "ours.pth", weights_only=True)["model"], strict=True)
with torch.no_grad():
  torch.save(model(images), work / "theirs_on_ours.pt")

torch.manual_seed(0)
model = theirs().eval()  # their init, then every parameter moved off it
with torch.no_grad():
  for p in model.parameters():
    spread = p.std().item() if p.numel() > 1 else 0.0
    p.add_(torch.randn(p.shape) * (0.5 * spread if spread > 0 else 0.1))
  torch.save({"model": model.state_dict()}, work / "theirs.pth")
  torch.save(model(images), work / "theirs_logits.pt")
"""


def their_checkout() -> pathlib.Path:
  repo = os.environ.get(ENV)
  if not repo:
    pytest.skip(f"{ENV} does not name a checkout of wangf3014/Adventurer")
  repo = pathlib.Path(repo)
  missing = [name for name in THEIR_FILES if not (repo / name).is_file()]
  if missing:
    pytest.skip(f"{ENV}={repo} holds no {', '.join(missing)}: not an Adventurer checkout")
  if importlib.util.find_spec("einops") is None:
    pytest.skip("their mamba_custom.py imports einops, which is not installed")
  return repo


def perturbed(model, seed=0):
  """`model` with every parameter moved randomly off its initial value (norm scales, D,
  biases too): a mapping that swaps or transposes two of them shows in the logits."""
  rng = np.random.default_rng(seed)
  params = {}
  for key, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    value = np.asarray(var.get_value())
    spread = float(value.std()) if value.size > 1 else 0.0
    noise = rng.standard_normal(value.shape) * (0.5 * spread if spread > 0 else 0.1)
    params[key] = (value + noise).astype(value.dtype)
  return saved.from_params(model.cfg, params)


def logits(model, images_nhwc) -> np.ndarray:
  return np.asarray(nnx.jit(lambda m, x: m(x).logits)(model, images_nhwc))


def assert_close(got, want, what):
  diff = float(np.abs(got - want).max())
  rel = diff / float(np.abs(want).max())
  print(f"{what}: max |diff| {diff:.3g}, relative {rel:.3g}, max |logit| {np.abs(want).max():.3g}")
  assert got.shape == want.shape == (2, SIZE["num_classes"])
  assert rel <= RTOL, f"{what}: relative difference {rel:.3g} > {RTOL}"


@pytest.mark.slow
def test_our_files_and_theirs_give_the_same_logits_in_their_code(tmp_path):
  repo = their_checkout()
  built = models.build("adventurer", "Ti/8", chunk_size=8, flip_pattern="released", **SIZE)
  serving.export_student(perturbed(built), tmp_path / "export")
  torch_export.to_torch(tmp_path / "export", tmp_path / "ours.pth")
  hw = (SIZE["image_size"],) * 2
  images = np.random.default_rng(1).normal(size=(2, *hw, 3)).astype(np.float32)
  torch.save(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()), tmp_path / "images.pt")

  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  proc = subprocess.run(
    [sys.executable, "-c", THEIRS % SIZE, str(STANDINS), str(repo), str(tmp_path)],
    cwd=tmp_path,
    env=dict(env, PYTHONDONTWRITEBYTECODE="1"),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  theirs = lambda name: torch.load(tmp_path / name, weights_only=True).numpy()

  ours = logits(serving.load_student(tmp_path / "export"), images)
  assert_close(theirs("theirs_on_ours.pt"), ours, "ours -> theirs")

  loaded = convert.load(tmp_path / "theirs.pth", "adventurer", flip_pattern="released")
  assert loaded.cfg.depth == SIZE["depth"] and loaded.cfg.d_state == SIZE["d_state"]
  assert_close(logits(loaded, images), theirs("theirs_logits.pt"), "theirs -> ours")
