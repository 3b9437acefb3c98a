"""Tests of linearizer.distillation.losses against independent expectations (method.md §2–3).

Oracles: invariances the definitions imply (cosine maps ignore per-token positive scales and
any map that preserves inner products), hand-computed values on tiny explicit examples, a
float64 NumPy re-implementation of L_AM written here from method.md §2, and the index
bookkeeping of masks, stages and token alignment.

Tolerances (stated once, used below):
  L_AM of matching structures:            <= 1e-6 (float32 maps, values O(1))
  hand-computed values vs ours:           <= 1e-5 absolute (float32; LN eps 1e-6 included)
  ours vs the float64 NumPy L_AM:         <= 1e-5 absolute
  "does not change":                      <= 1e-7 absolute (same tokens reach the maths)
  "does change":                          >= 1e-3 absolute
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linearizer import models
from linearizer.distillation import losses
from linearizer.errors import UserError

MATCH_TOL = 1e-6
HAND_TOL = 1e-5
SAME_TOL = 1e-7
CHANGE_MIN = 1e-3


def np_am(teacher, student, rows=None):
  """L_AM of one stage, float64, from method.md §2: cosine map, rows ℓ2-normalised, then the
  mean over rows (and batch) of 1 − the row cosine. teacher (B, n, dt), student (B, n, ds)."""

  def rownorm_map(f):
    f = np.asarray(f, np.float64)
    f = f / np.linalg.norm(f, axis=-1, keepdims=True)
    a = f @ np.swapaxes(f, -1, -2)
    return a / np.linalg.norm(a, axis=-1, keepdims=True)

  cos = np.sum(rownorm_map(teacher) * rownorm_map(student), axis=-1)  # (B, n)
  if rows is not None:
    cos = cos[:, rows]
  return float(np.mean(1.0 - cos))


def rand(seed, *shape):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def orthonormal_columns(seed, rows, cols):
  """A (rows, cols) matrix with orthonormal columns (rows >= cols): Q of a QR."""
  q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((rows, cols)))
  return q


def am(teacher_levels, student_levels, rows=None):
  loss, per_level = losses.activation_matching(
    [jnp.asarray(t) for t in teacher_levels], [jnp.asarray(s) for s in student_levels], rows=rows
  )
  return float(loss), np.asarray(per_level)


# ---------------------------------------------------------------------------------------
# L_AM: invariances, range, hand-computed value.
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("student_width", [12, 20])
def test_am_zero_for_scaled_and_rotated_tokens(student_width):
  """Student = teacher · per-token positive scale · a map with orthonormal columns → L_AM 0."""
  b, n, d = 3, 17, 12
  teacher_levels, student_levels = [], []
  for k in range(3):
    t = rand(10 + k, b, n, d)
    scale = np.random.default_rng(20 + k).uniform(0.1, 10.0, (b, n, 1))
    q = orthonormal_columns(30 + k, student_width, d)  # (student_width, d), QᵀQ = I
    np.testing.assert_allclose(q.T @ q, np.eye(d), atol=1e-12)
    teacher_levels.append(t)
    student_levels.append((scale * t) @ q.T)  # (b, n, student_width)
  loss, per_level = am(teacher_levels, student_levels)
  assert per_level.shape == (3,)
  assert 0.0 <= loss <= MATCH_TOL and np.all(np.abs(per_level) <= MATCH_TOL), per_level


def test_am_positive_for_unrelated_tokens_and_matches_numpy():
  b, n = 2, 17
  t, s = rand(1, b, n, 12), rand(2, b, n, 20)
  loss, per_level = am([t], [s])
  assert loss > 0.05
  np.testing.assert_allclose(loss, np_am(t, s), atol=HAND_TOL)
  # Several stages: the loss is the mean of the per-stage values.
  t2, s2 = rand(3, b, n, 12), rand(4, b, n, 20)
  loss, per_level = am([t, t2], [s, s2])
  np.testing.assert_allclose(per_level, [np_am(t, s), np_am(t2, s2)], atol=HAND_TOL)
  np.testing.assert_allclose(loss, np.mean(per_level), atol=1e-7)


def test_am_in_zero_two():
  values = []
  for seed in range(12):
    t = rand(100 + seed, 2, 9, 6)
    # Unrelated, anti-correlated (sign flips of tokens) and shifted students.
    for s in (
      rand(200 + seed, 2, 9, 5),
      -t * np.sign(rand(300 + seed, 2, 9, 1)),
      t + 3.0 * rand(400 + seed, 2, 9, 6),
      np.abs(t) + 2.0,
    ):
      loss, per_level = am([t], [s])
      values += [loss, *per_level]
  values = np.asarray(values)
  assert np.all(values >= -MATCH_TOL) and np.all(values <= 2.0), values
  assert values.max() > 0.1  # not trivially zero


def test_am_hand_computed():
  """Three tokens in 2-D, worked out by hand.

  teacher f = (1,0), (0,1), (1,1)   student g = (1,0), (1,1), (0,1)
  cosine maps (s = 1/√2):
    A_t = [[1, 0, s], [0, 1, s], [s, s, 1]]   row norms √1.5, √1.5, √2
    A_s = [[1, s, 0], [s, 1, s], [0, s, 1]]   row norms √1.5, √2, √1.5
  row cosines:
    row 0: (1·1 + 0·s + s·0) / (√1.5·√1.5)    = 1 / 1.5 = 2/3
    row 1: (0·s + 1·1 + s·s) / (√1.5·√2)      = 1.5 / √3 = √3/2
    row 2: (s·0 + s·s + 1·1) / (√2·√1.5)      = 1.5 / √3 = √3/2
  L_AM = mean(1 − 2/3, 1 − √3/2, 1 − √3/2); the CLS row alone (row 0): 1/3.
  """
  teacher = np.array([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]], np.float32)
  student = np.array([[[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]], np.float32)
  expected = np.mean([1 - 2 / 3, 1 - np.sqrt(3) / 2, 1 - np.sqrt(3) / 2])
  assert abs(expected - (7 / 3 - np.sqrt(3)) / 3) < 1e-12 and abs(expected - 0.2004275) < 1e-6
  loss, _ = am([teacher], [student])
  np.testing.assert_allclose(loss, expected, atol=HAND_TOL)
  loss, _ = am([teacher], [student], rows=slice(0, 1))
  np.testing.assert_allclose(loss, 1 / 3, atol=HAND_TOL)
  # And the map itself: row 0 of Ā_t is (1, 0, s)/√1.5.
  a_t = np.asarray(losses.similarity_map(jnp.asarray(teacher)))[0]
  s = 1 / np.sqrt(2)
  np.testing.assert_allclose(a_t[0], np.array([1, 0, s]) / np.sqrt(1.5), atol=HAND_TOL)
  np.testing.assert_allclose(a_t[2], np.array([s, s, 1]) / np.sqrt(2), atol=HAND_TOL)


def test_am_rejects_mismatched_inputs():
  with pytest.raises(ValueError):
    losses.activation_matching([jnp.ones((1, 3, 2))], [])
  with pytest.raises(ValueError):
    losses.activation_matching([jnp.ones((1, 3, 2))], [jnp.ones((1, 4, 2))])


# ---------------------------------------------------------------------------------------
# Masked prediction.
# ---------------------------------------------------------------------------------------
def test_mp_hand_computed():
  """Targets (a−1, a+1) have mean a and variance 1, so LayerNorm maps them to (−1, 1).

  token 0 (masked):  prediction (−1.5, 1) → errors (−0.5, 0)
  token 1 (masked):  prediction ( 1.5, 1) → errors ( 2.5, 0)
  token 2 (visible): prediction (9, 9), a huge error that must not count.
  Smooth-L1_β(e) = 0.5 e²/β if |e| < β else |e| − β/2, averaged over features, then over
  the masked tokens.
    β = 1: token 0 (0.5·0.25/1 + 0)/2 = 0.0625; token 1 (2.5 − 0.5 + 0)/2 = 1.0
           → (0.0625 + 1.0)/2 = 0.53125
    β = 2: token 0 (0.5·0.25/2 + 0)/2 = 0.03125; token 1 (2.5 − 1.0 + 0)/2 = 0.75
           → (0.03125 + 0.75)/2 = 0.390625
  """
  target = np.array([[[3.0, 5.0], [0.0, 2.0], [10.0, 12.0]]], np.float32)
  prediction = np.array([[[-1.5, 1.0], [1.5, 1.0], [9.0, 9.0]]], np.float32)
  mask = np.array([[True, True, False]])
  ln = np.asarray(losses.layer_norm(jnp.asarray(target)))
  np.testing.assert_allclose(ln, np.tile([-1.0, 1.0], (1, 3, 1)), atol=HAND_TOL)
  for beta, expected in ((1.0, 0.53125), (2.0, 0.390625)):
    got = losses.masked_prediction(
      jnp.asarray(prediction), jnp.asarray(target), jnp.asarray(mask), beta=beta
    )
    np.testing.assert_allclose(float(got), expected, atol=HAND_TOL)


def test_mp_only_masked_positions_count():
  b, n, d = 3, 16, 8
  pred, target = rand(1, b, n, d), rand(2, b, n, d)
  mask, _ = losses.random_mask(jax.random.key(0), b, n, 0.5)
  m = np.asarray(mask)[..., None]
  mp = lambda p, t: float(losses.masked_prediction(jnp.asarray(p), jnp.asarray(t), mask))
  base = mp(pred, target)
  noise = 5.0 * rand(3, b, n, d)
  assert abs(mp(np.where(m, pred, noise), target) - base) <= SAME_TOL  # visible preds changed
  assert abs(mp(pred, np.where(m, target, noise)) - base) <= SAME_TOL  # visible targets changed
  assert abs(mp(np.where(m, noise, pred), target) - base) >= CHANGE_MIN  # masked preds changed


VIT_ROLES = models.TokenRoles(cls=0, patches=(1, None))  # a ViT's (test_models checks)


def test_mp_loss_targets_the_given_patches_in_raster_order():
  """mp_loss compares the teacher's patch tokens it is given position by position (raster
  order); the ViT's roles hand it the patches without the CLS (index 0), so the CLS never
  enters MP's target."""
  b, grid, d = 2, (4, 4), 8
  teacher = rand(1, b, 17, d)  # a ViT block's tokens: [cls, patches]
  pred = rand(2, b, 16, d)
  mask, _ = losses.random_mask(jax.random.key(1), b, 16, 0.75)
  patches = VIT_ROLES.patches_of(jnp.asarray(teacher))
  np.testing.assert_array_equal(np.asarray(patches), teacher[:, 1:])  # index 0 dropped
  got = float(losses.mp_loss(jnp.asarray(pred), patches, grid, grid, mask))
  want = float(losses.masked_prediction(jnp.asarray(pred), jnp.asarray(teacher[:, 1:]), mask))
  np.testing.assert_allclose(got, want, atol=SAME_TOL)
  # Position by position: predicting LN(patch i) at every position i gives 0, the same
  # predictions against the patches in another order do not (LN written out here).
  t = teacher[:, 1:].astype(np.float64)
  ln = (t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, keepdims=True) + 1e-6)
  exact = jnp.asarray(ln, jnp.float32)
  assert float(losses.mp_loss(exact, patches, grid, grid, mask)) <= SAME_TOL
  shuffled = patches[:, np.random.default_rng(0).permutation(16)]
  assert float(losses.mp_loss(exact, shuffled, grid, grid, mask)) >= CHANGE_MIN
  # Whatever the teacher's CLS holds, MP's target is the same.
  teacher_other_cls = teacher.copy()
  teacher_other_cls[:, 0] = 100.0
  got2 = float(
    losses.mp_loss(
      jnp.asarray(pred),
      VIT_ROLES.patches_of(jnp.asarray(teacher_other_cls)),
      grid,
      grid,
      mask,
    )
  )
  assert abs(got2 - got) <= SAME_TOL


