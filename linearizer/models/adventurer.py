"""The student: Adventurer, a causal Mamba-2 vision model with a tail CLS (method.md §5).

Tokens are `[p_1 … p_N, cls]`: the CLS token sits last so the causal scan has read every
patch when it reaches it. Each block prepends the mean of its input tokens ("heading
average") so even the first patch sees a global summary, and every other block reverses
the patch order so information flows both ways through the depth.
"""

import dataclasses
import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import kernels
from linearizer.errors import UserError
from linearizer.models import common, packing
from linearizer.models.mamba2 import Mamba2

SSD_IMPLS = (*kernels.IMPLS, "auto")  # what `ssd_impl` may name (kernels.ssd's `impl`)

# size -> (width, depth); SSM heads = 2·width / 64.
WIDTHS = {"Ti": (256, 12), "S": (512, 12), "B": (768, 12), "L": (1024, 24)}

# Which blocks reverse the patch order. The paper flips every other block (`alternate`, our
# default for new training). The released code flips only blocks 2 and 3 (`released`,
# `i // 2 == 1`), which its maintainer calls "a small bug ... used in ablation experiments"
# (wangf3014/Adventurer#6), naming `(i // 2) % 2 == 1` (`pairs`) or `i % 2 == 1` as the fix:
# which one trained the public checkpoints is unknown (docs/method-fidelity.md: how to pick).
FlipPattern = Literal["alternate", "pairs", "released", "none"]
FLIP_PATTERNS = {
  "alternate": lambda i: i % 2 == 1,
  "pairs": lambda i: (i // 2) % 2 == 1,
  "released": lambda i: i // 2 == 1,
  "none": lambda i: False,
}


@dataclasses.dataclass(frozen=True)
class AdventurerConfig:
  width: int
  depth: int
  patch: int
  image_size: int = 224
  num_classes: int = 0  # 0: no head, logits=None
  drop_path: float = 0.0
  flip_pattern: FlipPattern = "alternate"
  d_state: int = 64
  headdim: int = 64
  expand: int = 2
  ngroups: int = 1  # B/C groups of the SSM heads (mamba-ssm's ngroups); a student initialised
  # from a ViT teacher has one per attention head (linearizer/distillation/teacher_init.py)
  mlp_ratio: float = 2.5
  chunk_size: int = 0  # tokens per SSD chunk; 0: kernels.CHUNK_TABLE's for the backend and
  # length (on a CPU one chunk up to 128 tokens, 32 above; 256 on a TPU or GPU)
  ssd_impl: kernels.Implementation = "auto"
  ssd_interpret: bool = False  # run a Pallas ssd_impl in interpret mode (CPU tests, debugging)
  dtype: str = "float32"  # compute dtype of the matmuls; parameters stay float32
  remat: bool = False  # recompute each block's branches in the backward instead of keeping
  # their activations (jax.checkpoint): more compute, far less memory (Adventurer-B/16 at
  # 2048², fwd+bwd: 42.7 -> 8.8 GiB). On a CPU it needs XLA_FLAGS=
  # --xla_cpu_enable_concurrency_optimized_scheduler=false (else XLA keeps them anyway)
  mean: tuple = (0.485, 0.456, 0.406)
  std: tuple = (0.229, 0.224, 0.225)

  def __post_init__(self):
    """Every field a user sets is checked here, once, before a kernel sees it."""
    for field in ("width", "depth", "patch", "image_size"):
      if not isinstance(getattr(self, field), int) or getattr(self, field) < 1:
        raise UserError(f"{field}={getattr(self, field)!r}; expected a positive integer.")
    if self.flip_pattern not in FLIP_PATTERNS:
      raise UserError(
        f"Unknown flip_pattern {self.flip_pattern!r}; expected one of {sorted(FLIP_PATTERNS)}."
      )
    if self.ssd_impl not in SSD_IMPLS:
      raise UserError(f"ssd_impl={self.ssd_impl!r}; expected one of {list(SSD_IMPLS)}.")
    if not isinstance(self.remat, bool):
      raise UserError(f"remat={self.remat!r}; expected True or False.")
    if not isinstance(self.chunk_size, int) or self.chunk_size < 0:
      raise UserError(
        f"chunk_size={self.chunk_size!r}; expected a positive integer, or 0 for the table's."
      )
    if (self.expand * self.width) % self.headdim:
      raise UserError(
        f"expand*width={self.expand * self.width} is not a multiple of headdim={self.headdim}."
      )
    heads = self.expand * self.width // self.headdim
    if not isinstance(self.ngroups, int) or self.ngroups < 1 or heads % self.ngroups:
      raise UserError(
        f"ngroups={self.ngroups!r}; expected a positive integer dividing the "
        f"{heads} SSM heads (expand*width/headdim)."
      )


def adventurer_config(variant: str = "B/16", **overrides) -> AdventurerConfig:
  (width, depth), patch = common.parse_variant(variant, WIDTHS)
  # Overrides may replace any field, width and depth included (as vit_config allows).
  return AdventurerConfig(**{**dict(width=width, depth=depth, patch=patch), **overrides})


def flip_patches(t):
  """Reverses the patch order of `[patches, cls]`; CLS stays last. Its own inverse."""
  return jnp.concatenate([t[:, -2::-1], t[:, -1:]], axis=1)


def gather_tokens(x, index):
  """x (B, L, D) at positions index (B, T) -> (B, T, D)."""
  return jnp.take_along_axis(x, index[..., None], axis=1)


def packed_flip(p: packing.Packed):
  """(B, T): where each token goes when every image's patches reverse (`flip_patches` per
  image); CLS and padding stay. Its own inverse."""
  grid = p.token_grid()
  index, count = p.row * grid[..., 1] + p.col, grid[..., 0] * grid[..., 1]
  here = jnp.arange(p.kind.shape[1])
  return jnp.where(p.kind == packing.PATCH, here + count - 1 - 2 * index, here)


def packed_scan(p: packing.Packed) -> tuple:
  """The scan's sequence for a packed batch: each image's heading token, then its tokens,
  as the unpacked block scans one image; T + M long, the unused heading slots at the end.

  Returns (each token's scan position (B, T), each image slot's heading position (B, M),
  the scan's segment ids (B, T + M): the image slot, M for padding and unused headings).
  """
  b, t = p.kind.shape
  m = p.grid.shape[1]
  here, slots = jnp.arange(t), jnp.arange(m)
  used = p.valid.sum(axis=1, keepdims=True)
  tokens = jnp.where(p.image < m, here + p.image + 1, here + used)
  heads = jnp.where(p.valid, p.start + slots, t + slots)
  rows = jnp.arange(b)[:, None]
  segments = jnp.full((b, t + m), m, jnp.int32).at[rows, tokens].set(p.image)
  return tokens, heads, segments.at[rows, heads].set(jnp.where(p.valid, slots, m))


class SwiGLU(nnx.Module):
  """w3(SiLU(w1 x) ⊙ w2 x), with biases."""

  def __init__(self, dim: int, hidden: int, dtype, *, rngs: nnx.Rngs):
    dense = dict(kernel_init=common.torch_linear_init, dtype=dtype, rngs=rngs)
    self.w1 = nnx.Linear(dim, hidden, **dense)
    self.w2 = nnx.Linear(dim, hidden, **dense)
    self.w3 = nnx.Linear(hidden, dim, **dense)

  def __call__(self, x):
    return self.w3(jax.nn.silu(self.w1(x)) * self.w2(x))


class Block(nnx.Module):
  def __init__(self, cfg: AdventurerConfig, drop_path: float, flip: bool, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(cfg.dtype)
    self.flip = flip
    self.norm = nnx.RMSNorm(cfg.width, epsilon=1e-5, rngs=rngs)
    self.mixer = Mamba2(
      cfg.width,
      d_state=cfg.d_state,
      headdim=cfg.headdim,
      expand=cfg.expand,
      ngroups=cfg.ngroups,
      chunk_size=cfg.chunk_size,
      ssd_impl=cfg.ssd_impl,
      ssd_interpret=cfg.ssd_interpret,
      out_proj_scale=1 / math.sqrt(cfg.depth),
      dtype=cfg.dtype,
      rngs=rngs,
    )
    self.norm_mlp = nnx.RMSNorm(cfg.width, epsilon=1e-5, rngs=rngs)
    self.mlp = SwiGLU(cfg.width, int(cfg.width * cfg.mlp_ratio), dtype, rngs=rngs)
    self.drop_path = common.DropPath(drop_path, rngs=rngs)
    self.remat = cfg.remat

  def mixer_input(self, h):
    """The sequence the mixer scans: heading average, then the (maybe flipped) tokens."""
    t = self.norm(h)
    t = flip_patches(t) if self.flip else t
    return jnp.concatenate([jnp.mean(t, axis=1, keepdims=True), t], axis=1)

  def mix(self, h, packed=None):
    """The mixer branch: the scan's outputs in the tokens' own order."""
    if packed is not None:
      return self.mix_packed(h, packed)
    t = self.mixer(self.mixer_input(h))[:, 1:]  # drop the heading token's output
    return flip_patches(t) if self.flip else t

  def mix_packed(self, h, p: packing.Packed):
    """`mix` for a packed batch: each image flipped, headed by its own average and scanned
    as if alone (`packed_scan`; the conv and the scan restart at each image)."""
    flip = packed_flip(p) if self.flip else None
    t = self.norm(h)
    t = gather_tokens(t, flip) if self.flip else t
    tokens, heads, segments = packed_scan(p)
    rows = jnp.arange(t.shape[0])[:, None]
    scan = jnp.zeros((t.shape[0], segments.shape[1], t.shape[2]), t.dtype)
    scan = scan.at[rows, tokens].set(t).at[rows, heads].set(p.image_mean(t, p.kind != 0))
    t = gather_tokens(self.mixer(scan, segments), tokens)
    return gather_tokens(t, flip) if self.flip else t

  def feed_forward(self, h):
    return self.mlp(self.norm_mlp(h))

  def __call__(self, h, *, train: bool, packed=None):
    """(the block's output, its mixer branch: `ModelOutput.mixers`); `packed`: the layout
    of a packed batch (`packing.Packed`)."""
    # remat recomputes the branches in the backward; drop path stays outside, where its
    # random draw happens once.
    mix, feed_forward = Block.mix, Block.feed_forward
    if self.remat:
      mix, feed_forward = nnx.remat(mix), nnx.remat(feed_forward)
    mixed = mix(self, h, packed)
    drop = functools.partial(self.drop_path, train=train, **packing.drop_groups(packed))
    h = h + drop(mixed)
    return h + drop(feed_forward(self, h)), mixed


class Adventurer(nnx.Module):
  """Patches first, CLS last: `[p_1 … p_N, cls]` (method.md §5)."""

  roles = common.TokenRoles(cls=-1, patches=(0, -1))

  def __init__(self, cfg: AdventurerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, p = cfg.width, cfg.patch
    self.patch_embed = nnx.Conv(
      3,
      d,
      (p, p),
      strides=(p, p),
      padding="VALID",
      kernel_init=nnx.initializers.lecun_normal(),
      dtype=jnp.dtype(cfg.dtype),
      rngs=rngs,
    )
    n = (cfg.image_size // p) ** 2
    self.cls_token = nnx.Param(common.trunc_normal_02(rngs.params(), (1, 1, d)))
    self.mask_token = nnx.Param(common.trunc_normal_02(rngs.params(), (1, 1, d)))
    self.pos_embed = nnx.Param(common.trunc_normal_02(rngs.params(), (1, n + 1, d)))
    # Adventurer's stochastic-depth rule: block i gets ([0] + linspace(0, rate, depth))[i].
    rates = [0.0] + np.linspace(0, cfg.drop_path, cfg.depth).tolist()
    flip = FLIP_PATTERNS[cfg.flip_pattern]
    self.layers = nnx.List([Block(cfg, rates[i], flip(i), rngs=rngs) for i in range(cfg.depth)])
    self.norm_f = nnx.RMSNorm(d, epsilon=1e-5, rngs=rngs)
    self.head = (
      nnx.Linear(d, cfg.num_classes, kernel_init=common.trunc_normal_02, rngs=rngs)
      if cfg.num_classes
      else None
    )

  @property
  def grid(self):
    return common.patch_grid((self.cfg.image_size, self.cfg.image_size), self.cfg.patch)

  @staticmethod
  def resample_pos_embed(cfg: AdventurerConfig, pos, old_grid: tuple, new_grid: tuple):
    """`pos_embed` resampled to another grid, the tail CLS slot kept (convert uses it too)."""
    return common.resample_pos_embed(pos, old_grid, new_grid, cls_at="last")

  def next_norm(self, index: int, x):
    """The pre-norm block `index + 1` applies to block `index`'s output (the final norm
    after the last block): AM's `next_ln` features."""
    norm = self.layers[index + 1].norm if index + 1 < len(self.layers) else self.norm_f
    return norm(x)

  def embed(self, images, mask=None):
    """`[p_1 … p_N, cls]` + position embedding; masked patches become the mask token first."""
    common.check_images(images, 3, self.cfg.patch)
    x = self.patch_embed(images).astype(jnp.float32)  # the residual stream stays float32
    b, h, w, d = x.shape
    x = x.reshape(b, h * w, d)
    if mask is not None:
      if mask.shape != (b, h * w):
        raise UserError(f"mask must be (batch, patches) = {(b, h * w)}, got {mask.shape}.")
      x = jnp.where(mask[..., None], self.mask_token[...].astype(x.dtype), x)
    cls = jnp.broadcast_to(self.cls_token[...], (b, 1, d)).astype(x.dtype)
    pos = self.resample_pos_embed(self.cfg, self.pos_embed[...], self.grid, (h, w))
    return jnp.concatenate([x, cls], axis=1) + pos.astype(x.dtype)

  packing_layout = ((), (packing.CLS,))  # (prefix, suffix) of an image's patches: CLS last

  def embed_packed(self, p: packing.Packed, mask=None):
    """`embed` for a packed batch: `[patches, cls]` per image, each image's position
    embedding resampled to its own grid per token; `mask` (B, T) over patch tokens."""
    x = packing.embed_patches(self.patch_embed, p)
    kind = p.kind[..., None]
    if mask is not None:
      if mask.shape != p.kind.shape:
        raise UserError(f"mask must be (batch, tokens) = {p.kind.shape}, got {mask.shape}.")
      x = jnp.where(mask[..., None] & (kind == packing.PATCH), self.mask_token[...], x)
    table = self.pos_embed[...]
    x = x + packing.patch_pos_embed(table[:, :-1], self.grid, p, (False, 0.0, False))
    x = jnp.where(kind == packing.CLS, self.cls_token[...] + table[:, -1:], x)
    return jnp.where(kind == packing.PAD, 0.0, x)

  def pool(self, out: common.ModelOutput) -> jax.Array:
    """(B, D): what the head reads: the final CLS token (at the tail, where the causal scan
    has seen every patch); packed: (B, M, D), each image's."""
    return out.cls if out.packing is not None else out.cls[:, 0]

  def __call__(self, images, *, mask=None, train: bool = False) -> common.ModelOutput:
    """images (B, H, W, 3), or a `packing.Packed` batch of images of their own sizes."""
    packed = images if isinstance(images, packing.Packed) else None
    x = self.embed_packed(packed, mask) if packed is not None else self.embed(images, mask)
    blocks, mixers = [], []
    for layer in self.layers:
      x, mixed = layer(x, train=train, packed=packed)
      blocks.append(x)
      mixers.append(mixed)
    out = common.ModelOutput(
      logits=None,
      tokens=self.norm_f(x),
      blocks=tuple(blocks),
      roles=self.roles,
      mixers=tuple(mixers),
      packing=packed,
    )
    return out.replace(logits=self.head(self.pool(out))) if self.head is not None else out
