"""Supervised training: fine-tuning the student, the from-scratch baseline, and a ViT
teacher when none is pretrained. Cross-entropy with label smoothing and Mixup/CutMix
(Adventurer's and DeiT's recipe), and optionally logit distillation from a frozen teacher
classifier (DeiT's soft and hard KD, on the student's own head)."""

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from linearizer import convert, optim, resolve, train, workdir
from linearizer.distillation import distill
from linearizer.errors import UserError
from linearizer.log import log
from linearizer.program import Program, abstract_batch

KD_MODES = ("", "soft", "hard")  # supervised_loss.kd (configs/common.py)
KD_STAGES = ("finetune", "train_student")  # the students' stages; a teacher has no teacher


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


def logit_distillation(logits, teacher_logits, mode: str, temperature: float = 1.0):
  """The KD term on the student's own head (DeiT, Touvron et al. 2021, eq. 2 and 3).

  'soft': τ² · KL(softmax(z_t/τ) ‖ softmax(z_s/τ)), summed over classes and averaged over
  the batch (Hinton et al.; DeiT's code further divides by the number of classes).
  'hard': cross-entropy with the teacher's top-1 class (no label smoothing).
  """
  logits, teacher_logits = logits.astype(jnp.float32), teacher_logits.astype(jnp.float32)
  if mode == "soft":
    t = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
    s = jax.nn.log_softmax(logits / temperature, axis=-1)
    return temperature**2 * jnp.mean(jnp.sum(jnp.exp(t) * (t - s), axis=-1))
  hard = jnp.argmax(teacher_logits, axis=-1)
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, hard))


def make_supervised_step(
  model: nnx.Module,
  tx: optax.GradientTransformation,
  config,
  teacher: Optional[nnx.Module] = None,
) -> Callable:
  """Cross-entropy with label smoothing and mixup/cutmix, for any model with a head; with a
  `teacher`, L = (1 − α)·CE + α·KD (`loss.kd`, α = `loss.kd_weight`).

  Args:
    model: the trained model (its graph; the weights come with the state).
    tx: the optimizer (`optim.make_optimizer`).
    config: the stage's settings: `steps` (where the lr schedule ends), `loss`
      (configs.common.supervised_loss) and `optim`.
    teacher: the frozen teacher classifier of logit distillation (its graph; its nnx.Param
      state is the step's argument), or None.
  Returns:
    `step(state, batch, rng) -> (state, metrics)` on a `data.Batch`; with a teacher,
    `step(state, teacher_params, batch, rng)`. The teacher sees the student's (mixed)
    images, re-normalised with its own statistics.
  """
  scfg, ocfg = config.loss, config.optim
  graphdef, num_classes = nnx.graphdef(model), model.cfg.num_classes
  lr = optim.schedule(ocfg, config.steps)
  if teacher is not None:
    teacher_graphdef, _, teacher_rest = nnx.split(teacher, nnx.Param, ...)

  def step(state: train.TrainState, *args):
    teacher_params, batch, rng = args if teacher is not None else (None, *args)
    rng = jax.random.fold_in(rng, state.step)

    def loss_fn(params, mb, rng):
      r_mix, r_drop = jax.random.split(rng)
      model = train.merge(graphdef, params, state.rest, r_drop)
      images, targets = mixup_cutmix(r_mix, mb.image, mb.label, num_classes, scfg)
      logits = model(images, train=True).logits
      ce = cross_entropy(logits, targets, scfg.label_smoothing)
      accuracy = jnp.mean(jnp.argmax(logits, -1) == mb.label)
      if teacher is None:
        return ce, {"loss": ce, "accuracy": accuracy}
      t_model = nnx.merge(teacher_graphdef, teacher_params, teacher_rest)
      t_images = distill.teacher_view(images, model.cfg, t_model.cfg)
      t_logits = jax.lax.stop_gradient(t_model(t_images).logits)
      kd = logit_distillation(logits, t_logits, scfg.kd, scfg.kd_temperature)
      loss = (1 - scfg.kd_weight) * ce + scfg.kd_weight * kd
      return loss, {"loss": loss, "ce": ce, "kd": kd, "accuracy": accuracy}

    (_, metrics), grads = train.accumulate(loss_fn, state.params, batch, rng, ocfg.grad_accum)
    new_state = train.apply_update(state, grads, tx, ocfg.ema_decay)
    metrics.update(grad_norm=optax.global_norm(grads), lr=lr(state.step))
    return new_state, metrics

  return step


