"""The stages a config can run, in order: train_teacher, distill, finetune, train_student, eval.

Each stage works in `workdir/<stage>/` and ends by writing its model to
`workdir/<stage>/model` (see `models.saved`); a stage whose model is there is finished and
is skipped when the command runs again. Later stages pick up what earlier ones wrote:
teacher checkpoint → distill → finetune. A stage interrupted half-way resumes from its
last checkpoint.
"""
import dataclasses
import os

import jax
import jax.numpy as jnp
from flax import nnx

from linearizer import checkpoint, convert, data, evaluate, export, metrics, models, plots
from linearizer import preemption, sharding, train
from linearizer.models import saved

TRAIN_STAGES = ("train_teacher", "distill", "finetune", "train_student")
STAGES = TRAIN_STAGES + ("ablation", "eval", "bench", "visualize")


def stage_dir(workdir, stage):
  return os.path.join(workdir, stage)


def model_dir(workdir, stage):
  return os.path.join(workdir, stage, "model")


def finished(workdir, stage) -> bool:
  return os.path.isfile(os.path.join(model_dir(workdir, stage), "model.json"))


# ---------------------------------------------------------------------------------------
# Models.
# ---------------------------------------------------------------------------------------
def load_model(spec: str):
  """A model from 'fmt:path' (fmt as in convert.load) or a directory written by saved.save."""
  fmt, sep, path = spec.partition(":")
  if sep and fmt in convert.FORMATS:
    return convert.load(path, fmt)
  return saved.restore(spec)


def teacher(config, workdir, num_classes):
  """The teacher: trained by this run's train_teacher stage, else loaded from teacher.init."""
  if finished(workdir, "train_teacher"):
    return saved.restore(model_dir(workdir, "train_teacher"))
  if config.teacher.init:
    return load_model(config.teacher.init)
  if "train_teacher" in config.stages:
    return models.build("vit", config.teacher.variant, seed=config.seed,
                        image_size=config.data.image_size, num_classes=num_classes,
                        **config.teacher.overrides)
  raise ValueError("No teacher: set teacher.init to a checkpoint ('fmt:path' or a converted "
                   "directory) or add 'train_teacher' to the stages.")


def new_student(config, num_classes, norm, **extra):
  fields = dict(config.student.overrides)
  fields.update(image_size=config.data.image_size, num_classes=num_classes, mean=tuple(norm[0]),
                std=tuple(norm[1]), **extra)
  return models.build("adventurer", config.student.variant, seed=config.seed + 1, **fields)


def with_new_head(base, num_classes, seed, **changes):
  """A copy of `base` with a fresh `num_classes` head (and other config changes)."""
  model = models.from_config(dataclasses.replace(base.cfg, num_classes=num_classes, **changes),
                             seed=seed)
  params = nnx.state(base, nnx.Param).to_pure_dict()
  params.pop("head", None)
  nnx.update(model, nnx.State(params))
  return model


def pretrained_student(config, workdir, classes):
  """The student to fine-tune: this run's distilled one, else student.init."""
  init = model_dir(workdir, "distill") if finished(workdir, "distill") else config.student.init
  if not init:
    raise ValueError("finetune needs a distilled student: run the 'distill' stage first or "
                     "set student.init.")
  return with_new_head(load_model(init), classes, config.seed + 3,
                       drop_path=config.finetune.drop_path)


# ---------------------------------------------------------------------------------------
# The training loop shared by every training stage.
# ---------------------------------------------------------------------------------------
MAX_SKIPPED = 10  # nan_policy='skip' still stops after this many faulty steps in a row


def nan_policy(config) -> str:
  policy = config.get("nan_policy", "stop")
  if policy not in ("stop", "skip"):
    raise ValueError(f"nan_policy={policy!r}; expected 'stop' or 'skip'.")
  return policy


