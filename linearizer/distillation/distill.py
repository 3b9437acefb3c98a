"""The method in one file (method.md §1–3): a frozen ViT teacher, an Adventurer student,
activation matching + masked prediction, read top to bottom.

  Distiller          what is trained: the student and MP's prediction head
  distill_losses     L = w_am · L_AM + w_mp · L_MP for one micro-batch
  make_distill_step  teacher forward (frozen, outside the gradient) → student forward and
                     backward → update
  run_distill        the stage: build the student, run `train.fit`, save the result

As in big_vision's distillation trainer, the teacher is an argument of its own: its
parameters are passed to the step beside the train state, never optimised and never
checkpointed.
"""

import json
import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from linearizer import convert, data, optim, sharding, train, workdir
from linearizer.distillation import losses, student_init, teacher_cache
from linearizer.errors import UserError, log, main_process


class Distiller(nnx.Module):
  """What distillation trains: the student and the MP prediction head (student → teacher)."""

  def __init__(self, student, teacher_width: int, *, rngs: nnx.Rngs):
    self.student = student
    self.predictor = nnx.Linear(student.cfg.width, teacher_width, rngs=rngs)


# ---------------------------------------------------------------------------------------
# The losses of one micro-batch.
# ---------------------------------------------------------------------------------------
def am_tokens(model, out, index: int, features: str):
  """Block `index`'s tokens as AM compares them: the residual stream, or with `next_ln`
  through the model's next pre-norm (LayerNorm in the ViT, RMSNorm in Adventurer)."""
  x = out.blocks[index]
  return model.next_norm(index, x) if features == "next_ln" else x


