"""openai_clip: OpenAI CLIP `.pt` (TorchScript or plain) / `.pth` state dict, `visual.*`.

The image projection `proj` becomes a bias-free head; num_heads is OpenAI's width // 64.
"""

import pathlib
import re

from linearizer.convert.common import (
  CONV,
  LINEAR,
  ROW,
  SAME,
  TOKEN,
  VIT_FIXED,
  Spec,
  depth_of,
  image_size_of,
  layer_norm,
  linear,
  need,
  read_tensors,
  vit_fields,
)


def read(path: pathlib.Path) -> Spec:
  t = read_tensors(path)
  p = "visual." if "visual.conv1.weight" in t else ""
  R = p + "transformer.resblocks.{i}."
  patch_w = need(t, p + "conv1.weight", "the width and patch")
  pos = need(t, p + "positional_embedding", "the image size")
  proj = t.get(p + "proj")
  width, patch = patch_w.shape[0], patch_w.shape[-1]
  fields = vit_fields(
    "clip",
    width,
    depth_of(t, re.escape(p) + r"transformer\.resblocks\.(\d+)\..*"),
    width // 64,  # OpenAI's own rule: vision_heads = vision_width // 64
    need(t, R.format(i=0) + "mlp.c_fc.weight", "the MLP width").shape[0],
    patch,
    image_size_of(pos.shape[0] - 1, patch, "the position embedding"),
    0 if proj is None else proj.shape[1],
    head_bias=False,
  )
  table = {
    "patch_embed.kernel": ((p + "conv1.weight",), CONV),
    "cls_token": ((p + "class_embedding",), TOKEN),
    "pos_embed": ((p + "positional_embedding",), ROW),
    **layer_norm("ln_pre", p + "ln_pre"),
    **layer_norm("blocks.{i}.norm1", R + "ln_1"),
    "blocks.{i}.attn.qkv.kernel": ((R + "attn.in_proj_weight",), LINEAR),
    "blocks.{i}.attn.qkv.bias": ((R + "attn.in_proj_bias",), SAME),
    **linear("blocks.{i}.attn.proj", R + "attn.out_proj"),
    **layer_norm("blocks.{i}.norm2", R + "ln_2"),
    **linear("blocks.{i}.fc1", R + "mlp.c_fc"),
    **linear("blocks.{i}.fc2", R + "mlp.c_proj"),
    **layer_norm("norm", p + "ln_post"),
    "head.kernel": ((p + "proj",), SAME),
  }  # CLIP computes x @ proj: already (in, out)
  # the text tower ignored; the heads are not in the weights
  return Spec("vit", fields, table, t, ignore=lambda n: not n.startswith(p), fixed=VIT_FIXED)
