"""Weight import: the checkpoints people hold -> our ViT / Adventurer nnx modules.

`load(path, fmt, **overrides)` returns a ready module. Every format is a mapping table
{our parameter path: (their tensor name(s), transform)} plus what the tensor shapes tell
(width, depth, patch, grid -> image_size, mlp width, classes, and heads where the layout
shows them); `overrides` are config fields and replace what was inferred. One shared
routine checks every name and shape before anything is assigned: a file that does not
match raises a single `CheckpointMismatch` and no model is returned.

Formats (method.md §4-5):
  hf           `transformers` folder (config.json + model.safetensors / pytorch_model.bin,
               sharded or not) of CLIPVisionModel / CLIPModel (vision tower) or ViTModel /
               ViTForImageClassification; or a bare weights file (+ overrides).
  openai_clip  OpenAI CLIP `.pt` (TorchScript or plain) / `.pth` state dict, `visual.*`.
  timm         timm ViT `.pth` / `.safetensors`; a timm `.npz` is big_vision's layout.
  big_vision   `.npz`, original-ViT or big_vision numbering, scanned or not.
  adventurer   Adventurer `.pth` (`model` / `model_ema` entry, or a bare state dict).
  orbax        a directory written by `linearizer.models.saved.save` (or this module's CLI).

Decisions (all overridable):
  - CLIP's image projection (openai `proj`, HF CLIPModel `visual_projection`) becomes a
    bias-free head (num_classes = embed dim, head_bias=False): logits are then CLIP's image
    embedding of the final-norm CLS token. `num_classes=0` drops it (and any other head).
  - adventurer: the `model` entry by default (`use_ema=True` for `model_ema`), and
    flip_pattern "released" (`i // 2 == 1`), the pattern its public weights were trained
    with. Its checkpoints hold no `mask_token` (a distillation-only parameter): unless the
    file has one it is initialised as the model does (trunc-normal 0.02).
  - num_heads: from config.json (hf) or the q kernel (big_vision); timm / openai_clip
    weights do not show it: default width // 64 (exact for OpenAI CLIP; ViT-H needs 16).
  - image_size: inferred from the position-embedding grid; a different override resamples
    the embedding (bicubic, CLS slot kept) as the models do at run time.
"""
import argparse
import dataclasses
import json
import math
import pathlib
import re
import sys
import typing
import zipfile
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from linearizer import models
from linearizer.models import adventurer as adventurer_lib
from linearizer.models import common
from linearizer.models import saved
from linearizer.models import vit as vit_lib

FORMATS = ("hf", "openai_clip", "timm", "big_vision", "adventurer", "orbax")
OPTIONS = {"adventurer": ("use_ema",)}  # format options that are not config fields


class CheckpointMismatch(ValueError):
  """A weight file whose names or shapes do not match the model it describes."""


class _Uninferable(Exception):
  """A tensor needed to infer the architecture is absent (reported as a mismatch by load)."""


# ---------------------------------------------------------------------------------------
# Transforms: their tensor(s) -> our array. `inv` is only traced (jax.eval_shape) to know
# the shapes to expect in the file, so errors speak in the file's own layout.
# ---------------------------------------------------------------------------------------
class Tx(NamedTuple):
  fwd: Callable  # (*their numpy arrays) -> our array
  inv: Callable  # our array -> tuple of their arrays (shape inference only)


SAME = Tx(lambda a: a, lambda x: (x,))
LINEAR = Tx(lambda w: w.T, lambda k: (k.T,))  # torch Linear (out, in) -> flax (in, out)
CONV = Tx(lambda w: w.transpose(2, 3, 1, 0), lambda k: (k.transpose(3, 2, 0, 1),))  # OIHW->HWIO
CONV1D = Tx(lambda w: w[:, 0].T, lambda k: (k.T[:, None],))  # depthwise (C, 1, K) -> (K, C)
ROW = Tx(lambda a: a[None], lambda x: (x[0],))  # (N, D) -> (1, N, D)
TOKEN = Tx(lambda a: a[None, None], lambda x: (x[0, 0],))  # (D,) -> (1, 1, D)
# Separate q, k, v -> our fused qkv, q|k|v along the output features.
QKV = Tx(lambda q, k, v: np.concatenate([q, k, v]).T, lambda w: tuple(jnp.split(w.T, 3)))
QKV_BIAS = Tx(lambda q, k, v: np.concatenate([q, k, v]), lambda b: tuple(jnp.split(b, 3)))
# big_vision's top-level `pos_embedding` has no CLS slot (CLS gets no position): a zero one.
POS_NO_CLS = Tx(lambda a: np.concatenate([np.zeros_like(a[:, :1]), a], 1), lambda x: (x[:, 1:],))


