"""hf: a `transformers` folder (or bare weights file) of a ViT-family vision tower.

CLIPVisionModel / CLIPModel (vision tower; `visual_projection` becomes a bias-free head),
ViTModel / ViTForImageClassification, Dinov2Model / Dinov2WithRegistersModel (a
Dinov2ForImageClassification's backbone; its head reads [CLS, mean patch] and is not
loaded), DINOv3ViTModel (CLS, storage tokens as `registers`, no absolute table but RoPE
`rope="dinov3"` at the config's `rope_theta`, LayerScale, q/v biases without a k bias, and
the plain or the gated SiLU MLP as `mlp="swiglu"`), SiglipVisionModel / SiglipModel (vision
tower, with its attention-pooling head as `pool="map"`; SigLIP 2's fixed-resolution
releases are this layout) and SigLIP 2's NaFlex towers Siglip2VisionModel / Siglip2Model
(the same tower behind an nn.Linear over flattened patches, read as our patch conv, and a
position table resized per image by antialiased bilinear interpolation,
`pos_interpolation="bilinear_antialias"`; run here at a fixed square grid, as every patch
of a square image is valid). config.json + model.safetensors / pytorch_model.bin, sharded
or not; a `preprocessor_config.json` beside it gives `image_mean` / `image_std`. A bare
weights file has no config.json: num_heads defaults to width // 64.
"""

import json
import math
import pathlib
import re

import jax.numpy as jnp

from linearizer.convert import hf_layouts
from linearizer.convert.common import (
  VIT_FIXED,
  Spec,
  Uninferable,
  depth_of,
  find_prefix,
  image_size_of,
  linear,
  need,
  read_tensors,
  vit_fields,
)
from linearizer.errors import MissingPathError, UserError

WEIGHT_FILES = (
  "model.safetensors",
  "model.safetensors.index.json",
  "pytorch_model.bin",
  "pytorch_model.bin.index.json",
)


def _weights(path: pathlib.Path) -> pathlib.Path:
  if not path.is_dir():
    return path
  weights = next((path / n for n in WEIGHT_FILES if (path / n).exists()), None)
  if weights is None:
    raise MissingPathError(
      f"{path}: no model.safetensors or pytorch_model.bin (or their "
      "*.index.json) in this transformers folder."
    )
  return weights


# transformers' activation names -> ours ('gelu_new' and 'gelu_pytorch_tanh' are both the
# tanh approximation).
ACTIVATIONS = {
  "gelu": "gelu",
  "quick_gelu": "quick_gelu",
  "gelu_pytorch_tanh": "gelu_tanh",
  "gelu_new": "gelu_tanh",
}
# model_type -> family; None (a bare weights file) is told by its tensor names.
MODEL_TYPES = {
  None: None,
  "clip": "clip",
  "clip_vision_model": "clip",
  "vit": "vit",
  "dinov2": "dinov2",
  "dinov2_with_registers": "dinov2",
  "dinov3_vit": "dinov3",
  "siglip": "siglip",
  "siglip_vision_model": "siglip",
  "siglip2": "siglip2",
  "siglip2_vision_model": "siglip2",
}


def _text_tower(name, cls):
  return (
    f"a {name} text tower ({cls}TextModel) holds no image model; {name}'s image tower "
    f"({cls}VisionModel, or the vision tower of a {cls}Model folder) is supported"
  )


UNSUPPORTED_TYPES = {  # what people try, and why it is refused
  "dinov3_convnext": "DINOv3's ConvNeXt backbones are convolutional networks, not ViTs; "
  "DINOv3's ViTs (DINOv3ViTModel, model_type 'dinov3_vit') are supported",
  "siglip2_text_model": _text_tower("SigLIP 2", "Siglip2"),
  "siglip_text_model": _text_tower("SigLIP", "Siglip"),
  "clip_text_model": _text_tower("CLIP", "CLIP"),
  "swin": "a Swin Transformer has windowed attention and patch merging, not a plain ViT",
  "eva02": "an EVA-02 has rotary position embeddings and SwiGLU MLPs, not a plain ViT",
}
SUPPORTED = (
  "CLIP, ViT, DINOv2 (with or without registers), DINOv3 ViT, SigLIP and SigLIP 2 (NaFlex) "
  "vision towers"
)
# The name of each family's patch embedding after `embeddings.` (its weight's shape tells
# the patch size: a conv's last axis, or a NaFlex linear's (patch² · 3) inputs).
PATCH_EMBED = {
  "vit": "patch_embeddings.projection",
  "dinov2": "patch_embeddings.projection",
  "dinov3": "patch_embeddings",
}


