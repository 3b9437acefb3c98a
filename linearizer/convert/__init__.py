"""Weight import: the checkpoints people hold -> our ViT / Adventurer nnx modules.

`load(path, fmt, **overrides)` returns a ready module. Every format is a mapping table
{our parameter path: (their tensor name(s), transform)} plus what the tensor shapes tell
(width, depth, patch, grid -> image_size, mlp width, classes, and heads where the layout
shows them); `overrides` are config fields and replace what was inferred. One shared
routine checks every name and shape before anything is assigned: a file that does not
match raises a single `CheckpointMismatch` and no model is returned.

Formats (method.md §4-5):
  hf           `transformers` folder (config.json + model.safetensors / pytorch_model.bin,
               sharded or not) of CLIPVisionModel / CLIPModel (vision tower), ViTModel /
               ViTForImageClassification, Dinov2Model / Dinov2WithRegistersModel,
               DINOv3ViTModel, SiglipVisionModel / SiglipModel or Siglip2VisionModel /
               Siglip2Model (vision tower; NaFlex at a square grid); or a bare weights file.
  openai_clip  OpenAI CLIP `.pt` (TorchScript or plain) / `.pth` state dict, `visual.*`.
  timm         timm ViT `.pth` / `.safetensors` and its `Eva` models (Perception Encoder,
               EVA-02, DINOv3; `arch` or timm's config.json names one where the tensors fit
               several); a timm `.npz` is big_vision's layout.
  big_vision   `.npz`, original-ViT or big_vision numbering, scanned or not; SigLIP's
               image tower (`params/img/...`, attention-pooling head) included.
  dinov2       DINOv2's torch-hub `.pth` (with or without registers) or training checkpoint.
  dinov3       DINOv3's torch-hub `.pth` (its ViTs: RoPE, storage tokens) or teacher checkpoint.
  adventurer   Adventurer `.pth` (`model` / `model_ema` entry, or a bare state dict).
  orbax        a directory written by `linearizer.models.saved.save` (or this module's CLI).

Decisions (all overridable):
  - CLIP's image projection (openai `proj`, HF CLIPModel `visual_projection`) becomes a
    bias-free head (num_classes = embed dim, head_bias=False): logits are then CLIP's image
    embedding of the final-norm CLS token. `num_classes=0` drops it (and any other head).
  - adventurer: the `model` entry by default (`use_ema=True` for `model_ema`), and
    flip_pattern "released" (`i // 2 == 1`, the code as published) with a warning unless
    chosen: which pattern trained the public weights is unknown. Its checkpoints hold no
    `mask_token` (a distillation-only parameter): unless the file has one it is
    initialised as the model does (trunc-normal 0.02).
  - timm CLIP towers: exact GELU, as timm runs them (a warning: `*_clip_quickgelu_*` files
    need activation='quick_gelu').
  - Overrides: run-time fields (models.RUN_TIME_FIELDS) always apply; one that contradicts
    what the file determines (`Spec.fixed`: shapes, style, heads where shown; every field
    of a saved directory) is refused; the rest replace what was inferred.
  - num_heads: from config.json (hf) or the q kernel (big_vision); timm / openai_clip
    weights do not show it: default width // 64 (exact for OpenAI CLIP; ViT-H needs 16).
  - image_size: inferred from the position-embedding grid; a different override resamples
    the embedding (bicubic, CLS slot kept) as the models do at run time.

Layout: one module per format with a `read(path, **options) -> Spec`, registered once in
`READERS` below, built from `common` (the readers' toolkit: `Spec`, file reading, config
inference from shapes, layout transforms and mapping-table entries, all public); `load`
and the matcher it runs are here; `torchscript` reads TorchScript archives without running
them; `python -m linearizer.convert` runs `main`.
"""

import argparse
import dataclasses
import os
import pathlib
import pickle
import typing
import zipfile
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
from flax import nnx

from linearizer import files, models
from linearizer.convert import adventurer, big_vision, dinov2, dinov3, hf, openai_clip, orbax, timm
from linearizer.convert.common import Spec, Uninferable, read_tensors, templates
from linearizer.errors import MissingPathError, UserError, one_line_errors
from linearizer.log import log
from linearizer.models import saved

