"""Segmentation: the metric against hand-computed values, inference (sliding windows vs
the whole image), the segmenter's shapes on both backbones, the recipes' numbers. The stage
through main.py and the `predict` CLI: tests/e2e/test_segment_main.py."""

import json
import socket
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import helpers
from helpers import ROOT
from linearizer import models
from linearizer.errors import UserError
from linearizer.models.segmenter import Segmenter, SegmenterConfig, default_out_indices
from linearizer.segment import confusion_matrix, segmentation_scores
from linearizer.segmentation import inference, metrics, pipeline, scenes, stage, step


def test_confusion_matrix_and_scores_by_hand():
  label = np.array([[0, 0, 1, 1], [2, 2, 255, 1]])
  pred = np.array([[0, 1, 1, 1], [2, 0, 2, 0]])
  cm = metrics.confusion_matrix(pred, label, 4)
  # rows truth, columns prediction; the 255 pixel is left out; class 3 is nowhere
  assert cm.dtype == np.int64 and cm.shape == (4, 4)
  np.testing.assert_array_equal(cm, [[1, 1, 0, 0], [1, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]])
  s = metrics.segmentation_scores(cm)
  # IoU = tp / (truth + predicted − tp): 1/(2+3−1), 2/(3+3−2), 1/(2+1−1); class 3 NaN
  np.testing.assert_allclose(s["iou"][:3], [1 / 4, 2 / 4, 1 / 2])
  assert np.isnan(s["iou"][3])
  assert s["miou"] == pytest.approx((1 / 4 + 1 / 2 + 1 / 2) / 3)
  assert s["macc"] == pytest.approx((1 / 2 + 2 / 3 + 1 / 2) / 3)
  assert s["aacc"] == pytest.approx(4 / 7)
  assert json.loads(json.dumps(stage.json_safe(s)))["iou"][3] is None
  # JAX arrays give the same counts
  np.testing.assert_array_equal(
    metrics.confusion_matrix(jnp.asarray(pred), jnp.asarray(label), 4), cm
  )


def test_a_class_predicted_but_absent_from_the_truth_counts_in_miou_not_macc():
  cm = metrics.confusion_matrix(np.array([0, 1]), np.array([0, 0]), 2)
  s = metrics.segmentation_scores(cm)
  assert s["iou"] == [0.5, 0.0] and s["miou"] == 0.25 and s["macc"] == 0.5


def test_confusion_matrix_refuses_what_is_not_a_class_map():
  with pytest.raises(UserError, match="shape"):
    metrics.confusion_matrix(np.zeros((2, 2)), np.zeros((2, 3)), 3)
  with pytest.raises(UserError, match="0 … 2"):
    metrics.confusion_matrix(np.zeros((2, 2)), np.full((2, 2), 7), 3)


def test_windows_follow_mmsegs_grid():
  # H=10, crop 6, stride 4: rows (10 − 6 + 3) // 4 + 1 = 2, the last flush with the border
  assert inference.windows((10, 6), (6, 6), (4, 4)) == [(0, 6, 0, 6), (4, 10, 0, 6)]
  assert inference.windows((5, 5), (8, 8), (4, 4)) == [(0, 5, 0, 5)]  # smaller than a crop


def test_sliding_windows_average_a_pixelwise_model_exactly():
  """A model whose logits at a pixel depend on that pixel only: every window agrees, so the
  sliding average equals the whole-image pass, whatever the overlap."""
  image = np.random.default_rng(0).normal(size=(23, 17, 3)).astype(np.float32)
  fn = lambda x: jnp.concatenate([x, -x], axis=-1) * 2.0
  whole = inference.infer(fn, image, "whole")
  np.testing.assert_allclose(inference.infer(fn, image, "slide", (8, 8), (5, 3)), whole, 1e-6)


