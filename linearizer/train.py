"""Train states and the jittable steps: distillation (method.md §1–3) and supervised.

A step is a pure function `(state, [teacher_params,] batch, rng) -> (state, metrics)`: the
NNX modules are split once into a static graph and array states, so `sharding.jit_step`
can give it explicit shardings and donate the state. The frozen teacher is an argument of
its own, outside the optimizer and outside the state that is checkpointed.
"""
import re
import zlib
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from linearizer import losses

# ---------------------------------------------------------------------------------------
# Modules and state.
# ---------------------------------------------------------------------------------------


class Distiller(nnx.Module):
  """What distillation trains: the student and the MP prediction head (student → teacher)."""

  def __init__(self, student, teacher_width: int, *, rngs: nnx.Rngs):
    self.student = student
    self.predictor = nnx.Linear(student.cfg.width, teacher_width, rngs=rngs)


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any        # nnx.State of the trained parameters
  opt_state: Any
  ema: Any           # EMA of params, or None
  rest: Any          # the modules' other state (RNG streams): reseeded each step


def path_str(path) -> str:
  """'student/layers/0/mixer/A_log' from a pytree path (the trailing `.value` dropped)."""
  keys = [getattr(k, "key", getattr(k, "name", getattr(k, "idx", None))) for k in path]
  return "/".join(str(k) for k in keys if k != "value")


def decay_mask(params, no_decay: tuple):
  """True where weight decay applies: every parameter whose path matches no `no_decay` regex."""
  return jax.tree_util.tree_map_with_path(
      lambda p, _: not any(re.search(r, path_str(p)) for r in no_decay), params)