def guard_step(step_fn, *, skip: bool):
  """`step_fn` that also reports metrics['finite']: whether the loss and gradient norm are.

  With `skip`, a non-finite step leaves the parameters, optimizer and EMA as they were
  (the step counter still advances, as the data does).
  """
  def step(state, *args):
    new, step_metrics = step_fn(state, *args)
    finite = jnp.isfinite(step_metrics["loss"]) & jnp.isfinite(step_metrics["grad_norm"])
    if skip:
      kept = jax.tree.map(lambda n, o: jnp.where(finite, n, o),
                          (new.params, new.opt_state, new.ema),
                          (state.params, state.opt_state, state.ema))
      new = new.replace(params=kept[0], opt_state=kept[1], ema=kept[2])
    return new, dict(step_metrics, finite=finite)
  return step


def numerical_fault(stage, config, step, step_metrics, skipped, ckpt, writer):
  """A step with a non-finite loss or gradient: skip it or stop (config.nan_policy).

  Returns the number of consecutive skipped steps; raises FloatingPointError to stop.
  """
  terms = ", ".join(f"{k}={float(v):.4g}" for k, v in step_metrics.items() if k != "lr")
  skipped += 1
  if nan_policy(config) == "skip" and skipped <= MAX_SKIPPED:
    print(f"[{stage}] step {step}: non-finite loss or gradient ({terms}); update skipped",
          flush=True)
    return skipped
  ckpt.wait()  # saves already under way complete: the last good checkpoint stays
  writer.close()
  last = ckpt.latest_step()
  why = (f"{skipped} steps in a row were skipped" if nan_policy(config) == "skip"
         else "nan_policy='stop'")
  raise FloatingPointError(
      f"[{stage}] non-finite loss or gradient at step {step}: {terms} ({why}). "
      + (f"The last good checkpoint (step {last}) is kept; " if last else "")
      + "lower the learning rate, or set --config.nan_policy=skip to skip such steps.")


def fit(stage, config, workdir, module, make_step, extra=(), *, norm, source, every=None):
  """Trains `module` for `config.<stage>.steps` steps; returns it with the final weights.

  make_step(tx) returns the step function; `extra` are the arguments it takes between the
  state and the batch (the frozen teacher's parameters), placed on the mesh here.
  every: (n, fn) calls fn(step, module with the current weights) every n steps before the
  last (e.g. to draw the distillation's maps as they converge).
  """
  scfg = config[stage]
  if scfg.num_labels:
    source = data.Subset(source, scfg.num_labels, seed=config.get("label_seed", config.seed))
  optim = scfg.optim
  optim.total_steps = scfg.steps
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  rules = [tuple(r) for r in config.mesh.rules]
  tx = train.make_optimizer(optim)
  graphdef, state = train.init_state(module, tx, ema=optim.ema_decay > 0)
  shard = lambda t: sharding.tree_shardings(t, mesh, rules, config.mesh.fsdp_min_size)
  state_sh, extra_sh = shard(state), [shard(e) for e in extra]
  state = sharding.put(state, state_sh)
  extra = [sharding.put(e, s) for e, s in zip(extra, extra_sh)]

  ckpt = checkpoint.Checkpointer(os.path.join(stage_dir(workdir, stage), "ckpt"),
                                 keep=config.checkpoint.keep)
  restored, _ = ckpt.restore_latest(state)
  if restored is not None:
    state = restored
    print(f"[{stage}] resumed from the checkpoint of step {int(state.step)}", flush=True)
  start = int(state.step)
  batches = data.train_batches(
      source, data.override(config.data, **scfg.augment),
      global_batch=scfg.batch_size, seed=config.seed,
      mean=norm[0], std=norm[1], start_step=start, process_index=jax.process_index(),
      process_count=jax.process_count())
  step_fn = sharding.jit_step(guard_step(make_step(tx), skip=nan_policy(config) == "skip"),
                              mesh, state_sh, extra_sh)
  writer = metrics.MetricWriter(stage_dir(workdir, stage), stage=stage, total_steps=scfg.steps,
                                batch_size=scfg.batch_size)
  rng = jax.random.key(config.seed)
  skipped = 0  # consecutive steps whose update was skipped (nan_policy='skip')
  for step in range(start, scfg.steps):
    batch = next(batches)
    batch = sharding.global_batch({"image": batch.image, "label": batch.label}, mesh)
    state, step_metrics = step_fn(state, *extra, batch, rng)
    done = step + 1
    finite = bool(step_metrics.pop("finite"))  # one scalar a step: faults are caught at once
    skipped = 0 if finite else numerical_fault(stage, config, done, step_metrics, skipped,
                                               ckpt, writer)
    if finite and (done % config.log_every == 0 or done == scfg.steps):
      writer.write(done, step_metrics)
    if done % config.checkpoint.every_steps == 0 and done < scfg.steps:
      ckpt.save(done, state, {"step": done})
    if every and every[0] and done % every[0] == 0 and done < scfg.steps:
      every[1](done, nnx.merge(graphdef, jax.device_get(state.params),
                               jax.device_get(state.rest)))
    # Multi-host runs ask every process only at log steps (a collective); one process, always.
    check = jax.process_count() == 1 or done % config.log_every == 0
    if check and done < scfg.steps and preemption.requested():
      ckpt.save(done, state, {"step": done}, force=True)
      ckpt.wait()
      raise preemption.Stopped(f"[{stage}] at step {done}, checkpoint saved")
  ckpt.save(scfg.steps, state, {"step": scfg.steps}, force=True)
  ckpt.wait()
  ckpt.close()
  writer.close()
  weights = state.ema if state.ema is not None else state.params
  weights = jax.device_get(weights)
  return nnx.merge(graphdef, weights, jax.device_get(state.rest))


