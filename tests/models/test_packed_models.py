"""Packed batches (issue 43): images of different sizes packed into rows give each image
what it gets alone, in the teacher and the student, at every block."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from linearizer import models
from linearizer.errors import UserError
from linearizer.models import common, packing
from linearizer.models.vit_config import POS_INTERPOLATIONS

# (h, w) of the images, patch 4: grids 3x2 and 2x4 (one row), 4x4 (the table's own grid)
# and 1x1 (one patch: the other row)
SIZES = ((12, 8), (8, 16), (16, 16), (4, 4))


def images(seed=0):
  rng = np.random.default_rng(seed)
  return [rng.normal(size=(h, w, 3)).astype(np.float32) for h, w in SIZES]


def packed_and_alone(model, length=24, slots=3):
  """(the packed output, its slots, each image's output alone)."""
  imgs = images()
  prefix, suffix = model.packing_layout
  batch, slots = packing.pack(imgs, model.cfg.patch, length, slots, prefix, suffix)
  run = nnx.jit(lambda model, x: model(x))  # one compile per shape, not one per op
  return run(model, batch), batch, slots, [run(model, jnp.asarray(x[None])) for x in imgs]


def image_tokens(out, batch, b, m, array):
  """Image slot m of row b's tokens from a packed (B, T, D) array."""
  start = int(batch.start[b, m])
  end = start + int(np.sum(np.asarray(batch.image[b]) == m))
  return array[b, start:end]


def assert_each_image_alone(packed, batch, slots, alone, atol):
  for b, m in zip(*np.nonzero(slots >= 0)):
    single = alone[slots[b, m]]
    for got, want in zip(
      (packed.tokens, *packed.blocks, *packed.mixers),
      (single.tokens, *single.blocks, *single.mixers),
      strict=True,
    ):
      np.testing.assert_allclose(image_tokens(packed, batch, b, m, got), want[0], atol=atol)
    if single.logits is not None:
      np.testing.assert_allclose(packed.logits[b, m], single.logits[0], atol=atol)


def test_pack_lays_out_rows_and_refuses_what_it_cannot_hold():
  imgs = images() + [np.zeros((20, 12, 3))]  # and a 5x3 grid
  batch, slots = packing.pack(imgs, 4, 32, 3, prefix=(packing.CLS,))
  # tokens per image with CLS: 7, 9, 17, 2, 16; first fit in rows of 32, 3 slots:
  # [0, 1, 3] (18), [2] (17), [4] (16: it does not fit beside 2)
  np.testing.assert_array_equal(slots, [[0, 1, 3], [2, -1, -1], [4, -1, -1]])
  np.testing.assert_array_equal(batch.start[0], [0, 7, 16])
  np.testing.assert_array_equal(batch.kind[0, :8], [2, 1, 1, 1, 1, 1, 1, 2])
  np.testing.assert_array_equal(batch.image[0, 17:19], [2, 3])  # then padding (id M)
  np.testing.assert_array_equal(batch.pixels[0, 1], imgs[0][:4, :4])  # raster order
  np.testing.assert_array_equal(batch.pixels[0, 2], imgs[0][:4, 4:8])
  assert (batch.row[0, 1:7].tolist(), batch.col[0, 1:7].tolist()) == (
    [0, 0, 1, 1, 2, 2],
    [0, 1, 0, 1, 0, 1],
  )
  with pytest.raises(UserError, match="needs 17 tokens, more than sequence_length=16"):
    packing.pack(imgs, 4, 16, 3, prefix=(packing.CLS,))
  with pytest.raises(UserError, match="image 0 is 3x8"):
    packing.pack([np.zeros((3, 8, 3))], 4, 16, 3)


@pytest.mark.parametrize("mode", sorted(POS_INTERPOLATIONS))
def test_per_token_resampling_weights_are_the_square_paths_rows(mode):
  antialias, offset, bilinear = POS_INTERPOLATIONS[mode]
  for n_in in (4, 7):
    sizes = range(1, 12)
    want = [
      np.eye(n_in)
      if n_out == n_in
      else common._bilinear_antialias_matrix(n_in, n_out)
      if bilinear
      else common._cubic_matrix(n_in, n_out, antialias, offset)
      for n_out in sizes
    ]
    n_out = np.concatenate([np.full(n, n) for n in sizes])  # every row of every size at once
    index = np.concatenate([np.arange(n) for n in sizes])
    got = packing.resample_weights(n_in, n_out, index, antialias, offset, bilinear)
    np.testing.assert_allclose(got, np.concatenate(want), atol=3e-6)


def vit(seed=0, **overrides):
  fields = dict(image_size=16, width=32, depth=2, num_heads=2, mlp_dim=48, num_classes=5)
  cfg = models.vit_config("Ti/4", **{**fields, **overrides})
  return models.ViT(cfg, rngs=nnx.Rngs(seed))


def perturbed(model, seed=1, scale=0.05):
  """Every parameter moved off its init (zero CLS and head, unit norms) so no part hides."""
  state = nnx.state(model, nnx.Param)
  leaves, tree = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  moved = [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  nnx.update(model, jax.tree.unflatten(tree, moved))
  return model


@pytest.mark.parametrize(
  "overrides",
  [
    dict(),
    dict(pool="gap", registers=2, layer_scale=0.1, style="clip"),
    dict(pool="map", cls_token=False, style="siglip", pos_interpolation="bilinear_antialias"),
    dict(rope="eva02", rope_grid=4, mlp="swiglu", pos_interpolation="bicubic_antialias"),
    dict(rope="pe", rope_offset=1.0, rope_grid=4),
    dict(rope="dinov3", pos_embed=False, registers=1, pool="gap", fc_norm=True),
  ],
  ids=["plain", "clip_registers_gap", "siglip_map", "eva02", "pe", "dinov3"],
)
def test_packed_vit_is_each_image_alone(overrides):
  model = perturbed(vit(**overrides))
  assert_each_image_alone(*packed_and_alone(model), atol=2e-5)


def test_packed_vit_at_its_own_grid_is_the_square_path_bit_for_bit():
  """Images at the table's own grid take no resampling: one to a row, packed = square."""
  model = perturbed(vit(attention_impl="xla"))
  img = images()[2]  # 16x16: the table's 4x4 grid
  batch, _ = packing.pack([img], 4, 17, 1, *model.packing_layout)
  packed, alone = model(batch), model(jnp.asarray(img[None]))
  np.testing.assert_array_equal(packed.blocks[0], alone.blocks[0])


def adventurer(**overrides):
  fields = dict(image_size=16, width=32, depth=2, d_state=8, headdim=16, num_classes=5)
  cfg = models.adventurer_config("Ti/4", **{**fields, **overrides})
  return models.Adventurer(cfg, rngs=nnx.Rngs(0))


def test_packed_adventurer_is_each_image_alone():
  """Flips within each image (block 1), one tail CLS and one heading average per image, the
  conv and the scan restarting at each image: every block equals the image run alone."""
  model = perturbed(adventurer(chunk_size=4))
  assert_each_image_alone(*packed_and_alone(model), atol=2e-5)


def test_drop_path_drops_whole_images_of_a_packed_row():
  drop = common.DropPath(0.5, rngs=nnx.Rngs(dropout=3))
  segments = jnp.asarray(np.repeat(np.arange(8), 4)[None].repeat(16, 0))  # 16 rows x 8 images
  y = np.asarray(drop(jnp.ones((16, 32, 2)), train=True, segments=segments, count=8))
  per_image = y.reshape(16, 8, 4 * 2)
  assert (per_image == per_image[..., :1]).all()  # one draw per image
  assert set(np.unique(per_image)) == {0.0, 2.0}  # dropped, or kept and scaled by 1/keep
  assert 0.3 < (per_image[..., 0] == 0).mean() < 0.7
  first = per_image[..., 0]
  assert (first.min(axis=1) != first.max(axis=1)).any()  # not one draw per row


@pytest.mark.parametrize("mode", ["bicubic_antialias", "bilinear_antialias"])
def test_padding_leaves_the_position_tables_gradient_finite(mode):
  """Padding tokens have an empty grid; their masked weights must not be NaN, or the
  table's gradient is (NaN · 0)."""
  model = vit(pos_interpolation=mode)
  batch, _ = packing.pack(images()[:2], 4, 24, 3, *model.packing_layout)
  assert int((batch.kind == packing.PAD).sum()) > 0
  grads = nnx.grad(lambda m: m(batch).tokens.sum())(model)
  assert bool(jnp.isfinite(grads.pos_embed[...]).all())
