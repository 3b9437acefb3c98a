"""hf: a `transformers` folder (or bare weights file) of a CLIP vision tower or a ViT.

CLIPVisionModel / CLIPModel (vision tower; `visual_projection` becomes a bias-free head) or
ViTModel / ViTForImageClassification; config.json + model.safetensors / pytorch_model.bin,
sharded or not. A bare weights file has no config.json: num_heads defaults to width // 64.
"""

import json
import pathlib
import re

from linearizer.convert.match import (
  VIT_FIXED,
  Spec,
  _depth,
  _find_prefix,
  _grid_size,
  _need,
  _Uninferable,
  _vit_fields,
)
from linearizer.convert.tensors import (
  CONV,
  LINEAR,
  QKV,
  QKV_BIAS,
  QUERY_KEY_VALUE,
  ROW,
  SAME,
  TOKEN,
  _each,
  _linear,
  _ln,
  read_tensors,
)
from linearizer.errors import MissingPathError, UserError
from linearizer.models import vit as vit_lib

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
    **_ln("ln_pre", p + "pre_layrnorm"),
    **_ln("blocks.{i}.norm1", L + "layer_norm1"),
    "blocks.{i}.attn.qkv.kernel": (_each(L + "self_attn.{}_proj.weight", "qkv"), QKV),
    "blocks.{i}.attn.qkv.bias": (_each(L + "self_attn.{}_proj.bias", "qkv"), QKV_BIAS),
    **_linear("blocks.{i}.attn.proj", L + "self_attn.out_proj"),
    **_ln("blocks.{i}.norm2", L + "layer_norm2"),
    **_linear("blocks.{i}.fc1", L + "mlp.fc1"),
    **_linear("blocks.{i}.fc2", L + "mlp.fc2"),
    **_ln("norm", p + "post_layernorm"),
    "head.kernel": (("visual_projection.weight",), LINEAR),
  }


def _vit_table(p, e, L):
  att = L + "attention.attention."
  return {
    **_linear("patch_embed", e + "patch_embeddings.projection", CONV),
    "cls_token": ((e + "cls_token",), SAME),
    "pos_embed": ((e + "position_embeddings",), SAME),
    **_ln("blocks.{i}.norm1", L + "layernorm_before"),
    "blocks.{i}.attn.qkv.kernel": (_each(att + "{}.weight", QUERY_KEY_VALUE), QKV),
    "blocks.{i}.attn.qkv.bias": (_each(att + "{}.bias", QUERY_KEY_VALUE), QKV_BIAS),
    **_linear("blocks.{i}.attn.proj", L + "attention.output.dense"),
    **_ln("blocks.{i}.norm2", L + "layernorm_after"),
    **_linear("blocks.{i}.fc1", L + "intermediate.dense"),
    **_linear("blocks.{i}.fc2", L + "output.dense"),
    **_ln("norm", p + "layernorm"),
    **_linear("head", "classifier"),
  }


def read(path: pathlib.Path) -> Spec:
  """transformers CLIP(Vision)Model / ViTModel / ViTForImageClassification."""
  folder = path if path.is_dir() else path.parent
  weights = _weights(path)
  config_file = folder / "config.json"
  config = json.loads(config_file.read_text()) if config_file.exists() else {}
  config = config.get("vision_config", config)  # CLIPModel nests the tower's config
  model_type = config.get("model_type")
  if model_type not in (None, "clip", "clip_vision_model", "vit"):
    raise UserError(
      f"{config_file}: model_type {model_type!r} is not supported by "
      "the hf format (CLIP vision towers and ViT only)."
    )
  t = read_tensors(weights)
  clip_p = _find_prefix(t, "embeddings.patch_embedding.weight")
  vit_p = _find_prefix(t, "embeddings.patch_embeddings.projection.weight")
  if clip_p is None and vit_p is None:
    raise _Uninferable(
      "cannot tell CLIP from ViT: neither '[vision_model.]embeddings."
      "patch_embedding.weight' nor '[vit.]embeddings.patch_embeddings."
      "projection.weight' is in the file"
    )
  clip = clip_p is not None
  p = clip_p if clip else vit_p
  # transformers' defaults when the file comes without config.json
  act = config.get("hidden_act", "quick_gelu" if clip else "gelu")
  style = "clip" if clip else "timm"
  if act not in vit_lib.ACTIVATIONS:
    raise UserError(
      f"{folder}: hidden_act {act!r} is not supported; expected one of "
      f"{sorted(vit_lib.ACTIVATIONS)}."
    )
  e, L = p + "embeddings.", p + ("encoder.layers.{i}." if clip else "encoder.layer.{i}.")
  if clip:
    patch_w = t[e + "patch_embedding.weight"]
    pos = _need(t, e + "position_embedding.weight", "the image size")
    fc1 = _need(t, L.format(i=0) + "mlp.fc1.weight", "the MLP width")
    head = t.get("visual_projection.weight")
    table = _clip_table(p, e, L)

    def ours(n):
      return n.startswith(p) or n == "visual_projection.weight"
  else:
    patch_w = t[e + "patch_embeddings.projection.weight"]
    pos = _need(t, e + "position_embeddings", "the image size")[0]
    fc1 = _need(t, L.format(i=0) + "intermediate.dense.weight", "the MLP width")
    head = t.get("classifier.weight")
    table = _vit_table(p, e, L)

    def ours(n):  # the pooler (tanh dense) and MIM mask token are not part of our encoder
      return (n.startswith(p) or n.startswith("classifier.")) and not n.startswith(
        (p + "pooler.", e + "mask_token")
      )

  width, patch = patch_w.shape[0], patch_w.shape[-1]
  fields = _vit_fields(
    style,
    width,
    _depth(t, re.escape(L).replace(r"\{i\}", r"(\d+)") + ".*"),
    config.get("num_attention_heads", width // 64),
    fc1.shape[0],
    patch,
    _grid_size(pos.shape[0] - 1, patch, "the position embedding"),
    0 if head is None else head.shape[0],
    head_bias=not clip,
    eps=config.get("layer_norm_eps", 1e-5 if clip else 1e-12),
  )

  def ignore(n):  # other towers, and the `position_ids` buffer old CLIP files keep
    return not ours(n) or n == e + "position_ids"

  heads = ("num_heads",) if "num_attention_heads" in config else ()  # config.json tells them
  return Spec("vit", fields, table, t, ignore, fixed=(*VIT_FIXED, *heads))
