"""The readers' toolkit: what a reader returns (`Spec`), and everything readers share.

A reader (one module per weight format, `read(path, **options) -> Spec`) reads the file
into {name: numpy array} (`read_tensors`), infers the architecture from tensor shapes
(`need`, `depth_of`, `image_size_of`, `find_prefix`, `vit_fields`) and states a mapping
table {our parameter path ("{i}" = layer): (their tensor names, Tx)}, built for the common
layers by `layer_norm` / `linear` / `each`. The package's `load` then checks every name and
shape of the file against the model before anything is assigned.

A transform (`Tx`) maps the file's tensor(s) to one of our arrays; its inverse is only
traced (jax.eval_shape) to know the shapes to expect in the file, so errors speak in the
file's own layout.
"""

import argparse
import json
import math
import pathlib
import pickle
import re
from typing import Callable, NamedTuple

import jax.numpy as jnp
import numpy as np
from flax import nnx

from linearizer.convert import torchscript
from linearizer.errors import MissingPathError, UserError, cause
from linearizer.models import vit as vit_lib


class Uninferable(Exception):
  """A tensor needed to infer the architecture is absent (reported as a mismatch by load)."""


class Spec(NamedTuple):
  kind: str  # an architecture of models.ARCHITECTURES: "vit" | "adventurer"
  fields: dict  # config fields inferred from the file
  table: dict  # our path template ("{i}" = layer) -> (their names, Tx)
  tensors: dict
  ignore: Callable = lambda name: False  # tensors of the file that are not ours to load
  optional: dict = {}  # our params the file may lack -> initializer(key, shape), as the model's
  fixed: tuple = ()  # fields the file itself determines: an override contradicting one is refused
  guesses: dict = {}  # field -> why it is a guess: a warning at load unless the user set it


# The fields a ViT's / an Adventurer's tensor names and shapes determine (the readers'
# `fixed`); a ViT's style shows in its `ln_pre` and patch-conv bias.
VIT_FIXED = ("width", "depth", "mlp_dim", "patch", "style")
ADVENTURER_FIXED = ("width", "depth", "patch", "d_state", "headdim", "expand", "mlp_ratio")


# ---------------------------------------------------------------------------------------
# Config inference from tensor shapes
# ---------------------------------------------------------------------------------------
def need(tensors, name, what):
  """`tensors[name]`, or Uninferable naming `what` it was needed to infer."""
  if name not in tensors:
    raise Uninferable(f"cannot infer {what}: tensor {name!r} not found")
  return tensors[name]


def depth_of(tensors, pattern, what="depth"):
  """The number of layers: 1 + the largest index `pattern`'s group captures in a name."""
  found = {int(m.group(1)) for n in tensors if (m := re.fullmatch(pattern, n))}
  if not found:
    raise Uninferable(f"cannot infer {what}: no tensor matches {pattern!r}")
  return max(found) + 1


def image_size_of(tokens, patch, what):
  """The image size of `tokens` patch positions (`what` holds them) on a square grid."""
  grid = math.isqrt(tokens)
  if grid * grid != tokens:
    raise Uninferable(
      f"cannot infer the image size: {what} holds {tokens} patch positions, not a square grid"
    )
  return grid * patch


def find_prefix(tensors, suffix):
  """The prefix in front of `suffix` (e.g. 'vit.' or 'vision_model.'), or None."""
  return next((n[: -len(suffix)] for n in sorted(tensors, key=len) if n.endswith(suffix)), None)


def vit_fields(
  style,
  width,
  depth,
  heads,
  mlp,
  patch,
  image_size,
  classes,
  head_bias=True,
  eps=None,
  activation=None,
):
  """A ViT config's fields from what a reader inferred (heads, mlp, classes: num_heads, ...)."""
  # The style's own eps/activation stay None so configs read "style default".
  eps = None if eps is None or eps == vit_lib.STYLES[style][1] else eps
  activation = None if activation == vit_lib.STYLES[style][0] else activation
  return dict(
    style=style,
    width=width,
    depth=depth,
    num_heads=heads,
    mlp_dim=mlp,
    patch=patch,
    image_size=image_size,
    num_classes=classes,
    head_bias=head_bias,
    layer_norm_eps=eps,
    activation=activation,
  )


def templates(model):
  """(template, path, shape) per parameter; layer indices in the template become '{i}'."""
  for key, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    yield ".".join("{i}" if isinstance(k, int) else str(k) for k in key), key, var.get_value().shape


# ---------------------------------------------------------------------------------------
# Transforms (their tensor(s) -> our array) and mapping-table entries
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
QUERY_KEY_VALUE = ("query", "key", "value")


def layer_norm(ours, theirs, sep=".", scale="weight"):
  """A LayerNorm: torch (weight, bias) or flax (scale, bias, sep='/')."""
  return {
    f"{ours}.scale": ((f"{theirs}{sep}{scale}",), SAME),
    f"{ours}.bias": ((f"{theirs}{sep}bias",), SAME),
  }


def linear(ours, theirs, kernel=LINEAR):
  """A torch Linear (or, with kernel=CONV, Conv2d): weight -> kernel, bias -> bias."""
  return {
    f"{ours}.kernel": ((f"{theirs}.weight",), kernel),
    f"{ours}.bias": ((f"{theirs}.bias",), SAME),
  }


