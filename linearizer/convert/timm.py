"""timm: a timm ViT `.pth` / `.safetensors`; a timm `.npz` is big_vision's layout.

timm's CLIP towers are told by their `norm_pre` (style 'clip'); timm runs them with exact
GELU (only its `*_clip_quickgelu_*` models use QuickGELU), so they load with
activation='gelu' and a warning that it is a guess. num_heads is not in the weights:
width // 64 unless overridden (ViT-H needs 16).
"""

import pathlib

from linearizer.convert import big_vision
from linearizer.convert.match import VIT_FIXED, Spec, _depth, _grid_size, _need, _vit_fields
from linearizer.convert.tensors import CONV, SAME, _linear, _ln, read_tensors

CLIP_GELU = (
  "timm runs its CLIP towers (e.g. vit_base_patch16_clip_224.openai_ft_in1k) with exact "
  "GELU; a *_clip_quickgelu_* model's weights need activation='quick_gelu'"
)


def read(path: pathlib.Path) -> Spec:
  if path.name.endswith(".npz"):  # timm's npz export is big_vision's layout ...
    spec = big_vision.read(path)
    spec.fields["activation"] = "gelu"  # ... but timm runs it with exact GELU
    return spec
  t = read_tensors(path)
  patch_w = _need(t, "patch_embed.proj.weight", "the width and patch")
  pos = _need(t, "pos_embed", "the image size")
  head = t.get("head.weight")
  width, patch = patch_w.shape[0], patch_w.shape[-1]
  style = "clip" if "norm_pre.weight" in t else "timm"  # timm's CLIP: norm_pre, no conv bias
  fields = _vit_fields(
    style,
    width,
    _depth(t, r"blocks\.(\d+)\..*"),
    width // 64,
    _need(t, "blocks.0.mlp.fc1.weight", "the MLP width").shape[0],
    patch,
    _grid_size(pos.shape[1] - 1, patch, "pos_embed"),
    0 if head is None else head.shape[0],
    head_bias="head.bias" in t,
    activation="gelu",  # timm's, for both styles (see the docstring)
  )
  # timm resamples position embeddings (checkpoint_filter_fn, dynamic_img_size) through
  # resample_abs_pos_embed, whose default is antialias=True.
  fields["pos_interpolation"] = "bicubic_antialias"
  b = "blocks.{i}."
  table = {
    **_linear("patch_embed", "patch_embed.proj", CONV),
    "cls_token": (("cls_token",), SAME),
    "pos_embed": (("pos_embed",), SAME),
    **_ln("ln_pre", "norm_pre"),
    **_ln(b + "norm1", b + "norm1"),
    **_linear(b + "attn.qkv", b + "attn.qkv"),
    **_linear(b + "attn.proj", b + "attn.proj"),
    **_ln(b + "norm2", b + "norm2"),
    **_linear(b + "fc1", b + "mlp.fc1"),
    **_linear(b + "fc2", b + "mlp.fc2"),
    **_ln("norm", "norm"),
    **_linear("head", "head"),
  }
  guesses = {"activation": CLIP_GELU} if style == "clip" else {}
  return Spec("vit", fields, table, t, fixed=VIT_FIXED, guesses=guesses)  # heads: not shown
