"""Tests of weight import (linearizer.convert) and saved models (linearizer.models.saved).

Tiny random models, float32. References: `transformers` CLIPVisionModel / CLIPModel / ViTModel
/ ViTForImageClassification run in torch. The other formats are written from the same
weights by renaming functions below (the naming of OpenAI CLIP, timm, big_vision and
Adventurer), so each must load to the same model as the hf one.

Tolerances:
  ours vs transformers:       max |ours - ref| <= 1e-4 * max |ref|, every block and final tokens
  same weights, other format: max |a - b| <= 1e-6 * max |b| (same computation, same params)
"""

import argparse
import json
import shutil
import subprocess
import sys
import typing

import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file, save_file  # noqa: E402

import helpers  # noqa: E402
from helpers import ROOT, random_model, rel_err  # noqa: E402
from linearizer import convert, errors, models  # noqa: E402
from linearizer.models import saved  # noqa: E402

RTOL, SAME_RTOL = 1e-4, 1e-6
WIDTH, DEPTH, HEADS, MLP, PATCH, SIZE = 64, 2, 4, 128, 8, 32


# One compiled program per architecture: much faster on CPU than op-by-op execution.
forward = nnx.jit(lambda model, images: model(images))


def assert_same_outputs(a, b, images, rtol=SAME_RTOL, logits=True):
  out_a, out_b = forward(a, images), forward(b, images)
  for x, y in zip(out_a.blocks + (out_a.tokens,), out_b.blocks + (out_b.tokens,)):
    assert rel_err(x, y) <= rtol
  if not logits:
    return
  assert (out_a.logits is None) == (out_b.logits is None)
  if out_a.logits is not None:
    assert rel_err(out_a.logits, out_b.logits) <= rtol


def perturb_(torch_model, seed=0):
  """Random weights everywhere, LayerNorms included (their init of 1/0 hides mapping bugs)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in torch_model.parameters():
      p.add_(0.1 * torch.randn(p.shape, generator=gen))
  return torch_model.eval()


def images_at(size, seed=0):
  return np.random.default_rng(seed).standard_normal((2, size, size, 3)).astype(np.float32)


def torch_run(hf, images, **kwargs):
  with torch.no_grad():
    return hf(
      pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)),
      output_hidden_states=True,
      **kwargs,
    )


def final_tokens(kind, hf, out):
  """transformers' final-norm tokens at every position (CLIP itself norms only the CLS)."""
  if kind == "vit":
    return out.last_hidden_state.numpy()
  norm = {
    "clip_vision": lambda: hf.post_layernorm,
    "clip": lambda: hf.vision_model.post_layernorm,
    "vit_cls": lambda: hf.vit.layernorm,
  }[kind]()
  with torch.no_grad():
    return norm(out.hidden_states[-1]).numpy()


def build_hf(kind):
  common = dict(
    hidden_size=WIDTH,
    intermediate_size=MLP,
    num_hidden_layers=DEPTH,
    num_attention_heads=HEADS,
    image_size=SIZE,
    patch_size=PATCH,
  )
  if kind == "clip_vision":
    return perturb_(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**common)))
  if kind == "clip":
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    cfg = transformers.CLIPConfig(vision_config=common, text_config=text, projection_dim=16)
    return perturb_(transformers.CLIPModel(cfg))
  cfg = transformers.ViTConfig(**common, num_labels=5)
  if kind == "vit":
    return perturb_(transformers.ViTModel(cfg, add_pooling_layer=False))
  return perturb_(transformers.ViTForImageClassification(cfg))


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  """{kind: (torch model, saved transformers folder)}."""
  root = tmp_path_factory.mktemp("hf")
  out = {}
  for kind in ("clip_vision", "clip", "vit", "vit_cls"):
    hf = build_hf(kind)
    hf.save_pretrained(root / kind)
    out[kind] = hf, root / kind
  return out


def hf_state(hf_dirs, kind):
  """The tensors as saved (transformers 5 renames some in memory but saves the Hub names)."""
  return load_file(hf_dirs[kind][1] / "model.safetensors")


