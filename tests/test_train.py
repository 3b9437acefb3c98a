"""Tests of the training steps and what they share: the distillation step (linearizer.distillation.distill),
the supervised step and mixup/cutmix (linearizer.supervised), the optimiser and its
weight-decay exclusions (linearizer.optim), EMA and accumulation (linearizer.train)
(method.md §1–3, §6, §8).

Oracles: what the definitions imply (gradients reach every trained parameter and the teacher
never changes; AdamW with a zero gradient moves exactly the decayed parameters by −lr·wd·p;
accumulating two half-batches equals one full batch; EMA and warm-up/cosine formulas written
out here), overfitting a fixed batch, and bitwise reproducibility.

The steps are observed through a pass-through optax transformation (`keep_grads`) chained in
front of the real optimiser: its state is the gradient the step computed.

Tolerances (stated once, used below):
  loss = Σ w·term, equal terms across weightings: <= 1e-6 relative
  grad_accum 2 vs 1 (gradients, SGD updates):    <= 1e-5 × max |value|
  EMA formula, LR schedule, decay updates:        <= 1e-6 relative / absolute
  reproducibility:                                bitwise
"""

import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from configs import common
from linearizer import data, models, optim, sharding, train
from linearizer.distillation import losses
from linearizer.distillation.distill import Distiller, distill_losses, make_distill_step
from linearizer.errors import UserError
from linearizer.supervised import logit_distillation, make_supervised_step, mixup_cutmix

REL = 1e-6
ACCUM_TOL = 1e-5

# 32×32 images, patch 8: a 4×4 grid (16 patches) on both sides. Depths differ (level ends:
# student [0, 1], teacher [1, 3]); CPU compile time grows with the student's depth.
STUDENT = dict(image_size=32, width=32, depth=2, headdim=16, d_state=16, chunk_size=16)
TEACHER = dict(image_size=32, width=48, depth=4, num_heads=3, mlp_dim=96)
NUM_STAGES = 2
N_PATCHES = 16
DISTILL_STEPS = 11
PEAK_LR, MIN_LR, WARMUP, TOTAL = 3e-3, 1e-5, 2, 10


def make_config(ocfg, loss, steps=1):
  return ml_collections.ConfigDict(
    dict(steps=steps, optim=ocfg, loss=loss, teacher_input="resample")
  )


def keep_grads() -> optax.GradientTransformation:
  """Passes updates through unchanged; its state is the last gradient it was given."""
  return optax.GradientTransformation(
    init=lambda params: jax.tree.map(jnp.zeros_like, params),
    update=lambda updates, state, params=None: (updates, updates),
  )


