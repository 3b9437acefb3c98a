"""Dense prediction on any backbone of the model table: multi-level features, the neck that
turns a plain (single-stride) backbone into a pyramid, and the UperNet / linear / FCN heads.

The plain-backbone UperNet setup of mmsegmentation (method.md §9; mmseg's MAE/BEiT ViT-B
configs): patch features after blocks `out_indices` (4, 6, 8, 12 of 12), read through the
backbone's token roles (no slicing of our own), rescaled ×4, ×2, ×1, ×0.5 (strides 4 to 32
for patch 16: two 2×2 deconvolutions, one, none, a 2×2 max-pool), then UperNet (a pyramid
pooling module on the coarsest level, FPN top-down fusion, every level fused at stride 4).

Normalisation is GroupNorm, where mmseg uses SyncBN: it computes no batch statistics, so it
is the same under any data + FSDP mesh and any per-device batch (the recipes' 2 images per
GPU are why mmseg needs SyncBN), and the same at train and eval time, with no running
averages to carry in the train state.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from linearizer.errors import UserError

HEADS = ("upernet", "linear")


@dataclasses.dataclass(frozen=True)
class SegmenterConfig:
  """What a segmentation model adds to its backbone.

  num_classes: classes of the label maps (255 is ignored, never a class).
  head: 'upernet' (the paper's) or 'linear' (1×1 on the last features: the cheap probe).
  channels: UperNet's width (mmseg: 768 for ViT-B MAE/BEiT, 512 for the ResNet setups).
  out_indices: the blocks whose outputs feed the neck; () = mmseg's 3, 5, 7, 11 of 12,
    scaled to the backbone's depth.
  pool_scales: the pyramid pooling module's output grids (PSPNet's 1, 2, 3, 6).
  aux_channels: the auxiliary FCN head's width on the ×1 level; 0 = no auxiliary head.
  dropout: before each classifier (mmseg's 0.1).
  groups: GroupNorm's groups (at most; fewer when a width does not divide).
  """

  num_classes: int
  head: str = "upernet"
  channels: int = 768
  out_indices: tuple = ()
  pool_scales: tuple = (1, 2, 3, 6)
  aux_channels: int = 256
  dropout: float = 0.1
  groups: int = 32

  def __post_init__(self):
    if not isinstance(self.num_classes, int) or not 1 < self.num_classes < 255:
      raise UserError(f"num_classes={self.num_classes!r}; expected 2 … 254 (255 is ignore).")
    if self.head not in HEADS:
      raise UserError(f"head={self.head!r}; expected one of {HEADS}.")
    if self.channels < 1 or self.aux_channels < 0:
      raise UserError(f"channels={self.channels}, aux_channels={self.aux_channels}: too small.")


def default_out_indices(depth: int) -> tuple:
  """mmseg's blocks 4, 6, 8, 12 of 12 (out_indices 3, 5, 7, 11), scaled to `depth`."""
  return tuple(max(0, round(depth * k / 12) - 1) for k in (4, 6, 8, 12))


def resize(x: jax.Array, hw: tuple) -> jax.Array:
  """Bilinear NHWC resize as torch's F.interpolate(align_corners=False): no antialiasing."""
  if tuple(x.shape[1:3]) == tuple(hw):
    return x
  return jax.image.resize(x, (x.shape[0], *hw, x.shape[3]), "bilinear", antialias=False)


@functools.lru_cache(maxsize=None)
def _adaptive_pool_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) averaging weights of torch's adaptive_avg_pool: bin i covers
  [floor(i·n/s), ceil((i+1)·n/s))."""
  m = np.zeros((n_out, n_in))
  for i in range(n_out):
    lo, hi = (i * n_in) // n_out, -(-((i + 1) * n_in) // n_out)
    m[i, lo:hi] = 1.0 / (hi - lo)
  return m


def adaptive_avg_pool(x: jax.Array, size: int) -> jax.Array:
  wy = jnp.asarray(_adaptive_pool_matrix(x.shape[1], size), x.dtype)
  wx = jnp.asarray(_adaptive_pool_matrix(x.shape[2], size), x.dtype)
  return jnp.einsum("yh,bhwc,xw->byxc", wy, x, wx)


def groups_for(channels: int, groups: int) -> int:
  """The most groups ≤ `groups` that divide `channels` with at least 2 channels each (a
  group of one channel would normalise a 1×1 pooled map to its bias alone)."""
  return max(g for g in range(1, groups + 1) if channels % g == 0 and channels // g >= 2)


class ConvNormAct(nnx.Module):
  """Conv (no bias) → GroupNorm → ReLU: mmseg's ConvModule."""

  def __init__(self, cin: int, cout: int, kernel: int, groups: int, *, rngs: nnx.Rngs):
    self.conv = nnx.Conv(cin, cout, (kernel, kernel), padding="SAME", use_bias=False, rngs=rngs)
    self.norm = nnx.GroupNorm(cout, num_groups=groups_for(cout, groups), rngs=rngs)

  def __call__(self, x):
    return jax.nn.relu(self.norm(self.conv(x)))


