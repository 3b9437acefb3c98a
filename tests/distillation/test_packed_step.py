"""The packed distillation step (issue 43): on square images one to a row it is the unpacked
step (losses and the updated student), and on mixed sizes it trains every loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import common
from linearizer import data, models, optim, train
from linearizer.distillation import distill, packed_step
from linearizer.errors import UserError
from linearizer.models import packing

TEACHER = dict(image_size=16, width=32, depth=2, num_heads=2, mlp_dim=48)
STUDENT = dict(image_size=16, width=32, depth=2, headdim=16, d_state=8, chunk_size=8)


def setup(**loss):
  config = common.distill_stage(
    steps=4, batch_size=4, lr=1e-3, warmup_steps=0, loss=common.distill_loss(num_stages=2, **loss)
  )
  teacher = models.build("vit", "Ti/8", seed=2, **TEACHER)
  student = models.build("adventurer", "Ti/4", seed=1, **STUDENT)
  distiller = distill.Distiller(student, teacher.cfg.width, rngs=nnx.Rngs(3), loss=config.loss)
  tx = optim.make_optimizer(config.optim, config.steps)
  return config, teacher, distiller, tx


def packed(images, teacher, student, length=40, slots=2, rows=0):
  views = packed_step.views(teacher, student, length, slots)
  (t, s), where = packing.pack_views(images, views, slots, rows=rows)
  return packed_step.PackedBatch(t, s), where


def run(step, state, teacher, batch):
  return jax.jit(step)(state, nnx.state(teacher, nnx.Param), batch, jax.random.key(0))


def test_square_images_one_to_a_row_are_the_unpacked_step():
  """mask_ratio 0 (no random draw to differ), AM over all tokens, MP, final and blocks:
  every loss and the student after one step match the unpacked step."""
  loss = dict(mask_ratio=0.0, scope="all", w_final=1.0, w_blocks=0.5)
  config, teacher, distiller, tx = setup(**loss)
  images = np.random.default_rng(0).normal(size=(4, 16, 16, 3)).astype(np.float32)
  _, state = train.init_state(distiller, tx, ema=False)
  square, square_metrics = run(
    distill.make_distill_step(distiller, teacher, tx, config),
    state,
    teacher,
    data.Batch(images, None),
  )
  _, state = train.init_state(distiller, tx, ema=False)
  batch, _ = packed(list(images), teacher, distiller.student, length=64, slots=1)
  assert batch.student.kind.shape[0] == 4  # one image a row
  packed_state, metrics = run(
    packed_step.make_packed_distill_step(distiller, teacher, tx, config), state, teacher, batch
  )
  for name in ("loss", "am", "final", "blocks", "grad_norm"):
    np.testing.assert_allclose(metrics[name], square_metrics[name], rtol=1e-5, err_msg=name)
  assert float(metrics["mp"]) == float(square_metrics["mp"]) == 0.0  # nothing masked
  for a, b in zip(jax.tree.leaves(packed_state.params), jax.tree.leaves(square.params)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_mixed_sizes_train_every_loss():
  config, teacher, distiller, tx = setup(w_final=1.0, w_blocks=1.0, w_mixer=1.0)
  rng = np.random.default_rng(1)
  sizes = [(16, 8), (8, 24), (24, 16), (8, 8), (16, 16), (8, 16)]
  images = [rng.normal(size=(h, w, 3)).astype(np.float32) for h, w in sizes]
  batch, slots = packed(images, teacher, distiller.student, rows=4)
  assert (slots >= 0).sum() == len(sizes) and ((slots >= 0).sum(axis=1) >= 2).any()
  _, state = train.init_state(distiller, tx, ema=False)
  step = jax.jit(packed_step.make_packed_distill_step(distiller, teacher, tx, config))
  params = nnx.state(teacher, nnx.Param)
  first = None
  for i in range(4):
    state, metrics = step(state, params, batch, jax.random.key(i))
    first = first or float(metrics["loss"])
    for name in ("am", "mp", "final", "blocks", "mixer_out"):
      assert np.isfinite(metrics[name]) and metrics[name] > 0, name
  assert float(metrics["loss"]) < first


def test_resized_teacher_input_is_refused_with_packing():
  config, teacher, distiller, tx = setup()
  config.teacher_input = "resize"
  with pytest.raises(UserError, match="teacher_input='resize' with packed batches"):
    packed_step.make_packed_distill_step(distiller, teacher, tx, config)


def test_pack_views_pads_to_a_fixed_row_count_or_refuses():
  _, teacher, distiller, _ = setup()
  images = [np.zeros((16, 16, 3), np.float32)] * 3
  batch, slots = packed(images, teacher, distiller.student, length=64, slots=1, rows=5)
  assert batch.student.kind.shape[0] == 5 and (slots[3:] == -1).all()
  assert not jnp.any(batch.student.kind[3:] != packing.PAD)
  with pytest.raises(UserError, match="3 images need 3 rows; rows=2"):
    packed(images, teacher, distiller.student, length=64, slots=1, rows=2)
