"""timm's `Eva` class: Perception Encoder, EVA-02 and DINOv3 (the RoPE teachers).

All three rotate the patches' queries and keys by 2-D RoPE (`models/rope.py`), whose
frequencies no file stores: the family, named by the user (`arch`), by the file's
config.json or, where only one family fits, by its tensors (`timm.family`), decides them.

  family  RoPE                      absolute table  attention            MLP
  pe      'pe' (offset 1; 0 for     yes (CLS slot)  fused qkv + bias     plain GELU
          the gigantic models)
  eva02   'eva02' (grid 16)         yes (CLS slot)  q/v bias, no k bias  SwiGLU (fused GluMlp
                                                                         for Ti/S; sub-LN B/L)
  dinov3  'dinov3' (T 100)          none            no bias, or q/v      plain, or SwiGLU (S+, H+)

PE (`vit_pe_*`): `norm_pre` (style 'clip', no patch-conv bias), LayerNorm eps 1e-5, an
attention-pool head of 8 heads (core) or no final norm (spatial, lang); its RoPE
coordinates are scaled to the grid of its table (timm's `ref_feat_shape` is that grid for
every PE model). EVA-02 (`eva02_*`): the CLIP towers add a LayerNorm inside attention
(`attn.norm`) and pool the CLS after the final norm; the others pool the mean patch through
`fc_norm`, with no final norm. DINOv3 (`vit_*_dinov3*`): CLS, four storage tokens
(`reg_token`, our registers), LayerScale, eps 1e-5, the mean patch pooled after the final
norm (timm's `global_pool='avg'`). Image statistics: the file's `pretrained_cfg` where it
has one, else the family's (PE 0.5/0.5, EVA-02 OpenAI CLIP's, DINOv3 ImageNet's).
"""

import jax.numpy as jnp
import numpy as np

from linearizer.convert.common import (
  CONV,
  LINEAR,
  QKV,
  SAME,
  VIT_FIXED,
  Spec,
  Tx,
  depth_of,
  image_size_of,
  layer_norm,
  linear,
  need,
  vit_fields,
)

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
OPENAI_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
STATISTICS = {"pe": ((0.5,) * 3, (0.5,) * 3), "eva02": OPENAI_CLIP, "dinov3": IMAGENET}
PE_MAP_HEADS = 8  # timm's attn_pool_num_heads for every PE core model
EVA02_ROPE_GRID = 16  # timm's ref_feat_shape for every EVA-02 model (224 / 14)


def _zero_k(q, v):
  return np.concatenate([q, np.zeros_like(q), v])


