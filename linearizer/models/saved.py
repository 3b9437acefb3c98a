"""A model on disk: an Orbax checkpoint of its parameters plus `model.json` with its config.

Layout of a saved directory:
  model.json   {"kind": <an architecture of models.ARCHITECTURES>, "config": dataclasses.asdict(cfg)}
  params/      Orbax (StandardCheckpointer) checkpoint of the nnx.Param state as a pure dict

This is what `python -m linearizer.convert` writes and what a config names as teacher or
student init. Only parameters are stored: RNG state and the like are rebuilt from the config.
Single-host: write it from one process.
"""

import dataclasses
import json
import os
import pathlib
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from linearizer import models
from linearizer.errors import MissingPathError, PathExistsError, UserError
from linearizer.models.segmenter import Segmenter, SegmenterConfig


def check_writable(directory, overwrite: bool = False) -> pathlib.Path:
  """The absolute path, or FileExistsError if it holds something and not `overwrite`."""
  directory = pathlib.Path(directory).absolute()
  if directory.exists() and (not directory.is_dir() or any(directory.iterdir())) and not overwrite:
    raise PathExistsError(
      f"{directory} exists and is not empty; pass overwrite=True to replace it."
    )
  return directory


def save(model, directory, *, overwrite: bool = False) -> pathlib.Path:
  """Writes `model` to `directory`; refuses a non-empty one unless `overwrite`.

  Everything is written to a temporary sibling first and moved into place at the end, so a
  failure half-way never damages what was there.
  """
  meta = {"kind": models.kind_of(model), "config": dataclasses.asdict(model.cfg)}
  return _write(model, meta, directory, overwrite)


def _write(model, meta: dict, directory, overwrite: bool) -> pathlib.Path:
  """params/ and model.json (`meta`), written beside `directory` and moved into place."""
  directory = check_writable(directory, overwrite)
  try:
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
  except OSError as e:  # a directory the user named that cannot be written
    raise UserError(f"Cannot write a model to {directory}: {e.strerror or e}.") from e
  try:
    params = nnx.state(model, nnx.Param).to_pure_dict()
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp / "params", params)
    checkpointer.wait_until_finished()
    (tmp / "model.json").write_text(json.dumps(meta, indent=2) + "\n")
    if directory.exists():
      shutil.rmtree(directory) if directory.is_dir() else directory.unlink()
    os.replace(tmp, directory)
  except BaseException as e:
    shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(e, OSError):  # disk full, permissions: what was there is untouched
      raise UserError(f"Cannot write a model to {directory}: {e.strerror or e}.") from e
    raise
  return directory


SEGMENTER = "segmenter"  # model.json's kind for a backbone with a segmentation head


def save_segmenter(model: Segmenter, directory, *, overwrite: bool = False) -> pathlib.Path:
  """Writes a segmenter like `save`: model.json holds its backbone's kind and config and
  the head's `SegmenterConfig`; params/ all of its parameters."""
  meta = {
    "kind": SEGMENTER,
    "backbone": {
      "kind": models.kind_of(model.backbone),
      "config": dataclasses.asdict(model.backbone.cfg),
    },
    "config": dataclasses.asdict(model.cfg),
  }
  return _write(model, meta, directory, overwrite)


def restore_segmenter(directory) -> Segmenter:
  """The segmenter `save_segmenter` wrote (shapes checked against model.json first)."""
  path = pathlib.Path(directory) / "model.json"
  if not path.is_file():
    raise MissingPathError(f"{path} not found: {directory} is not a saved segmentation model.")
  try:
    meta = json.loads(path.read_text())
  except ValueError as e:
    raise UserError(f"{path} is not JSON ({e}): the saved model is damaged.") from e
  if meta.get("kind") != SEGMENTER:
    raise UserError(
      f"{path}: kind {meta.get('kind')!r}; expected {SEGMENTER!r} (a segment stage's "
      "DIR/segment/<backbone>/model). A classifier loads with linearizer.load_student."
    )
  try:
    backbone = models.config_from_dict(meta["backbone"]["kind"], meta["backbone"]["config"])
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()}
    cfg = SegmenterConfig(**fields)
  except (KeyError, TypeError, AttributeError) as e:
    raise UserError(
      f"{path} does not describe a segmenter ({type(e).__name__}: {e}); expected 'backbone' "
      "{kind, config} and the head's 'config', as save_segmenter writes them."
    ) from e
  build = lambda: Segmenter(models.from_config(backbone), cfg, rngs=nnx.Rngs(0))
  restored = _restore_params(directory, cfg, build)
  model = build()
  nnx.update(model, nnx.State(restored))
  return model


