"""Tests of linearizer.data: sources, transforms, and the train / eval pipelines.

Oracles: the raw datasets re-read here (scikit-learn's digits), files written here with
numpy / PIL, the normalisation formula (v/255 − mean)/std, and the pipelines' own contracts
checked against each other: an uninterrupted iterator is the reference for resumed and
multi-process ones, and the in-process pipeline for the multi-worker one. Epoch coverage
and eval coverage are read off unique labels (label i ⇔ example i).
"""

import logging
import os
import pathlib
import sys
import types

import numpy as np
import pytest
from PIL import Image

from configs import common
from linearizer import data
from linearizer.data import transforms
from linearizer.errors import UserError

SIZE = 16
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


@pytest.fixture
def cfg():
  return common.data("digits", SIZE, crop_scale=(0.6, 1.0), flip=False, crop_fraction=1.0)


def unique_npz(path, n, hw=(12, 12), channels=None, seed=0):
  """An npz source of n distinct random uint8 images with label i for image i."""
  rng = np.random.default_rng(seed)
  shape = (n, *hw) if channels is None else (n, *hw, channels)
  images = rng.integers(0, 256, shape, dtype=np.uint8)
  np.savez(path, images=images, labels=np.arange(n))
  return images


def take(it, n):
  return [next(it) for _ in range(n)]


def train_kw(**kw):
  return dict(dict(global_batch=8, seed=0, mean=MEAN, std=STD), **kw)


# ---------------------------------------------------------------------------------------
# Sources.
# ---------------------------------------------------------------------------------------
def test_digits_split_is_disjoint_and_complete():
  from sklearn.datasets import load_digits

  train, test = data.get_source("digits", "train"), data.get_source("digits", "test")
  assert len(train) + len(test) == 1797
  assert len(test) == int(0.2 * 1797)
  assert train.num_classes == 10

  def rows(images, labels):
    flat = np.concatenate(
      [images.reshape(len(images), -1).astype(np.int64), np.asarray(labels, np.int64)[:, None]], 1
    )
    return flat[np.lexsort(flat.T[::-1])]

  d = load_digits()
  reference = rows(np.round(d.images * 255 / 16), d.target)
  examples = [src[i] for src in (train, test) for i in range(len(src))]
  both = rows(np.stack([im for im, _ in examples])[..., 0], [label for _, label in examples])
  # Same multiset of (image, label) rows: together they cover all 1797 exactly once.
  np.testing.assert_array_equal(both, reference)
  image, label = train[0]
  assert image.shape == (8, 8, 1) and image.dtype == np.uint8 and isinstance(label, int)


def test_mnist_source():
  train, test = data.get_source("mnist", "train"), data.get_source("mnist", "test")
  assert (len(train), len(test)) == (4000, 1000)
  image, label = test[7]
  assert image.shape == (28, 28, 1) and image.dtype == np.uint8
  assert 0 <= label < 10
  assert train.num_classes == 10
  assert max(train[i][0].max() for i in range(10)) > 200  # real strokes, not an empty array


@pytest.mark.parametrize("kind", ["npz", "folder"])
def test_a_source_without_splits_is_never_evaluated_on_its_training_images(tmp_path, folder, kind):
  """No eval_source: npz:/folder: are split as the built-ins are (fixed, test_fraction held
  out, disjoint); with an eval_source, both stay whole. Images are told apart by content."""
  if kind == "npz":
    unique_npz(tmp_path / "d.npz", 50)
    source = f"npz:{tmp_path / 'd.npz'}"
  else:
    source = f"folder:{folder[0]}"
  whole = data.get_source(source)
  key = lambda src: {src[i][0].tobytes() for i in range(len(src))}
  cfg = common.data(source, SIZE, test_fraction=0.25)
  train, test = data.train_source(cfg), data.eval_source(cfg)
  assert len(test) == int(0.25 * len(whole)) and len(train) + len(test) == len(whole)
  assert not key(train) & key(test) and key(train) | key(test) == key(whole)
  assert train.num_classes == test.num_classes == whole.num_classes
  again = data.eval_source(cfg)  # fixed: the same split every time
  assert [again[i][1] for i in range(len(again))] == [test[i][1] for i in range(len(test))]
  cfg = common.data(source, SIZE, eval_source=source)
  assert len(data.train_source(cfg)) == len(data.eval_source(cfg)) == len(whole)


