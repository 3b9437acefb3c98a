"""The fine-tuning step of the segment stage: pixel cross-entropy over the labelled pixels
(mmseg's avg_non_ignore) on the main head plus the auxiliary head's, weighted.
"""

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from linearizer import optim, train
from linearizer.models.segmenter import Segmenter
from linearizer.segmentation.sources import IGNORE


def pixel_cross_entropy(logits, labels, ignore_index: int = IGNORE):
  """Mean cross-entropy over the labelled pixels (mmseg's CrossEntropyLoss with
  avg_non_ignore=True, which mmseg recommends; its default, False, divides by every pixel,
  ignored and padded ones included); 0 for a batch without one."""
  keep = labels != ignore_index
  safe = jnp.where(keep, labels, 0)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), safe)
  return jnp.sum(ce * keep) / jnp.maximum(keep.sum(), 1)


def make_segment_step(model: Segmenter, tx, scfg) -> Callable:
  """`step(state, batch, rng) -> (state, metrics)`: the head's loss plus the auxiliary
  head's, weighted `scfg.head.aux_weight` (mmseg's 0.4).

  Args:
    model: the segmenter (its graph; the weights come with the state).
    tx: the optimizer.
    scfg: the `segment` block (configs/common.py): steps, head, optim.
  """
  graphdef, aux_weight = nnx.graphdef(model), scfg.head.aux_weight
  lr = optim.schedule(scfg.optim, scfg.steps)

  def step(state: train.TrainState, batch, rng):
    rng = jax.random.fold_in(rng, state.step)

    def loss_fn(params, mb, rng):
      model = train.merge(graphdef, params, state.rest, rng)
      logits, aux = model(mb.image, train=True)
      main = pixel_cross_entropy(logits, mb.label)
      loss = main + (aux_weight * pixel_cross_entropy(aux, mb.label) if aux is not None else 0)
      keep = mb.label != IGNORE
      hits = jnp.sum((jnp.argmax(logits, -1) == mb.label) & keep) / jnp.maximum(keep.sum(), 1)
      return loss, {"loss": loss, "ce": main, "pixel_accuracy": hits}

    (_, out), grads = train.accumulate(loss_fn, state.params, batch, rng, scfg.optim.grad_accum)
    new_state = train.apply_update(state, grads, tx, scfg.optim.ema_decay)
    out.update(grad_norm=optax.global_norm(grads), lr=lr(state.step))
    return new_state, out

  return step