def test_sliding_windows_sum_and_count_each_pixels_windows():
  """Windows that answer with their own number k = 1 … 4 (10×10 image, crop 6, stride 4:
  rows and columns at 0-6 and 4-10): a pixel gets the mean of the windows covering it."""
  calls = []

  def fn(x):
    calls.append(1)
    return jnp.full(x.shape[:3] + (1,), float(len(calls)))

  out = inference.infer(fn, np.zeros((10, 10, 3), np.float32), "slide", (6, 6), (4, 4))[..., 0]
  # window order: (rows 0-6, cols 0-6) = 1, (0-6, 4-10) = 2, (4-10, 0-6) = 3, (4-10, 4-10) = 4
  assert (out[0, 0], out[0, 9], out[9, 0], out[9, 9]) == (1, 2, 3, 4)
  assert out[0, 5] == 1.5 and out[5, 0] == 2.0 and out[5, 5] == 2.5
  with pytest.raises(UserError, match="0 < stride ≤ crop"):
    inference.infer(fn, np.zeros((10, 10, 3), np.float32), "slide", (6, 6), (7, 7))


def tiny(kind, **extra):
  fields = dict(
    vit=dict(width=32, depth=2, num_heads=2, mlp_dim=64),
    adventurer=dict(width=32, depth=2, headdim=16, d_state=16, chunk_size=16),
  )[kind]
  return models.build(kind, "Ti/4", image_size=32, num_classes=0, **fields, **extra)


@pytest.mark.parametrize("kind", ["vit", "adventurer"])
def test_segmenter_shapes_at_another_size_and_one_window_equals_whole(kind):
  """Logits at the input's size whatever it is (30×45: padded to the patch, cropped back),
  from the UperNet and the linear head; a single sliding window = the whole image."""
  model = Segmenter(
    tiny(kind),
    SegmenterConfig(num_classes=5, channels=16, aux_channels=8, groups=4),
    rngs=nnx.Rngs(0),
  )
  image = np.random.default_rng(1).normal(size=(30, 45, 3)).astype(np.float32)
  fn = inference.forward_fn(model)
  whole = inference.infer(fn, image, "whole")
  assert whole.shape == (30, 45, 5)
  np.testing.assert_allclose(inference.infer(fn, image, "slide", (32, 48), (16, 16)), whole, 1e-5)
  logits, aux = model(jnp.asarray(image[None]))  # the training call: the auxiliary head too
  assert aux.shape == (1, 30, 45, 5)
  np.testing.assert_allclose(np.asarray(logits[0]), whole, atol=1e-5)
  linear = Segmenter(
    tiny(kind), SegmenterConfig(num_classes=5, head="linear", aux_channels=0), rngs=nnx.Rngs(0)
  )
  logits = inference.forward_fn(linear)(jnp.zeros((2, 20, 36, 3)))
  assert logits.shape == (2, 20, 36, 5)


def test_default_depths_are_mmsegs_scaled():
  assert default_out_indices(12) == (3, 5, 7, 11)
  assert default_out_indices(24) == (7, 11, 15, 23)
  assert default_out_indices(4) == (0, 1, 2, 3)


def test_the_ignored_pixels_carry_no_loss():
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(1, 2, 2, 3)), jnp.float32)
  label = jnp.asarray([[[0, 255], [2, 255]]])
  by_hand = -np.mean(
    [
      jnp.log(jnp.exp(logits[0, 0, 0]) / jnp.exp(logits[0, 0, 0]).sum())[0],
      jnp.log(jnp.exp(logits[0, 1, 0]) / jnp.exp(logits[0, 1, 0]).sum())[2],
    ]
  )
  assert float(step.pixel_cross_entropy(logits, label)) == pytest.approx(float(by_hand), 1e-6)


def test_the_metric_contract_reads_from_linearizer_segment():
  """`linearizer.segment.confusion_matrix(pred, label, num_classes, ignore_index=255)` and
  `segmentation_scores(cm)`, where users import them, are the segmentation package's."""
  assert confusion_matrix is metrics.confusion_matrix
  assert segmentation_scores is metrics.segmentation_scores
  cm = confusion_matrix(np.array([1, 0, 1]), np.array([1, 7, 0]), 2, ignore_index=7)
  np.testing.assert_array_equal(cm, [[0, 1], [0, 1]])
  assert segmentation_scores(cm)["aacc"] == 0.5