def test_the_digits_split_is_what_it_was():
  """The built-ins' split is unchanged by the generalisation (the demo's figures rely on it)."""
  from sklearn.datasets import load_digits

  d = load_digits()
  order = np.random.default_rng(0).permutation(1797)
  test = data.eval_source(common.data("digits", SIZE))
  for i in (0, 100, 358):
    np.testing.assert_array_equal(test[i][0][..., 0], np.round(d.images[order[i]] * 255 / 16))
    assert test[i][1] == d.target[order[i]]


@pytest.mark.parametrize("channels", [None, 1, 3])
def test_npz_source(tmp_path, channels):
  path = tmp_path / "d.npz"
  images = unique_npz(path, 6, hw=(10, 14), channels=channels)
  src = data.get_source(f"npz:{path}")
  assert len(src) == 6 and src.num_classes == 6
  image, label = src[4]
  assert label == 4
  expected = images[4] if channels is not None else images[4][..., None]
  np.testing.assert_array_equal(image, expected)


def write_npz(path, **arrays):
  np.savez(path, **arrays)
  return f"npz:{path}"


@pytest.mark.parametrize(
  "case, arrays, words",
  [
    ("float", dict(images=np.zeros((3, 8, 8, 3), np.float32), labels=np.arange(3)), "uint8"),
    ("2 channels", dict(images=np.zeros((3, 8, 8, 2), np.uint8), labels=np.arange(3)), "channels"),
    ("4 channels", dict(images=np.zeros((3, 8, 8, 4), np.uint8), labels=np.arange(3)), "channels"),
    ("5-d", dict(images=np.zeros((3, 2, 8, 8, 3), np.uint8), labels=np.arange(3)), "NHWC"),
    ("labels", dict(images=np.zeros((3, 8, 8, 3), np.uint8), labels=np.arange(4)), "labels"),
    ("empty", dict(images=np.zeros((0, 8, 8, 3), np.uint8), labels=np.arange(0)), "0 images"),
    ("no labels", dict(images=np.zeros((3, 8, 8, 3), np.uint8)), "labels"),
    ("no images", dict(pixels=np.zeros((3, 8, 8, 3), np.uint8), labels=np.arange(3)), "images"),
    ("label -1", dict(images=np.zeros((3, 8, 8, 3), np.uint8), labels=[0, -1, 2]), "0 … C−1"),
    ("NaN label", dict(images=np.zeros((3, 8, 8, 3), np.uint8), labels=[0, np.nan, 2]), "float"),
    (
      "float labels",
      dict(images=np.zeros((3, 8, 8, 3), np.uint8), labels=[0.0, 1.5, 2.0]),
      "integer",
    ),
    (
      "2-D labels",
      dict(images=np.zeros((3, 8, 8, 3), np.uint8), labels=np.zeros((3, 2), int)),
      "1-D",
    ),
    ("sparse ids", dict(images=np.zeros((3, 8, 8, 3), np.uint8), labels=[0, 7, 10**6]), "remap"),
  ],
)
def test_npz_bad_input(tmp_path, case, arrays, words):
  del case
  path = tmp_path / "bad.npz"
  name = write_npz(path, **arrays)
  with pytest.raises(ValueError) as e:
    data.get_source(name)
  assert str(path) in str(e.value)
  assert words in str(e.value)


def test_npz_missing_file(tmp_path):
  path = tmp_path / "nowhere.npz"
  with pytest.raises(ValueError, match="does not exist") as e:
    data.get_source(f"npz:{path}")
  assert str(path) in str(e.value)


@pytest.mark.parametrize("content", ["garbage", "npy"])
def test_npz_not_an_archive(tmp_path, content):
  path = tmp_path / "bad.npz"
  if content == "garbage":
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 200, dtype=np.uint8).tobytes())
  else:  # a single array saved with np.save under an .npz name
    with open(path, "wb") as f:
      np.save(f, np.zeros((3, 8, 8), np.uint8))
  with pytest.raises(ValueError) as e:
    data.get_source(f"npz:{path}")
  assert str(path) in str(e.value)