def flat(tree) -> dict:
  """{path: numpy copy} of a pytree of arrays (nnx.State included; RNG keys as key data)."""
  as_np = lambda x: np.array(
    jax.random.key_data(x)
    if jax.dtypes.issubdtype(
      np.result_type(x) if not hasattr(x, "dtype") else x.dtype, jax.dtypes.prng_key
    )
    else x
  )
  return {optim.path_str(p): as_np(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def images(seed, batch, size=32):
  return jax.random.normal(jax.random.key(seed), (batch, size, size, 3))


def new_distiller(seed=0):
  student = models.build("adventurer", "Ti/8", seed=seed, drop_path=0.1, **STUDENT)
  return Distiller(student, TEACHER["width"], rngs=nnx.Rngs(seed + 100))


def new_teacher():
  # drop_path > 0 gives the teacher RNG state besides its params (unused: it runs in eval mode).
  return models.build("vit", "Ti/8", seed=7, drop_path=0.1, **TEACHER)


# ---------------------------------------------------------------------------------------
# Distillation: one jitted step, run for DISTILL_STEPS steps on a fixed batch.
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def distill():
  distiller, teacher = new_distiller(), new_teacher()
  param_paths = sorted(flat(nnx.state(distiller, nnx.Param)))
  teacher_paths = sorted(flat(nnx.state(teacher, nnx.Param)))
  ocfg = common.optim(lr=PEAK_LR, warmup_steps=WARMUP, min_lr=MIN_LR)
  config = make_config(
    ocfg, common.distill_loss(mask_ratio=0.5, w_am=1.0, w_mp=1.0, num_stages=NUM_STAGES), TOTAL
  )
  tx = optax.chain(keep_grads(), optim.make_optimizer(ocfg, TOTAL))
  _, state = train.init_state(distiller, tx, ema=False)
  teacher_params = nnx.state(teacher, nnx.Param)
  mesh = sharding.make_mesh()
  state_sh = sharding.tree_shardings(state, mesh)
  teacher_sh = sharding.tree_shardings(teacher_params, mesh)
  step = sharding.jit_step(
    make_distill_step(distiller, teacher, tx, config), mesh, state_sh, (teacher_sh,)
  )
  state = sharding.put(state, state_sh)
  teacher_params = sharding.put(teacher_params, teacher_sh)
  teacher_before = flat(teacher_params)
  batch = data.Batch(images(0, 4), jnp.arange(4, dtype=jnp.int32))  # labels unused
  rng = jax.random.key(0)

  def fresh_state(seed=0):
    """A new state (the step donates its input, so every run needs its own arrays)."""
    _, s = train.init_state(new_distiller(seed), tx, ema=False)
    return sharding.put(s, state_sh)

  params_before = flat(state.params)
  history = []
  for i in range(DISTILL_STEPS):
    state, metrics = step(state, teacher_params, batch, rng)
    history.append({k: float(v) for k, v in metrics.items()})
    if i == 0:
      params_after_first = flat(state.params)
      grads_first = flat(state.opt_state[0])
  return types.SimpleNamespace(
    step=step,
    state=state,
    teacher_params=teacher_params,
    teacher_before=teacher_before,
    param_paths=param_paths,
    teacher_paths=teacher_paths,
    history=history,
    batch=batch,
    params_before=params_before,
    params_after_first=params_after_first,
    grads_first=grads_first,
    fresh_state=fresh_state,
  )


def test_distill_step_loss_goes_down(distill):
  loss = [h["loss"] for h in distill.history]
  assert all(np.isfinite(loss))
  assert np.mean(loss[-3:]) < 0.7 * loss[0], loss
  for h in distill.history:
    assert {"loss", "am", "mp", "grad_norm", "lr"} <= set(h)
    assert sorted(k for k in h if k.startswith("am_stage")) == [
      f"am_stage{k}" for k in range(NUM_STAGES)
    ]
    np.testing.assert_allclose(h["loss"], h["am"] + h["mp"], rtol=REL)
    stages = [h[f"am_stage{k}"] for k in range(NUM_STAGES)]
    np.testing.assert_allclose(h["am"], np.mean(stages), rtol=REL)
    assert 0.0 <= h["am"] <= 2.0


def test_gradients_reach_every_student_param(distill):
  """Step 0's gradient (w_am = w_mp = 1, mask ratio 0.5): non-zero on every Distiller Param."""
  grads = distill.grads_first
  assert sorted(grads) == distill.param_paths
  for must in (
    "student/mask_token",
    "student/cls_token",
    "student/pos_embed",
    "predictor/kernel",
    "student/norm_f/scale",
    "student/layers/1/mlp/w3/bias",
    "student/layers/0/mixer/A_log",
    "student/layers/0/mixer/dt_bias",
  ):
    assert must in grads
  zero = [p for p, g in grads.items() if not np.any(g != 0) or not np.all(np.isfinite(g))]
  assert not zero, f"no gradient reaches {zero}"


def test_teacher_frozen_and_outside_the_state(distill):
  after = flat(distill.teacher_params)  # still valid: only the state is donated
  assert sorted(after) == sorted(distill.teacher_before) == distill.teacher_paths
  for path, before in distill.teacher_before.items():
    np.testing.assert_array_equal(after[path], before, err_msg=path)
  # The train state holds the Distiller's params (student + predictor) and nothing else.
  state = distill.state
  assert sorted(flat(state.params)) == distill.param_paths
  assert all(p.startswith(("student/", "predictor/")) for p in distill.param_paths)
  state_paths = list(flat(state))
  assert not any(("attn" in p or "blocks/" in p or "fc1" in p) for p in state_paths), state_paths
  # Optimizer moments (and the kept gradient) follow the Distiller's params only.
  moments = {p: x for p, x in flat(state.opt_state).items() if np.ndim(x) > 0}
  assert moments and all(("student/" in p or "predictor/" in p) for p in moments), moments.keys()


def test_distill_learning_rate_schedule(distill):
  lr = np.array([h["lr"] for h in distill.history])
  cosine = lambda s: (
    MIN_LR + (PEAK_LR - MIN_LR) * 0.5 * (1 + np.cos(np.pi * (s - WARMUP) / (TOTAL - WARMUP)))
  )
  want = [PEAK_LR * s / WARMUP for s in range(WARMUP)] + [
    cosine(s) for s in range(WARMUP, DISTILL_STEPS)
  ]
  np.testing.assert_allclose(lr, want, rtol=REL, atol=1e-10)
  assert (
    lr[0] == 0.0 and lr[WARMUP] == pytest.approx(PEAK_LR) and lr[TOTAL] == pytest.approx(MIN_LR)
  )
  # The optimiser uses that rate: at step 0 (lr 0) nothing moves, weight decay included.
  for path, before in distill.params_before.items():
    np.testing.assert_array_equal(distill.params_after_first[path], before, err_msg=path)
  final = flat(distill.state.params)
  assert any(not np.array_equal(final[p], distill.params_before[p]) for p in final)
  for s in (0, 1, WARMUP, 6, TOTAL):
    np.testing.assert_allclose(
      float(optim.schedule(common.optim(lr=PEAK_LR, warmup_steps=WARMUP, min_lr=MIN_LR), TOTAL)(s)),
      want[s],
      rtol=REL,
      atol=1e-10,
    )


def test_distill_step_is_deterministic(distill):
  def run(rng_seed, student_seed=0):
    state = distill.fresh_state(student_seed)
    for _ in range(2):
      state, _ = distill.step(
        state, distill.teacher_params, distill.batch, jax.random.key(rng_seed)
      )
    return flat(state.params)

  a, b, c = run(5), run(5), run(6)
  assert sorted(a) == distill.param_paths
  for path in a:
    np.testing.assert_array_equal(a[path], b[path], err_msg=path)
  # The step's randomness (mask, drop path) does come from its rng.
  assert any(not np.array_equal(a[p], c[p]) for p in a)


def test_loss_weights_select_terms(distill):
  """w_am = 0 drops 'am' (loss = mp), w_mp = 0 drops 'mp' (loss = am); same student pass."""
  distiller, teacher = new_distiller(), new_teacher()
  graphdef, params, rest = nnx.split(distiller, nnx.Param, ...)
  t_graphdef, t_params, t_rest = nnx.split(teacher, nnx.Param, ...)
  weights = {
    "both": (1.0, 1.0),
    "am_only": (1.0, 0.0),
    "mp_only": (0.0, 1.0),
    "weighted": (0.5, 2.0),
  }
  cfgs = {
    k: common.distill_loss(mask_ratio=0.5, w_am=a, w_mp=m, num_stages=NUM_STAGES)
    for k, (a, m) in weights.items()
  }
  x = images(1, 4)
  levels = losses.level_pairs(TEACHER["depth"], STUDENT["depth"], NUM_STAGES)

  @jax.jit
  def all_metrics(params, rest, t_params, t_rest, rng):
    mask, visible = losses.random_mask(rng, 4, N_PATCHES, 0.5)
    t_out = nnx.merge(t_graphdef, t_params, t_rest)(x)
    stages = [losses.split_roles(t_out.blocks[i], t_out.roles) for i, _ in levels]
    final = t_out.roles.patches_of(t_out.blocks[-1])
    out = {}
    for name, cfg in cfgs.items():
      d = train.merge(graphdef, params, rest, rng)
      out[name] = distill_losses(
        distiller=d,
        teacher_levels=stages,
        teacher_final=final,
        images=x,
        mask=mask,
        visible=visible,
        cfg=cfg,
        teacher_grid=(4, 4),
        levels=levels,
      )[1]
    return out

  m = jax.tree.map(float, all_metrics(params, rest, t_params, t_rest, jax.random.key(3)))
  both = m["both"]
  assert both["am"] > 0 and both["mp"] > 0
  np.testing.assert_allclose(both["loss"], both["am"] + both["mp"], rtol=REL)
  assert "mp" not in m["am_only"] and "am" in m["am_only"]
  np.testing.assert_allclose(m["am_only"]["loss"], both["am"], rtol=REL)
  assert not any(k.startswith("am") for k in m["mp_only"]) and "mp" in m["mp_only"]
  np.testing.assert_allclose(m["mp_only"]["loss"], both["mp"], rtol=REL)
  np.testing.assert_allclose(m["weighted"]["loss"], 0.5 * both["am"] + 2.0 * both["mp"], rtol=REL)


# ---------------------------------------------------------------------------------------
# Weight decay exclusions (method.md §6).
# ---------------------------------------------------------------------------------------
DECAYED_NAMES = {"kernel", "conv_weight"}  # linear kernels, patch conv, mixer depthwise conv


def test_decay_mask_on_real_params():
  no_decay = tuple(common.optim().no_decay)
  params = nnx.state(new_distiller(), nnx.Param)
  mask = flat(optim.decay_mask(params, no_decay))
  assert sorted(mask) == sorted(flat(params))
  wrong = {p: bool(m) for p, m in mask.items() if bool(m) != (p.split("/")[-1] in DECAYED_NAMES)}
  assert not wrong, wrong
  decayed = {p for p, m in mask.items() if m}
  for p in (
    "student/patch_embed/kernel",
    "student/layers/0/mixer/conv_weight",
    "student/layers/0/mixer/in_proj/kernel",
    "student/layers/1/mixer/out_proj/kernel",
    "student/layers/1/mlp/w1/kernel",
    "predictor/kernel",
  ):
    assert p in decayed
  for p in (
    "student/layers/0/mixer/A_log",
    "student/layers/0/mixer/dt_bias",
    "student/layers/0/mixer/D",
    "student/layers/0/mixer/norm_weight",
    "student/layers/0/mixer/conv_bias",
    "student/layers/0/norm/scale",
    "student/layers/0/norm_mlp/scale",
    "student/norm_f/scale",
    "student/pos_embed",
    "student/cls_token",
    "student/mask_token",
    "student/patch_embed/bias",
    "student/layers/0/mlp/w1/bias",
    "predictor/bias",
  ):
    assert p in mask and p not in decayed
  # The ViT (trained by the supervised teacher stage): again exactly the kernels.
  vit_mask = flat(optim.decay_mask(nnx.state(new_teacher(), nnx.Param), no_decay))
  assert {p for p, m in vit_mask.items() if m} == {p for p in vit_mask if p.endswith("/kernel")}


def test_optimizer_decays_exactly_the_kernels():
  """AdamW with a zero gradient: update = −lr·wd·p on decayed params, exactly 0 elsewhere."""
  lr, wd = 0.1, 0.5
  tx = optim.make_optimizer(common.optim(lr=lr, weight_decay=wd, clip_norm=0.0, min_lr=lr), 1)
  params = nnx.state(new_distiller(), nnx.Param)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates = flat(jax.jit(lambda p: tx.update(zeros, tx.init(p), p)[0])(params))
  values = flat(params)
  for path, u in updates.items():
    if path.split("/")[-1] in DECAYED_NAMES:
      np.testing.assert_allclose(u, -lr * wd * values[path], rtol=REL, atol=1e-9, err_msg=path)
    else:
      assert not np.any(u), path


@pytest.mark.parametrize("kind", ["adventurer", "vit"])
def test_layer_decay_scales_each_depth_by_its_power(kind):
  """layer_decay d: the update of depth i is d ** (L + 1 − i) times the undecayed one, with
  embeddings at 0, block b at b + 1 and head / final norm at L + 1 (BEiT's rule, L = 2)."""
  d, lr = 0.5, 0.1
  model = (
    models.build("adventurer", "Ti/8", seed=0, num_classes=3, **STUDENT)
    if kind == "adventurer"
    else models.build("vit", "Ti/8", seed=0, num_classes=3, **{**TEACHER, "depth": 2})
  )
  params = nnx.state(model, nnx.Param)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.25), params)

  def update(decay):
    tx = optim.make_optimizer(common.optim(lr=lr, min_lr=lr, clip_norm=0.0, layer_decay=decay), 1)
    return flat(tx.update(grads, tx.init(params), params)[0])

  plain, decayed = update(1.0), update(d)
  blocks = "layers" if kind == "adventurer" else "blocks"
  expected_power = lambda path: (
    3
    if path.split("/")[0] in ("patch_embed", "pos_embed", "cls_token", "mask_token")
    else 2
    if path.startswith(f"{blocks}/0/")
    else 1
    if path.startswith(f"{blocks}/1/")
    else 0
  )
  powers = set()
  for path, u in plain.items():
    powers.add(expected_power(path))
    np.testing.assert_allclose(decayed[path], u * d ** expected_power(path), rtol=REL, err_msg=path)
  assert powers == {0, 1, 2, 3}  # every depth was present and checked
  with pytest.raises(UserError, match="layer_decay=0.0"):
    optim.make_optimizer(common.optim(layer_decay=0.0), 1)