# ------------------------------------------------------------------------------ hf parity
@pytest.mark.parametrize("kind", ["clip_vision", "clip", "vit", "vit_cls"])
def test_hf_matches_transformers(hf_dirs, kind):
  hf, folder = hf_dirs[kind]
  model = convert.load(folder, "hf")
  images = images_at(SIZE)
  ref = torch_run(hf.vision_model if kind == "clip" else hf, images)
  ours = forward(model, images)
  assert len(ours.blocks) == DEPTH
  for i, block in enumerate(ours.blocks):
    assert rel_err(block, ref.hidden_states[i + 1].numpy()) <= RTOL, f"block {i}"
  assert rel_err(ours.tokens, final_tokens(kind, hf, ref)) <= RTOL
  if kind == "clip":  # CLIP's image embedding is our bias-free head on the final-norm CLS
    with torch.no_grad():
      embeds = hf.get_image_features(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)))
    embeds = getattr(embeds, "pooler_output", embeds)  # a tensor or an output, by version
    assert model.cfg.num_classes == 16 and not model.cfg.head_bias
    assert rel_err(ours.logits, embeds.numpy()) <= RTOL
  elif kind == "vit_cls":
    assert rel_err(ours.logits, ref.logits.numpy()) <= RTOL
  else:
    assert ours.logits is None
  if kind.startswith("vit"):
    assert model.cfg.layer_norm_eps == 1e-12  # transformers' ViT eps, not timm's 1e-6


@pytest.mark.parametrize("kind", ["clip_vision", "vit"])
def test_resampled_position_embedding_matches_transformers(hf_dirs, kind):
  hf, folder = hf_dirs[kind]
  model = convert.load(folder, "hf")  # built at 32, run at 48: resampled at run time
  images = images_at(48, seed=1)
  ref = torch_run(hf, images, interpolate_pos_encoding=True)
  ours = forward(model, images)
  for i, block in enumerate(ours.blocks):
    assert rel_err(block, ref.hidden_states[i + 1].numpy()) <= RTOL, f"block {i}"
  resized = convert.load(folder, "hf", image_size=48)  # resampled once, at load time
  assert resized.pos_embed[...].shape == (1, 37, WIDTH)
  assert_same_outputs(resized, model, images)


def test_hf_bare_bfloat16_safetensors(hf_dirs, tmp_path):
  """A bare weights file, no config.json: heads come from the override; bf16 is widened."""
  state = {k: v.astype(np.float32) for k, v in hf_state(hf_dirs, "clip_vision").items()}
  import ml_dtypes

  save_file({k: v.astype(ml_dtypes.bfloat16) for k, v in state.items()}, tmp_path / "w.safetensors")
  model = convert.load(tmp_path / "w.safetensors", "hf", num_heads=HEADS)
  assert model.cfg.num_heads == HEADS and model.cfg.style == "clip"
  got = np.asarray(model.blocks[0].fc1.kernel[...])
  want = state["encoder.layers.0.mlp.fc1.weight"].astype(ml_dtypes.bfloat16).astype(np.float32).T
  np.testing.assert_array_equal(got, want)


# ------------------------------------------------------------- other formats, same weights
def hf_clip_to_openai(sd, proj):
  """transformers CLIPVisionModel names -> OpenAI CLIP's `visual.*` (plus a text-tower key)."""
  out = {
    "visual.conv1.weight": sd["embeddings.patch_embedding.weight"],
    "visual.class_embedding": sd["embeddings.class_embedding"],
    "visual.positional_embedding": sd["embeddings.position_embedding.weight"],
    "visual.proj": proj,
    "token_embedding.weight": np.zeros((10, 8), np.float32),
    "logit_scale": np.float32(4.6),
  }
  for theirs, ours in [("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")]:
    for x in ("weight", "bias"):
      out[f"visual.{theirs}.{x}"] = sd[f"{ours}.{x}"]
  for i in range(DEPTH):
    h, o = f"encoder.layers.{i}.", f"visual.transformer.resblocks.{i}."
    for x in ("weight", "bias"):
      out[o + f"attn.in_proj_{x}"] = np.concatenate(
        [sd[h + f"self_attn.{p}_proj.{x}"] for p in "qkv"]
      )
      for theirs, ours in [
        ("attn.out_proj", "self_attn.out_proj"),
        ("ln_1", "layer_norm1"),
        ("ln_2", "layer_norm2"),
        ("mlp.c_fc", "mlp.fc1"),
        ("mlp.c_proj", "mlp.fc2"),
      ]:
        out[o + f"{theirs}.{x}"] = sd[h + f"{ours}.{x}"]
  return out


