"""timm: a timm ViT `.pth` / `.safetensors`; a timm `.npz` is big_vision's layout.

timm's CLIP towers are told by their `norm_pre` (style 'clip'); timm runs them with exact
GELU (only its `*_clip_quickgelu_*` models use QuickGELU), so they load with
activation='gelu' and a warning that it is a guess. Its DINOv2 models bring LayerScale
(`ls1.gamma`) and, with registers, `reg_token` and a position embedding without a CLS
slot (no_embed_class: the CLS token gets none, so ours gets a zero slot). Its SigLIP towers
have no CLS token and an attention-pool head (`attn_pool`: pool='map', style 'siglip', run
with exact GELU as timm does). num_heads is not in the weights: width // 64 unless
overridden (ViT-H needs 16).
"""

import pathlib

from linearizer.convert import big_vision
from linearizer.convert.common import (
  CONV,
  POS_NO_CLS,
  SAME,
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
from linearizer.errors import UserError

CLIP_GELU = (
  "timm runs its CLIP towers (e.g. vit_base_patch16_clip_224.openai_ft_in1k) with exact "
  "GELU; a *_clip_quickgelu_* model's weights need activation='quick_gelu'"
)


def eva_family(t: dict):
  """What timm Eva-class model (DINOv3, EVA-02, Perception Encoder) the tensors are, or
  None. These rotate queries and keys by 2-D RoPE, whose frequencies are buffers the files
  do not store: read as a plain ViT, a file would load and compute another function (PE
  core fits our CLIP reading exactly). Told apart by the tensors only they have."""
  if "blocks.0.gamma_1" in t or ("reg_token" in t and "pos_embed" not in t):
    return "timm's DINOv3 (vit_*_dinov3: RoPE, storage tokens, no position table)"
  eva02 = ("attn.q_bias", "attn.q_proj.weight", "attn.norm.weight", "mlp.fc1_g.weight")
  if any(f"blocks.0.{k}" in t for k in eva02):
    return "timm's EVA-02 (eva02_*: RoPE, SwiGLU, sub-LN)"
  if "norm_pre.weight" in t and ("attn_pool.latent" in t or "norm.weight" not in t):
    return "timm's Perception Encoder (vit_pe_core_* / vit_pe_spatial_*: RoPE beside its table)"
  return None


def read(path: pathlib.Path) -> Spec:
  if path.name.endswith(".npz"):  # timm's npz export is big_vision's layout ...
    spec = big_vision.read(path)
    spec.fields["activation"] = "gelu"  # ... but timm runs it with exact GELU
    return spec
  t = read_tensors(path)
  family = eva_family(t)
  if family:
    raise UserError(
      f"{path} looks like {family}, an Eva model: it applies rotary position embeddings "
      "that the file does not store, so reading it as a ViT would compute another "
      "function; not supported yet (timm's ViT, DeiT, DINOv2, CLIP and SigLIP towers are)."
    )
  patch_w = need(t, "patch_embed.proj.weight", "the width and patch")
  pos = need(t, "pos_embed", "the image size")
  head = t.get("head.weight")
  width, patch = patch_w.shape[0], patch_w.shape[-1]
  has_cls, has_map = "cls_token" in t, "attn_pool.latent" in t
  # timm's CLIP: norm_pre, no conv bias; its SigLIP: no CLS, attention pool
  style = "clip" if "norm_pre.weight" in t else "siglip" if has_map and not has_cls else "timm"
  slots = pos.shape[1]
  pos_has_cls = has_cls and round((slots - 1) ** 0.5) ** 2 == slots - 1  # else no_embed_class
  fields = vit_fields(
    style,
    width,
    depth_of(t, r"blocks\.(\d+)\..*"),
    width // 64,
    need(t, "blocks.0.mlp.fc1.weight", "the MLP width").shape[0],
    patch,
    image_size_of(slots - pos_has_cls, patch, "pos_embed"),
    0 if head is None else head.shape[0],
    head_bias="head.bias" in t,
    activation="gelu",  # timm's, for both styles (see the docstring)
  )
  # timm resamples position embeddings (checkpoint_filter_fn, dynamic_img_size) through
  # resample_abs_pos_embed, whose default is antialias=True.
  fields["pos_interpolation"] = "bicubic_antialias"
  fields.update(
    cls_token=has_cls,
    pool="map" if has_map else "cls" if has_cls else "gap",
    registers=t["reg_token"].shape[1] if "reg_token" in t else 0,
    layer_scale=1.0 if "blocks.0.ls1.gamma" in t else None,  # timm's init_values for DINOv2
  )
  b = "blocks.{i}."
  table = {
    **linear("patch_embed", "patch_embed.proj", CONV),
    "cls_token": (("cls_token",), SAME),
    "register_tokens": (("reg_token",), SAME),
    "pos_embed": (("pos_embed",), SAME if pos_has_cls or not has_cls else POS_NO_CLS),
    **layer_norm("ln_pre", "norm_pre"),
    **layer_norm(b + "norm1", b + "norm1"),
    **linear(b + "attn.qkv", b + "attn.qkv"),
    **linear(b + "attn.proj", b + "attn.proj"),
    b + "ls1": ((b + "ls1.gamma",), SAME),
    **layer_norm(b + "norm2", b + "norm2"),
    **linear(b + "fc1", b + "mlp.fc1"),
    **linear(b + "fc2", b + "mlp.fc2"),
    b + "ls2": ((b + "ls2.gamma",), SAME),
    **layer_norm("norm", "norm"),
    **linear("head", "head"),
    # timm's AttentionPoolLatent: a latent query, fused kv (keys first), as our MAPHead
    "map_head.probe": (("attn_pool.latent",), SAME),
    **linear("map_head.q", "attn_pool.q"),
    **linear("map_head.kv", "attn_pool.kv"),
    **linear("map_head.proj", "attn_pool.proj"),
    **layer_norm("map_head.norm", "attn_pool.norm"),
    **linear("map_head.fc1", "attn_pool.mlp.fc1"),
    **linear("map_head.fc2", "attn_pool.mlp.fc2"),
  }
  guesses = {"activation": CLIP_GELU} if style == "clip" else {}
  fixed = (*VIT_FIXED, "cls_token", "registers", *(("pool",) if has_map else ()))
  return Spec("vit", fields, table, t, fixed=fixed, guesses=guesses)  # heads: not shown
