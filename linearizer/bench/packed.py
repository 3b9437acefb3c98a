"""The mixed-size rows (part `packed`, issue 43): one workload of images of their own sizes
read two ways by each model, as one padded square batch (every image on a canvas of the
largest side, as a square pipeline must) and as packed rows (`models.packing.pack`): img/s
of the whole workload and the share of the tokens that are no image's patch.

The workload (`config.bench.packed`, documented in docs/packing.md): `workload_images`
sides drawn log-uniformly in `side_scale` × `median_side`, aspect ratios log-uniformly in
[1/`max_aspect`, `max_aspect`], both rounded to the model's patch; the same draw for every
model (seed 0).
"""

import numpy as np

from linearizer.bench.forward import forward_fn
from linearizer.bench.rows import each_model, failed_row
from linearizer.bench.settings import Settings
from linearizer.bench.timing import timed, timed_row
from linearizer.log import log
from linearizer.models import packing


def workload(n: int, base: int, scale: tuple, aspect: float, patch: int, seed: int = 0) -> list:
  """[(h, w)] of `n` images (the module docstring), sides multiples of `patch`."""
  rng = np.random.default_rng(seed)
  side = base * np.exp(rng.uniform(*np.log(scale), n))
  ratio = np.exp(rng.uniform(-np.log(aspect), np.log(aspect), n))
  snap = lambda v: np.maximum(patch, np.round(v / patch).astype(int) * patch)
  return list(zip(snap(side * np.sqrt(ratio)).tolist(), snap(side / np.sqrt(ratio)).tolist()))


def layouts(model, sizes, sequence_length: int, max_images: int):
  """{'padded': one square batch, 'packed': packed rows} of zero images of `sizes`, each
  with its token count and the count of tokens that are some image's patch."""
  p = model.cfg.patch
  real = sum((h // p) * (w // p) for h, w in sizes)
  side = max(max(h, w) for h, w in sizes)
  extra = sum(map(len, model.packing_layout))
  square = np.zeros((len(sizes), side, side, 3), np.float32)
  images = [np.zeros((h, w, 3), np.float32) for h, w in sizes]
  prefix, suffix = model.packing_layout
  rows, _ = packing.pack(images, p, sequence_length, max_images, prefix, suffix)
  return {
    "padded": (square, len(sizes) * ((side // p) ** 2 + extra), side),
    "packed": (rows, rows.kind.size, sequence_length),
  }, real


def packed_rows(config, s: Settings, base, peak):
  """Padded vs packed forward rows of the workload, teacher (each attention impl) and student."""
  cfg, rows = config.bench.packed, []
  for model, name, attn, meta in each_model(config, s, base):
    sizes = workload(
      cfg.workload_images, cfg.median_side, tuple(cfg.side_scale), cfg.max_aspect, model.cfg.patch
    )
    fn, state = forward_fn(model)
    ways, real = layouts(model, sizes, cfg.row_tokens, cfg.row_images)
    for layout, (batch, tokens, res) in ways.items():
      try:
        row = timed_row(
          meta,
          peak,
          batch=len(sizes),
          **timed(fn, (state, batch), s.repeats),
          kind="packed",
          layout=layout,
          resolution=res,
          tokens=tokens,
          patch_tokens=real,
          padding_share=1 - real / tokens,
        )
      except Exception as err:  # recorded, not fatal (as the forward rows)
        rows.append(failed_row(meta, "packed", res, err, f"packed {name} {attn or ''} {layout}"))
        continue
      rows.append(row)
      log(
        f"[bench] mixed sizes {name:<18} {attn or '':<7} {layout:<6} {row['img_per_s']:9.2f} "
        f"img/s, {100 * row['padding_share']:5.1f}% of {tokens} tokens not a patch"
      )
  return rows