def _heads_qkv(heads):  # big_vision q/k/v kernels (D, heads, head_dim) -> (D, 3D)
  return Tx(lambda *a: np.concatenate([x.reshape(x.shape[0], -1) for x in a], 1),
            lambda k: tuple(p.reshape(p.shape[0], heads, -1) for p in jnp.split(k, 3, 1)))


def _heads_qkv_bias(heads):  # (heads, head_dim) x3 -> (3D,)
  return Tx(lambda *a: np.concatenate([x.reshape(-1) for x in a]),
            lambda b: tuple(p.reshape(heads, -1) for p in jnp.split(b, 3)))


def _heads_out(heads):  # (heads, head_dim, D) -> (D, D)
  return Tx(lambda a: a.reshape(-1, a.shape[-1]), lambda k: (k.reshape(heads, -1, k.shape[-1]),))


def _ln(ours, theirs, sep=".", scale="weight"):
  """A LayerNorm: torch (weight, bias) or flax (scale, bias, sep='/')."""
  return {f"{ours}.scale": ((f"{theirs}{sep}{scale}",), SAME),
          f"{ours}.bias": ((f"{theirs}{sep}bias",), SAME)}


def _linear(ours, theirs, kernel=LINEAR):
  """A torch Linear (or, with kernel=CONV, Conv2d): weight -> kernel, bias -> bias."""
  return {f"{ours}.kernel": ((f"{theirs}.weight",), kernel),
          f"{ours}.bias": ((f"{theirs}.bias",), SAME)}


def _each(template, parts):
  """Names of separate q, k, v tensors, e.g. _each('attn.{}_proj.weight', 'qkv')."""
  return tuple(template.replace("{}", x) for x in parts)


QUERY_KEY_VALUE = ("query", "key", "value")


def _dense(ours, theirs):
  """A flax Dense saved by big_vision: '/'-separated, already (in, out)."""
  return {f"{ours}.kernel": ((f"{theirs}/kernel",), SAME),
          f"{ours}.bias": ((f"{theirs}/bias",), SAME)}


# ---------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------
def _torch_load(path):
  try:
    import torch  # only .pth/.pt/.bin need it
  except ImportError as e:
    raise ImportError(f"Reading {path} needs PyTorch (pip install torch), or re-save the "
                      "state dict as .safetensors.") from e
  if _is_torchscript(path):  # OpenAI's released CLIP .pt files are TorchScript archives
    return torch.jit.load(str(path), map_location="cpu").state_dict()
  try:  # DeiT-style training checkpoints also pickle their argparse args: allow just that
    with torch.serialization.safe_globals([argparse.Namespace]):
      return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:
    raise ValueError(f"Could not read {path} as a torch checkpoint of tensors (it is loaded "
                     f"with weights_only=True and never unpickles code): {e}") from e


def _is_torchscript(path):
  if not zipfile.is_zipfile(path):
    return False
  with zipfile.ZipFile(path) as z:
    return any(n.endswith("/constants.pkl") for n in z.namelist())


def _read_safetensors(path):
  from safetensors.numpy import load_file
  try:
    return load_file(str(path))
  except TypeError:  # numpy has no bfloat16: read the simple format ourselves with ml_dtypes
    import ml_dtypes
    types = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32, "F64": np.float64,
             "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
             "BOOL": np.bool_}
    with open(path, "rb") as f:
      size = int.from_bytes(f.read(8), "little")
      header = json.loads(f.read(size))
    data = np.memmap(path, np.uint8, "r", offset=8 + size)
    return {k: np.asarray(data[v["data_offsets"][0]:v["data_offsets"][1]]
                          .view(types[v["dtype"]]).reshape(v["shape"]))
            for k, v in header.items() if k != "__metadata__"}


def _numpy(value):
  """A tensor/array as numpy; low-precision floats widened (numpy lacks bfloat16)."""
  if hasattr(value, "detach"):  # a torch tensor (torch itself was imported by _torch_load)
    value = value.detach().cpu()
    return (value.float() if value.is_floating_point() else value).numpy()
  return np.asarray(value)


def _is_tensor(value):
  return hasattr(value, "shape") and hasattr(value, "dtype")


