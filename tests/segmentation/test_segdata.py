"""Tests of the segmentation data: its sources and digit scenes, mmseg's augmentation, the
pipelines (linearizer.segmentation.sources, scenes, augment, pipeline).

Oracles: MNIST's own labels and data.split_index (which digits a scene may use), files
written here with PIL (the readers' mappings checked value by value against the published
tables), images whose pixel colours encode their labels or their coordinates (alignment of
image and label through augment), an exhaustive count of the crops that satisfy
cat_max_ratio (mmseg's retry rule), and the pipelines' own contracts checked against each
other (an uninterrupted single-process stream is the reference).
"""

import pickle
import shutil
import sys

import ml_collections
import numpy as np
import pytest
from PIL import Image, ImageFilter

from configs import segment as segment_config
from linearizer import data
from linearizer.errors import MissingPathError, UserError
from linearizer.segmentation import augment, pipeline, scenes, sources
from linearizer.segmentation import stage as seg_stage

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def png(path, array, mode=None):
  """Writes `array` as a PNG (mode 'P': a palette image whose indices are the values)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  array = np.asarray(array, np.uint8)
  if mode == "P":
    im = Image.frombytes("P", array.shape[::-1], array.tobytes())
    im.putpalette(list(np.random.default_rng(0).integers(0, 256, 768)))  # colours ≠ indices
  else:
    im = Image.fromarray(array)
  im.save(path)
  return path


def rgb(h=8, w=12, value=0):
  return np.full((h, w, 3), value, np.uint8)


# ---------------------------------------------------------------------------------------
# DigitScenes.
# ---------------------------------------------------------------------------------------
def test_digit_scenes_are_a_function_of_seed_split_and_index():
  a = scenes.DigitScenes("train", size=64, num_scenes=10)
  forward = [a[i] for i in range(6)]
  fresh = scenes.DigitScenes("train", size=64, num_scenes=10)
  backward = {i: fresh[i] for i in (5, 3, 1, 4, 0, 2)}
  for i, (image, label) in enumerate(forward):
    np.testing.assert_array_equal(image, backward[i][0])
    np.testing.assert_array_equal(label, backward[i][1])
    np.testing.assert_array_equal(image, a[i][0])  # again, from the same object
  other = scenes.DigitScenes("train", size=64, num_scenes=10, seed=1)
  assert not np.array_equal(other[0][0], forward[0][0])
  assert not np.array_equal(a[0][0], a[1][0])
  assert len(a) == 10
  assert (len(scenes.DigitScenes("train")), len(scenes.DigitScenes("test"))) == (2000, 200)


def test_digit_count_and_side_follow_the_config():
  """segment.data.digits / digit_side reach the scenes: every layout has a count and sides
  in the asked ranges (side = round(canvas × fraction)), through the stage's source."""
  config = ml_collections.ConfigDict(segment_config.get_config("smoke").to_dict())
  config.segment.data.canvas = 64
  config.segment.data.digit_count, config.segment.data.digit_side = (1, 2), (0.4, 0.45)
  train, _ = seg_stage.sources(config)
  layouts = [train.layout(i) for i in range(len(train))]
  assert {len(lay) for lay in layouts} == {1, 2}
  assert all(26 <= side <= 29 for lay in layouts for _, (_, _, side) in lay)
  default = scenes.DigitScenes("train", size=64, num_scenes=20)
  assert max(len(default.layout(i)) for i in range(20)) > 2  # (2, 4) by default


def test_digit_scenes_train_and_test_use_disjoint_mnist_images():
  train = scenes.DigitScenes("train", size=64, num_scenes=60)
  test = scenes.DigitScenes("test", size=64, num_scenes=60)
  used = lambda src: {m for i in range(len(src)) for m in src.digits_of(i)}
  a, b = used(train), used(test)
  assert len(a) > 100 and len(b) > 100
  assert not a & b
  assert a <= set(data.split_index(5000, "train", data.TEST_FRACTION).tolist())
  assert b <= set(data.split_index(5000, "test", data.TEST_FRACTION).tolist())


