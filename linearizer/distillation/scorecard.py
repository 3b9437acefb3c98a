"""The representation scorecard: how alike a student's features are to its teacher's, how
well each model's pooled features separate classes without fine-tuning, and how many
high-norm outlier tokens each has; the evidence to look at before paying for fine-tuning.

The measures are pure functions of feature arrays (NumPy, float64):

- `linear_cka`: linear centred kernel alignment (Kornblith et al. 2019, eq. 2 with the
  linear kernel): ‖Yᵀ X‖²_F / (‖Xᵀ X‖_F ‖Yᵀ Y‖_F) over column-centred features; 1 for
  features equal up to rotation and isotropic scale, invariant to either.
- `knn_top1`: k-nearest-neighbour accuracy of pooled features, cosine similarity, one vote
  per neighbour, ties to the lowest class (as scikit-learn's KNeighborsClassifier with
  weights='uniform', metric='cosine').
- `linear_probe`: top-1 of a ridge-regression classifier on standardised features (as
  scikit-learn's StandardScaler + RidgeClassifier): closed form, no training loop.
- `outlier_share`: the share of tokens whose norm exceeds `multiple` times the median
  token norm of their own image (the high-norm "register-like" tokens of Darcet et al.
  2024, "Vision Transformers need registers").

Applied to models (`config.scorecard`): `own_measures` (kNN, probe, outliers of one model),
`compare` (per AM level, linear CKA and the AM distance between teacher and student, the
teacher's tokens resampled to the student's grid as AM sees them, scope 'all'), `measure`
(both for a teacher and its student), and `hook`, which the distill stage calls every
`distill.scorecard_every` steps: its scalars go to metrics.jsonl and TensorBoard
(`scorecard/...`) and `distill/scorecard.png` plots them across training. The eval stage
writes the same keys into `eval/results.json`.
"""

import os
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from linearizer import data, plots
from linearizer.distillation import distill, losses
from linearizer.log import log


def linear_cka(x, y) -> float:
  """Linear CKA of (n, d1) and (n, d2) features of the same n examples (or tokens).

  Args:
    x, y: features, one row per example, any widths.

  Returns:
    A similarity in [0, 1].
  """
  x = np.asarray(x, np.float64).reshape(len(x), -1)
  y = np.asarray(y, np.float64).reshape(len(y), -1)
  if len(x) != len(y):
    raise ValueError(f"linear_cka: {len(x)} rows of x but {len(y)} of y")
  x, y = x - x.mean(0), y - y.mean(0)
  cross = np.linalg.norm(y.T @ x) ** 2
  return float(cross / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


class CKAMoments:
  """Linear CKA accumulated over batches of rows (first and second moments, float64), so
  it needs O(width²) memory however many tokens it sees; `value()` equals `linear_cka`
  of all the rows at once."""

  def __init__(self):
    self.n, self.sx, self.sy, self.xx, self.yy, self.yx = 0, 0.0, 0.0, 0.0, 0.0, 0.0

  def add(self, x, y) -> None:
    x = np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1])
    y = np.asarray(y, np.float64).reshape(-1, np.shape(y)[-1])
    self.n += len(x)
    self.sx, self.sy = self.sx + x.sum(0), self.sy + y.sum(0)
    self.xx, self.yy, self.yx = self.xx + x.T @ x, self.yy + y.T @ y, self.yx + y.T @ x

  def value(self) -> float:
    mx, my = self.sx / self.n, self.sy / self.n  # centred grams: Σ x xᵀ − n μ μᵀ
    xx = self.xx - self.n * np.outer(mx, mx)
    yy = self.yy - self.n * np.outer(my, my)
    yx = self.yx - self.n * np.outer(my, mx)
    return float(np.linalg.norm(yx) ** 2 / (np.linalg.norm(xx) * np.linalg.norm(yy)))


def knn_top1(train, train_labels, test, test_labels, k: int = 20) -> float:
  """Top-1 accuracy (%) of a k-NN vote on cosine similarity.

  Args:
    train, test: (n, d) pooled features; train_labels, test_labels: (n,) integer classes.
    k: neighbours per vote (at most the training set's size).

  Returns:
    The percentage of test examples whose vote is their label.
  """
  train = np.asarray(train, np.float64)
  test = np.asarray(test, np.float64)
  train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
  k = min(k, len(train))
  unit = lambda a: a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
  similarity = unit(test) @ unit(train).T
  neighbours = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
  classes = np.unique(train_labels)
  votes = (train_labels[neighbours][..., None] == classes).sum(1)  # (n_test, classes)
  predicted = classes[np.argmax(votes, axis=1)]  # ties: the lowest class
  return float(100.0 * np.mean(predicted == test_labels))


