"""What a reader returns (`Spec`), the config inference it shares, and the one matcher.

A reader infers the architecture from tensor shapes (`_need`, `_depth`, `_grid_size`,
`_find_prefix`, `_vit_fields`) and states a mapping table. `_match` then checks every name
and shape of the file against the model before anything is assigned, and raises a single
`CheckpointMismatch` naming everything that is off.
"""

import dataclasses
import math
import re
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from linearizer import models
from linearizer.errors import UserError
from linearizer.models import vit as vit_lib


class CheckpointMismatch(UserError):
  """A weight file whose names or shapes do not match the model it describes."""


class _Uninferable(Exception):
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
# Config inference shared by the readers
# ---------------------------------------------------------------------------------------
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
    raise _Uninferable(
      f"cannot infer the image size: {what} holds {tokens} patch positions, not a square grid"
    )
  return grid * patch


def _find_prefix(tensors, suffix):
  """The prefix in front of `suffix` (e.g. 'vit.' or 'vision_model.'), or None."""
  return next((n[: -len(suffix)] for n in sorted(tensors, key=len) if n.endswith(suffix)), None)


def _vit_fields(
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


# ---------------------------------------------------------------------------------------
# The matcher: check everything, then hand back the arrays to assign
# ---------------------------------------------------------------------------------------
def _templates(model):
  """(template, path, shape) per parameter; layer indices in the template become '{i}'."""
  for key, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    yield ".".join("{i}" if isinstance(k, int) else str(k) for k in key), key, var.get_value().shape


def _floating(array):
  return array.dtype.kind == "f" or array.dtype.name == "bfloat16"


def _shape(s):
  return "(" + ", ".join(str(d) for d in s) + ")"


def _match(abstract, spec, where):
  """{our param path: array}, or one CheckpointMismatch naming everything that is off."""
  t = spec.tensors
  params = list(_templates(abstract))
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
