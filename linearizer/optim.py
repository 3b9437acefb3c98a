"""The optimizer: AdamW with warm-up + cosine schedule, decay masks and layer-wise lr decay.

Method.md §8 (distillation) and Adventurer's fine-tuning recipe. A stage's `optim` block
(configs/common.py `optim`) says how; the stage's `steps` say how long: the schedule ends
at the last step of the stage, so a length is stated once.
"""

import re

import jax
import optax

from linearizer.errors import UserError


def path_str(path) -> str:
  """'student/layers/0/mixer/A_log' from a pytree path (the trailing `.value` dropped)."""
  keys = [getattr(k, "key", getattr(k, "name", getattr(k, "idx", None))) for k in path]
  return "/".join(str(k) for k in keys if k != "value")


def decay_mask(params, no_decay: tuple):
  """True where weight decay applies: every parameter whose path matches no `no_decay` regex."""
  return jax.tree_util.tree_map_with_path(
    lambda p, _: not any(re.search(r, path_str(p)) for r in no_decay), params
  )


SCHEDULES = ("cosine", "poly")


def schedule(optim, steps: int) -> optax.Schedule:
  """Linear warm-up from 0 to `lr`, then decay to `min_lr` at step `steps`: cosine, or
  'poly' (lr · (1 − t/T)^power: mmseg's PolyLR, power 1, after its linear warm-up)."""
  kind = optim.schedule
  if kind not in SCHEDULES:
    raise UserError(f"optim.schedule={kind!r}; expected one of {SCHEDULES}.")
  if kind == "poly":
    warmup = optax.linear_schedule(0.0, optim.lr, optim.warmup_steps)
    decay = optax.polynomial_schedule(
      optim.lr, optim.min_lr, optim.power, max(steps - optim.warmup_steps, 1)
    )
    return optax.join_schedules([warmup, decay], [optim.warmup_steps])
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=optim.lr,
    warmup_steps=optim.warmup_steps,
    decay_steps=max(steps, optim.warmup_steps + 1),
    end_value=optim.min_lr,
  )


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

  return jax.tree_util.tree_map_with_path(lambda p, _: decay ** (top - depth(path_str(p))), params)


def scale_by_layer(decay: float) -> optax.GradientTransformation:
  """Multiplies each update by its `layer_scales` factor (stateless)."""

  def update(updates, state, params=None):
    del params
    scales = layer_scales(updates, decay)
    return jax.tree.map(lambda u, s: u * s, updates, scales), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def make_optimizer(optim, steps: int) -> optax.GradientTransformation:
  """Clipping + AdamW with the schedule above; decay exclusions by regex (§6); layer-wise
  lr decay when `layer_decay` < 1.

  Args:
    optim: a stage's `optim` block (lr, min_lr, warmup_steps, weight_decay, b1, b2,
      clip_norm, layer_decay, no_decay).
    steps: the stage's length, where the cosine schedule ends.
  Returns:
    The optax transformation.
  """
  if not 0 < optim.layer_decay <= 1:
    raise UserError(
      f"optim.layer_decay={optim.layer_decay}; expected a number in (0, 1] "
      f"(1 turns layer-wise lr decay off)."
    )
  adamw = optax.adamw(
    schedule(optim, steps),
    b1=optim.b1,
    b2=optim.b2,
    weight_decay=optim.weight_decay,
    mask=lambda p: decay_mask(p, tuple(optim.no_decay)),
  )
  chain = [optax.clip_by_global_norm(optim.clip_norm)] if optim.clip_norm else []
  chain.append(adamw)
  if optim.layer_decay < 1:
    chain.append(scale_by_layer(optim.layer_decay))
  return optax.chain(*chain)
