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
    rows = [r for r in read_metrics(path) if "loss" in r]  # not the scorecard's rows
    keys = [k for k in ("loss", "am", "mp", "accuracy") if rows and k in rows[-1]]
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


def scorecard_curves(rows, out_path):
  """Three panels across distillation: per-level CKA and AM distance to the teacher;
  kNN and linear-probe top-1 (the teacher's dashed); the outlier-token share."""
  steps = [r["step"] for r in rows]
  levels = sorted(int(k.rpartition("level")[2]) for k in rows[-1] if "/cka_level" in k)
  fig, axes = plt.subplots(1, 3, figsize=(13.5, 3.5))
  for k in levels:
    (line,) = axes[0].plot(steps, [r[f"scorecard/cka_level{k}"] for r in rows], label=f"CKA {k}")
    axes[0].plot(
      steps, [r[f"scorecard/am_distance_level{k}"] for r in rows], ls=":", color=line.get_color()
    )
  axes[0].set_title("student vs teacher per level (CKA —, AM distance ···)")
  for key, colour in (
    ("knn", "tab:blue"),
    ("probe", "tab:green"),
    ("knn_gap", "tab:purple"),
    ("probe_gap", "tab:olive"),
  ):
    axes[1].plot(steps, [r[f"scorecard/{key}"] for r in rows], color=colour, label=key)
    axes[1].axhline(rows[-1][f"scorecard/teacher_{key}"], color=colour, ls="--", alpha=0.6)
  axes[1].set_title("top-1, pooled / mean-patch features (%; teacher dashed)")
  axes[2].plot(steps, [r["scorecard/outliers"] for r in rows], label="student")
  axes[2].axhline(rows[-1]["scorecard/teacher_outliers"], color="tab:red", ls="--", label="teacher")
  axes[2].set_title("high-norm outlier tokens (%)")
  for ax in axes:
    ax.set_xlabel("distill step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
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