# ---------------------------------------------------------------------------------------
# AM scopes through align / am_loss.
# ---------------------------------------------------------------------------------------
def _tokens(seed, b=3, grid=(4, 4), dt=12, ds=20):
  """Teacher tokens [cls, patches] (b, n+1, dt) and student tokens [patches, cls] (b, n+1, ds)."""
  n = grid[0] * grid[1]
  return rand(seed, b, n + 1, dt), rand(seed + 1, b, n + 1, ds)


def _teacher(t):
  """(cls, patches) of teacher tokens [cls, patches], sliced by hand."""
  t = jnp.asarray(t)
  return t[:, :1], t[:, 1:]


def _student(s):
  """(cls, patches) of student tokens [patches, cls], sliced by hand."""
  s = jnp.asarray(s)
  return s[:, -1:], s[:, :-1]


def _am_loss(t, s, grid, scope, visible):
  loss, _ = losses.am_loss([_teacher(t)], [_student(s)], grid, grid, scope=scope, visible=visible)
  return float(loss)


@pytest.mark.parametrize("side", ["student", "teacher"])
def test_visible_scope_ignores_masked_positions(side):
  grid, b = (4, 4), 3
  t, s = _tokens(0, b, grid)
  mask, visible = losses.random_mask(jax.random.key(3), b, 16, 0.5)
  m = np.asarray(mask)[..., None]
  noise_t, noise_s = 10.0 * rand(7, *t.shape), 10.0 * rand(8, *s.shape)
  t2, s2 = t.copy(), s.copy()
  if side == "student":  # student patches are s[:, :-1]
    s2[:, :-1] = np.where(m, noise_s[:, :-1], s[:, :-1])
  else:  # teacher patches are t[:, 1:]
    t2[:, 1:] = np.where(m, noise_t[:, 1:], t[:, 1:])
  for scope in ("visible", "cls"):
    base = _am_loss(t, s, grid, scope, visible)
    assert abs(_am_loss(t2, s2, grid, scope, visible) - base) <= SAME_TOL, scope
  # With every token in the maps, masked positions do count.
  base = _am_loss(t, s, grid, "all", visible)
  assert abs(_am_loss(t2, s2, grid, "all", visible) - base) >= CHANGE_MIN