def _unwrap(obj, path, entries=("state_dict", "model"), bare=True):
  """The tensor dict of a checkpoint: itself (if `bare`), or its first entry in `entries`."""
  if bare and isinstance(obj, dict) and obj and all(_is_tensor(v) for v in obj.values()):
    return obj
  for entry in entries:
    if isinstance(obj, dict) and isinstance(obj.get(entry), dict):
      return obj[entry]
  keys = sorted(obj)[:10] if isinstance(obj, dict) else type(obj).__name__
  raise ValueError(f"{path}: expected {'a state dict or ' if bare else ''}one of the entries "
                   f"{list(entries)}; found {keys}.")


def read_tensors(path, entries=("state_dict", "model"), bare=True) -> dict:
  """{name: numpy array} from .safetensors / .npz / torch files (and HF shard indexes).

  A torch file may hold the state dict itself (if `bare`) or inside one of `entries`.
  """
  path = pathlib.Path(path)
  name = path.name
  if path.is_dir():
    raise ValueError(f"{path} is a directory; this format reads a weight file.")
  if name.endswith(".index.json"):  # sharded HF weights
    shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
    return {k: v for s in shards for k, v in read_tensors(path.parent / s).items()}
  if name.endswith(".safetensors"):
    tensors = _read_safetensors(path)
  elif name.endswith(".npz"):
    with np.load(path, allow_pickle=False) as z:
      tensors = {k: z[k] for k in z.files}
  elif name.endswith((".pth", ".pt", ".bin", ".ckpt")):
    tensors = _unwrap(_torch_load(path), path, entries, bare)
  else:
    raise ValueError(f"{path}: unknown weight-file type; expected .safetensors, .npz, .pth, "
                     ".pt, .bin or .ckpt.")
  return {k: _numpy(v) for k, v in tensors.items() if _is_tensor(v)}


# ---------------------------------------------------------------------------------------
# What each format says: architecture fields + mapping table
# ---------------------------------------------------------------------------------------
class Spec(NamedTuple):
  kind: str                   # "vit" | "adventurer"
  fields: dict                # config fields inferred from the file
  table: dict                 # our path template ("{i}" = layer) -> (their names, Tx)
  tensors: dict
  ignore: Callable = lambda name: False  # tensors of the file that are not ours to load
  optional: dict = {}  # our params the file may lack -> initializer(key, shape), as the model's


def _need(tensors, name, what):
  if name not in tensors:
    raise _Uninferable(f"cannot infer {what}: tensor {name!r} not found")
  return tensors[name]


def _depth(tensors, pattern, what="depth"):
  found = {int(m.group(1)) for n in tensors if (m := re.fullmatch(pattern, n))}
  if not found:
    raise _Uninferable(f"cannot infer {what}: no tensor matches {pattern!r}")
  return max(found) + 1


def _grid_size(tokens, patch, what):
  grid = math.isqrt(tokens)
  if grid * grid != tokens:
    raise _Uninferable(f"cannot infer the image size: {what} holds {tokens} patch positions, "
                       "not a square grid")
  return grid * patch


def _find_prefix(tensors, suffix):
  """The prefix in front of `suffix` (e.g. 'vit.' or 'vision_model.'), or None."""
  return next((n[:-len(suffix)] for n in sorted(tensors, key=len) if n.endswith(suffix)), None)


def _vit_fields(style, width, depth, heads, mlp, patch, image_size, classes, head_bias=True,
                eps=None, activation=None):
  # The style's own eps/activation stay None so configs read "style default".
  eps = None if eps is None or eps == vit_lib.STYLES[style][1] else eps
  activation = None if activation == vit_lib.STYLES[style][0] else activation
  return dict(style=style, width=width, depth=depth, num_heads=heads, mlp_dim=mlp, patch=patch,
              image_size=image_size, num_classes=classes, head_bias=head_bias, layer_norm_eps=eps,
              activation=activation)