def _family(config: dict, t: dict, where) -> tuple:
  """(family, prefix): which layout the file holds, by model_type and tensor names."""
  model_type = config.get("model_type")
  if (
    model_type == "radio"
    or "RADIOModel" in (config.get("architectures") or ())
    or any(n.startswith("radio_model.") for n in t)
  ):  # NVlabs' RADIOConfig names no model_type: its folders say "" and RADIOModel
    raise UserError(
      f"{where}: an NVIDIA RADIO model (RADIOModel, run by its own trust_remote_code: a timm "
      "ViT behind RADIO's patch generator with its cropped position embedding, summary "
      f"tokens per teacher and adaptor heads) is not supported by the hf format ({SUPPORTED})."
    )
  if model_type in UNSUPPORTED_TYPES:
    raise UserError(f"{where}: model_type {model_type!r}: {UNSUPPORTED_TYPES[model_type]}.")
  if model_type not in MODEL_TYPES:
    raise UserError(
      f"{where}: model_type {model_type!r} is not supported by the hf format ({SUPPORTED})."
    )
  conv = find_prefix(t, "embeddings.patch_embedding.weight")  # CLIP and SigLIP (2)
  proj = find_prefix(t, "embeddings.patch_embeddings.projection.weight")  # ViT and DINOv2
  dinov3 = find_prefix(t, "embeddings.patch_embeddings.weight")
  if dinov3 is not None:
    return "dinov3", dinov3
  if conv is None and proj is None:
    raise Uninferable(
      "cannot tell the architecture: none of '[vision_model.]embeddings."
      "patch_embedding.weight', '[vit.|dinov2.]embeddings.patch_embeddings."
      "projection.weight' or 'embeddings.patch_embeddings.weight' (DINOv3) is in the file"
    )
  if conv is not None:
    if t[conv + "embeddings.patch_embedding.weight"].ndim == 2:  # NaFlex: a linear
      return "siglip2", conv
    return ("clip" if conv + "embeddings.class_embedding" in t else "siglip"), conv
  if proj + "encoder.layer.0.mlp.weights_in.weight" in t:
    raise UserError(f"{where}: DINOv2 with a SwiGLU MLP (ViT-g/14) is not supported yet.")
  return ("dinov2" if proj + "encoder.layer.0.layer_scale1.lambda1" in t else "vit"), proj


def _image_stats(folder: pathlib.Path) -> dict:
  """image_mean / image_std of the folder's preprocessor_config.json, when it has them.
  Without it each family's style has its own: ImageNet's for DINOv3 (style timm), 0.5 for
  SigLIP 2 (style siglip)."""
  file = folder / "preprocessor_config.json"
  pre = json.loads(file.read_text()) if file.exists() else {}
  if "image_mean" not in pre or "image_std" not in pre:
    return {}
  three = lambda v: tuple(float(x) for x in (v if isinstance(v, list) else [v] * 3))
  return dict(image_mean=three(pre["image_mean"]), image_std=three(pre["image_std"]))


def _zeros(key, shape):
  return jnp.zeros(shape, jnp.float32)


