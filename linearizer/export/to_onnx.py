"""ONNX export of an exported student (`python -m linearizer.export --format onnx`).

  python -m linearizer.export --format onnx --input DIR/export --output student.onnx \
      [--image_size N] [--opset K]

The graph is written op by op with the `onnx` package from the saved parameters, not traced
from JAX: jax2onnx converts the student with the same parity but pins orbax-checkpoint below
the version this project pins, so it cannot be an extra of ours (docs/benchmarks.md, "ONNX
Runtime vs JAX on CPU"). The student's architecture is fixed (method.md §5, §6), so one
builder per part follows `models/adventurer.py`, `models/mamba2.py` and the chunked scan of
`kernels/xla.py` line for line, with the chunking fixed at the export resolution.

The file's contract (also in its metadata):
  input   `images`: float32 (batch, N, N, 3), NHWC as `load_student` takes them (so users'
          preprocessing is the same for both), normalised with the model's mean/std; the
          batch is symbolic, N the export's `image_size`.
  output  `logits` (batch, classes), or for a model without a head `tokens` (batch, P+1, D):
          the final-norm tokens, P patches in raster order then CLS, as `ModelOutput.tokens`.
The graph computes in float32 whatever the config's `dtype` (the parameters are float32).
"""

import dataclasses
import importlib
import json
import os
import pathlib
from typing import Optional

import numpy as np
from flax import nnx

from linearizer import files, memory, models
from linearizer.errors import MissingPathError, UserError
from linearizer.export.onnx_graph import Graph, student_graph
from linearizer.models import saved

MIN_OPSET = 18  # ReduceMean takes its axes as an input from opset 18 on
# Recent enough for every op here, old enough that runtimes from 2024 on (ONNX Runtime
# >= 1.18) load it; --opset raises it up to what the onnx package knows.
DEFAULT_OPSET = 21
INPUT_LAYOUT = "NHWC"
INSTALL = "pip install 'linearizer[onnx]'"
EXPECTED = "an exported student (a run's DIR/export: model.json and params/)"
# One .onnx file is one protobuf, which cannot exceed 2 GiB (Adventurer-L/16 is 1.4 GB).
MAX_BYTES = 2**31 - 2**24


def to_onnx(
  directory: str, path: str, *, image_size: Optional[int] = None, opset: Optional[int] = None
) -> str:
  """Writes the student in `directory` (a run's DIR/export) as an ONNX file at `path`.

  Args:
    directory: an exported student (`export_student`, or `models.saved.save` of an
      Adventurer): model.json and params/.
    path: the .onnx file to write; replaced atomically if it exists.
    image_size: the side N of the square input (default: the model's); a multiple of the
      patch size. The position embedding is resampled to it here, as `load_student`
      resamples it for images of that size.
    opset: the ONNX opset to target (default DEFAULT_OPSET, at least MIN_OPSET).
  Returns:
    `path`, as a string.
  Raises:
    UserError: onnx not installed, a directory that is not an exported student, an
      image_size the patch does not divide, an opset out of range, an unwritable `path`.
  """
  onnx = _require("onnx")
  opset = _check_opset(onnx, opset)
  _check_output(path)
  cfg = _read_config(directory)
  size = _check_image_size(cfg, directory, image_size)
  params = _read_params(directory, cfg)
  if sum(v.nbytes for v in params.values()) > MAX_BYTES:
    raise UserError(f"{directory}: the parameters take more than the 2 GiB one ONNX file can hold.")
  graph = Graph(onnx)
  output = student_graph(graph, cfg, params, size)
  model = onnx.helper.make_model(
    graph.finish(size, output),
    opset_imports=[onnx.helper.make_opsetid("", opset)],
    producer_name="linearizer",
    doc_string="Adventurer student; input NHWC float32 normalised with metadata mean/std.",
  )
  # The oldest IR version the opset allows, so that older runtimes load the file too.
  model.ir_version = onnx.helper.find_min_ir_version_for(list(model.opset_import))
  onnx.helper.set_model_props(model, metadata(cfg, directory, size))
  onnx.checker.check_model(model)
  files.write_bytes(path, model.SerializeToString())
  return str(path)


