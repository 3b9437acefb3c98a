"""Semantic-segmentation data: sources of (image, label map), mmseg's train augmentation, and
deterministic per-process batches on grain.

A source is named by a string (`seg_source`): `digitscenes` (canvases of MNIST digits, built
in), `segfolder:<root>` (`images/` + `masks/`), `ade20k:<root>` (ADEChallengeData2016) or
`cityscapes:<root>`. Every source has `name`, `num_classes`, `len()` and `[i] -> (uint8
(H, W, 3) RGB image, uint8 (H, W) label map)`, labels being class ids or 255 (ignore).

As in `data.train_batches`, every training example is a pure function of (seed, global
example index), so a resumed or multi-process run reads the batches an uninterrupted
single-process one would.
"""

import functools
import os
from typing import Iterator, Optional, Sequence

import grain
import numpy as np
from PIL import Image, ImageFilter

from linearizer import data
from linearizer.errors import MissingPathError, UserError

IGNORE = 255  # mmseg's ignore_index: pixels that count in no loss and no metric
SPLITS = ("train", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MASK_MODES = ("P", "L", "1", "I", "I;16", "I;16L", "I;16B")  # integer-valued label maps

# cityscapesScripts' helpers/labels.py: labelId -> trainId of its 19 evaluated classes; every
# other id (void, license plate, ...) is 255. The same table mmseg's conversion script uses.
# fmt: off
CITYSCAPES_TRAIN_IDS = {
  7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
  23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}
# fmt: on


def _lut(table: dict) -> np.ndarray:
  lut = np.full(256, IGNORE, np.uint8)
  lut[list(table)] = list(table.values())
  return lut


_CITYSCAPES_LUT = _lut(CITYSCAPES_TRAIN_IDS)
# mmseg's reduce_zero_label: 0 (ADE20K's "other") -> 255, v -> v - 1, 255 stays 255.
_REDUCE_ZERO_LUT = _lut({0: IGNORE, **{v: v - 1 for v in range(1, 255)}})


def _check_split(split: str, name: str) -> None:
  if split not in SPLITS:
    raise UserError(f"{name}: split {split!r}; expected one of {SPLITS}.")


# ---------------------------------------------------------------------------------------
# DigitScenes: the built-in dataset.
# ---------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _mnist():
  return data.mnist()  # read once per process, also in grain's workers


DIGITS = (2, 4)  # digits per scene
DIGIT_SIDE = (0.25, 0.5)  # a digit's side, as a fraction of the canvas's
# Backgrounds darker than this in every channel, digits lighter than 255 − this: MNIST's
# light strokes on dark, in colour, so a teacher trained on MNIST meets digits it knows.
DARK = 96


def bold_digit(digit: np.ndarray, side: int) -> Image.Image:
  """An MNIST digit with its strokes thickened (a 3×3 max filter at 28²), resized to
  `side`: thin strokes would leave a few per cent of a canvas labelled, and a model on a
  CPU budget learns to call everything background."""
  return (
    Image.fromarray(digit).filter(ImageFilter.MaxFilter(3)).resize((side, side), Image.BILINEAR)
  )


class DigitScenes:
  """Canvases of 2–4 bold MNIST digits, light on a dark noisy coloured background; label 0 = background,
  d + 1 = the ink of a digit d. Train and test scenes draw on disjoint MNIST images, and
  scene i is a function of (seed, split, i) alone."""

  num_classes = 11

  def __init__(self, split: str, size: int = 128, num_scenes: int = 0, seed: int = 0):
    _check_split(split, "digitscenes")
    if size < 16:
      raise UserError(f"digitscenes: size={size}; expected a canvas side of at least 16.")
    self.split, self.size, self.seed = split, int(size), int(seed)
    self.num_scenes = int(num_scenes) or (2000 if split == "train" else 200)
    self.pool = data.split_index(len(_mnist()[0]), split, data.TEST_FRACTION)
    self.name = f"digitscenes:{split}"

  def __len__(self) -> int:
    return self.num_scenes

  def __getitem__(self, i: int) -> tuple:
    image, label, _ = self._compose(i)
    return image, label

  def layout(self, i: int) -> list:
    """The digits of scene i in drawing order: [(MNIST index, (top, left, side)), ...]."""
    return self._compose(i)[2]

  def digits_of(self, i: int) -> list:
    """The MNIST indices scene i is made of (all from this split's share of MNIST)."""
    return [m for m, _ in self.layout(i)]

  def _compose(self, i):
    if not 0 <= i < self.num_scenes:
      raise IndexError(f"{self.name} has {self.num_scenes} scenes; asked for {i}.")
    digits, classes = _mnist()
    rng = np.random.default_rng([self.seed, SPLITS.index(self.split), int(i)])
    s = self.size
    base = rng.integers(0, DARK, 3).astype(np.float32)  # MNIST's light-on-dark, tinted
    image = base + rng.normal(0.0, 6.0, (s, s, 3)).astype(np.float32)  # RGB matters a little
    label = np.zeros((s, s), np.uint8)
    owner = np.full((s, s), -1, np.int16)  # which digit's ink each pixel shows
    placed, ink_of, count = [], [], rng.integers(DIGITS[0], DIGITS[1] + 1)
    for _ in range(4 * count):  # a digit that finds no place is drawn anew
      if len(placed) == count:
        break
      m = int(self.pool[rng.integers(len(self.pool))])
      side = max(4, round(s * rng.uniform(*DIGIT_SIDE)))
      glyph = bold_digit(digits[m], side)
      alpha = np.asarray(glyph, np.float32) / 255
      ink = alpha > 127 / 255
      if not ink.any():  # a thin stroke shrunk below the ink threshold: no digit to see
        continue
      colour = _contrasting(base, rng)
      # Overlap is fine, hiding an earlier digit is not: a place covering more than half of
      # an earlier digit's visible ink is redrawn, so every digit drawn keeps some labelled
      # pixels.
      for _ in range(20):
        y, x = rng.integers(0, s - side + 1, 2)
        window = owner[y : y + side, x : x + side]
        hidden = np.bincount(window[ink & (window >= 0)], minlength=len(placed))
        if all(2 * h <= n for h, n in zip(hidden, ink_of)):
          break
      else:
        continue
      ink_of = [n - h for n, h in zip(ink_of, hidden)] + [int(ink.sum())]
      view = image[y : y + side, x : x + side]
      view[:] = view * (1 - alpha[..., None]) + colour * alpha[..., None]  # anti-aliased
      label[y : y + side, x : x + side][ink] = classes[m] + 1
      window[ink] = len(placed)
      placed.append((m, (int(y), int(x), side)))
    return np.clip(np.round(image), 0, 255).astype(np.uint8), label, placed


def _contrasting(base, rng):
  """A light colour clearly unlike `base` (≥ 120 apart in RGB); else the farthest corner."""
  for _ in range(10):
    colour = rng.integers(256 - DARK, 256, 3).astype(np.float32)
    if np.linalg.norm(colour - base) >= 120:
      return colour
  return np.where(base < 128, 255.0, 0.0).astype(np.float32)


# ---------------------------------------------------------------------------------------
# Datasets on disk: (image file, mask file, label mapping) pairs.
# ---------------------------------------------------------------------------------------
class _Pairs:
  """Random access to (image file, mask file, lut) triples: the mask's values are mapped by
  the lut (None: as they are), then checked against the image's size and num_classes."""

  def __init__(self, name, pairs, num_classes):
    self.name, self.pairs, self.num_classes = name, pairs, num_classes

  def __len__(self) -> int:
    return len(self.pairs)

  def __getitem__(self, i: int) -> tuple:
    image_path, mask_path, lut = self.pairs[i]
    try:
      with Image.open(image_path) as im:
        image = data.rgb8(im)
    except OSError as e:
      raise UserError(f"{self.name}: cannot read image {image_path}: {e}") from e
    label = _read_mask(mask_path, lut)
    if label.shape != image.shape[:2]:
      raise UserError(
        f"{self.name}: mask {mask_path} is {label.shape[1]}×{label.shape[0]} (W×H) but its "
        f"image {image_path} is {image.shape[1]}×{image.shape[0]}; expected the same size."
      )
    bad = label[(label >= self.num_classes) & (label != IGNORE)]
    if bad.size:
      raise UserError(
        f"{self.name}: mask {mask_path} has label value {int(bad.min())}"
        f"{'' if lut is None else ' (after the dataset mapping)'}; expected class ids "
        f"0 … {self.num_classes - 1} or {IGNORE} (ignore)."
      )
    return image, label


def _read_mask(path, lut=None) -> np.ndarray:
  """A label map's integer values (a palette PNG's indices, not its colours), as uint8."""
  try:
    with Image.open(path) as im:
      if im.mode not in MASK_MODES:
        raise UserError(
          f"mask {path} is a {im.mode} image; expected a label map of class ids: a palette "
          "(P) or greyscale (L) PNG."
        )
      values = np.asarray(im).astype(np.int64)
  except OSError as e:
    raise UserError(f"cannot read mask {path}: {e}") from e
  if values.size and (values.min() < 0 or values.max() > 255):
    raise UserError(
      f"mask {path} has label value {int(values.max())}; expected class ids below 255, or "
      "255 (ignore)."
    )
  values = values.astype(np.uint8)
  return values if lut is None else lut[values]


def _need_dirs(name, root, dirs) -> None:
  if not os.path.isdir(root):
    raise MissingPathError(f"{name}: dataset root {root!r} does not exist or is not a folder.")
  missing = [d + "/" for d in dirs if not os.path.isdir(os.path.join(root, d))]
  if missing:
    raise UserError(
      f"{name}: {root!r} lacks {', '.join(missing)}; expected the folders "
      f"{', '.join(d + '/' for d in dirs)} under it."
    )


def _stems(folder, suffixes, tail="") -> dict:
  """stem (relative to `folder`) -> path of the files under it named <stem><tail><suffix>."""
  found = {}
  for here, _, files in sorted(os.walk(folder)):
    for f in sorted(files):
      suffix = next((x for x in suffixes if f.lower().endswith((tail + x).lower())), None)
      if suffix is not None:
        rel = os.path.relpath(os.path.join(here, f), folder)
        found[rel[: len(rel) - len(tail) - len(suffix)]] = os.path.join(here, f)
  return found


def _pairs(name, img_dir, mask_dir, image_tail="", mask_tails=("",), suffixes=IMAGE_SUFFIXES):
  """[(image, mask, k)] for every stem, sorted: mask_tails[k] is the first tail its mask has
  (a preference order); an image without a mask or a mask without an image is an error."""
  images, masks = _stems(img_dir, suffixes, image_tail), {}
  for k, tail in reversed(list(enumerate(mask_tails))):  # the earlier tails win
    masks.update({stem: (p, k) for stem, p in _stems(mask_dir, (".png",), tail).items()})
  for what, have, lack, where in (
    ("image", images, masks, mask_dir),
    ("mask", masks, images, img_dir),
  ):
    orphans = sorted(set(have) - set(lack))
    if orphans:
      path, other = have[orphans[0]], "mask" if what == "image" else "image"
      raise UserError(
        f"{name}: the {what} {path if what == 'image' else path[0]} has no {other} of the same "
        f"stem in {where}/ ({len(orphans)} such); expected one {other} per {what}."
      )
  if not images:
    raise UserError(f"{name}: no images in {img_dir}/ (expected {'/'.join(suffixes)} files).")
  return [(images[stem], *masks[stem]) for stem in sorted(images)]


class SegFolder(_Pairs):
  """`root/images/<stem>.{png,jpg,jpeg}` with `root/masks/<stem>.png`, split into
  `images/{train,val}` (and the same under masks/) when those exist, else by
  `data.split_index`. num_classes: given, or the largest value < 255 in any mask + 1."""

  def __init__(self, root: str, split: str, num_classes: int = 0):
    name = f"segfolder:{root}"
    _check_split(split, name)
    _need_dirs(name, root, ["images", "masks"])
    at = lambda *p: os.path.join(root, *p)
    if os.path.isdir(at("images", "train")) and os.path.isdir(at("images", "val")):
      _need_dirs(name, root, [f"{k}/{d}" for k in ("images", "masks") for d in ("train", "val")])
      parts = [_pairs(name, at("images", d), at("masks", d)) for d in ("train", "val")]
      pairs, every = parts[SPLITS.index(split)], parts[0] + parts[1]
    else:
      every = _pairs(name, at("images"), at("masks"))
      pairs = [every[i] for i in data.split_index(len(every), split, data.TEST_FRACTION)]
    if not num_classes:  # over both splits, so that train and test agree on the head
      tops = [_read_mask(m).astype(int) for _, m, _ in every]
      num_classes = max(int(v[v != IGNORE].max(initial=-1)) for v in tops) + 1
      if not num_classes:
        raise UserError(f"{name}: every mask is all {IGNORE} (ignore); no class to learn.")
    super().__init__(f"{name}:{split}", [(i, m, None) for i, m, _ in pairs], int(num_classes))


class ADE20K(_Pairs):
  """ADEChallengeData2016: `images/{training,validation}/*.jpg` with
  `annotations/{training,validation}/*.png`; 150 classes with mmseg's reduce_zero_label."""

  def __init__(self, root: str, split: str):
    name = f"ade20k:{root}"
    _check_split(split, name)
    d = {"train": "training", "test": "validation"}[split]
    _need_dirs(name, root, [f"images/{d}", f"annotations/{d}"])
    pairs = _pairs(name, os.path.join(root, "images", d), os.path.join(root, "annotations", d))
    super().__init__(f"{name}:{split}", [(i, m, _REDUCE_ZERO_LUT) for i, m, _ in pairs], 150)


class Cityscapes(_Pairs):
  """`leftImg8bit/{train,val}/<city>/<stem>_leftImg8bit.png` with
  `gtFine/{train,val}/<city>/<stem>_gtFine_labelTrainIds.png` (as is) or, lacking it,
  `<stem>_gtFine_labelIds.png` mapped by CITYSCAPES_TRAIN_IDS; 19 classes."""

  def __init__(self, root: str, split: str):
    name = f"cityscapes:{root}"
    _check_split(split, name)
    d = {"train": "train", "test": "val"}[split]
    _need_dirs(name, root, [f"leftImg8bit/{d}", f"gtFine/{d}"])
    tails = ("_gtFine_labelTrainIds", "_gtFine_labelIds")
    img_dir, mask_dir = os.path.join(root, "leftImg8bit", d), os.path.join(root, "gtFine", d)
    pairs = _pairs(name, img_dir, mask_dir, "_leftImg8bit", tails, (".png",))
    luts = (None, _CITYSCAPES_LUT)
    super().__init__(f"{name}:{split}", [(i, m, luts[k]) for i, m, k in pairs], 19)


# tfds builders of the two datasets: (builder, image key, label key, label mapping, classes,
# {our split: theirs}). Their label maps are the raw ones (ADE20K's 0 = "other", Cityscapes'
# labelIds), mapped as the folder readers map them. Not tested against the real prepared
# builders here (they cannot be prepared offline): the keys follow the tfds catalogue.
TFDS_SEGMENTATION = {
  "scene_parse150": ("scene_parse150", "image", "annotation", "reduce_zero", 150,
                     {"train": "train", "test": "test"}),
  "cityscapes": ("cityscapes/semantic_segmentation", "image_left", "segmentation_label",
                 "cityscapes", 19, {"train": "train", "test": "validation"}),
}  # fmt: skip
_LUTS = {"reduce_zero": _REDUCE_ZERO_LUT, "cityscapes": _CITYSCAPES_LUT}


class TfdsSegmentation:
  """`tfds.data_source` of a prepared scene_parse150 or cityscapes (array_record files under
  `data_dir`; no TensorFlow at run time), each example checked as it is read."""

  def __init__(self, name: str, split: str, data_dir: str = ""):
    _check_split(split, f"tfds:{name}")
    if name not in TFDS_SEGMENTATION:
      raise UserError(
        f"tfds:{name}: no segmentation reader for it; expected one of "
        f"{sorted(TFDS_SEGMENTATION)} (or a folder: segfolder:<root>)."
      )
    try:
      import tensorflow_datasets as tfds  # optional: only tfds: sources need it
    except ImportError as e:
      raise UserError(f"tfds:{name} needs tensorflow-datasets: {e}") from e
    builder, self.image_key, self.label_key, lut, self.num_classes, splits = TFDS_SEGMENTATION[name]
    self.lut, self.name = _LUTS[lut], f"tfds:{name}:{splits[split]}"
    self.source = tfds.data_source(builder, split=splits[split], data_dir=data_dir or None)

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, i: int) -> tuple:
    ex = self.source[i]
    image, label = np.asarray(ex[self.image_key]), np.asarray(ex[self.label_key])
    label = self.lut[label[..., 0] if label.ndim == 3 else label]
    if label.shape != image.shape[:2]:
      raise UserError(
        f"{self.name}: example {i}'s label map is {label.shape} but its image "
        f"{image.shape[:2]}; expected the same size."
      )
    return image.astype(np.uint8), label