def read(path: pathlib.Path) -> Spec:
  """transformers CLIP / ViT / DINOv2 / DINOv3 / SigLIP (2) vision towers (the module
  docstring)."""
  folder = path if path.is_dir() else path.parent
  weights = _weights(path)
  config_file = folder / "config.json"
  outer = json.loads(config_file.read_text()) if config_file.exists() else {}
  config = outer.get("vision_config", outer)  # CLIPModel / SiglipModel nest the tower's
  t = read_tensors(weights)
  kind = {"model_type": outer.get("model_type"), "architectures": outer.get("architectures")}
  family, p = _family({**kind, **config}, t, config_file)
  e = p + "embeddings."
  if family in ("clip", "siglip", "siglip2"):
    L = p + "encoder.layers.{i}."
  elif family == "dinov3":  # saved as layer.{i}, held as model.layer.{i} (transformers 5)
    L = p + ("model." if p + "model.layer.0.norm1.weight" in t else "") + "layer.{i}."
  else:
    L = p + "encoder.layer.{i}."
  L0 = L.format(i=0)
  gated = L0 + "mlp.gate_proj.weight" in t  # DINOv3's SwiGLU
  # transformers' defaults when the file comes without config.json
  tanh = "gelu_pytorch_tanh"
  default_act = {"clip": "quick_gelu", "siglip": tanh, "siglip2": tanh}.get(
    family, "silu" if gated else "gelu"
  )
  act = config.get("hidden_act", default_act)
  if gated and act != "silu":
    raise UserError(
      f"{folder}: a gated MLP with hidden_act {act!r} is not supported; expected 'silu' "
      "(SwiGLU, DINOv3's gated MLP)."
    )
  if not gated and act not in ACTIVATIONS:
    raise UserError(
      f"{folder}: hidden_act {act!r} is not supported; expected one of {sorted(ACTIVATIONS)}."
    )
  patch_w = t[e + PATCH_EMBED.get(family, "patch_embedding") + ".weight"]
  head, extra, optional, pos = None, {}, {}, None
  if family == "clip":
    pos = need(t, e + "position_embedding.weight", "the image size")[1:]
    fc1 = need(t, L0 + "mlp.fc1.weight", "the MLP width")
    head = t.get("visual_projection.weight")
    table = hf_layouts.clip_table(p, e, L)

    def ours(n):
      return n.startswith(p) or n == "visual_projection.weight"
  elif family in ("siglip", "siglip2"):
    pos = need(t, e + "position_embedding.weight", "the image size")
    fc1 = need(t, L0 + "mlp.fc1.weight", "the MLP width")
    table = hf_layouts.siglip_table(p, e, L)
    # A tower saved without its head (vision_use_head=False) pools by the mean patch.
    extra = dict(cls_token=False, pool="map" if p + "head.probe" in t else "gap")
    if family == "siglip2":  # the table resized per image as transformers' Siglip2 does
      table.update(linear("patch_embed", e + "patch_embedding", hf_layouts.PATCH_LINEAR))
      extra.update(pos_interpolation="bilinear_antialias")

    def ours(n):
      return n.startswith(p)
  elif family == "dinov3":
    fc1 = need(t, L0 + "mlp.up_proj.weight", "the MLP width")
    biases = "".join(x for x in "qkv" if f"{L0}attention.{x}_proj.bias" in t)
    table = hf_layouts.dinov3_table(p, e, L, biases)
    registers = t[e + "register_tokens"].shape[1] if e + "register_tokens" in t else 0
    extra = dict(
      registers=registers,
      layer_scale=float(config.get("layerscale_value", 1.0)),
      pos_embed=False,
      rope="dinov3",
      rope_temperature=float(config.get("rope_theta", 100.0)),
      qkv_bias=bool(biases),
      mlp="swiglu" if gated else "plain",
    )
    # proj_bias / mlp_bias False: zero biases, which add nothing (exact).
    zero = lambda *layers: {f"blocks.{{i}}.{x}.bias": _zeros for x in layers}
    if L0 + "attention.o_proj.bias" not in t:
      optional.update(zero("attn.proj"))
    if L0 + "mlp.down_proj.bias" not in t:
      optional.update(zero("gate", "fc1", "fc2"))

    # Not ours: the MIM mask token, inert (it replaces patches only where a caller passes
    # bool_masked_pos, which no teacher run does), and the empty (1, 0, D) storage tokens
    # transformers saves for a model without any.
    def ours(n):
      return n.startswith(p) and n != e + "mask_token" and (n != e + "register_tokens" or registers)
  else:
    pos = need(t, e + "position_embeddings", "the image size")[0, 1:]
    if family == "vit":
      fc1 = need(t, L0 + "intermediate.dense.weight", "the MLP width")
      head = t.get("classifier.weight")
      table = hf_layouts.vit_table(p, e, L)
    else:
      fc1 = need(t, L0 + "mlp.fc1.weight", "the MLP width")
      table = hf_layouts.dinov2_table(p, e, L, t)
      registers = t.get(e + "register_tokens")
      extra = dict(
        layer_scale=float(config.get("layerscale_value", 1.0)),
        registers=0 if registers is None else registers.shape[1],
        # transformers' DINOv2 with registers resamples with antialiasing, plain DINOv2 not.
        pos_interpolation="bicubic_antialias" if registers is not None else "bicubic",
      )

    def ours(n):  # the pooler (tanh dense), MIM mask token and DINOv2's head are not ours
      return (n.startswith(p) or (n.startswith("classifier.") and family == "vit")) and not (
        n.startswith((p + "pooler.", e + "mask_token"))
      )

  width = patch_w.shape[0]
  patch = math.isqrt(patch_w.shape[1] // 3) if family == "siglip2" else patch_w.shape[-1]
  fields = vit_fields(
    {"clip": "clip", "siglip": "siglip", "siglip2": "siglip"}.get(family, "timm"),
    width,
    depth_of(t, re.escape(L).replace(r"\{i\}", r"(\d+)") + ".*"),
    config.get("num_attention_heads", width // 64),
    fc1.shape[0],
    patch,
    # DINOv3 has no table: the size it was trained at (config.json), RoPE fits any
    config.get("image_size", 224)
    if pos is None
    else image_size_of(pos.shape[0], patch, "the position embedding"),
    0 if head is None else head.shape[0],
    head_bias=family != "clip",
    eps=config.get(
      "layer_norm_eps",
      {"clip": 1e-5, "dinov3": 1e-5, "vit": 1e-12}.get(family, 1e-6),
    ),
    activation=None if gated else ACTIVATIONS[act],
  )
  fields.update(extra, **_image_stats(folder))

  def ignore(n):  # other towers, and the `position_ids` buffer old CLIP files keep
    return not ours(n) or n == e + "position_ids"

  heads = ("num_heads",) if "num_attention_heads" in config else ()  # config.json tells them
  # What the tensors show: registers, CLS, the pooling head, and DINOv3's parts.
  shown = {
    "dinov2": ("registers", "cls_token", "pool"),
    "siglip": ("registers", "cls_token", "pool"),
    "siglip2": ("registers", "cls_token", "pool"),
    "dinov3": ("registers", "cls_token", "pool", "pos_embed", "qkv_bias", "mlp", "rope"),
  }.get(family, ())
  fixed = (*VIT_FIXED, *heads, *shown)
  return Spec("vit", fields, table, t, ignore, optional=optional, fixed=fixed)