__all__ = [
  "load",
  "FORMATS",
  "READERS",
  "OPTIONS",
  "CheckpointMismatch",
  "Spec",
  "describe",
  "read_tensors",
  "main",
]


class CheckpointMismatch(UserError):
  """A weight file whose names or shapes do not match the model it describes."""


# The registry: format name -> reader. A new format is one module and one line here.
READERS = {
  "hf": hf.read,
  "openai_clip": openai_clip.read,
  "timm": timm.read,
  "big_vision": big_vision.read,
  "dinov2": dinov2.read,
  "dinov3": dinov3.read,
  "adventurer": adventurer.read,
  "orbax": orbax.read,
}
# Reader options that are not config fields: {format: {option: CLI help}} (boolean flags).
OPTIONS = {"adventurer": {"use_ema": "load model_ema"}}
# The formats whose files may fit several families, told apart by `arch` (--arch).
TAKES_ARCH = ("timm",)
# What reading a damaged or unreadable file raises (torch: RuntimeError, pickle, zip, numpy).
UNREADABLE = (
  OSError,
  ValueError,
  RuntimeError,
  EOFError,
  zipfile.BadZipFile,
  pickle.UnpicklingError,
)
FORMATS = tuple(READERS)


def load(
  path: Union[str, os.PathLike], fmt: str, *, arch: Optional[str] = None, **overrides
) -> nnx.Module:
  """A ready ViT / Adventurer nnx module from a checkpoint (see the package docstring).

  Args:
    path: the checkpoint file or folder.
    fmt: its format, one of `FORMATS`.
    arch: the model's name where its tensors fit several families (timm: a timm model
      name such as 'vit_pe_core_base_patch16_224', or 'vit', 'pe', 'eva02', 'dinov3');
      formats that tell their family themselves refuse it.
    **overrides: config fields replacing what the weights tell (an `image_size` other than
      the file's resamples the position embedding), and the format's `OPTIONS`
      (e.g. `use_ema=True` for adventurer).
  Returns:
    The module of the inferred (and overridden) config holding the file's weights.
  Raises:
    UserError: an unknown format or override, or a config field out of range.
    MissingPathError: `path` does not exist.
    CheckpointMismatch: the file's names or shapes do not match the model it describes;
      nothing is returned.
  """
  if fmt not in READERS:
    raise UserError(f"Unknown checkpoint format {fmt!r}; expected one of {list(FORMATS)}.")
  path = pathlib.Path(path)
  if not path.exists():
    raise MissingPathError(f"Checkpoint {path} (format {fmt!r}) does not exist.")
  options = {k: overrides.pop(k) for k in OPTIONS.get(fmt, {}) if k in overrides}
  if arch:
    if fmt not in TAKES_ARCH:
      raise UserError(
        f"arch={arch!r}: format {fmt!r} tells its model from the file itself; arch names "
        f"the model for the formats {list(TAKES_ARCH)}."
      )
    options["arch"] = arch
  where = f"{path} (format {fmt!r})"
  try:
    spec = READERS[fmt](path, **options)
  except Uninferable as e:
    raise CheckpointMismatch(f"{where}: {e}.") from None
  except UserError:
    raise
  except UNREADABLE as e:  # a truncated, corrupt or unreadable file: the user's to fix
    raise UserError(f"{where} could not be read: {type(e).__name__}: {e}") from e
  cfg = _config(spec, overrides, where)
  for field, why in spec.guesses.items():
    if field not in overrides:
      log(f"warning: {where}: {field}={getattr(cfg, field)!r} is a guess: {why}.")
  native = dataclasses.replace(cfg, image_size=spec.fields["image_size"])
  arrays = _match(nnx.eval_shape(lambda: models.from_config(native)), spec, where)
  if cfg.image_size != native.image_size and ("pos_embed",) in arrays:  # once here, as the
    # models do at run time (a RoPE-only model has no table: its grid is any image's)
    arrays[("pos_embed",)] = models.ARCHITECTURES[spec.kind].module.resample_pos_embed(
      cfg, jnp.asarray(arrays[("pos_embed",)], jnp.float32), _grid(native), _grid(cfg)
    )
  return saved.from_params(cfg, arrays)