def seg_source(
  spec: str,
  split: str,
  *,
  num_classes: int = 0,
  size: int = 128,
  num_scenes: int = 0,
  seed: int = 0,
  data_dir: str = "",
):
  """The segmentation source `spec` names, one split of it.

  Args:
    spec: `digitscenes`, `segfolder:<root>`, `ade20k:<root>`, `cityscapes:<root>`, or
      `tfds:scene_parse150` / `tfds:cityscapes` (prepared under `data_dir`).
    split: 'train' or 'test' (ADE20K / Cityscapes: their training / validation split).
    num_classes: a segfolder's class count (0: from its masks); for the others, 0 or at
      least their own (a head that small would drop labels).
    size, num_scenes, seed: digitscenes' canvas side, scene count (0: its default), seed.
  Returns:
    A source of (uint8 (H, W, 3) image, uint8 (H, W) label) with `name` and `num_classes`.
  """
  kind, colon, root = spec.partition(":")
  if kind == "digitscenes" and not colon:
    source = DigitScenes(split, size, num_scenes, seed)
  elif kind == "tfds" and root:
    source = TfdsSegmentation(root, split, data_dir)
  elif kind in ("segfolder", "ade20k", "cityscapes") and root:
    if kind == "segfolder":
      return SegFolder(root, split, num_classes)
    source = (ADE20K if kind == "ade20k" else Cityscapes)(root, split)
  else:
    raise UserError(
      f"Unknown segmentation source {spec!r}; expected digitscenes, segfolder:<root>, "
      "ade20k:<root>, cityscapes:<root>, tfds:scene_parse150 or tfds:cityscapes."
    )
  if num_classes and num_classes < source.num_classes:
    raise UserError(
      f"num_classes={num_classes}, but {source.name} has {source.num_classes} classes: set "
      f"it to at least {source.num_classes} (or 0, the source's own)."
    )
  return source