def test_visible_scope_value_matches_numpy_on_gathered_tokens():
  grid, b = (4, 4), 3
  t, s = _tokens(10, b, grid)
  mask, visible = losses.random_mask(jax.random.key(4), b, 16, 0.75)
  vis = np.asarray(visible)
  # Independent gathering: [cls, visible patches in raster order] on both sides.
  t_sel = np.stack([np.concatenate([t[i, :1], t[i, 1:][vis[i]]]) for i in range(b)])
  s_sel = np.stack([np.concatenate([s[i, -1:], s[i, :-1][vis[i]]]) for i in range(b)])
  assert t_sel.shape[1] == 1 + 4
  np.testing.assert_allclose(
    _am_loss(t, s, grid, "visible", visible), np_am(t_sel, s_sel), atol=HAND_TOL
  )
  np.testing.assert_allclose(
    _am_loss(t, s, grid, "cls", visible), np_am(t_sel, s_sel, rows=slice(0, 1)), atol=HAND_TOL
  )
  t_all = np.concatenate([t[:, :1], t[:, 1:]], 1)
  s_all = np.concatenate([s[:, -1:], s[:, :-1]], 1)
  np.testing.assert_allclose(
    _am_loss(t, s, grid, "all", visible), np_am(t_all, s_all), atol=HAND_TOL
  )