@pytest.fixture
def folder(tmp_path):
  """root/{zebra,ant,mole}/: PNG and JPEG files (created in unsorted order)."""
  root = tmp_path / "imgs"
  rng = np.random.default_rng(0)
  written = {}
  for cls, names in [
    ("zebra", ["b.png", "a.jpg"]),
    ("ant", ["x.png"]),
    ("mole", ["m1.jpeg", "m2.PNG", "notes.txt"]),
  ]:
    (root / cls).mkdir(parents=True)
    for name in names:
      path = root / cls / name
      if name.endswith(".txt"):
        path.write_text("not an image")
        continue
      array = rng.integers(0, 256, (9 + len(written), 11, 3), dtype=np.uint8)
      Image.fromarray(array).save(path, format="PNG" if name.lower().endswith("png") else "JPEG")
      written[str(path)] = array
  return root, written


def test_folder_source(folder):
  root, written = folder
  src = data.get_source(f"folder:{root}")
  assert src.classes == ["ant", "mole", "zebra"]
  assert src.num_classes == 3
  files = [(os.path.relpath(p, root), k) for p, k in src.files]
  # Sorted classes, sorted files, non-images ignored; label = index of the class.
  assert files == [
    ("ant/x.png", 0),
    ("mole/m1.jpeg", 1),
    ("mole/m2.PNG", 1),
    ("zebra/a.jpg", 2),
    ("zebra/b.png", 2),
  ]
  for i, (path, label) in enumerate(src.files):
    image, got_label = src[i]
    assert got_label == label
    assert image.dtype == np.uint8 and image.shape == written[path].shape
    if path.lower().endswith(".png"):  # lossless
      np.testing.assert_array_equal(image, written[path])


def test_folder_grayscale_becomes_rgb(tmp_path):
  (tmp_path / "c").mkdir()
  gray = np.arange(64, dtype=np.uint8).reshape(8, 8)
  Image.fromarray(gray, mode="L").save(tmp_path / "c" / "g.png")
  image, _ = data.get_source(f"folder:{tmp_path}")[0]
  assert image.shape == (8, 8, 3)
  for c in range(3):
    np.testing.assert_array_equal(image[..., c], gray)


def test_folder_corrupted_file_is_skipped(folder, caplog):
  root, written = folder
  bad = root / "mole" / "m0.png"  # sorts first in its class
  bad.write_bytes(np.random.default_rng(1).integers(0, 256, 300, dtype=np.uint8).tobytes())
  src = data.get_source(f"folder:{root}")
  i = [p for p, _ in src.files].index(str(bad))
  with caplog.at_level(logging.WARNING):
    image, label = src[i]
  assert any(str(bad) in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records), [
    r.getMessage() for r in caplog.records
  ]
  # Replaced by the next readable file: same shape of output, a real image.
  next_path, next_label = src.files[i + 1]
  assert label == next_label
  assert next_path.endswith("m1.jpeg")  # lossy: compare with PIL's own decoding
  with Image.open(next_path) as im:
    np.testing.assert_array_equal(image, np.asarray(im.convert("RGB")))
  assert image.shape == written[next_path].shape
  # The pipeline keeps going through it: every eval batch is full-shaped.
  cfg = common.data(f"folder:{root}", SIZE, crop_fraction=1.0)
  batches = list(data.eval_batches(src, cfg, batch_size=4, mean=MEAN, std=STD))
  assert sum(b.valid.sum() for b in batches) == len(src)
  assert all(b.image.shape == (4, SIZE, SIZE, 3) for b in batches)


def test_folder_errors(tmp_path):
  with pytest.raises(ValueError, match="does not exist") as e:
    data.get_source(f"folder:{tmp_path / 'missing'}")
  assert str(tmp_path / "missing") in str(e.value)
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(ValueError, match="no images") as e:
    data.get_source(f"folder:{empty}")
  assert str(empty) in str(e.value)
  (empty / "cls").mkdir()
  (empty / "cls" / "readme.txt").write_text("no images here")
  with pytest.raises(ValueError, match="no images"):
    data.get_source(f"folder:{empty}")