# ---------------------------------------------------------------------------------------
# Augmentation: mmseg's ADE20K / Cityscapes train pipeline.
# ---------------------------------------------------------------------------------------
def _augment(image, label, rng, crop, scale, ratio_range, cat_max_ratio, flip, photometric):
  """augment() before its padding: the crop may be smaller than `crop`."""
  # RandomResize(scale, ratio_range, keep_ratio=True): mmcv.imrescale into scale × ratio.
  ratio = rng.uniform(*ratio_range)
  long_side, short_side = max(scale) * ratio, min(scale) * ratio
  h, w = label.shape
  factor = min(long_side / max(h, w), short_side / min(h, w))
  size = (max(1, int(w * factor + 0.5)), max(1, int(h * factor + 0.5)))
  image = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
  label = np.asarray(Image.fromarray(label).resize(size, Image.NEAREST))  # never blended
  # RandomCrop(crop, cat_max_ratio): up to 10 tries for a crop no class dominates.
  box = _crop_box(label.shape, crop, rng)
  if cat_max_ratio < 1:
    for _ in range(10):
      ids, counts = np.unique(label[box], return_counts=True)
      counts = counts[ids != IGNORE]
      if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
        break
      box = _crop_box(label.shape, crop, rng)
  image, label = image[box], label[box]
  if flip and rng.random() < 0.5:  # RandomFlip(prob=0.5), horizontal
    image, label = np.ascontiguousarray(image[:, ::-1]), np.ascontiguousarray(label[:, ::-1])
  if photometric:
    image = photometric_distortion(image, rng)
  return np.ascontiguousarray(image), np.ascontiguousarray(label)