CM_SHARE = """
import sys
import jax
jax.distributed.initialize(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
import numpy as np
from linearizer.segmentation import metrics, pipeline, scenes
source = scenes.DigitScenes("test", size=32, num_scenes=5, seed=0)
cm = np.zeros((11, 11), np.int64)
for i, image, label in pipeline.eval_items(
  source, process_index=jax.process_index(), process_count=jax.process_count()
):
  cm += metrics.confusion_matrix((image[..., 0] > 100) * (i % 11), label, 11)
cm += 2**33  # counts past int32, as a large eval set's
total = metrics.all_processes_sum(cm)
if jax.process_index() == 0:
  np.save(sys.argv[4], total)
"""


def test_two_processes_count_every_image_once(tmp_path):
  """Each process scores its share (5 images over 2 processes); the sum is the total a
  single pass over all five gives, also for counts past 2**31."""
  source = scenes.DigitScenes("test", size=32, num_scenes=5, seed=0)
  expected = sum(
    metrics.confusion_matrix((image[..., 0] > 100) * (i % 11), label, 11)
    for i, image, label in pipeline.eval_items(source)
  )
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = helpers.env(XLA_FLAGS="")
  out = tmp_path / "cm.npy"
  procs = [
    subprocess.Popen(
      [sys.executable, "-c", CM_SHARE, f"localhost:{port}", "2", str(i), str(out)],
      cwd=ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  logs = [p.communicate(timeout=300)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), logs
  np.testing.assert_array_equal(np.load(out), expected + 2 * 2**33)


def test_poly_schedule_is_mmsegs():
  """Linear warm-up to lr, then lr · (1 − t/T)^power down to min_lr at the stage's end."""
  from configs import common
  from linearizer import optim

  cfg = common.optim(lr=1e-3, min_lr=0.0, warmup_steps=10, schedule="poly", power=1.0)
  lr = optim.schedule(cfg, 110)
  assert float(lr(5)) == pytest.approx(5e-4)
  assert float(lr(10)) == pytest.approx(1e-3)
  assert float(lr(60)) == pytest.approx(5e-4)  # half-way through the 100 decay steps
  assert float(lr(110)) == pytest.approx(0.0, abs=1e-12)


def test_the_recipes_carry_the_mmseg_numbers():
  from configs import segment as segment_config

  ade = segment_config.get_config("setup=ade20k_b16").segment
  assert (ade.steps, ade.batch_size, tuple(ade.data.crop)) == (160_000, 16, (512, 512))
  assert (ade.optim.lr, ade.optim.weight_decay, ade.optim.layer_decay) == (1e-4, 0.05, 0.65)
  assert (ade.optim.warmup_steps, ade.optim.schedule) == (1500, "poly")
  assert (ade.eval.mode, tuple(ade.eval.crop), tuple(ade.eval.stride)) == (
    "slide",
    (512, 512),
    (341, 341),
  )
  assert (ade.head.channels, ade.head.aux_weight) == (768, 0.4)
  assert ade.drop_path == 0.1 and tuple(ade.data.ratio_range) == (0.5, 2.0)
  assert (tuple(ade.data.scale), tuple(ade.eval.scale)) == ((2048, 512), (2048, 512))
  assert (ade.data.cat_max_ratio, ade.head.aux_channels, ade.optim.min_lr) == (0.75, 256, 0.0)
  assert ade.backbones == ()  # the user names them: the demo's would be MNIST models
  cs = segment_config.get_config("setup=cityscapes_b16").segment
  assert (cs.steps, tuple(cs.data.crop), tuple(cs.data.scale)) == (
    80_000,
    (512, 1024),
    (2048, 1024),
  )
  assert cs.data.source.startswith("cityscapes:")
  inference.check_windows(cs.eval.crop, cs.eval.stride)  # every pixel covered
