"""timm: a timm ViT `.pth` / `.safetensors`; a timm `.npz` is big_vision's layout.

timm's CLIP towers are told by their `norm_pre` (style 'clip'); timm runs them with exact
GELU (only its `*_clip_quickgelu_*` models use QuickGELU), so they load with
activation='gelu' and a warning that it is a guess. Its DINOv2 models bring LayerScale
(`ls1.gamma`) and, with registers, `reg_token` and a position embedding without a CLS
slot (no_embed_class: the CLS token gets none, so ours gets a zero slot). Its SigLIP towers
have no CLS token and an attention-pool head (`attn_pool`: pool='map', style 'siglip', run
with exact GELU as timm does). num_heads is not in the weights: width // 64 unless
overridden (ViT-H needs 16).

timm's `Eva` models (Perception Encoder, EVA-02, DINOv3: `timm_eva`) are told apart by the
model name: the user's `arch`, else the `architecture` in a config.json beside the file
(timm's Hub layout), else the tensors where only one family fits them (`candidates`). A
file that fits several (a timm CLIP tower's tensors are a PE model's) is refused unless
named: RoPE is not stored, so a wrong guess would load and compute another function.
"""

import json
import pathlib

from linearizer.convert import big_vision, timm_eva
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


FAMILIES = {  # what `arch` may name, and how messages name each
  "vit": "timm's VisionTransformer (ViT, DeiT, DINOv2, CLIP and SigLIP towers)",
  "pe": "Perception Encoder (vit_pe_core_*, vit_pe_spatial_*, vit_pe_lang_*)",
  "eva02": "EVA-02 (eva02_*)",
  "dinov3": "DINOv3 (vit_*_dinov3*)",
}
UNSUPPORTED = {  # timm families whose files look like one of ours, and why they are refused
  "rope_vit": "timm's own RoPE ViTs (vit_*_rope_*: mixed or axial RoPE without a CLS); "
  "not supported",
  "eva01": "EVA-01 (eva_giant_*: no RoPE, a plain MLP with q/v biases); not supported",
}


def family_of_arch(arch: str) -> str:
  """The family a timm model name (or a family key) belongs to."""
  name = arch.split(".")[0]  # e.g. 'vit_pe_core_base_patch16_224.fb'
  if name in FAMILIES:
    return name
  if name.startswith("vit_pe_"):
    return "pe"
  if name.startswith("eva02_"):
    return "eva02"
  if "_dinov3" in name:
    return "dinov3"
  if "_rope_" in name or name.startswith("eva_"):
    raise UserError(f"arch {arch!r}: " + UNSUPPORTED["rope_vit" if "_rope_" in name else "eva01"])
  return "vit"


def candidates(t: dict) -> list:
  """The families whose reading the tensors fit. RoPE is not in a file, so a file can fit
  several: PE's tensors are a CLIP tower's (norm_pre, fused qkv, a table with a CLS slot)
  with, at most, an attention pool or LayerScale more."""
  eva_attention = any(f"blocks.0.attn.{n}" in t for n in ("q_bias", "q_proj.weight"))
  eva_names = eva_attention or "blocks.0.gamma_1" in t or timm_eva.swiglu(t)
  table = "pos_embed" in t
  found = []
  if table and not eva_names:
    found.append("vit")
  if table and "norm_pre.weight" in t and not eva_attention and not timm_eva.swiglu(t):
    found.append("pe")
  if table and eva_attention and timm_eva.swiglu(t):
    found.append("eva02")
  if table and eva_attention and not timm_eva.swiglu(t) and "norm_pre.weight" not in t:
    found.append("eva01")
  if not table and "reg_token" in t:
    found.append("dinov3" if "cls_token" in t else "rope_vit")
  return found


def refuse_timm_eva(t: dict, where) -> None:
  """For the hub readers: a file in timm's `Eva` names (gamma_1, q_bias, fc1_g, norm_pre…)
  is timm's, whichever family it is; refused naming it and the format that reads it."""
  eva = [FAMILIES.get(f) or UNSUPPORTED[f] for f in candidates(t) if f != "vit"]
  if eva:
    raise UserError(f"{where} holds timm's names for " + " or ".join(eva) + "; use --format timm.")


def family(t: dict, arch: str, where) -> str:
  """The one family the file is: the one `arch` names (config.json's or the user's) if the
  tensors fit it, else the only one they fit; refused when they fit several or an
  unsupported one."""
  fits = candidates(t)
  if arch:
    named = family_of_arch(arch)
    if fits and named not in fits:
      raise UserError(
        f"{where}: arch {arch!r} is {FAMILIES[named]}, but the tensors fit "
        + " or ".join(FAMILIES.get(f) or UNSUPPORTED[f] for f in fits)
        + "."
      )
    return named
  if len(fits) > 1:
    raise UserError(
      f"{where}: the tensors fit both "
      + " and ".join(FAMILIES[f] for f in fits)
      + ", which compute different functions from the same weights (RoPE is not stored); "
      "name the model: --arch <timm model name> (convert.load(..., arch=...)), e.g. "
      "vit_base_patch16_clip_224 or vit_pe_core_base_patch16_224."
    )
  if fits and fits[0] in UNSUPPORTED:
    raise UserError(f"{where} looks like " + UNSUPPORTED[fits[0]] + ".")
  return fits[0] if fits else "vit"  # none: the ViT reading names what is missing


def _metadata(path: pathlib.Path) -> dict:
  """timm's config.json beside a file saved by timm (push_to_hf_hub / save_for_hf): its
  `architecture` and `pretrained_cfg`; {} for none (or another library's config.json)."""
  config = path.parent / "config.json"
  if not config.is_file():
    return {}
  meta = json.loads(config.read_text())
  return meta if isinstance(meta, dict) and "architecture" in meta else {}


def read(path: pathlib.Path, arch: str = "") -> Spec:
  if path.name.endswith(".npz"):  # timm's npz export is big_vision's layout ...
    spec = big_vision.read(path)
    spec.fields["activation"] = "gelu"  # ... but timm runs it with exact GELU
    return spec
  t = read_tensors(path)
  if any(n.startswith("backbone.net.") or ".simfp_" in n for n in t):
    raise UserError(
      f"{path} looks like a detection model (detectron2 / mmdet ViTDet, e.g. EVA-02's "
      "detection backbone: a ViT under backbone.net with window attention in most blocks and "
      "a simple feature pyramid): not supported; its image-classification checkpoint is "
      "(timm's eva02_* names)."
    )
  meta = _metadata(path)
  cfg = meta.get("pretrained_cfg", {})
  statistics = (cfg["mean"], cfg["std"]) if "mean" in cfg and "std" in cfg else None
  kind = family(t, arch or meta.get("architecture", ""), path)
  if kind != "vit":
    return timm_eva.read(t, kind, arch or meta.get("architecture", ""), statistics)
  spec = _vit(t)
  if statistics:
    spec.fields.update(image_mean=tuple(statistics[0]), image_std=tuple(statistics[1]))
  return spec


def _vit(t: dict) -> Spec:
  """timm's VisionTransformer (the module docstring)."""
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