@pytest.mark.parametrize("size, n", [(64, 240), (512, 3)])
def test_digit_scene_labels_follow_the_digits(size, n):
  digits, classes = data.mnist()
  digit_scenes = scenes.DigitScenes("train", size=size, num_scenes=n)
  assert digit_scenes.num_classes == 11
  for i in range(n):
    image, label = digit_scenes[i]
    assert image.shape == (size, size, 3) and image.dtype == np.uint8
    assert label.shape == (size, size) and label.dtype == np.uint8
    assert set(np.unique(label)) <= set(range(11))
    layout = digit_scenes.layout(i)
    assert 2 <= len(layout) <= 4
    covered = np.zeros((size, size), bool)
    for m, (y, x, side) in layout:
      assert 0.24 * size <= side <= 0.51 * size and y + side <= size and x + side <= size
      # Every digit shows: some of its own ink (thickened, then resized) keeps its label.
      bold = Image.fromarray(digits[m]).filter(ImageFilter.MaxFilter(3))
      ink = np.asarray(bold.resize((side, side), Image.BILINEAR)) > 127
      assert (label[y : y + side, x : x + side][ink] == classes[m] + 1).any()
      covered[y : y + side, x : x + side] = True
    assert (label[~covered] == 0).all()  # nothing labelled outside the digits' boxes
    # Ink differs clearly from the background: a pixel of ink is over half a digit colour
    # (≥ 120 from the background's) on the background or on an earlier digit.
    ground = np.median(image[label == 0].astype(float), 0)
    far = np.linalg.norm(image[label > 0] - ground, axis=-1) > 45
    assert far.mean() > 0.8


def test_digit_scenes_refuse_a_bad_split():
  with pytest.raises(UserError, match="split 'val'"):
    scenes.DigitScenes("val")


