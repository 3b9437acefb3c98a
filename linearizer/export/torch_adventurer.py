"""Adventurer in plain PyTorch: the student a `--format torch` export holds, without JAX.

This one file needs only torch (no mamba-ssm, no Triton, no JAX, no numpy): copy it beside
a `.pth` written by `python -m linearizer.export --format torch` and run

  import torch_adventurer
  model = torch_adventurer.load("student.pth")
  logits = model(images)  # (B, 3, H, W) float32, normalised with model.cfg.mean / std

It computes what the JAX student (linearizer/models/adventurer.py, mamba2.py) computes
(method.md §5-6): tokens `[p_1 … p_N, cls]` with the CLS token last; per block a pre-norm,
the patch order reversed on flipped blocks, the mean of the tokens prepended ("heading
average"), a Mamba-2 mixer whose SSD scan runs chunk by chunk as masked matmuls, then a
SwiGLU MLP; a final RMSNorm and a linear head on the CLS token. Parameter names and shapes
are those of wangf3014/Adventurer's `models_mamba.Adventurer` (its `state_dict()`), so the
`model` entry of the file loads there too, and that repository's checkpoints load here
given their config. Inference only: no stochastic depth, no mask token.
"""

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

# The top-level entry of an exported .pth that holds our config (linearizer/export/to_torch.py).
OURS = "linearizer"