# ---------------------------------------------------------------------------------------
# Supervised step.
# ---------------------------------------------------------------------------------------
SUP_LR, EMA_DECAY = 0.3, 0.9


@pytest.fixture(scope="module")
def supervised():
  """A 1-block student classifier and supervised steps with grad_accum 1 and 2 (no randomness:
  mixup/cutmix and label smoothing off, drop path 0), plain SGD so updates are linear in the
  gradient."""
  model = models.build("adventurer", "Ti/8", seed=3, num_classes=5, **{**STUDENT, "depth": 1})
  loss = common.supervised_loss(label_smoothing=0.0, mixup_alpha=0.0, cutmix_alpha=0.0)
  tx = optax.chain(keep_grads(), optax.sgd(SUP_LR))
  steps = {
    k: jax.jit(
      make_supervised_step(
        model, tx, make_config(common.optim(grad_accum=k, ema_decay=EMA_DECAY), loss)
      )
    )
    for k in (1, 2)
  }
  _, state = train.init_state(model, tx, ema=True)
  batch = data.Batch(images(2, 4), jnp.array([0, 1, 2, 3]))
  return types.SimpleNamespace(steps=steps, state=state, batch=batch)


def test_grad_accumulation_matches_full_batch(supervised):
  rng = jax.random.key(0)
  s1, m1 = supervised.steps[1](supervised.state, supervised.batch, rng)
  s2, m2 = supervised.steps[2](supervised.state, supervised.batch, rng)
  np.testing.assert_allclose(float(m2["loss"]), float(m1["loss"]), rtol=REL)
  np.testing.assert_allclose(float(m2["grad_norm"]), float(m1["grad_norm"]), rtol=ACCUM_TOL)
  g1, g2 = flat(s1.opt_state[0]), flat(s2.opt_state[0])
  p0, p1, p2 = flat(supervised.state.params), flat(s1.params), flat(s2.params)
  assert any(np.any(g) for g in g1.values())
  for path in g1:
    scale = max(np.abs(g1[path]).max(), 1e-12)
    assert np.abs(g2[path] - g1[path]).max() <= ACCUM_TOL * scale, path
    np.testing.assert_allclose(p1[path], p0[path] - SUP_LR * g1[path], rtol=1e-6, atol=1e-7)
    step_scale = np.abs(p1[path] - p0[path]).max()
    np.testing.assert_allclose(
      p2[path], p1[path], rtol=1e-6, atol=ACCUM_TOL * step_scale, err_msg=path
    )


