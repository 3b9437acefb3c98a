"""Sizes checked against memory before anything is traced: a forward at an image size that
cannot fit this host (or this accelerator) is refused by name, with the estimate and the
limit, instead of an allocation failure or a compiler abort half-way through a run.

The estimate is a lower bound, so nothing that fits is refused: the float32 input and the
residual stream after every block (a `ModelOutput` keeps them all: `.blocks`), at the
model's dtype, (image_size / patch)² tokens wide.
"""

import os

import jax
import jax.numpy as jnp

from linearizer.errors import UserError


def human(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
    if n < 1024 or unit == "PiB":
      return f"{n:.1f} {unit}"
    n /= 1024


def available() -> tuple:
  """(bytes, where): an accelerator's limit for one program, else the host's free memory."""
  device = jax.local_devices()[0]
  if device.platform != "cpu":
    limit = (device.memory_stats() or {}).get("bytes_limit")
    if limit:
      return int(limit), f"one {device.device_kind}"
  try:
    with open("/proc/meminfo", encoding="utf-8") as f:
      free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
  except (OSError, StopIteration):
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  return free, "this host's free memory"


def forward_bytes(cfg, image_size: int, batch: int) -> tuple:
  """(a lower bound of a forward's bytes, its tokens) for model config `cfg`."""
  tokens = (image_size // cfg.patch) ** 2 + 1
  streams = (cfg.depth + 1) * tokens * cfg.width * jnp.dtype(cfg.dtype).itemsize
  return batch * (image_size * image_size * 3 * 4 + streams), tokens


def check(what: str, cfg, image_size: int, batch: int) -> None:
  """Raises UserError when a forward of `cfg` at `image_size`² and `batch` images (on one
  device: the caller divides a batch split over several) cannot fit."""
  need, tokens = forward_bytes(cfg, image_size, batch)
  have, where = available()
  if need > have:
    raise UserError(
      f"{what}: a forward at {image_size}² with {batch} image(s) needs at least {human(need)} "
      f"({tokens:,} tokens × width {cfg.width} × {cfg.depth + 1} residual streams), more than "
      f"the {human(have)} of {where}: use a smaller size or batch."
    )