def test_cls_scope_uses_only_the_cls_row():
  """CLS rows agree but the patch-patch structure does not: "cls" gives 0, "all" does not.

  teacher: cls (1,0), p1 (1,1), p2 (1,−1): cos(cls, p) = 1/√2 each, cos(p1, p2) = 0.
  student: cls (1,0,0), p1 = p2 = (1,1,0): cos(cls, p) = 1/√2 each, cos(p1, p2) = 1.
  """
  teacher = np.array([[[1, 0], [1, 1], [1, -1]]], np.float32)  # [cls, p1, p2]
  student = np.array([[[1, 1, 0], [1, 1, 0], [1, 0, 0]]], np.float32)  # [p1, p2, cls]
  grid = (1, 2)
  assert _am_loss(teacher, student, grid, "cls", None) <= MATCH_TOL
  assert _am_loss(teacher, student, grid, "all", None) >= 0.05
  assert _am_loss(teacher, student, grid, "visible", None) >= 0.05


def test_align_orders_and_shapes():
  b, dt, ds = 2, 12, 20
  t = rand(1, b, 1 + 36, dt)  # teacher on a 6×6 grid, CLS first
  s = rand(2, b, 16 + 1, ds)  # student on a 4×4 grid, CLS last
  _, visible = losses.random_mask(jax.random.key(0), b, 16, 0.5)
  for scope, visible_, n in (
    ("all", None, 17),
    ("all", visible, 17),
    ("visible", visible, 9),
    ("cls", visible, 9),
    ("visible", None, 17),
  ):
    ta, sa = losses.align(_teacher(t), _student(s), (6, 6), (4, 4), scope, visible_)
    assert ta.shape == (b, n, dt) and sa.shape == (b, n, ds), (scope, ta.shape, sa.shape)
    np.testing.assert_array_equal(np.asarray(ta[:, 0]), t[:, 0])  # teacher CLS first
    np.testing.assert_array_equal(np.asarray(sa[:, 0]), s[:, -1])  # student CLS moved first
  # Resampling keeps a constant field constant (bicubic weights sum to one).
  const = np.concatenate([rand(3, b, 1, dt), np.broadcast_to(rand(4, b, 1, dt), (b, 36, dt))], 1)
  ta, _ = losses.align(_teacher(const), _student(s), (6, 6), (4, 4), "all")
  np.testing.assert_allclose(
    np.asarray(ta[:, 1:]), np.broadcast_to(const[:, 1:2], (b, 16, dt)), atol=1e-5
  )
  # Equal grids: no resampling; patches keep raster order; visible picks exactly those.
  t4 = rand(5, b, 17, dt)
  ta, sa = losses.align(_teacher(t4), _student(s), (4, 4), (4, 4), "all")
  np.testing.assert_array_equal(np.asarray(ta[:, 1:]), t4[:, 1:])
  np.testing.assert_array_equal(np.asarray(sa[:, 1:]), s[:, :-1])
  ta, sa = losses.align(_teacher(t4), _student(s), (4, 4), (4, 4), "visible", visible)
  vis = np.asarray(visible)
  for i in range(b):
    np.testing.assert_array_equal(np.asarray(ta[i, 1:]), t4[i, 1:][vis[i]])
    np.testing.assert_array_equal(np.asarray(sa[i, 1:]), s[i, :-1][vis[i]])
  with pytest.raises(ValueError):
    losses.align(_teacher(t4), _student(s), (4, 4), (4, 4), "nope")
  with pytest.raises(ValueError):  # teacher grid resampled to 3×3 ≠ the student's 16 patches
    losses.align(_teacher(t), _student(s), (6, 6), (3, 3), "all")