def load_config(directory):
  """(kind, config dataclass) from `directory/model.json`."""
  path = pathlib.Path(directory) / "model.json"
  if not path.is_file():
    raise MissingPathError(
      f"{path} not found: {directory} is not a directory written by linearizer.models.saved.save."
    )
  meta = json.loads(path.read_text())
  if meta.get("kind") not in models.ARCHITECTURES:
    raise UserError(
      f"{path}: unknown model kind {meta.get('kind')!r}; expected one of "
      f"{sorted(models.ARCHITECTURES)}."
    )
  return meta["kind"], models.config_from_dict(meta["kind"], meta["config"])


def _damaged(directory, error) -> UserError:
  return UserError(
    f"{pathlib.Path(directory) / 'params'} cannot be read ({type(error).__name__}: "
    f"{str(error)[:200]}): the saved model is damaged. If it is a run's <stage>/model, "
    "delete that directory and run again: the stage finishes again from its last checkpoint."
  )


def read_params(directory) -> dict:
  """The saved parameters as {dotted path: numpy array}, e.g. 'blocks.0.attn.qkv.kernel'."""
  try:
    tree = ocp.StandardCheckpointer().restore(pathlib.Path(directory).absolute() / "params")
  except Exception as e:  # truncated or missing files: Orbax's own errors, many of them
    raise _damaged(directory, e) from e
  flat = {}
  for path, value in jax.tree_util.tree_flatten_with_path(tree)[0]:
    flat[".".join(str(getattr(k, "key", k)) for k in path)] = np.asarray(value)
  return flat


def from_params(cfg, params: dict):
  """The module of `cfg` with `params` ({path tuple: array}) as its parameters.

  Random init runs only when something is left to initialise (RNG state when drop_path > 0,
  a parameter absent from `params`): on CPU it compiles one program per initializer, which
  costs seconds even for a tiny model.
  """
  model = nnx.eval_shape(lambda: models.from_config(cfg))
  graphdef, state, rest = nnx.split(model, nnx.Param, ...)
  if jax.tree.leaves(rest) or set(dict(nnx.to_flat_state(state))) - set(params):
    graphdef, state, rest = nnx.split(models.from_config(cfg), nnx.Param, ...)
  pure = state.to_pure_dict()
  for key, array in params.items():
    node = pure
    for k in key[:-1]:
      node = node[k]
    if tuple(node[key[-1]].shape) != tuple(np.shape(array)):
      raise UserError(
        f"Parameter {'.'.join(map(str, key))}: expected shape "
        f"{tuple(node[key[-1]].shape)}, got {tuple(np.shape(array))}."
      )
    node[key[-1]] = jnp.asarray(array, node[key[-1]].dtype)
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state, rest)


def _dotted(tree) -> dict:
  return {
    ".".join(str(getattr(k, "key", k)) for k in path): leaf
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def check_params(directory, cfg, abstract) -> None:
  """model.json against the shapes of the parameters saved beside it, before Orbax reads
  them: one message naming what disagrees (an edited model.json, or another model's)."""
  params = pathlib.Path(directory).absolute() / "params"
  try:
    meta = ocp.StandardCheckpointer().metadata(params)
  except Exception as e:  # no or damaged Orbax metadata
    raise _damaged(directory, e) from e
  have = {k: tuple(v.shape) for k, v in _dotted(getattr(meta, "item_metadata", meta)).items()}
  if not have:  # the metadata lives in the data files too: truncated ones read as empty
    raise _damaged(directory, ValueError("the checkpoint lists no parameters"))
  want = {k: tuple(v.shape) for k, v in _dotted(abstract).items()}
  problems = [f"{k} missing" for k in sorted(want.keys() - have.keys())]
  problems += [f"{k} not in the config" for k in sorted(have.keys() - want.keys())]
  problems += [
    f"{k}: config {want[k]}, saved {have[k]}"
    for k in sorted(want.keys() & have.keys())
    if want[k] != have[k]
  ]
  if problems:
    more = f", ... and {len(problems) - 5} more" if len(problems) > 5 else ""
    raise UserError(
      f"{pathlib.Path(directory) / 'model.json'} does not describe the parameters saved "
      f"beside it ({len(problems)} differences: " + "; ".join(problems[:5]) + more + "). "
      "Was it edited? Its depth, width, patch, image_size or num_classes must be the saved "
      "model's."
    )


def restore(directory):
  """Rebuilds the module from model.json and restores its parameters (shapes are checked
  against model.json first, `check_params`)."""
  _, cfg = load_config(directory)
  restored = _restore_params(directory, cfg, lambda: models.from_config(cfg))
  return from_params(cfg, nnx.traversals.flatten_mapping(restored))


def _restore_params(directory, cfg, build) -> dict:
  """The saved parameters as a pure dict shaped as `build()`'s, checked against model.json
  first (`check_params`); any Orbax failure is one message."""
  abstract = nnx.state(nnx.eval_shape(build), nnx.Param).to_pure_dict()
  check_params(directory, cfg, abstract)
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract)
  try:
    return ocp.StandardCheckpointer().restore(pathlib.Path(directory).absolute() / "params", target)
  except Exception as e:
    raise _damaged(directory, e) from e