def hf_to_timm(sd, clip):
  """transformers CLIPVisionModel / ViTModel names -> timm's VisionTransformer names."""
  e = "embeddings."
  if clip:  # timm's CLIP towers: norm_pre, no patch bias
    out = {
      "patch_embed.proj.weight": sd[e + "patch_embedding.weight"],
      "cls_token": sd[e + "class_embedding"][None, None],
      "pos_embed": sd[e + "position_embedding.weight"][None],
    }
    layer, qkv = "encoder.layers.{i}.", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    names = [
      ("norm_pre", "pre_layrnorm"),
      ("norm", "post_layernorm"),
      ("blocks.{i}.norm1", layer + "layer_norm1"),
      ("blocks.{i}.attn.proj", layer + "self_attn.out_proj"),
      ("blocks.{i}.norm2", layer + "layer_norm2"),
      ("blocks.{i}.mlp.fc1", layer + "mlp.fc1"),
      ("blocks.{i}.mlp.fc2", layer + "mlp.fc2"),
    ]
  else:
    out = {
      "patch_embed.proj.weight": sd[e + "patch_embeddings.projection.weight"],
      "patch_embed.proj.bias": sd[e + "patch_embeddings.projection.bias"],
      "cls_token": sd[e + "cls_token"],
      "pos_embed": sd[e + "position_embeddings"],
    }
    layer = "encoder.layer.{i}."
    qkv = tuple(f"attention.attention.{p}" for p in ("query", "key", "value"))
    names = [
      ("norm", "layernorm"),
      ("blocks.{i}.norm1", layer + "layernorm_before"),
      ("blocks.{i}.attn.proj", layer + "attention.output.dense"),
      ("blocks.{i}.norm2", layer + "layernorm_after"),
      ("blocks.{i}.mlp.fc1", layer + "intermediate.dense"),
      ("blocks.{i}.mlp.fc2", layer + "output.dense"),
    ]
  for i in range(DEPTH):
    for x in ("weight", "bias"):
      out[f"blocks.{i}.attn.qkv.{x}"] = np.concatenate(
        [sd[layer.format(i=i) + f"{p}.{x}"] for p in qkv]
      )
      for theirs, ours in names:
        out[f"{theirs}.{x}".format(i=i)] = sd[f"{ours}.{x}".format(i=i)]
  return out


def hf_vit_to_big_vision(sd, numbering, scanned, cls_pos=True):
  """transformers ViTModel names -> big_vision / original-ViT `.npz` names (flax layouts)."""
  attn, ln2, mlp = (
    ("MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3")
    if numbering == "original"
    else ("MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0")
  )
  hd = WIDTH // HEADS
  e = "embeddings."
  pos = sd[e + "position_embeddings"]
  out = {
    "embedding/kernel": sd[e + "patch_embeddings.projection.weight"].transpose(2, 3, 1, 0),
    "embedding/bias": sd[e + "patch_embeddings.projection.bias"],
    "cls": sd[e + "cls_token"],
    "Transformer/encoder_norm/scale": sd["layernorm.weight"],
    "Transformer/encoder_norm/bias": sd["layernorm.bias"],
  }
  if cls_pos:
    out["Transformer/posembed_input/pos_embedding"] = pos
  else:  # big_vision proper: no position for CLS
    out["pos_embedding"] = pos[:, 1:]
  blocks = []
  for i in range(DEPTH):
    h = f"encoder.layer.{i}."
    b = {
      "LayerNorm_0/scale": sd[h + "layernorm_before.weight"],
      "LayerNorm_0/bias": sd[h + "layernorm_before.bias"],
      f"{ln2}/scale": sd[h + "layernorm_after.weight"],
      f"{ln2}/bias": sd[h + "layernorm_after.bias"],
      f"{attn}/out/kernel": sd[h + "attention.output.dense.weight"].T.reshape(HEADS, hd, WIDTH),
      f"{attn}/out/bias": sd[h + "attention.output.dense.bias"],
      f"{mlp}/Dense_0/kernel": sd[h + "intermediate.dense.weight"].T,
      f"{mlp}/Dense_0/bias": sd[h + "intermediate.dense.bias"],
      f"{mlp}/Dense_1/kernel": sd[h + "output.dense.weight"].T,
      f"{mlp}/Dense_1/bias": sd[h + "output.dense.bias"],
    }
    for p in ("query", "key", "value"):
      w = sd[h + f"attention.attention.{p}.weight"]
      b[f"{attn}/{p}/kernel"] = w.T.reshape(WIDTH, HEADS, hd)
      b[f"{attn}/{p}/bias"] = sd[h + f"attention.attention.{p}.bias"].reshape(HEADS, hd)
    blocks.append(b)
  if scanned:
    for k in blocks[0]:
      out[f"Transformer/encoderblock/{k}"] = np.stack([b[k] for b in blocks])
  else:
    for i, b in enumerate(blocks):
      out.update({f"Transformer/encoderblock_{i}/{k}": v for k, v in b.items()})
  return out


