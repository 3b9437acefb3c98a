"""The one training stream (`data.stream`) that classification's and segmentation's train
batches share: pinned against a reference built by hand from what the stream documents.

Oracles: global example g is source item `order[g]`, `order` being grain's
`MapDataset.range(n).shuffle(seed=seed).repeat()`, through the per-example transform with
`np.random.default_rng([seed, g])`; rows [p·b, (p+1)·b) of a global batch are process p's.
Each path is compared with that reference built from its own transform, and the two paths
are checked to draw the same example order for one seed (sources whose labels are their
indices), so a copy of the stream that drifted in either package would fail here.
"""

import grain
import numpy as np
import pytest

from configs import common
from linearizer import data
from linearizer.segmentation import pipeline, scenes

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SEED, GLOBAL = 7, 6


def take(it, n):
  return [next(it) for _ in range(n)]


def reference(source, transform, steps, *, seed=SEED, global_batch=GLOBAL, rows=None):
  """The batches the stream documents, by hand: [(images, labels)] of `steps` steps, only
  the global batch rows `rows` (default all)."""
  order = grain.MapDataset.range(len(source)).shuffle(seed=seed).repeat()
  out = []
  for step in range(steps):
    examples = []
    for row in rows or range(global_batch):
      g = step * global_batch + row
      image, label = source[order[g]]
      examples.append(transform(image, label, np.random.default_rng([seed, g])))
    out.append((np.stack([e[0] for e in examples]), np.stack([e[1] for e in examples])))
  return out


def assert_same(batches, expected):
  assert len(batches) == len(expected)
  for batch, (images, labels) in zip(batches, expected):
    assert batch.image.dtype == images.dtype and batch.label.dtype == np.int32
    np.testing.assert_array_equal(batch.image, images)
    np.testing.assert_array_equal(batch.label, labels.astype(np.int32))
    assert batch.valid is None


@pytest.fixture(scope="module")
def digits():
  return data.get_source("digits", "train")


def classification_cfg():
  return common.data("digits", 16, crop_scale=(0.3, 1.0), flip=True, randaugment=True)


@pytest.mark.parametrize("process_index", [0, 1])
def test_classification_batches_are_the_documented_stream(digits, process_index):
  cfg = classification_cfg()
  transform = data.Transform(cfg, True, MEAN, STD)
  per_image = lambda image, label, rng: (transform(image, rng), label)
  half = GLOBAL // 2
  rows = range(process_index * half, (process_index + 1) * half)
  got = data.train_batches(
    digits, cfg, global_batch=GLOBAL, seed=SEED, mean=MEAN, std=STD,
    process_index=process_index, process_count=2,
  )  # fmt: skip
  assert_same(take(got, 3), reference(digits, per_image, 3, rows=rows))


SEG = dict(crop=(24, 24), scale=(48, 24), cat_max_ratio=0.75, flip=True, photometric=True)


@pytest.mark.parametrize("process_index", [0, 1])
def test_segmentation_batches_are_the_documented_stream(process_index):
  source = scenes.DigitScenes("train", size=32, num_scenes=9)
  crop = SEG["crop"]
  transform = pipeline.SegTransform(
    MEAN, STD, crop, **{k: v for k, v in SEG.items() if k != "crop"}, ratio_range=(0.5, 2.0)
  )
  half = GLOBAL // 2
  rows = range(process_index * half, (process_index + 1) * half)
  got = pipeline.train_batches(
    source, global_batch=GLOBAL, seed=SEED, mean=MEAN, std=STD,
    process_index=process_index, process_count=2, **SEG,
  )  # fmt: skip
  assert_same(take(got, 3), reference(source, transform, 3, rows=rows))


class Indexed:
  """n segmentation examples whose image and label map are filled with their index."""

  num_classes, name = 40, "indexed"

  def __len__(self):
    return 40

  def __getitem__(self, i):
    return np.full((8, 8, 3), i, np.uint8), np.full((8, 8), i, np.uint8)


def test_both_paths_draw_the_same_example_order():
  """Classification and segmentation batches of one seed are the same source items, in the
  same order, as grain's shuffle gives: the labels are the items' indices."""
  n, steps = len(Indexed()), 9  # past an epoch: the second epoch's shuffle too
  images = np.stack([np.full((8, 8), i, np.uint8) for i in range(n)])
  cls = data.train_batches(
    data.ArraySource(images, np.arange(n), "indexed"), common.data("digits", 8),
    global_batch=GLOBAL, seed=SEED, mean=MEAN, std=STD,
  )  # fmt: skip
  cls_order = np.concatenate([b.label for b in take(cls, steps)])
  seg = pipeline.train_batches(
    Indexed(), crop=(8, 8), scale=(8, 8), ratio_range=(1.0, 1.0), cat_max_ratio=1.0,
    global_batch=GLOBAL, seed=SEED, mean=MEAN, std=STD,
  )  # fmt: skip
  seg_order = np.array([b.max() for batch in take(seg, steps) for b in batch.label])
  order = grain.MapDataset.range(n).shuffle(seed=SEED).repeat()
  expected = np.array([order[g] for g in range(steps * GLOBAL)])
  np.testing.assert_array_equal(cls_order, expected)
  np.testing.assert_array_equal(seg_order, expected)
  assert sorted(expected[:n]) == list(range(n))  # an epoch is a permutation
  assert not np.array_equal(expected[:n], np.arange(n))  # and shuffled
