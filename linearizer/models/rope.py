"""2-D rotary position embeddings (RoPE) as the ViT teachers of 2023-2026 apply them.

RoPE (Su et al. 2021) rotates each query and key by angles that grow with the token's
position, so q·k depends on the offset between two patches; a 2-D ViT gives half of each
head's rotation pairs to the row and half to the column. Nothing of it is stored in a
checkpoint (timm and transformers rebuild the frequencies as non-persistent buffers), so
each variant is a config value here and is tested against its library's forward
(tests/convert/test_rope_teachers.py). Only patch tokens rotate: CLS and registers
("storage" tokens) keep their q and k, in all three.

With n = head_dim / 4 frequencies f_i = T^(-i/n), i < n, per axis:

  kind     T      coordinate of patch row r in a grid of H rows       pairs       axes
  eva02  10^4   (r + offset) / H * rope_grid   (timm RotaryEmbeddingCat)  interleaved (row, col)
  pe     10^4   the same, offset 1 (0 for the gigantic models)             interleaved (col, row)
  dinov3  100   2π ((r + 0.5) / H * 2 - 1)      (DINOv3 RopePositionEmbedding) halves    (row, col)

"interleaved" rotates dims (2j, 2j+1) together (timm `rot`), "halves" dims (j, j + D/2)
(`rotate_half`, DINOv3 and transformers). eva02 and pe scale the coordinates to the grid
the model was trained on (timm `ref_feat_shape`), so another resolution stretches the same
range; dinov3 normalises to [-1, 1] by construction. DINOv3 trained with random shifts,
jitter and rescaling of the coordinates; those apply in training only, and a teacher here
is always frozen, so none is applied.
"""

from typing import Literal, Optional

import jax.numpy as jnp
import numpy as np

Kind = Literal["eva02", "pe", "dinov3"]
KINDS = ("eva02", "pe", "dinov3")
TEMPERATURES = {"eva02": 10000.0, "pe": 10000.0, "dinov3": 100.0}
HALVES = {"eva02": False, "pe": False, "dinov3": True}  # which dims rotate together


def _axis(kind: Kind, size: int, offset: float, rope_grid: Optional[int]) -> np.ndarray:
  """The coordinates of one axis's `size` patches, float32 as the libraries compute them."""
  if kind == "dinov3":
    return 2.0 * (np.arange(0.5, size, dtype=np.float32) / np.float32(size)) - 1.0
  t = np.arange(size, dtype=np.float32) + np.float32(offset)
  return t if rope_grid is None else t / np.float32(size) * np.float32(rope_grid)


def _bands(kind: Kind, head_dim: int, temperature: Optional[float]) -> np.ndarray:
  """The n = head_dim / 4 frequencies T^(-i/n) per axis, float32 (× 2π for dinov3)."""
  n = head_dim // 4
  t = np.float32(TEMPERATURES[kind] if temperature is None else temperature)
  bands = (1.0 / t ** (np.arange(n, dtype=np.float32) / np.float32(n))).astype(np.float32)
  return bands * np.float32(2 * np.pi) if kind == "dinov3" else bands


def tables(
  kind: Kind,
  grid: tuple,
  head_dim: int,
  temperature: Optional[float] = None,
  offset: float = 0.0,
  rope_grid: Optional[int] = None,
) -> tuple:
  """(cos, sin), each (h * w, head_dim) float32 for the patches of an (h, w) grid in raster
  order, laid out for `rotate` with this kind's pairing.

  Args:
    kind: 'eva02', 'pe' or 'dinov3' (the module docstring).
    grid: (rows, columns) of patches.
    head_dim: dims per head (a multiple of 4).
    temperature: T; None: the kind's.
    offset: added to the integer coordinates (eva02, pe).
    rope_grid: the side of the grid the coordinates are scaled to (eva02, pe); None: none.
  """
  bands = _bands(kind, head_dim, temperature)
  rows, cols = (_axis(kind, s, offset, rope_grid) for s in grid)
  r, c = np.meshgrid(rows, cols, indexing="ij")  # (h, w) each
  first, second = (c, r) if kind == "pe" else (r, c)  # pe: timm's grid_indexing='xy'
  angles = np.concatenate([first.reshape(-1, 1) * bands, second.reshape(-1, 1) * bands], axis=1)
  angles = np.tile(angles, 2) if HALVES[kind] else np.repeat(angles, 2, axis=1)
  return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def token_tables(
  kind: Kind,
  rows,
  cols,
  grid,
  head_dim: int,
  temperature: Optional[float] = None,
  offset: float = 0.0,
  rope_grid: Optional[int] = None,
) -> tuple:
  """`tables` per token of a packed batch, in jnp: (cos, sin), each (B, T, head_dim), for
  patches at (rows, cols) (B, T) of images of `grid` (B, T, 2) patches (the same float32
  coordinates and bands as `tables`, which computes them in NumPy for one grid)."""
  bands = _bands(kind, head_dim, temperature)

  def axis(index, size):
    size = jnp.maximum(size, 1).astype(jnp.float32)
    if kind == "dinov3":
      return 2.0 * ((index.astype(jnp.float32) + 0.5) / size) - 1.0
    c = index.astype(jnp.float32) + np.float32(offset)
    return c if rope_grid is None else c / size * np.float32(rope_grid)

  r, c = axis(rows, grid[..., 0]), axis(cols, grid[..., 1])
  first, second = (c, r) if kind == "pe" else (r, c)
  angles = jnp.concatenate([first[..., None] * bands, second[..., None] * bands], axis=-1)
  angles = jnp.tile(angles, 2) if HALVES[kind] else jnp.repeat(angles, 2, axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def rotate(x, cos, sin, halves: bool):
  """x (B, N, heads, D) rotated by (N, D) or per-row (B, N, D) tables: x cos + rot(x) sin."""
  if halves:  # (x1, x2) -> (-x2, x1)
    x1, x2 = jnp.split(x, 2, axis=-1)
    turned = jnp.concatenate([-x2, x1], axis=-1)
  else:  # pairs (x0, x1) -> (-x1, x0)
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    turned = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
  cos, sin = cos[..., None, :].astype(x.dtype), sin[..., None, :].astype(x.dtype)
  return x * cos + turned * sin