def test_openai_clip(hf_dirs, tmp_path):
  ref = convert.load(hf_dirs["clip_vision"][1], "hf")
  proj = np.random.default_rng(0).standard_normal((WIDTH, 16)).astype(np.float32)
  sd = hf_clip_to_openai(hf_state(hf_dirs, "clip_vision"), proj)
  torch.save({k: torch.tensor(v) for k, v in sd.items()}, tmp_path / "ViT-T-8.pt")
  model = convert.load(tmp_path / "ViT-T-8.pt", "openai_clip", num_heads=HEADS)
  images = images_at(SIZE)
  out = forward(model, images)
  assert_same_outputs(model, ref, images, logits=False)
  assert not model.cfg.head_bias  # CLIP's image embedding = final-norm CLS @ proj
  np.testing.assert_allclose(out.logits, np.asarray(out.tokens[:, 0]) @ proj, rtol=1e-5, atol=1e-5)
  dropped = convert.load(tmp_path / "ViT-T-8.pt", "openai_clip", num_heads=HEADS, num_classes=0)
  assert dropped.head is None


def scripted(state_dict):
  """A TorchScript module holding `state_dict` under the same dotted names (as OpenAI's
  released CLIP `.pt` archives hold theirs)."""

  class Holder(torch.nn.Module):
    def forward(self, x):
      return x

  root = Holder()
  for name, value in state_dict.items():
    *path, leaf = name.split(".")
    module = root
    for part in path:
      if not hasattr(module, part):
        module.add_module(part, torch.nn.Module())
      module = getattr(module, part)
    module.register_parameter(leaf, torch.nn.Parameter(torch.tensor(value), requires_grad=False))
  return torch.jit.script(root)


