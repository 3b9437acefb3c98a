"""Packed sequences: images of their own sizes, several to a row of one static length.

NaViT (Dehghani et al. 2023) packs the patches of several images into one sequence and
restricts attention to each image; SigLIP 2's NaFlex gives each image its own grid. Here a
row of `sequence_length` tokens holds up to `max_images` images, each laid out as the model
lays out one image alone (the ViT `[cls, registers…, patches]`, Adventurer `[patches, cls]`),
then padding. `Packed` says, per token, what it is and where it sits, so a model computes
from it alone, in static shapes: block-diagonal attention and SSD resets (`segment_ids`),
each image's position embedding from its own grid, Adventurer's per-image flips and heading
averages. `pack` builds one from a list of images (NumPy, in the data pipeline).
"""

from typing import NamedTuple, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from linearizer.errors import UserError

PAD, PATCH, CLS, REGISTER = 0, 1, 2, 3  # Packed.kind


@flax.struct.dataclass
class Packed:
  """A packed batch: B rows of T tokens, up to M images a row.

  pixels: (B, T, p, p, C) float: each patch token's pixels (zeros for other tokens).
  kind: (B, T) int32: PAD, PATCH, CLS or REGISTER.
  image: (B, T) int32: the token's image slot in its row, 0..M-1; M for padding (so it is
    the segment id attention and the scan read: padding is one segment of its own).
  row, col: (B, T) int32: a patch's place in its image's grid; a register's index in `col`.
  grid: (B, M, 2) int32: each image's (rows, cols) of patches; (0, 0) for an empty slot.
  start: (B, M) int32: where each image's first token sits (T for an empty slot).
  cls_at: (B, M) int32: where each image's CLS token sits (0 for an empty slot or no CLS).
  """

  pixels: jax.Array
  kind: jax.Array
  image: jax.Array
  row: jax.Array
  col: jax.Array
  grid: jax.Array
  start: jax.Array
  cls_at: jax.Array

  @property
  def valid(self) -> jax.Array:
    """(B, M) bool: which image slots hold an image."""
    return self.grid[..., 0] > 0

  def token_grid(self) -> jax.Array:
    """(B, T, 2): each token's image grid ((0, 0) for padding)."""
    m = self.grid.shape[1]
    slot = jnp.minimum(self.image, m - 1)
    grid = jnp.take_along_axis(self.grid, slot[..., None], axis=1)
    return jnp.where((self.image < m)[..., None], grid, 0)

  def image_tokens(self, where: jax.Array) -> jax.Array:
    """(B, T, M) bool: token t is one of image slot m's and `where` (B, T) keeps it."""
    return (self.image[..., None] == jnp.arange(self.grid.shape[1])) & where[..., None]

  def image_mean(self, x: jax.Array, where: jax.Array) -> jax.Array:
    """(B, M, D): the mean of x (B, T, D) over each image's tokens where `where` (B, T)."""
    onehot = self.image_tokens(where)
    total = jnp.einsum("btm,btd->bmd", onehot.astype(x.dtype), x)
    return total / jnp.maximum(onehot.sum(axis=1), 1)[..., None].astype(x.dtype)


def drop_groups(packed) -> dict:
  """DropPath's arguments for a batch: none unpacked; packed, each image (and the padding)
  a sample of its own (`common.DropPath`)."""
  return {} if packed is None else dict(segments=packed.image, count=packed.grid.shape[1] + 1)


def layout(prefix: Sequence[int], suffix: Sequence[int], grid: tuple) -> np.ndarray:
  """The kinds of one image's tokens, as a model lays it out alone."""
  return np.array([*prefix, *[PATCH] * (grid[0] * grid[1]), *suffix], np.int32)


