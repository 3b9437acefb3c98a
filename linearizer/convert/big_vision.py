"""big_vision: `.npz`, original-ViT or big_vision numbering, scanned or not.

num_heads is read off the q kernel; the MLP activation is flax's tanh-approximate GELU, as
big_vision runs it. A top-level `pos_embedding` (no CLS slot) gets a zero CLS position.
"""

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
  POS_NO_CLS,
  QUERY_KEY_VALUE,
  SAME,
  _dense,
  _each,
  _heads_out,
  _heads_qkv,
  _heads_qkv_bias,
  _ln,
  read_tensors,
)


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
  kernel = _need(t, p + "embedding/kernel", "the width and patch")  # HWIO
  q = _need(t, A.format(i=0) + "query/kernel", "the number of heads")  # (D, heads, head_dim)
  cls_pos = p + "Transformer/posembed_input/pos_embedding"
  pos_name = cls_pos if cls_pos in t else p + "pos_embedding"
  pos = _need(t, pos_name, "the image size")
  head = t.get(p + "head/kernel")
  patch, width = kernel.shape[0], kernel.shape[-1]
  fields = _vit_fields(
    "timm",
    width,
    _depth(t, re.escape(p) + r"Transformer/encoderblock_(\d+)/.*"),
    q.shape[1],
    _need(t, B.format(i=0) + mlp + "/Dense_0/kernel", "the MLP width").shape[1],
    patch,
    _grid_size(pos.shape[1] - (pos_name == cls_pos), patch, pos_name),
    0 if head is None else head.shape[1],
    head_bias=p + "head/bias" in t,
    activation="gelu_tanh",
  )  # flax's nn.gelu, which big_vision's MLP uses, is tanh-approximate
  heads = fields["num_heads"]
  table = {
    "patch_embed.kernel": ((p + "embedding/kernel",), SAME),
    "patch_embed.bias": ((p + "embedding/bias",), SAME),
    "cls_token": ((p + "cls",), SAME),
    "pos_embed": ((pos_name,), SAME if pos_name == cls_pos else POS_NO_CLS),
    **_ln("blocks.{i}.norm1", B + "LayerNorm_0", sep="/", scale="scale"),
    "blocks.{i}.attn.qkv.kernel": (_each(A + "{}/kernel", QUERY_KEY_VALUE), _heads_qkv(heads)),
    "blocks.{i}.attn.qkv.bias": (_each(A + "{}/bias", QUERY_KEY_VALUE), _heads_qkv_bias(heads)),
    "blocks.{i}.attn.proj.kernel": ((A + "out/kernel",), _heads_out(heads)),
    "blocks.{i}.attn.proj.bias": ((A + "out/bias",), SAME),
    **_ln("blocks.{i}.norm2", B + ln2, sep="/", scale="scale"),
    **_dense("blocks.{i}.fc1", B + mlp + "/Dense_0"),
    **_dense("blocks.{i}.fc2", B + mlp + "/Dense_1"),
    **_ln("norm", p + "Transformer/encoder_norm", sep="/", scale="scale"),
    **_dense("head", p + "head"),
  }
  # other towers ignored; the q kernel shows the heads
  return Spec(
    "vit", fields, table, t, ignore=lambda n: not n.startswith(p), fixed=(*VIT_FIXED, "num_heads")
  )


def _find_encoder(t: dict) -> str:
  """The encoder's name prefix; a scanned encoder's stacked blocks are unstacked in `t`."""
  p = _find_prefix(t, "Transformer/encoder_norm/scale")
  if p is None:
    raise _Uninferable("cannot find the encoder: no '[prefix]Transformer/encoder_norm/scale'")
  # A scanned encoder stores every block stacked under `encoderblock/`: unstack it.
  for name in [n for n in t if n.startswith(p + "Transformer/encoderblock/")]:
    stacked = t.pop(name)
    for i, layer in enumerate(stacked):
      t[name.replace("/encoderblock/", f"/encoderblock_{i}/")] = layer
  return p