# ---------------------------------------------------------------------------------------
# augment.
# ---------------------------------------------------------------------------------------
def colour_coded(h=96, w=128, block=(16, 16), seed=0):
  """A label map of constant blocks (some 255) and an image whose colour encodes it:
  label k -> (40 + 20k, 60, 0), 255 -> (0, 200, 0)."""
  rng = np.random.default_rng(seed)
  grid = rng.integers(0, 10, (h // block[0], w // block[1]))
  grid[rng.random(grid.shape) < 0.15] = 255
  label = np.kron(grid, np.ones(block, int)).astype(np.uint8)
  image = np.stack([40 + 20 * label.astype(int), np.full(label.shape, 60), 0 * label], -1)
  image[label == 255] = (0, 200, 0)
  return image.astype(np.uint8), label


def interior(label, r=2):
  """Pixels whose (2r+1)² neighbourhood lies in the crop and holds one label: away from any
  label boundary, also one just beyond the crop."""
  padded = np.pad(label.astype(int), r, constant_values=-1)
  h, w = label.shape
  same = np.ones(label.shape, bool)
  for dy in range(2 * r + 1):
    for dx in range(2 * r + 1):
      same &= padded[dy : dy + h, dx : dx + w] == label
  return same


def test_augment_keeps_labels_aligned_with_their_pixels():
  image, label = colour_coded()
  padded_some = unpadded_some = False
  for seed in range(40):
    out, lab = augment.augment(
      image, label, np.random.default_rng(seed), crop=(64, 64), scale=(128, 96),
      photometric=False,
    )  # fmt: skip
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert lab.shape == (64, 64) and lab.dtype == np.uint8
    assert set(np.unique(lab)) <= set(np.unique(label))  # labels are never blended
    # Padding: black pixels, label 255, bottom / right of a top-left rectangle.
    pad = (out == 0).all(-1)
    h0, w0 = (~pad).any(1).sum(), (~pad).any(0).sum()
    rect = (np.arange(64)[:, None] < h0) & (np.arange(64)[None, :] < w0)
    np.testing.assert_array_equal(pad, ~rect)
    assert (lab[pad] == 255).all()
    padded_some |= pad.any()
    unpadded_some |= not pad.any()
    # Away from label boundaries (bilinear blends colours across them), the pixel's colour
    # is exactly its label's.
    inside = interior(lab) & rect
    assert inside.sum() > 0.15 * rect.sum()
    labelled = inside & (lab != 255)
    np.testing.assert_array_equal(out[labelled][:, 0], 40 + 20 * lab[labelled].astype(int))
    assert (out[labelled][:, 1] == 60).all()
    assert (out[inside & (lab == 255)] == (0, 200, 0)).all()
  assert padded_some and unpadded_some


def test_augment_rescales_into_the_scale_at_the_drawn_ratio():
  """keep_ratio: a 96×128 image into (long, short) = (256, 96) × 1 is 96×128 (short side
  bound); × 0.5 is 48×64 (the unpadded part of a crop as large as the scale)."""
  image, label = colour_coded()
  for ratio, (h, w) in ((1.0, (96, 128)), (0.5, (48, 64))):
    out, lab = augment.augment(
      image, label, np.random.default_rng(0), crop=(100, 140), scale=(256, 96),
      ratio_range=(ratio, ratio), flip=False, photometric=False, cat_max_ratio=1.0,
    )  # fmt: skip
    assert ((lab != 255) | (out != 0).any(-1)).sum(0).max() == h  # real rows per column
    assert (out != 0).any(-1).any(0).sum() == w
  np.testing.assert_array_equal(
    augment.augment(
      image, label, np.random.default_rng(0), crop=(96, 128), scale=(128, 96),
      ratio_range=(1, 1), flip=False, photometric=False, cat_max_ratio=1.0,
    )[1],
    label,
  )  # fmt: skip


def test_flip_mirrors_image_and_label_together_about_half_the_time():
  image, label = colour_coded()
  flips = 0
  for seed in range(40):
    out, lab = augment.augment(
      image, label, np.random.default_rng(seed), crop=(96, 128), scale=(128, 96),
      ratio_range=(1, 1), cat_max_ratio=1.0, photometric=False,
    )  # fmt: skip
    flipped = np.array_equal(lab, label[:, ::-1])
    assert flipped or np.array_equal(lab, label)
    np.testing.assert_array_equal(out, image[:, ::-1] if flipped else image)
    flips += flipped
  assert 8 <= flips <= 32


def test_photometric_distortion_changes_the_image_only():
  image, label = colour_coded()
  changed = 0
  for seed in range(10):
    kw = dict(crop=(64, 64), scale=(128, 96))
    a = augment.augment(image, label, np.random.default_rng(seed), photometric=False, **kw)
    b = augment.augment(image, label, np.random.default_rng(seed), **kw)
    np.testing.assert_array_equal(a[1], b[1])
    assert b[0].dtype == np.uint8
    changed += not np.array_equal(a[0], b[0])
  assert changed >= 5


def test_photometric_distortion_ranges_on_grey():
  """On mid-grey, saturation and hue change nothing, and brightness (±32, p = 0.5) comes before
  contrast (× 0.5–1.5, p = 0.5): a grey in [48, 240], unchanged a quarter of the time."""
  values = []
  for seed in range(200):
    out = augment.photometric_distortion(
      np.full((4, 5, 3), 128, np.uint8), np.random.default_rng(seed)
    )
    assert out.shape == (4, 5, 3) and out.dtype == np.uint8
    assert (np.abs(out.astype(int) - out[0, 0, 0]) <= 1).all()  # still one grey (HSV rounding)
    values.append(int(out[0, 0, 0]))
  values = np.asarray(values)
  assert 47 <= values.min() < 70 and 210 < values.max() <= 241
  assert 0.15 < np.mean(values == 128) < 0.35


def test_cat_max_ratio_retries_crops_that_one_class_dominates():
  """64×64, 90% class 0, class 1 a 20×20 corner block; 24×24 crops, no resize. Of all crop
  offsets a share q has class 0 < 75% (counted here); mmseg checks up to 10 crops and then
  takes one more unchecked, so with the rule a good crop comes with p = 1 − (1 − q)¹¹, and
  without it with p = q. The image encodes coordinates, which locates each crop."""
  label = np.zeros((64, 64), np.uint8)
  label[:20, :20] = 1
  yy, xx = np.mgrid[:64, :64]
  image = np.stack([yy * 4, xx * 4, np.zeros_like(yy)], -1).astype(np.uint8)
  good = lambda crop: 0 < crop.mean() and max(crop.mean(), 1 - crop.mean()) < 0.75
  offsets = [(y, x) for y in range(41) for x in range(41)]
  q = np.mean([good(label[y : y + 24, x : x + 24]) for y, x in offsets])
  share = {}
  for ratio in (0.75, 1.0):
    hits = 0
    for seed in range(300):
      out, lab = augment.augment(
        image, label, np.random.default_rng(seed), crop=(24, 24), scale=(64, 64),
        ratio_range=(1, 1), cat_max_ratio=ratio, flip=False, photometric=False,
      )  # fmt: skip
      y, x = out[0, 0, 0] // 4, out[0, 0, 1] // 4
      np.testing.assert_array_equal(lab, label[y : y + 24, x : x + 24])  # the image's crop
      hits += good(lab.astype(float))
    share[ratio] = hits / 300
  assert 0.05 < q < 0.1
  assert abs(share[0.75] - (1 - (1 - q) ** 11)) < 0.12
  assert abs(share[1.0] - q) < 0.06


def test_normalize():
  out = augment.normalize(np.full((3, 4, 3), 128, np.uint8), MEAN, STD)
  assert out.dtype == np.float32 and out.shape == (3, 4, 3)
  expected = (128 / 255 - np.asarray(MEAN)) / np.asarray(STD)
  np.testing.assert_allclose(out, np.broadcast_to(expected, out.shape), rtol=1e-5)


# ---------------------------------------------------------------------------------------
# Readers of datasets on disk.
# ---------------------------------------------------------------------------------------
def test_ade20k_reduces_the_zero_label_and_keeps_its_splits(tmp_path):
  values = np.array([[0, 1, 150, 255, 2, 149]] * 8, np.uint8)
  values = np.concatenate([values, values], 1)  # 8×12
  for split, stems in (("training", ["a", "b"]), ("validation", ["c"])):
    for k, stem in enumerate(stems):
      (tmp_path / "images" / split).mkdir(parents=True, exist_ok=True)
      Image.fromarray(rgb(value=10 * k + 5)).save(tmp_path / "images" / split / f"ADE_{stem}.jpg")
      png(tmp_path / "annotations" / split / f"ADE_{stem}.png", values, "P" if k else None)
  train = pipeline.seg_source(f"ade20k:{tmp_path}", "train")
  test = pipeline.seg_source(f"ade20k:{tmp_path}", "test")
  assert (len(train), len(test), train.num_classes) == (2, 1, 150)
  expected = np.array([[255, 0, 149, 255, 1, 148] * 2] * 8)
  for src in (train, test):
    for i in range(len(src)):
      image, label = src[i]
      assert image.shape == (8, 12, 3) and label.dtype == np.uint8
      np.testing.assert_array_equal(label, expected)
  assert train.pairs[1][0].endswith("ADE_b.jpg") and test.pairs[0][0].endswith("ADE_c.jpg")


def cityscapes_tree(root):
  """train: aachen/a (labelIds only), aachen/b (labelTrainIds and labelIds); val: bonn/c."""
  ids = np.array([[7, 33, 0, 26, 8, 255]] * 8, np.uint8).repeat(2, 1)
  for split, city, stem in (
    ("train", "aachen", "a"),
    ("train", "aachen", "b"),
    ("val", "bonn", "c"),
  ):
    png(root / "leftImg8bit" / split / city / f"{city}_{stem}_leftImg8bit.png", rgb())
    png(root / "gtFine" / split / city / f"{city}_{stem}_gtFine_labelIds.png", ids)
    png(root / "gtFine" / split / city / f"{city}_{stem}_gtFine_color.png", rgb(value=9))
  trainids = np.array([[0, 18, 255, 5, 3, 7]] * 8).repeat(2, 1)
  png(root / "gtFine" / "train" / "aachen" / "aachen_b_gtFine_labelTrainIds.png", trainids)
  return trainids


def test_cityscapes_maps_label_ids_and_uses_train_ids_as_they_are(tmp_path):
  trainids = cityscapes_tree(tmp_path)
  train = pipeline.seg_source(f"cityscapes:{tmp_path}", "train")
  test = pipeline.seg_source(f"cityscapes:{tmp_path}", "test")
  assert (len(train), len(test), train.num_classes) == (2, 1, 19)
  mapped = np.array([[0, 18, 255, 13, 1, 255]] * 8).repeat(2, 1)  # 7, 33, 0, 26, 8, 255
  np.testing.assert_array_equal(train[0][1], mapped)  # a: its labelIds, mapped
  np.testing.assert_array_equal(train[1][1], trainids)  # b: its labelTrainIds, as they are
  np.testing.assert_array_equal(test[0][1], mapped)
  assert "bonn" in test.pairs[0][0]


def test_the_cityscapes_table_is_the_official_one():
  # cityscapesScripts helpers/labels.py, (labelId, trainId) of the 19 evaluated classes.
  official = [(7, 0), (8, 1), (11, 2), (12, 3), (13, 4), (17, 5), (19, 6), (20, 7), (21, 8),
              (22, 9), (23, 10), (24, 11), (25, 12), (26, 13), (27, 14), (28, 15), (31, 16),
              (32, 17), (33, 18)]  # fmt: skip
  assert sorted(sources.CITYSCAPES_TRAIN_IDS.items()) == official


def segfolder(root, n=10, sub=""):
  """n pairs: image i is filled with 10·i (one a .jpg), its P-mode mask with i % 4 and 255."""
  for i in range(n):
    mask = np.full((8, 12), i % 4, np.uint8)
    mask[0] = 255
    png(root / "masks" / sub / f"s{i:02d}.png", mask, "P")
    if i == 3:
      (root / "images" / sub).mkdir(parents=True, exist_ok=True)
      Image.fromarray(rgb(value=10 * i)).save(root / "images" / sub / f"s{i:02d}.jpg")
    else:
      png(root / "images" / sub / f"s{i:02d}.png", rgb(value=10 * i))


def test_segfolder_pairs_stems_and_splits_the_sorted_list(tmp_path):
  segfolder(tmp_path)
  train = pipeline.seg_source(f"segfolder:{tmp_path}", "train")
  test = pipeline.seg_source(f"segfolder:{tmp_path}", "test")
  assert train.num_classes == test.num_classes == 4
  stems = lambda src: [int(p[0].rsplit("s", 1)[1][:2]) for p in src.pairs]
  order = lambda split: sorted(data.split_index(10, split, data.TEST_FRACTION).tolist())
  assert sorted(stems(train)) == order("train") and sorted(stems(test)) == order("test")
  for src in (train, test):
    for k, i in enumerate(stems(src)):
      image, label = src[k]
      assert abs(int(image[4, 4, 0]) - 10 * i) <= 2  # its own image (the .jpg: lossy)
      assert (label[1:] == i % 4).all() and (label[0] == 255).all()  # indices, not colours


def test_segfolder_split_folders_and_num_classes(tmp_path):
  segfolder(tmp_path, n=3, sub="train")
  segfolder(tmp_path, n=6, sub="val")  # stems s03..s05 hold class 3, only in val
  for i in range(3):
    png(tmp_path / "masks" / "train" / f"s{i:02d}.png", np.full((8, 12), i % 3, np.uint8))
  train = pipeline.seg_source(f"segfolder:{tmp_path}", "train")
  test = pipeline.seg_source(f"segfolder:{tmp_path}", "test")
  assert (len(train), len(test)) == (3, 6)
  assert all("/train/" in p[0] for p in train.pairs) and all("/val/" in p[0] for p in test.pairs)
  assert train.num_classes == test.num_classes == 4  # scanned over both splits
  assert pipeline.seg_source(f"segfolder:{tmp_path}", "train", num_classes=7).num_classes == 7


# ---------------------------------------------------------------------------------------
# Bad input: one UserError naming the file or folder and what was expected.
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["segfolder", "ade20k", "cityscapes"])
def test_a_missing_root(tmp_path, kind):
  with pytest.raises(MissingPathError, match="nowhere.*does not exist"):
    pipeline.seg_source(f"{kind}:{tmp_path / 'nowhere'}", "train")


@pytest.mark.parametrize(
  "kind, expected",
  [
    ("segfolder", "images/, masks/"),
    ("ade20k", "images/training/, annotations/training/"),
    ("cityscapes", "leftImg8bit/train/, gtFine/train/"),
  ],
)
def test_a_wrong_layout_names_the_folders_expected(tmp_path, kind, expected):
  (tmp_path / "pictures").mkdir()
  with pytest.raises(UserError, match=f"lacks .*expected the folders {expected}"):
    pipeline.seg_source(f"{kind}:{tmp_path}", "train")


def test_an_empty_root(tmp_path):
  (tmp_path / "images").mkdir()
  (tmp_path / "masks").mkdir()
  with pytest.raises(UserError, match="no images in .*images"):
    sources.SegFolder(str(tmp_path), "train")


def test_split_folders_need_both_sides(tmp_path):
  segfolder(tmp_path, n=2, sub="train")
  segfolder(tmp_path, n=2, sub="val")
  shutil.rmtree(tmp_path / "masks" / "val")
  with pytest.raises(UserError, match="lacks masks/val/"):
    sources.SegFolder(str(tmp_path), "test")


def test_an_image_without_a_mask_and_a_mask_without_an_image(tmp_path):
  segfolder(tmp_path, n=4)
  png(tmp_path / "images" / "extra.png", rgb())
  png(tmp_path / "images" / "lonely.png", rgb())
  with pytest.raises(UserError, match=r"image .*extra\.png has no mask .*\(2 such\)"):
    sources.SegFolder(str(tmp_path), "train")
  (tmp_path / "images" / "extra.png").unlink()
  (tmp_path / "images" / "lonely.png").unlink()
  png(tmp_path / "masks" / "ghost.png", np.zeros((8, 12)))
  with pytest.raises(UserError, match=r"mask .*ghost\.png has no image"):
    sources.SegFolder(str(tmp_path), "train")


def test_cityscapes_image_without_labels(tmp_path):
  cityscapes_tree(tmp_path)
  (tmp_path / "gtFine" / "val" / "bonn" / "bonn_c_gtFine_labelIds.png").unlink()
  with pytest.raises(UserError, match=r"bonn_c_leftImg8bit\.png has no mask"):
    sources.Cityscapes(str(tmp_path), "test")


def test_a_mask_of_another_size_is_named_when_read(tmp_path):
  segfolder(tmp_path, n=2)
  png(tmp_path / "masks" / "s01.png", np.zeros((8, 10)))
  src = sources.SegFolder(str(tmp_path), "train", num_classes=4)  # reads no mask yet
  (k,) = [k for k, pair in enumerate(src.pairs) if pair[1].endswith("s01.png")]
  src[1 - k]  # the other one is fine
  with pytest.raises(UserError, match=r"mask .*s01\.png is 10×8 .* image .*s01\.png is 12×8"):
    src[k]


@pytest.mark.parametrize(
  "kind, value, reported",
  [
    ("segfolder", 5, "5"),
    ("ade20k", 151, "150 .after the dataset mapping"),
    ("cityscapes", 19, "19"),
  ],
)
def test_a_label_value_out_of_range_is_named_when_read(tmp_path, kind, value, reported):
  mask = np.zeros((8, 12), np.uint8)
  mask[3, 4] = value
  if kind == "segfolder":
    png(tmp_path / "images" / "x.png", rgb())
    png(tmp_path / "masks" / "x.png", mask)
    src, name = sources.SegFolder(str(tmp_path), "train", num_classes=3), "x.png"
  elif kind == "ade20k":
    png(tmp_path / "images" / "training" / "x.png", rgb())
    png(tmp_path / "annotations" / "training" / "x.png", mask)
    src, name = sources.ADE20K(str(tmp_path), "train"), "x.png"
  else:
    png(tmp_path / "leftImg8bit" / "train" / "c" / "x_leftImg8bit.png", rgb())
    png(tmp_path / "gtFine" / "train" / "c" / "x_gtFine_labelTrainIds.png", mask)
    src, name = sources.Cityscapes(str(tmp_path), "train"), "x_gtFine_labelTrainIds.png"
  with pytest.raises(UserError, match=rf"mask .*{name} has label value {reported}"):
    src[0]


def test_an_rgb_mask_is_refused(tmp_path):
  png(tmp_path / "images" / "x.png", rgb())
  png(tmp_path / "masks" / "x.png", rgb())
  with pytest.raises(UserError, match=r"mask .*x\.png is a RGB image; expected .*palette"):
    sources.SegFolder(str(tmp_path), "train")


@pytest.mark.parametrize("spec", ["ade", "segfolder:", "digitscenes:64", "folder:x"])
def test_an_unknown_spec_lists_the_accepted_forms(spec):
  with pytest.raises(UserError, match="expected digitscenes, segfolder:<root>, ade20k:<root>"):
    pipeline.seg_source(spec, "train")


def test_num_classes_below_the_datasets_own(tmp_path):
  with pytest.raises(UserError, match="num_classes=5.*has 11 classes"):
    pipeline.seg_source("digitscenes", "train", num_classes=5)
  assert pipeline.seg_source("digitscenes", "test", size=32, num_scenes=3).num_classes == 11


# ---------------------------------------------------------------------------------------
# Pipelines.
# ---------------------------------------------------------------------------------------
SCENES = scenes.DigitScenes("train", size=48, num_scenes=12)


def batches(**kw):
  kw = dict(dict(crop=(32, 32), scale=(64, 32), global_batch=4, seed=0, mean=MEAN, std=STD), **kw)
  return pipeline.train_batches(SCENES, **kw)


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(x.image, y.image)
    np.testing.assert_array_equal(x.label, y.label)


def test_train_batches_shapes_and_values():
  padded = False
  for batch in take(batches(), 4):
    assert batch.image.shape == (4, 32, 32, 3) and batch.image.dtype == np.float32
    assert batch.label.shape == (4, 32, 32) and batch.label.dtype == np.int32
    assert batch.valid is None
    assert set(np.unique(batch.label)) <= set(range(11)) | {255}
    # Padding is 0 after normalisation (mmseg pads normalised images), label 255.
    pad = (batch.image == 0).all(-1)
    assert (batch.label[pad] == 255).all()
    padded |= pad.any()
    low = (0 - np.asarray(MEAN)) / np.asarray(STD)
    assert (batch.image[~pad] >= low - 1e-5).all()
  assert padded  # scale (64, 32) on 48×48 scenes: sides 16–64 against a 32 crop


def test_train_batches_are_deterministic_and_resume_at_their_step():
  reference = take(batches(), 5)
  assert_batches_equal(take(batches(), 5), reference)
  assert_batches_equal(take(batches(start_step=3), 2), reference[3:])
  assert not np.array_equal(reference[0].image, take(batches(seed=1), 1)[0].image)


def test_two_processes_share_the_one_process_batches():
  reference = take(batches(start_step=1), 3)
  shares = [take(batches(start_step=1, process_index=p, process_count=2), 3) for p in (0, 1)]
  for step, batch in enumerate(reference):
    for field in ("image", "label"):
      joined = np.concatenate([getattr(shares[p][step], field) for p in (0, 1)])
      np.testing.assert_array_equal(joined, getattr(batch, field))
  with pytest.raises(UserError, match="does not split over 3"):
    batches(process_count=3)


@pytest.mark.slow
def test_train_batches_workers_match_in_process():
  reference = take(batches(start_step=2), 2)
  it = batches(start_step=2, workers=2)
  assert_batches_equal(take(it, 2), reference)
  del it


def test_sources_and_transforms_pickle(tmp_path):
  """grain's workers receive the per-example callable by pickling."""
  segfolder(tmp_path, n=3)
  for src in (SCENES, sources.SegFolder(str(tmp_path), "train")):
    again = pickle.loads(pickle.dumps(src))
    np.testing.assert_array_equal(again[0][1], src[0][1])


def test_eval_items_give_every_process_every_pth_item_in_order():
  seen = []
  for p in range(3):
    items = list(pipeline.eval_items(SCENES, process_index=p, process_count=3))
    assert [i for i, _, _ in items] == list(range(p, 12, 3))
    seen += [i for i, _, _ in items]
    i, image, label = items[1]
    np.testing.assert_array_equal(image, SCENES[i][0])
    assert image.shape == (48, 48, 3) and label.shape == (48, 48)  # full resolution
  assert sorted(seen) == list(range(12))
  assert [i for i, _, _ in pipeline.eval_items(SCENES, limit=5)] == [0, 1, 2, 3, 4]


class FakeSegTfds:
  """Stands in for `tensorflow_datasets` (neither dataset can be prepared offline): the
  builders' feature keys, label maps (H, W, 1) of raw ids, and the splits asked for."""

  def __init__(self):
    self.asked = []

  def data_source(self, name, split, data_dir):
    self.asked.append((name, split, data_dir))
    raw = np.array([[[0], [1]], [[150], [7]]], np.uint8)  # ADE20K ids; labelIds for CS
    image = np.full((2, 2, 3), 9, np.uint8)
    if name == "scene_parse150":
      return [{"image": image, "annotation": raw}]
    return [{"image_left": image, "segmentation_label": raw}]


def test_tfds_segmentation_key_mapping_on_a_stand_in(monkeypatch):
  fake = FakeSegTfds()
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
  ade = pipeline.seg_source("tfds:scene_parse150", "test", data_dir="/prepared")
  image, label = ade[0]
  assert ade.num_classes == 150 and image.shape == (2, 2, 3)
  np.testing.assert_array_equal(label, [[255, 0], [149, 6]])  # reduce_zero_label
  cs = pipeline.seg_source("tfds:cityscapes", "test")
  np.testing.assert_array_equal(cs[0][1], [[255, 255], [255, 0]])  # labelId 7 = road = 0
  assert cs.num_classes == 19
  assert fake.asked == [
    ("scene_parse150", "test", "/prepared"),
    ("cityscapes/semantic_segmentation", "validation", None),
  ]
  with pytest.raises(UserError, match="no segmentation reader"):
    pipeline.seg_source("tfds:coco", "train")
