"""The scorecard's measures against independent expectations: CKA against the HSIC form
with the centring matrix, kNN and the probe against scikit-learn's classifiers, outliers
by hand; applied to real models, against the same formulas on tokens taken by hand."""

import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.linear_model import RidgeClassifier
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from configs import common
from linearizer import data, models
from linearizer.distillation import scorecard


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


def test_cka_moments_over_batches_are_cka_of_all_rows():
  r = np.random.default_rng(1)
  x, y = r.normal(size=(3, 40, 6)) + 2.0, r.normal(size=(3, 40, 4))
  y[..., :2] += x[..., :2]  # partly aligned
  moments = scorecard.CKAMoments()
  for a, b in zip(x, y):  # batches of (tokens, width)
    moments.add(a, b)
  whole = scorecard.linear_cka(x.reshape(-1, 6), y.reshape(-1, 4))
  assert moments.value() == pytest.approx(whole, rel=1e-10)
  assert moments.value() == pytest.approx(cka_hsic(x.reshape(-1, 6), y.reshape(-1, 4)), rel=1e-9)


@pytest.mark.parametrize("l2", [1e-3, 1.0, 30.0])
def test_linear_probe_is_scikit_learns_ridge_classifier(l2):
  r = np.random.default_rng(2)
  centres = r.normal(size=(5, 12))
  labels = r.integers(0, 5, 400)
  feats = (centres[labels] + 1.5 * r.normal(size=(400, 12))) * r.uniform(0.1, 10, 12) + 3.0
  feats[:, 3] = 7.0  # a constant feature (StandardScaler leaves its scale at 1)
  train, test = slice(0, 300), slice(300, 400)
  ours = scorecard.linear_probe(feats[train], labels[train], feats[test], labels[test], l2=l2)
  sk = make_pipeline(StandardScaler(), RidgeClassifier(alpha=l2))
  theirs = 100 * np.mean(sk.fit(feats[train], labels[train]).predict(feats[test]) == labels[test])
  assert ours == pytest.approx(theirs)
  assert ours > 50  # well above the 20% of chance


# ---------------------------------------------------------------------------------------
# On models: a ViT teacher and an Adventurer student on the same 4×4 grid of digits.
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def setting():
  config = common.base(data=common.data("digits", 16, crop_fraction=1.0))
  config.eval.batch_size = 16  # 40 images: the last batch has padding rows
  config.scorecard.update(train_images=60, eval_images=40, num_levels=2, knn_k=5)
  teacher = models.build("vit", "Ti/4", image_size=16, width=32, depth=4, num_heads=2, mlp_dim=64)
  student = models.build(
    "adventurer", "Ti/4", seed=1, image_size=16, width=24, depth=2, headdim=12, d_state=8
  )
  return config, teacher, student, *data.sources(config.data)


def by_hand(config, model, source, limit):
  """Every block's tokens, the pooled features and labels of `limit` images, eagerly."""
  batch = next(
    data.eval_batches(source, config.data, batch_size=limit, mean=model.cfg.mean, std=model.cfg.std)
  )
  out = model(jnp.asarray(batch.image))
  return out, np.asarray(model.pool(out)), batch.label


def test_compare_is_cka_and_am_of_the_level_tokens(setting):
  config, teacher, student, _, eval_src = setting
  result = scorecard.compare(teacher, student, eval_src, config)
  t_out, _, _ = by_hand(config, teacher, eval_src, 40)
  s_out, _, _ = by_hand(config, student, eval_src, 40)
  for k, (i, j) in enumerate([(1, 0), (3, 1)]):  # level ends of 4 and 2 blocks, K = 2
    # [CLS, patches] on both sides (the student's CLS sits at its tail)
    cls_then_patches = lambda out, b: np.concatenate(
      [out.roles.cls_of(out.blocks[b]), out.roles.patches_of(out.blocks[b])], axis=1
    )
    t, s = cls_then_patches(t_out, i), cls_then_patches(s_out, j)
    assert result["cka"][k] == pytest.approx(
      cka_hsic(t.reshape(-1, 32), s.reshape(-1, 24)), rel=1e-4
    )
    unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)
    maps = lambda a: unit(np.einsum("bid,bjd->bij", unit(a), unit(a)))  # rows of Ā, unit
    am = np.mean(1 - np.sum(maps(t) * maps(s), axis=-1))
    assert result["am_distance"][k] == pytest.approx(am, rel=1e-4)
  same = scorecard.compare(teacher, teacher, eval_src, config)
  assert same["cka"] == pytest.approx([1.0, 1.0]) and same["am_distance"] == pytest.approx(
    [0, 0], abs=1e-6
  )


def test_own_measures_are_the_formulas_on_pooled_features(setting):
  config, teacher, student, train_src, eval_src = setting
  for model in (teacher, student):
    result = scorecard.own_measures(model, train_src, eval_src, config)
    _, train, train_labels = by_hand(config, model, train_src, 60)
    test_out, test, test_labels = by_hand(config, model, eval_src, 40)
    sk = KNeighborsClassifier(n_neighbors=5, metric="cosine", algorithm="brute")
    knn = 100 * np.mean(sk.fit(train, train_labels).predict(test) == test_labels)
    assert result["knn"] == pytest.approx(knn)
    probe = make_pipeline(StandardScaler(), RidgeClassifier(alpha=1.0)).fit(train, train_labels)
    assert result["probe"] == pytest.approx(100 * np.mean(probe.predict(test) == test_labels))
    gap = lambda out: np.asarray(out.patches).mean(axis=1)  # the mean final patch token
    train_out = by_hand(config, model, train_src, 60)[0]
    sk_gap = KNeighborsClassifier(n_neighbors=5, metric="cosine", algorithm="brute")
    knn_gap = sk_gap.fit(gap(train_out), train_labels).predict(gap(test_out))
    assert result["knn_gap"] == pytest.approx(100 * np.mean(knn_gap == test_labels))
    norms = np.linalg.norm(np.asarray(test_out.roles.patches_of(test_out.blocks[-1])), axis=-1)
    share = 100 * np.mean(norms > 3.0 * np.median(norms, axis=1, keepdims=True))
    assert result["outliers"] == pytest.approx(share, abs=1e-9)
