"""The training loop every stage shares: train state, update, gradient accumulation, the
NaN guard and `fit`.

A step is a pure function `(state, *frozen, batch, rng) -> (state, metrics)`: the NNX modules
are split once into a static graph and array states, so `sharding.jit_step` can give it
explicit shardings and donate the state. Frozen arguments (the teacher's parameters) stay
outside the optimizer and outside the checkpointed state. The methods that define steps are
`distill.py` and `supervised.py`; this file knows nothing of either.
"""

import dataclasses
import os
import time
import zlib
from typing import Any, Callable, Iterator, Literal, NamedTuple, Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from linearizer import checkpoint, data, metrics, preemption, sharding, workdir
from linearizer.errors import NonFiniteError, UserError
from linearizer.log import log

NanPolicy = Literal["stop", "skip"]
NAN_POLICIES = ("stop", "skip")
MAX_SKIPPED = 10  # nan_policy='skip' still stops after this many faulty steps in a row


# ---------------------------------------------------------------------------------------
# State and update.
# ---------------------------------------------------------------------------------------
@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any  # nnx.State of the trained parameters
  opt_state: Any
  ema: Any  # EMA of params, or None
  rest: Any  # the modules' other state (RNG streams): reseeded each step


def init_state(module: nnx.Module, tx, ema: bool) -> tuple:
  """(graphdef, TrainState) for a module; only its nnx.Param leaves are trained."""
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)
  return graphdef, _train_state(params, rest, tx, ema)


def abstract_state(module: nnx.Module, tx, ema: bool) -> TrainState:
  """The TrainState of an abstract module (`nnx.eval_shape`), as shapes: nothing allocated."""
  _, params, rest = nnx.split(module, nnx.Param, ...)
  return jax.eval_shape(lambda p, r: _train_state(p, r, tx, ema), params, rest)


def _train_state(params, rest, tx, ema: bool) -> TrainState:
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=tx.init(params),
    ema=jax.tree.map(jnp.copy, params) if ema else None,
    rest=rest,
  )


def merge(graphdef, params, rest, rng=None):
  """The module back from its state; with `rng`, every dropout stream gets its own key."""
  # Fresh Variables for the RNG state, so the streams can advance inside this trace.
  module = nnx.merge(graphdef, params, jax.tree.map(lambda x: x, rest))
  if rng is not None:  # a distinct key per stream, derived from its path: reproducible
    # Modules built with nnx.Rngs(seed) draw dropout from a stream tagged 'default' (flax
    # falls back to it without a 'dropout' one): both tags are reseeded, or every step
    # would reuse one drop-path / dropout mask.
    nnx.reseed(
      module,
      dropout=rng,
      default=rng,
      policy=lambda path, key, shape: jax.random.fold_in(
        key, zlib.crc32("/".join(map(str, path)).encode()) & 0x7FFFFFFF
      ),
    )
  return module