def save_stage_model(workdir, stage, model):
  if jax.process_index() == 0:
    saved.save(model, model_dir(workdir, stage), overwrite=True)


# ---------------------------------------------------------------------------------------
# Stages.
# ---------------------------------------------------------------------------------------
def sources(config):
  """(train source, eval source) named by the config."""
  d = config.data
  train_src = data.get_source(d.source, "train", d.data_dir or None)
  eval_name = d.eval_source or d.source
  eval_split = "test" if not d.eval_source else "train"
  if d.source.startswith("tfds:") and not d.eval_source:
    eval_name, eval_split = d.source, "validation"
  return train_src, data.get_source(eval_name, eval_split, d.data_dir or None)


def num_classes(config, source):
  return config.data.num_classes or source.num_classes


def run_supervised(stage, config, workdir, model, source):
  """train_teacher, finetune, train_student: cross-entropy on labels."""
  norm = (model.cfg.mean, model.cfg.std)
  model = fit(stage, config, workdir, model,
              lambda tx: train.make_supervised_step(model, tx, config[stage]),
              norm=norm, source=source)
  save_stage_model(workdir, stage, model)
  return model


def run_distill(config, workdir, teacher_model, source, eval_source=None):
  """The distillation stage. With `eval_source`, it also draws teacher vs student maps for
  its first image into distill/maps/ at the end (and every `distill.visualize_every`)."""
  student = new_student(config, 0, (teacher_model.cfg.mean, teacher_model.cfg.std),
                        drop_path=config.distill.drop_path)
  distiller = train.Distiller(student, teacher_model.cfg.width, rngs=nnx.Rngs(config.seed + 2))
  teacher_params = nnx.state(teacher_model, nnx.Param)
  draw = None
  if eval_source is not None and jax.process_index() == 0:
    draw = maps_drawer(config, teacher_model, student.cfg, eval_source,
                       os.path.join(stage_dir(workdir, "distill"), "maps"))
  distiller = fit("distill", config, workdir, distiller,
                  lambda tx: train.make_distill_step(distiller, teacher_model, tx,
                                                     config.distill),
                  extra=(teacher_params,), norm=(student.cfg.mean, student.cfg.std),
                  source=source,
                  every=(config.distill.get("visualize_every", 0), draw) if draw else None)
  save_stage_model(workdir, "distill", distiller.student)
  if draw:
    draw(config.distill.steps, distiller)
  return distiller.student


def maps_drawer(config, teacher_model, student_cfg, eval_source, directory):
  """fn(step, distiller) drawing teacher vs student maps for one fixed validation image."""
  from linearizer import visualize  # pylint: disable=import-outside-toplevel
  batch = next(data.eval_batches(eval_source, config.data, batch_size=1, mean=student_cfg.mean,
                                 std=student_cfg.std))
  num_stages = config.distill.loss.num_stages

  def draw(step, distiller):
    paths, am = visualize.figures(teacher_model, {"student": distiller.student}, batch["image"],
                                  directory, num_stages=num_stages, prefix=f"step_{step:06d}")
    print(f"[distill] maps at step {step}: {paths[0]} (AM distance per stage "
          + " ".join(f"{v:.3f}" for v in am["student"]) + ")", flush=True)
  return draw


