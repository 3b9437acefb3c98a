"""dinov3: DINOv3's own release, the torch-hub `.pth` (facebookresearch/dinov3).

A bare state dict (the hub's `dinov3_vit*16*_pretrain_*.pth`) or a training checkpoint's
`teacher` / `model` entry, with or without a `backbone.` prefix. Every released ViT is
read as the hub builds it (dinov3/hub/backbones.py): CLS then `storage_tokens` (registers),
no position table, RoPE with base 100 on coordinates normalised per axis
(`rope.py`, kind 'dinov3'; its training-time shift / jitter / rescale are off for a frozen
teacher), LayerNorm eps 1e-5 ('layernormbf16'), exact GELU or a SwiGLU MLP
(silu(w1 x) * w2 x -> w3), LayerScale, and a fused qkv whose k bias `bias_mask` zeroes.
(The ConvNeXt releases are no ViTs: refused as a mismatch.)

num_heads: the file's `rope_embed.periods` holds head_dim / 4 values, so it fixes the
heads; a file without it gets width // 64 (head dim 64, every release but the 7B's 128)
with a warning. The image statistics are ImageNet's, as the hub's LVD-1689M models use;
the SAT-493M (satellite) models need theirs set (a warning where the file may be one).
"""

import pathlib

import numpy as np

from linearizer.convert import timm
from linearizer.convert.common import (
  CONV,
  LINEAR,
  SAME,
  VIT_FIXED,
  Spec,
  Tx,
  depth_of,
  find_prefix,
  layer_norm,
  linear,
  need,
  read_tensors,
  vit_fields,
)
from linearizer.errors import UserError

BASE = 100.0  # the hub's pos_embed_rope_base, in every released model
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
SATELLITE = ((0.430, 0.411, 0.296), (0.213, 0.156, 0.143))  # the README's, for SAT-493M
# The hub's LinearKMaskedBias computes with bias * bias_mask.
MASKED = Tx(lambda bias, mask: bias * mask, lambda b: (b, b))


def _check_periods(path, periods, width):
  """Refuse periods other than BASE^(2i / (D/2)), i < D/4, for a head dim D dividing the
  width: another base (or min / max periods) computes another function. The released
  files hold them computed in bfloat16 (timm's RotaryEmbeddingDinoV3 notes it): torch's
  bf16 power is off by up to 0.33% (head dim 128), so they agree within 2^-7."""
  n = periods.size
  want = BASE ** (np.arange(n) / max(n, 1))
  ok = periods.ndim == 1 and n and not width % (4 * n)
  if not ok or not np.allclose(periods, want, rtol=2**-7, atol=0):
    shown = lambda a: "[" + ", ".join(f"{x:.4g}" for x in np.ravel(a)) + "]"
    raise UserError(
      f"{path}: rope_embed.periods {shown(periods)} are not the RoPE periods of base "
      f"{BASE:g} for head dim {4 * n} (the width {width} a multiple of it): {shown(want)}; "
      "a model trained with another base or min / max periods computes another function, "
      "which this reader does not support."
    )


def _check_bias_masks(path, t, width):
  """The hub initialises bias_mask to 1 on q and v, 0 on k, and never trains it; any
  other mask (e.g. NaN: never initialised) would not be the model that was trained."""
  want = np.repeat(np.float32([1, 0, 1]), width)
  for name in sorted(n for n in t if n.endswith(".bias_mask")):
    if t[name].shape != want.shape or not np.array_equal(t[name], want):
      raise UserError(
        f"{path}: {name} is not the hub's k-bias mask (1 on q and v, 0 on k, length "
        f"{3 * width}); found {np.unique(t[name]).tolist()[:5]} over {t[name].shape}."
      )