class Neck(nnx.Module):
  """Four grids of width D from four block outputs: ×4, ×2, ×1, ×0.5 the patch grid (mmseg
  BEiT/MAE `fpn1…fpn4`; GroupNorm in place of BN). Ours, not mmseg's: each level is
  layer-normed first, since the raw residual streams of both backbones grow with depth and
  the Adventurer's are RMS-normed only inside its blocks; and the max-pool rounds up (ceil
  mode) where torch's rounds down, so an odd grid keeps its last row and a 1×1 grid
  survives."""

  def __init__(self, width: int, groups: int, *, rngs: nnx.Rngs):
    up = lambda: nnx.ConvTranspose(width, width, (2, 2), strides=(2, 2), rngs=rngs)
    self.norms = nnx.List([nnx.LayerNorm(width, rngs=rngs) for _ in range(4)])
    self.up4a, self.up4b, self.up2 = up(), up(), up()
    self.up4_norm = nnx.GroupNorm(width, num_groups=groups_for(width, groups), rngs=rngs)

  def __call__(self, features):
    f = [norm(x) for norm, x in zip(self.norms, features)]
    x4 = self.up4b(jax.nn.gelu(self.up4_norm(self.up4a(f[0])), approximate=False))
    x2 = self.up2(f[1])
    odd = ((0, f[3].shape[1] % 2), (0, f[3].shape[2] % 2))
    x05 = nnx.max_pool(f[3], (2, 2), strides=(2, 2), padding=odd)
    return [x4, x2, f[2], x05]


class UperHead(nnx.Module):
  """UperNet (Xiao et al. 2018; mmseg UPerHead): PPM on the coarsest level, lateral 1×1s,
  top-down sums, 3×3 FPN convs, every level resized to the finest and fused by a 3×3."""

  def __init__(self, cfg: SegmenterConfig, width: int, *, rngs: nnx.Rngs):
    c, g = cfg.channels, cfg.groups
    self.scales = tuple(cfg.pool_scales)
    self.ppm = nnx.List([ConvNormAct(width, c, 1, g, rngs=rngs) for _ in self.scales])
    self.bottleneck = ConvNormAct(width + len(self.scales) * c, c, 3, g, rngs=rngs)
    self.lateral = nnx.List([ConvNormAct(width, c, 1, g, rngs=rngs) for _ in range(3)])
    self.fpn = nnx.List([ConvNormAct(c, c, 3, g, rngs=rngs) for _ in range(3)])
    self.fuse = ConvNormAct(4 * c, c, 3, g, rngs=rngs)
    self.dropout = nnx.Dropout(cfg.dropout, broadcast_dims=(1, 2), rngs=rngs)  # Dropout2d
    self.classifier = nnx.Conv(c, cfg.num_classes, (1, 1), rngs=rngs)

  def __call__(self, levels, *, train: bool):
    top = levels[3]
    pooled = [
      resize(conv(adaptive_avg_pool(top, s)), top.shape[1:3])
      for conv, s in zip(self.ppm, self.scales)
    ]
    lat = [conv(x) for conv, x in zip(self.lateral, levels[:3])]
    lat.append(self.bottleneck(jnp.concatenate([top, *pooled], axis=-1)))
    for i in (3, 2, 1):  # top-down: coarse into fine
      lat[i - 1] = lat[i - 1] + resize(lat[i], lat[i - 1].shape[1:3])
    outs = [conv(x) for conv, x in zip(self.fpn, lat[:3])] + [lat[3]]
    fine = outs[0].shape[1:3]
    x = self.fuse(jnp.concatenate([resize(o, fine) for o in outs], axis=-1))
    return self.classifier(self.dropout(x, deterministic=not train))


