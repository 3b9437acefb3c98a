"""The scorecard's measures against independent expectations: CKA against the HSIC form
with the centring matrix, kNN against scikit-learn's classifier, outliers by hand."""

import numpy as np
import pytest
from sklearn.neighbors import KNeighborsClassifier

from linearizer import scorecard


def cka_hsic(x, y):
  """CKA as tr(K H L H) / sqrt(tr(K H K H) tr(L H L H)), K = X Xᵀ, L = Y Yᵀ, H = I - 1/n."""
  n = len(x)
  h = np.eye(n) - np.ones((n, n)) / n
  k, l_ = x @ x.T, y @ y.T
  hsic = lambda a, b: np.trace(a @ h @ b @ h)
  return hsic(k, l_) / np.sqrt(hsic(k, k) * hsic(l_, l_))


def test_linear_cka_is_the_hsic_formula_and_has_its_invariances():
  r = np.random.default_rng(0)
  x, y = r.normal(size=(50, 8)), r.normal(size=(50, 5))
  assert scorecard.linear_cka(x, y) == pytest.approx(cka_hsic(x, y), rel=1e-10)
  rotation, _ = np.linalg.qr(r.normal(size=(8, 8)))
  assert scorecard.linear_cka(x, 3.0 * x @ rotation + 1.0) == pytest.approx(1.0, rel=1e-12)
  assert 0 <= scorecard.linear_cka(x, y) < 0.5
  with pytest.raises(ValueError, match="rows"):
    scorecard.linear_cka(x, y[:10])


@pytest.mark.parametrize("k", [1, 5, 20])
def test_knn_top1_is_scikit_learns(k):
  r = np.random.default_rng(k)
  centres = r.normal(size=(4, 16)) * 2
  labels = r.integers(0, 4, 300)
  feats = centres[labels] + r.normal(size=(300, 16))
  train, test = slice(0, 200), slice(200, 300)
  ours = scorecard.knn_top1(feats[train], labels[train], feats[test], labels[test], k=k)
  sk = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute")
  theirs = 100 * np.mean(sk.fit(feats[train], labels[train]).predict(feats[test]) == labels[test])
  assert ours == pytest.approx(theirs)
  assert ours > 60  # separable clusters: the measure sees them


def test_outlier_share_by_hand():
  tokens = np.ones((2, 5, 3))  # every norm √3; the median's multiple decides
  tokens[0, 1] *= 10  # one outlier in image 0
  tokens[1, 2:4] *= 2.5  # two tokens at 2.5x in image 1: outliers above 2x, not above 3x
  assert scorecard.outlier_share(tokens, 2.0) == pytest.approx(100 * 3 / 10)
  assert scorecard.outlier_share(tokens, 3.0) == pytest.approx(100 * 1 / 10)