def test_folder_all_unreadable(tmp_path):
  (tmp_path / "c").mkdir()
  (tmp_path / "c" / "a.png").write_bytes(b"garbage")
  with pytest.raises(ValueError, match="no readable image"):
    data.get_source(f"folder:{tmp_path}")[0]


@pytest.mark.parametrize("name", ["imagenet", "csv:foo.csv", "", "digitz"])
def test_unknown_source(name):
  with pytest.raises(ValueError, match="Unknown data source"):
    data.get_source(name)


# ---------------------------------------------------------------------------------------
# train_batches.
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits():
  return data.get_source("digits", "train")


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x.image, y.image)
    np.testing.assert_array_equal(x.label, y.label)


def test_train_batches_shape_and_determinism(digits, cfg):
  a = take(data.train_batches(digits, cfg, **train_kw()), 3)
  b = take(data.train_batches(digits, cfg, **train_kw()), 3)
  assert_batches_equal(a, b)
  batch = a[0]
  assert batch.image.shape == (8, SIZE, SIZE, 3) and batch.image.dtype == np.float32
  assert batch.label.shape == (8,) and batch.label.dtype == np.int32
  assert isinstance(batch, data.Batch) and batch.valid is None  # training: every row real
  assert np.isfinite(batch.image).all()
  # Grayscale input: the three channels are one image (up to the per-channel normalisation).
  raw = batch.image * np.asarray(STD) + np.asarray(MEAN)
  np.testing.assert_allclose(raw[..., 0], raw[..., 1], atol=1e-5)
  np.testing.assert_allclose(raw[..., 0], raw[..., 2], atol=1e-5)
  # Consecutive batches differ.
  assert not np.array_equal(a[0].image, a[1].image)
  # Another seed: another order and other crops.
  c = take(data.train_batches(digits, cfg, **train_kw(seed=1)), 3)
  assert not np.array_equal(a[0].image, c[0].image)
  assert any(not np.array_equal(x.label, y.label) for x, y in zip(a, c))


@pytest.mark.parametrize("k", [1, 5])
def test_train_batches_resume(digits, cfg, k):
  full = take(data.train_batches(digits, cfg, **train_kw()), k + 2)
  resumed = take(data.train_batches(digits, cfg, **train_kw(start_step=k)), 2)
  assert_batches_equal(resumed, full[k:])


def test_train_batches_process_split(digits, cfg):
  whole = take(data.train_batches(digits, cfg, **train_kw()), 3)
  for p in range(2):
    part = take(data.train_batches(digits, cfg, **train_kw(process_index=p, process_count=2)), 3)
    for w, q in zip(whole, part):
      assert q.image.shape == (4, SIZE, SIZE, 3)
      np.testing.assert_array_equal(q.image, w.image[p * 4 : (p + 1) * 4])
      np.testing.assert_array_equal(q.label, w.label[p * 4 : (p + 1) * 4])
  # Resumed and split at once.
  part = take(
    data.train_batches(digits, cfg, **train_kw(process_index=1, process_count=2, start_step=2)), 1
  )[0]
  np.testing.assert_array_equal(part.image, whole[2].image[4:])


def test_train_batches_indivisible_batch(digits, cfg):
  with pytest.raises(ValueError, match="does not split"):
    data.train_batches(digits, cfg, **train_kw(global_batch=6, process_count=4))