def schedule(optim) -> optax.Schedule:
  """Linear warm-up from 0 to `lr`, then cosine decay to `min_lr` at `total_steps`."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=optim.lr, warmup_steps=optim.warmup_steps,
      decay_steps=max(optim.total_steps, optim.warmup_steps + 1), end_value=optim.min_lr)


_BLOCK = re.compile(r"(?:^|/)(?:layers|blocks)/(\d+)/")
_EMBEDDING = re.compile(r"(?:^|/)(?:patch_embed|pos_embed|cls_token|mask_token|ln_pre)(?:/|$)")


def layer_scales(params, decay: float):
  """Layer-wise lr decay (BEiT §2.4; MAE's and Adventurer's fine-tuning option): the update
  of a parameter at depth i is scaled by decay ** (L + 1 − i), where embeddings and ln_pre
  are depth 0, block b is b + 1 and the head and final norm L + 1: pretrained early layers
  move least."""
  paths = [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  blocks = [int(m.group(1)) for m in map(_BLOCK.search, paths) if m]
  top = max(blocks, default=-1) + 2  # L + 1

  def depth(path):
    block = _BLOCK.search(path)
    return int(block.group(1)) + 1 if block else 0 if _EMBEDDING.search(path) else top

  return jax.tree_util.tree_map_with_path(lambda p, _: decay ** (top - depth(path_str(p))),
                                          params)


def scale_by_layer(decay: float) -> optax.GradientTransformation:
  """Multiplies each update by its `layer_scales` factor (stateless)."""
  def update(updates, state, params=None):
    del params
    scales = layer_scales(updates, decay)
    return jax.tree.map(lambda u, s: u * s, updates, scales), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def make_optimizer(optim) -> optax.GradientTransformation:
  """Clipping + AdamW with the schedule above; decay exclusions by regex (§6); layer-wise
  lr decay when `layer_decay` < 1."""
  adamw = optax.adamw(schedule(optim), b1=optim.b1, b2=optim.b2,
                      weight_decay=optim.weight_decay,
                      mask=lambda p: decay_mask(p, tuple(optim.no_decay)))
  if not 0 < optim.layer_decay <= 1:
    raise ValueError(f"optim.layer_decay={optim.layer_decay}; expected a number in (0, 1] "
                     f"(1 turns layer-wise lr decay off).")
  chain = [optax.clip_by_global_norm(optim.clip_norm)] if optim.clip_norm else []
  chain.append(adamw)
  if optim.layer_decay < 1:
    chain.append(scale_by_layer(optim.layer_decay))
  return optax.chain(*chain)


def init_state(module: nnx.Module, tx, ema: bool) -> tuple:
  """(graphdef, TrainState) for a module; only its nnx.Param leaves are trained."""
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                     ema=jax.tree.map(jnp.copy, params) if ema else None, rest=rest)
  return graphdef, state


def merge(graphdef, params, rest, rng=None):
  """The module back from its state; with `rng`, every dropout stream gets its own key."""
  # Fresh Variables for the RNG state, so the streams can advance inside this trace.
  module = nnx.merge(graphdef, params, jax.tree.map(lambda x: x, rest))
  if rng is not None:  # a distinct key per stream, derived from its path: reproducible
    nnx.reseed(module, dropout=rng, policy=lambda path, key, shape: jax.random.fold_in(
        key, zlib.crc32("/".join(map(str, path)).encode()) & 0x7FFFFFFF))
  return module


def apply_update(state: TrainState, grads, tx, optim) -> TrainState:
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = state.ema
  if ema is not None:
    ema = jax.tree.map(lambda e, p: optim.ema_decay * e + (1 - optim.ema_decay) * p, ema, params)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema)


def accumulate(loss_fn, params, batch, rng, steps: int):
  """Value and grad of `loss_fn(params, batch, rng)` averaged over `steps` micro-batches.

  One step sees the whole global batch either way; accumulation only bounds memory.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if steps == 1:
    return grad_fn(params, batch, rng)
  micro = jax.tree.map(lambda x: x.reshape(steps, x.shape[0] // steps, *x.shape[1:]), batch)
  one = lambda i: grad_fn(params, jax.tree.map(lambda x: x[i], micro), jax.random.fold_in(rng, i))
  total = jax.lax.fori_loop(1, steps, lambda i, acc: jax.tree.map(jnp.add, acc, one(i)), one(0))
  return jax.tree.map(lambda x: x / steps, total)


# ---------------------------------------------------------------------------------------
# Distillation.
# ---------------------------------------------------------------------------------------
def renormalise(images, src, dst):
  """Images normalised with src (mean, std) re-expressed with dst's statistics."""
  (sm, ss), (dm, ds) = src, dst
  sm, ss, dm, ds = (jnp.asarray(v, images.dtype) for v in (sm, ss, dm, ds))
  return (images * ss + sm - dm) / ds


def distill_losses(distiller, teacher_stages, teacher_final, images, mask, visible, cfg,
                   teacher_grid):
  """L = w_am · L_AM + w_mp · L_MP and its terms, for one batch (the student trains)."""
  student = distiller.student
  out = student(images, mask=mask, train=True)
  grid = (images.shape[1] // student.cfg.patch, images.shape[2] // student.cfg.patch)
  metrics, total = {}, 0.0
  if cfg.w_am:
    student_stages = [out.blocks[i] for i in losses.stage_ends(len(out.blocks), cfg.num_stages)]
    am, per_stage = losses.am_loss(teacher_stages, student_stages, teacher_grid, grid,
                                   scope=cfg.scope, visible=visible)
    total += cfg.w_am * am
    metrics.update(am=am, **{f"am_stage{k}": v for k, v in enumerate(per_stage)})
  if cfg.w_mp:
    prediction = distiller.predictor(out.tokens[:, :-1])
    mp = losses.mp_loss(prediction, teacher_final, teacher_grid, grid, mask, beta=cfg.beta)
    total += cfg.w_mp * mp
    metrics.update(mp=mp)
  metrics["loss"] = total
  return total, metrics


def make_distill_step(distiller: Distiller, teacher, tx, config):
  """The distillation step: teacher forward (frozen), student forward and backward, update.

  config: the stage's settings, `config.loss` (configs.common.distill_loss) and
  `config.optim` (configs.common.optim).

  Returns `step(state, teacher_params, batch, rng) -> (state, metrics)`.
  """
  dcfg, optim = config.loss, config.optim
  graphdef = nnx.graphdef(distiller)
  # The teacher's non-Param state (drop-path RNG streams, unused in eval mode) is kept as a
  # constant: callers pass only its nnx.Param state.
  teacher_graphdef, _, teacher_rest = nnx.split(teacher, nnx.Param, ...)
  s_cfg, t_cfg = distiller.student.cfg, teacher.cfg
  t_ends = losses.stage_ends(t_cfg.depth, dcfg.num_stages)

  def step(state: TrainState, teacher_params, batch, rng):
    images = batch["image"]
    b, h, w, _ = images.shape
    rng = jax.random.fold_in(rng, state.step)
    # The teacher is frozen: its forward sits outside value_and_grad, under stop_gradient.
    t_images = renormalise(images, (s_cfg.mean, s_cfg.std), (t_cfg.mean, t_cfg.std))
    t_model = nnx.merge(teacher_graphdef, teacher_params, teacher_rest)
    t_out = jax.lax.stop_gradient(t_model(t_images))
    teacher = {"stages": [t_out.blocks[i] for i in t_ends], "final": t_out.blocks[-1]}
    teacher_grid = (h // t_cfg.patch, w // t_cfg.patch)
    n = (h // s_cfg.patch) * (w // s_cfg.patch)

    def loss_fn(params, mb, rng):
      m_rng, d_rng = jax.random.split(rng)
      mb_size = mb["image"].shape[0]
      if dcfg.mask_ratio > 0:
        mask, visible = losses.random_mask(m_rng, mb_size, n, dcfg.mask_ratio)
      else:
        mask, visible = jnp.zeros((mb_size, n), bool), None
      distiller = merge(graphdef, params, state.rest, d_rng)
      return distill_losses(distiller, mb["teacher"]["stages"], mb["teacher"]["final"],
                            mb["image"], mask, visible, dcfg, teacher_grid)

    batch = {"image": images, "teacher": teacher}
    (_, metrics), grads = accumulate(loss_fn, state.params, batch, rng, optim.grad_accum)
    metrics.update(grad_norm=optax.global_norm(grads), lr=schedule(optim)(state.step))
    return apply_update(state, grads, tx, optim), metrics

  return step


# ---------------------------------------------------------------------------------------
# Supervised: fine-tuning the student, or training a ViT when no teacher exists.
# ---------------------------------------------------------------------------------------
def mixup_cutmix(rng, images, labels, num_classes, cfg):
  """Mixup or CutMix (one per batch, chosen at random) on device; soft targets.

  Partners are the batch reversed (as timm). CutMix's λ is corrected to the box's real area.
  """
  onehot = jax.nn.one_hot(labels, num_classes)
  if not (cfg.mixup_alpha or cfg.cutmix_alpha):
    return images, onehot
  r_switch, r_mix, r_cut, r_box = jax.random.split(rng, 4)
  use_cutmix = (jax.random.uniform(r_switch) < cfg.switch_prob) if (
      cfg.mixup_alpha and cfg.cutmix_alpha) else bool(cfg.cutmix_alpha)
  lam_mix = jax.random.beta(r_mix, cfg.mixup_alpha, cfg.mixup_alpha) if cfg.mixup_alpha else 1.0
  lam_cut = jax.random.beta(r_cut, cfg.cutmix_alpha, cfg.cutmix_alpha) if cfg.cutmix_alpha else 1.0
  _, h, w, _ = images.shape
  cut = jnp.sqrt(1.0 - lam_cut)
  cy, cx = jax.random.uniform(r_box, (2,)) * jnp.array([h, w])
  y0, y1 = jnp.clip(cy - cut * h / 2, 0, h), jnp.clip(cy + cut * h / 2, 0, h)
  x0, x1 = jnp.clip(cx - cut * w / 2, 0, w), jnp.clip(cx + cut * w / 2, 0, w)
  y0, y1, x0, x1 = (jnp.round(v) for v in (y0, y1, x0, x1))
  yy, xx = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
  box = ((yy >= y0) & (yy < y1) & (xx >= x0) & (xx < x1))[None, :, :, None]
  lam_cut = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
  partner, partner_y = images[::-1], onehot[::-1]
  mixed = jnp.where(use_cutmix, jnp.where(box, partner, images),
                    lam_mix * images + (1 - lam_mix) * partner)
  lam = jnp.where(use_cutmix, lam_cut, lam_mix)
  return mixed, lam * onehot + (1 - lam) * partner_y


def cross_entropy(logits, targets, label_smoothing=0.0):
  """Mean soft-target cross-entropy; targets (B, C) already one-hot or mixed."""
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return jnp.mean(optax.softmax_cross_entropy(logits.astype(jnp.float32), targets))


def make_supervised_step(model, tx, config):
  """Cross-entropy with label smoothing and mixup/cutmix, for any model with a head.

  config: the stage's settings, `config.loss` (configs.common.supervised_loss) and
  `config.optim`.

  Returns `step(state, batch, rng) -> (state, metrics)`.
  """
  scfg, optim = config.loss, config.optim
  graphdef, num_classes = nnx.graphdef(model), model.cfg.num_classes

  def step(state: TrainState, batch, rng):
    rng = jax.random.fold_in(rng, state.step)

    def loss_fn(params, mb, rng):
      r_mix, r_drop = jax.random.split(rng)
      model = merge(graphdef, params, state.rest, r_drop)
      images, targets = mixup_cutmix(r_mix, mb["image"], mb["label"], num_classes, scfg)
      logits = model(images, train=True).logits
      loss = cross_entropy(logits, targets, scfg.label_smoothing)
      accuracy = jnp.mean(jnp.argmax(logits, -1) == mb["label"])
      return loss, {"loss": loss, "accuracy": accuracy}

    (_, metrics), grads = accumulate(loss_fn, state.params, batch, rng, optim.grad_accum)
    new_state = apply_update(state, grads, tx, optim)
    metrics.update(grad_norm=optax.global_norm(grads), lr=schedule(optim)(state.step))
    return new_state, metrics

  return step
