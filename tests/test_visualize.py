"""The pictures show the real computation (linearizer/visualize.py).

Oracles: the SSD scan itself (the mixing matrix times the values must give the mixer's own
scan output, reference and xla impls), the ViT's own attention output, index bookkeeping
of flipped layers, and a NumPy re-computation of the AM distance from method.md §2.

Tolerances: mixing matrix vs scan ≤ 1e-4 relative to max |y| (float32, the issue's bound);
attention ≤ 1e-5 relative; AM distance vs NumPy ≤ 1e-5 absolute.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import kernels
from configs import demo
from configs import visualize as visualize_config
from linearizer import visualize
from linearizer.models import build, saved

IMAGE = 16


@pytest.fixture(scope="module")
def models():
  teacher = build(
    "vit",
    "Ti/4",
    seed=0,
    width=32,
    depth=2,
    num_heads=2,
    mlp_dim=64,
    image_size=IMAGE,
    num_classes=10,
  )
  student = build(
    "adventurer",
    "Ti/4",
    seed=1,
    width=32,
    depth=2,
    headdim=16,
    d_state=16,
    chunk_size=8,
    image_size=IMAGE,
  )  # 18 scanned tokens: 3 chunks of 8
  images = jax.random.normal(jax.random.key(2), (2, IMAGE, IMAGE, 3))
  return teacher, student, images


@pytest.mark.parametrize("layer", [0, 1])  # layer 1 is flipped (pattern 'alternate')
@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_mixing_matrix_times_values_is_the_scan(models, layer, impl):
  _, student, images = models
  block = student.layers[layer]
  h = student.embed(images) if layer == 0 else student(images).blocks[layer - 1]
  inputs, _ = block.mixer.ssd_inputs(block.mixer_input(h))
  D = block.mixer.D[...]
  y_scan = kernels.ssd(**inputs, D=D, chunk_size=8, impl=impl)
  M = kernels.ssd_matrix(inputs["dt"], inputs["A"], inputs["B"], inputs["C"])
  y = jnp.einsum("bhts,bshp->bthp", M, inputs["x"], precision="highest")
  y = y + D[:, None] * inputs["x"]
  err = float(jnp.max(jnp.abs(y - y_scan)) / jnp.max(jnp.abs(y_scan)))
  assert err <= 1e-4, err
  assert float(jnp.max(jnp.abs(jnp.triu(M, k=1)))) == 0.0  # causal: nothing from the future


def test_flipped_layers_are_undone_into_raster_order(models):
  """In raster order an unflipped layer lets patch i read patches j <= i (lower
  triangular), a flipped one j >= i (upper triangular)."""
  _, student, images = models
  assert not student.layers[0].flip and student.layers[1].flip
  n = student.grid[0] * student.grid[1]
  for layer, zero_side in ((0, np.triu), (1, np.tril)):
    m = np.asarray(visualize.student_mixing(student, images, layer))
    assert m.shape == (2, n, n)
    assert np.all(zero_side(m, k=1 if zero_side is np.triu else -1) == 0), layer
    assert np.all(np.diagonal(m, axis1=1, axis2=2) > 0)


def test_teacher_attention_is_the_blocks_attention(models):
  teacher, _, images = models
  block = teacher.blocks[1]
  x = block.norm1(teacher(images).blocks[0])
  b, t, d = x.shape
  heads = block.attn.num_heads
  q, k, v = jnp.split(block.attn.qkv(x).reshape(b, t, 3 * heads, d // heads), 3, 2)
  probs = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d // heads), axis=-1)
  out = block.attn.proj(jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, d))
  expected = block.attn(x)  # the model's own attention (jax.nn.dot_product_attention)
  assert float(jnp.max(jnp.abs(out - expected)) / jnp.max(jnp.abs(expected))) <= 1e-5
  att = visualize.teacher_attention(teacher, images, 1)
  np.testing.assert_allclose(att, jnp.mean(probs, axis=1)[:, 1:, 1:], rtol=1e-5, atol=1e-7)


def am_distance_numpy(t, s):
  """method.md §2 in float64: cosine maps, rows ℓ2-normalised, 1 − mean row cosine."""

  def smap(f):
    f = np.asarray(f, np.float64)
    f = f / np.linalg.norm(f, axis=-1, keepdims=True)
    a = f @ f.T
    return a / np.linalg.norm(a, axis=-1, keepdims=True)

  return 1 - np.mean(np.sum(smap(t) * smap(s), axis=-1))


def test_figures_write_pngs_and_true_am_distances(models, tmp_path):
  teacher, student, images = models
  paths, am = visualize.figures(
    teacher,
    {"a": student, "b": student},
    images,
    str(tmp_path),
    num_levels=2,
    layer=-1,
    query=(1, 2),
  )
  assert [os.path.basename(p) for p in paths] == ["maps_0.png", "maps_1.png"]
  assert all(Image.open(p).size[0] > 500 for p in paths)
  pairs = visualize.level_tokens(teacher, student, images, images, 2)
  want = [np.mean([am_distance_numpy(t[i], s[i]) for i in range(2)]) for t, s in pairs]
  np.testing.assert_allclose(am["a"], want, atol=1e-5)
  assert am["a"] == am["b"]
  with pytest.raises(ValueError, match="outside"):
    visualize.figures(teacher, {"a": student}, images, str(tmp_path), query=(4, 0))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, models):
  """A finished run's workdir, as main.py leaves it: config.json and the stage models."""
  teacher, student, _ = models
  d = tmp_path_factory.mktemp("run")
  config = demo.get_config("smoke")
  (d / "config.json").write_text(config.to_json_best_effort())
  saved.save(teacher, d / "train_teacher" / "model")
  saved.save(student, d / "distill" / "model")
  return d


