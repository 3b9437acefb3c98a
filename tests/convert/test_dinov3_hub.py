"""The `dinov3` reader against timm's DINOv3 (its Eva class), through the hub's own layout.

timm reads the hub's `.pth` files with `checkpoint_filter_fn` (renames, the qkv bias split
into q and v, buffers dropped); `hub_layout` inverts it, adding what the released files
carry that timm drops: the RoPE periods in bfloat16, each block's k-bias mask (and a k bias
it zeroes), the mask token. timm's own filter must give back the model's state dict, so the
file is the hub's layout as timm understands it; then ours must compute timm's function:
every block and the final tokens within 1e-4 (relative), at the model's size and another.
"""

import pytest

torch = pytest.importorskip("torch")
import torchvision_standin  # noqa: E402
from helpers import rel_err  # noqa: E402
from linearizer import convert, errors  # noqa: E402
from test_convert import forward, images_at, perturb_  # noqa: E402

(timm,) = torchvision_standin.import_with_standin("timm")
if timm is None:  # make test installs it (requirements-test-nodeps)
  pytest.skip("timm is not installed", allow_module_level=True)
from timm.models.eva import checkpoint_filter_fn  # noqa: E402

RTOL = 1e-4
SMALL = dict(embed_dim=64, depth=2, num_heads=2, pretrained=False, num_classes=0, img_size=32)
# (timm model, the hub file's qkv bias: None (7B-like), its own q / v parts, or zeros (what
# timm's bias-free S and S+ take the released files' all-zero biases for))
MODELS = [
  ("vit_small_patch16_dinov3", None),
  ("vit_small_patch16_dinov3_qkvb", "model"),
  ("vit_small_plus_patch16_dinov3", "zeros"),  # SwiGLU
]


