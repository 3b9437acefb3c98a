"""PyTorch export of an exported student (`python -m linearizer.export --format torch`).

The `.pth` is laid out as wangf3014/Adventurer's checkpoints are, so its model code loads
it (`model.load_state_dict(ckpt["model"])`, strictly), and so does ours:

  {"model": Adventurer's state dict (its names and torch layouts, float32),
   "linearizer": {"config": {width, depth, patch, image_size, num_classes, flip_pattern,
                             d_state, headdim, expand, mlp_ratio, mean, std},
                  "params": {"mask_token": ...}}}

`linearizer/export/torch_adventurer.py`, one file that needs only torch, rebuilds the model from
it (`torch_adventurer.load(path)`); `linearizer.convert.load(path, "adventurer")` reads it
back bitwise, the config's flip_pattern, mean and std included. The mask token, which only
distillation uses and Adventurer's model has not, sits in our entry rather than `model`.
The tensors are written with the inverse of convert's mapping table
(`linearizer.convert.adventurer.TABLE`): transposes only, nothing rounds.
"""

import json
import pathlib
import re

import numpy as np
from flax import nnx

from linearizer import files, models
from linearizer.convert import adventurer
from linearizer.errors import MissingPathError, UserError
from linearizer.models import saved

# The config fields the file carries: what the network computes (torch_adventurer's
# AdventurerConfig), not how the JAX model ran (dtype, ssd_impl, chunk_size, drop_path).
CONFIG_FIELDS = (
  "width",
  "depth",
  "patch",
  "image_size",
  "num_classes",
  "flip_pattern",
  "d_state",
  "headdim",
  "expand",
  "mlp_ratio",
  "mean",
  "std",
)
NOT_IN_ADVENTURER = ("mask_token",)  # our parameters Adventurer's own model has not
EXPECTED = (
  "an exported student: a directory written by linearizer.serving.export_student (a run's "
  "DIR/export) or linearizer.models.saved.save, holding model.json and params/ of an "
  "Adventurer"
)


def to_torch(directory: str, path: str) -> str:
  """Writes the student in `directory` (a run's DIR/export) as an Adventurer `.pth` at `path`.

  Args:
    directory: an export of an Adventurer student (model.json + params/).
    path: the `.pth` to write; replaced atomically (a failure leaves what was there).

  Returns:
    `path`.

  Raises:
    UserError: `directory` is not such an export (or not an Adventurer), torch is not
      installed, or `path` cannot be written; nothing is written then.
  """
  cfg, params = _read_student(directory)  # bad input is named before torch is imported
  torch = _torch()
  state_dict, ours = _adventurer_layout(params)
  checkpoint = {
    "model": {k: torch.from_numpy(v) for k, v in state_dict.items()},
    adventurer.OURS: {
      "config": {k: _plain(getattr(cfg, k)) for k in CONFIG_FIELDS},
      "params": {k: torch.from_numpy(v) for k, v in ours.items()},
    },
  }
  with files.replacing(path) as tmp:
    torch.save(checkpoint, tmp)
  return str(path)


def _torch():
  try:
    import torch  # optional dependency: only this export needs it
  except ImportError as e:
    raise UserError(
      "The torch export needs PyTorch: pip install 'linearizer[torch]' (or pip install torch)."
    ) from e
  return torch


def _read_student(directory) -> tuple:
  """(config, {dotted path: numpy array}) of the Adventurer saved in `directory`, or one
  UserError naming the path and what was expected."""
  directory = pathlib.Path(directory)
  meta_path = directory / "model.json"
  if not directory.is_dir():
    raise MissingPathError(f"{directory} is not a directory; expected {EXPECTED}.")
  if not meta_path.is_file():
    raise MissingPathError(f"{directory} holds no model.json; expected {EXPECTED}.")
  try:
    meta = json.loads(meta_path.read_text())
  except (ValueError, UnicodeDecodeError) as e:
    raise UserError(f"{meta_path} is not JSON ({e}); expected {EXPECTED}.") from e
  kind = meta.get("kind") if isinstance(meta, dict) else None
  if kind != "adventurer":
    raise UserError(
      f"{meta_path} describes a {kind!r} model; the torch export writes Adventurer "
      f"students only (kind 'adventurer'): expected {EXPECTED}."
    )
  try:
    cfg = models.config_from_dict(kind, meta["config"])
  except (KeyError, TypeError, AttributeError) as e:
    raise UserError(
      f"{meta_path} holds no Adventurer config ({type(e).__name__}: {e}); expected {EXPECTED}."
    ) from e
  if cfg.ngroups != 1:  # Adventurer's layout (torch_adventurer.py) shares B, C over the heads
    raise UserError(
      f"{directory} holds a student with ngroups={cfg.ngroups}; the torch export writes "
      "Adventurer's layout, which has one B/C group (ngroups=1)."
    )
  # Shapes checked against model.json before Orbax reads anything (a damaged export).
  abstract = nnx.state(nnx.eval_shape(lambda: models.from_config(cfg)), nnx.Param)
  saved.check_params(directory, cfg, abstract.to_pure_dict())
  return cfg, saved.read_params(directory)


def _adventurer_layout(params: dict) -> tuple:
  """Our {dotted path: array} -> (Adventurer's state dict, {name: array} of ours it lacks),
  each a contiguous float32 copy, through the inverse of convert's table."""
  state_dict, ours = {}, {}
  for name, array in params.items():
    template = re.sub(r"\.\d+\.", ".{i}.", name)
    if template not in adventurer.TABLE:
      raise NotImplementedError(f"no Adventurer name for parameter {name!r} (a bug here)")
    (their,), tx = adventurer.TABLE[template]
    layer = re.search(r"\.(\d+)\.", name)
    (value,) = tx.inv(np.asarray(array, np.float32))
    value = np.array(value, np.float32, order="C")  # a writable copy: torch shares its memory
    if name in NOT_IN_ADVENTURER:
      ours[name] = value
    else:
      state_dict[their.format(i=layer.group(1) if layer else None)] = value
  return state_dict, ours


def _plain(value):
  """A config value as the file keeps it: tuples as lists (torch's weights_only loader and
  JSON both read them)."""
  return list(value) if isinstance(value, tuple) else value
