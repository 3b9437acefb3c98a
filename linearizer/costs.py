"""What a recipe costs, in FLOPs as XLA counts them (`cost_analysis`, the benchmark's
measure): each training stage's step compiled on this host from the `Program` the stage
builds for the compile-only tool, times its steps; and a student's forward per image.

The distillation step holds the teacher's frozen forward, so distillation's count includes
it; the teacher's own training is not counted (the papers take a pretrained teacher as
given: `train_teacher` is never in a recipe's sum). XLA counts a loop's body once, so the
SSD scan's short recurrence across chunks is under-counted; its matmuls within chunks, the
bulk, are not loops.
"""

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from linearizer import resolve, sharding, supervised, train
from linearizer.bench import results
from linearizer.distillation import stage as distill_stage

# The stages of a recipe: a distilled student, or one trained from scratch.
DISTILLED = ("distill", "finetune")
FROM_SCRATCH = ("train_student",)


def flops(compiled) -> Optional[float]:
  """FLOPs of a compiled program, or None where XLA gives none."""
  return results.flops_from_cost(compiled.cost_analysis())


def _programs(config, classes: int, stage: str) -> dict:
  if stage == "distill":
    return distill_stage.programs(config, classes)
  return supervised.programs(config, classes, stage)


def step_gflops(config, classes: int, stage: str) -> float:
  """GFLOPs of one step of `stage` (distill, finetune, train_student) at its global batch,
  compiled for one device of this host, as `train.fit` would jit it."""
  program = _programs(config, classes, stage)[stage]
  mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
  settings = dataclasses.replace(train.loop_settings(config, program.block, "", stage), mesh=mesh)
  state = train.abstract_state(program.module, program.tx, settings.ema)
  step, _, _ = train.jitted_step(settings, program.step_fn, state, program.frozen)
  rng = jax.eval_shape(lambda: jax.random.key(0))
  batch = program.batch(program.block.batch_size)
  return flops(step.lower(state, *program.frozen, batch, rng).compile()) / 1e9


def train_gflops(config, classes: int, stages) -> float:
  """GFLOPs of training a student through `stages` (DISTILLED or FROM_SCRATCH): each
  stage's step times its steps."""
  return sum(config[s].steps * step_gflops(config, classes, s) for s in stages)


def inference_gflops(config, classes: int) -> float:
  """GFLOPs of the configured student's forward on one image at the data's size."""
  teacher = nnx.eval_shape(lambda: resolve.configured_teacher(config, classes))
  norm = (teacher.cfg.mean, teacher.cfg.std)
  student = nnx.eval_shape(lambda: resolve.new_student(config, classes, norm))
  graphdef, state = nnx.split(student)
  size = config.data.image_size
  image = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x).logits)
  return flops(forward.lower(state, image).compile()) / 1e9