def each(template, parts):
  """Names of separate q, k, v tensors, e.g. each('attn.{}_proj.weight', 'qkv')."""
  return tuple(template.replace("{}", x) for x in parts)


# ---------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------
def torch_load(path):
  """A torch file's object, loaded with weights_only (a TorchScript archive: its tensors)."""
  if torchscript.is_torchscript(path):  # OpenAI's released CLIP .pt files are TorchScript
    try:  # never torch.jit.load: a scripted module's __setstate__ is the file's code
      tensors = torchscript.read_archive(path)
    except (pickle.UnpicklingError, KeyError, ValueError, StopIteration) as e:
      raise UserError(f"Could not read {path} as a TorchScript archive of tensors: {e}") from e
    if not tensors:
      raise UserError(
        f"{path} is a TorchScript archive whose modules hold no tensors as attributes (a "
        "custom __getstate__?); re-save its state_dict() with torch.save."
      )
    return tensors
  try:
    import torch  # optional dependency: only .pth/.pt/.bin need it
  except ImportError as e:
    raise UserError(
      f"Reading {path} needs PyTorch (pip install torch), or re-save the "
      "state dict as .safetensors."
    ) from e
  try:  # DeiT-style training checkpoints also pickle their argparse args: allow just that
    with torch.serialization.safe_globals([argparse.Namespace]):
      return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:
    raise UserError(
      f"Could not read {path} as a torch checkpoint of tensors ({cause(e)}): it is read with "
      "weights_only=True, which never runs code from the file; re-save its state_dict() of "
      "tensors with torch.save, or as .safetensors."
    ) from e


def _read_safetensors(path):
  from safetensors.numpy import load_file  # optional dependency: only .safetensors need it

  try:
    return load_file(str(path))
  except TypeError:  # numpy has no bfloat16: read the simple format ourselves with ml_dtypes
    return _read_bfloat16_safetensors(path)
  except Exception as e:  # safetensors' SafetensorError: truncated, or not safetensors at all
    raise UserError(f"{path} is not a readable .safetensors file: {e}") from e


def _read_bfloat16_safetensors(path):
  """The safetensors layout read by hand (8-byte header size, JSON header, raw data)."""
  import ml_dtypes  # optional dependency: only bfloat16 files need it

  types = {
    "BF16": ml_dtypes.bfloat16,
    "F16": np.float16,
    "F32": np.float32,
    "F64": np.float64,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
  }
  with open(path, "rb") as f:
    size = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(size))
  data = np.memmap(path, np.uint8, "r", offset=8 + size)
  return {
    k: np.asarray(
      data[v["data_offsets"][0] : v["data_offsets"][1]].view(types[v["dtype"]]).reshape(v["shape"])
    )
    for k, v in header.items()
    if k != "__metadata__"
  }


def to_numpy(value):
  """A tensor/array as numpy; low-precision floats widened (numpy lacks bfloat16)."""
  if hasattr(value, "detach"):  # a torch tensor (torch itself was imported by torch_load)
    value = value.detach().cpu()
    return (value.float() if value.is_floating_point() else value).numpy()
  return np.asarray(value)


def is_tensor(value):
  """Whether `value` is an array or tensor (checkpoints also hold epochs, args, ...)."""
  return hasattr(value, "shape") and hasattr(value, "dtype")


def unwrap(obj, path, entries=("state_dict", "model"), bare=True):
  """The tensor dict of a checkpoint: itself (if `bare`), or its first entry in `entries`."""
  if bare and isinstance(obj, dict) and obj and all(is_tensor(v) for v in obj.values()):
    return obj
  for entry in entries:
    if isinstance(obj, dict) and isinstance(obj.get(entry), dict):
      return obj[entry]
  keys = sorted(obj)[:10] if isinstance(obj, dict) else type(obj).__name__
  raise UserError(
    f"{path}: expected {'a state dict or ' if bare else ''}one of the entries "
    f"{list(entries)}; found {keys}."
  )


def read_tensors(path, entries=("state_dict", "model"), bare=True) -> dict:
  """{name: numpy array} from .safetensors / .npz / torch files (and HF shard indexes).

  A torch file may hold the state dict itself (if `bare`) or inside one of `entries`.
  """
  path = pathlib.Path(path)
  name = path.name
  if path.is_dir():
    raise MissingPathError(f"{path} is a directory; this format reads a weight file.")
  if name.endswith(".index.json"):  # sharded HF weights
    shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
    return {k: v for s in shards for k, v in read_tensors(path.parent / s).items()}
  if name.endswith(".safetensors"):
    tensors = _read_safetensors(path)
  elif name.endswith(".npz"):
    with np.load(path, allow_pickle=False) as z:
      tensors = {k: z[k] for k in z.files}
  elif name.endswith((".pth", ".pt", ".bin", ".ckpt")):
    tensors = unwrap(torch_load(path), path, entries, bare)
  else:
    raise UserError(
      f"{path}: unknown weight-file type; expected .safetensors, .npz, .pth, .pt, .bin or .ckpt."
    )
  return {k: to_numpy(v) for k, v in tensors.items() if is_tensor(v)}