class View(NamedTuple):
  """How one model reads packed images: its patch, row length and layout (`pack_views`)."""

  patch: int
  sequence_length: int
  prefix: tuple = ()
  suffix: tuple = ()

  def tokens(self, index: int, image: np.ndarray) -> int:
    """The tokens image `index` takes here; refuses one that does not fit, by name."""
    h, w = image.shape[:2]
    p = self.patch
    if h < p or w < p or h % p or w % p:
      raise UserError(
        f"pack: image {index} is {h}x{w}; expected sides that are positive multiples of the "
        f"{p}-px patch (resize to the token budget first)."
      )
    need = len(layout(self.prefix, self.suffix, (h // p, w // p)))
    if need > self.sequence_length:
      raise UserError(
        f"pack: image {index} ({h}x{w}) needs {need} tokens, more than sequence_length="
        f"{self.sequence_length}; lower max_patches or raise sequence_length."
      )
    return need


def abstract(rows: int, view: "View", max_images: int, channels: int = 3) -> Packed:
  """A `Packed` of `rows` rows for `view`, as shapes (for compiling a step)."""
  t, m, i32 = view.sequence_length, max_images, jnp.int32
  tokens = lambda: jax.ShapeDtypeStruct((rows, t), i32)
  return Packed(
    pixels=jax.ShapeDtypeStruct((rows, t, view.patch, view.patch, channels), jnp.float32),
    kind=tokens(),
    image=tokens(),
    row=tokens(),
    col=tokens(),
    grid=jax.ShapeDtypeStruct((rows, m, 2), i32),
    start=jax.ShapeDtypeStruct((rows, m), i32),
    cls_at=jax.ShapeDtypeStruct((rows, m), i32),
  )


def pack_views(
  images: Sequence[np.ndarray],
  views: Sequence[View],
  max_images: int,
  rows: int = 0,
  drop: bool = False,
) -> tuple:
  """Packs images greedily (first fit: each image, in order, into the first row that has
  room for it in every view and a free slot, else a new row), the same images in the same
  row and slot for every view (a teacher and its student read one batch with their own
  patches); a row holds at most `max_images` images. `rows`:
  that many rows, the unused ones all padding (static shapes for a jitted step); 0: as
  many as the images take. Images placed past `rows` are refused by name, or with `drop`
  left out (their indices appear in no slot).

  Returns:
    (one `Packed` per view, each with the same B rows; (B, M) int32: the index in `images`
    of each slot, -1 if empty).
  """
  wanted, rows, used = rows, [], []
  limits = np.array([v.sequence_length for v in views])
  for index, image in enumerate(images):
    need = np.array([v.tokens(index, image) for v in views])
    fits = (
      r for r, u in enumerate(used) if len(rows[r]) < max_images and np.all(u + need <= limits)
    )
    r = next(fits, None)
    if r is None:  # first fit: the first row with room in every view, else a new one
      rows.append([])
      used.append(np.zeros(len(views), int))
      r = len(rows) - 1
    rows[r].append(index)
    used[r] += need
  if wanted and len(rows) > wanted and drop:
    rows = rows[:wanted]  # first fit: no kept image's place depends on a dropped one
  if wanted and len(rows) > wanted:
    raise UserError(
      f"pack: {len(images)} images need {len(rows)} rows; rows={wanted} (raise it or the "
      "sequence length, or pack fewer images)."
    )
  rows += [[] for _ in range(wanted - len(rows))]
  slots = np.full((len(rows), max_images), -1, np.int32)
  for b, r in enumerate(rows):
    slots[b, : len(r)] = r
  packed = []
  for v in views:
    per_row = [
      _row(images, r, v.patch, v.sequence_length, max_images, v.prefix, v.suffix) for r in rows
    ]
    packed.append(Packed(**{k: np.stack([p[k] for p in per_row]) for k in per_row[0]}))
  return packed, slots


def pack(
  images: Sequence[np.ndarray],
  patch: int,
  sequence_length: int,
  max_images: int,
  prefix: Sequence[int] = (),
  suffix: Sequence[int] = (),
) -> tuple:
  """Packs images greedily (first fit) into rows of `sequence_length` tokens (`pack_views`
  for one model).

  Args:
    images: (h, w, C) arrays, h and w multiples of `patch` (resize first).
    patch: the model's patch side.
    sequence_length: T, tokens per row.
    max_images: M, image slots per row.
    prefix, suffix: the kinds of the tokens the model puts before and after an image's
      patches (the model's `packing_layout`).

  Returns:
    (Packed with B rows, (B, M) int32: the index in `images` of each slot, -1 if empty).
  """
  (packed,), slots = pack_views(
    images, [View(patch, sequence_length, tuple(prefix), tuple(suffix))], max_images
  )
  return packed, slots


def _row(images, indices, patch, length, max_images, prefix, suffix) -> dict:
  """One row's arrays (`Packed`'s fields without the batch axis)."""
  channels = images[0].shape[-1]
  row = dict(
    pixels=np.zeros((length, patch, patch, channels), np.float32),
    kind=np.full(length, PAD, np.int32),
    image=np.full(length, max_images, np.int32),
    row=np.zeros(length, np.int32),
    col=np.zeros(length, np.int32),
    grid=np.zeros((max_images, 2), np.int32),
    start=np.full(max_images, length, np.int32),
    cls_at=np.zeros(max_images, np.int32),
  )
  at = 0
  for slot, index in enumerate(indices):
    image = np.asarray(images[index], np.float32)
    gh, gw = image.shape[0] // patch, image.shape[1] // patch
    kinds = layout(prefix, suffix, (gh, gw))
    span = slice(at, at + len(kinds))
    row["kind"][span], row["image"][span] = kinds, slot
    row["grid"][slot], row["start"][slot] = (gh, gw), at
    first = at + len(prefix)
    tiles = image.reshape(gh, patch, gw, patch, channels).transpose(0, 2, 1, 3, 4)
    row["pixels"][first : first + gh * gw] = tiles.reshape(gh * gw, patch, patch, channels)
    row["row"][first : first + gh * gw] = np.repeat(np.arange(gh), gw)
    row["col"][first : first + gh * gw] = np.tile(np.arange(gw), gh)
    registers = np.flatnonzero(kinds == REGISTER)
    row["col"][at + registers] = np.arange(len(registers))
    cls = np.flatnonzero(kinds == CLS)
    row["cls_at"][slot] = at + cls[0] if len(cls) else 0
    at += len(kinds)
  return row


def _keys_cubic(t, a: float):
  """Keys' cubic kernel (common._keys_cubic, in jnp)."""
  t = jnp.abs(t)
  near = ((a + 2) * t - (a + 3)) * t * t + 1
  far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
  return jnp.where(t <= 1, near, jnp.where(t < 2, far, 0.0))


def cubic_taps(n_in, n_out, index, offset: float = 0.0) -> tuple:
  """(4 source indices (int32), 4 weights), each (..., 4), of output `index` of n_out when
  resampling n_in positions, all traced: a row of common._cubic_matrix (Keys a=-0.75,
  half-pixel centres, borders clamped; `offset` as there), in float32. An empty grid
  (n_out 0: padding) reads as one position, so its weights stay finite."""
  n_in, n_out = (jnp.asarray(v, jnp.float32)[..., None] for v in (n_in, n_out))
  scale = n_in / (jnp.maximum(n_out, 1.0) + offset)
  src = (jnp.asarray(index, jnp.float32)[..., None] + 0.5) * scale - 0.5
  base = jnp.floor(src)
  taps = jnp.arange(-1, 3, dtype=jnp.float32)
  where = jnp.clip(base + taps, 0, jnp.maximum(n_in - 1, 0)).astype(jnp.int32)
  return where, _keys_cubic(src - base - taps, -0.75)


def resample_weights(n_in: int, n_out, index, antialias: bool, offset: float, bilinear: bool):
  """(..., n_in) weights of output `index` of n_out when resampling n_in positions, for
  traced n_out and index (...): row `index` of common._cubic_matrix / _bilinear_antialias_matrix
  (the same rules, in float32 rather than float64), the identity where n_out == n_in as
  common.resample_grid skips equal grids. An empty grid (n_out 0: padding) reads as one
  position, so no weight is NaN (a NaN there would reach the table's gradient)."""
  j = jnp.arange(n_in, dtype=jnp.float32)
  if not antialias:  # 4 taps of Keys' a=-0.75 around the half-pixel source, borders clamped
    where, taps = cubic_taps(n_in, n_out, index, offset)
    weights = jnp.sum(jnp.where(where[..., None] == j, taps[..., None], 0.0), axis=-2)
  else:  # taps within the widened support, renormalised (torch's antialias path)
    out = jnp.maximum(jnp.asarray(n_out, jnp.float32), 1.0)[..., None]
    i = jnp.asarray(index, jnp.float32)[..., None]
    scale = n_in / (out + (0.0 if bilinear else offset))
    support = jnp.maximum(scale, 1.0) * (1.0 if bilinear else 2.0)
    stretch = 1.0 / jnp.maximum(scale, 1.0)
    centre = scale * (i + 0.5)
    lo = jnp.maximum(jnp.floor(centre - support + 0.5), 0)
    hi = jnp.minimum(jnp.floor(centre + support + 0.5), n_in)
    t = (j - centre + 0.5) * stretch
    taps = jnp.maximum(0.0, 1.0 - jnp.abs(t)) if bilinear else _keys_cubic(t, -0.5)
    taps = jnp.where((j >= lo) & (j < hi), taps, 0.0)
    weights = taps / taps.sum(axis=-1, keepdims=True)
  n_out = jnp.asarray(n_out, jnp.float32)[..., None]
  identity = (j == jnp.asarray(index, jnp.float32)[..., None]).astype(jnp.float32)
  return jnp.where(n_out == n_in, identity, weights)


def patch_pos_embed(table, table_grid: tuple, packed: Packed, mode: tuple):
  """(B, T, D): each patch token's position embedding, the (1, h*w, D) grid `table`
  resampled to its own image's grid at its (row, col) (`mode`: vit_config's
  POS_INTERPOLATIONS entry); zeros for other tokens."""
  grid = packed.token_grid()
  wy = resample_weights(table_grid[0], grid[..., 0], packed.row, *mode)  # (B, T, h)
  wx = resample_weights(table_grid[1], grid[..., 1], packed.col, *mode)  # (B, T, w)
  t = table.reshape(*table_grid, table.shape[-1]).astype(jnp.float32)
  pos = jnp.einsum("bty,btx,yxd->btd", wy, wx, t, precision=jax.lax.Precision.HIGHEST)
  return jnp.where((packed.kind == PATCH)[..., None], pos, 0.0)


def embed_patches(conv, packed: Packed):
  """(B, T, D): the patch-embedding conv applied to each token's own pixels."""
  b, t, p, _, c = packed.pixels.shape
  x = conv(packed.pixels.reshape(b * t, p, p, c).astype(conv.kernel.dtype))
  return x.reshape(b, t, -1).astype(jnp.float32)