def test_train_batches_epochs(tmp_path, cfg):
  n, batch = 10, 4
  unique_npz(tmp_path / "u.npz", n, hw=(20, 20), channels=3)
  src = data.get_source(f"npz:{tmp_path / 'u.npz'}")
  batches = take(data.train_batches(src, cfg, **train_kw(global_batch=batch)), 3 * n // batch + 1)
  stream = np.concatenate([b.label for b in batches])
  epochs = [stream[e * n : (e + 1) * n] for e in range(3)]
  for order in epochs:  # every example exactly once per epoch, across batch boundaries
    assert sorted(order.tolist()) == list(range(n))
  assert not np.array_equal(epochs[0], np.arange(n))  # shuffled
  assert not np.array_equal(epochs[0], epochs[1])  # reshuffled each epoch


def test_train_transform_per_example_rng(tmp_path, cfg):
  """The same example in two epochs gets different augmentations (its rng follows the
  global index, not the example)."""
  unique_npz(tmp_path / "u.npz", 4, hw=(20, 20), channels=3)
  src = data.get_source(f"npz:{tmp_path / 'u.npz'}")
  a, b = take(data.train_batches(src, cfg, **train_kw(global_batch=4)), 2)
  first = a.image[np.argsort(a.label)]
  second = b.image[np.argsort(b.label)]
  assert not np.array_equal(first, second)


def test_train_batches_workers_match_in_process(digits, cfg):
  reference = take(data.train_batches(digits, cfg, **train_kw(start_step=3)), 3)
  it = data.train_batches(digits, data.override(cfg, workers=2), **train_kw(start_step=3))
  assert_batches_equal(take(it, 3), reference)
  del it


# ---------------------------------------------------------------------------------------
# Transform and eval_batches.
# ---------------------------------------------------------------------------------------
def test_eval_normalisation_of_constant_image(cfg):
  transform = data.Transform(cfg, False, MEAN, STD)
  for image in (
    np.full((8, 8), 128, np.uint8),
    np.full((12, 9, 1), 128, np.uint8),
    np.full((20, 20, 3), 128, np.uint8),
  ):
    out = transform(image, None)
    assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.float32
    expected = (128 / 255 - np.asarray(MEAN)) / np.asarray(STD)
    np.testing.assert_allclose(out, np.broadcast_to(expected, out.shape), rtol=1e-5, atol=1e-6)


def test_grayscale_replicated_to_three_channels(cfg):
  gray = np.random.default_rng(0).integers(0, 256, (13, 13), dtype=np.uint8)
  rgb = np.repeat(gray[..., None], 3, -1)
  for train in (False, True):
    transform = data.Transform(cfg, train, MEAN, STD)
    a = transform(gray, np.random.default_rng(3))
    b = transform(gray[..., None], np.random.default_rng(3))
    c = transform(rgb, np.random.default_rng(3))
    np.testing.assert_array_equal(a, c)
    np.testing.assert_array_equal(b, c)


def eval_source(tmp_path, n):
  unique_npz(tmp_path / "e.npz", n, hw=(16, 16), channels=3)
  return data.get_source(f"npz:{tmp_path / 'e.npz'}")


def test_eval_batches_single_process(tmp_path, cfg):
  src = eval_source(tmp_path, 11)
  batches = list(data.eval_batches(src, cfg, batch_size=4, mean=MEAN, std=STD))
  assert len(batches) == 3
  for b in batches:
    assert isinstance(b, data.Batch)
    assert b.image.shape == (4, SIZE, SIZE, 3) and b.image.dtype == np.float32
  labels = np.concatenate([b.label[b.valid] for b in batches])
  np.testing.assert_array_equal(labels, np.arange(11))  # in order, each once
  last = batches[-1]
  np.testing.assert_array_equal(last.valid, [True, True, True, False])
  assert not last.image[3].any() and last.label[3] == 0
  # The rows are the eval transform of the source images.
  transform = data.Transform(cfg, False, MEAN, STD)
  np.testing.assert_array_equal(batches[2].image[1], transform(src[9][0], None))
  # limit: only the first examples.
  limited = list(data.eval_batches(src, cfg, batch_size=4, mean=MEAN, std=STD, limit=5))
  assert len(limited) == 2
  np.testing.assert_array_equal(np.concatenate([b.label[b.valid] for b in limited]), np.arange(5))


@pytest.mark.parametrize("n, processes, batch", [(11, 2, 3), (10, 3, 2), (7, 4, 4), (2, 3, 1)])
def test_eval_batches_process_split(tmp_path, cfg, n, processes, batch):
  src = eval_source(tmp_path, n)
  per_process = [
    list(
      data.eval_batches(
        src, cfg, batch_size=batch, mean=MEAN, std=STD, process_index=p, process_count=processes
      )
    )
    for p in range(processes)
  ]
  counts = {len(b) for b in per_process}
  assert len(counts) == 1 and counts.pop() >= 1  # same number of steps on every process
  seen = []
  for batches in per_process:
    for b in batches:
      assert b.image.shape == (batch, SIZE, SIZE, 3)
      seen.extend(b.label[b.valid].tolist())
      assert not b.image[~b.valid].any()
  assert sorted(seen) == list(range(n))  # everything, once


# ---------------------------------------------------------------------------------------
# Augmentations.
# ---------------------------------------------------------------------------------------
def test_random_resized_crop_size():
  rng = np.random.default_rng(0)
  for w, h in [(32, 32), (40, 17), (5, 60), (3, 3)]:
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    for _ in range(5):
      assert data.random_resized_crop(img, 16, (0.08, 1.0), rng).size == (16, 16)


def test_random_resized_crop_full_area_is_resize():
  """scale=(1,1) and aspect 1 on a square image: the crop is the whole image."""
  img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8))
  out = data.random_resized_crop(img, 16, (1.0, 1.0), np.random.default_rng(0), ratio=(1, 1))
  np.testing.assert_array_equal(np.asarray(out), np.asarray(img.resize((16, 16), Image.BICUBIC)))