def metadata(cfg, directory, size: int) -> dict:
  """The file's `metadata_props`: everything a user needs to feed it and read it, as strings."""
  n = (size // cfg.patch) ** 2
  output = (
    f"logits: float32 (batch, {cfg.num_classes})"
    if cfg.num_classes
    else f"tokens: float32 (batch, {n + 1}, {cfg.width}), final-norm, {n} patches in raster "
    "order then CLS"
  )
  return {
    "mean": json.dumps(list(cfg.mean)),
    "std": json.dumps(list(cfg.std)),
    "image_size": str(size),
    "patch": str(cfg.patch),
    "num_classes": str(cfg.num_classes),
    "input_layout": INPUT_LAYOUT,
    "input": f"images: float32 (batch, {size}, {size}, 3) NHWC, normalised with mean/std",
    "output": output,
    "model_kind": "adventurer",
    "model_config": json.dumps(dataclasses.asdict(cfg)),
    "source_directory": str(pathlib.Path(directory).absolute()),
  }


# ---------------------------------------------------------------------------------------
# Checks: everything is refused before anything is written.
# ---------------------------------------------------------------------------------------
def _require(module: str):
  """The optional dependency `module`, or one UserError saying how to install it."""
  try:
    return importlib.import_module(module)
  except ImportError as e:
    raise UserError(f"The ONNX export needs the {module} package: {INSTALL}.") from e


def _check_opset(onnx, opset: Optional[int]) -> int:
  newest = onnx.defs.onnx_opset_version()
  opset = DEFAULT_OPSET if opset is None else opset
  if not isinstance(opset, int) or not MIN_OPSET <= opset <= newest:
    raise UserError(
      f"opset={opset!r}: the student's graph needs opset >= {MIN_OPSET} (ReduceMean with its "
      f"axes as an input) and onnx {onnx.__version__} knows up to {newest}; expected "
      f"{MIN_OPSET}..{newest} (default {DEFAULT_OPSET})."
    )
  return opset


def _read_config(directory):
  """The config of the Adventurer saved in `directory` (its model.json)."""
  path = pathlib.Path(directory)
  if not path.is_dir():
    what = "is not a directory" if path.exists() else "does not exist"
    raise MissingPathError(f"{directory} {what}; expected {EXPECTED}.")
  if not (path / "model.json").is_file():
    raise MissingPathError(f"{directory} has no model.json: it is not {EXPECTED}.")
  try:
    kind, cfg = saved.load_config(path)
  except UserError:
    raise
  except (ValueError, TypeError, KeyError, AttributeError) as e:  # bad JSON, missing fields
    raise UserError(
      f"{path / 'model.json'} cannot be read ({type(e).__name__}: {e}); expected {EXPECTED}."
    ) from e
  if kind != "adventurer":
    raise UserError(
      f"{directory} holds a {kind!r} model; the ONNX export writes the Adventurer student "
      "(model.json kind 'adventurer')."
    )
  if cfg.ngroups != 1:  # the graph's SSD and gated norm are written for one B/C group
    raise UserError(
      f"{directory} holds a student with ngroups={cfg.ngroups}; the ONNX export writes "
      "single-group students only (ngroups=1)."
    )
  return cfg


def _read_params(directory, cfg) -> dict:
  """{dotted name: float32 array} of the parameters in `directory`, checked against its
  model.json first (`saved.check_params`: one message naming what disagrees)."""
  abstract = nnx.state(nnx.eval_shape(lambda: models.from_config(cfg)), nnx.Param)
  saved.check_params(directory, cfg, abstract.to_pure_dict())
  return {k: np.asarray(v, np.float32) for k, v in saved.read_params(directory).items()}


def _check_image_size(cfg, directory, image_size: Optional[int]) -> int:
  size = cfg.image_size if image_size is None else image_size
  p = cfg.patch
  if not isinstance(size, int) or size < p or size % p:
    near = max(1, round(size / p) if isinstance(size, (int, float)) else 1) * p
    raise UserError(
      f"image_size={size!r}: the student in {directory} has {p}px patches, which do not "
      f"divide it; expected a positive multiple of {p} (e.g. {near})."
    )
  # the export resamples the position table and traces a forward at this size
  memory.check(f"--image_size {size}", cfg, size, batch=1)
  return size


def _check_output(path) -> None:
  if os.path.isdir(path):
    raise UserError(f"--output {path} is a directory; expected the .onnx file to write.")