def test_openai_clip_torchscript_archive_is_read_without_running_it(hf_dirs, tmp_path, capfd):
  """OpenAI's `.pt` files are TorchScript archives: their tensors are read from the archive
  (bitwise what torch.jit.load gives), and code in the file never runs: a module whose
  __setstate__ prints does print under torch.jit.load, and not here."""
  sd = hf_clip_to_openai(hf_state(hf_dirs, "clip_vision"), np.ones((WIDTH, 16), np.float32))
  scripted(sd).save(str(tmp_path / "ViT-T-8.pt"))
  tensors = convert.read_tensors(tmp_path / "ViT-T-8.pt")
  assert set(tensors) == set(sd)
  for name, value in torch.jit.load(str(tmp_path / "ViT-T-8.pt")).state_dict().items():
    np.testing.assert_array_equal(tensors[name], value.numpy())
  ref = convert.load(hf_dirs["clip_vision"][1], "hf")
  model = convert.load(tmp_path / "ViT-T-8.pt", "openai_clip", num_heads=HEADS)
  assert_same_outputs(model, ref, images_at(SIZE), logits=False)

  class Loud(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.w = torch.nn.Parameter(torch.ones(2))

    def forward(self, x):
      return x

    @torch.jit.export
    def __getstate__(self):
      return (self.w, self.training)

    @torch.jit.export
    def __setstate__(self, state: typing.Tuple[torch.Tensor, bool]):
      print("code from the file ran")
      self.w = state[0]
      self.training = state[1]

  torch.jit.script(Loud()).save(str(tmp_path / "loud.pt"))
  torch.jit.load(str(tmp_path / "loud.pt"))
  assert "code from the file ran" in capfd.readouterr().out  # the premise
  with pytest.raises(errors.UserError, match="hold no tensors"):  # its state: a tuple
    convert.load(tmp_path / "loud.pt", "openai_clip")
  assert "code from the file ran" not in capfd.readouterr().out


@pytest.mark.parametrize("kind,suffix", [("clip_vision", ".safetensors"), ("vit", ".pth")])
def test_timm(hf_dirs, tmp_path, kind, suffix):
  ref = convert.load(hf_dirs[kind][1], "hf")
  sd = hf_to_timm(hf_state(hf_dirs, kind), clip=kind == "clip_vision")
  path = tmp_path / f"vit{suffix}"
  if suffix == ".safetensors":
    save_file(sd, path)
  else:  # timm training checkpoints wrap the weights in `state_dict` beside their args
    torch.save(
      {
        "state_dict": {k: torch.tensor(v) for k, v in sd.items()},
        "epoch": 3,
        "args": argparse.Namespace(model="vit"),
      },
      path,
    )
  # HF ViT's eps, not timm's; HF CLIP's QuickGELU (a *_clip_quickgelu_* model in timm's terms)
  # (a CLIP tower's tensors fit Perception Encoder's too: a bare file names its model)
  clip = {"activation": "quick_gelu", "arch": "vit_base_patch16_clip_224"}
  extra = clip if kind == "clip_vision" else {"layer_norm_eps": 1e-12}
  model = convert.load(path, "timm", num_heads=HEADS, **extra)
  assert model.cfg.style == ("clip" if kind == "clip_vision" else "timm")
  if kind == "clip_vision":  # timm's own CLIP towers run exact GELU: the default, a guess
    guessed = convert.load(path, "timm", num_heads=HEADS, arch="vit")
    assert guessed.cfg.activation == "gelu"
  assert_same_outputs(model, ref, images_at(SIZE))


@pytest.mark.parametrize("numbering", ["original", "big_vision"])
@pytest.mark.parametrize("scanned", [False, True])
def test_big_vision(hf_dirs, tmp_path, numbering, scanned):
  ref = convert.load(hf_dirs["vit"][1], "hf")
  sd = hf_state(hf_dirs, "vit")
  np.savez(tmp_path / "vit.npz", **hf_vit_to_big_vision(sd, numbering, scanned))
  # big_vision's MLP runs flax's tanh-approximate GELU; the HF reference runs the exact one.
  assert convert.load(tmp_path / "vit.npz", "big_vision").cfg.activation == "gelu_tanh"
  model = convert.load(tmp_path / "vit.npz", "big_vision", layer_norm_eps=1e-12, activation="gelu")
  assert model.cfg.num_heads == HEADS  # read off the q kernel
  assert_same_outputs(model, ref, images_at(SIZE))
  if numbering == "original" and not scanned:
    via_timm = convert.load(tmp_path / "vit.npz", "timm", layer_norm_eps=1e-12)  # timm's npz
    assert via_timm.cfg.activation == "gelu"  # timm runs these weights with exact GELU
    assert_same_outputs(via_timm, ref, images_at(SIZE))
    np.savez(tmp_path / "nocls.npz", **hf_vit_to_big_vision(sd, numbering, scanned, cls_pos=False))
    pos = convert.load(tmp_path / "nocls.npz", "big_vision").pos_embed[...]
    np.testing.assert_array_equal(pos[0, 0], 0)  # CLS gets no position in big_vision
    np.testing.assert_array_equal(pos[0, 1:], sd["embeddings.position_embeddings"][0, 1:])


# -------------------------------------------------------------------------------- adventurer
ADV = dict(width=64, depth=4, patch=PATCH, image_size=SIZE, num_classes=5, flip_pattern="released")


def random_adventurer(seed):
  """One of our Adventurers with random values in every parameter, norms and D included.

  Filled from numpy rather than by the model's init, which compiles for tens of seconds on
  a small CPU.
  """
  return random_model(models.AdventurerConfig(**ADV), seed)


def adventurer_to_torch(model):
  """Our Adventurer -> its released torch state-dict names (method.md §5), without mask_token."""
  p = {
    ".".join(map(str, k)): np.asarray(v.get_value())
    for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
  }
  sd = {
    "patch_embed.proj.weight": p["patch_embed.kernel"].transpose(3, 2, 0, 1),
    "patch_embed.proj.bias": p["patch_embed.bias"],
    "cls_token": p["cls_token"],
    "pos_embed": p["pos_embed"],
    "norm_f.weight": p["norm_f.scale"],
    "head.weight": p["head.kernel"].T,
    "head.bias": p["head.bias"],
  }
  for i in range(model.cfg.depth):
    o, m = f"layers.{i}.", f"layers.{i}.mixer."
    sd.update(
      {
        o + "norm.weight": p[o + "norm.scale"],
        o + "norm_mlp.weight": p[o + "norm_mlp.scale"],
        m + "in_proj.weight": p[m + "in_proj.kernel"].T,
        m + "conv1d.weight": p[m + "conv_weight"].T[:, None, :],
        m + "conv1d.bias": p[m + "conv_bias"],
        m + "dt_bias": p[m + "dt_bias"],
        m + "A_log": p[m + "A_log"],
        m + "D": p[m + "D"],
        m + "norm.weight": p[m + "norm_weight"],
        m + "out_proj.weight": p[m + "out_proj.kernel"].T,
      }
    )
    for w in ("w1", "w2", "w3"):
      sd[o + f"mlp.{w}.weight"] = p[o + f"mlp.{w}.kernel"].T
      sd[o + f"mlp.{w}.bias"] = p[o + f"mlp.{w}.bias"]
  return {k: torch.tensor(v) for k, v in sd.items()}


def test_adventurer(tmp_path, capsys):
  model, ema = random_adventurer(0), random_adventurer(1)
  torch.save(
    {
      "model": adventurer_to_torch(model),
      "model_ema": adventurer_to_torch(ema),
      "epoch": 299,
      "args": argparse.Namespace(model="adventurer_tiny"),
    },
    tmp_path / "ckpt.pth",
  )
  torch.save(adventurer_to_torch(model), tmp_path / "bare.pth")
  images = images_at(SIZE)
  capsys.readouterr()
  loaded = convert.load(tmp_path / "ckpt.pth", "adventurer")
  assert loaded.cfg == model.cfg  # width, depth, grid, classes, d_state, headdim, mlp_ratio, flip
  warning = capsys.readouterr().out  # which pattern trained a file is unknown: say so
  assert "flip_pattern='released' is a guess" in warning and "'pairs'" in warning
  assert_same_outputs(loaded, model, images)
  assert_same_outputs(convert.load(tmp_path / "ckpt.pth", "adventurer", use_ema=True), ema, images)
  assert_same_outputs(convert.load(tmp_path / "bare.pth", "adventurer"), model, images)
  capsys.readouterr()
  assert (
    convert.load(tmp_path / "bare.pth", "adventurer", flip_pattern="alternate").cfg.flip_pattern
    == "alternate"
  )
  assert "is a guess" not in capsys.readouterr().out  # chosen: no warning
  # The CLI records the chosen pattern in model.json.
  convert.main(
    ["--format", "adventurer", "--input", str(tmp_path / "bare.pth")]
    + ["--output", str(tmp_path / "pairs"), "--flip_pattern", "pairs"]
  )
  assert "flip pairs" in capsys.readouterr().out
  meta = json.loads((tmp_path / "pairs" / "model.json").read_text())
  assert meta["config"]["flip_pattern"] == "pairs"
  with pytest.raises(ValueError, match="model_ema"):
    convert.load(tmp_path / "bare.pth", "adventurer", use_ema=True)
  # A new image size resamples the patch slots of the position embedding; CLS (last) is kept.
  pos = convert.load(tmp_path / "bare.pth", "adventurer", image_size=48).pos_embed[...]
  want = models.resample_pos_embed(model.pos_embed[...], (4, 4), (6, 6), cls_at="last")
  np.testing.assert_allclose(pos, want, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(pos[:, -1], model.pos_embed[...][:, -1])


# -------------------------------------------------------------------------------- errors
def _files_of_every_reader(hf_dirs, root):
  """{format: a valid file of it} for the readers whose parity tests live in this file."""
  vit, clip = hf_state(hf_dirs, "vit"), hf_state(hf_dirs, "clip_vision")
  proj = np.zeros((WIDTH, 16), np.float32)
  files = {"openai_clip": hf_clip_to_openai(clip, proj), "timm": hf_to_timm(vit, clip=False)}
  files["big_vision"] = hf_vit_to_big_vision(vit, "big_vision", scanned=False)
  files["adventurer"] = adventurer_to_torch(random_adventurer(0))
  paths = {}
  for fmt, sd in files.items():
    if fmt == "big_vision":
      np.savez(root / "bv.npz", **sd)
      paths[fmt] = root / "bv.npz"
    else:
      paths[fmt] = root / f"{fmt}.pth"
      torch.save({k: torch.as_tensor(np.asarray(v)) for k, v in sd.items()}, paths[fmt])
  return paths


def test_every_reader_refuses_a_tensor_it_does_not_know(hf_dirs, tmp_path):
  """An unmapped tensor is never dropped silently, whichever reader meets it (the RoPE
  readers' files: tests/convert/test_rope_teachers.py, test_hf_rope_teachers.py,
  test_dinov3_hub.py; DINOv2's hub file: test_teachers.py)."""
  for fmt, path in _files_of_every_reader(hf_dirs, tmp_path).items():
    heads = {} if fmt == "adventurer" else {"num_heads": HEADS}
    convert.load(path, fmt, **heads)  # loads as it is
    # beside a tensor the reader maps (outside it, openai_clip's text tower is not its own)
    if fmt == "big_vision":
      with np.load(path) as z:
        sd = {k: z[k] for k in z.files}
      sd[sorted(sd)[-1].rsplit("/", 1)[0] + "/mystery"] = np.zeros(3, np.float32)
      np.savez(path, **sd)
    else:
      sd = torch.load(path)
      sd[sorted(sd)[-1].rsplit(".", 1)[0] + ".mystery"] = torch.zeros(3)
      torch.save(sd, path)
    with pytest.raises(convert.CheckpointMismatch, match="1 unexpected: .*mystery"):
      convert.load(path, fmt, **heads)


def test_mismatched_file_raises_one_error(hf_dirs, tmp_path):
  sd = hf_state(hf_dirs, "clip_vision")
  del sd["encoder.layers.1.mlp.fc2.bias"]
  sd["encoder.layers.0.bogus.weight"] = np.zeros((3, 5), np.float32)
  sd["encoder.layers.1.mlp.fc1.weight"] = sd["encoder.layers.1.mlp.fc1.weight"].reshape(WIDTH, MLP)
  save_file(sd, tmp_path / "model.safetensors")
  shutil.copy(hf_dirs["clip_vision"][1] / "config.json", tmp_path)
  model = None
  with pytest.raises(convert.CheckpointMismatch) as err:
    model = convert.load(tmp_path, "hf")
  message = str(err.value)
  assert model is None and isinstance(err.value, ValueError)
  assert str(tmp_path) in message and "'hf'" in message
  assert "1 missing: encoder.layers.1.mlp.fc2.bias (64)" in message
  assert "1 unexpected: encoder.layers.0.bogus.weight (3, 5)" in message
  assert "encoder.layers.1.mlp.fc1.weight: expected (128, 64), found (64, 128)" in message


def test_truncated_and_integer_weight_files(hf_dirs, tmp_path):
  """A truncated .safetensors and integer-typed weights: one clear error each (a traceback
  and a silently converted float model before)."""
  folder = tmp_path / "cut"
  shutil.copytree(hf_dirs["vit"][1], folder)
  weights = folder / "model.safetensors"
  weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
  with pytest.raises(errors.UserError, match="not a readable .safetensors"):
    convert.load(folder, "hf")
  sd = hf_state(hf_dirs, "vit")
  sd["encoder.layer.0.output.dense.weight"] = sd["encoder.layer.0.output.dense.weight"].astype(
    np.int32
  )
  save_file(sd, tmp_path / "model.safetensors")
  shutil.copy(hf_dirs["vit"][1] / "config.json", tmp_path)
  with pytest.raises(convert.CheckpointMismatch, match="dtype int32, expected floating-point"):
    convert.load(tmp_path, "hf")


def test_bad_format_path_and_override(hf_dirs, tmp_path):
  with pytest.raises(ValueError, match="big_vision"):
    convert.load(hf_dirs["vit"][1], "keras")
  with pytest.raises(FileNotFoundError, match="nope"):
    convert.load(tmp_path / "nope", "hf")
  with pytest.raises(ValueError, match="num_head"):
    convert.load(hf_dirs["vit"][1], "hf", num_head=3)


def test_readers_are_the_single_registry(tmp_path, capsys):
  """FORMATS, load and the CLI's --format all come from the one READERS table."""
  assert convert.FORMATS == tuple(convert.READERS)
  assert set(convert.OPTIONS) <= set(convert.READERS)
  for fmt in convert.FORMATS:
    assert callable(convert.READERS[fmt]), fmt
  with pytest.raises(errors.UserError) as err:
    convert.load(tmp_path, "keras")
  assert "keras" in str(err.value)
  assert all(repr(fmt) in str(err.value) for fmt in convert.FORMATS)
  with pytest.raises(SystemExit) as exit_:  # argparse's own usage error: also 2
    convert.main(["--format", "keras", "--input", str(tmp_path), "--output", str(tmp_path)])
  assert exit_.value.code == 2 and "keras" in capsys.readouterr().err


def test_run_time_overrides_apply_and_contradictions_are_refused(hf_dirs, tmp_path):
  """Run-time fields change how a loaded model runs; fields the file determines are refused
  when they contradict it (all in one message); hints the file cannot tell are taken."""
  folder = hf_dirs["vit_cls"][1]
  ref = convert.load(folder, "hf")
  fast = convert.load(folder, "hf", dtype="bfloat16", attention_impl="xla", drop_path=0.1)
  assert (fast.cfg.dtype, fast.cfg.attention_impl, fast.cfg.drop_path) == ("bfloat16", "xla", 0.1)
  assert 0 < rel_err(forward(fast, images_at(SIZE)).logits, forward(ref, images_at(SIZE)).logits)
  assert rel_err(forward(fast, images_at(SIZE)).logits, forward(ref, images_at(SIZE)).logits) < 0.05
  with pytest.raises(errors.UserError) as err:  # config.json shows the heads
    convert.load(folder, "hf", depth=DEPTH + 1, num_heads=2 * HEADS, width=WIDTH, mlp_dim=MLP)
  message = str(err.value)
  assert f"depth={DEPTH + 1} (the file has {DEPTH})" in message
  assert f"num_heads={2 * HEADS} (the file has {HEADS})" in message
  assert "width=" not in message and "mlp_dim=" not in message  # equal to the file's: fine
  assert "'dtype'" in message  # says what may differ
  assert convert.load(folder, "hf", num_classes=0).head is None  # dropping the head is allowed
  with pytest.raises(errors.UserError, match="style='clip' .the file has 'timm'"):
    convert.load(folder, "hf", style="clip")  # the file has no ln_pre: it is not CLIP's
  # A saved directory determines every field but the run-time ones.
  saved.save(ref, tmp_path / "m")
  assert convert.load(tmp_path / "m", "orbax", dtype="bfloat16").cfg.dtype == "bfloat16"
  for field, value in (("layer_norm_eps", 1e-6), ("pool", "gap"), ("num_classes", 3)):
    with pytest.raises(errors.UserError, match=f"{field}="):
      convert.load(tmp_path / "m", "orbax", **{field: value})


# -------------------------------------------------------------------------------- saved / CLI
def test_cli_round_trip(hf_dirs, tmp_path, capsys):
  folder, out = hf_dirs["clip"][1], tmp_path / "teacher"
  cmd = [
    sys.executable,
    "-m",
    "linearizer.convert",
    "--format",
    "hf",
    "--input",
    str(folder),
    "--output",
    str(out),
  ]
  run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert run.returncode == 0, run.stderr
  assert "vit" in run.stdout and str(out) in run.stdout and "parameters" in run.stdout
  assert json.loads((out / "model.json").read_text())["kind"] == "vit"
  ref = convert.load(folder, "hf")
  images = images_at(SIZE)
  assert_same_outputs(convert.load(out, "orbax"), ref, images, rtol=0)
  assert_same_outputs(saved.restore(out), ref, images, rtol=0)
  # A second run (in-process, to save a start-up) must not overwrite: it exits non-zero and
  # leaves the first intact.
  with pytest.raises(SystemExit) as exit_:
    convert.main(cmd[3:])
  assert exit_.value.code == 2 and "not empty" in capsys.readouterr().err  # a UserError: 2
  assert_same_outputs(saved.restore(out), ref, images, rtol=0)


def test_save_refuses_non_empty_directory(hf_dirs, tmp_path):
  model = convert.load(hf_dirs["vit"][1], "hf")
  (tmp_path / "keep.txt").write_text("x")
  with pytest.raises(FileExistsError):
    saved.save(model, tmp_path)
  assert (tmp_path / "keep.txt").exists()
  saved.save(model, tmp_path, overwrite=True)
  assert not (tmp_path / "keep.txt").exists()
  assert_same_outputs(saved.restore(tmp_path), model, images_at(SIZE), rtol=0)


def test_a_torch_file_that_is_not_tensors_is_one_line_naming_the_cause(tmp_path):
  """torch's weights_only errors run to ten lines and suggest unpickling the file's code: the
  CLI prints one line with the cause and our way out, and writes nothing."""
  (tmp_path / "noise.pth").write_bytes(bytes(range(256)) * 4)
  torch.save({"model": argparse.ArgumentParser}, tmp_path / "code.pth")  # a class: code
  for name, found in (("noise.pth", "Unsupported operand"), ("code.pth", "Unsupported global")):
    proc = helpers.run_cli(
      "linearizer.convert", "--format", "timm", "--input", tmp_path / name, "--output",
      tmp_path / "out",
    )  # fmt: skip
    (line,) = [x for x in proc.stderr.splitlines() if x.strip() and not x.startswith(("I0", "W0"))]
    assert line.startswith("error: ") and found in line and "re-save its state_dict()" in line
    assert "weights_only` set to `False`" not in line and "add_safe_globals" not in line
  assert not (tmp_path / "out").exists()