def test_ema_follows_decay(supervised):
  step, rng = supervised.steps[1], jax.random.key(0)
  s1, _ = step(supervised.state, supervised.batch, rng)
  s2, _ = step(s1, supervised.batch, rng)
  p0, p1, p2 = (flat(s.params) for s in (supervised.state, s1, s2))
  e1, e2 = flat(s1.ema), flat(s2.ema)
  for path in p0:
    want1 = EMA_DECAY * p0[path] + (1 - EMA_DECAY) * p1[path]
    np.testing.assert_allclose(e1[path], want1, rtol=REL, atol=1e-7, err_msg=path)
    np.testing.assert_allclose(
      e2[path], EMA_DECAY * want1 + (1 - EMA_DECAY) * p2[path], rtol=REL, atol=1e-7, err_msg=path
    )
  assert any(not np.allclose(e1[p], p1[p]) for p in p0)


def test_supervised_overfits_a_fixed_batch(supervised):
  state, step = supervised.state, supervised.steps[1]
  history = []
  for i in range(20):
    state, metrics = step(state, supervised.batch, jax.random.key(i))
    history.append((float(metrics["loss"]), float(metrics["accuracy"])))
  loss = [h[0] for h in history]
  assert loss[0] == pytest.approx(np.log(5), rel=0.3)  # near chance at the start
  assert loss[-1] < 0.1 * loss[0], loss
  assert history[-1][1] == 1.0


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_logit_distillation_is_torchs_kl_and_cross_entropy(temperature):
  torch = pytest.importorskip("torch")
  f = torch.nn.functional
  r = np.random.default_rng(0)
  s, t = r.normal(size=(6, 7)).astype(np.float32), 3 * r.normal(size=(6, 7)).astype(np.float32)
  ts, tt = torch.from_numpy(s), torch.from_numpy(t)
  soft = f.kl_div(
    f.log_softmax(ts / temperature, -1),
    f.log_softmax(tt / temperature, -1),
    reduction="batchmean",
    log_target=True,
  )
  ours = logit_distillation(jnp.asarray(s), jnp.asarray(t), "soft", temperature)
  assert float(ours) == pytest.approx(temperature**2 * float(soft), rel=1e-5)
  hard = f.cross_entropy(ts, tt.argmax(-1))
  assert float(logit_distillation(s, t, "hard")) == pytest.approx(float(hard), rel=1e-5)
  assert float(logit_distillation(t, t, "soft", temperature)) == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_kd_step_is_its_formula_and_leaves_the_teacher(mode):
  """L = (1 − α)·CE + α·KD with the teacher's logits on the same images (NumPy), the same
  with two micro-batches, and the teacher's weights are only read."""
  student = models.build("adventurer", "Ti/8", seed=3, num_classes=5, **{**STUDENT, "depth": 1})
  teacher = models.build("vit", "Ti/8", seed=4, num_classes=5, **{**TEACHER, "depth": 1})
  teacher_params = nnx.state(teacher, nnx.Param)
  before = flat(teacher_params)
  loss = common.supervised_loss(
    label_smoothing=0.0,
    mixup_alpha=0.0,
    cutmix_alpha=0.0,
    kd=mode,
    kd_weight=0.3,
    kd_temperature=2.0,
  )
  tx = optax.sgd(0.1)
  x, y = images(5, 4), np.array([0, 1, 2, 3])
  s_logits = np.asarray(student(x).logits, np.float64)
  t_logits = np.asarray(teacher(x).logits, np.float64)
  log_softmax = lambda z: (
    z
    - z.max(-1, keepdims=True)
    - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True))
  )
  ce = -np.mean(log_softmax(s_logits)[np.arange(4), y])
  if mode == "soft":
    lt, ls = log_softmax(t_logits / 2), log_softmax(s_logits / 2)
    kd = 4 * np.mean(np.sum(np.exp(lt) * (lt - ls), -1))
  else:
    kd = -np.mean(log_softmax(s_logits)[np.arange(4), t_logits.argmax(-1)])
  norms = []
  for accum in (1, 2):
    step = jax.jit(
      make_supervised_step(student, tx, make_config(common.optim(grad_accum=accum), loss), teacher)
    )
    _, state = train.init_state(student, tx, ema=False)
    _, metrics = step(state, teacher_params, data.Batch(x, jnp.asarray(y)), jax.random.key(0))
    assert float(metrics["ce"]) == pytest.approx(ce, rel=1e-5)
    assert float(metrics["kd"]) == pytest.approx(kd, rel=1e-4)  # a small KL: f32 cancels
    assert float(metrics["loss"]) == pytest.approx(0.7 * ce + 0.3 * kd, rel=1e-5)
    norms.append(float(metrics["grad_norm"]))
  assert norms[1] == pytest.approx(norms[0], rel=ACCUM_TOL)
  after = flat(teacher_params)
  assert all(np.array_equal(before[k], after[k]) for k in before)


