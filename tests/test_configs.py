"""The paper's setups (configs/imagenet.py) as the paper ran them (method.md §7)."""

import os
import subprocess
import sys

import pytest

from configs import imagenet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# method.md §7: every student from CLIP ViT-B/16, L also from CLIP ViT-L/14.
PAPER = {
  "clip_b16_to_S": ("B/16", "S/16"),
  "clip_b16_to_B": ("B/16", "B/16"),
  "clip_b16_to_L": ("B/16", "L/16"),
  "clip_l14_to_L": ("L/14", "L/16"),
}


@pytest.mark.parametrize("setup", sorted(PAPER))
def test_every_setup_has_the_papers_clip_teacher(setup):
  c = imagenet.get_config(f"setup={setup}")
  assert (c.teacher.variant, c.student.variant) == PAPER[setup]
  assert c.teacher.overrides.style == "clip"  # QuickGELU, eps 1e-5, ln_pre, CLIP statistics


def test_old_setup_names_name_their_successor():
  assert set(imagenet.SETUPS) == set(PAPER)
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
    [
      sys.executable,
      "main.py",
      "--config",
      "configs/imagenet.py:setup=b16_to_S",
      "--workdir",
      "/nonexistent/never-written",
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert proc.stderr.startswith("error: ") and "'clip_b16_to_S'" in proc.stderr
