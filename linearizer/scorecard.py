"""The representation scorecard's measures (issue 26 item 4): how alike two models' features
are, how well a model's pooled features separate classes without training, and how many
high-norm outlier tokens it has. Pure functions of feature arrays (NumPy, float64), so
the stages can apply them to teacher and student alike.

- `linear_cka`: linear centred kernel alignment (Kornblith et al. 2019, eq. 2 with the
  linear kernel): ‖Yᵀ X‖²_F / (‖Xᵀ X‖_F ‖Yᵀ Y‖_F) over column-centred features; 1 for
  features equal up to rotation and isotropic scale, invariant to either.
- `knn_top1`: k-nearest-neighbour accuracy of pooled features, cosine similarity, one vote
  per neighbour, ties to the lowest class (as scikit-learn's KNeighborsClassifier with
  weights='uniform', metric='cosine').
- `outlier_share`: the share of tokens whose norm exceeds `multiple` times the median
  token norm of their own image (the high-norm "register-like" tokens of Darcet et al.
  2024, "Vision Transformers need registers").
"""

import numpy as np


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
