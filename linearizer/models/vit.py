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

import dataclasses
from typing import Literal, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from linearizer.errors import UserError
from linearizer.models import attention, common
from linearizer.models import rope as rope_lib

# size -> (width, depth, heads, mlp); patch comes from the variant string, e.g. 'L/14'.
WIDTHS = {
  "Ti": (192, 12, 3, 768),
  "S": (384, 12, 6, 1536),
  "M": (512, 12, 8, 2048),
  "B": (768, 12, 12, 3072),
  "L": (1024, 24, 16, 4096),
  "H": (1280, 32, 16, 5120),
  "g": (1408, 40, 16, 6144),
}

STYLES = {
  # style: (activation, layer-norm eps, ln_pre, patch-conv bias, mean, std)
  "timm": ("gelu", 1e-6, False, True, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
  "clip": (
    "quick_gelu",
    1e-5,
    True,
    False,
    (0.48145466, 0.4578275, 0.40821073),
    (0.26862954, 0.26130258, 0.27577711),
  ),
  "siglip": ("gelu_tanh", 1e-6, False, True, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


Style = Literal["timm", "clip", "siglip"]
Activation = Literal["gelu", "gelu_tanh", "quick_gelu"]
Pool = Literal["cls", "gap", "map"]
# How the position embedding is resampled to another grid: each source does it its own way
# (`common._cubic_matrix`), and a teacher must see exactly what it saw in its own code.
PosInterpolation = Literal["bicubic", "bicubic_antialias", "bicubic_offset", "bilinear_antialias"]
POS_INTERPOLATIONS = {  # mode -> (antialias, offset, bilinear) of common.resample_pos_embed
  "bicubic": (False, 0.0, False),  # transformers' ViT, CLIP, DINOv2, SigLIP
  "bicubic_antialias": (True, 0.0, False),  # timm; transformers' and the hub's DINOv2 + regs
  "bicubic_offset": (False, 0.1, False),  # torch hub's DINOv2 (scale factor (n + 0.1) / N)
  "bilinear_antialias": (True, 0.0, True),  # transformers' SigLIP 2 (NaFlex)
}
AttentionImpl = Literal["xla", "cudnn", "blocked"]
Mlp = Literal["plain", "swiglu"]

ACTIVATIONS = {
  "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # timm, HF
  "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),  # flax's nn.gelu default
  "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI CLIP
}


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  patch: int
  image_size: int = 224
  num_classes: int = 0  # 0: no head, logits=None
  style: Style = "timm"
  drop_path: float = 0.0
  layer_norm_eps: Optional[float] = None  # None: the style's default (HF ViTModel uses 1e-12)
  activation: Optional[Activation] = None  # None: the style's; or gelu | gelu_tanh | quick_gelu
  head_bias: bool = True
  pool: Pool = "cls"  # what the head reads: the 'cls' token; 'gap', the mean patch
  # token (timm global_pool='avg', big_vision pool_type='gap'); or 'map', attention pooling
  # by a learned probe (big_vision MAPHead, SigLIP's head)
  cls_token: bool = True  # False: no CLS token (SigLIP); pool must be 'gap' or 'map'
  registers: int = 0  # register tokens after CLS (DINOv2 with registers); no loss reads them
  layer_scale: Optional[float] = None  # per-channel gains on both residual branches (DINOv2's
  # LayerScale), initialised to this value; None: none
  pos_interpolation: PosInterpolation = "bicubic"  # how the source resamples pos_embed
  attention_impl: Optional[AttentionImpl] = None  # None: 'blocked' on a CPU from
  # blocked_attention_tokens tokens on, else JAX chooses; 'xla', 'cudnn' or 'blocked' (online
  # softmax a tile at a time, `attention.py`) to force one
  blocked_attention_tokens: int = 2048  # where None switches a CPU to 'blocked' (measured:
  # docs/benchmarks.md, "Blocked attention")
  attention_block_q: int = 512  # 'blocked': query tokens per tile
  attention_block_k: int = 256  # 'blocked': key tokens per tile (both measured best on a
  # CPU at 2k-4k tokens, docs/benchmarks.md)
  dtype: str = "float32"  # compute dtype of the matmuls; parameters stay float32
  # The parts of the RoPE teachers (module docstring); the defaults are the plain ViT.
  rope: Optional[rope_lib.Kind] = None  # rotary position embeddings on the patches' q and k
  rope_temperature: Optional[float] = None  # None: the kind's (rope_lib.TEMPERATURES)
  rope_offset: float = 0.0  # added to the patch indices (eva02, pe)
  rope_grid: Optional[int] = None  # eva02/pe: the grid side the coordinates are scaled to
  pos_embed: bool = True  # the learned absolute table (DINOv3 has none)
  qkv_bias: bool = True
  mlp: Mlp = "plain"  # 'plain': fc2(act(fc1 x)); 'swiglu': fc2(SiLU(gate x) * fc1 x)
  mlp_norm: bool = False  # a LayerNorm on the MLP's hidden features (EVA-02's sub-LN)
  attn_norm: bool = False  # a LayerNorm on the attention output before proj (EVA-02 CLIP)
  final_norm: bool = True  # the LayerNorm on every final token
  fc_norm: bool = False  # a LayerNorm on the pooled feature before the head (timm fc_norm)
  map_heads: Optional[int] = None  # the MAP head's heads; None: num_heads
  image_mean: Optional[tuple] = None  # None: the style's (what the file's metadata says)
  image_std: Optional[tuple] = None

  def __post_init__(self):
    """Every field a user sets is checked here, once, whichever way the model is made."""
    for field in (
      "width",
      "depth",
      "patch",
      "image_size",
      "attention_block_q",
      "attention_block_k",
    ):
      if not isinstance(getattr(self, field), int) or getattr(self, field) < 1:
        raise UserError(f"{field}={getattr(self, field)!r}; expected a positive integer.")
    if self.style not in STYLES:
      raise UserError(f"Unknown ViT style {self.style!r}; expected one of {sorted(STYLES)}.")
    if self.activation not in (None, *ACTIVATIONS):
      raise UserError(
        f"Unknown activation {self.activation!r}; expected one of {sorted(ACTIVATIONS)}."
      )
    if self.pool not in ("cls", "gap", "map"):
      raise UserError(f"Unknown ViT pool {self.pool!r}; expected 'cls', 'gap' or 'map'.")
    if self.pool == "cls" and not self.cls_token:
      raise UserError("pool='cls' needs a CLS token (cls_token=False); use 'gap' or 'map'.")
    if not isinstance(self.registers, int) or self.registers < 0:
      raise UserError(f"registers={self.registers!r}; expected an integer >= 0.")
    if self.pos_interpolation not in POS_INTERPOLATIONS:
      raise UserError(
        f"pos_interpolation={self.pos_interpolation!r}; expected one of "
        f"{sorted(POS_INTERPOLATIONS)}."
      )
    if self.num_heads < 1 or self.width % self.num_heads:
      raise UserError(f"num_heads={self.num_heads} does not divide width={self.width}.")
    if self.attention_impl not in (None, "xla", "cudnn", "blocked"):
      raise UserError(
        f"attention_impl={self.attention_impl!r}; expected None, 'xla', 'cudnn' or 'blocked'."
      )
    if not isinstance(self.blocked_attention_tokens, int) or self.blocked_attention_tokens < 0:
      raise UserError(
        f"blocked_attention_tokens={self.blocked_attention_tokens!r}; expected an integer >= 0."
      )
    self._check_rope_and_parts()

  def _check_rope_and_parts(self):
    if self.rope not in (None, *rope_lib.KINDS):
      raise UserError(f"rope={self.rope!r}; expected None or one of {list(rope_lib.KINDS)}.")
    if self.rope is not None and (self.width // self.num_heads) % 4:
      raise UserError(
        f"rope needs a head dim divisible by 4 (two axes, pairs of dims); width "
        f"{self.width} / {self.num_heads} heads = {self.width // self.num_heads}."
      )
    if self.rope_temperature is not None and not self.rope_temperature > 1:
      raise UserError(f"rope_temperature={self.rope_temperature!r}; expected a number > 1.")
    if self.rope_grid is not None and (not isinstance(self.rope_grid, int) or self.rope_grid < 1):
      raise UserError(f"rope_grid={self.rope_grid!r}; expected None or a positive integer.")
    if self.rope == "dinov3" and (self.rope_grid is not None or self.rope_offset):
      raise UserError("rope='dinov3' normalises its coordinates: rope_grid and rope_offset unset.")
    if self.mlp not in ("plain", "swiglu"):
      raise UserError(f"mlp={self.mlp!r}; expected 'plain' or 'swiglu'.")
    heads = self.map_heads
    if heads is not None and (not isinstance(heads, int) or heads < 1 or self.width % heads):
      raise UserError(f"map_heads={heads!r}; expected None or a divisor of width={self.width}.")
    for name in ("image_mean", "image_std"):
      value = getattr(self, name)
      if value is not None and (
        len(value) != 3 or not all(float(v) > 0 or name == "image_mean" for v in value)
      ):
        raise UserError(f"{name}={value!r}; expected None or 3 numbers (std > 0).")

  @property
  def eps(self):
    return STYLES[self.style][1] if self.layer_norm_eps is None else self.layer_norm_eps

  @property
  def mean(self):
    return STYLES[self.style][4] if self.image_mean is None else tuple(self.image_mean)

  @property
  def std(self):
    return STYLES[self.style][5] if self.image_std is None else tuple(self.image_std)


def vit_config(variant: str = "B/16", **overrides) -> ViTConfig:
  (width, depth, heads, mlp), patch = common.parse_variant(variant, WIDTHS)
  cfg = dict(width=width, depth=depth, num_heads=heads, mlp_dim=mlp, patch=patch)
  cfg.update(overrides)
  return ViTConfig(**cfg)


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

  def __call__(self, x, rotary=None):
    b, t, d = x.shape
    q, k, v = self.qkv_heads(x, rotary)
    y = attention.attend(q, k, v, self.impl, self.blocked_from, self.blocks).reshape(b, t, d)
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

  def __call__(self, x, *, train: bool, rotary=None):
    y = self._scaled(self.attn(self.norm1(x), rotary), self.ls1)
    x = x + self.drop_path(y, train=train)
    y = self._scaled(self.mlp(self.norm2(x)), self.ls2)
    return x + self.drop_path(y, train=train)


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

  def __call__(self, x):
    b, t, d = x.shape
    h = self.num_heads
    q = self.q(jnp.broadcast_to(self.probe[...], (b, 1, d)).astype(x.dtype))
    k, v = jnp.split(self.kv(x).reshape(b, t, 2 * h, d // h), 2, 2)
    y = jax.nn.dot_product_attention(q.reshape(b, 1, h, d // h), k, v)
    y = self.proj(y.reshape(b, 1, d))
    return (y + self.fc2(self.act(self.fc1(self.norm(y)))))[:, 0]


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
    patch token, or the MAP head's attention pooling over every final token."""
    if self.cfg.pool == "cls":
      pooled = out.cls[:, 0]
    elif self.cfg.pool == "gap":
      pooled = out.patches.mean(axis=1)
    else:
      pooled = self.map_head(out.tokens)
    return pooled if self.fc_norm is None else self.fc_norm(pooled)

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
    if mask is not None:
      raise UserError("The ViT teacher always sees the whole image; mask must be None.")
    x = self.embed(images)
    rotary = self.rotary(common.patch_grid(images.shape[1:3], self.cfg.patch))
    blocks = []
    for block in self.blocks:
      x = block(x, train=train, rotary=rotary)
      blocks.append(x)
    tokens = x if self.norm is None else self.norm(x)
    out = common.ModelOutput(logits=None, tokens=tokens, blocks=tuple(blocks), roles=self.roles)
    if self.head is None:
      return out
    return out.replace(logits=self.head(self.pool(out)))
