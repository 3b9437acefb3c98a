"""Per-example transforms: uint8 HWC in, float32 HWC (normalised) out.

Inception-style random resized crops and centre crops, timm's RandAugment
(`rand-m9-mstd0.5-inc1`), and `Transform`, the picklable callable a pipeline applies to each
example (training: crop, flip, RandAugment; eval: centre crop); `override` changes a data
config's fields for one use.
"""

import numpy as np
from PIL import Image, ImageEnhance, ImageOps


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
