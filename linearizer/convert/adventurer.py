"""adventurer: an Adventurer `.pth` (`model` / `model_ema` entry, or a bare state dict).

flip_pattern is "released" (`i // 2 == 1`, the code as published) unless chosen; which
pattern trained the public weights is unknown, so load warns when it is not chosen. A
missing `mask_token` (classification checkpoints) is initialised as the model does.
"""

import pathlib

from linearizer.convert.match import ADVENTURER_FIXED, Spec, _depth, _grid_size, _need
from linearizer.convert.tensors import CONV, CONV1D, LINEAR, SAME, _linear, read_tensors
from linearizer.models import common

FLIP_GUESS = (
  "the weights do not show which blocks flip the patch order; 'released' (i // 2 == 1) is "
  "the code as published, 'pairs' ((i // 2) % 2 == 1) and 'alternate' (i % 2 == 1) the fixes "
  "its maintainer names. Choose with flip_pattern=..., by top-1 on a validation subset "
  "(docs/method-fidelity.md)"
)


def read(path: pathlib.Path, use_ema: bool = False) -> Spec:
  """The `model` entry, or with `use_ema` the `model_ema` one (which must then exist)."""
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
  fields = dict(
    width=width,
    depth=_depth(t, r"layers\.(\d+)\..*"),
    patch=patch,
    image_size=_grid_size(_need(t, "pos_embed", "the image size").shape[1] - 1, patch, "pos_embed"),
    num_classes=0 if head is None else head.shape[0],
    flip_pattern="released",
    d_state=(conv - inner) // 2,
    headdim=inner // heads,
    expand=inner // width,
    mlp_ratio=ratio,
  )
  m = "layers.{i}.mixer."
  table = {
    **_linear("patch_embed", "patch_embed.proj", CONV),
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
    **_linear("head", "head"),
  }
  # Classification checkpoints hold no mask token: initialise it as Adventurer.__init__ does.
  return Spec(
    "adventurer",
    fields,
    table,
    t,
    optional={"mask_token": common.trunc_normal_02},
    fixed=ADVENTURER_FIXED,
    guesses={"flip_pattern": FLIP_GUESS},
  )