class LinearHead(nnx.Module):
  """A 1×1 conv on the last block's (normed) patch features: the linear probe of DINOv2
  and BEiT's segmentation tables."""

  def __init__(self, cfg: SegmenterConfig, width: int, *, rngs: nnx.Rngs):
    self.norm = nnx.GroupNorm(width, num_groups=groups_for(width, cfg.groups), rngs=rngs)
    self.dropout = nnx.Dropout(cfg.dropout, broadcast_dims=(1, 2), rngs=rngs)  # Dropout2d
    self.classifier = nnx.Conv(width, cfg.num_classes, (1, 1), rngs=rngs)

  def __call__(self, levels, *, train: bool):
    return self.classifier(self.dropout(self.norm(levels[2]), deterministic=not train))


class FCNHead(nnx.Module):
  """mmseg's auxiliary FCNHead (num_convs=1) on the ×1 level; its loss is weighted 0.4."""

  def __init__(self, cfg: SegmenterConfig, width: int, *, rngs: nnx.Rngs):
    self.conv = ConvNormAct(width, cfg.aux_channels, 3, cfg.groups, rngs=rngs)
    self.dropout = nnx.Dropout(cfg.dropout, broadcast_dims=(1, 2), rngs=rngs)  # Dropout2d
    self.classifier = nnx.Conv(cfg.aux_channels, cfg.num_classes, (1, 1), rngs=rngs)

  def __call__(self, x, *, train: bool):
    return self.classifier(self.dropout(self.conv(x), deterministic=not train))


class Segmenter(nnx.Module):
  """backbone → block features on the patch grid → neck → head; logits at input size.

  `backbone` is any model of the table (its classification head, if any, is unused).
  Images whose sides the patch does not divide are padded (bottom, right) and the logits
  cropped back to the input.
  """

  def __init__(self, backbone: nnx.Module, cfg: SegmenterConfig, *, rngs: nnx.Rngs):
    depth, width = backbone.cfg.depth, backbone.cfg.width
    self.backbone, self.cfg = backbone, cfg
    self.out_indices = tuple(cfg.out_indices) or default_out_indices(depth)
    if len(self.out_indices) != 4 or not all(0 <= i < depth for i in self.out_indices):
      raise UserError(
        f"out_indices={self.out_indices}: expected 4 block indices in 0 … {depth - 1} "
        f"(the backbone has {depth} blocks)."
      )
    self.neck = Neck(width, cfg.groups, rngs=rngs)
    head = UperHead if cfg.head == "upernet" else LinearHead
    self.head = head(cfg, width, rngs=rngs)
    self.aux = FCNHead(cfg, width, rngs=rngs) if cfg.aux_channels else None

  def __call__(self, images, *, train: bool = False):
    """(B, H, W, 3) normalised images -> (logits (B, H, W, C), aux logits or None)."""
    hw = images.shape[1:3]
    p = self.backbone.cfg.patch
    pad = [(0, 0), (0, -hw[0] % p), (0, -hw[1] % p), (0, 0)]
    x = jnp.pad(images, pad) if any(pad[1] + pad[2]) else images
    out = self.backbone(x, train=train)
    h, w = x.shape[1] // p, x.shape[2] // p
    feats = [
      out.roles.patches_of(out.blocks[i]).reshape(x.shape[0], h, w, -1) for i in self.out_indices
    ]
    levels = self.neck(feats)
    crop = lambda y: resize(y, x.shape[1:3])[:, : hw[0], : hw[1]]
    logits = crop(self.head(levels, train=train).astype(jnp.float32))
    aux = crop(self.aux(levels[2], train=train).astype(jnp.float32)) if self.aux else None
    return logits, aux