def _grid(cfg) -> tuple:
  return (cfg.image_size // cfg.patch,) * 2


# ---------------------------------------------------------------------------------------
# load's two steps: the config (inferred fields + overrides), then the matcher (check
# everything, then hand back the arrays to assign)
# ---------------------------------------------------------------------------------------
def _config(spec, overrides, where):
  """The config of `spec.kind` from the inferred fields and the user's `overrides`.

  Run-time fields (`models.RUN_TIME_FIELDS`) always apply; an override of a field the file
  determines (`spec.fixed`) that contradicts it is refused, all such in one message
  (`num_classes=0`, which drops the head, excepted); the rest (style, eps, ...) are hints
  that replace what was inferred. Values are checked by the config itself (`__post_init__`).
  """
  cls = models.ARCHITECTURES[spec.kind].config
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(overrides) - known)
  if unknown:
    raise UserError(
      f"Unknown override(s) {unknown} for the {spec.kind} model; its config fields are "
      f"{sorted(known)}."
    )
  same = lambda a, b: (
    (tuple(a) if isinstance(a, list) else a)
    == (  # JSON lists: tuples
      tuple(b) if isinstance(b, list) else b
    )
  )
  contradicted = [
    f"{k}={v!r} (the file has {spec.fields[k]!r})"
    for k, v in overrides.items()
    if k in spec.fixed
    and k not in models.RUN_TIME_FIELDS
    and not same(v, spec.fields[k])
    and not (k == "num_classes" and v == 0)
  ]
  if contradicted:
    raise UserError(
      f"{where}: overrides contradict what the checkpoint determines: "
      + ", ".join(contradicted)
      + f". Only run-time fields {list(models.RUN_TIME_FIELDS)} may differ from it; "
      "remove the others."
    )
  return cls(**{**spec.fields, **overrides})


def _floating(array):
  return array.dtype.kind == "f" or array.dtype.name == "bfloat16"


def _shape(s):
  return "(" + ", ".join(str(d) for d in s) + ")"


def _match(abstract, spec, where):
  """{our param path: array}, or one CheckpointMismatch naming everything that is off."""
  t = spec.tensors
  params = list(templates(abstract))
  planned, fresh, used, missing, misshaped = [], {}, set(), [], []
  for template, key, shape in params:
    if template not in spec.table:
      raise NotImplementedError(
        f"no mapping for parameter {template!r} (a bug in the linearizer.convert reader)"
      )
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
      elif not _floating(t[name]):  # an integer-typed weight is no float model's weight
        misshaped.append(f"{name}: dtype {t[name].dtype}, expected floating-point weights")
        ok = False
    if ok:
      planned.append((key, tx, names))
  # A head in the file that the config dropped (num_classes=0) is not an error.
  heads = (
    set()
    if any(tmpl.startswith("head.") for tmpl, _, _ in params)
    else {n for tmpl, (names, _) in spec.table.items() if tmpl.startswith("head.") for n in names}
  )
  unexpected = [
    f"{n} {_shape(t[n].shape)}"
    for n in sorted(t)
    if n not in used and not spec.ignore(n) and n not in heads
  ]
  if missing or unexpected or misshaped:
    lines = [f"{where} does not match the model it describes:"]
    for label, items in (
      ("missing", missing),
      ("unexpected", unexpected),
      ("mis-shaped or mis-typed", misshaped),
    ):
      if items:
        more = f", ... and {len(items) - 5} more" if len(items) > 5 else ""
        lines.append(f"  {len(items)} {label}: " + "; ".join(items[:5]) + more)
    raise CheckpointMismatch("\n".join(lines))
  return {**fresh, **{key: tx.fwd(*(t[n] for n in names)) for key, tx, names in planned}}