# Which blocks reverse the patch order (as linearizer.models.adventurer.FLIP_PATTERNS):
# `released` is wangf3014/Adventurer's code as published, `alternate` the paper's rule.
FLIP_PATTERNS = {
  "alternate": lambda i: i % 2 == 1,
  "pairs": lambda i: (i // 2) % 2 == 1,
  "released": lambda i: i // 2 == 1,
  "none": lambda i: False,
}


@dataclasses.dataclass(frozen=True)
class AdventurerConfig:
  """What the network computes: the fields of our model.json that are not JAX run-time ones."""

  width: int
  depth: int
  patch: int
  image_size: int = 224  # the side pos_embed was learnt at; other sizes resample it
  num_classes: int = 0  # 0: no head, the model returns its final tokens
  flip_pattern: str = "alternate"
  d_state: int = 64
  headdim: int = 64
  expand: int = 2
  mlp_ratio: float = 2.5
  mean: tuple = (0.485, 0.456, 0.406)  # the normalisation the model expects of its input
  std: tuple = (0.229, 0.224, 0.225)
  chunk_size: int = 256  # tokens per SSD chunk: how it runs, not what it computes

  def __post_init__(self):
    if self.flip_pattern not in FLIP_PATTERNS:
      raise ValueError(
        f"flip_pattern={self.flip_pattern!r}; expected one of {sorted(FLIP_PATTERNS)}."
      )
    if not isinstance(self.chunk_size, int) or self.chunk_size < 1:
      raise ValueError(f"chunk_size={self.chunk_size!r}; expected a positive integer.")
    if (self.expand * self.width) % self.headdim:
      raise ValueError(
        f"expand*width={self.expand * self.width} is not a multiple of headdim={self.headdim}."
      )

  @classmethod
  def from_dict(cls, fields: dict) -> "AdventurerConfig":
    """The config from a dict of fields (an export's, or model.json's `config`); fields of
    the JAX model that say only how it runs there (dtype, ssd_impl, drop_path, ...) are
    ignored."""
    if fields.get("ngroups", 1) != 1:  # this file's mixer shares one B/C group over the heads
      raise ValueError(f"ngroups={fields['ngroups']!r}: this model has one B/C group (ngroups=1).")
    known = {f.name for f in dataclasses.fields(cls)}
    kept = {k: tuple(v) if k in ("mean", "std") else v for k, v in fields.items() if k in known}
    if kept.get("chunk_size") == 0:  # JAX's "the measured table's": here, the default
      del kept["chunk_size"]
    return cls(**kept)


# ---------------------------------------------------------------------------------------
# The SSD scan (method.md §6 step 4), chunked: linear in the length, matmuls inside a chunk
# ---------------------------------------------------------------------------------------
def ssd(x, dt, A, B, C, D, chunk_size: int = 256):
  """y_t = Σ_{s≤t} (C_t·B_s) exp(A Σ_{r=s+1..t} dt_r) dt_s x_s + D x_t, one group (ngroups 1).

  Args:
    x: (b, L, H, P) inputs.
    dt: (b, L, H) positive step sizes (after softplus).
    A: (H,) negative decay rates; D: (H,) skip weights.
    B, C: (b, L, S), shared by the heads.
    chunk_size: tokens per chunk; L need not be a multiple (the pad has dt = 0 and x = 0).

  Returns:
    y: (b, L, H, P), float32.
  """
  b, length, heads, p = x.shape
  q = min(chunk_size, length)
  pad = -length % q
  nc = (length + pad) // q

  def chunked(v):  # (b, L, ...) -> (b, nc, q, ...), zero-padded: decay 1, input 0
    v = F.pad(v, (0, 0) * (v.dim() - 2) + (0, pad))
    return v.reshape(b, nc, q, *v.shape[2:])

  xc, dtc, Bc, Cc = chunked(x), chunked(dt), chunked(B), chunked(C)
  cum = torch.cumsum(dtc * A, dim=2).transpose(2, 3)  # (b, nc, H, q) log-decays, <= 0
  xdt = xc * dtc[..., None]  # dt_s x_s, (b, nc, q, H, P)

  # Within a chunk: decay[l, s] = exp(cum_l - cum_s) for s <= l; masked to -inf before exp so
  # that no exp(+large) appears above the diagonal.
  causal = torch.ones(q, q, dtype=torch.bool, device=x.device).tril()
  seg = (cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, -math.inf)
  weights = torch.einsum("bcln,bcsn->bcls", Cc, Bc)[:, :, None] * torch.exp(seg)  # b c h l s
  y = torch.einsum("bchls,bcshp->bclhp", weights, xdt)

  if nc > 1:  # carry a (P x S) state per head from chunk to chunk
    to_end = torch.exp(cum[..., -1:] - cum).transpose(2, 3)  # (b, nc, q, H)
    own = torch.einsum("bcln,bclhp->bchpn", Bc, xdt * to_end[..., None])  # each chunk's state
    decay = torch.exp(cum[..., -1])  # (b, nc, H): a whole chunk's decay
    state, starts = torch.zeros_like(own[:, 0]), []
    for c in range(nc):
      starts.append(state)
      state = state * decay[:, c, :, None, None] + own[:, c]
    start = torch.stack(starts, dim=1)  # the state entering each chunk, (b, nc, H, P, S)
    y = y + torch.einsum("bcln,bchpn->bclhp", Cc, start) * torch.exp(cum).transpose(2, 3)[..., None]

  y = y.reshape(b, nc * q, heads, p)[:, :length]
  return y + D[:, None] * x


# ---------------------------------------------------------------------------------------
# Layers, named as Adventurer's state dict names them
# ---------------------------------------------------------------------------------------
class GatedRMSNorm(nn.Module):
  """RMSNorm(y ⊙ SiLU(z)) · weight over all E features (norm after the gate, one group)."""

  def __init__(self, dim: int, eps: float = 1e-5):
    super().__init__()
    self.eps = eps
    self.weight = nn.Parameter(torch.ones(dim))

  def forward(self, y, z):
    g = y * F.silu(z)
    return g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Mamba2(nn.Module):
  """in_proj → causal depthwise conv → SSD → gated RMSNorm → out_proj (mamba-ssm's Mamba2)."""

  def __init__(self, cfg: AdventurerConfig, d_conv: int = 4):
    super().__init__()
    self.inner, self.d_state, self.headdim = cfg.expand * cfg.width, cfg.d_state, cfg.headdim
    self.heads, self.chunk_size = self.inner // cfg.headdim, cfg.chunk_size
    conv_dim = self.inner + 2 * cfg.d_state
    # Projection order [z, x, B, C, dt], as in mamba-ssm.
    self.in_proj = nn.Linear(cfg.width, 2 * self.inner + 2 * cfg.d_state + self.heads, bias=False)
    self.conv1d = nn.Conv1d(conv_dim, conv_dim, d_conv, groups=conv_dim, padding=d_conv - 1)
    self.dt_bias = nn.Parameter(torch.zeros(self.heads))
    self.A_log = nn.Parameter(torch.zeros(self.heads))
    self.D = nn.Parameter(torch.ones(self.heads))
    self.norm = GatedRMSNorm(self.inner)
    self.out_proj = nn.Linear(self.inner, cfg.width, bias=False)

  def forward(self, u):
    b, length, _ = u.shape
    z, xbc, dt = torch.split(
      self.in_proj(u), [self.inner, self.inner + 2 * self.d_state, self.heads], dim=-1
    )
    # Padded by d_conv - 1 on both sides: the first L outputs are the causal conv.
    xbc = F.silu(self.conv1d(xbc.transpose(1, 2))[..., :length].transpose(1, 2))
    x, B, C = torch.split(xbc, [self.inner, self.d_state, self.d_state], dim=-1)
    y = ssd(
      x.reshape(b, length, self.heads, self.headdim),
      F.softplus(dt + self.dt_bias),
      -torch.exp(self.A_log),
      B,
      C,
      self.D,
      self.chunk_size,
    )
    return self.out_proj(self.norm(y.reshape(b, length, self.inner), z))


class SwiGLU(nn.Module):
  """w3(SiLU(w1 x) ⊙ w2 x), with biases."""

  def __init__(self, dim: int, hidden: int):
    super().__init__()
    self.w1, self.w2, self.w3 = (
      nn.Linear(dim, hidden),
      nn.Linear(dim, hidden),
      nn.Linear(hidden, dim),
    )

  def forward(self, x):
    return self.w3(F.silu(self.w1(x)) * self.w2(x))


def flip_patches(t):
  """Reverses the patch order of `[patches, cls]`; CLS stays last. Its own inverse."""
  return torch.cat([t[:, :-1].flip(1), t[:, -1:]], dim=1)


class Block(nn.Module):
  """Pre-norm Mamba-2 mixer over [heading average, tokens], then a pre-norm SwiGLU."""

  def __init__(self, cfg: AdventurerConfig, flip: bool):
    super().__init__()
    self.flip = flip
    self.norm = nn.RMSNorm(cfg.width, eps=1e-5)
    self.mixer = Mamba2(cfg)
    self.norm_mlp = nn.RMSNorm(cfg.width, eps=1e-5)
    self.mlp = SwiGLU(cfg.width, int(cfg.width * cfg.mlp_ratio))

  def forward(self, h):
    t = self.norm(h)
    t = flip_patches(t) if self.flip else t
    t = self.mixer(torch.cat([t.mean(1, keepdim=True), t], dim=1))[:, 1:]  # drop the heading
    t = flip_patches(t) if self.flip else t
    h = h + t
    return h + self.mlp(self.norm_mlp(h))


class PatchEmbed(nn.Module):
  def __init__(self, cfg: AdventurerConfig):
    super().__init__()
    self.proj = nn.Conv2d(3, cfg.width, cfg.patch, stride=cfg.patch)

  def forward(self, images):  # (B, 3, H, W) -> (B, h, w, D)
    return self.proj(images).permute(0, 2, 3, 1)


class Adventurer(nn.Module):
  """Patches first, CLS last: `[p_1 … p_N, cls]` (method.md §5)."""

  def __init__(self, cfg: AdventurerConfig):
    super().__init__()
    self.cfg = cfg
    grid = cfg.image_size // cfg.patch
    self.patch_embed = PatchEmbed(cfg)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
    self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, cfg.width))
    flip = FLIP_PATTERNS[cfg.flip_pattern]
    self.layers = nn.ModuleList([Block(cfg, flip(i)) for i in range(cfg.depth)])
    self.norm_f = nn.RMSNorm(cfg.width, eps=1e-5)
    self.head = nn.Linear(cfg.width, cfg.num_classes) if cfg.num_classes else None

  def position_embedding(self, hw: tuple):
    """pos_embed for an (h, w) patch grid: the patch slots resampled bicubically (half-pixel
    centres, no antialiasing, as timm does), the CLS slot (the last) kept as it is."""
    grid = self.cfg.image_size // self.cfg.patch
    if tuple(hw) == (grid, grid):
      return self.pos_embed
    patches = self.pos_embed[:, :-1].reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=tuple(hw), mode="bicubic", align_corners=False)
    return torch.cat([patches.flatten(2).transpose(1, 2), self.pos_embed[:, -1:]], dim=1)

  def tokens(self, images):
    """(B, 3, H, W) normalised images -> (B, N+1, D) final-norm tokens, CLS last.

    Any H, W of at least one patch: pos_embed is resampled to the grid; as in the JAX model
    (a VALID conv), pixels past the last whole patch are not seen.
    """
    p = self.cfg.patch
    if images.dim() != 4 or images.shape[1] != 3:
      raise ValueError(f"Expected NCHW images with 3 channels, got shape {tuple(images.shape)}.")
    if images.shape[2] < p or images.shape[3] < p:
      raise ValueError(f"Images of size {tuple(images.shape[2:])} are smaller than a {p}px patch.")
    x = self.patch_embed(images)
    b, h, w, d = x.shape
    x = torch.cat([x.reshape(b, h * w, d), self.cls_token.expand(b, 1, d)], dim=1)
    x = x + self.position_embedding((h, w))
    for layer in self.layers:
      x = layer(x)
    return self.norm_f(x)

  def forward(self, images):
    """(B, 3, H, W) float images normalised with cfg.mean / cfg.std -> (B, num_classes)
    logits of the CLS token, or the (B, N+1, D) final tokens for a model without a head."""
    tokens = self.tokens(images)
    return self.head(tokens[:, -1]) if self.head is not None else tokens


def load(path, config: AdventurerConfig | None = None, map_location="cpu") -> Adventurer:
  """The model of a `.pth` written by `python -m linearizer.export --format torch`.

  Args:
    path: the file. Its `model` entry holds the weights, its `linearizer` entry the config.
    config: the config, for a file without our entry (e.g. one of wangf3014/Adventurer's
      checkpoints: its width, depth, ... and flip_pattern="released", the code as
      published).
    map_location: passed to torch.load.

  Returns:
    The model in eval mode (every parameter loaded, strictly).
  """
  checkpoint = torch.load(path, map_location=map_location, weights_only=True)
  if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict):
    raise ValueError(f"{path}: expected a dict with a 'model' state dict, as the export writes.")
  if config is None:
    if not isinstance(checkpoint.get(OURS), dict) or "config" not in checkpoint[OURS]:
      raise ValueError(
        f"{path} has no {OURS!r} entry holding the config; pass config=AdventurerConfig(...)."
      )
    config = AdventurerConfig.from_dict(checkpoint[OURS]["config"])
  model = Adventurer(config)
  model.load_state_dict(checkpoint["model"], strict=True)
  return model.eval()
