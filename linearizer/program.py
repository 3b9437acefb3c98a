"""A training stage's step as shapes, for compiling it without running it
(`linearizer.aot`): each stage with a step builds its `Program`s (`stages.Stage.steps`), and
the tool compiles them with `train.jitted_step`, the loop's own jit.
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from linearizer import data


class Program(NamedTuple):
  """A training stage's step as `train.fit` would be given it, abstract (models from
  `nnx.eval_shape`)."""

  module: nnx.Module  # the trained module, abstract
  step_fn: Callable  # `(state, *frozen, batch, rng) -> (state, metrics)`
  tx: Any  # the optimizer
  frozen: tuple  # the frozen trees, abstract (the teacher's parameters)
  batch: Callable  # global batch size -> the step's batch, abstract
  block: Any  # the stage's config block (steps, batch_size, optim)


def abstract_batch(size: int, image_hw: tuple, label_hw: tuple = ()) -> data.Batch:
  """A `data.Batch` of `size` float32 images of `image_hw` and int32 labels (one a
  picture, or a `label_hw` map each), as shapes."""
  return data.Batch(
    image=jax.ShapeDtypeStruct((size, *image_hw, 3), jnp.float32),
    label=jax.ShapeDtypeStruct((size, *label_hw), jnp.int32),
  )