# q and v biases (the k bias is a fixed zero in EVA-02 and DINOv3) -> our fused qkv bias;
# the inverses only give shapes (traced).
QV_BIAS = Tx(_zero_k, lambda b: (b[: b.shape[0] // 3], b[2 * b.shape[0] // 3 :]))
# timm's GluMlp packs [gate; value] in one fc1 (gate_last=False: SiLU on the first half).
_twice = lambda a: (jnp.concatenate([a, a]),)
GATE_HALF = Tx(lambda w: w[: w.shape[0] // 2].T, lambda k: _twice(k.T))
VALUE_HALF = Tx(lambda w: w[w.shape[0] // 2 :].T, lambda k: _twice(k.T))
GATE_BIAS = Tx(lambda b: b[: b.shape[0] // 2], _twice)
VALUE_BIAS = Tx(lambda b: b[b.shape[0] // 2 :], _twice)


def _attention(t, b):
  """The table of a block's attention, by how the file stores q, k, v."""
  a = b + "attn."
  if a.format(i=0) + "q_proj.weight" in t:  # EVA-02 B/L: separate projections
    kernel = ((a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"), QKV)
    bias = ((a + "q_proj.bias", a + "v_proj.bias"), QV_BIAS)
  else:
    kernel = ((a + "qkv.weight",), LINEAR)
    qv = a.format(i=0) + "q_bias" in t
    bias = ((a + "q_bias", a + "v_bias"), QV_BIAS) if qv else ((a + "qkv.bias",), SAME)
  return {
    b + "attn.qkv.kernel": kernel,
    b + "attn.qkv.bias": bias,
    **layer_norm(b + "attn.norm", a + "norm"),
    **linear(b + "attn.proj", a + "proj"),
  }


def _mlp(t, b):
  """The table of a block's MLP: plain, timm's SwiGLU (fc1_g, fc1_x) or its GluMlp."""
  m = b + "mlp."
  if m.format(i=0) + "fc1_g.weight" in t:
    return {
      **linear(b + "gate", m + "fc1_g"),
      **linear(b + "fc1", m + "fc1_x"),
      **layer_norm(b + "mlp_norm", m + "norm"),
      **linear(b + "fc2", m + "fc2"),
    }
  if _glu_packed(t):
    return {
      b + "gate.kernel": ((m + "fc1.weight",), GATE_HALF),
      b + "gate.bias": ((m + "fc1.bias",), GATE_BIAS),
      b + "fc1.kernel": ((m + "fc1.weight",), VALUE_HALF),
      b + "fc1.bias": ((m + "fc1.bias",), VALUE_BIAS),
      **linear(b + "fc2", m + "fc2"),
    }
  return {**linear(b + "fc1", m + "fc1"), **linear(b + "fc2", m + "fc2")}


def _glu_packed(t) -> bool:
  """timm's GluMlp: fc1 yields twice the features fc2 takes."""
  fc1, fc2 = t.get("blocks.0.mlp.fc1.weight"), t.get("blocks.0.mlp.fc2.weight")
  return fc1 is not None and fc2 is not None and fc1.shape[0] == 2 * fc2.shape[1]


def swiglu(t) -> bool:
  return "blocks.0.mlp.fc1_g.weight" in t or _glu_packed(t)


def _mlp_dim(t) -> int:
  if "blocks.0.mlp.fc1_g.weight" in t:
    return t["blocks.0.mlp.fc1_g.weight"].shape[0]
  fc1 = need(t, "blocks.0.mlp.fc1.weight", "the MLP width")
  return fc1.shape[0] // 2 if _glu_packed(t) else fc1.shape[0]


def read(t: dict, family: str, arch: str, statistics) -> Spec:
  """The Spec of a timm Eva file of `family` ('pe', 'eva02' or 'dinov3').

  Args:
    t: the file's tensors.
    family: as `timm.family` told it.
    arch: the timm model name where known (config.json or the user's), else ''.
    statistics: (mean, std) from the file's pretrained_cfg, or None: the family's.
  """
  patch_w = need(t, "patch_embed.proj.weight", "the width and patch")
  width, patch = patch_w.shape[0], patch_w.shape[-1]
  has_cls = "cls_token" in t
  if family == "dinov3":  # no table: the grid is the user's (image_size), 224 by default
    image_size = 224 // patch * patch
  else:
    slots = need(t, "pos_embed", "the image size").shape[1]
    image_size = image_size_of(slots - has_cls, patch, "pos_embed")
  grid = image_size // patch
  head = t.get("head.weight")
  fields = vit_fields(
    "clip" if family == "pe" else "timm",
    width,
    depth_of(t, r"blocks\.(\d+)\..*"),
    width // 64,
    _mlp_dim(t),
    patch,
    image_size,
    0 if head is None else head.shape[0],
    eps=1e-6 if family == "eva02" else 1e-5,
    activation="gelu",
  )
  has_map, final_norm, fc_norm = "attn_pool.latent" in t, "norm.weight" in t, "fc_norm.weight" in t
  gigantic = "gigantic" in arch or (not arch and width == 1536)  # PE G: no grid offset
  mean, std = statistics or STATISTICS[family]
  fields.update(
    rope={"pe": "pe", "eva02": "eva02", "dinov3": "dinov3"}[family],
    rope_offset=1.0 if family == "pe" and not gigantic else 0.0,
    rope_grid={"pe": grid, "eva02": EVA02_ROPE_GRID}.get(family),
    pos_embed=family != "dinov3",
    pos_interpolation="bicubic_antialias",  # timm's resample_abs_pos_embed
    qkv_bias=any(f"blocks.0.attn.{n}" in t for n in ("qkv.bias", "q_bias", "q_proj.bias")),
    mlp="swiglu" if swiglu(t) else "plain",
    mlp_norm="blocks.0.mlp.norm.weight" in t,
    attn_norm="blocks.0.attn.norm.weight" in t,
    final_norm=final_norm,
    fc_norm=fc_norm,
    cls_token=has_cls,
    registers=t["reg_token"].shape[1] if "reg_token" in t else 0,
    layer_scale=1.0 if "blocks.0.gamma_1" in t else None,
    pool="map" if has_map else "gap" if fc_norm or not has_cls or family != "eva02" else "cls",
    map_heads=PE_MAP_HEADS if has_map else None,
    image_mean=tuple(mean),
    image_std=tuple(std),
  )
  b = "blocks.{i}."
  table = {
    **linear("patch_embed", "patch_embed.proj", CONV),
    "cls_token": (("cls_token",), SAME),
    "register_tokens": (("reg_token",), SAME),
    "pos_embed": (("pos_embed",), SAME),
    **layer_norm("ln_pre", "norm_pre"),
    **layer_norm(b + "norm1", b + "norm1"),
    **_attention(t, b),
    b + "ls1": ((b + "gamma_1",), SAME),
    **layer_norm(b + "norm2", b + "norm2"),
    **_mlp(t, b),
    b + "ls2": ((b + "gamma_2",), SAME),
    **layer_norm("norm", "norm"),
    **layer_norm("fc_norm", "fc_norm"),
    **linear("head", "head"),
    "map_head.probe": (("attn_pool.latent",), SAME),
    **linear("map_head.q", "attn_pool.q"),
    **linear("map_head.kv", "attn_pool.kv"),
    **linear("map_head.proj", "attn_pool.proj"),
    **layer_norm("map_head.norm", "attn_pool.norm"),
    **linear("map_head.fc1", "attn_pool.mlp.fc1"),
    **linear("map_head.fc2", "attn_pool.mlp.fc2"),
  }
  fixed = (*VIT_FIXED, "cls_token", "registers", "rope", "pos_embed", "mlp", "final_norm")
  # DINOv3's grid is not in its file: any image_size is its own (RoPE, no table).
  return Spec("vit", fields, table, t, fixed=fixed)