# ---------------------------------------------------------------------------------------
# Mixup / CutMix.
# ---------------------------------------------------------------------------------------
def _mix_inputs(b=4, size=8, classes=6):
  # Images differ from their partner (the batch reversed) at every pixel.
  x = jnp.stack([jnp.full((size, size, 3), float(i)) for i in range(b)])
  x = x + 0.01 * jax.random.uniform(jax.random.key(0), x.shape)
  return x, jnp.arange(b) % classes, classes


def _mixer(x, y, classes, **cfg):
  """mixup_cutmix jitted for one config: rng -> (images, targets) as numpy."""
  cfg = common.supervised_loss(**cfg)
  fn = jax.jit(lambda rng: mixup_cutmix(rng, x, y, classes, cfg))
  return lambda seed: tuple(np.asarray(v) for v in fn(jax.random.key(seed)))


def _lam(targets, labels):
  """λ from the soft targets: the weight of each image's own class."""
  return np.asarray(targets)[np.arange(len(labels)), np.asarray(labels)]


def test_mixup_cutmix_off_is_identity():
  x, y, c = _mix_inputs()
  mixed, targets = _mixer(x, y, c, mixup_alpha=0.0, cutmix_alpha=0.0)(0)
  np.testing.assert_array_equal(mixed, np.asarray(x))
  np.testing.assert_array_equal(targets, np.eye(c)[np.asarray(y)])


