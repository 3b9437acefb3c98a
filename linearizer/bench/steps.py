"""The training-step rows: part `train_step`, the real distillation step (teacher frozen,
student trained) at the training resolution, with the teacher's forward in the step and from
the teacher-feature cache; part `supervised_step`, a supervised step (forward, backward,
AdamW) of each model at batch 128 or the largest that fits, the protocol the paper's speed
and memory table most likely follows. Each jitted by `sharding.jit_step` on a one-device mesh.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from linearizer import data, optim, sharding, supervised, train
from linearizer.bench.rows import build_pair, each_model, failed_row
from linearizer.bench.settings import Settings
from linearizer.bench.timing import CARRY_STATE, is_oom, timed, timed_row
from linearizer.distillation import distill, teacher_cache
from linearizer.log import log


def measure_train_step(config, s: Settings, meta, peak) -> list:
  """The real distillation step at the training resolution, teacher frozen and student
  trained: as the paper runs it (the teacher's forward in the step) and from the
  teacher-feature cache (its outputs read with the batch, in the cache's dtype)."""
  # The teacher attention a run picks by default (None: JAX's choice, or 'blocked' on a CPU
  # from ViTConfig.blocked_attention_tokens on).
  teacher, student = build_pair(config, s, None)
  distiller = distill.Distiller(student, teacher.cfg.width, rngs=nnx.Rngs(2))
  # The config's distillation settings; AM compares at most one level per block of the
  # shallower model (smoke), on a copy: the config itself is never written.
  stage = ml_collections.ConfigDict(config.bench.distill.to_dict())
  stage.loss.num_stages = min(stage.loss.num_stages, teacher.cfg.depth, student.cfg.depth)
  tx = optim.make_optimizer(stage.optim, stage.steps)
  mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
  teacher_params = nnx.state(teacher, nnx.Param)
  teacher_sh = sharding.tree_shardings(teacher_params, mesh)
  teacher_params = sharding.put(teacher_params, teacher_sh)
  res, batch = s.train_resolution, s.train_batch
  images = np.zeros((batch, res, res, 3), np.float32)
  labels = np.zeros(batch, np.int32)
  targets = jax.jit(distill.make_teacher_targets(teacher, student.cfg, stage))
  stored = jax.tree.map(
    lambda x: np.asarray(x).astype(teacher_cache.DTYPES[stage.teacher_cache_dtype]),
    targets(teacher_params, jnp.asarray(images)),
  )
  _, initial = train.init_state(distiller, tx, ema=False)
  state_sh = sharding.tree_shardings(initial, mesh)
  rows = []
  for teacher_mode in ("forward", "cached"):
    cached = teacher_mode == "cached"
    step = distill.make_distill_step(distiller, teacher, tx, stage, cached=cached)
    # Each mode's own copy: the step donates its state (and the distiller's arrays with it).
    state = sharding.put(jax.tree.map(jnp.array, initial), state_sh)
    if cached:
      local = teacher_cache.CachedBatch(images, labels, stored)
      args = (state, sharding.global_batch(local, mesh), jax.random.key(0))
      jitted = sharding.jit_step(step, mesh, state_sh)
    else:
      local = data.Batch(images, labels)
      args = (state, teacher_params, sharding.global_batch(local, mesh), jax.random.key(0))
      jitted = sharding.jit_step(step, mesh, state_sh, (teacher_sh,))
    row = timed_row(
      meta,
      peak,
      batch=batch,
      **timed(jitted, args, s.repeats, carry=CARRY_STATE),
      kind="train_step",
      model=f"distill {s.teacher} -> {s.student}"
      + (f", teacher cached ({stage.teacher_cache_dtype})" if cached else ""),
      role="pair",
      variant=s.student,
      attention_impl=None,
      resolution=res,
      teacher=teacher_mode,
    )
    log(
      f"[bench] {row['model']} @{res} batch {batch}: {row['img_per_s']:.2f} img/s "
      f"(compile {row['compile_s']:.1f} s)"
    )
    rows.append(row)
  return rows


def time_supervised_step(model, stage, res, batch, repeats):
  """`timed` of the real supervised step (`supervised.make_supervised_step`) on a
  one-device mesh."""
  tx = optim.make_optimizer(stage.optim, stage.steps)
  step = supervised.make_supervised_step(model, tx, stage)
  _, state = train.init_state(model, tx, ema=False)
  # The step donates its state: copies, so that the model's own arrays survive for the
  # next resolution.
  state = jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else x, state)
  mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
  state_sh = sharding.tree_shardings(state, mesh)
  state = sharding.put(state, state_sh)
  images = np.zeros((batch, res, res, 3), np.float32)
  batch_arr = sharding.global_batch(data.Batch(images, np.zeros(batch, np.int32)), mesh)
  args = (state, batch_arr, jax.random.key(0))
  return timed(sharding.jit_step(step, mesh, state_sh), args, repeats, carry=CARRY_STATE)


def measure_supervised_step(model, res, s: Settings, stage, meta, peak):
  """One supervised-step row at `supervised_batch`, halved on accelerators until it fits."""
  batch = s.supervised_batch
  while True:
    try:
      timing = time_supervised_step(model, stage, res, batch, s.repeats)
      break
    except Exception as err:
      if not (s.accel and is_oom(err) and batch > 1):
        raise
      batch //= 2
  return timed_row(meta, peak, batch=batch, **timing, kind="supervised_step", resolution=res)


def supervised_rows(config, s: Settings, base, peak):
  """The supervised step of the ViT under each attention impl and of the student once."""
  stage = config.bench.supervised
  rows = []
  for model, name, attn, meta in each_model(config, s, base, num_classes=stage.num_classes):
    for res in s.supervised_resolutions:
      try:
        row = measure_supervised_step(model, res, s, stage, meta, peak)
      except Exception as err:  # recorded, not fatal (as the forward rows)
        what = f"supervised step {name} {attn or ''}"
        rows.append(failed_row(meta, "supervised_step", res, err, what))
        continue
      rows.append(row)
      log(
        f"[bench] supervised step {name:<18} {attn or '':<6} @{res:<5} batch {row['batch']}: "
        f"{row['img_per_s']:.2f} img/s (compile {row['compile_s']:.1f} s)"
      )
  return rows
