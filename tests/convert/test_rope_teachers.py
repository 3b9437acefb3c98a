"""The RoPE teachers of timm's `Eva` class (Perception Encoder, EVA-02, DINOv3) against
timm's own forward, random weights: every block, the final tokens and the pooled feature
within 1e-4, at the model's grid and at a larger one (timm's `set_input_size`, or its
dynamic size for DINOv3). And the refusals that keep a file from loading as another
family: RoPE is not in the file, so the model's name decides it.
"""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import helpers  # noqa: E402
import torchvision_standin  # noqa: E402
from helpers import rel_err  # noqa: E402
from linearizer import convert, errors  # noqa: E402
from linearizer.models import rope  # noqa: E402
from test_convert import forward, images_at, perturb_  # noqa: E402
from test_peer_classes import timm_outputs  # noqa: E402

(timm,) = torchvision_standin.import_with_standin("timm")
if timm is None:
  pytest.skip("timm is not installed", allow_module_level=True)

RTOL = 1e-4
SMALL = dict(embed_dim=64, depth=2, num_heads=2, pretrained=False, patch_size=8)
# (timm model name, what sets it apart)
MODELS = [
  ("vit_pe_core_base_patch16_224", "PE core: RoPE offset 1 (xy) + table, MAP head of 8"),
  ("vit_pe_spatial_base_patch16_512", "PE spatial: no final norm"),
  ("vit_pe_lang_large_patch14_448", "PE lang: LayerScale, no final norm"),
  ("eva02_tiny_patch14_224", "EVA-02 Ti: fused GluMlp, q/v bias, fc_norm"),
  ("eva02_base_patch14_224", "EVA-02 B: q/k/v projections, SwiGLU with sub-LN"),
  ("eva02_base_patch16_clip_224", "EVA-02 CLIP: attention sub-LN, CLS pooled"),
  ("vit_small_patch16_dinov3", "DINOv3: RoPE only, 4 storage tokens, no qkv bias"),
  ("vit_small_patch16_dinov3_qkvb", "DINOv3 with q/v biases"),
  ("vit_small_plus_patch16_dinov3", "DINOv3 S+: SwiGLU"),
]


def save_as_hub(model, name, folder):
  """timm's Hub layout: model.safetensors and a config.json naming the architecture."""
  from safetensors.torch import save_file

  folder.mkdir(parents=True, exist_ok=True)
  save_file(
    {k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors"
  )
  cfg = {"architecture": name, "pretrained_cfg": {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]}}
  (folder / "config.json").write_text(json.dumps(cfg))
  return folder / "model.safetensors"


def build(name, num_classes=0):
  # Every PE model's RoPE grid is its table's (ref_feat_shape = img_size / patch): kept so
  # at this size; EVA-02's is 16 whatever the size, as timm defines them all.
  ref = dict(ref_feat_shape=(4, 4)) if name.startswith("vit_pe_") else {}
  model = timm.create_model(name, img_size=32, num_classes=num_classes, **SMALL, **ref)
  return perturb_(model)


