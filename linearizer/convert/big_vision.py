"""big_vision: `.npz`, original-ViT or big_vision numbering, scanned or not.

num_heads is read off the q kernel; the MLP activation is flax's tanh-approximate GELU, as
big_vision runs it. A top-level `pos_embedding` (no CLS slot) gets a zero CLS position. A
ViT without `cls` (pool_type 'gap' or 'map') loads with cls_token=False; its `MAPHead_0`
(SigLIP's image tower, `params/img/...`) as pool='map', then in style 'siglip' (inputs in
[-1, 1], i.e. mean = std = 0.5, as SigLIP's preprocessing).
"""

import pathlib
import re

import jax.numpy as jnp
import numpy as np

from linearizer.convert.common import (
  POS_NO_CLS,
  QUERY_KEY_VALUE,
  SAME,
  VIT_FIXED,
  Spec,
  Tx,
  Uninferable,
  depth_of,
  each,
  find_prefix,
  image_size_of,
  layer_norm,
  need,
  read_tensors,
  vit_fields,
)


def _heads_qkv(heads):  # q/k/v kernels (D, heads, head_dim) -> (D, 3D)
  return Tx(
    lambda *a: np.concatenate([x.reshape(x.shape[0], -1) for x in a], 1),
    lambda k: tuple(p.reshape(p.shape[0], heads, -1) for p in jnp.split(k, 3, 1)),
  )


def _heads_qkv_bias(heads):  # (heads, head_dim) x3 -> (3D,)
  return Tx(
    lambda *a: np.concatenate([x.reshape(-1) for x in a]),
    lambda b: tuple(p.reshape(heads, -1) for p in jnp.split(b, 3)),
  )


def _heads_out(heads):  # (heads, head_dim, D) -> (D, D)
  return Tx(lambda a: a.reshape(-1, a.shape[-1]), lambda k: (k.reshape(heads, -1, k.shape[-1]),))


def _dense(ours, theirs):
  """A flax Dense saved by big_vision: '/'-separated, already (in, out)."""
  return {
    f"{ours}.kernel": ((f"{theirs}/kernel",), SAME),
    f"{ours}.bias": ((f"{theirs}/bias",), SAME),
  }


def _flat(heads):  # a flax attention kernel (D, heads, head_dim) -> (D, D)
  return Tx(lambda a: a.reshape(a.shape[0], -1), lambda k: (k.reshape(k.shape[0], heads, -1),))


def _flat_bias(heads):  # (heads, head_dim) -> (D,)
  return Tx(lambda b: b.reshape(-1), lambda b: (b.reshape(heads, -1),))


def _fused_kv(heads):  # key and value kernels (D, heads, head_dim) -> our fused (D, 2D)
  return Tx(
    lambda k, v: np.concatenate([k.reshape(k.shape[0], -1), v.reshape(v.shape[0], -1)], 1),
    lambda kv: tuple(x.reshape(x.shape[0], heads, -1) for x in jnp.split(kv, 2, 1)),
  )


def _fused_kv_bias(heads):  # key and value biases (heads, head_dim) -> (2D,)
  return Tx(
    lambda k, v: np.concatenate([k.reshape(-1), v.reshape(-1)]),
    lambda b: tuple(x.reshape(heads, -1) for x in jnp.split(b, 2)),
  )


def _map_head(p, heads):
  """big_vision's MAPHead_0 -> our map_head (the probe's q, the tokens' fused kv)."""
  h, a = p + "MAPHead_0/", p + "MAPHead_0/MultiHeadDotProductAttention_0/"
  return {
    "map_head.probe": ((h + "probe",), SAME),
    "map_head.q.kernel": ((a + "query/kernel",), _flat(heads)),
    "map_head.q.bias": ((a + "query/bias",), _flat_bias(heads)),
    "map_head.kv.kernel": ((a + "key/kernel", a + "value/kernel"), _fused_kv(heads)),
    "map_head.kv.bias": ((a + "key/bias", a + "value/bias"), _fused_kv_bias(heads)),
    "map_head.proj.kernel": ((a + "out/kernel",), _heads_out(heads)),
    "map_head.proj.bias": ((a + "out/bias",), SAME),
    **layer_norm("map_head.norm", h + "LayerNorm_0", sep="/", scale="scale"),
    **_dense("map_head.fc1", h + "MlpBlock_0/Dense_0"),
    **_dense("map_head.fc2", h + "MlpBlock_0/Dense_1"),
  }