def check_kd(config, stage: str) -> None:
  """Refuses, before anything runs, a `loss.kd` that is unknown or on a teacher's stage."""
  kd = config[stage].loss.kd
  if kd not in KD_MODES:
    raise UserError(f"{stage}.loss.kd={kd!r}; expected one of {KD_MODES} ('' = off).")
  if kd and stage not in KD_STAGES:
    raise UserError(
      f"{stage}.loss.kd={kd!r}: logit distillation trains a student from a teacher; use it "
      f"in {' or '.join(KD_STAGES)}."
    )


def kd_teacher(config, stage: str, teacher: Optional[nnx.Module], num_classes: int) -> nnx.Module:
  """The frozen classifier logit distillation learns from: `loss.kd_teacher`, else
  `teacher` (the run's); refused unless its head classifies the data's `num_classes`."""
  spec = config[stage].loss.kd_teacher
  if spec:  # another model than the run's teacher: only the teacher's dtype carries over
    overrides = config.teacher.overrides
    teacher = resolve.load_model(spec, {"dtype": overrides.dtype} if "dtype" in overrides else {})
  if teacher is None:
    raise UserError(f"{stage}.loss.kd={config[stage].loss.kd!r}: no teacher to learn from.")
  outputs = teacher.cfg.num_classes if teacher.head is not None else 0
  if outputs != num_classes:
    raise UserError(
      f"{stage}.loss.kd={config[stage].loss.kd!r} needs a teacher classifier of the data's "
      f"{num_classes} classes; {spec or 'the run teacher'} ({convert.describe(teacher)}) has "
      + (f"{outputs} outputs" if outputs else "no classification head")
      + f". Name one in {stage}.loss.kd_teacher ('fmt:path' or a model directory), e.g. a "
      "fine-tuned CLIP classifier."
    )
  return teacher


def run_supervised(
  stage: str,
  config,
  run_dir: str,
  model: nnx.Module,
  source,
  teacher: Optional[nnx.Module] = None,
) -> nnx.Module:
  """train_teacher, finetune, train_student: `model` trained on `source`'s labels (with
  `loss.kd`, also from the frozen teacher's logits).

  Args:
    stage: the stage (its config block and directory).
    config: the experiment config.
    run_dir: the workdir; the stage writes under `run_dir/<stage>/` and saves the result to
      `run_dir/<stage>/model`.
    model: the model to train.
    source: the labelled training images.
    teacher: the run's trained teacher, which `loss.kd` learns from unless
      `loss.kd_teacher` names another (needed when `loss.kd` is on and no kd_teacher is set).
  Returns:
    The trained model.
  """
  scfg = config[stage]  # (its loss.kd checked with the config: `check_kd`)
  if scfg.loss.kd:
    teacher = kd_teacher(config, stage, teacher, model.cfg.num_classes)
    log(f"[{stage}] {scfg.loss.kd} logit distillation (α = {scfg.loss.kd_weight}) from the teacher")
  else:
    teacher = None
  tx = optim.make_optimizer(scfg.optim, scfg.steps)
  step = make_supervised_step(model, tx, scfg, teacher)
  model = train.fit_stage(
    config,
    run_dir,
    stage,
    model,
    step,
    tx,
    batches=train.stage_batches(config, stage, source, (model.cfg.mean, model.cfg.std)),
    frozen=() if teacher is None else (nnx.state(teacher, nnx.Param),),
  )
  workdir.save_stage_model(run_dir, stage, model)
  return model


def programs(config, classes: int, stage: str) -> dict:
  """{stage: its step} (train_teacher, finetune, train_student) with abstract models, for
  the compile-only tool: the teacher and the students of `teacher.kind/variant` and
  `student.kind/variant` as configured (a checkpoint's own architecture is not read), at
  the stage's resolution, with a `classes`-way head."""
  scfg = config[stage]
  size = train.stage_data(config, stage).image_size
  teacher = nnx.eval_shape(lambda: resolve.configured_teacher(config, classes))
  norm = (teacher.cfg.mean, teacher.cfg.std)
  if stage == "train_teacher":
    model = teacher
  else:
    build = lambda: resolve.new_student(
      config, classes, norm, drop_path=scfg.drop_path, image_size=size
    )
    model = nnx.eval_shape(build)
  kd = teacher if stage in KD_STAGES and scfg.loss.kd else None
  tx = optim.make_optimizer(scfg.optim, scfg.steps)
  frozen = (nnx.state(kd, nnx.Param),) if kd is not None else ()
  step = make_supervised_step(model, tx, scfg, kd)
  batch = lambda n: abstract_batch(n, (size, size))
  return {stage: Program(model, step, tx, frozen, batch, scfg)}