def distill_losses(
  distiller, teacher_levels, teacher_final, images, mask, visible, cfg, teacher_grid, levels
):
  """L = w_am · L_AM + w_mp · L_MP and its terms, for one batch (the student trains).

  teacher_levels: the teacher's (cls, patches) at the end of each AM level; teacher_final:
  its final-block patch tokens (MP's target); levels: the (teacher, student) block pairs
  of `losses.level_pairs`.
  """
  student = distiller.student
  out = student(images, mask=mask, train=True)
  grid = (images.shape[1] // student.cfg.patch, images.shape[2] // student.cfg.patch)
  metrics, total = {}, 0.0
  if cfg.w_am:  # §2: K levels of n × n similarity maps
    student_levels = [
      losses.split_roles(am_tokens(student, out, j, cfg.am_features), out.roles) for _, j in levels
    ]
    am, per_level = losses.am_loss(
      teacher_levels,
      student_levels,
      teacher_grid,
      grid,
      scope=cfg.scope,
      visible=visible,
      features=cfg.am_features,
    )
    total += cfg.w_am * am
    metrics.update(am=am, **{f"am_stage{k}": v for k, v in enumerate(per_level)})
  if cfg.w_mp:  # §3: the masked patches' final teacher features, from the visible ones
    prediction = distiller.predictor(out.patches)
    mp = losses.mp_loss(prediction, teacher_final, teacher_grid, grid, mask, beta=cfg.beta)
    total += cfg.w_mp * mp
    metrics.update(mp=mp)
  metrics["loss"] = total
  return total, metrics


# ---------------------------------------------------------------------------------------
# The step.
# ---------------------------------------------------------------------------------------
def renormalise(images, src, dst):
  """Images normalised with src (mean, std) re-expressed with dst's statistics."""
  (sm, ss), (dm, ds) = src, dst
  sm, ss, dm, ds = (jnp.asarray(v, images.dtype) for v in (sm, ss, dm, ds))
  return (images * ss + sm - dm) / ds


TEACHER_INPUTS = ("resample", "resize")  # distill.teacher_input (configs/common.py)


def teacher_view(images, student_cfg, teacher_cfg, teacher_input: str = "resample"):
  """The student's images as the teacher sees them: re-normalised with the teacher's
  statistics, or as they are when both models share them (decided once, at trace time;
  the identity round trip would only add rounding); with `teacher_input='resize'`, resized
  (bicubic) to the student's patch grid × the teacher's patch. Training and the maps both
  use it. (`check_config` refuses another `teacher_input` before the run.)"""
  s_norm = (tuple(student_cfg.mean), tuple(student_cfg.std))
  t_norm = (tuple(teacher_cfg.mean), tuple(teacher_cfg.std))
  out = images if s_norm == t_norm else renormalise(images, s_norm, t_norm)
  b, h, w, c = images.shape
  size = teacher_size(h, w, student_cfg, teacher_cfg, teacher_input)
  if size != (h, w):
    out = jax.image.resize(out, (b, *size, c), "bicubic")
  return out


def teacher_size(h: int, w: int, student_cfg, teacher_cfg, teacher_input: str) -> tuple:
  """The (height, width) of the images the teacher sees for the student's (h, w)."""
  if teacher_input == "resize":
    return (h // student_cfg.patch * teacher_cfg.patch, w // student_cfg.patch * teacher_cfg.patch)
  return (h, w)


def make_teacher_targets(teacher: nnx.Module, student_cfg, config) -> Callable:
  """What the losses need of the frozen teacher, as a pure function of its parameters.

  Args:
    teacher: the frozen teacher (its graph; the parameters are the function's argument).
    student_cfg: the student's config (its patch and normalisation).
    config: the stage's settings: `loss` (am_features, num_stages) and `teacher_input`.
  Returns:
    `targets(teacher_params, images) -> {'levels': [(cls, patches)] per AM level, 'final':
    the last block's patch tokens}` for `images` normalised with the student's statistics:
    the distillation step computes it every step, and `teacher_cache` stores it per view.
  """
  dcfg = config.loss
  # The teacher's non-Param state (drop-path RNG streams, unused in eval mode) is kept as a
  # constant: callers pass only its nnx.Param state.
  graphdef, _, rest = nnx.split(teacher, nnx.Param, ...)
  t_cfg = teacher.cfg
  levels = losses.level_pairs(t_cfg.depth, student_cfg.depth, dcfg.num_stages)

  def targets(teacher_params, images):
    t_images = teacher_view(images, student_cfg, t_cfg, config.teacher_input)
    t_model = nnx.merge(graphdef, teacher_params, rest)
    out = t_model(t_images)
    t_levels = [
      losses.split_roles(am_tokens(t_model, out, i, dcfg.am_features), out.roles) for i, _ in levels
    ]
    return {"levels": t_levels, "final": out.roles.patches_of(out.blocks[-1])}

  return targets


def make_distill_step(
  distiller: Distiller,
  teacher: nnx.Module,
  tx: optax.GradientTransformation,
  config,
  cached: bool = False,
) -> Callable:
  """The distillation step: teacher forward (frozen), student forward and backward, update.

  Args:
    distiller: the trained modules (its graph is used; the weights come with the state).
    teacher: the frozen teacher (its graph; its nnx.Param state is the step's argument).
    tx: the optimizer (`optim.make_optimizer`).
    config: the stage's settings: `steps` (where the lr schedule ends), `loss`
      (configs.common.distill_loss), `optim` (configs.common.optim) and `teacher_input`.
    cached: the teacher's outputs come with the batch (`teacher_cache.CachedBatch`, read
      from the teacher-feature cache) instead of being computed by the step.
  Returns:
    `step(state, teacher_params, batch, rng) -> (state, metrics)`, or with `cached`
    `step(state, batch, rng)`; `batch` normalised with the student's statistics.
  """
  dcfg, ocfg = config.loss, config.optim
  graphdef = nnx.graphdef(distiller)
  s_cfg, t_cfg = distiller.student.cfg, teacher.cfg
  levels = losses.level_pairs(t_cfg.depth, s_cfg.depth, dcfg.num_stages)
  lr = optim.schedule(ocfg, config.steps)
  teacher_targets = make_teacher_targets(teacher, s_cfg, config)

  def update(state: train.TrainState, images, teacher_out, rng):
    b, h, w, _ = images.shape
    rng = jax.random.fold_in(rng, state.step)
    t_size = teacher_size(h, w, s_cfg, t_cfg, config.teacher_input)
    teacher_grid = (t_size[0] // t_cfg.patch, t_size[1] // t_cfg.patch)
    n = (h // s_cfg.patch) * (w // s_cfg.patch)

    def loss_fn(params, mb, rng):
      m_rng, d_rng = jax.random.split(rng)
      mb_size = mb["image"].shape[0]
      if dcfg.mask_ratio > 0:
        mask, visible = losses.random_mask(m_rng, mb_size, n, dcfg.mask_ratio)
      else:
        mask, visible = jnp.zeros((mb_size, n), bool), None
      distiller = train.merge(graphdef, params, state.rest, d_rng)
      return distill_losses(
        distiller,
        mb["teacher"]["levels"],
        mb["teacher"]["final"],
        mb["image"],
        mask,
        visible,
        dcfg,
        teacher_grid,
        levels,
      )

    # The teacher ran once on the whole batch; its outputs are split into micro-batches
    # with the images (train.accumulate).
    micro = {"image": images, "teacher": teacher_out}
    (_, metrics), grads = train.accumulate(loss_fn, state.params, micro, rng, ocfg.grad_accum)
    metrics.update(grad_norm=optax.global_norm(grads), lr=lr(state.step))
    return train.apply_update(state, grads, tx, ocfg.ema_decay), metrics

  def step(state: train.TrainState, teacher_params, batch: data.Batch, rng):
    # The teacher is frozen: its forward sits outside value_and_grad, under stop_gradient.
    teacher_out = jax.lax.stop_gradient(teacher_targets(teacher_params, batch.image))
    return update(state, batch.image, teacher_out, rng)

  def cached_step(state: train.TrainState, batch: teacher_cache.CachedBatch, rng):
    # Stored in bf16 (distill.teacher_cache_dtype) to halve the disk; the losses run in f32.
    teacher_out = jax.tree.map(lambda x: x.astype(jnp.float32), batch.teacher)
    return update(state, batch.image, teacher_out, rng)

  return cached_step if cached else step


# ---------------------------------------------------------------------------------------
# The stage.
# ---------------------------------------------------------------------------------------
def check_config(config) -> None:
  """The distill stage's settings, refused before any stage runs: `teacher_input`, the
  starting student (`student_init`) and the teacher cache."""
  dcfg = config.distill
  if dcfg.teacher_input not in TEACHER_INPUTS:
    raise UserError(
      f"distill.teacher_input={dcfg.teacher_input!r}; expected one of {TEACHER_INPUTS}."
    )
  student_init.check_distill_init(config)
  teacher_cache.check_config(dcfg)


def check_teacher(teacher, scope: str) -> None:
  """Refuses, before anything is written, an AM scope the teacher's tokens cannot serve:
  `cls` matches CLS tokens, and a teacher without one (SigLIP) has none to match."""
  if scope == "cls" and teacher.roles.cls is None:
    raise UserError(
      "distill.loss.scope='cls' matches the teacher's CLS token, but this teacher has none "
      f"({convert.describe(teacher)}: cls_token=False, as SigLIP's); use 'visible' or 'all'."
    )


def teacher_cosines(config, teacher, student, source) -> dict:
  """{am_features mode: [(mean, std) per AM level]} of the teacher's off-diagonal token
  cosines over CLS and every patch (`centered`: minus their mean) on the first
  `distill.diagnose_images` training images.

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
  images = teacher_view(jnp.asarray(real), s, teacher.cfg, config.distill.teacher_input)
  out = teacher(images)
  levels = losses.level_pairs(teacher.cfg.depth, s.depth, config.distill.loss.num_stages)
  stats = {}
  modes = [m for m in losses.AM_FEATURES if m != "next_ln" or hasattr(teacher, "next_norm")]
  for mode in modes:
    per_level = []
    for i, _ in levels:
      cls, patches = losses.split_roles(am_tokens(teacher, out, i, mode), out.roles)
      tokens = patches if cls is None else jnp.concatenate([cls, patches], axis=1)
      tokens = losses.centered(tokens) if mode == "centered" else tokens
      per_level.append(tuple(float(v) for v in losses.off_diagonal_cosines(tokens)))
    stats[mode] = per_level
  return stats


def run_distill(
  config, run_dir: str, teacher: nnx.Module, source, hooks: Sequence[tuple] = ()
) -> nnx.Module:
  """The `distill` stage: a student (fresh, or `distill.student_init`) distilled from
  `teacher` on `source`'s images.

  Args:
    config: the experiment config (its `distill` block, `student`, `data`, `mesh`, ...).
    run_dir: the run's workdir; the stage writes under `run_dir/distill/`.
    teacher: the frozen teacher.
    source: the training images (labels unused).
    hooks: `(every, hook)` pairs, `hook(step, distiller)` called every `every` steps before
      the last and once at the end (`train.fit`); the stage table passes the maps' drawer
      (every `distill.visualize_every`) and the scorecard (every `distill.scorecard_every`).
  Returns:
    The distilled student (also saved to `run_dir/distill/model`).
  """
  dcfg = config.distill
  check_teacher(teacher, dcfg.loss.scope)
  student = student_init.distill_student(config, (teacher.cfg.mean, teacher.cfg.std), teacher)
  if dcfg.diagnose_images and main_process():
    stats = teacher_cosines(config, teacher, student, source)
    for mode, per_level in stats.items():
      chosen = " (used)" if mode == dcfg.loss.am_features else ""
      log(
        f"[distill] teacher's off-diagonal cosines per AM level, {mode}{chosen}: "
        + "  ".join(f"{m:.3f}±{sd:.3f}" for m, sd in per_level)
      )
    os.makedirs(workdir.stage_dir(run_dir, "distill"), exist_ok=True)
    with open(
      os.path.join(workdir.stage_dir(run_dir, "distill"), "teacher_cosines.json"), "w"
    ) as f:
      json.dump(stats, f, indent=2)
  # Batches come normalised for the student; the teacher's view is re-normalised from them.
  norm = (student.cfg.mean, student.cfg.std)
  distiller = Distiller(student, teacher.cfg.width, rngs=nnx.Rngs(config.seed + 2))
  tx = optim.make_optimizer(dcfg.optim, dcfg.steps)
  cache = cached_teacher(config, run_dir, teacher, student, source)
  step = make_distill_step(distiller, teacher, tx, dcfg, cached=cache is not None)
  distiller = train.fit_stage(
    config,
    run_dir,
    "distill",
    distiller,
    step,
    tx,
    norm=norm,
    source=source,
    # From the cache the step never runs the teacher: its weights stay off the devices.
    frozen=() if cache else (nnx.state(teacher, nnx.Param),),
    hooks=hooks,
    batches=cache.batches(config.seed, config.data.workers) if cache else None,
  )
  workdir.save_stage_model(run_dir, "distill", distiller.student)
  return distiller.student


def cached_teacher(config, run_dir: str, teacher, student, source):
  """The stage's teacher-feature cache (`distill.teacher_cache`), written where it is
  missing, or None when the teacher runs every step (`off`, or `auto` where a cache would
  not pay or fit)."""
  dcfg = config.distill
  # 'auto' decides once: a resumed stage keeps the stream it started with, even where the
  # disk has changed since (a 'write' that no longer fits is then refused, not skipped).
  decision = os.path.join(workdir.stage_dir(run_dir, "distill"), "teacher_cache.json")
  mode = dcfg.teacher_cache
  if mode == "auto" and os.path.exists(decision):
    with open(decision, encoding="utf-8") as f:
      mode = "write" if json.load(f)["used"] else "off"
    log(f"[distill] teacher cache (auto): resuming as the stage began: {mode}")
  if mode == "off":
    return None
  data_cfg, train_source = (
    train.stage_data(config, "distill"),
    train.stage_source(config, "distill", source),
  )
  views = teacher_cache.Views(
    train_source,
    data_cfg,
    seed=config.seed,
    views=dcfg.teacher_cache_views,
    mean=student.cfg.mean,
    std=student.cfg.std,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  levels = losses.level_pairs(teacher.cfg.depth, student.cfg.depth, dcfg.loss.num_stages)
  # Everything the cached views and outputs depend on besides the teacher's weights (hashed
  # by the cache): a cache written for anything else is refused, the fields named.
  fingerprint = dict(
    teacher=teacher_cache.teacher_fields(teacher.cfg),
    source=train_source.name,
    source_examples=teacher_cache.source_digest(train_source),
    examples=len(train_source),
    **{k: data_cfg[k] for k in ("image_size", "crop_scale", "flip", "randaugment")},
    student_patch=student.cfg.patch,
    student_norm=[list(student.cfg.mean), list(student.cfg.std)],
    teacher_input=dcfg.teacher_input,
    am_features=dcfg.loss.am_features,
    teacher_blocks=[i for i, _ in levels],
    seed=config.seed,
  )
  params = nnx.state(teacher, nnx.Param)
  directory = dcfg.teacher_cache_dir or os.path.join(
    workdir.stage_dir(run_dir, "distill"), "teacher_cache"
  )
  cache = teacher_cache.TeacherCache(
    directory,
    views,
    make_teacher_targets(teacher, student.cfg, dcfg),
    params,
    json.loads(json.dumps(fingerprint)),  # tuples as lists: as meta.json reads back
    dcfg.teacher_cache_dtype,
    data_cfg.image_size,
    local_batch=dcfg.batch_size // jax.process_count(),
  )
  prepared = teacher_cache.prepare(
    mode,
    cache,
    trained_views=dcfg.steps * dcfg.batch_size,
    teacher_params=params,
    mesh=sharding.make_mesh(config.mesh.data, config.mesh.fsdp),
    rules=[tuple(r) for r in config.mesh.rules],
    fsdp_min_size=config.mesh.fsdp_min_size,
    workers=config.data.workers,
  )
  if main_process() and not os.path.exists(decision):
    os.makedirs(os.path.dirname(decision), exist_ok=True)
    with open(decision, "w", encoding="utf-8") as f:
      json.dump({"used": prepared is not None, "directory": cache.directory}, f)
  return prepared