def _crop_box(shape, crop, rng):
  y = rng.integers(0, max(shape[0] - crop[0], 0) + 1)
  x = rng.integers(0, max(shape[1] - crop[1], 0) + 1)
  return slice(y, y + crop[0]), slice(x, x + crop[1])


def _pad(a, crop, value):
  out = np.full((*crop, *a.shape[2:]), value, a.dtype)
  out[: a.shape[0], : a.shape[1]] = a  # bottom / right, as mmseg's Pad
  return out


def augment(
  image: np.ndarray,
  label: np.ndarray,
  rng: np.random.Generator,
  *,
  crop: tuple,
  scale: tuple,
  ratio_range: tuple = (0.5, 2.0),
  cat_max_ratio: float = 0.75,
  flip: bool = True,
  photometric: bool = True,
) -> tuple:
  """mmseg's train pipeline: RandomResize → RandomCrop → RandomFlip → PhotoMetricDistortion
  → pad (image 0, label 255) to the crop.

  Args:
    image, label: uint8 (H, W, 3) and uint8 (H, W).
    rng: the example's generator.
    crop: (height, width) of the output.
    scale: (long, short) sides the image is rescaled to fit, keeping its aspect ratio,
      before a factor drawn from `ratio_range`.
    cat_max_ratio: the largest share one class may take of a crop's labelled pixels (up to
      10 tries); 1 disables the check.
    flip, photometric: whether to flip horizontally (p = 0.5) and distort colours.
  Returns:
    (uint8 (crop_h, crop_w, 3) image, uint8 (crop_h, crop_w) label).
  """
  image, label = _augment(
    image, label, rng, tuple(crop), scale, ratio_range, cat_max_ratio, flip, photometric
  )
  return _pad(image, tuple(crop), 0), _pad(label, tuple(crop), IGNORE)