# (config field, text) in the order `describe` prints those a model's config has.
_DESCRIBED = (
  ("width", "width {}"),
  ("depth", "depth {}"),
  ("num_heads", "heads {}"),
  ("mlp_dim", "mlp {}"),
  ("patch", "patch {}"),
  ("image_size", "@{}"),
  ("style", "style {}"),
  ("flip_pattern", "flip {}"),
  ("dtype", "{}"),
)


def describe(model) -> str:
  """One line of a model's architecture, e.g. 'width 64 depth 2 ... style clip classes 16'."""
  c = model.cfg
  text = " ".join(fmt.format(getattr(c, f)) for f, fmt in _DESCRIBED if hasattr(c, f))
  registers, pool = getattr(c, "registers", 0), getattr(c, "pool", "cls")
  extras = (  # the ViT's optional parts, where a config has them
    (f" registers {registers}" if registers else "")
    + (" layer-scale" if getattr(c, "layer_scale", None) is not None else "")
    + (" no-CLS" if getattr(c, "cls_token", True) is False else "")
    + (f" pool {pool}" if pool != "cls" else "")
    + (f" rope {c.rope}" if getattr(c, "rope", None) else "")
    + (" no-table" if getattr(c, "pos_embed", True) is False else "")
    + (" swiglu" if getattr(c, "mlp", "plain") == "swiglu" else "")
  )
  return text + extras + (f" classes {c.num_classes}" if c.num_classes else "")


# ---------------------------------------------------------------------------------------
# CLI: python -m linearizer.convert --format F --input P --output DIR [--num_heads N ...]
# ---------------------------------------------------------------------------------------
def _flag_type(hint):
  args = [a for a in typing.get_args(hint) if a is not type(None)]
  if typing.get_origin(hint) is typing.Literal or (
    args and typing.get_origin(args[0]) is typing.Literal
  ):
    return str  # a Literal field (style, flip_pattern, ...): its config checks the value
  hint = args[0] if args else hint
  if hint is bool:
    return lambda s: {"true": True, "1": True, "false": False, "0": False}[s.lower()]
  if hint is tuple:
    return lambda s: tuple(float(v) for v in s.split(","))
  return hint


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="python -m linearizer.convert",
    description="Convert a checkpoint to an Orbax model directory (linearizer.models.saved).",
  )
  parser.add_argument("--format", required=True, choices=FORMATS)
  parser.add_argument("--input", required=True, help="checkpoint file or folder")
  parser.add_argument("--output", required=True, help="directory to write")
  parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
  parser.add_argument(
    "--arch",
    default=None,
    help="timm: the model's name (e.g. vit_pe_core_base_patch16_224) where the tensors fit "
    "several families",
  )
  for fmt, options in OPTIONS.items():
    for name, text in options.items():
      parser.add_argument(f"--{name}", action="store_true", help=f"{fmt}: {text}")
  flags = {}
  for arch in models.ARCHITECTURES.values():
    for name, hint in typing.get_type_hints(arch.config).items():
      flags.setdefault(name, hint)
  group = parser.add_argument_group("config overrides (replace what the weights tell)")
  for name, hint in flags.items():
    group.add_argument(f"--{name}", type=_flag_type(hint), default=None)
  return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
  """The CLI; bad input prints one `error: ...` and exits 2 (see linearizer.errors)."""
  args = vars(_parser().parse_args(argv))
  fmt, src, out = args.pop("format"), args.pop("input"), args.pop("output")
  overwrite = args.pop("overwrite")
  options = {n: True for opts in OPTIONS.values() for n in opts if args.pop(n)}
  overrides = {k: v for k, v in args.items() if v is not None}
  with one_line_errors():
    files.check_outputs([], inputs=[src], replaced=[out])  # --overwrite would delete it
    saved.check_writable(out, overwrite)  # fail before the (slow) conversion
    model = load(src, fmt, **overrides, **options)
    written = saved.save(model, out, overwrite=overwrite)
  kind = models.kind_of(model)
  print(f"{kind}: {describe(model)}, {models.num_params(model):,} parameters -> {written}")
