"""Pieces both models share: the output contract, position-embedding resampling, drop path."""

import dataclasses
import functools
from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from linearizer.errors import UserError


@dataclasses.dataclass(frozen=True)
class TokenRoles:
  """Where each kind of token sits in a model's sequence (negative indices count from the end).

  cls: the index of the CLS token, or None for a model without one.
  patches: (start, stop) of the patch tokens, in raster order; stop None = to the end.
  registers: (start, stop) of register tokens (none by default), which no loss reads.
  """

  cls: Optional[int]
  patches: tuple
  registers: tuple = (0, 0)

  def cls_of(self, x: jax.Array) -> Optional[jax.Array]:
    """(B, T, D) -> (B, 1, D): the CLS token, or None."""
    if self.cls is None:
      return None
    return x[:, self.cls : (self.cls + 1) or None]

  def patches_of(self, x: jax.Array) -> jax.Array:
    """(B, T, D) -> (B, N, D): the patch tokens in raster order."""
    return x[:, slice(*self.patches)]


@flax.struct.dataclass
class ModelOutput:
  """The output contract of every model (design.md).

  logits: (B, classes) or None when the model has no head.
  tokens: (B, T, D) final-norm tokens in the model's own order.
  blocks: the residual stream after every block, each (B, T, D).
  roles: where CLS, patches (and registers) sit in `tokens` and every block; consumers use
    `.cls`, `.patches` or `roles.patches_of(block)`, never a position of their own.
  mixers: every block's token-mixer branch as it joins the residual stream (attention with
    its layer scale in the ViT, the SSM branch in Adventurer; before drop path), each
    (B, T, D) in the same order as `blocks`: the `mixer_out` loss reads them.
  packing: None, or the `packing.Packed` layout of a packed batch (several images of their
    own sizes a row): then `tokens`, `blocks` and `mixers` are (B, T, D) in the packed order
    (`packing.kind` says which are patches), `cls` is (B, M, D), one per image slot
    (`packing.valid` says which hold an image), and `logits` (B, M, classes).
  """

  logits: Optional[jax.Array]
  tokens: jax.Array
  blocks: tuple
  roles: TokenRoles = flax.struct.field(pytree_node=False)
  mixers: tuple = ()
  packing: Any = None

  @property
  def cls(self) -> Optional[jax.Array]:
    """(B, 1, D) final-norm CLS token, or None; packed: (B, M, D), one per image slot."""
    if self.packing is not None:
      if self.roles.cls is None:
        return None
      return jnp.take_along_axis(self.tokens, self.packing.cls_at[..., None], axis=1)
    return self.roles.cls_of(self.tokens)

  @property
  def patches(self) -> jax.Array:
    """(B, N, D) final-norm patch tokens in raster order."""
    if self.packing is not None:
      raise UserError(
        "A packed output has no (B, N, D) patch grid: read `tokens` where packing.kind is "
        "PATCH (each image's patches in raster order from its start)."
      )
    return self.roles.patches_of(self.tokens)


def parse_variant(variant: str, widths: dict) -> tuple:
  """'B/16' -> (widths['B'], 16). Raises one clear error for an unknown size."""
  name, _, patch = variant.partition("/")
  if name not in widths or not patch.isdigit():
    raise UserError(
      f"Unknown variant {variant!r}: expected '<size>/<patch>' with size "
      f"in {sorted(widths)} and an integer patch, e.g. 'B/16'."
    )
  return widths[name], int(patch)


def _keys_cubic(t, a: float):
  """Keys' cubic convolution kernel with parameter `a`."""
  t = np.abs(t)
  return np.where(
    t <= 1,
    ((a + 2) * t - (a + 3)) * t * t + 1,
    np.where(t < 2, ((a * t - 5 * a) * t + 8 * a) * t - 4 * a, 0.0),
  )


def _triangle(t):
  """The bilinear (tent) kernel."""
  return np.maximum(0.0, 1.0 - np.abs(t))


