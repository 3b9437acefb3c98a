"""Segmentation datasets on disk and in tfds: (uint8 (H, W, 3) RGB image, uint8 (H, W) label
map) pairs, labels being class ids or 255 (`IGNORE`).

`SegFolder` (`images/` + `masks/`), `ADE20K` (ADEChallengeData2016, mmseg's
reduce_zero_label), `Cityscapes` (trainIds, or labelIds mapped by CITYSCAPES_TRAIN_IDS) and
`TfdsSegmentation` (prepared scene_parse150 / cityscapes). The splits every segmentation
source has (`SPLITS`) and their check are here too; `pipeline.seg_source` names a source by
a string.
"""

import os

import numpy as np
from PIL import Image

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


def check_split(split: str, name: str) -> None:
  if split not in SPLITS:
    raise UserError(f"{name}: split {split!r}; expected one of {SPLITS}.")


class _Pairs:
  """Random access to (image file, mask file, lut) triples: the mask's values are mapped by
  the lut (None: as they are), then checked against the image's size and num_classes."""

  def __init__(self, name, pairs, num_classes):
    self.name, self.pairs, self.num_classes = name, pairs, num_classes

  def __len__(self) -> int:
    return len(self.pairs)

  def __getitem__(self, i: int) -> tuple:
    image_path, mask_path, lut = self.pairs[i]
    image = data.read_image(image_path)  # upright; a mask with an orientation is turned too
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
      values = np.asarray(data.upright(im)).astype(np.int64)
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
        stem = rel[: len(rel) - len(tail) - len(suffix)]
        if stem in found:
          raise UserError(
            f"{found[stem]} and {os.path.join(here, f)} have one stem, {stem!r}: which one "
            "its mask labels cannot be told; keep one image per stem."
          )
        found[stem] = os.path.join(here, f)
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


def scanned_classes(name: str, masks: list) -> int:
  """The class count of a folder's label maps, their largest value below 255 plus one,
  once the values are seen to be class ids: refused when they are spread far wider than
  they are many (grey levels or colours saved as a mask: {0, 128} would make a 129-class
  head with 127 classes never seen), or when 255 (ignore) covers most pixels (a 0/255
  binary mask would train on the background alone)."""
  counts = np.zeros(256, np.int64)
  for path in masks:
    counts += np.bincount(_read_mask(path).ravel(), minlength=256)
  found = np.flatnonzero(counts[:IGNORE])
  if not found.size:
    raise UserError(f"{name}: every mask is all {IGNORE} (ignore); no class to learn.")
  classes = int(found.max()) + 1
  if classes > 2 * found.size + 8:
    raise UserError(
      f"{name}: the masks hold the values {found.tolist()[:12]}"
      f"{' …' if found.size > 12 else ''}, which look like grey levels or colours rather than "
      f"class ids (a {classes}-class head, {classes - found.size} of them never seen); expected "
      f"ids 0 … K-1 and {IGNORE} for ignore (or set segment.data.num_classes)."
    )
  ignored = counts[IGNORE] / counts.sum()
  if ignored > 0.5:
    raise UserError(
      f"{name}: {IGNORE} (ignore) covers {100 * ignored:.0f}% of the mask pixels, so most "
      f"of every image would not be learned from; a 0/{IGNORE} binary mask? expected class "
      f"ids (e.g. 0 background, 1 object) and {IGNORE} only where no label applies."
    )
  return classes


class SegFolder(_Pairs):
  """`root/images/<stem>.{png,jpg,jpeg}` with `root/masks/<stem>.png`, split into
  `images/{train,val}` (and the same under masks/) when those exist, else by
  `data.split_index`. num_classes: given, or the largest value < 255 in any mask + 1."""

  def __init__(self, root: str, split: str, num_classes: int = 0):
    name = f"segfolder:{root}"
    check_split(split, name)
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
      num_classes = scanned_classes(name, [m for _, m, _ in every])
    super().__init__(f"{name}:{split}", [(i, m, None) for i, m, _ in pairs], int(num_classes))


class ADE20K(_Pairs):
  """ADEChallengeData2016: `images/{training,validation}/*.jpg` with
  `annotations/{training,validation}/*.png`; 150 classes with mmseg's reduce_zero_label."""

  def __init__(self, root: str, split: str):
    name = f"ade20k:{root}"
    check_split(split, name)
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
    check_split(split, name)
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
    check_split(split, f"tfds:{name}")
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
