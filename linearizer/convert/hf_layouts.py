"""The mapping tables of the `hf` reader: one per transformers family, {our parameter
path ("{i}" = layer): (their tensor names, Tx)} for a model whose tensors sit under prefix
`p`, embeddings under `e` and layer i under `L` (hf.py tells which family and prefixes a
file holds).
"""

import math

import jax.numpy as jnp
import numpy as np

from linearizer.convert.common import (
  CONV,
  LINEAR,
  QKV,
  QKV_BIAS,
  QUERY_KEY_VALUE,
  ROW,
  SAME,
  TOKEN,
  Tx,
  each,
  layer_norm,
  linear,
)


def clip_table(p, e, L):
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


def vit_table(p, e, L):
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


def dinov2_table(p, e, L, t):
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


def qkv_bias(present: str) -> Tx:
  """Our fused qkv bias from the biases of q, k, v the file has (`present`, e.g. 'qv'),
  zeros for the others: exact, as a projection without a bias adds none (DINOv3 has no k
  bias)."""

  def fwd(*biases):
    have = dict(zip(present, biases))
    return np.concatenate([have.get(x, np.zeros_like(biases[0])) for x in "qkv"])

  def inv(b):
    parts = dict(zip("qkv", jnp.split(b, 3)))
    return tuple(parts[x] for x in present)

  return Tx(fwd, inv)


def dinov3_table(p, e, L, biases):
  """DINOv3: CLS and storage tokens, no position table (RoPE is computed, not stored),
  LayerScale gains, q/k/v/o_proj with the qkv `biases` the file has, and up/down_proj
  (plus gate_proj for the gated MLP)."""
  a, m = L + "attention.", L + "mlp."
  return {
    **linear("patch_embed", e + "patch_embeddings", CONV),
    "cls_token": ((e + "cls_token",), SAME),
    "register_tokens": ((e + "register_tokens",), SAME),
    **layer_norm("blocks.{i}.norm1", L + "norm1"),
    "blocks.{i}.attn.qkv.kernel": (each(a + "{}_proj.weight", "qkv"), QKV),
    "blocks.{i}.attn.qkv.bias": (each(a + "{}_proj.bias", biases), qkv_bias(biases)),
    **linear("blocks.{i}.attn.proj", a + "o_proj"),
    "blocks.{i}.ls1": ((L + "layer_scale1.lambda1",), SAME),
    **layer_norm("blocks.{i}.norm2", L + "norm2"),
    **linear("blocks.{i}.gate", m + "gate_proj"),
    **linear("blocks.{i}.fc1", m + "up_proj"),
    **linear("blocks.{i}.fc2", m + "down_proj"),
    "blocks.{i}.ls2": ((L + "layer_scale2.lambda1",), SAME),
    **layer_norm("norm", p + "norm"),
  }


# torch.nn.MultiheadAttention's fused in_proj (3D, D) -> our probe's q (D, D) and the
# tokens' kv (D, 2D) (the inverses give shapes only).
IN_PROJ_Q = Tx(lambda w: w[: w.shape[0] // 3].T, lambda k: (jnp.concatenate([k.T] * 3),))
IN_PROJ_KV = Tx(lambda w: w[w.shape[0] // 3 :].T, lambda k: (jnp.concatenate([k.T, k.T[::2]]),))
IN_BIAS_Q = Tx(lambda b: b[: b.shape[0] // 3], lambda b: (jnp.concatenate([b] * 3),))
IN_BIAS_KV = Tx(lambda b: b[b.shape[0] // 3 :], lambda b: (jnp.concatenate([b, b[::2]]),))


def siglip_table(p, e, L):
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


# SigLIP 2 NaFlex's patch_embedding, an nn.Linear over each patch flattened (row, column,
# channel) as its image processor flattens it (convert_image_to_patches) -> our conv (HWIO).
PATCH_LINEAR = Tx(
  lambda w: w.reshape(len(w), *(math.isqrt(w.shape[1] // 3),) * 2, 3).transpose(1, 2, 3, 0),
  lambda k: (k.transpose(3, 0, 1, 2).reshape(k.shape[-1], -1),),
)