def linear_probe(train, train_labels, test, test_labels, l2: float) -> float:
  """Top-1 accuracy (%) of a ridge-regression classifier (targets ±1 per class, intercept,
  penalty `l2`) on features standardised with the training set's mean and std.

  Args:
    train, test: (n, d) pooled features; train_labels, test_labels: (n,) integer classes.
    l2: the ridge penalty (scikit-learn's `alpha`).

  Returns:
    The percentage of test examples whose highest score is their label.
  """
  train = np.asarray(train, np.float64)
  test = np.asarray(test, np.float64)
  train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
  mean, std = train.mean(0), train.std(0)
  std = np.where(std > 0, std, 1.0)  # constant features stay as they are (StandardScaler)
  x, test = (train - mean) / std, (test - mean) / std
  classes = np.unique(train_labels)
  y = np.where(train_labels[:, None] == classes, 1.0, -1.0)
  y_mean = y.mean(0)  # x is centred already: the intercept is the targets' mean
  w = np.linalg.solve(x.T @ x + l2 * np.eye(x.shape[1]), x.T @ (y - y_mean))
  predicted = classes[np.argmax(test @ w + y_mean, axis=1)]
  return float(100.0 * np.mean(predicted == test_labels))


def outlier_share(tokens, multiple: float) -> float:
  """Share (%) of tokens whose L2 norm is above `multiple` × their image's median norm.

  Args:
    tokens: (batch, tokens, width) one model's tokens (e.g. a block's output).
    multiple: the threshold as a multiple of the median (e.g. 2.0).

  Returns:
    The percentage of all tokens that are outliers.
  """
  norms = np.linalg.norm(np.asarray(tokens, np.float64), axis=-1)  # (batch, tokens)
  median = np.median(norms, axis=1, keepdims=True)
  return float(100.0 * np.mean(norms > multiple * median))


# ---------------------------------------------------------------------------------------
# Applied to models (`config.scorecard`).
# ---------------------------------------------------------------------------------------
def level_pairs_of(t_out, s_out, t_grid, s_grid, num_levels):
  """Per AM level, (teacher, student) tokens as [cls, patches in raster order] on the
  student's grid, exactly as activation matching sees them with scope 'all'."""
  pairs = losses.level_pairs(len(t_out.blocks), len(s_out.blocks), num_levels)
  return [
    losses.align(
      losses.split_roles(t_out.blocks[i], t_out.roles),
      losses.split_roles(s_out.blocks[j], s_out.roles),
      t_grid,
      s_grid,
      "all",
    )
    for i, j in pairs
  ]


def _batches(config, source, model, limit):
  """Eval-mode batches of `source` at data.image_size, normalised for `model`."""
  return data.eval_batches(
    source,
    config.data,
    batch_size=config.eval.batch_size,
    mean=model.cfg.mean,
    std=model.cfg.std,
    limit=limit or None,
  )


def own_measures(model, train_source, eval_source, config) -> dict:
  """kNN top-1 and linear-probe top-1 (%) of two pooled features: `model.pool` (what its
  head reads: `knn`, `probe`) and the mean final patch token (`knn_gap`, `probe_gap`; what
  MP trains, where a distilled student's CLS is not yet), fit on `scorecard.train_images`
  of `train_source` and tested on `scorecard.eval_images` of `eval_source`; and the share
  (%) of its last block's patch tokens that are high-norm outliers on those eval images."""
  sc = config.scorecard
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, images):
    m = nnx.merge(graphdef, state)
    out = m(images)
    return m.pool(out), out.patches.mean(axis=1), out.roles.patches_of(out.blocks[-1])

  def features(source, limit):
    pooled, gap, labels, outliers = [], [], [], []
    for batch in _batches(config, source, model, limit):
      feats, means, tokens = jax.device_get(forward(state, batch.image))
      pooled.append(feats[batch.valid])
      gap.append(means[batch.valid])
      labels.append(batch.label[batch.valid])
      outliers.append(outlier_share(tokens[batch.valid], sc.outlier_multiple) * batch.valid.sum())
    labels = np.concatenate(labels)
    return (
      np.concatenate(pooled),
      np.concatenate(gap),
      labels,
      float(np.sum(outliers) / len(labels)),
    )

  train, train_gap, train_labels, _ = features(train_source, sc.train_images)
  test, test_gap, test_labels, outliers = features(eval_source, sc.eval_images)
  return dict(
    knn=knn_top1(train, train_labels, test, test_labels, k=sc.knn_k),
    probe=linear_probe(train, train_labels, test, test_labels, l2=sc.probe_l2),
    knn_gap=knn_top1(train_gap, train_labels, test_gap, test_labels, k=sc.knn_k),
    probe_gap=linear_probe(train_gap, train_labels, test_gap, test_labels, l2=sc.probe_l2),
    outliers=outliers,
  )


def num_levels(config, teacher, student) -> int:
  """`scorecard.num_levels`, at most the shallower model's depth."""
  return min(config.scorecard.num_levels, teacher.cfg.depth, student.cfg.depth)


