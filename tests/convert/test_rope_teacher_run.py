"""Distilling from the RoPE teachers, as a user runs it: a random DINOv3- and a PE-shaped
teacher built by timm (width 32, depth 2, 2 heads, MLP 64, patch 4: a 4x4 grid at the
smoke's 16², where RoPE has positions to tell apart), converted to directories, distilled
by `main.py`; the student's AM loss falls, and the same weights without RoPE give the
distillation other targets (RoPE reaches it).
"""

import dataclasses
import json

import pytest
from flax import nnx

torch = pytest.importorskip("torch")
import helpers  # noqa: E402
import torchvision_standin  # noqa: E402
from linearizer import convert  # noqa: E402
from linearizer.models import saved  # noqa: E402
from test_convert import perturb_  # noqa: E402

(timm,) = torchvision_standin.import_with_standin("timm")
if timm is None:
  pytest.skip("timm is not installed", allow_module_level=True)

SHAPE = dict(embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, patch_size=4, img_size=16)
EXTRA = {  # PE's RoPE grid is its table's; its pooling head's MLP as wide as the blocks'
  "vit_pe_core_base_patch16_224": dict(ref_feat_shape=(4, 4), attn_pool_mlp_ratio=2.0),
  "vit_small_patch16_dinov3": {},
}


def teacher_dir(tmp_path, name, rope=True):
  """timm's model -> a .pth -> convert.load (as the convert CLI) -> a model directory."""
  # perturbed: timm's init (DINOv3's LayerScale 1e-5) leaves the blocks all but silent
  ref = perturb_(timm.create_model(name, pretrained=False, num_classes=0, **SHAPE, **EXTRA[name]))
  torch.save(ref.state_dict(), tmp_path / f"{name}.pth")
  model = convert.load(tmp_path / f"{name}.pth", "timm", arch=name, num_heads=2)
  if not rope:  # the same weights, RoPE switched off
    params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    params = {k: v.get_value() for k, v in params.items()}
    model = saved.from_params(dataclasses.replace(model.cfg, rope=None), params)
  out = tmp_path / f"{name}-{'rope' if rope else 'norope'}"
  saved.save(model, out)
  return out


def distill(tmp_path, teacher, tag):
  workdir = tmp_path / f"run-{tag}"
  helpers.run_main(
    workdir,
    f"--config.teacher.init={teacher}",
    "--config.stages=('distill',)",
    "--config.distill.steps=8",
  )
  rows = [json.loads(line) for line in open(workdir / "distill" / "metrics.jsonl")]
  am = [r["am"] for r in rows if "am" in r]
  cosines = json.load(open(workdir / "distill" / "teacher_cosines.json"))
  return am, cosines


@pytest.mark.parametrize("name", sorted(EXTRA))
def test_a_rope_teacher_distils(name, tmp_path):
  am, cosines = distill(tmp_path, teacher_dir(tmp_path, name), "rope")
  assert len(am) >= 3 and am[-1] < am[0], am
  if name == "vit_small_patch16_dinov3":
    _, unrotated = distill(tmp_path, teacher_dir(tmp_path, name, rope=False), "norope")
    assert unrotated["raw"] != cosines["raw"]  # other teacher targets
