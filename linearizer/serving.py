"""The deliverable every run writes: the final student as an Orbax checkpoint plus config,
and a serialised inference function that runs without this codebase (`jax.export`). The
formats that leave JAX (ONNX, PyTorch) start from this directory, in `linearizer.export`,
which only its CLI imports:

  python -m linearizer.export --format onnx --input DIR --output student.onnx [--image_size N]
  python -m linearizer.export --format torch --input DIR --output student.pth
"""

import os
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from linearizer import files
from linearizer.models import saved

SERVE_FILE = "serve.jaxexport"
SOURCE_FILE = "exported_from.txt"  # the run's stage the export holds, written last
PLATFORMS = ("cpu", "cuda", "tpu")


def exported_from(directory) -> Optional[str]:
  """The stage a finished export in `directory` was made from, else None."""
  path = os.path.join(directory, SOURCE_FILE)
  if not (os.path.isfile(path) and os.path.isfile(os.path.join(directory, SERVE_FILE))):
    return None
  with open(path, encoding="utf-8") as f:
    return f.read().strip()


def export_student(model, directory, *, image_size=None, overwrite=True, source=""):
  """Writes `directory/` (params + model.json, see models.saved) and `serve.jaxexport`
  (and, given a `source` stage, `exported_from.txt` naming it, last).

  The serialised function maps float32 NHWC images (normalised with `model.cfg.mean/std`,
  any batch size) to logits, or to final tokens for a model without a head, on CPU, GPU
  or TPU.
  """
  size = image_size or model.cfg.image_size
  graphdef, state = nnx.split(model)

  def serve(images):
    out = nnx.merge(graphdef, state)(images)
    return out.logits if out.logits is not None else out.tokens

  exported = _serialisable(serve, (size, size))
  # Exported before anything is written, and the file is renamed into place complete: a
  # failure leaves no half export (a present serve file means the export is finished).
  saved.save(model, directory, overwrite=overwrite)
  _write_serving(exported, directory, source)
  return directory


def _serialisable(serve, hw: tuple):
  """`serve` exported for float32 (batch, h, w, 3) images, any batch, every platform (a
  model exported on a CPU serves on a GPU or TPU)."""
  (batch,) = jax.export.symbolic_shape("batch")
  spec = jax.ShapeDtypeStruct((batch, *hw, 3), jnp.float32)
  return jax.export.export(jax.jit(serve), platforms=PLATFORMS)(spec)


def _write_serving(exported, directory, source: str = "") -> None:
  files.write_bytes(os.path.join(directory, SERVE_FILE), exported.serialize())
  if source:
    files.write_text(os.path.join(directory, SOURCE_FILE), source + "\n")


def export_segmenter(model, directory, *, image_size: tuple, overwrite=True):
  """A segmentation model as a student is exported: `directory/` (params + model.json, see
  `models.saved.save_segmenter`) and `serve.jaxexport`, mapping float32 (batch, h, w, 3)
  images at `image_size` = (h, w), normalised with the backbone's mean/std, to (batch, h,
  w, classes) logits."""
  graphdef, state = nnx.split(model)
  exported = _serialisable(lambda x: nnx.merge(graphdef, state)(x)[0], tuple(image_size))
  saved.save_segmenter(model, directory, overwrite=overwrite)
  _write_serving(exported, directory)
  return directory


def load_segmenter(directory: str) -> nnx.Module:
  """A segment stage's model: `model = linearizer.load_segmenter(DIR/segment/<name>/model)`.

  Returns:
    The `Segmenter`; `model(images)` gives (logits (B, H, W, C), auxiliary logits or None)
    on NHWC float32 images of any size, normalised with `model.backbone.cfg.mean/std`.
  """
  return saved.restore_segmenter(directory)


def load_student(directory: str) -> nnx.Module:
  """The exported student as an nnx module: `model = linearizer.load_student(dir)`.

  Args:
    directory: a directory written by `export_student` (a run's `DIR/export`) or by
      `models.saved.save`.
  Returns:
    The model; call it on NHWC float32 images normalised with `model.cfg.mean/std`.
  """
  return saved.restore(directory)


def load_serving(directory):
  """The serialised inference function: `fn(images) -> logits`, no model code needed."""
  with open(os.path.join(directory, SERVE_FILE), "rb") as f:
    return jax.export.deserialize(bytearray(f.read())).call