def read(path: pathlib.Path) -> Spec:
  t = read_tensors(path)
  p = _find_encoder(t)
  B = p + "Transformer/encoderblock_{i}/"
  original = any("/MultiHeadDotProductAttention_1/" in n for n in t)  # original ViT numbering
  attn, ln2, mlp = (
    ("MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3")
    if original
    else ("MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0")
  )
  A = B + attn + "/"
  kernel = need(t, p + "embedding/kernel", "the width and patch")  # HWIO
  q = need(t, A.format(i=0) + "query/kernel", "the number of heads")  # (D, heads, head_dim)
  cls_pos = p + "Transformer/posembed_input/pos_embedding"
  pos_name = cls_pos if cls_pos in t else p + "pos_embedding"
  pos = need(t, pos_name, "the image size")
  head = t.get(p + "head/kernel")
  patch, width = kernel.shape[0], kernel.shape[-1]
  has_cls, has_map = p + "cls" in t, p + "MAPHead_0/probe" in t
  fields = vit_fields(
    "siglip" if has_map and not has_cls else "timm",
    width,
    depth_of(t, re.escape(p) + r"Transformer/encoderblock_(\d+)/.*"),
    q.shape[1],
    need(t, B.format(i=0) + mlp + "/Dense_0/kernel", "the MLP width").shape[1],
    patch,
    image_size_of(pos.shape[1] - (pos_name == cls_pos), patch, pos_name),
    0 if head is None else head.shape[1],
    head_bias=head is None or p + "head/bias" in t,  # (no head: the default)
    activation="gelu_tanh",
  )  # flax's nn.gelu, which big_vision's MLP uses, is tanh-approximate
  fields.update(cls_token=has_cls, pool="map" if has_map else "cls" if has_cls else "gap")
  heads = fields["num_heads"]
  table = {
    "patch_embed.kernel": ((p + "embedding/kernel",), SAME),
    "patch_embed.bias": ((p + "embedding/bias",), SAME),
    "cls_token": ((p + "cls",), SAME),
    "pos_embed": ((pos_name,), SAME if pos_name == cls_pos or not has_cls else POS_NO_CLS),
    **layer_norm("blocks.{i}.norm1", B + "LayerNorm_0", sep="/", scale="scale"),
    "blocks.{i}.attn.qkv.kernel": (each(A + "{}/kernel", QUERY_KEY_VALUE), _heads_qkv(heads)),
    "blocks.{i}.attn.qkv.bias": (each(A + "{}/bias", QUERY_KEY_VALUE), _heads_qkv_bias(heads)),
    "blocks.{i}.attn.proj.kernel": ((A + "out/kernel",), _heads_out(heads)),
    "blocks.{i}.attn.proj.bias": ((A + "out/bias",), SAME),
    **layer_norm("blocks.{i}.norm2", B + ln2, sep="/", scale="scale"),
    **_dense("blocks.{i}.fc1", B + mlp + "/Dense_0"),
    **_dense("blocks.{i}.fc2", B + mlp + "/Dense_1"),
    **layer_norm("norm", p + "Transformer/encoder_norm", sep="/", scale="scale"),
    **_dense("head", p + "head"),
    **_map_head(p, heads),
  }
  # other towers ignored; the q kernel shows the heads
  return Spec(
    "vit",
    fields,
    table,
    t,
    ignore=lambda n: not n.startswith(p),
    fixed=(*VIT_FIXED, "num_heads", "cls_token", *(("pool",) if has_map else ())),
  )


def _find_encoder(t: dict) -> str:
  """The encoder's name prefix; a scanned encoder's stacked blocks are unstacked in `t`."""
  p = find_prefix(t, "Transformer/encoder_norm/scale")
  if p is None:
    raise Uninferable("cannot find the encoder: no '[prefix]Transformer/encoder_norm/scale'")
  # A scanned encoder stores every block stacked under `encoderblock/`: unstack it.
  for name in [n for n in t if n.startswith(p + "Transformer/encoderblock/")]:
    stacked = t.pop(name)
    for i, layer in enumerate(stacked):
      t[name.replace("/encoderblock/", f"/encoderblock_{i}/")] = layer
  return p
