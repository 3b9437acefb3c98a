"""The teacher: a pre-norm Vision Transformer with CLS first (method.md §4).

One module covers the checkpoints people hold: `style="timm"` (timm / DeiT / AugReg /
big_vision / HF ViTModel: GELU, LayerNorm eps 1e-6; DINOv2 is this style plus
`layer_scale` and, for its "with registers" models, `registers`), `style="clip"` (OpenAI
CLIP image tower / HF CLIPVisionModel: `ln_pre`, bias-free patch conv, QuickGELU, eps 1e-5)
and `style="siglip"` (SigLIP / SigLIP 2 towers: tanh GELU, eps 1e-6, mean = std = 0.5, with
`cls_token=False` and `pool="map"`). The 2023-2026 teachers add parts a config names:
rotary position embeddings (`rope`, `rope.py`: EVA-02, Perception Encoder, DINOv3), with
or without the absolute table (`pos_embed`); q/v-only or no qkv biases (`qkv_bias`); a
SwiGLU MLP (`mlp="swiglu"`, EVA-02, DINOv3+) with EVA-02's sub-LN (`mlp_norm`) and its
CLIP towers' attention sub-LN (`attn_norm`); no final norm (`final_norm=False`: EVA-02's
pooled models and PE spatial) or a norm on the pooled feature (`fc_norm`, timm's).

Tokens are `[cls, registers…, p_1 … p_N]` (the parts a config has); `roles` says where each
sits, and the losses read CLS and patches through it, never the registers.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from linearizer.errors import UserError
from linearizer.models import attention, common, packing
from linearizer.models import rope as rope_lib
from linearizer.models.vit_config import (  # noqa: F401 (STYLES, ViTConfig, ...: vit's names too)
  ACTIVATIONS,
  POS_INTERPOLATIONS,
  STYLES,
  WIDTHS,
  ViTConfig,
  vit_config,
)


def _dense(cfg: ViTConfig, rngs: nnx.Rngs) -> dict:
  return dict(
    dtype=jnp.dtype(cfg.dtype),
    kernel_init=nnx.initializers.xavier_uniform(),
    bias_init=nnx.initializers.normal(1e-6),
    rngs=rngs,
  )


def _norm(cfg: ViTConfig, width: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(width, epsilon=cfg.eps, rngs=rngs)


class Attention(nnx.Module):
  """Multi-head self-attention with a fused qkv projection (timm layout); RoPE rotates the
  patches' q and k (`rope.py`), and EVA-02's CLIP towers norm the output before `proj`."""

  def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
    dense = dict(
      dtype=jnp.dtype(cfg.dtype), kernel_init=nnx.initializers.xavier_uniform(), rngs=rngs
    )
    self.num_heads = cfg.num_heads
    self.impl, self.blocks = cfg.attention_impl, (cfg.attention_block_q, cfg.attention_block_k)
    self.blocked_from = cfg.blocked_attention_tokens
    self.halves = rope_lib.HALVES.get(cfg.rope, False)
    self.qkv = nnx.Linear(cfg.width, 3 * cfg.width, use_bias=cfg.qkv_bias, **dense)
    self.norm = _norm(cfg, cfg.width, rngs) if cfg.attn_norm else None
    self.proj = nnx.Linear(cfg.width, cfg.width, **dense)

  def qkv_heads(self, x, rotary=None):
    """q, k, v as (B, T, heads, head_dim); `rotary` = (first patch index, cos, sin) rotates
    the patches' q and k."""
    b, t, d = x.shape
    q, k, v = jnp.split(self.qkv(x).reshape(b, t, 3 * self.num_heads, d // self.num_heads), 3, 2)
    if rotary is not None:
      first, cos, sin = rotary
      turn = lambda a: a.at[:, first:].set(rope_lib.rotate(a[:, first:], cos, sin, self.halves))
      q, k = turn(q), turn(k)
    return q, k, v

  def __call__(self, x, rotary=None, segment_ids=None):
    b, t, d = x.shape
    q, k, v = self.qkv_heads(x, rotary)
    y = attention.attend(q, k, v, self.impl, self.blocked_from, self.blocks, segment_ids)
    y = y.reshape(b, t, d)
    return self.proj(y if self.norm is None else self.norm(y))


class Block(nnx.Module):
  def __init__(self, cfg: ViTConfig, drop_path: float, *, rngs: nnx.Rngs):
    self.norm1 = _norm(cfg, cfg.width, rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.norm2 = _norm(cfg, cfg.width, rngs)
    # SwiGLU (EVA-02, DINOv3+): SiLU(gate x) * fc1 x, as timm's SwiGLU (fc1_g, fc1_x).
    self.gate = (
      nnx.Linear(cfg.width, cfg.mlp_dim, **_dense(cfg, rngs)) if cfg.mlp == "swiglu" else None
    )
    self.fc1 = nnx.Linear(cfg.width, cfg.mlp_dim, **_dense(cfg, rngs))
    self.mlp_norm = _norm(cfg, cfg.mlp_dim, rngs) if cfg.mlp_norm else None
    self.fc2 = nnx.Linear(cfg.mlp_dim, cfg.width, **_dense(cfg, rngs))
    self.act = ACTIVATIONS[cfg.activation or STYLES[cfg.style][0]]
    self.drop_path = common.DropPath(drop_path, rngs=rngs)
    gains = lambda: nnx.Param(jnp.full((cfg.width,), cfg.layer_scale, jnp.float32))
    self.ls1, self.ls2 = (gains(), gains()) if cfg.layer_scale is not None else (None, None)

  def _scaled(self, y, gains):
    return y if gains is None else y * gains[...]

  def mlp(self, x):
    h = self.act(self.fc1(x)) if self.gate is None else jax.nn.silu(self.gate(x)) * self.fc1(x)
    return self.fc2(h if self.mlp_norm is None else self.mlp_norm(h))

  def __call__(self, x, *, train: bool, rotary=None, packed=None):
    """(the block's output, its attention branch: `ModelOutput.mixers`); `packed`: a packed
    batch's layout (attention stays within each image)."""
    segments = None if packed is None else packed.image
    mixed = self._scaled(self.attn(self.norm1(x), rotary, segments), self.ls1)
    drop = functools.partial(self.drop_path, train=train, **packing.drop_groups(packed))
    x = x + drop(mixed)
    return x + drop(self._scaled(self.mlp(self.norm2(x)), self.ls2)), mixed


class MAPHead(nnx.Module):
  """Multihead attention pooling (big_vision's MAPHead; SigLIP's head): a learned probe
  attends over every token, then a pre-norm MLP residual; (B, T, D) -> (B, D)."""

  def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
    d = cfg.width
    self.num_heads = cfg.map_heads or cfg.num_heads
    self.probe = nnx.Param(nnx.initializers.xavier_uniform()(rngs.params(), (1, 1, d)))
    self.q = nnx.Linear(d, d, **_dense(cfg, rngs))
    self.kv = nnx.Linear(d, 2 * d, **_dense(cfg, rngs))
    self.proj = nnx.Linear(d, d, **_dense(cfg, rngs))
    self.norm = nnx.LayerNorm(d, epsilon=cfg.eps, rngs=rngs)
    self.fc1 = nnx.Linear(d, cfg.mlp_dim, **_dense(cfg, rngs))
    self.fc2 = nnx.Linear(cfg.mlp_dim, d, **_dense(cfg, rngs))
    self.act = ACTIVATIONS[cfg.activation or STYLES[cfg.style][0]]

  def __call__(self, x, mask=None):
    """x (B, T, D) -> (B, D); with `mask` (B, M, T) bool: M probes, probe m attending to the
    tokens its row of `mask` keeps (a packed batch's image m) -> (B, M, D)."""
    b, t, d = x.shape
    h, m = self.num_heads, 1 if mask is None else mask.shape[1]
    q = self.q(jnp.broadcast_to(self.probe[...], (b, m, d)).astype(x.dtype))
    k, v = jnp.split(self.kv(x).reshape(b, t, 2 * h, d // h), 2, 2)
    y = jax.nn.dot_product_attention(
      q.reshape(b, m, h, d // h), k, v, mask=None if mask is None else mask[:, None]
    )
    y = self.proj(y.reshape(b, m, d))
    y = y + self.fc2(self.act(self.fc1(self.norm(y))))
    return y[:, 0] if mask is None else y


class ViT(nnx.Module):
  """Pre-norm ViT: tokens `[cls, registers…, p_1 … p_N]` (each part as the config has it),
  learned absolute position embeddings on CLS and patches, rotary ones on the patches' q
  and k, or both (as the config has them)."""

  def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
    _, _, ln_pre, conv_bias, *_ = STYLES[cfg.style]
    eps = cfg.eps
    self.cfg = cfg
    d, p = cfg.width, cfg.patch
    self.patch_embed = nnx.Conv(
      3,
      d,
      (p, p),
      strides=(p, p),
      padding="VALID",
      use_bias=conv_bias,
      kernel_init=nnx.initializers.lecun_normal(),
      dtype=jnp.dtype(cfg.dtype),
      rngs=rngs,
    )
    n = (cfg.image_size // p) ** 2 + cfg.cls_token
    self.cls_token = nnx.Param(jnp.zeros((1, 1, d))) if cfg.cls_token else None
    self.pos_embed = (
      nnx.Param(common.trunc_normal_02(rngs.params(), (1, n, d))) if cfg.pos_embed else None
    )
    # DINOv2 initialises its registers at N(0, 1e-6), as it does the CLS token.
    self.register_tokens = (
      nnx.Param(nnx.initializers.normal(1e-6)(rngs.params(), (1, cfg.registers, d)))
      if cfg.registers
      else None
    )
    self.ln_pre = nnx.LayerNorm(d, epsilon=eps, rngs=rngs) if ln_pre else None
    rates = np.linspace(0, cfg.drop_path, cfg.depth).tolist()
    self.blocks = nnx.List([Block(cfg, r, rngs=rngs) for r in rates])
    self.norm = nnx.LayerNorm(d, epsilon=eps, rngs=rngs) if cfg.final_norm else None
    self.fc_norm = nnx.LayerNorm(d, epsilon=eps, rngs=rngs) if cfg.fc_norm else None
    self.map_head = MAPHead(cfg, rngs=rngs) if cfg.pool == "map" else None
    self.head = (
      nnx.Linear(
        d,
        cfg.num_classes,
        use_bias=cfg.head_bias,
        kernel_init=nnx.initializers.zeros_init(),
        rngs=rngs,
      )
      if cfg.num_classes
      else None
    )

  @property
  def roles(self) -> common.TokenRoles:
    first = int(self.cfg.cls_token)  # registers follow CLS, patches follow the registers
    return common.TokenRoles(
      cls=0 if self.cfg.cls_token else None,
      patches=(first + self.cfg.registers, None),
      registers=(first, first + self.cfg.registers) if self.cfg.registers else (0, 0),
    )

  @property
  def grid(self):
    return common.patch_grid((self.cfg.image_size, self.cfg.image_size), self.cfg.patch)

  @staticmethod
  def resample_pos_embed(cfg: ViTConfig, pos, old_grid: tuple, new_grid: tuple):
    """`pos_embed` resampled to another grid, the CLS slot kept, as this config's source
    does it (convert resamples a checkpoint with it too)."""
    antialias, offset, bilinear = POS_INTERPOLATIONS[cfg.pos_interpolation]
    cls_at = "first" if cfg.cls_token else None
    return common.resample_pos_embed(pos, old_grid, new_grid, cls_at, antialias, offset, bilinear)

  def next_norm(self, index: int, x):
    """The pre-norm block `index + 1` applies to block `index`'s output (the final norm
    after the last block): AM's `next_ln` features."""
    norm = self.blocks[index + 1].norm1 if index + 1 < len(self.blocks) else self.norm
    return x if norm is None else norm(x)

  def embed(self, images):
    common.check_images(images, 3, self.cfg.patch)
    x = self.patch_embed(images).astype(jnp.float32)  # the residual stream stays float32
    b, h, w, d = x.shape
    x = x.reshape(b, h * w, d)
    token = lambda p: jnp.broadcast_to(p[...], (b, *p.shape[1:])).astype(x.dtype)
    if self.cls_token is not None:
      x = jnp.concatenate([token(self.cls_token), x], axis=1)
    if self.pos_embed is not None:
      pos = self.resample_pos_embed(self.cfg, self.pos_embed[...], self.grid, (h, w))
      x = x + pos.astype(x.dtype)
    if self.register_tokens is not None:  # after the position embedding: registers get none
      first = int(self.cfg.cls_token)
      x = jnp.concatenate([x[:, :first], token(self.register_tokens), x[:, first:]], axis=1)
    return self.ln_pre(x) if self.ln_pre is not None else x

  def pool(self, out: common.ModelOutput) -> jax.Array:
    """(B, D): what the head reads (the config's `pool`): the final CLS, the mean final
    patch token, or the MAP head's attention pooling over every final token; packed:
    (B, M, D), each image's own."""
    packed = out.packing
    if self.cfg.pool == "cls":
      pooled = out.cls if packed is not None else out.cls[:, 0]
    elif self.cfg.pool == "gap":
      if packed is None:
        pooled = out.patches.mean(axis=1)
      else:
        pooled = packed.image_mean(out.tokens, packed.kind == packing.PATCH)
    elif packed is None:
      pooled = self.map_head(out.tokens)
    else:
      images = jnp.arange(packed.grid.shape[1])
      pooled = self.map_head(out.tokens, packed.image[:, None, :] == images[None, :, None])
    return pooled if self.fc_norm is None else self.fc_norm(pooled)

  @property
  def packing_layout(self) -> tuple:
    """(prefix, suffix): the kinds of the tokens around an image's patches (`packing.pack`)."""
    c = self.cfg
    return (packing.CLS,) * c.cls_token + (packing.REGISTER,) * c.registers, ()

  def embed_packed(self, p: packing.Packed):
    """`embed` for a packed batch: each image's tokens as `embed` lays them out alone, its
    position embedding resampled to its own grid per token (`packing.patch_pos_embed`)."""
    x = packing.embed_patches(self.patch_embed, p)
    kind = p.kind[..., None]
    if self.pos_embed is not None:
      table = self.pos_embed[...]
      first = int(self.cfg.cls_token)
      mode = POS_INTERPOLATIONS[self.cfg.pos_interpolation]
      x = x + packing.patch_pos_embed(table[:, first:], self.grid, p, mode)
      if self.cls_token is not None:
        x = jnp.where(kind == packing.CLS, self.cls_token[...] + table[:, :1], x)
    elif self.cls_token is not None:
      x = jnp.where(kind == packing.CLS, self.cls_token[...], x)
    if self.register_tokens is not None:
      registers = self.register_tokens[...][0][jnp.minimum(p.col, self.cfg.registers - 1)]
      x = jnp.where(kind == packing.REGISTER, registers, x)
    x = jnp.where(kind == packing.PAD, 0.0, x)
    return self.ln_pre(x) if self.ln_pre is not None else x

  def rotary_packed(self, p: packing.Packed):
    """`rotary` per token of a packed batch: patches at their own image's coordinates,
    every other token unturned (cos 1, sin 0)."""
    c = self.cfg
    if c.rope is None:
      return None
    cos, sin = rope_lib.token_tables(
      c.rope,
      p.row,
      p.col,
      p.token_grid(),
      c.width // c.num_heads,
      c.rope_temperature,
      c.rope_offset,
      c.rope_grid,
    )
    patch = (p.kind == packing.PATCH)[..., None]
    return 0, jnp.where(patch, cos, 1.0), jnp.where(patch, sin, 0.0)

  def rotary(self, grid: tuple):
    """(first patch index, cos, sin) of the config's RoPE for an (h, w) patch grid, or None."""
    c = self.cfg
    if c.rope is None:
      return None
    cos, sin = rope_lib.tables(
      c.rope, grid, c.width // c.num_heads, c.rope_temperature, c.rope_offset, c.rope_grid
    )
    return self.roles.patches[0], jnp.asarray(cos), jnp.asarray(sin)

  def __call__(self, images, *, mask=None, train: bool = False) -> common.ModelOutput:
    """images (B, H, W, 3), or a `packing.Packed` batch of images of their own sizes."""
    if mask is not None:
      raise UserError("The ViT teacher always sees the whole image; mask must be None.")
    packed = images if isinstance(images, packing.Packed) else None
    if packed is not None:
      x, rotary = self.embed_packed(packed), self.rotary_packed(packed)
    else:
      x = self.embed(images)
      rotary = self.rotary(common.patch_grid(images.shape[1:3], self.cfg.patch))
    blocks, mixers = [], []
    for block in self.blocks:
      x, mixed = block(x, train=train, rotary=rotary, packed=packed)
      blocks.append(x)
      mixers.append(mixed)
    tokens = x if self.norm is None else self.norm(x)
    out = common.ModelOutput(
      logits=None,
      tokens=tokens,
      blocks=tuple(blocks),
      roles=self.roles,
      mixers=tuple(mixers),
      packing=packed,
    )
    if self.head is None:
      return out
    return out.replace(logits=self.head(self.pool(out)))