def _hf(path):
  """transformers CLIP(Vision)Model / ViTModel / ViTForImageClassification."""
  folder = path if path.is_dir() else path.parent
  if path.is_dir():
    weights = next((folder / n for n in ("model.safetensors", "model.safetensors.index.json",
                                         "pytorch_model.bin", "pytorch_model.bin.index.json")
                    if (folder / n).exists()), None)
    if weights is None:
      raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin (or their "
                              "*.index.json) in this transformers folder.")
  else:
    weights = path
  config_file = folder / "config.json"
  config = json.loads(config_file.read_text()) if config_file.exists() else {}
  config = config.get("vision_config", config)  # CLIPModel nests the tower's config
  model_type = config.get("model_type")
  if model_type not in (None, "clip", "clip_vision_model", "vit"):
    raise ValueError(f"{config_file}: model_type {model_type!r} is not supported by "
                     "the hf format (CLIP vision towers and ViT only).")
  t = read_tensors(weights)
  clip_p = _find_prefix(t, "embeddings.patch_embedding.weight")
  vit_p = _find_prefix(t, "embeddings.patch_embeddings.projection.weight")
  if clip_p is None and vit_p is None:
    raise _Uninferable("cannot tell CLIP from ViT: neither '[vision_model.]embeddings."
                       "patch_embedding.weight' nor '[vit.]embeddings.patch_embeddings."
                       "projection.weight' is in the file")
  clip = clip_p is not None
  p = clip_p if clip else vit_p
  # transformers' defaults when the file comes without config.json
  act = config.get("hidden_act", "quick_gelu" if clip else "gelu")
  style = "clip" if clip else "timm"
  if act not in vit_lib.ACTIVATIONS:
    raise ValueError(f"{folder}: hidden_act {act!r} is not supported; expected one of "
                     f"{sorted(vit_lib.ACTIVATIONS)}.")
  e, L = p + "embeddings.", p + ("encoder.layers.{i}." if clip else "encoder.layer.{i}.")
  if clip:
    patch_w = t[e + "patch_embedding.weight"]
    pos = _need(t, e + "position_embedding.weight", "the image size")
    fc1 = _need(t, L.format(i=0) + "mlp.fc1.weight", "the MLP width")
    head = t.get("visual_projection.weight")
    table = {"patch_embed.kernel": ((e + "patch_embedding.weight",), CONV),
             "cls_token": ((e + "class_embedding",), TOKEN),
             "pos_embed": ((e + "position_embedding.weight",), ROW),
             **_ln("ln_pre", p + "pre_layrnorm"),
             **_ln("blocks.{i}.norm1", L + "layer_norm1"),
             "blocks.{i}.attn.qkv.kernel": (_each(L + "self_attn.{}_proj.weight", "qkv"), QKV),
             "blocks.{i}.attn.qkv.bias": (_each(L + "self_attn.{}_proj.bias", "qkv"), QKV_BIAS),
             **_linear("blocks.{i}.attn.proj", L + "self_attn.out_proj"),
             **_ln("blocks.{i}.norm2", L + "layer_norm2"),
             **_linear("blocks.{i}.fc1", L + "mlp.fc1"),
             **_linear("blocks.{i}.fc2", L + "mlp.fc2"),
             **_ln("norm", p + "post_layernorm"),
             "head.kernel": (("visual_projection.weight",), LINEAR)}
    ours = lambda n: n.startswith(p) or n == "visual_projection.weight"
  else:
    patch_w = t[e + "patch_embeddings.projection.weight"]
    pos = _need(t, e + "position_embeddings", "the image size")[0]
    fc1 = _need(t, L.format(i=0) + "intermediate.dense.weight", "the MLP width")
    head = t.get("classifier.weight")
    att = L + "attention.attention."
    table = {**_linear("patch_embed", e + "patch_embeddings.projection", CONV),
             "cls_token": ((e + "cls_token",), SAME),
             "pos_embed": ((e + "position_embeddings",), SAME),
             **_ln("blocks.{i}.norm1", L + "layernorm_before"),
             "blocks.{i}.attn.qkv.kernel": (_each(att + "{}.weight", QUERY_KEY_VALUE), QKV),
             "blocks.{i}.attn.qkv.bias": (_each(att + "{}.bias", QUERY_KEY_VALUE), QKV_BIAS),
             **_linear("blocks.{i}.attn.proj", L + "attention.output.dense"),
             **_ln("blocks.{i}.norm2", L + "layernorm_after"),
             **_linear("blocks.{i}.fc1", L + "intermediate.dense"),
             **_linear("blocks.{i}.fc2", L + "output.dense"),
             **_ln("norm", p + "layernorm"),
             **_linear("head", "classifier")}
    # The pooler (tanh dense) and MIM mask token are not part of the encoder we load.
    ours = lambda n: ((n.startswith(p) or n.startswith("classifier."))
                      and not n.startswith((p + "pooler.", e + "mask_token")))
  width, patch = patch_w.shape[0], patch_w.shape[-1]
  fields = _vit_fields(
      style, width, _depth(t, re.escape(L).replace(r"\{i\}", r"(\d+)") + ".*"),
      config.get("num_attention_heads", width // 64), fc1.shape[0], patch,
      _grid_size(pos.shape[0] - 1, patch, "the position embedding"),
      0 if head is None else head.shape[0], head_bias=not clip,
      eps=config.get("layer_norm_eps", 1e-5 if clip else 1e-12))
  ignore = lambda n: not ours(n) or n == e + "position_ids"  # old CLIP files keep this buffer
  return Spec("vit", fields, table, t, ignore)


def _openai_clip(path):
  t = read_tensors(path)
  p = "visual." if "visual.conv1.weight" in t else ""
  R = p + "transformer.resblocks.{i}."
  patch_w = _need(t, p + "conv1.weight", "the width and patch")
  pos = _need(t, p + "positional_embedding", "the image size")
  proj = t.get(p + "proj")
  width, patch = patch_w.shape[0], patch_w.shape[-1]
  fields = _vit_fields(
      "clip", width, _depth(t, re.escape(p) + r"transformer\.resblocks\.(\d+)\..*"),
      width // 64,  # OpenAI's own rule: vision_heads = vision_width // 64
      _need(t, R.format(i=0) + "mlp.c_fc.weight", "the MLP width").shape[0], patch,
      _grid_size(pos.shape[0] - 1, patch, "the position embedding"),
      0 if proj is None else proj.shape[1], head_bias=False)
  table = {"patch_embed.kernel": ((p + "conv1.weight",), CONV),
           "cls_token": ((p + "class_embedding",), TOKEN),
           "pos_embed": ((p + "positional_embedding",), ROW),
           **_ln("ln_pre", p + "ln_pre"),
           **_ln("blocks.{i}.norm1", R + "ln_1"),
           "blocks.{i}.attn.qkv.kernel": ((R + "attn.in_proj_weight",), LINEAR),
           "blocks.{i}.attn.qkv.bias": ((R + "attn.in_proj_bias",), SAME),
           **_linear("blocks.{i}.attn.proj", R + "attn.out_proj"),
           **_ln("blocks.{i}.norm2", R + "ln_2"),
           **_linear("blocks.{i}.fc1", R + "mlp.c_fc"),
           **_linear("blocks.{i}.fc2", R + "mlp.c_proj"),
           **_ln("norm", p + "ln_post"),
           "head.kernel": ((p + "proj",), SAME)}  # CLIP computes x @ proj: already (in, out)
  return Spec("vit", fields, table, t, ignore=lambda n: not n.startswith(p))  # text tower


def _timm(path):
  t = read_tensors(path)
  patch_w = _need(t, "patch_embed.proj.weight", "the width and patch")
  pos = _need(t, "pos_embed", "the image size")
  head = t.get("head.weight")
  width, patch = patch_w.shape[0], patch_w.shape[-1]
  style = "clip" if "norm_pre.weight" in t else "timm"  # timm's CLIP: norm_pre, no conv bias
  fields = _vit_fields(
      style, width, _depth(t, r"blocks\.(\d+)\..*"), width // 64,
      _need(t, "blocks.0.mlp.fc1.weight", "the MLP width").shape[0], patch,
      _grid_size(pos.shape[1] - 1, patch, "pos_embed"),
      0 if head is None else head.shape[0], head_bias="head.bias" in t)
  b = "blocks.{i}."
  table = {**_linear("patch_embed", "patch_embed.proj", CONV),
           "cls_token": (("cls_token",), SAME), "pos_embed": (("pos_embed",), SAME),
           **_ln("ln_pre", "norm_pre"),
           **_ln(b + "norm1", b + "norm1"),
           **_linear(b + "attn.qkv", b + "attn.qkv"),
           **_linear(b + "attn.proj", b + "attn.proj"),
           **_ln(b + "norm2", b + "norm2"),
           **_linear(b + "fc1", b + "mlp.fc1"),
           **_linear(b + "fc2", b + "mlp.fc2"),
           **_ln("norm", "norm"),
           **_linear("head", "head")}
  return Spec("vit", fields, table, t)


def _big_vision(path):
  t = read_tensors(path)
  p = _find_prefix(t, "Transformer/encoder_norm/scale")
  if p is None:
    raise _Uninferable("cannot find the encoder: no '[prefix]Transformer/encoder_norm/scale'")
  # A scanned encoder stores every block stacked under `encoderblock/`: unstack it.
  for name in [n for n in t if n.startswith(p + "Transformer/encoderblock/")]:
    stacked = t.pop(name)
    for i, layer in enumerate(stacked):
      t[name.replace("/encoderblock/", f"/encoderblock_{i}/")] = layer
  B = p + "Transformer/encoderblock_{i}/"
  original = any("/MultiHeadDotProductAttention_1/" in n for n in t)  # original ViT numbering
  attn, ln2, mlp = (("MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3") if original
                    else ("MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0"))
  A = B + attn + "/"
  kernel = _need(t, p + "embedding/kernel", "the width and patch")  # HWIO
  q = _need(t, A.format(i=0) + "query/kernel", "the number of heads")  # (D, heads, head_dim)
  cls_pos = p + "Transformer/posembed_input/pos_embedding"
  pos_name = cls_pos if cls_pos in t else p + "pos_embedding"
  pos = _need(t, pos_name, "the image size")
  head = t.get(p + "head/kernel")
  patch, width = kernel.shape[0], kernel.shape[-1]
  fields = _vit_fields(
      "timm", width, _depth(t, re.escape(p) + r"Transformer/encoderblock_(\d+)/.*"), q.shape[1],
      _need(t, B.format(i=0) + mlp + "/Dense_0/kernel", "the MLP width").shape[1], patch,
      _grid_size(pos.shape[1] - (pos_name == cls_pos), patch, pos_name),
      0 if head is None else head.shape[1], head_bias=p + "head/bias" in t,
      activation="gelu_tanh")  # flax's nn.gelu, which big_vision's MLP uses, is tanh-approximate
  heads = fields["num_heads"]
  table = {"patch_embed.kernel": ((p + "embedding/kernel",), SAME),
           "patch_embed.bias": ((p + "embedding/bias",), SAME),
           "cls_token": ((p + "cls",), SAME),
           "pos_embed": ((pos_name,), SAME if pos_name == cls_pos else POS_NO_CLS),
           **_ln("blocks.{i}.norm1", B + "LayerNorm_0", sep="/", scale="scale"),
           "blocks.{i}.attn.qkv.kernel": (_each(A + "{}/kernel", QUERY_KEY_VALUE),
                                          _heads_qkv(heads)),
           "blocks.{i}.attn.qkv.bias": (_each(A + "{}/bias", QUERY_KEY_VALUE),
                                        _heads_qkv_bias(heads)),
           "blocks.{i}.attn.proj.kernel": ((A + "out/kernel",), _heads_out(heads)),
           "blocks.{i}.attn.proj.bias": ((A + "out/bias",), SAME),
           **_ln("blocks.{i}.norm2", B + ln2, sep="/", scale="scale"),
           **_dense("blocks.{i}.fc1", B + mlp + "/Dense_0"),
           **_dense("blocks.{i}.fc2", B + mlp + "/Dense_1"),
           **_ln("norm", p + "Transformer/encoder_norm", sep="/", scale="scale"),
           **_dense("head", p + "head")}
  return Spec("vit", fields, table, t, ignore=lambda n: not n.startswith(p))  # other towers


def _adventurer(path, use_ema=False):
  # use_ema must find a `model_ema` entry: a bare state dict is not silently taken for it.
  t = read_tensors(path, ("model_ema",) if use_ema else ("model",), bare=not use_ema)
  patch_w = _need(t, "patch_embed.proj.weight", "the width and patch")
  width, patch = patch_w.shape[0], patch_w.shape[-1]
  inner = _need(t, "layers.0.mixer.norm.weight", "the mixer width").shape[0]
  heads = _need(t, "layers.0.mixer.A_log", "the SSM heads").shape[0]
  conv = _need(t, "layers.0.mixer.conv1d.weight", "d_state").shape[0]  # inner + 2·d_state
  hidden = _need(t, "layers.0.mlp.w1.weight", "the MLP width").shape[0]
  ratio = hidden / width
  if int(width * ratio) != hidden:  # the model builds int(width · ratio) features
    ratio = (hidden + 0.5) / width
  head = t.get("head.weight")
  fields = dict(width=width, depth=_depth(t, r"layers\.(\d+)\..*"), patch=patch,
                image_size=_grid_size(_need(t, "pos_embed", "the image size").shape[1] - 1,
                                      patch, "pos_embed"),
                num_classes=0 if head is None else head.shape[0], flip_pattern="released",
                d_state=(conv - inner) // 2, headdim=inner // heads, expand=inner // width,
                mlp_ratio=ratio)
  m = "layers.{i}.mixer."
  table = {**_linear("patch_embed", "patch_embed.proj", CONV),
           **{n: ((n,), SAME) for n in ("cls_token", "mask_token", "pos_embed")},
           "layers.{i}.norm.scale": (("layers.{i}.norm.weight",), SAME),
           "layers.{i}.mixer.in_proj.kernel": ((m + "in_proj.weight",), LINEAR),
           "layers.{i}.mixer.conv_weight": ((m + "conv1d.weight",), CONV1D),
           "layers.{i}.mixer.conv_bias": ((m + "conv1d.bias",), SAME),
           **{f"{m}{n}": ((m + n,), SAME) for n in ("dt_bias", "A_log", "D")},
           "layers.{i}.mixer.norm_weight": ((m + "norm.weight",), SAME),
           "layers.{i}.mixer.out_proj.kernel": ((m + "out_proj.weight",), LINEAR),
           "layers.{i}.norm_mlp.scale": (("layers.{i}.norm_mlp.weight",), SAME),
           **_linear("layers.{i}.mlp.w1", "layers.{i}.mlp.w1"),
           **_linear("layers.{i}.mlp.w2", "layers.{i}.mlp.w2"),
           **_linear("layers.{i}.mlp.w3", "layers.{i}.mlp.w3"),
           "norm_f.scale": (("norm_f.weight",), SAME),
           **_linear("head", "head")}
  # Classification checkpoints hold no mask token: initialise it as Adventurer.__init__ does.
  return Spec("adventurer", fields, table, t, optional={"mask_token": common.trunc_normal_02})


def _orbax(path):
  kind, cfg = saved.load_config(path)
  abstract = nnx.eval_shape(lambda: models.from_config(cfg))
  table = {t: ((t,), SAME) for t, _, _ in _templates(abstract)}
  return Spec(kind, dataclasses.asdict(cfg), table, saved.read_params(path))


READERS = {"hf": _hf, "openai_clip": _openai_clip, "timm": _timm, "big_vision": _big_vision,
           "adventurer": _adventurer, "orbax": _orbax}


# ---------------------------------------------------------------------------------------
# Shared machinery: config, check everything, then assign
# ---------------------------------------------------------------------------------------
def _templates(model):
  """(template, path, shape) per parameter; layer indices in the template become '{i}'."""
  for key, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    yield ".".join("{i}" if isinstance(k, int) else str(k) for k in key), key, var.get_value().shape


def _shape(s):
  return "(" + ", ".join(str(d) for d in s) + ")"


def _match(abstract, spec, where):
  """{our param path: array}, or one CheckpointMismatch naming everything that is off."""
  t = spec.tensors
  params = list(_templates(abstract))
  planned, fresh, used, missing, misshaped = [], {}, set(), [], []
  for template, key, shape in params:
    if template not in spec.table:
      raise NotImplementedError(f"no mapping for parameter {template!r} (a bug in convert.py)")
    names, tx = spec.table[template]
    layer = next((k for k in key if isinstance(k, int)), None)
    names = tuple(n.format(i=layer) for n in names)
    if template in spec.optional and not any(n in t for n in names):
      fresh[key] = spec.optional[template](jax.random.key(0), shape)
      continue
    used.update(names)
    want = [w.shape for w in jax.eval_shape(tx.inv, jax.ShapeDtypeStruct(shape, jnp.float32))]
    ok = True
    for name, w in zip(names, want):
      if name not in t:
        missing.append(f"{name} {_shape(w)}")
        ok = False
      elif tuple(t[name].shape) != tuple(w):
        misshaped.append(f"{name}: expected {_shape(w)}, found {_shape(t[name].shape)}")
        ok = False
    if ok:
      planned.append((key, tx, names))
  # A head in the file that the config dropped (num_classes=0) is not an error.
  heads = set() if any(tmpl.startswith("head.") for tmpl, _, _ in params) else {
      n for tmpl, (names, _) in spec.table.items() if tmpl.startswith("head.") for n in names}
  unexpected = [f"{n} {_shape(t[n].shape)}" for n in sorted(t)
                if n not in used and not spec.ignore(n) and n not in heads]
  if missing or unexpected or misshaped:
    lines = [f"{where} does not match the model it describes:"]
    for label, items in (("missing", missing), ("unexpected", unexpected),
                         ("mis-shaped", misshaped)):
      if items:
        more = f", ... and {len(items) - 5} more" if len(items) > 5 else ""
        lines.append(f"  {len(items)} {label}: " + "; ".join(items[:5]) + more)
    raise CheckpointMismatch("\n".join(lines))
  return {**fresh, **{key: tx.fwd(*(t[n] for n in names)) for key, tx, names in planned}}


def _config(kind, fields, overrides):
  cls = saved.CONFIGS[kind]
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(overrides) - known)
  if unknown:
    raise ValueError(f"Unknown override(s) {unknown} for the {kind} model; its config fields "
                     f"are {sorted(known)}.")
  cfg = cls(**{**fields, **overrides})
  if kind == "vit" and cfg.style not in vit_lib.STYLES:
    raise ValueError(f"Unknown ViT style {cfg.style!r}; expected one of {sorted(vit_lib.STYLES)}.")
  if kind == "vit" and cfg.width % cfg.num_heads:
    raise ValueError(f"num_heads={cfg.num_heads} does not divide width={cfg.width}.")
  if kind == "adventurer" and cfg.flip_pattern not in adventurer_lib.FLIP_PATTERNS:
    raise ValueError(f"Unknown flip_pattern {cfg.flip_pattern!r}; expected one of "
                     f"{sorted(adventurer_lib.FLIP_PATTERNS)}.")
  return cfg