def test_visualize_stage_on_a_run(run_dir, tmp_path):
  config = visualize_config.get_config("smoke")
  with config.unlocked():
    config.run_dir = str(run_dir)
  out = visualize.run(config, str(tmp_path))
  assert len(out["paths"]) == 2 and all(os.path.isfile(p) for p in out["paths"])
  assert set(out["am"]) == {"distilled"} and len(out["am"]["distilled"]) == 2
  saved_am = json.load(open(tmp_path / "visualize" / "am_distance.json"))
  assert saved_am == dict(out["am"], images=2)
  with config.unlocked():
    config.visualize.am_images = 3  # measured on 3 images, two of which are drawn
  out3 = visualize.run(config, str(tmp_path / "three"))
  assert json.load(open(tmp_path / "three" / "visualize" / "am_distance.json"))["images"] == 3
  assert out3["am"]["distilled"] != out["am"]["distilled"]


def test_images_from_files_and_clear_errors(run_dir, tmp_path, models):
  _, student, _ = models
  run_config = demo.get_config("smoke")
  for i in range(3):
    Image.fromarray(np.full((20, 24, 3), 60 * i, np.uint8)).save(tmp_path / f"im{i}.png")
  images = visualize.load_images(f"{tmp_path}/im*.png", 2, student.cfg, run_config)
  assert images.shape == (2, IMAGE, IMAGE, 3)
  expected = (0 - np.asarray(student.cfg.mean)) / np.asarray(student.cfg.std)
  np.testing.assert_allclose(images[0, 0, 0], expected, rtol=1e-5)  # black image, normalised
  assert visualize.load_images("digits", 3, student.cfg, run_config).shape == (3, IMAGE, IMAGE, 3)
  with pytest.raises(ValueError, match="no image file"):
    visualize.load_images(str(tmp_path / "missing.png"), 2, student.cfg, run_config)
  config = visualize_config.get_config()
  with config.unlocked():
    config.run_dir = str(tmp_path)  # no config.json there
  with pytest.raises(ValueError, match="not a run's workdir"):
    visualize.run(config, str(tmp_path / "out"))
