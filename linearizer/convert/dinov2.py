"""dinov2: DINOv2's own release, the torch-hub `.pth` (facebookresearch/dinov2).

A bare state dict (the hub's `dinov2_vit*14[_reg].pth`) or a training checkpoint's
`teacher` / `model` entry, with or without a `backbone.` prefix, with or without
`block_chunks` (blocks stored as `blocks.<chunk>.<block>.`). LayerScale and register tokens
are read off the tensors; num_heads is not in the weights: width // 64 unless overridden
(right for every released size: S 6, B 12, L 16, g 24). How the hub code resamples the
position embedding differs with registers: `bicubic_offset` without (its
interpolate_offset=0.1), `bicubic_antialias` with (interpolate_antialias=True, no offset).
The SwiGLU MLP of ViT-g/14 is not supported yet.
"""

import pathlib
import re

from linearizer.convert import timm
from linearizer.convert.common import (
  CONV,
  LINEAR,
  SAME,
  VIT_FIXED,
  Spec,
  depth_of,
  find_prefix,
  image_size_of,
  layer_norm,
  linear,
  need,
  read_tensors,
  vit_fields,
)
from linearizer.errors import UserError


def _unchunk(tensors: dict) -> dict:
  """`blocks.<chunk>.<i>.x` (block_chunks > 0) -> `blocks.<i>.x`; other names unchanged."""
  return {re.sub(r"blocks\.\d+\.(\d+)\.", r"blocks.\1.", n): v for n, v in tensors.items()}


def read(path: pathlib.Path) -> Spec:
  t = read_tensors(path, ("teacher", "model", "state_dict"))
  p = find_prefix(t, "patch_embed.proj.weight") or ""
  t = {n[len(p) :]: v for n, v in t.items() if n.startswith(p)}  # e.g. a `backbone.` prefix
  timm.refuse_timm_eva(t, path)
  if "storage_tokens" in t or any(n.endswith(".periods") for n in t):
    raise UserError(
      f"{path} looks like DINOv3 (storage tokens, RoPE periods, no position table); use "
      "--format dinov3."
    )
  if any(re.match(r"blocks\.\d+\.\d+\.", n) for n in t):
    t = _unchunk(t)
  if "blocks.0.mlp.w12.weight" in t:
    raise UserError(f"{path}: DINOv2 with a SwiGLU MLP (ViT-g/14) is not supported yet.")
  patch_w = need(t, "patch_embed.proj.weight", "the width and patch")
  width, patch = patch_w.shape[0], patch_w.shape[-1]
  registers = t["register_tokens"].shape[1] if "register_tokens" in t else 0
  fields = vit_fields(
    "timm",
    width,
    depth_of(t, r"blocks\.(\d+)\..*"),
    width // 64,
    need(t, "blocks.0.mlp.fc1.weight", "the MLP width").shape[0],
    patch,
    image_size_of(need(t, "pos_embed", "the image size").shape[1] - 1, patch, "pos_embed"),
    0,
    activation="gelu",
  )
  fields.update(
    registers=registers,
    layer_scale=1.0 if "blocks.0.ls1.gamma" in t else None,  # the hub's init_values
    pos_interpolation="bicubic_antialias" if registers else "bicubic_offset",
  )
  b = "blocks.{i}."
  table = {
    **linear("patch_embed", "patch_embed.proj", CONV),
    **{n: ((n,), SAME) for n in ("cls_token", "pos_embed", "register_tokens")},
    **layer_norm(b + "norm1", b + "norm1"),
    **linear(b + "attn.qkv", b + "attn.qkv", LINEAR),
    **linear(b + "attn.proj", b + "attn.proj"),
    b + "ls1": ((b + "ls1.gamma",), SAME),
    **layer_norm(b + "norm2", b + "norm2"),
    **linear(b + "fc1", b + "mlp.fc1"),
    **linear(b + "fc2", b + "mlp.fc2"),
    b + "ls2": ((b + "ls2.gamma",), SAME),
    **layer_norm("norm", "norm"),
  }
  # The mask token (iBOT's) and any DINO / iBOT projection head are not the backbone.
  ignore = lambda n: n == "mask_token" or n.startswith(("head.", "dino_head.", "ibot_head."))
  return Spec("vit", fields, table, t, ignore, fixed=(*VIT_FIXED, "registers"))
