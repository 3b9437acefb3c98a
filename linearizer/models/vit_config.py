"""The teacher's config: every field of a ViT (`ViTConfig`), its named sizes and styles.

The fields say which checkpoint family a ViT computes as (vit.py's docstring lists them);
`__post_init__` checks each once, whichever way the model is made.
"""

import dataclasses
from typing import Literal, Optional

import jax

from linearizer.errors import UserError
from linearizer.models import common
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