def test_center_crop_geometry():
  # Columns numbered 0..31 on a 32 wide × 16 high image.
  cols = np.tile(np.arange(32, dtype=np.uint8) * 8, (16, 1))
  img = Image.fromarray(np.stack([cols] * 3, -1))
  # crop_fraction 1: the short side is already 16, so no resize: the central 16 columns.
  out = np.asarray(data.center_crop(img, 16, 1.0))
  np.testing.assert_array_equal(out, np.asarray(img)[:, 8:24])
  # crop_fraction 0.5 on 32×32: the central half.
  sq = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
  out = np.asarray(data.center_crop(Image.fromarray(sq), 16, 0.5))
  np.testing.assert_array_equal(out, sq[8:24, 8:24])
  # Any input: size × size out.
  for w, h in [(100, 50), (50, 100), (7, 9), (16, 16)]:
    img = Image.new("RGB", (w, h))
    assert data.center_crop(img, 16, 0.875).size == (16, 16)


def test_center_crop_is_central():
  """A bright square in the middle of a big image stays in the middle after the crop."""
  a = np.zeros((64, 96, 3), np.uint8)
  a[24:40, 40:56] = 255
  out = np.asarray(data.center_crop(Image.fromarray(a), 16, 0.5))  # short side 64 → 32
  ys, xs = np.nonzero(out[..., 0] > 128)
  assert abs(ys.mean() - 7.5) < 0.6 and abs(xs.mean() - 7.5) < 0.6
  assert 6 <= len(set(ys)) <= 10


FILL = (10, 200, 30)


@pytest.mark.parametrize("op", sorted(data.RANDAUG_OPS))
def test_rand_augment_ops(op):
  img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8))
  for m in (-0.9, 0.0, 0.5, 1.0):
    out = data.RANDAUG_OPS[op](img, m, FILL)
    assert out.size == img.size and out.mode == "RGB"


@pytest.mark.parametrize("axis", [0, 1])
def test_translate_is_relative_to_its_own_axis(axis):
  """TranslateX moves by 0.45·m·width columns, TranslateY by 0.45·m·height rows, filling
  with the given (mean) colour."""
  a = np.random.default_rng(0).integers(0, 256, (40, 20, 3), dtype=np.uint8)  # h=40, w=20
  op = data.RANDAUG_OPS["TranslateX" if axis == 0 else "TranslateY"]
  out = np.asarray(op(Image.fromarray(a), 1.0, FILL))
  shift = round(0.45 * (20, 40)[axis])  # 9 columns or 18 rows; content moves left / up
  if axis == 0:
    np.testing.assert_array_equal(out[:, : 20 - shift], a[:, shift:])
    assert (out[:, 20 - shift :] == FILL).all()
  else:
    np.testing.assert_array_equal(out[: 40 - shift], a[shift:])
    assert (out[40 - shift :] == FILL).all()