def run(config, workdir):
  """Runs the config's stages in order, skipping those already finished."""
  unknown = [s for s in config.stages if s not in STAGES]
  if unknown:
    raise ValueError(f"Unknown stages {unknown}; expected some of {STAGES}.")
  if "data" in config:
    train_src, eval_src = sources(config)
    classes = num_classes(config, train_src)
  results = None
  for stage in config.stages:
    if stage in TRAIN_STAGES and finished(workdir, stage):
      print(f"[{stage}] already finished: reusing {model_dir(workdir, stage)}", flush=True)
      continue
    if preemption.requested():
      raise preemption.Stopped(f"before [{stage}]")
    print(f"[{stage}] starting in {stage_dir(workdir, stage)}", flush=True)
    if stage == "train_teacher":
      run_supervised(stage, config, workdir, teacher(config, workdir, classes), train_src)
    elif stage == "distill":
      run_distill(config, workdir, teacher(config, workdir, classes), train_src, eval_src)
    elif stage == "finetune":
      run_supervised(stage, config, workdir, pretrained_student(config, workdir, classes),
                     train_src)
    elif stage == "train_student":
      t = teacher(config, workdir, classes)
      model = new_student(config, classes, (t.cfg.mean, t.cfg.std),
                          drop_path=config.train_student.drop_path)
      run_supervised(stage, config, workdir, model, train_src)
    elif stage == "ablation":
      from linearizer import ablation  # pylint: disable=import-outside-toplevel
      results = ablation.run(config, workdir, train_src, eval_src, classes)
    elif stage == "eval":
      results = evaluate.run_eval(config, workdir, eval_src, classes)
    elif stage == "bench":
      from linearizer import bench  # pylint: disable=import-outside-toplevel
      results = bench.run(config, workdir)
    elif stage == "visualize":
      from linearizer import visualize  # pylint: disable=import-outside-toplevel
      results = visualize.run(config, workdir)
  exported = export_final_student(workdir)
  if jax.process_index() == 0:
    summary(workdir, config, exported)
  return results


def summary(workdir, config, exported):
  """Where everything went."""
  curves = plots.training_curves(workdir, TRAIN_STAGES, os.path.join(workdir, "plots",
                                                                      "training.png"))
  print("\nOutputs:")
  print(f"  config           {os.path.join(workdir, 'config.json')}")
  for stage in config.stages:
    if stage in TRAIN_STAGES:
      print(f"  {stage:<16} {stage_dir(workdir, stage)}/{{ckpt,model,metrics.jsonl,tb}}")
  if "eval" in config.stages:
    print(f"  eval             {os.path.join(workdir, 'eval', 'results.json')}")
  if "bench" in config.stages:
    print(f"  bench            {os.path.join(workdir, 'bench')}/{{bench.json,bench.png}}")
  if "visualize" in config.stages:
    print(f"  visualize        {os.path.join(workdir, 'visualize')}/maps_*.png")
  if "ablation" in config.stages:
    print(f"  ablation         {os.path.join(workdir, 'ablation')}/{{ablation.json,.md,.png}}")
  if curves:
    print(f"  plots            {curves}")
  if exported:
    print(f"  export           {exported}  (linearizer.load_student(dir), serve.jaxexport)")


def export_final_student(workdir):
  """workdir/export: the fine-tuned student, else the distilled one (once, when it exists)."""
  out = os.path.join(workdir, "export")
  for stage in ("finetune", "distill"):
    if finished(workdir, stage):
      if not os.path.isfile(os.path.join(out, export.SERVE_FILE)) and jax.process_index() == 0:
        export.export_student(saved.restore(model_dir(workdir, stage)), out)
        print(f"[export] the {stage} student is in {out}", flush=True)
      return out
  return None
