"""adventurer: an Adventurer `.pth` (`model` / `model_ema` entry, or a bare state dict).

flip_pattern is "released" (`i // 2 == 1`, the code as published) unless chosen; which
pattern trained the public weights is unknown, so load warns when it is not chosen. A
missing `mask_token` (classification checkpoints) is initialised as the model does.

A `.pth` written by `python -m linearizer.export --format torch` also holds a `linearizer`
entry (`OURS`): the config fields the weights do not show (flip_pattern, mean, std), taken
from there without a warning, and the mask token (which Adventurer's own model has not).
"""

import pathlib

from linearizer.convert.common import (
  ADVENTURER_FIXED,
  CONV,
  CONV1D,
  LINEAR,
  SAME,
  Spec,
  depth_of,
  image_size_of,
  is_tensor,
  linear,
  need,
  read_tensors,
  to_numpy,
  torch_load,
  unwrap,
)
from linearizer.models import common

FLIP_GUESS = (
  "the weights do not show which blocks flip the patch order; 'released' (i // 2 == 1) is "
  "the code as published, 'pairs' ((i // 2) % 2 == 1) and 'alternate' (i % 2 == 1) the fixes "
  "its maintainer names. Choose with flip_pattern=..., by top-1 on a validation subset "
  "(docs/method-fidelity.md)"
)

OURS = "linearizer"  # the entry linearizer.export.to_torch adds: {"config": {...}, "params": {...}}
FROM_OURS = ("flip_pattern", "mean", "std")  # config fields taken from it: shapes do not show them
TORCH_FILES = (".pth", ".pt", ".bin", ".ckpt")

_M = "layers.{i}.mixer."
# Our parameter path ("{i}" = layer) -> (Adventurer's state-dict name, layout transform).
# linearizer.export.to_torch writes files with the inverse of the same table.
TABLE = {
  **linear("patch_embed", "patch_embed.proj", CONV),
  **{n: ((n,), SAME) for n in ("cls_token", "mask_token", "pos_embed")},
  "layers.{i}.norm.scale": (("layers.{i}.norm.weight",), SAME),
  "layers.{i}.mixer.in_proj.kernel": ((_M + "in_proj.weight",), LINEAR),
  "layers.{i}.mixer.conv_weight": ((_M + "conv1d.weight",), CONV1D),
  "layers.{i}.mixer.conv_bias": ((_M + "conv1d.bias",), SAME),
  **{f"{_M}{n}": ((_M + n,), SAME) for n in ("dt_bias", "A_log", "D")},
  "layers.{i}.mixer.norm_weight": ((_M + "norm.weight",), SAME),
  "layers.{i}.mixer.out_proj.kernel": ((_M + "out_proj.weight",), LINEAR),
  "layers.{i}.norm_mlp.scale": (("layers.{i}.norm_mlp.weight",), SAME),
  **linear("layers.{i}.mlp.w1", "layers.{i}.mlp.w1"),
  **linear("layers.{i}.mlp.w2", "layers.{i}.mlp.w2"),
  **linear("layers.{i}.mlp.w3", "layers.{i}.mlp.w3"),
  "norm_f.scale": (("norm_f.weight",), SAME),
  **linear("head", "head"),
}


def _read(path: pathlib.Path, entries: tuple, bare: bool) -> tuple:
  """(tensors of the first of `entries`, the file's `linearizer` entry or {}); a torch file
  is unpickled once for both."""
  if not (path.is_file() and path.name.endswith(TORCH_FILES)):
    return read_tensors(path, entries, bare=bare), {}
  checkpoint = torch_load(path)
  ours = checkpoint.get(OURS) if isinstance(checkpoint, dict) else None
  tensors = unwrap(checkpoint, path, entries, bare)
  tensors = {k: to_numpy(v) for k, v in tensors.items() if is_tensor(v)}
  return tensors, ours if isinstance(ours, dict) else {}


def read(path: pathlib.Path, use_ema: bool = False) -> Spec:
  """The `model` entry, or with `use_ema` the `model_ema` one (which must then exist)."""
  # use_ema must find a `model_ema` entry: a bare state dict is not silently taken for it.
  t, ours = _read(path, ("model_ema",) if use_ema else ("model",), bare=not use_ema)
  ours_cfg, ours_params = ours.get("config") or {}, ours.get("params") or {}
  if "mask_token" in ours_params and "mask_token" not in t:
    t["mask_token"] = to_numpy(ours_params["mask_token"])
  patch_w = need(t, "patch_embed.proj.weight", "the width and patch")
  width, patch = patch_w.shape[0], patch_w.shape[-1]
  inner = need(t, "layers.0.mixer.norm.weight", "the mixer width").shape[0]
  heads = need(t, "layers.0.mixer.A_log", "the SSM heads").shape[0]
  conv = need(t, "layers.0.mixer.conv1d.weight", "d_state").shape[0]  # inner + 2·d_state
  hidden = need(t, "layers.0.mlp.w1.weight", "the MLP width").shape[0]
  ratio = hidden / width
  if int(width * ratio) != hidden:  # the model builds int(width · ratio) features
    ratio = (hidden + 0.5) / width
  head = t.get("head.weight")
  fields = dict(
    width=width,
    depth=depth_of(t, r"layers\.(\d+)\..*"),
    patch=patch,
    image_size=image_size_of(
      need(t, "pos_embed", "the image size").shape[1] - 1, patch, "pos_embed"
    ),
    num_classes=0 if head is None else head.shape[0],
    flip_pattern="released",
    d_state=(conv - inner) // 2,
    headdim=inner // heads,
    expand=inner // width,
    mlp_ratio=ratio,
  )
  fields.update({k: ours_cfg[k] for k in FROM_OURS if k in ours_cfg})
  fields.update({k: tuple(fields[k]) for k in ("mean", "std") if k in fields})
  # Classification checkpoints hold no mask token: initialise it as Adventurer.__init__ does.
  return Spec(
    "adventurer",
    fields,
    TABLE,
    t,
    optional={"mask_token": common.trunc_normal_02},
    fixed=ADVENTURER_FIXED,
    guesses={} if "flip_pattern" in ours_cfg else {"flip_pattern": FLIP_GUESS},
  )