def periods(head_dim, base=100.0):
  """The hub's RopePositionEmbedding periods, computed as it does in bfloat16 (the dtype
  of the released files' buffer)."""
  exponents = 2 * torch.arange(head_dim // 4, dtype=torch.bfloat16) / (head_dim // 2)
  return base**exponents


def hub_layout(model, bias):
  """timm's DINOv3 state dict in the hub's names: checkpoint_filter_fn inverted."""
  sd = model.state_dict()
  width, heads = sd["cls_token"].shape[-1], model.blocks[0].attn.num_heads
  gen = torch.Generator().manual_seed(1)
  hub = {
    "mask_token": torch.randn(1, width, generator=gen),
    "rope_embed.periods": periods(width // heads),
  }
  swiglu = "blocks.0.mlp.fc1_g.weight" in sd
  names = [("reg_token", "storage_tokens"), ("gamma_1", "ls1.gamma"), ("gamma_2", "ls2.gamma")]
  if swiglu:  # timm: w1 -> fc1_g, w2 -> fc1_x, w3 -> fc2
    names += [("mlp.fc1_g", "mlp.w1"), ("mlp.fc1_x", "mlp.w2"), ("mlp.fc2", "mlp.w3")]
  for name, value in sd.items():
    if name.endswith(("q_bias", "v_bias")):
      continue
    for timm_name, hub_name in names:
      name = name.replace(timm_name, hub_name)
    hub[name] = value.clone()
  for i, block in enumerate(model.blocks if bias else []):
    zeros = torch.zeros(width)
    q, v = (block.attn.q_bias, block.attn.v_bias) if bias == "model" else (zeros, zeros)
    # Masked, the k bias never trains off its zero init; random here, the mask must apply.
    k = torch.randn(width, generator=gen)
    hub[f"blocks.{i}.attn.qkv.bias"] = torch.cat([q.detach(), k, v.detach()])
    hub[f"blocks.{i}.attn.qkv.bias_mask"] = torch.cat(
      [torch.ones(width), torch.zeros(width), torch.ones(width)]
    )
  return hub


def timm_outputs(model, images):
  """timm's per-block outputs and final-norm tokens (NHWC in)."""
  blocks = []
  hooks = [b.register_forward_hook(lambda m, i, o: blocks.append(o)) for b in model.blocks]
  with torch.no_grad():
    tokens = model.forward_features(torch.from_numpy(images.transpose(0, 3, 1, 2)))
  for h in hooks:
    h.remove()
  return [b.numpy() for b in blocks], tokens.numpy()


@pytest.fixture(scope="module")
def qkvb(tmp_path_factory):
  """A perturbed qkv-bias DINOv3's hub state dict and the path it is saved at."""
  model = perturb_(timm.create_model("vit_small_patch16_dinov3_qkvb", **SMALL))
  hub = hub_layout(model, "model")
  path = tmp_path_factory.mktemp("dinov3") / "hub.pth"
  torch.save(hub, path)
  return hub, path


@pytest.mark.parametrize("name,bias", MODELS, ids=[m[0] for m in MODELS])
def test_hub_files_load_with_timms_outputs(name, bias, tmp_path):
  ref = perturb_(timm.create_model(name, **SMALL))
  hub = hub_layout(ref, bias)
  back = checkpoint_filter_fn(hub, ref)  # timm reads our hub file as the model it came from
  ref.load_state_dict(back, strict=True)
  assert all(torch.equal(back[k], v) for k, v in ref.state_dict().items())
  torch.save(hub, tmp_path / "hub.pth")
  ours = convert.load(tmp_path / "hub.pth", "dinov3", num_heads=2)
  errs = []
  for size in (32, 48):  # no position table: both take any size (timm: dynamic_img_size)
    images = images_at(size)
    blocks, tokens = timm_outputs(ref, images)
    out = forward(ours, images)
    assert len(out.blocks) == len(blocks)
    errs += [rel_err(a, b) for a, b in zip(out.blocks + (out.tokens,), blocks + [tokens])]
  assert max(errs) <= RTOL, errs


def test_a_teacher_checkpoint_loads_as_the_hub_file(qkvb, tmp_path):
  """The training run's `teacher` entry: `backbone.` prefix, DINO / iBOT heads beside it."""
  hub, path = qkvb
  teacher = {f"backbone.{k}": v for k, v in hub.items()}
  teacher["dino_head.last_layer.weight"] = torch.ones(8, 64)
  torch.save({"teacher": teacher}, tmp_path / "teacher.pth")
  a, b = (convert.load(p, "dinov3") for p in (path, tmp_path / "teacher.pth"))
  assert a.cfg == b.cfg and a.cfg.num_heads == 2  # from the periods: head dim 4 * 8
  images = images_at(32)
  assert rel_err(forward(a, images).tokens, forward(b, images).tokens) == 0


BROKEN = {  # what is changed in the file -> (error, the words it must name)
  "periods of another base": (
    lambda hub: hub.update({"rope_embed.periods": periods(32, 10000.0)}),
    errors.UserError,
    "rope_embed.periods",
  ),
  "a mask keeping the k bias": (
    lambda hub: hub["blocks.1.attn.qkv.bias_mask"].fill_(1),
    errors.UserError,
    "blocks.1.attn.qkv.bias_mask",
  ),
  "an unknown tensor (an untied CLS norm)": (
    lambda hub: hub.update({"cls_norm.weight": torch.ones(64)}),
    convert.CheckpointMismatch,
    "cls_norm.weight",
  ),
}


@pytest.mark.parametrize("change", BROKEN)
def test_a_file_computing_another_function_is_refused(change, qkvb, tmp_path):
  edit, error, words = BROKEN[change]
  hub = {k: v.clone() for k, v in qkvb[0].items()}
  edit(hub)
  torch.save(hub, tmp_path / "hub.pth")
  with pytest.raises(error, match=words):
    convert.load(tmp_path / "hub.pth", "dinov3")


def test_dinov2_and_dinov3_files_are_refused_by_the_others_reader(qkvb, tmp_path):
  with pytest.raises(errors.UserError, match="looks like DINOv3.*--format dinov3"):
    convert.load(qkvb[1], "dinov2", num_heads=2)
  # DINOv2's hub layout is timm's DINOv2 state dict and its mask token.
  v2 = timm.create_model("vit_small_patch14_dinov2", **{**SMALL, "img_size": 28}).state_dict()
  torch.save({**v2, "mask_token": torch.zeros(1, 64)}, tmp_path / "v2.pth")
  convert.load(tmp_path / "v2.pth", "dinov2", num_heads=2)  # the premise: a DINOv2 file
  with pytest.raises(errors.UserError, match="looks like DINOv2.*--format dinov2"):
    convert.load(tmp_path / "v2.pth", "dinov3", num_heads=2)