def load(path, fmt: str, **overrides):
  """A ready ViT / Adventurer nnx module from a checkpoint (see the module docstring)."""
  if fmt not in READERS:
    raise ValueError(f"Unknown checkpoint format {fmt!r}; expected one of {list(FORMATS)}.")
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"Checkpoint {path} (format {fmt!r}) does not exist.")
  if fmt == "timm" and path.name.endswith(".npz"):  # timm's npz export is big_vision's layout
    fmt = "big_vision"
    overrides.setdefault("activation", "gelu")  # ... but timm runs it with exact GELU
  options = {k: overrides.pop(k) for k in OPTIONS.get(fmt, ()) if k in overrides}
  where = f"{path} (format {fmt!r})"
  try:
    spec = READERS[fmt](path, **options)
  except _Uninferable as e:
    raise CheckpointMismatch(f"{where}: {e}.") from None
  cfg = _config(spec.kind, spec.fields, overrides)
  native = dataclasses.replace(cfg, image_size=spec.fields["image_size"])
  arrays = _match(nnx.eval_shape(lambda: models.from_config(native)), spec, where)
  if cfg.image_size != native.image_size:  # resample once here, as the models do at run time
    grid = lambda c: (c.image_size // c.patch,) * 2
    arrays[("pos_embed",)] = models.resample_pos_embed(
        jnp.asarray(arrays[("pos_embed",)], jnp.float32), grid(native), grid(cfg),
        cls_at="first" if spec.kind == "vit" else "last")
  return saved.from_params(cfg, arrays)


def describe(model) -> str:
  c = model.cfg
  if isinstance(model, models.ViT):
    text = (f"width {c.width} depth {c.depth} heads {c.num_heads} mlp {c.mlp_dim} "
            f"patch {c.patch} @{c.image_size} style {c.style}")
  else:
    text = (f"width {c.width} depth {c.depth} patch {c.patch} @{c.image_size} "
            f"flip {c.flip_pattern}")
  return text + (f" classes {c.num_classes}" if c.num_classes else "")


def num_params(model) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


# ---------------------------------------------------------------------------------------
# CLI: python -m linearizer.convert --format F --input P --output DIR [--num_heads N ...]
# ---------------------------------------------------------------------------------------
def _flag_type(hint):
  args = [a for a in typing.get_args(hint) if a is not type(None)]
  hint = args[0] if args else hint
  if hint is bool:
    return lambda s: {"true": True, "1": True, "false": False, "0": False}[s.lower()]
  if hint is tuple:
    return lambda s: tuple(float(v) for v in s.split(","))
  return hint


def main(argv=None):
  parser = argparse.ArgumentParser(
      prog="python -m linearizer.convert",
      description="Convert a checkpoint to an Orbax model directory (linearizer.models.saved).")
  parser.add_argument("--format", required=True, choices=FORMATS)
  parser.add_argument("--input", required=True, help="checkpoint file or folder")
  parser.add_argument("--output", required=True, help="directory to write")
  parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
  parser.add_argument("--use_ema", action="store_true", help="adventurer: load model_ema")
  flags = {}
  for cls in saved.CONFIGS.values():
    for name, hint in typing.get_type_hints(cls).items():
      flags.setdefault(name, hint)
  group = parser.add_argument_group("config overrides (replace what the weights tell)")
  for name, hint in flags.items():
    group.add_argument(f"--{name}", type=_flag_type(hint), default=None)
  args = vars(parser.parse_args(argv))
  fmt, src, out = args.pop("format"), args.pop("input"), args.pop("output")
  overwrite, use_ema = args.pop("overwrite"), args.pop("use_ema")
  overrides = {k: v for k, v in args.items() if v is not None}
  if use_ema:
    overrides["use_ema"] = True
  try:
    saved.check_writable(out, overwrite)  # fail before the (slow) conversion
    model = load(src, fmt, **overrides)
    written = saved.save(model, out, overwrite=overwrite)
  except (ValueError, OSError, ImportError) as e:
    parser.exit(1, f"error: {e}\n")
  kind = saved.kind_of(model)
  print(f"{kind}: {describe(model)}, {num_params(model):,} parameters -> {written}")


if __name__ == "__main__":
  main(sys.argv[1:])
