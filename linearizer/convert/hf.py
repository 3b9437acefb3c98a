"""hf: a `transformers` folder (or bare weights file) of a ViT-family vision tower.

CLIPVisionModel / CLIPModel (vision tower; `visual_projection` becomes a bias-free head),
ViTModel / ViTForImageClassification, Dinov2Model / Dinov2WithRegistersModel (a
Dinov2ForImageClassification's backbone; its head reads [CLS, mean patch] and is not
loaded) and SiglipVisionModel / SiglipModel (vision tower, with its attention-pooling head
as `pool="map"`; SigLIP 2's fixed-resolution releases are this layout). config.json +
model.safetensors / pytorch_model.bin, sharded or not. A bare weights file has no
config.json: num_heads defaults to width // 64.
"""

import json
import pathlib
import re

import jax.numpy as jnp

from linearizer.convert.common import (
  CONV,
  LINEAR,
  QKV,
  QKV_BIAS,
  QUERY_KEY_VALUE,
  ROW,
  SAME,
  TOKEN,
  VIT_FIXED,
  Spec,
  Tx,
  Uninferable,
  depth_of,
  each,
  find_prefix,
  image_size_of,
  layer_norm,
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


def _clip_table(p, e, L):
  return {
    "patch_embed.kernel": ((e + "patch_embedding.weight",), CONV),
    "cls_token": ((e + "class_embedding",), TOKEN),
    "pos_embed": ((e + "position_embedding.weight",), ROW),
    **layer_norm("ln_pre", p + "pre_layrnorm"),
    **layer_norm("blocks.{i}.norm1", L + "layer_norm1"),
    "blocks.{i}.attn.qkv.kernel": (each(L + "self_attn.{}_proj.weight", "qkv"), QKV),
    "blocks.{i}.attn.qkv.bias": (each(L + "self_attn.{}_proj.bias", "qkv"), QKV_BIAS),
    **linear("blocks.{i}.attn.proj", L + "self_attn.out_proj"),
    **layer_norm("blocks.{i}.norm2", L + "layer_norm2"),
    **linear("blocks.{i}.fc1", L + "mlp.fc1"),
    **linear("blocks.{i}.fc2", L + "mlp.fc2"),
    **layer_norm("norm", p + "post_layernorm"),
    "head.kernel": (("visual_projection.weight",), LINEAR),
  }


def _vit_table(p, e, L):
  att = L + "attention.attention."
  return {
    **linear("patch_embed", e + "patch_embeddings.projection", CONV),
    "cls_token": ((e + "cls_token",), SAME),
    "pos_embed": ((e + "position_embeddings",), SAME),
    **layer_norm("blocks.{i}.norm1", L + "layernorm_before"),
    "blocks.{i}.attn.qkv.kernel": (each(att + "{}.weight", QUERY_KEY_VALUE), QKV),
    "blocks.{i}.attn.qkv.bias": (each(att + "{}.bias", QUERY_KEY_VALUE), QKV_BIAS),
    **linear("blocks.{i}.attn.proj", L + "attention.output.dense"),
    **layer_norm("blocks.{i}.norm2", L + "layernorm_after"),
    **linear("blocks.{i}.fc1", L + "intermediate.dense"),
    **linear("blocks.{i}.fc2", L + "output.dense"),
    **layer_norm("norm", p + "layernorm"),
    **linear("head", "classifier"),
  }


def _dinov2_table(p, e, L, t):
  """DINOv2: ViT's layout plus LayerScale gains and register tokens; transformers 5 names
  the attention q/k/v/o_proj, the files on the Hub (and earlier versions) query/key/value."""
  new = L.format(i=0) + "attention.q_proj.weight" in t
  att, out = (L + "attention.", "o_proj") if new else (L + "attention.attention.", None)
  parts = ("q_proj", "k_proj", "v_proj") if new else QUERY_KEY_VALUE
  return {
    **linear("patch_embed", e + "patch_embeddings.projection", CONV),
    "cls_token": ((e + "cls_token",), SAME),
    "pos_embed": ((e + "position_embeddings",), SAME),
    "register_tokens": ((e + "register_tokens",), SAME),
    **layer_norm("blocks.{i}.norm1", L + "norm1"),
    "blocks.{i}.attn.qkv.kernel": (tuple(att + f"{x}.weight" for x in parts), QKV),
    "blocks.{i}.attn.qkv.bias": (tuple(att + f"{x}.bias" for x in parts), QKV_BIAS),
    **linear("blocks.{i}.attn.proj", att + out if out else L + "attention.output.dense"),
    "blocks.{i}.ls1": ((L + "layer_scale1.lambda1",), SAME),
    **layer_norm("blocks.{i}.norm2", L + "norm2"),
    **linear("blocks.{i}.fc1", L + "mlp.fc1"),
    **linear("blocks.{i}.fc2", L + "mlp.fc2"),
    "blocks.{i}.ls2": ((L + "layer_scale2.lambda1",), SAME),
    **layer_norm("norm", p + "layernorm"),
  }


# torch.nn.MultiheadAttention's fused in_proj (3D, D) -> our probe's q (D, D) and the
# tokens' kv (D, 2D) (the inverses give shapes only).
IN_PROJ_Q = Tx(lambda w: w[: w.shape[0] // 3].T, lambda k: (jnp.concatenate([k.T] * 3),))
IN_PROJ_KV = Tx(lambda w: w[w.shape[0] // 3 :].T, lambda k: (jnp.concatenate([k.T, k.T[::2]]),))
IN_BIAS_Q = Tx(lambda b: b[: b.shape[0] // 3], lambda b: (jnp.concatenate([b] * 3),))
IN_BIAS_KV = Tx(lambda b: b[b.shape[0] // 3 :], lambda b: (jnp.concatenate([b, b[::2]]),))


def _siglip_table(p, e, L):
  """SigLIP: no CLS, a position embedding per patch, the attention-pooling head."""
  h = p + "head."
  return {
    **linear("patch_embed", e + "patch_embedding", CONV),
    "pos_embed": ((e + "position_embedding.weight",), ROW),
    **layer_norm("blocks.{i}.norm1", L + "layer_norm1"),
    "blocks.{i}.attn.qkv.kernel": (each(L + "self_attn.{}_proj.weight", "qkv"), QKV),
    "blocks.{i}.attn.qkv.bias": (each(L + "self_attn.{}_proj.bias", "qkv"), QKV_BIAS),
    **linear("blocks.{i}.attn.proj", L + "self_attn.out_proj"),
    **layer_norm("blocks.{i}.norm2", L + "layer_norm2"),
    **linear("blocks.{i}.fc1", L + "mlp.fc1"),
    **linear("blocks.{i}.fc2", L + "mlp.fc2"),
    **layer_norm("norm", p + "post_layernorm"),
    "map_head.probe": ((h + "probe",), SAME),
    "map_head.q.kernel": ((h + "attention.in_proj_weight",), IN_PROJ_Q),
    "map_head.q.bias": ((h + "attention.in_proj_bias",), IN_BIAS_Q),
    "map_head.kv.kernel": ((h + "attention.in_proj_weight",), IN_PROJ_KV),
    "map_head.kv.bias": ((h + "attention.in_proj_bias",), IN_BIAS_KV),
    **linear("map_head.proj", h + "attention.out_proj"),
    **layer_norm("map_head.norm", h + "layernorm"),
    **linear("map_head.fc1", h + "mlp.fc1"),
    **linear("map_head.fc2", h + "mlp.fc2"),
  }


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
  "siglip": "siglip",
  "siglip_vision_model": "siglip",
}
UNSUPPORTED_TYPES = {  # what people try, and why it is refused
  "siglip2": "SigLIP 2's NaFlex towers take patch sequences of any aspect ratio, not images; "
  "its fixed-resolution releases (model_type 'siglip') are supported",
  "siglip2_vision_model": "SigLIP 2's NaFlex towers take patch sequences of any aspect "
  "ratio, not images; its fixed-resolution releases (model_type 'siglip') are supported",
  "swin": "a Swin Transformer has windowed attention and patch merging, not a plain ViT",
  "eva02": "an EVA-02 has rotary position embeddings and SwiGLU MLPs, not a plain ViT",
}
SUPPORTED = "CLIP, ViT, DINOv2 (with or without registers) and SigLIP vision towers"


def _family(config: dict, t: dict, where) -> tuple:
  """(family, prefix): which layout the file holds, by model_type and tensor names."""
  model_type = config.get("model_type")
  if model_type in UNSUPPORTED_TYPES:
    raise UserError(f"{where}: model_type {model_type!r}: {UNSUPPORTED_TYPES[model_type]}.")
  if model_type not in MODEL_TYPES:
    raise UserError(
      f"{where}: model_type {model_type!r} is not supported by the hf format ({SUPPORTED})."
    )
  conv = find_prefix(t, "embeddings.patch_embedding.weight")  # CLIP and SigLIP
  proj = find_prefix(t, "embeddings.patch_embeddings.projection.weight")  # ViT and DINOv2
  if conv is None and proj is None:
    raise Uninferable(
      "cannot tell the architecture: neither '[vision_model.]embeddings."
      "patch_embedding.weight' nor '[vit.|dinov2.]embeddings.patch_embeddings."
      "projection.weight' is in the file"
    )
  if conv is not None:
    return ("clip" if conv + "embeddings.class_embedding" in t else "siglip"), conv
  if proj + "encoder.layer.0.mlp.weights_in.weight" in t:
    raise UserError(f"{where}: DINOv2 with a SwiGLU MLP (ViT-g/14) is not supported yet.")
  return ("dinov2" if proj + "encoder.layer.0.layer_scale1.lambda1" in t else "vit"), proj


def read(path: pathlib.Path) -> Spec:
  """transformers CLIP / ViT / DINOv2 / SigLIP vision towers (the module docstring)."""
  folder = path if path.is_dir() else path.parent
  weights = _weights(path)
  config_file = folder / "config.json"
  outer = json.loads(config_file.read_text()) if config_file.exists() else {}
  config = outer.get("vision_config", outer)  # CLIPModel / SiglipModel nest the tower's
  t = read_tensors(weights)
  family, p = _family({"model_type": outer.get("model_type"), **config}, t, config_file)
  # transformers' defaults when the file comes without config.json
  default_act = {"clip": "quick_gelu", "siglip": "gelu_pytorch_tanh"}.get(family, "gelu")
  act = config.get("hidden_act", default_act)
  if act not in ACTIVATIONS:
    raise UserError(
      f"{folder}: hidden_act {act!r} is not supported; expected one of {sorted(ACTIVATIONS)}."
    )
  e = p + "embeddings."
  tower = family in ("clip", "siglip")  # their patch conv and layer names
  L = p + ("encoder.layers.{i}." if tower else "encoder.layer.{i}.")
  patch_w = t[e + ("patch_embedding.weight" if tower else "patch_embeddings.projection.weight")]
  head, extra = None, {}
  if family == "clip":
    pos = need(t, e + "position_embedding.weight", "the image size")[1:]
    fc1 = need(t, L.format(i=0) + "mlp.fc1.weight", "the MLP width")
    head = t.get("visual_projection.weight")
    table = _clip_table(p, e, L)

    def ours(n):
      return n.startswith(p) or n == "visual_projection.weight"
  elif family == "siglip":
    pos = need(t, e + "position_embedding.weight", "the image size")
    fc1 = need(t, L.format(i=0) + "mlp.fc1.weight", "the MLP width")
    table = _siglip_table(p, e, L)
    # A tower saved without its head (vision_use_head=False) pools by the mean patch.
    extra = dict(cls_token=False, pool="map" if p + "head.probe" in t else "gap")

    def ours(n):
      return n.startswith(p)
  else:
    pos = need(t, e + "position_embeddings", "the image size")[0, 1:]
    if family == "vit":
      fc1 = need(t, L.format(i=0) + "intermediate.dense.weight", "the MLP width")
      head = t.get("classifier.weight")
      table = _vit_table(p, e, L)
    else:
      fc1 = need(t, L.format(i=0) + "mlp.fc1.weight", "the MLP width")
      table = _dinov2_table(p, e, L, t)
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

  width, patch = patch_w.shape[0], patch_w.shape[-1]
  fields = vit_fields(
    {"clip": "clip", "siglip": "siglip"}.get(family, "timm"),
    width,
    depth_of(t, re.escape(L).replace(r"\{i\}", r"(\d+)") + ".*"),
    config.get("num_attention_heads", width // 64),
    fc1.shape[0],
    patch,
    image_size_of(pos.shape[0], patch, "the position embedding"),
    0 if head is None else head.shape[0],
    head_bias=family != "clip",
    eps=config.get(
      "layer_norm_eps", 1e-5 if family == "clip" else 1e-12 if family == "vit" else 1e-6
    ),
    activation=ACTIVATIONS[act],
  )
  fields.update(extra)

  def ignore(n):  # other towers, and the `position_ids` buffer old CLIP files keep
    return not ours(n) or n == e + "position_ids"

  heads = ("num_heads",) if "num_attention_heads" in config else ()  # config.json tells them
  # What the tensors show: registers, LayerScale, CLS and the pooling head.
  shown = ("registers", "cls_token", "pool") if family in ("dinov2", "siglip") else ()
  return Spec("vit", fields, table, t, ignore, fixed=(*VIT_FIXED, *heads, *shown))