def test_posterize_keeps_four_minus_int_4m_bits():
  """timm's PosterizeIncreasing: 4 - int(4m) bits, so m9 (0.9) keeps 1 bit and m0 keeps 4."""
  a = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, -1)
  for m, bits in ((0.0, 4), (0.3, 3), (0.9, 1), (1.0, 0)):
    out = np.asarray(data.RANDAUG_OPS["Posterize"](Image.fromarray(a), m, FILL))
    assert len(np.unique(out)) == 2**bits, (m, bits)
    np.testing.assert_array_equal(out, a.astype(int) // 2 ** (8 - bits) * 2 ** (8 - bits))


def test_rand_augment_applies_each_op_with_probability_half(monkeypatch):
  """Two ops are drawn per image; each runs with p = 0.5 (timm's default prob)."""
  calls = []
  monkeypatch.setattr(
    transforms, "RANDAUG_OPS", {n: (lambda im, m, fill, n=n: calls.append(n) or im) for n in "ab"}
  )
  rng, n = np.random.default_rng(0), 4000
  for _ in range(n):
    data.rand_augment(None, rng)
  # 2n Bernoulli(0.5) trials: 2000 ± 32 (1 sigma); 5 sigma either side.
  assert abs(len(calls) - n) < 5 * np.sqrt(2 * n * 0.25)
  assert abs(calls.count("a") - calls.count("b")) < 5 * np.sqrt(2 * n * 0.25)


def test_train_transform_fills_with_the_mean_colour(cfg, monkeypatch):
  """RandAugment's fill is the normalisation mean in 0-255 (timm's img_mean)."""
  seen = []
  monkeypatch.setattr(transforms, "rand_augment", lambda img, rng, fill: seen.append(fill) or img)
  aug = data.override(cfg, randaugment=True)
  transform = data.Transform(aug, True, (0.5, 0.25, 1.0), STD)
  transform(np.zeros((20, 20, 3), np.uint8), np.random.default_rng(0))
  assert seen == [(128, 64, 255)]


def test_rand_augment_and_train_transform(cfg):
  img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8))
  for seed in range(10):
    out = data.rand_augment(img, np.random.default_rng(seed), FILL)
    assert out.size == img.size and out.mode == "RGB"
  aug = data.override(cfg, randaugment=True, flip=True)
  transform = data.Transform(aug, True, MEAN, STD)
  image = np.asarray(img)
  a = transform(image, np.random.default_rng(5))
  assert a.shape == (SIZE, SIZE, 3) and a.dtype == np.float32
  np.testing.assert_array_equal(a, transform(image, np.random.default_rng(5)))
  assert not np.array_equal(a, transform(image, np.random.default_rng(6)))


class FakeTfds:
  """Stands in for `tensorflow_datasets` (no prepared dataset here): `data_source` over
  in-memory splits whose labels are the example ids, with a 7-class label feature."""

  SPLITS = {"train": [1, 2, 3], "validation": [4, 5], "test": [6]}

  def __init__(self):
    self.asked = []

  def data_source(self, name, split, data_dir):
    self.asked.append(split)
    rows = _TfdsRows(
      {"image": np.full((4, 4, 3), i, np.uint8), "label": i} for i in self.SPLITS[split]
    )
    rows.dataset_info = types.SimpleNamespace(
      features={"label": types.SimpleNamespace(num_classes=7)}
    )
    return rows


class _TfdsRows(list):
  dataset_info = None