def read(path: pathlib.Path) -> Spec:
  t = read_tensors(path, ("teacher", "model", "state_dict"))
  p = find_prefix(t, "patch_embed.proj.weight") or ""
  t = {n[len(p) :]: v for n, v in t.items() if n.startswith(p)}  # e.g. a `backbone.` prefix
  timm.refuse_timm_eva(t, path)
  if "pos_embed" in t or "register_tokens" in t:
    raise UserError(
      f"{path} looks like DINOv2 (a learned position table, `register_tokens`); use "
      "--format dinov2."
    )
  patch_w = need(t, "patch_embed.proj.weight", "the width and patch")
  width, patch = patch_w.shape[0], patch_w.shape[-1]
  periods = t.get("rope_embed.periods")
  if periods is not None:
    _check_periods(path, periods, width)
  _check_bias_masks(path, t, width)
  swiglu = "blocks.0.mlp.w1.weight" in t
  fc1 = "blocks.0.mlp.w1.weight" if swiglu else "blocks.0.mlp.fc1.weight"
  fields = vit_fields(
    "timm",
    width,
    depth_of(t, r"blocks\.(\d+)\..*"),
    width // (4 * periods.shape[0] if periods is not None else 64),
    need(t, fc1, "the MLP width").shape[0],
    patch,
    224,  # the hub's img_size; it has no position table, so any size runs as trained
    0,
    eps=1e-5,
    activation="gelu",
  )
  registers = t["storage_tokens"].shape[1] if "storage_tokens" in t else 0
  qkv_bias = "blocks.0.attn.qkv.bias" in t
  mean, std = IMAGENET
  fields.update(
    registers=registers,
    pos_embed=False,
    rope="dinov3",
    rope_temperature=BASE,
    qkv_bias=qkv_bias,
    mlp="swiglu" if swiglu else "plain",
    layer_scale=1e-5 if "blocks.0.ls1.gamma" in t else None,  # the hub's layerscale_init
    image_mean=mean,
    image_std=std,
  )
  b = "blocks.{i}."
  if swiglu:  # silu(w1 x) * w2 x: w1 is our gate (timm's fc1_g), w2 our fc1 (fc1_x)
    mlp = {**linear(b + "gate", b + "mlp.w1"), **linear(b + "fc1", b + "mlp.w2")}
    mlp.update(linear(b + "fc2", b + "mlp.w3"))
  else:
    mlp = {**linear(b + "fc1", b + "mlp.fc1"), **linear(b + "fc2", b + "mlp.fc2")}
  table = {
    **linear("patch_embed", "patch_embed.proj", CONV),
    "cls_token": (("cls_token",), SAME),
    "register_tokens": (("storage_tokens",), SAME),
    **layer_norm(b + "norm1", b + "norm1"),
    **linear(b + "attn.qkv", b + "attn.qkv", LINEAR),
    **linear(b + "attn.proj", b + "attn.proj"),
    b + "ls1": ((b + "ls1.gamma",), SAME),
    **layer_norm(b + "norm2", b + "norm2"),
    **mlp,
    b + "ls2": ((b + "ls2.gamma",), SAME),
    **layer_norm("norm", "norm"),
  }
  if "blocks.0.attn.qkv.bias_mask" in t:  # the matcher wants it in every block then
    table[b + "attn.qkv.bias"] = ((b + "attn.qkv.bias", b + "attn.qkv.bias_mask"), MASKED)
  # Inert in a frozen teacher: the iBOT mask token; periods once checked (our rope.tables
  # computes the same in float32); local_cls_norm, which the hub applies to local crops in
  # training only (ViT-L SAT-493M and 7B files have it).
  inert = ("mask_token", "rope_embed.periods")
  ignore = lambda n: n in inert or n.startswith("local_cls_norm.")
  guesses = {}
  if periods is None:
    guesses["num_heads"] = (
      "the file holds no rope_embed.periods, which show the head dim: width // 64 (head "
      "dim 64, as every released DINOv3 ViT but the 7B's 128), and the RoPE base is "
      f"assumed {BASE:g}"
    )
  if "local_cls_norm.weight" in t:  # a ViT-L SAT-493M or a 7B (LVD or SAT) file
    guesses["image_mean"] = (
      f"ImageNet's, as is image_std; the SAT-493M (satellite) weights were trained with "
      f"mean {SATELLITE[0]} and std {SATELLITE[1]}: set both for those"
    )
  fixed = (*VIT_FIXED, "registers", "pos_embed", "rope", "qkv_bias", "mlp")
  if periods is not None:
    fixed += ("num_heads", "rope_temperature")
  return Spec("vit", fields, table, t, ignore, fixed=fixed, guesses=guesses)
