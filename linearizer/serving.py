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

import kernels
from linearizer import files
from linearizer.models import saved

SERVE_FILE = "serve.jaxexport"
SOURCE_FILE = "exported_from.txt"  # the run's stage the export holds, written last
PLATFORMS = ("cpu", "cuda", "tpu")
# One file serves every platform: a Pallas call cannot be lowered for several platforms
# in one program (jax.export lowers each platform_dependent branch for all of them, and
# Pallas has no CPU lowering), so it holds the XLA scan, traced as for the CPU (its chunk
# and attention). Beside it, a file per platform whose kernel differs, picked by
# `load_serving` where it runs: the TPU's Mosaic call is on jax.export's stable list.
# CUDA keeps the portable file: Triton calls are deliberately off that list (their
# serialisation is tied to one jaxlib), so the GPU serves the XLA scan.
PLATFORM_FILES = {"tpu": "serve.tpu.jaxexport"}
# The platform files' batch bound: a Pallas kernel indexes with int32, so its program must
# prove its arrays stay under 2³¹ elements (kernels/limits.py); where even this bound is too
# many for the model, the file holds the XLA scan at the platform's chunk.
PLATFORM_MAX_BATCH = 1024


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


def _serialisable(serve, hw: tuple) -> dict:
  """`serve` exported for float32 (batch, h, w, 3) images, any batch: {file name: its
  jax.export.Exported}, the portable file for every platform (a model exported on a CPU
  serves on a GPU or TPU) and one per entry of PLATFORM_FILES with that platform's kernel."""

  def export(target, platforms, *constraints):
    (batch,) = jax.export.symbolic_shape("batch", constraints=constraints)
    spec = jax.ShapeDtypeStruct((batch, *hw, 3), jnp.float32)
    # A new function each time: jax's trace cache does not key on `targeting`.
    with kernels.targeting(target):
      return jax.export.export(jax.jit(lambda x: serve(x)), platforms=platforms)(spec)

  exported = {SERVE_FILE: export("cpu", PLATFORMS)}
  for platform, name in PLATFORM_FILES.items():
    exported[name] = export(platform, (platform,), f"batch <= {PLATFORM_MAX_BATCH}")
  return exported


def _write_serving(exported: dict, directory, source: str = "") -> None:
  # The portable file last: its presence says the export is complete (`exported_from`).
  for name in sorted(exported, key=lambda name: name == SERVE_FILE):
    files.write_bytes(os.path.join(directory, name), exported[name].serialize())
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


def load_serving(directory, platform: Optional[str] = None):
  """The serialised inference function: `fn(images) -> logits`, no model code needed.

  Args:
    directory: an export directory (`export_student`, `export_segmenter`).
    platform: where it will run ('cpu', 'cuda', 'tpu'; default JAX's backend): its own
      file (PLATFORM_FILES, the TPU's Pallas kernel; at most PLATFORM_MAX_BATCH images a
      call) where the export has one, else the portable `serve.jaxexport` (any batch).
  """
  own = PLATFORM_FILES.get(kernels.platform_name(platform))  # keyed as platform_name names them
  name = own if own and os.path.isfile(os.path.join(directory, own)) else SERVE_FILE
  with open(os.path.join(directory, name), "rb") as f:
    return jax.export.deserialize(bytearray(f.read())).call