def _convert(a, alpha=1.0, beta=0.0):
  return np.clip(a.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def photometric_distortion(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """mmseg's PhotoMetricDistortion, each step with p = 0.5: brightness ±32, contrast × 0.5–1.5
  (before or after the rest, at random), saturation × 0.5–1.5, hue ± 18 OpenCV hue steps
  (mmseg's hue_delta=18 on OpenCV's 0–180 scale: ±36°).

  Args:
    image: uint8 (H, W, 3) RGB.
    rng: the example's generator.
  Returns:
    The distorted uint8 image.
  """
  contrast = lambda im: _convert(im, alpha=rng.uniform(0.5, 1.5)) if rng.random() < 0.5 else im
  if rng.random() < 0.5:
    image = _convert(image, beta=rng.uniform(-32, 32))
  contrast_first = rng.random() < 0.5
  if contrast_first:
    image = contrast(image)
  hsv = None
  if rng.random() < 0.5:
    hsv = np.array(Image.fromarray(image).convert("HSV"))
    hsv[..., 1] = _convert(hsv[..., 1], alpha=rng.uniform(0.5, 1.5))
  if rng.random() < 0.5:
    hsv = np.array(Image.fromarray(image).convert("HSV")) if hsv is None else hsv
    shift = round(rng.integers(-18, 18) * 256 / 180)  # OpenCV hue steps -> PIL's 0–255
    hsv[..., 0] = (hsv[..., 0].astype(np.int64) + shift) % 256
  if hsv is not None:
    bands = [Image.fromarray(np.ascontiguousarray(hsv[..., c])) for c in range(3)]
    image = np.asarray(Image.merge("HSV", bands).convert("RGB"))
  if not contrast_first:
    image = contrast(image)
  return image


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """float32 (v / 255 − mean) / std of a uint8 image (mean, std per channel on [0, 1])."""
  mean, std = np.asarray(mean, np.float32) * 255, np.asarray(std, np.float32) * 255
  return (np.asarray(image, np.float32) - mean) / std


# ---------------------------------------------------------------------------------------
# Pipelines.
# ---------------------------------------------------------------------------------------
class SegTransform:
  """Picklable per-example training transform (grain may run it in worker processes):
  augment, normalise, then pad (image 0 after normalisation, label 255), as mmseg's
  SegDataPreProcessor pads normalised images."""

  def __init__(self, mean, std, crop, **augmentation):
    self.mean, self.std, self.crop, self.augmentation = mean, std, tuple(crop), augmentation

  def __call__(self, image, label, rng) -> tuple:
    image, label = _augment(image, label, rng, self.crop, **self.augmentation)
    image = _pad(normalize(image, self.mean, self.std), self.crop, 0.0)
    return image, _pad(label, self.crop, IGNORE).astype(np.int32)


class _TrainExample:
  """Local example k of this process -> the global example it stands for, augmented."""

  def __init__(self, source, order, transform, seed, global_batch, local_batch, offset):
    self.source, self.order, self.transform, self.seed = source, order, transform, seed
    self.global_batch, self.local_batch, self.offset = global_batch, local_batch, offset

  def __call__(self, k):
    step, row = divmod(int(k), self.local_batch)
    g = step * self.global_batch + self.offset + row  # index in the global stream
    image, label = self.source[self.order[g]]
    return self.transform(image, label, np.random.default_rng([self.seed, g]))


def _stack(examples):
  return data.Batch(np.stack([e[0] for e in examples]), np.stack([e[1] for e in examples]))


def train_batches(
  source,
  *,
  crop: tuple,
  scale: tuple,
  global_batch: int,
  seed: int,
  mean: Sequence[float],
  std: Sequence[float],
  start_step: int = 0,
  process_index: int = 0,
  process_count: int = 1,
  flip: bool = True,
  photometric: bool = True,
  cat_max_ratio: float = 0.75,
  ratio_range: tuple = (0.5, 2.0),
  workers: int = 0,
) -> Iterator[data.Batch]:
  """Infinite iterator of this process's share of each global batch, from `start_step`.

  Rows [p·b, (p+1)·b) of every global batch go to process p (b = global_batch / P).

  Args:
    source: a segmentation source (`seg_source`).
    crop, scale, flip, photometric, cat_max_ratio, ratio_range: the augmentation (`augment`).
    global_batch: examples per step over all processes.
    seed: the shuffle and augmentation seed.
    mean, std: the model's normalisation (per channel, on [0, 1] pixels).
    start_step: the first step to yield (a resumed run's step).
    process_index, process_count: this process's share.
    workers: grain worker processes (0: in this process).
  Returns:
    An iterator of `data.Batch(image float32 (b, crop_h, crop_w, 3), label int32 (b, crop_h,
    crop_w), valid None)`; the batch of step s is the same whatever `start_step` and the
    number of processes.
  """
  if global_batch % process_count:
    raise UserError(f"batch size {global_batch} does not split over {process_count} processes.")
  local = global_batch // process_count
  order = grain.MapDataset.range(len(source)).shuffle(seed=seed).repeat()
  transform = SegTransform(
    mean, std, crop, scale=tuple(scale), ratio_range=tuple(ratio_range),
    cat_max_ratio=cat_max_ratio, flip=flip, photometric=photometric,
  )  # fmt: skip
  fn = _TrainExample(source, order, transform, seed, global_batch, local, process_index * local)
  ds = grain.MapDataset.range(start_step * local, 2**62).map(fn).batch(local, batch_fn=_stack)
  return data.iterate(ds, workers)


def eval_items(
  source, *, process_index: int = 0, process_count: int = 1, limit: Optional[int] = None
) -> Iterator[tuple]:
  """One pass, in order, over this process's items: process_index + k·process_count.

  Args:
    source: a segmentation source.
    process_index, process_count: this process's share.
    limit: read only the first `limit` items of the source (None: all).
  Returns:
    An iterator of (index, uint8 image, uint8 label) at full resolution.
  """
  n = len(source) if limit is None else min(len(source), limit)
  for i in range(process_index, n, process_count):
    image, label = source[i]
    yield i, image, label