def test_mixup_targets_and_images():
  x, y, c = _mix_inputs()
  mix = _mixer(x, y, c, mixup_alpha=0.8, cutmix_alpha=0.0)
  lams = []
  for seed in range(4):
    mixed, targets = mix(seed)
    np.testing.assert_allclose(targets.sum(1), 1.0, atol=1e-6)
    lam = _lam(targets, y)
    assert np.all((lam >= 0) & (lam <= 1)) and np.allclose(lam, lam[0])  # one λ per batch
    partner = np.asarray(x)[::-1]
    np.testing.assert_allclose(mixed, lam[0] * np.asarray(x) + (1 - lam[0]) * partner, atol=1e-5)
    lams.append(lam[0])
  assert len(set(np.round(lams, 6))) > 1


def test_cutmix_target_weight_is_pasted_area():
  x, y, c = _mix_inputs(size=16)
  mix = _mixer(x, y, c, mixup_alpha=0.0, cutmix_alpha=1.0)
  fractions = []
  for seed in range(6):
    mixed, targets = mix(seed)
    np.testing.assert_allclose(targets.sum(1), 1.0, atol=1e-6)
    pasted = np.all(mixed == np.asarray(x)[::-1], axis=-1)  # (B, H, W): from the partner
    kept = np.all(mixed == np.asarray(x), axis=-1)
    assert np.all(pasted ^ kept)  # every pixel is one or the other
    frac = pasted.mean(axis=(1, 2))
    np.testing.assert_allclose(1.0 - _lam(targets, y), frac, atol=1e-6)
    rows, cols = np.nonzero(pasted[0])
    if rows.size:  # the pasted region is a box
      assert pasted[0, rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()
    fractions.append(frac[0])
  assert len(set(np.round(fractions, 6))) > 1


def test_mixup_or_cutmix_switch():
  """Both on: each batch gets one of the two; over seeds both occur."""
  x, y, c = _mix_inputs(size=16)
  mix = _mixer(x, y, c, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5)
  kinds = set()
  for seed in range(12):
    mixed, targets = mix(seed)
    np.testing.assert_allclose(targets.sum(1), 1.0, atol=1e-6)
    lam = _lam(targets, y)
    assert np.all((lam >= 0) & (lam <= 1))
    exact = np.all((mixed == np.asarray(x)) | (mixed == np.asarray(x)[::-1]))
    kinds.add("cutmix" if exact else "mixup")
  assert kinds == {"cutmix", "mixup"}


@pytest.mark.parametrize(
  "teacher_input,am_features",
  [("resample", "raw"), ("resize", "raw"), ("resample", "centered"), ("resize", "next_ln")],
)
def test_what_the_teacher_sees_and_what_am_compares(teacher_input, am_features):
  """A patch-16 teacher on a patch-8 student's 32² images (grids 2×2 vs 4×4): 'resample'
  feeds it the images and resamples its tokens to 4×4; 'resize' feeds it 64² images (4×4
  patches of 16 px, one per student patch). AM compares the raw residual streams, each token
  set minus its mean ('centered'), or the streams through the next block's pre-norm
  ('next_ln': the teacher's LayerNorm, the student's RMSNorm, the final norms after the
  last block). The step's AM loss equals AM computed here from the models' own modules on
  what the teacher was fed (mask 0, scope all, drop path 0)."""
  student = models.build("adventurer", "Ti/8", seed=0, **STUDENT)
  teacher = models.build("vit", "Ti/16", seed=7, **TEACHER)
  distiller = Distiller(student, TEACHER["width"], rngs=nnx.Rngs(1))
  loss = common.distill_loss(
    mask_ratio=0.0, w_mp=0.0, num_stages=NUM_STAGES, scope="all", am_features=am_features
  )
  config = make_config(common.optim(lr=1e-3), loss)
  config.teacher_input = teacher_input
  tx = optim.make_optimizer(config.optim, 1)
  _, state = train.init_state(distiller, tx, ema=False)
  step = jax.jit(make_distill_step(distiller, teacher, tx, config))
  x = images(0, 2)
  _, metrics = step(
    state, nnx.state(teacher, nnx.Param), data.Batch(x, jnp.zeros(2)), jax.random.key(0)
  )
  seen = x if teacher_input == "resample" else jax.image.resize(x, (2, 64, 64, 3), "bicubic")
  t_out, s_out = teacher(seen), student(x)
  t_grid = (seen.shape[1] // 16,) * 2

  def tokens(model, out, i):
    if am_features != "next_ln":
      return out.blocks[i]
    if i + 1 == len(out.blocks):
      return out.tokens  # the final norm
    block = model.blocks[i + 1] if hasattr(model, "blocks") else model.layers[i + 1]
    return (block.norm1 if hasattr(block, "norm1") else block.norm)(out.blocks[i])

  pairs = [
    losses.align(
      losses.split_roles(tokens(teacher, t_out, i), t_out.roles),
      losses.split_roles(tokens(student, s_out, j), s_out.roles),
      t_grid,
      (4, 4),
      "all",
    )
    for i, j in losses.level_pairs(TEACHER["depth"], STUDENT["depth"], NUM_STAGES)
  ]
  if am_features == "centered":
    pairs = [(t - t.mean(1, keepdims=True), s - s.mean(1, keepdims=True)) for t, s in pairs]
  want = float(losses.activation_matching([t for t, _ in pairs], [s for _, s in pairs])[0])
  np.testing.assert_allclose(float(metrics["am"]), want, rtol=1e-5)


def test_every_step_draws_its_own_drop_path_masks():
  """merge(…, rng) reseeds the stream drop path draws from (tagged 'default' for a model
  built with nnx.Rngs(seed)): other keys give other masks, the same key the same ones.
  Before, every step reused one mask."""
  model = models.build(
    "vit",
    "Ti/4",
    image_size=16,
    num_classes=0,
    width=32,
    depth=2,
    num_heads=2,
    mlp_dim=64,
    drop_path=0.5,
  )
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  x = jnp.ones((8, 16, 16, 3))
  run = lambda k: np.asarray(
    train.merge(graphdef, params, rest, jax.random.key(k))(x, train=True).tokens
  )
  assert not np.allclose(run(0), run(1))
  np.testing.assert_array_equal(run(0), run(0))