def apply_update(state: TrainState, grads, tx, ema_decay: float) -> TrainState:
  """One optimizer update of `state.params` (and their EMA when `state.ema` is kept)."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = state.ema
  if ema is not None:
    ema = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, ema, params)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema)


def accumulate(loss_fn, params, batch, rng, steps: int):
  """Value and grad of `loss_fn(params, batch, rng)` averaged over `steps` micro-batches.

  Every leaf of `batch` is split along its first axis, so whatever the caller put in it is
  accumulated: the distillation step passes the teacher's outputs, computed once on the
  whole batch, and only the student's forward and backward run per micro-batch. One step
  sees the whole global batch either way; accumulation only bounds memory.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if steps == 1:
    return grad_fn(params, batch, rng)
  micro = jax.tree.map(lambda x: x.reshape(steps, x.shape[0] // steps, *x.shape[1:]), batch)
  one = lambda i: grad_fn(params, jax.tree.map(lambda x: x[i], micro), jax.random.fold_in(rng, i))
  total = jax.lax.fori_loop(1, steps, lambda i, acc: jax.tree.map(jnp.add, acc, one(i)), one(0))
  return jax.tree.map(lambda x: x / steps, total)


# ---------------------------------------------------------------------------------------
# Non-finite steps.
# ---------------------------------------------------------------------------------------
def check_nan_policy(policy: str) -> NanPolicy:
  if policy not in NAN_POLICIES:
    raise UserError(f"nan_policy={policy!r}; expected one of {NAN_POLICIES}.")
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
      kept = jax.tree.map(
        lambda n, o: jnp.where(finite, n, o),
        (new.params, new.opt_state, new.ema),
        (state.params, state.opt_state, state.ema),
      )
      new = new.replace(params=kept[0], opt_state=kept[1], ema=kept[2])
    return new, dict(step_metrics, finite=finite)

  return step


def numerical_fault(name, policy, step, step_metrics, skipped, ckpt, writer) -> int:
  """A step with a non-finite loss or gradient: skip it or stop (`policy`).

  Returns the number of consecutive skipped steps; raises NonFiniteError to stop.
  """
  terms = ", ".join(f"{k}={float(v):.4g}" for k, v in step_metrics.items() if k != "lr")
  skipped += 1
  if policy == "skip" and skipped <= MAX_SKIPPED:
    log(f"[{name}] step {step}: non-finite loss or gradient ({terms}); update skipped")
    return skipped
  ckpt.wait()  # saves already under way complete: the last good checkpoint stays
  writer.close()
  last = ckpt.latest_step()
  why = f"{skipped} steps in a row were skipped" if policy == "skip" else "nan_policy='stop'"
  raise NonFiniteError(
    f"[{name}] non-finite loss or gradient at step {step}: {terms} ({why}). "
    + (f"The last good checkpoint (step {last}) is kept; " if last else "")
    + (
      "lower the learning rate, or look for bad inputs: skipping did not get past them."
      if policy == "skip"
      else "lower the learning rate, or set --config.nan_policy=skip to skip such steps."
    )
  )


# ---------------------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------------------
class Hook(NamedTuple):
  """`fn(step, module)` called with the current weights every `every` steps before the last
  (0: never) and once with the final ones (the EMA when kept); a dict it returns is logged
  with the step's metrics (its time is left out of img/s)."""

  every: int
  fn: Callable[[int, nnx.Module], Optional[dict]]


@dataclasses.dataclass(frozen=True)
class LoopSettings:
  """How `fit` runs a stage: built once from the config (`loop_settings`)."""

  directory: str  # the stage's directory: ckpt/, metrics.jsonl, tb/
  steps: int  # the stage's length
  batch_size: int  # the global batch, for img/s
  mesh: Any  # where the state, the frozen trees and the batch live
  log_every: int
  checkpoint_every: int
  keep: int = 2  # checkpoints kept
  rules: tuple = ()  # sharding rules (`sharding.tree_shardings`)
  fsdp_min_size: int = 2**18
  ema: bool = False  # keep an EMA of the parameters (the decay is the step's); returned
  seed: int = 0  # the base of the per-step RNG (the step folds the step number in)
  nan_policy: NanPolicy = "stop"  # 'stop' or 'skip'
  name: str = ""  # printed and logged (default: the directory's name)


def loop_settings(config, block, directory: str, name: str = "") -> LoopSettings:
  """The loop settings an experiment config gives a training block (`config.<stage>`, or
  `config.segment`): its steps, batch and EMA, and the run's mesh, checkpointing, logging,
  NaN policy and seed."""
  return LoopSettings(
    directory=directory,
    steps=block.steps,
    batch_size=block.batch_size,
    mesh=sharding.make_mesh(config.mesh.data, config.mesh.fsdp),
    rules=tuple(tuple(r) for r in config.mesh.rules),
    fsdp_min_size=config.mesh.fsdp_min_size,
    ema=block.optim.ema_decay > 0,
    seed=config.seed,
    checkpoint_every=config.checkpoint.every_steps,
    keep=config.checkpoint.keep,
    log_every=config.log_every,
    nan_policy=config.nan_policy,
    name=name,
  )


def fit(
  settings: LoopSettings,
  module: nnx.Module,
  step_fn: Callable,
  tx: optax.GradientTransformation,
  batches: Callable[[int], Iterator],
  *,
  frozen: tuple = (),
  hooks: Sequence[Hook] = (),
) -> nnx.Module:
  """Trains `module` for `steps` steps in `directory`, resuming from its checkpoints.

  The contract every training stage builds on:
  - `directory/ckpt/` holds Orbax checkpoints of the train state (step, parameters,
    optimizer, EMA), every `checkpoint_every` steps, the last `keep` kept; a run started
    again resumes from the newest readable one. `directory/metrics.jsonl` and `tb/` get
    the step's metrics every `log_every` steps (and the last), with img/s and ETA printed.
  - A stop request (SIGINT/SIGTERM, `preemption`) saves the current step and raises
    `preemption.Stopped`; a non-finite loss or gradient stops with `NonFiniteError`
    keeping the last good checkpoint, or with `nan_policy='skip'` skips the update (up to
    MAX_SKIPPED in a row).

  Args:
    settings: where and how long (`LoopSettings`, from `loop_settings`).
    module: the nnx module to train; its nnx.Param leaves are the trained parameters.
    step_fn: `(state, *frozen, batch, rng) -> (state, metrics)`, metrics holding at least
      `loss` and `grad_norm` (e.g. `distill.make_distill_step`).
    tx: the optimizer `step_fn` applies (its state is initialised here).
    batches: `start_step -> iterator` of this process's `data.Batch`es from that step on.
    frozen: pytrees passed to `step_fn` between the state and the batch, never trained or
      checkpointed (the teacher's parameters).
    hooks: `Hook`s, e.g. to draw distillation maps as they converge.
  Returns:
    `module`'s graph with the trained weights (the EMA when kept), on the host.
  """
  directory, steps, mesh, log_every = (
    settings.directory,
    settings.steps,
    settings.mesh,
    settings.log_every,
  )
  name = settings.name or os.path.basename(os.path.normpath(directory))
  nan_policy = settings.nan_policy
  check_nan_policy(nan_policy)
  graphdef, state = init_state(module, tx, ema=settings.ema)
  step_fn, state_sh, frozen_sh = jitted_step(settings, step_fn, state, frozen)
  state = sharding.put(state, state_sh)
  frozen = [sharding.put(f, s) for f, s in zip(frozen, frozen_sh)]

  ckpt = checkpoint.Checkpointer(os.path.join(directory, "ckpt"), keep=settings.keep)
  restored, _ = ckpt.restore_latest(state)
  if restored is not None:
    state = restored
    log(f"[{name}] resumed from the checkpoint of step {int(state.step)}")
  start = int(state.step)
  stream = batches(start)
  writer = metrics.MetricWriter(
    directory, stage=name, total_steps=steps, batch_size=settings.batch_size
  )
  rng = jax.random.key(settings.seed)
  skipped = 0  # consecutive steps whose update was skipped (nan_policy='skip')
  for step in range(start, steps):
    batch = sharding.global_batch(next(stream), mesh)
    state, step_metrics = step_fn(state, *frozen, batch, rng)
    done = step + 1
    finite = bool(step_metrics.pop("finite"))  # one scalar a step: faults are caught at once
    skipped = (
      0 if finite else numerical_fault(name, nan_policy, done, step_metrics, skipped, ckpt, writer)
    )
    if finite and (done % log_every == 0 or done == steps):
      writer.write(done, step_metrics)
    if done % settings.checkpoint_every == 0 and done < steps:
      ckpt.save(done, state, {"step": done})
    due = [h.fn for h in hooks if h.every and done % h.every == 0 and done < steps]
    if due:
      module = nnx.merge(graphdef, jax.device_get(state.params), jax.device_get(state.rest))
      run_hooks(due, done, module, writer)
    # Multi-host runs ask every process only at log steps (a collective); one process, always.
    check = jax.process_count() == 1 or done % log_every == 0
    if check and done < steps and preemption.requested():
      ckpt.save(done, state, {"step": done}, force=True)
      ckpt.wait()
      raise preemption.Stopped(f"[{name}] at step {done}, checkpoint saved")
  ckpt.save(steps, state, {"step": steps}, force=True)
  weights = state.ema if state.ema is not None else state.params
  module = nnx.merge(graphdef, jax.device_get(weights), jax.device_get(state.rest))
  run_hooks([h.fn for h in hooks], steps, module, writer)
  ckpt.wait()
  ckpt.close()
  writer.close()
  return module


def jitted_step(settings: LoopSettings, step_fn: Callable, state, frozen: Sequence) -> tuple:
  """(the jitted step, the state's shardings, the frozen trees' shardings): `step_fn`
  guarded against non-finite steps (`settings.nan_policy`), on `settings.mesh` with the
  sharding rules. `state` and `frozen` may be concrete or abstract (shapes only)."""
  shard = lambda t: sharding.tree_shardings(
    t, settings.mesh, settings.rules, settings.fsdp_min_size
  )
  state_sh, frozen_sh = shard(state), [shard(f) for f in frozen]
  skip = check_nan_policy(settings.nan_policy) == "skip"
  jitted = sharding.jit_step(guard_step(step_fn, skip=skip), settings.mesh, state_sh, frozen_sh)
  return jitted, state_sh, frozen_sh


def run_hooks(due, step: int, module, writer: metrics.MetricWriter) -> None:
  """Calls each hook; logs the scalars any returns; keeps their time out of img/s."""
  start = time.time()
  for hook in due:
    values = hook(step, module)
    if values:
      writer.record(step, values)
  writer.exclude(time.time() - start)


# ---------------------------------------------------------------------------------------
# A stage of an experiment config, through `fit`.
# ---------------------------------------------------------------------------------------
def stage_source(config, stage: str, source):
  """What stage `stage` trains on: `source`, or its fixed `num_labels` subset."""
  scfg = config[stage]
  if scfg.num_labels:
    label_seed = config.seed if config.label_seed < 0 else config.label_seed
    source = data.Subset(source, scfg.num_labels, seed=label_seed)
  return source


def stage_data(config, stage: str):
  """The data config stage `stage` trains with: `data`, with the stage's `augment` fields."""
  return data.override(config.data, **config[stage].augment)


def stage_batches(config, stage: str, source, norm) -> Callable[[int], Iterator]:
  """`start_step -> batches` of a training stage: its label subset, augmentation, batch."""
  return lambda start: data.train_batches(
    stage_source(config, stage, source),
    stage_data(config, stage),
    global_batch=config[stage].batch_size,
    seed=config.seed,
    mean=norm[0],
    std=norm[1],
    start_step=start,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )


def fit_stage(
  config,
  run_dir: str,
  stage: str,
  module: nnx.Module,
  step_fn: Callable,
  tx,
  *,
  batches: Callable[[int], Iterator],
  frozen: tuple = (),
  hooks: Sequence[Hook] = (),
) -> nnx.Module:
  """`fit` with the settings an experiment config gives stage `stage` (`loop_settings`), in
  `run_dir/<stage>/`."""
  settings = loop_settings(config, config[stage], workdir.stage_dir(run_dir, stage), stage)
  return fit(settings, module, step_fn, tx, batches, frozen=frozen, hooks=hooks)
