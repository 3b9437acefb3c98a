"""Supervised training: fine-tuning the student, the from-scratch baseline, and a ViT
teacher when none is pretrained. Cross-entropy with label smoothing and Mixup/CutMix
(Adventurer's and DeiT's recipe)."""

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from linearizer import data, optim, train, workdir


def mixup_cutmix(rng, images, labels, num_classes, cfg):
  """Mixup or CutMix (one per batch, chosen at random) on device; soft targets.

  Partners are the batch reversed (as timm). CutMix's λ is corrected to the box's real area.
  """
  onehot = jax.nn.one_hot(labels, num_classes)
  if not (cfg.mixup_alpha or cfg.cutmix_alpha):
    return images, onehot
  r_switch, r_mix, r_cut, r_box = jax.random.split(rng, 4)
  use_cutmix = (
    (jax.random.uniform(r_switch) < cfg.switch_prob)
    if (cfg.mixup_alpha and cfg.cutmix_alpha)
    else bool(cfg.cutmix_alpha)
  )
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
  mixed = jnp.where(
    use_cutmix, jnp.where(box, partner, images), lam_mix * images + (1 - lam_mix) * partner
  )
  lam = jnp.where(use_cutmix, lam_cut, lam_mix)
  return mixed, lam * onehot + (1 - lam) * partner_y


def cross_entropy(logits, targets, label_smoothing=0.0):
  """Mean soft-target cross-entropy; targets (B, C) already one-hot or mixed."""
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return jnp.mean(optax.softmax_cross_entropy(logits.astype(jnp.float32), targets))


def make_supervised_step(model: nnx.Module, tx: optax.GradientTransformation, config) -> Callable:
  """Cross-entropy with label smoothing and mixup/cutmix, for any model with a head.

  Args:
    model: the trained model (its graph; the weights come with the state).
    tx: the optimizer (`optim.make_optimizer`).
    config: the stage's settings: `steps` (where the lr schedule ends), `loss`
      (configs.common.supervised_loss) and `optim`.
  Returns:
    `step(state, batch, rng) -> (state, metrics)` on a `data.Batch`.
  """
  scfg, ocfg = config.loss, config.optim
  graphdef, num_classes = nnx.graphdef(model), model.cfg.num_classes
  lr = optim.schedule(ocfg, config.steps)

  def step(state: train.TrainState, batch: data.Batch, rng):
    rng = jax.random.fold_in(rng, state.step)

    def loss_fn(params, mb, rng):
      r_mix, r_drop = jax.random.split(rng)
      model = train.merge(graphdef, params, state.rest, r_drop)
      images, targets = mixup_cutmix(r_mix, mb.image, mb.label, num_classes, scfg)
      logits = model(images, train=True).logits
      loss = cross_entropy(logits, targets, scfg.label_smoothing)
      accuracy = jnp.mean(jnp.argmax(logits, -1) == mb.label)
      return loss, {"loss": loss, "accuracy": accuracy}

    (_, metrics), grads = train.accumulate(loss_fn, state.params, batch, rng, ocfg.grad_accum)
    new_state = train.apply_update(state, grads, tx, ocfg.ema_decay)
    metrics.update(grad_norm=optax.global_norm(grads), lr=lr(state.step))
    return new_state, metrics

  return step


def run_supervised(stage: str, config, run_dir: str, model: nnx.Module, source) -> nnx.Module:
  """train_teacher, finetune, train_student: `model` trained on `source`'s labels.

  Writes under `run_dir/<stage>/` and saves the result to `run_dir/<stage>/model`.
  """
  scfg = config[stage]
  tx = optim.make_optimizer(scfg.optim, scfg.steps)
  step = make_supervised_step(model, tx, scfg)
  model = train.fit_stage(
    config, run_dir, stage, model, step, tx, norm=(model.cfg.mean, model.cfg.std), source=source
  )
  workdir.save_stage_model(run_dir, stage, model)
  return model