@functools.lru_cache(maxsize=None)
def _bilinear_antialias_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) weights of torch's F.interpolate(mode='bilinear', align_corners=False,
  antialias=True), what transformers' SigLIP 2 resizes its position embedding with: the
  tent widened by the downscale factor, taps outside the input dropped, the rest
  renormalised (upsampling: plain bilinear with the border clamped)."""
  scale = n_in / n_out
  support, stretch = max(scale, 1.0), 1 / max(scale, 1.0)
  weights = np.zeros((n_out, n_in))
  for i in range(n_out):
    centre = scale * (i + 0.5)
    lo, hi = max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5), n_in)
    taps = _triangle((np.arange(lo, hi) - centre + 0.5) * stretch)
    weights[i, lo:hi] = taps / taps.sum()
  return weights


@functools.lru_cache(maxsize=None)
def _cubic_matrix(
  n_in: int, n_out: int, antialias: bool = False, offset: float = 0.0
) -> np.ndarray:
  """(n_out, n_in) weights of 1-D bicubic resampling as torch's F.interpolate computes it
  (mode='bicubic', align_corners=False: half-pixel centres).

  antialias=False: Keys' cubic with a=-0.75, border indices clamped: the rule `transformers`
  (ViT, CLIP, DINOv2, SigLIP) and timm use to resample position embeddings.
  antialias=True: torch's antialiased path (what `transformers`' DINOv2 with registers asks
  for): a=-0.5, the kernel widened by the downscale factor, taps outside the input dropped
  and the rest renormalised, so it differs from the plain rule even when upsampling.
  offset: DINOv2's torch-hub code asks torch for a scale factor (n_out + 0.1) / n_in rather
  than a size ("a historical kludge", facebookresearch/dino#8), and torch then maps
  coordinates by that factor: 0.1 here reproduces it.
  """
  scale = n_in / (n_out + offset)
  weights = np.zeros((n_out, n_in))
  if antialias:
    support, stretch = 2 * max(scale, 1.0), 1 / max(scale, 1.0)
    for i in range(n_out):
      centre = scale * (i + 0.5)
      lo, hi = max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5), n_in)
      taps = _keys_cubic((np.arange(lo, hi) - centre + 0.5) * stretch, -0.5)
      weights[i, lo:hi] = taps / taps.sum()
    return weights
  src = (np.arange(n_out) + 0.5) * scale - 0.5
  base = np.floor(src).astype(int)
  frac = src - base
  for tap in range(-1, 3):
    idx = np.clip(base + tap, 0, n_in - 1)
    np.add.at(weights, (np.arange(n_out), idx), _keys_cubic(frac - tap, -0.75))
  return weights


def resample_grid(
  tokens: jax.Array,
  old_grid: tuple,
  new_grid: tuple,
  antialias: bool = False,
  offset=0.0,
  bilinear: bool = False,
) -> jax.Array:
  """Bicubic resampling of (..., h*w, D) grid tokens in raster order to a new (h', w') grid
  (`antialias`, `offset`: the variants of torch's bicubic, see `_cubic_matrix`; `bilinear`:
  torch's antialiased bilinear instead, `_bilinear_antialias_matrix`)."""
  if tuple(old_grid) == tuple(new_grid):
    return tokens
  (h, w), (nh, nw) = old_grid, new_grid
  grid = tokens.reshape(*tokens.shape[:-2], h, w, tokens.shape[-1])
  matrix = (
    _bilinear_antialias_matrix
    if bilinear
    else functools.partial(_cubic_matrix, antialias=antialias, offset=offset)
  )
  wy = jnp.asarray(matrix(h, nh), jnp.float32)
  wx = jnp.asarray(matrix(w, nw), jnp.float32)
  out = jnp.einsum(
    "yh,...hwd,xw->...yxd", wy, grid.astype(jnp.float32), wx, precision=jax.lax.Precision.HIGHEST
  )
  return out.reshape(*tokens.shape[:-2], nh * nw, tokens.shape[-1]).astype(tokens.dtype)


def resample_pos_embed(
  pos: jax.Array,
  old_grid: tuple,
  new_grid: tuple,
  cls_at: Optional[str],
  antialias: bool = False,
  offset: float = 0.0,
  bilinear: bool = False,
) -> jax.Array:
  """Resamples a (1, N+1, D) position embedding; the CLS slot (`first` or `last`) is kept.
  cls_at=None: a (1, N, D) embedding without a CLS slot (SigLIP)."""
  grid = lambda p: resample_grid(p, old_grid, new_grid, antialias, offset, bilinear)
  if cls_at is None:
    return grid(pos)
  if cls_at == "first":
    return jnp.concatenate([pos[:, :1], grid(pos[:, 1:])], axis=1)
  if cls_at == "last":
    return jnp.concatenate([grid(pos[:, :-1]), pos[:, -1:]], axis=1)
  raise UserError(f"cls_at must be 'first', 'last' or None, got {cls_at!r}")


def patch_grid(image_hw: tuple, patch: int) -> tuple:
  return (image_hw[0] // patch, image_hw[1] // patch)


def check_images(images: jax.Array, channels: int, patch: int) -> None:
  """One clear message for images a model cannot take (checked at trace time)."""
  if images.ndim != 4 or images.shape[-1] != channels:
    raise UserError(f"Expected NHWC images with {channels} channels, got shape {images.shape}.")
  if images.shape[1] < patch or images.shape[2] < patch:
    raise UserError(f"Images of size {images.shape[1:3]} are smaller than one {patch}px patch.")
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise UserError(f"Expected normalised float images, got dtype {images.dtype}.")


class DropPath(nnx.Module):
  """Stochastic depth: drops a whole residual branch per sample, scales the rest by 1/keep."""

  def __init__(self, rate: float, *, rngs: nnx.Rngs):
    self.rate = rate
    self.dropout = nnx.Dropout(rate, broadcast_dims=(1, 2), rngs=rngs) if rate > 0 else None

  def __call__(self, x, *, train: bool, segments=None, count: int = 0):
    """x (B, T, D); `segments` (B, T) in [0, count): a packed batch, whose images (not
    rows) are the samples a branch is dropped for."""
    if self.dropout is None or not train:
      return x
    if segments is None:
      return self.dropout(x, deterministic=False)
    b = x.shape[0]
    keep = self.dropout(jnp.ones((b * count, 1, 1), x.dtype), deterministic=False)
    return x * jnp.take_along_axis(keep.reshape(b, count), segments, axis=1)[..., None]


# torch.nn.Linear's default init, U(±1/sqrt(fan_in)): what Adventurer keeps for its linears.
torch_linear_init = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
trunc_normal_02 = nnx.initializers.truncated_normal(0.02)