def compare(teacher, student, eval_source, config) -> dict:
  """Per AM level (`losses.level_pairs`), the linear CKA between the teacher's and the
  student's tokens (every token of `scorecard.eval_images` eval images as a row; the
  teacher's resampled to the student's grid) and the AM distance L_AM over all tokens
  (method.md §2; 0 for identical maps)."""
  teacher_input = config.distill.teacher_input if "distill" in config else "resample"
  levels = num_levels(config, teacher, student)
  (tg, ts), (sg, ss) = nnx.split(teacher), nnx.split(student)

  @jax.jit
  def pairs(ts, ss, images):
    t, s = nnx.merge(tg, ts), nnx.merge(sg, ss)
    t_images = distill.teacher_view(images, s.cfg, t.cfg, teacher_input)
    grid = lambda m, x: (x.shape[1] // m.cfg.patch, x.shape[2] // m.cfg.patch)
    return level_pairs_of(t(t_images), s(images), grid(t, t_images), grid(s, images), levels)

  moments = [CKAMoments() for _ in range(levels)]
  am, count = np.zeros(levels), 0
  for batch in _batches(config, eval_source, student, config.scorecard.eval_images):
    valid = batch.valid
    for k, (t, s) in enumerate(jax.device_get(pairs(ts, ss, batch.image))):
      moments[k].add(t[valid], s[valid])
      am[k] += float(losses.activation_matching([t[valid]], [s[valid]])[0]) * valid.sum()
    count += valid.sum()
  return dict(cka=[m.value() for m in moments], am_distance=(am / count).tolist())


def scalars(teacher: dict, student: dict) -> dict:
  """The flat `scorecard/...` scalars metrics.jsonl and TensorBoard get."""
  out = {f"scorecard/{k}": v for k, v in student.items() if not isinstance(v, list)}
  out.update({f"scorecard/teacher_{k}": v for k, v in teacher.items()})
  for key in ("cka", "am_distance"):
    out.update({f"scorecard/{key}_level{k}": v for k, v in enumerate(student[key])})
  return out


def summary_line(teacher: dict, student: dict) -> str:
  cka = " ".join(f"{v:.3f}" for v in student["cka"])
  am = " ".join(f"{v:.3f}" for v in student["am_distance"])
  return (
    f"CKA per level {cka} | AM distance {am} | kNN {student['knn']:.1f}% (teacher "
    f"{teacher['knn']:.1f}), of the mean patch {student['knn_gap']:.1f}% "
    f"({teacher['knn_gap']:.1f}) | probe {student['probe']:.1f}% ({teacher['probe']:.1f}), "
    f"{student['probe_gap']:.1f}% ({teacher['probe_gap']:.1f}) | outliers "
    f"{student['outliers']:.2f}% ({teacher['outliers']:.2f})"
  )


def hook(config, teacher, train_source, eval_source) -> Callable:
  """`hook(step, distiller) -> scalars` for distillation's `fit`: the student's scorecard
  against the teacher (whose own measures are taken once)."""
  teacher_own: dict = {}

  def score(step: int, distiller) -> dict:
    if not teacher_own:
      teacher_own.update(own_measures(teacher, train_source, eval_source, config))
    student = distiller.student
    mine = own_measures(student, train_source, eval_source, config)
    mine.update(compare(teacher, student, eval_source, config))
    log(f"[distill] scorecard at step {step}: {summary_line(teacher_own, mine)}")
    return scalars(teacher_own, mine)

  return score


def plot(metrics_path: str, out_path: str) -> Optional[str]:
  """distill/scorecard.png from the stage's metrics.jsonl; None when it has no scorecard."""
  if not os.path.isfile(metrics_path):
    return None
  rows = [r for r in plots.read_metrics(metrics_path) if "scorecard/knn" in r]
  return plots.scorecard_curves(rows, out_path) if rows else None


# ---------------------------------------------------------------------------------------
# A diagnostic of the teacher (distill.diagnose_images).
# ---------------------------------------------------------------------------------------
def teacher_cosines(config, teacher, student, source, levels) -> dict:
  """{am_features mode: [(mean, std) per AM level]} of the teacher's off-diagonal token
  cosines over CLS and every patch (`centered`: minus their mean) on the first
  `distill.diagnose_images` training images, at AM's `levels` (`losses.level_pairs`).

  CLIP's residual streams carry a few huge shared channels and high-norm tokens that push
  every cosine toward 1: a mean near 1 with a small std means flat maps for AM to match.
  """
  s = student.cfg
  batch = next(
    data.eval_batches(
      source, config.data, batch_size=config.distill.diagnose_images, mean=s.mean, std=s.std
    )
  )
  real = batch.image[batch.valid]  # fewer images than asked: no padding rows
  images = distill.teacher_view(jnp.asarray(real), s, teacher.cfg, config.distill.teacher_input)
  out = teacher(images)
  stats = {}
  modes = [m for m in losses.AM_FEATURES if m != "next_ln" or hasattr(teacher, "next_norm")]
  for mode in modes:
    per_level = []
    for i, _ in levels:
      cls, patches = losses.split_roles(distill.am_tokens(teacher, out, i, mode), out.roles)
      tokens = patches if cls is None else jnp.concatenate([cls, patches], axis=1)
      tokens = losses.centered(tokens) if mode == "centered" else tokens
      per_level.append(tuple(float(v) for v in losses.off_diagonal_cosines(tokens)))
    stats[mode] = per_level
  return stats
