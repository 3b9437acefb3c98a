"""The segmentation metric, a contract other code and tests call (re-exported by
`linearizer.segment`): `confusion_matrix(pred, label, num_classes, ignore_index=255)`,
`segmentation_scores(cm)` (mIoU, mAcc, aAcc, per-class IoU, as mmseg), and
`all_processes_sum`, the whole eval set's matrix over processes.
"""

import jax
import numpy as np
from jax.experimental import multihost_utils

from linearizer.errors import UserError
from linearizer.segmentation.sources import IGNORE


def confusion_matrix(pred, label, num_classes: int, ignore_index: int = IGNORE) -> np.ndarray:
  """Counts of (truth, prediction) pairs over the pixels whose label is not `ignore_index`.

  Args:
    pred, label: integer class maps of the same shape (NumPy or JAX), not logits.
    num_classes: C; labels other than 0 … C−1 and `ignore_index` are refused.
    ignore_index: the label of pixels left out.
  Returns:
    A (C, C) int64 NumPy array, rows = ground truth, columns = prediction.
  """
  pred, label = np.asarray(pred), np.asarray(label)
  if pred.shape != label.shape:
    raise UserError(f"prediction {pred.shape} and label {label.shape} differ in shape.")
  keep = label != ignore_index
  t, p = label[keep].astype(np.int64), pred[keep].astype(np.int64)
  if t.size and (t.min() < 0 or t.max() >= num_classes or p.min() < 0 or p.max() >= num_classes):
    raise UserError(f"class ids outside 0 … {num_classes - 1} (and {ignore_index} = ignore).")
  return np.bincount(t * num_classes + p, minlength=num_classes**2).reshape(num_classes, -1)


def all_processes_sum(cm: np.ndarray) -> np.ndarray:
  """The confusion matrix of the whole eval set: each process's share summed once."""
  if jax.process_count() == 1:
    return cm
  # Gathered as two int32 halves: without jax_enable_x64 an int64 array would be cut to
  # int32 on the way (counts pass 2**31 on a large eval set).
  cm = np.asarray(cm, np.int64)
  low, high = (cm & 0x7FFFFFFF).astype(np.int32), (cm >> 31).astype(np.int32)
  low, high = (np.asarray(multihost_utils.process_allgather(h), np.int64) for h in (low, high))
  return (low + (high << 31)).sum(axis=0)


def segmentation_scores(cm: np.ndarray) -> dict:
  """mIoU, mAcc, aAcc (fractions in [0, 1]) and the per-class IoU of a confusion matrix.

  A class absent from both truth and prediction has IoU NaN and is left out of the mean
  (as mmseg); mAcc averages over the classes present in the truth.
  """
  cm = np.asarray(cm, np.float64)
  tp, truth, predicted = np.diag(cm), cm.sum(1), cm.sum(0)
  with np.errstate(invalid="ignore", divide="ignore"):
    iou = tp / (truth + predicted - tp)
    acc = tp / truth
  return dict(
    miou=float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
    macc=float(np.nanmean(acc)) if np.isfinite(acc).any() else float("nan"),
    aacc=float(tp.sum() / cm.sum()) if cm.sum() else float("nan"),
    iou=[float(x) for x in iou],
  )
