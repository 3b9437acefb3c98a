"""Segmentation inference: mmseg's sliding-window grid and whole-image / sliding inference, the
test resize, label maps of images, the confusion matrix of a model on a source, its
throughput, and `predict_folder` (label maps and overlays of a folder, for the predict CLI).
"""

import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from linearizer import data, files, metrics, plots, serving
from linearizer.errors import UserError
from linearizer.models.segmenter import Segmenter, resize
from linearizer.segmentation import pipeline
from linearizer.segmentation.augment import normalize
from linearizer.segmentation.metrics import all_processes_sum, confusion_matrix
from linearizer.segmentation.sources import IMAGE_SUFFIXES


def windows(hw: tuple, crop: tuple, stride: tuple) -> list:
  """mmseg's slide_inference grid: (y0, y1, x0, x1) windows of at most `crop` every
  `stride`, the last of each row and column flush with the border."""
  out = []
  rows = max(hw[0] - crop[0] + stride[0] - 1, 0) // stride[0] + 1
  cols = max(hw[1] - crop[1] + stride[1] - 1, 0) // stride[1] + 1
  for i in range(rows):
    for j in range(cols):
      y1, x1 = min(i * stride[0] + crop[0], hw[0]), min(j * stride[1] + crop[1], hw[1])
      out.append((max(y1 - crop[0], 0), y1, max(x1 - crop[1], 0), x1))
  return out


def check_windows(crop, stride) -> None:
  """Sliding windows must cover every pixel: 0 < stride ≤ crop (mmseg asserts the same)."""
  crop, stride = tuple(crop), tuple(stride)
  if len(crop) != 2 or len(stride) != 2 or not all(0 < t <= c for c, t in zip(crop, stride)):
    raise UserError(
      f"sliding windows crop={crop}, stride={stride}: expected (h, w) pairs with "
      "0 < stride ≤ crop, so that every pixel is covered."
    )


def forward_fn(model: Segmenter) -> Callable:
  """`logits(images)`: the jitted eval forward (the main head only), (B, H, W, C)."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def logits(state, images):
    return nnx.merge(graphdef, state)(images, train=False)[0]

  return lambda images: logits(state, images)


def infer(logits_fn: Callable, image: np.ndarray, mode: str, crop=(), stride=()) -> np.ndarray:
  """(H, W, C) logits of one normalised (H, W, 3) image: in one pass ('whole') or averaged
  over overlapping windows ('slide', crop and stride as (h, w))."""
  if mode == "whole":
    return np.asarray(logits_fn(image[None]))[0]
  if mode != "slide":
    raise UserError(f"segment.eval.mode={mode!r}; expected 'whole' or 'slide'.")
  check_windows(crop, stride)
  total, count = None, np.zeros(image.shape[:2] + (1,), np.float32)
  for y0, y1, x0, x1 in windows(image.shape[:2], tuple(crop), tuple(stride)):
    part = np.asarray(logits_fn(image[None, y0:y1, x0:x1]))[0]
    total = np.zeros(image.shape[:2] + part.shape[-1:], np.float32) if total is None else total
    total[y0:y1, x0:x1] += part
    count[y0:y1, x0:x1] += 1
  return total / count


def test_resize(image: np.ndarray, scale) -> np.ndarray:
  """mmseg's test Resize(scale, keep_ratio=True): the image fit into (long, short); () or
  (0, 0) keeps it as it is."""
  if not scale or not all(scale):
    return image
  h, w = image.shape[:2]
  f = min(max(scale) / max(h, w), min(scale) / min(h, w))
  size = (max(1, round(w * f)), max(1, round(h * f)))
  return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))


def label_map(logits_fn: Callable, image: np.ndarray, ecfg, norm) -> np.ndarray:
  """(H, W) uint8 class ids of a uint8 image: resized for the test (`ecfg.scale`),
  normalised with `norm`, inferred as `ecfg` says, the logits resized back to the image's
  own size (where labels are scored, as mmseg does)."""
  x = normalize(test_resize(image, ecfg.scale), *norm)
  logits = infer(logits_fn, x, ecfg.mode, ecfg.crop, ecfg.stride)
  if logits.shape[:2] != image.shape[:2]:  # bilinear, no antialiasing: F.interpolate's
    logits = np.asarray(resize(jnp.asarray(logits)[None], image.shape[:2]))[0]
  return logits.argmax(-1).astype(np.uint8)


def evaluate(logits_fn: Callable, source, ecfg, *, num_classes: int, norm, keep: int = 0):
  """The confusion matrix of `logits_fn` (`forward_fn`) on `source` (every process's share
  counted once) and up to `keep` (image, truth, prediction) triples for the figure."""
  cm, shown = np.zeros((num_classes,) * 2, np.int64), []
  items = pipeline.eval_items(
    source,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    limit=ecfg.limit or None,
  )
  for _, image, label in items:
    pred = label_map(logits_fn, image, ecfg, norm)
    cm += confusion_matrix(pred, label, num_classes)
    if len(shown) < keep:
      shown.append((image, label, pred))
  return all_processes_sum(cm), shown


def throughput(logits_fn: Callable, hw: tuple, repeats: int = 5) -> float:
  """Images per second of `logits_fn` (`forward_fn`) at (1, h, w) (median of `repeats`)."""
  return 1.0 / metrics.time_compiled(logits_fn, (jnp.zeros((1, *hw, 3)),), repeats)


def predict_folder(model_dir: str, inputs: str, output: str, ecfg) -> list:
  """Label maps and overlays of every image in `inputs` (a file or a folder), written to
  `output`; returns the paths of the label maps. Refused before anything is read or
  written: an output that would land on an input or on another image's output."""
  if os.path.isdir(inputs):
    paths = sorted(
      os.path.join(inputs, f) for f in os.listdir(inputs) if f.lower().endswith(IMAGE_SUFFIXES)
    )
    if not paths:
      raise UserError(f"{inputs} holds no {'/'.join(IMAGE_SUFFIXES)} image.")
  elif os.path.isfile(inputs):
    paths = [inputs]
  else:
    raise UserError(f"--input {inputs}: no such image or folder.")
  stems = {p: os.path.join(output, os.path.splitext(os.path.basename(p))[0]) for p in paths}
  files.check_outputs(
    [(stem + suffix, p) for p, stem in stems.items() for suffix in (".png", "_overlay.png")],
    inputs=paths,
  )
  model = serving.load_segmenter(model_dir)
  norm = (model.backbone.cfg.mean, model.backbone.cfg.std)
  logits_fn, colours, written = forward_fn(model), plots.palette(), []
  for path in paths:
    image = data.read_image(path)  # upright, as the user sees it
    pred = label_map(logits_fn, image, ecfg, norm)
    overlay = (0.5 * image + 0.5 * colours[pred]).astype(np.uint8)
    for suffix, picture in ((".png", pred), ("_overlay.png", overlay)):
      with files.replacing(stems[path] + suffix) as tmp:
        Image.fromarray(picture).save(tmp, format="PNG")
    written.append(stems[path] + ".png")
  return written