def test_align_without_a_cls_matches_patches_only():
  """A model without CLS (cls None): CLS is matched only where both have one; 'cls' refuses."""
  b, dt, ds = 2, 12, 20
  t, s = rand(1, b, 17, dt), rand(2, b, 17, ds)
  _, visible = losses.random_mask(jax.random.key(0), b, 16, 0.5)
  vis = np.asarray(visible)
  for teacher, student in (
    ((None, _teacher(t)[1]), _student(s)),
    (_teacher(t), (None, _student(s)[1])),
  ):
    ta, sa = losses.align(teacher, student, (4, 4), (4, 4), "all")
    np.testing.assert_array_equal(np.asarray(ta), t[:, 1:])
    np.testing.assert_array_equal(np.asarray(sa), s[:, :-1])
    ta, sa = losses.align(teacher, student, (4, 4), (4, 4), "visible", visible)
    for i in range(b):
      np.testing.assert_array_equal(np.asarray(ta[i]), t[i, 1:][vis[i]])
      np.testing.assert_array_equal(np.asarray(sa[i]), s[i, :-1][vis[i]])
    with pytest.raises(UserError, match="cls"):
      losses.align(teacher, student, (4, 4), (4, 4), "cls", visible)


# ---------------------------------------------------------------------------------------
# Masks and stages.
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
  "n,ratio,masked", [(16, 0.5, 8), (196, 0.75, 147), (16, 0.0, 0), (10, 0.25, 2)]
)  # round(2.5) -> 2 (banker's)
def test_random_mask_counts_and_visible(n, ratio, masked):
  b = 8
  mask, visible = losses.random_mask(jax.random.key(0), b, n, ratio)
  mask, visible = np.asarray(mask), np.asarray(visible)
  assert mask.dtype == bool and mask.shape == (b, n)
  assert visible.shape == (b, n - masked)
  np.testing.assert_array_equal(mask.sum(1), masked)
  for i in range(b):
    np.testing.assert_array_equal(visible[i], np.where(~mask[i])[0])  # sorted, the unmasked
  if 0 < masked < n:
    assert len({row.tobytes() for row in mask}) > 1  # different per image


