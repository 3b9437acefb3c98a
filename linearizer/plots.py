"""Pictures of a run: the training curves of every stage, from its metrics.jsonl, and\nsegmentation predictions beside their truth."""

import json
import os

# No matplotlib.use(): without a display matplotlib picks its file-only Agg backend by
# itself, and in a notebook the inline one stays, so the same figures show there too.
import matplotlib.pyplot as plt
import numpy as np


def read_metrics(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def training_curves(workdir, stages, out_path):
  """One panel per stage: its loss terms against the step. Returns the path, or None."""
  found = [(s, os.path.join(workdir, s, "metrics.jsonl")) for s in stages]
  found = [(s, p) for s, p in found if os.path.isfile(p)]
  if not found:
    return None
  fig, axes = plt.subplots(1, len(found), figsize=(4.5 * len(found), 3.5), squeeze=False)
  for ax, (stage, path) in zip(axes[0], found):
    rows = read_metrics(path)
    keys = [k for k in ("loss", "am", "mp", "accuracy") if k in rows[-1]]
    for k in keys:
      ax.plot([r["step"] for r in rows], [r.get(k) for r in rows], label=k)
    ax.set_title(stage)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  os.makedirs(os.path.dirname(out_path), exist_ok=True)
  fig.savefig(out_path, dpi=100)
  plt.close(fig)
  return out_path


IGNORE = 255  # a label map's ignored pixels (drawn black)


def palette() -> np.ndarray:
  """(256, 3) uint8 colours: fixed per class id, dark for 0, black for ignore."""
  colours = np.random.default_rng(0).integers(40, 256, (256, 3)).astype(np.uint8)
  colours[0], colours[IGNORE] = (20, 20, 20), (0, 0, 0)
  return colours


def segmentation_figure(shown, title: str, path: str):
  """Rows of image | truth | prediction (`shown`: (image, label, pred) triples). Returns
  the path, or None when there is nothing to show."""
  if not shown:
    return None
  colours = palette()
  fig, axes = plt.subplots(len(shown), 3, figsize=(7.5, 2.5 * len(shown)), squeeze=False)
  for row, (image, label, pred) in zip(axes, shown):
    for ax, picture, name in zip(
      row, (image, colours[label], colours[pred]), ("image", "truth", "prediction")
    ):
      ax.imshow(picture)
      ax.set_title(name, fontsize=9)
      ax.axis("off")
  fig.suptitle(title)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
