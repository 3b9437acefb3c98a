"""The importers against the peers' own classes, built by those libraries with random
weights: `timm` against timm's VisionTransformer (ViT/DeiT, its CLIP tower, DINOv2 with
layer scale, with registers, and SigLIP: no CLS, attention-pool head), `openai_clip`
against open_clip's CLIP image tower. Every block, the final tokens and the pooled features
agree with theirs to float32 rounding, at the model's size and at another.

timm and open_clip are test extras installed without their dependencies (torchvision,
which has no build for this torch: see `torchvision_standin`).
"""

import pytest

torch = pytest.importorskip("torch")
import torchvision_standin  # noqa: E402
from helpers import rel_err  # noqa: E402
from linearizer import convert  # noqa: E402
from test_convert import forward, images_at, perturb_  # noqa: E402

timm, open_clip = torchvision_standin.import_with_standin("timm", "open_clip")
if timm is None or open_clip is None:  # make test installs them (requirements-test-nodeps)
  pytest.skip("timm and open_clip are not installed", allow_module_level=True)

RTOL = 1e-5
SMALL = dict(embed_dim=64, depth=2, num_heads=2, pretrained=False, num_classes=0)
# (timm model name, its image size here, our overrides timm's file cannot tell)
MODELS = [
  ("vit_tiny_patch16_224", 32, {}),
  ("deit_tiny_patch16_224", 32, {}),
  ("vit_base_patch16_clip_224", 32, {}),
  ("vit_small_patch14_dinov2", 56, {}),
  ("vit_small_patch14_reg4_dinov2", 56, {}),
  ("vit_base_patch16_siglip_224", 32, {}),
]


def timm_outputs(model, images):
  """timm's per-block outputs, final-norm tokens and pooled features (NHWC in)."""
  blocks = []
  hooks = [b.register_forward_hook(lambda m, i, o: blocks.append(o)) for b in model.blocks]
  with torch.no_grad():
    tokens = model.forward_features(torch.from_numpy(images.transpose(0, 3, 1, 2)))
    pooled = model.forward_head(tokens, pre_logits=True)
  for h in hooks:
    h.remove()
  return [b.numpy() for b in blocks], tokens.numpy(), pooled.numpy()


@pytest.mark.parametrize("name,size,overrides", MODELS, ids=[m[0] for m in MODELS])
def test_timm_models_load_with_their_outputs(name, size, overrides, tmp_path):
  ref = perturb_(timm.create_model(name, img_size=size, **SMALL))
  path = tmp_path / "model.pth"
  torch.save(ref.state_dict(), path)
  for at in (size, size + ref.patch_embed.patch_size[0]):  # its size, then a larger grid
    # a bare timm file is named (arch): a CLIP tower's tensors fit Perception Encoder's too
    ours = convert.load(path, "timm", arch=name, num_heads=2, image_size=size, **overrides)
    if at != size:
      ref.set_input_size(img_size=at)
    images = images_at(at)
    blocks, tokens, pooled = timm_outputs(ref, images)
    out = forward(ours, images)
    assert len(out.blocks) == len(blocks)
    for mine, theirs in zip(out.blocks, blocks):
      assert rel_err(mine, theirs) <= RTOL
    assert rel_err(out.tokens, tokens) <= RTOL
    assert rel_err(ours.pool(out), pooled) <= RTOL


def test_open_clip_image_tower_loads_with_its_outputs(tmp_path):
  """A whole open_clip CLIP (its text tower too, as its checkpoints hold) read by the
  OpenAI CLIP reader; open_clip's non-QuickGELU models run exact GELU (activation='gelu')."""
  vision = dict(layers=2, width=64, head_width=32, patch_size=16, image_size=32)
  text = dict(context_length=8, vocab_size=64, width=32, heads=2, layers=1)
  ref = perturb_(open_clip.model.CLIP(embed_dim=24, vision_cfg=vision, text_cfg=text))
  path = tmp_path / "open_clip.pth"
  torch.save(ref.state_dict(), path)
  ours = convert.load(path, "openai_clip", activation="gelu", num_heads=2)
  visual, images = ref.visual, images_at(32)
  blocks = []
  hooks = [
    b.register_forward_hook(lambda m, i, o: blocks.append(o)) for b in visual.transformer.resblocks
  ]
  with torch.no_grad():
    embedding = visual(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
    tokens = visual.ln_post(blocks[-1]).numpy()
  for h in hooks:
    h.remove()
  out = forward(ours, images)
  for mine, theirs in zip(out.blocks, blocks):
    assert rel_err(mine, theirs.numpy()) <= RTOL
  assert rel_err(out.tokens, tokens) <= RTOL
  assert rel_err(out.logits, embedding) <= RTOL  # the projection `proj` is our head