def test_tfds_splits_and_classes(monkeypatch):
  """tfds: train on 'train', evaluate on 'validation' (of the source, or of an eval_source
  that names no split: never its 'train'); a source naming its split needs an eval_source;
  the class count comes from the dataset's label feature."""
  fake = FakeTfds()
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
  labels = lambda src: [src[i][1] for i in range(len(src))]
  cfg = common.data("tfds:fake", SIZE)
  train = data.train_source(cfg)
  assert labels(train) == [1, 2, 3] and train.num_classes == 7
  assert labels(data.eval_source(cfg)) == [4, 5]
  assert labels(data.eval_source(common.data("tfds:a", SIZE, eval_source="tfds:b"))) == [4, 5]
  assert labels(data.eval_source(common.data("tfds:a", SIZE, eval_source="tfds:b:test"))) == [6]
  with pytest.raises(UserError, match="names its tfds split"):
    data.eval_source(common.data("tfds:fake:train", SIZE))
  fake.SPLITS = dict(fake.SPLITS, train=[1, 9, 3])  # 9 is outside the 7 classes
  with pytest.raises(UserError, match="example 1 has label 9, outside 0 … 6"):
    data.train_source(common.data("tfds:fake", SIZE))[1]


def test_an_unreadable_file_is_replaced_from_its_own_split(tmp_path):
  """A corrupt held-out image is replaced by another held-out one, never a training image."""
  rng = np.random.default_rng(0)
  for k in range(8):
    (tmp_path / f"c{k % 2}").mkdir(exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(
      tmp_path / f"c{k % 2}" / f"{k}.png"
    )
  cfg = common.data(f"folder:{tmp_path}", SIZE, test_fraction=0.5)
  test, train = data.eval_source(cfg), data.train_source(cfg)
  held_out = {test[i][0].tobytes() for i in range(len(test))}
  (pathlib.Path(test.files[0][0])).write_bytes(b"garbage")
  seen = {test[i][0].tobytes() for i in range(len(test))}
  assert seen <= held_out and not seen & {train[i][0].tobytes() for i in range(len(train))}


def test_num_classes_below_the_labels_is_refused(tmp_path):
  """data.num_classes=5 on 10-class data would train a 5-way head and drop half the targets."""
  source = data.get_source("digits", "train")
  with pytest.raises(UserError, match="data.num_classes=5.*up to 9"):
    data.num_classes(common.data("digits", SIZE, num_classes=5), source)
  assert data.num_classes(common.data("digits", SIZE, num_classes=12), source) == 12


def test_16_bit_greyscale_png_is_scaled_not_clipped(tmp_path):
  """A 16-bit PNG's 0 … 65535 become 0 … 255 (PIL's convert('RGB') clipped them to 255)."""
  (tmp_path / "c").mkdir()
  values = np.array([[0, 257, 32896], [65535, 1000, 60000]], np.uint16)
  Image.fromarray(values).save(tmp_path / "c" / "deep.png")
  assert Image.open(tmp_path / "c" / "deep.png").mode.startswith("I")  # the premise
  image, _ = data.get_source(f"folder:{tmp_path}")[0]
  np.testing.assert_array_equal(image[..., 0], np.round(values / 257).astype(np.uint8))
  assert image.shape == (2, 3, 3) and image.dtype == np.uint8


def test_an_unreadable_image_is_reported_once(tmp_path, caplog):
  (tmp_path / "c").mkdir()
  Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "c" / "a.png")
  (tmp_path / "c" / "b.png").write_bytes(b"garbage")
  src = data.get_source(f"folder:{tmp_path}")
  with caplog.at_level(logging.WARNING):
    for _ in range(5):
      src[1]
  assert sum("b.png" in r.getMessage() for r in caplog.records) == 1


def test_an_eval_folder_with_some_of_the_classes_is_numbered_by_name(tmp_path):
  """Train on classes 0, 1, 2; an eval folder holding only '2' labels it 2 (it got 0 before,
  its own numbering); an eval class the training data lacks is refused."""
  for root, names in (("train", "012"), ("val", "2"), ("odd", "27")):
    for name in names:
      (tmp_path / root / name).mkdir(parents=True)
      Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / root / name / "x.png")
  cfg = common.data(f"folder:{tmp_path / 'train'}", SIZE, eval_source=f"folder:{tmp_path / 'val'}")
  test = data.eval_source(cfg)
  assert test[0][1] == 2 and test.num_classes == 3
  cfg = common.data(f"folder:{tmp_path / 'train'}", SIZE, eval_source=f"folder:{tmp_path / 'odd'}")
  with pytest.raises(UserError, match=r"classes \['7'\] that the training data does not have"):
    data.eval_source(cfg)