def test_random_mask_deterministic_and_uniform():
  a = np.asarray(losses.random_mask(jax.random.key(7), 4, 16, 0.75)[0])
  b = np.asarray(losses.random_mask(jax.random.key(7), 4, 16, 0.75)[0])
  c = np.asarray(losses.random_mask(jax.random.key(8), 4, 16, 0.75)[0])
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  # Every position is masked about `ratio` of the time (4000 images: ±0.03 is > 4 sigma).
  many = np.asarray(losses.random_mask(jax.random.key(9), 4000, 16, 0.25)[0])
  np.testing.assert_allclose(many.mean(0), 0.25, atol=0.03)


@pytest.mark.parametrize(
  "depth,k,want",
  [(12, 4, [2, 5, 8, 11]), (24, 4, [5, 11, 17, 23]), (4, 4, [0, 1, 2, 3]), (12, 1, [11])],
)
def test_level_ends_exact(depth, k, want):
  assert losses.level_ends(depth, k) == want


@pytest.mark.parametrize("depth,k", [(6, 4), (5, 4), (7, 3), (10, 4), (13, 4), (3, 2)])
def test_level_ends_uneven(depth, k):
  ends = losses.level_ends(depth, k)
  assert len(ends) == k and ends[-1] == depth - 1 and ends[0] >= 0
  lengths = np.diff([-1] + list(ends))
  assert np.all(lengths >= 1), ends  # strictly increasing
  assert lengths.min() >= depth // k and lengths.max() <= -(-depth // k), ends  # near-equal


def test_level_ends_errors():
  with pytest.raises(UserError):
    losses.level_ends(3, 4)
  with pytest.raises(UserError):
    losses.level_ends(12, 0)


def test_level_pairs_pair_the_ends_of_each_level():
  """K = 4 levels of a 12-block teacher and a 24-block student: the last block of each."""
  assert losses.level_pairs(12, 24, 4) == [(2, 5), (5, 11), (8, 17), (11, 23)]
  assert losses.level_pairs(4, 2, 2) == [(1, 0), (3, 1)]
  assert losses.level_pairs(12, 12, 1) == [(11, 11)]
  with pytest.raises(UserError):  # K deeper than the student
    losses.level_pairs(12, 2, 4)


def test_am_maps_are_computed_at_highest_precision():
  """The similarity einsum asks for HIGHEST precision (default is TF32 on NVIDIA GPUs and
  bf16 passes on TPU, ~1e-3 relative): checked in the traced program, since a CPU computes
  f32 either way."""
  jaxpr = jax.make_jaxpr(losses.similarity_map)(jnp.ones((2, 5, 8), jnp.bfloat16))
  dots = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
  assert dots and all(
    e.params["precision"] is not None
    and all(p == jax.lax.Precision.HIGHEST for p in e.params["precision"])
    for e in dots
  )


def test_off_diagonal_cosines_hand_computed():
  """Tokens e0, e0, e1: the six off-diagonal cosines are 1, 0, 0, 1, 0, 0."""
  f = jnp.asarray([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
  mean, std = losses.off_diagonal_cosines(f)
  np.testing.assert_allclose([mean, std], [1 / 3, np.sqrt(2 / 9)], rtol=1e-6)


def test_centering_removes_a_huge_shared_channel():
  """CLIP's risk: one huge channel shared by every token makes all cosines ≈ 1; subtracting
  the token set's mean removes it (n centred tokens have mean cosine near −1/(n − 1))."""
  rng = np.random.default_rng(0)
  f = rng.standard_normal((2, 10, 16)).astype(np.float32)
  f[..., 3] += 100.0
  raw_mean, raw_std = losses.off_diagonal_cosines(jnp.asarray(f))
  c_mean, _ = losses.off_diagonal_cosines(losses.centered(jnp.asarray(f)))
  assert raw_mean > 0.99 and raw_std < 0.01
  assert c_mean < 0.1
  with pytest.raises(UserError, match="am_features"):
    losses.am_loss([(None, f)], [(None, f)], (2, 5), (2, 5), scope="all", features="whitened")