@pytest.mark.parametrize("name,what", MODELS, ids=[m[0] for m in MODELS])
def test_eva_family_matches_timm(name, what, tmp_path):
  ref = build(name, num_classes=5)
  path = save_as_hub(ref, name, tmp_path / name)
  ours = convert.load(path, "timm", num_heads=2, image_size=32)
  assert ours.cfg.mean == (0.1, 0.2, 0.3) and ours.cfg.std == (0.4, 0.5, 0.6)
  for at in (32, 48):
    if at != 32 and not getattr(ref, "dynamic_img_size", False):
      ref.set_input_size(img_size=at)
    images = images_at(at)
    blocks, tokens, pooled = timm_outputs(ref, images)
    out = forward(ours, images)
    errs = [rel_err(a, b) for a, b in zip(out.blocks, blocks)]
    errs += [rel_err(out.tokens, tokens), rel_err(ours.pool(out), pooled)]
    assert max(errs) <= RTOL, (at, errs)
    with torch.no_grad():
      logits = ref(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
    assert rel_err(out.logits, logits) <= RTOL


def test_rope_reaches_the_tokens(tmp_path):
  """The same weights with RoPE off give other tokens: RoPE is not decorative here."""
  ref = build("vit_small_patch16_dinov3")
  path = save_as_hub(ref, "vit_small_patch16_dinov3", tmp_path / "d")
  ours = convert.load(path, "timm", num_heads=2)
  images = images_at(32)
  _, tokens, _ = timm_outputs(ref, images)
  assert rel_err(forward(ours, images).tokens, tokens) <= RTOL
  ref.rope = None  # timm's forward without its RoPE
  _, unrotated, _ = timm_outputs(ref, images)
  assert rel_err(unrotated, tokens) > 1e-3


def test_each_variant_rotates_as_written():
  """The tables by hand for a 2x3 grid, head dim 8 (n = 2 frequencies per axis)."""
  cos, sin = rope.tables("eva02", (2, 3), 8, rope_grid=None)
  f = np.array([1.0, 0.01])  # 10000 ** (-i / 2)
  row, col = 1, 2  # patch 5 in raster order
  want = np.repeat(np.concatenate([row * f, col * f]), 2)
  np.testing.assert_allclose(np.arccos(np.clip(cos[5], -1, 1)), want, rtol=1e-5, atol=1e-6)
  cos_pe, _ = rope.tables("pe", (2, 3), 8, offset=1.0)
  want_pe = np.repeat(np.concatenate([(col + 1) * f, (row + 1) * f]), 2)  # (col, row)
  np.testing.assert_allclose(np.arccos(np.clip(cos_pe[5], -1, 1)), want_pe, rtol=1e-5, atol=1e-6)
  _, sin_d = rope.tables("dinov3", (2, 3), 8)
  f3 = 2 * np.pi * np.array([1.0, 0.1])  # 100 ** (-i / 2)
  h, w = (row + 0.5) / 2 * 2 - 1, (col + 0.5) / 3 * 2 - 1
  angles = np.concatenate([h * f3, w * f3])
  np.testing.assert_allclose(sin_d[5], np.sin(np.tile(angles, 2)), atol=1e-6)
  assert sin.shape == (6, 8)


def test_the_cli_refuses_an_unnamed_file_in_one_line_and_writes_nothing(tmp_path):
  torch.save(build("vit_pe_core_base_patch16_224").state_dict(), tmp_path / "pe.pth")
  before = helpers.tree_digest(tmp_path)
  proc = helpers.run_cli(
    "linearizer.convert", "--format", "timm", "--input", tmp_path / "pe.pth",
    "--output", tmp_path / "out",
  )  # fmt: skip
  helpers.assert_clean_error(proc, "Perception Encoder", "--arch")
  assert helpers.tree_digest(tmp_path) == before and not (tmp_path / "out").exists()


def test_a_clip_tower_and_pe_are_told_apart_only_by_name(tmp_path):
  """PE core's tensors fit a timm CLIP tower's reading (they loaded as one, without RoPE,
  before): a bare file is refused naming both; its name, or config.json's, decides."""
  ref = build("vit_pe_core_base_patch16_224")
  torch.save(ref.state_dict(), tmp_path / "pe.pth")
  with pytest.raises(errors.UserError, match="fit both .*VisionTransformer.*Perception") as e:
    convert.load(tmp_path / "pe.pth", "timm", num_heads=2)
  assert "--arch" in str(e.value) and "\n" not in str(e.value)
  named = convert.load(tmp_path / "pe.pth", "timm", arch="vit_pe_core_base_patch16_224")
  assert named.cfg.rope == "pe" and named.cfg.rope_offset == 1.0
  as_clip = convert.load(tmp_path / "pe.pth", "timm", arch="vit_base_patch16_clip_224")
  assert as_clip.cfg.rope is None  # what the user asked for, by name
  with pytest.raises(errors.UserError, match="EVA-02.*tensors fit"):
    convert.load(tmp_path / "pe.pth", "timm", arch="eva02_base_patch14_224")


@pytest.mark.parametrize(
  "name", ["vit_small_patch16_dinov3", "eva02_tiny_patch14_224", "vit_pe_spatial_base_patch16_512"]
)
def test_new_families_are_refused_by_the_older_readers(name, tmp_path):
  """Each new family's timm file given to another reader (the hub readers of DINOv2 and
  DINOv3, OpenAI CLIP's, big_vision's) is refused, never loaded as that family."""
  torch.save(build(name).state_dict(), tmp_path / "m.pth")
  family = {"vit_small": "DINOv3", "eva02_tin": "EVA-02", "vit_pe_sp": "Perception Encoder"}
  for fmt in ("dinov2", "dinov3"):  # the hub readers name it and the format that reads it
    with pytest.raises(errors.UserError, match=f"timm's names for .*{family[name[:9]]}.*timm"):
      convert.load(tmp_path / "m.pth", fmt, num_heads=2)
  for fmt in ("openai_clip", "big_vision"):  # other layouts altogether
    with pytest.raises(errors.UserError, match="cannot"):
      convert.load(tmp_path / "m.pth", fmt, num_heads=2)


def test_an_extra_tensor_is_refused_for_every_family(tmp_path):
  for name in (
    "vit_pe_core_base_patch16_224",
    "eva02_base_patch14_224",
    "vit_small_patch16_dinov3",
  ):
    state = build(name).state_dict()
    state["blocks.0.attn.mystery"] = torch.zeros(3)
    torch.save(state, tmp_path / "m.pth")
    with pytest.raises(convert.CheckpointMismatch, match="unexpected: blocks.0.attn.mystery"):
      convert.load(tmp_path / "m.pth", "timm", arch=name, num_heads=2)


def test_a_detection_checkpoint_is_named(tmp_path):
  """EVA-02's detection backbone (baaivision/EVA det, detectron2's ViTDet layout: the ViT
  under backbone.net, window attention, a simple feature pyramid) is refused as such."""
  state = {
    "backbone.net.patch_embed.proj.weight": torch.zeros(64, 3, 16, 16),
    "backbone.net.blocks.0.attn.qkv.weight": torch.zeros(192, 64),
    "backbone.net.blocks.0.attn.rope_win.freqs_cos": torch.zeros(196, 32),
    "backbone.simfp_2.0.weight": torch.zeros(64, 32, 2, 2),
    "roi_heads.box_predictor.cls_score.weight": torch.zeros(81, 1024),
  }
  torch.save({"model": state, "iteration": 1}, tmp_path / "det.pth")
  with pytest.raises(errors.UserError, match="detection model .*EVA-02's detection backbone"):
    convert.load(tmp_path / "det.pth", "timm")


def test_unsupported_timm_families_are_named(tmp_path):
  ref = timm.create_model(
    "vit_betwixt_patch16_rope_reg4_gap_256", num_classes=0, img_size=32, **SMALL
  )
  torch.save(ref.state_dict(), tmp_path / "rope.pth")
  with pytest.raises(errors.UserError, match="timm's own RoPE ViTs"):
    convert.load(tmp_path / "rope.pth", "timm", num_heads=2)
  with pytest.raises(errors.UserError, match="arch.*format 'hf'"):
    convert.load(tmp_path / "rope.pth", "hf", arch="vit_pe_core_base_patch16_224")
