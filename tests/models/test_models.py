"""Tests of linearizer.models against independent expectations (method.md §5–6, design.md).

Oracles: Hugging Face `transformers`' Mamba2Mixer (CPU torch path) for the mixer; a float64
NumPy, token-by-token Adventurer block written here from method.md; torch's bicubic
`F.interpolate` for position-embedding resampling; the parameter counts of method.md §5.

Tolerances (stated once, used below; "relative" means max|ours - ref| / max|ref|):
  float32 mixer vs HF torch (float32):       relative <= 1e-4
  float32 block vs float64 NumPy:           relative <= 1e-4 (on the block's update, out - in)
  bicubic resampling vs torch interpolate:  max abs <= 1e-5 (inputs O(1))
  resampled-on-the-fly vs resampled ahead:  relative <= 1e-5
  parameter counts vs method.md §5:         within ±0.5 %
  bfloat16 student vs float32 student:      relative <= 5e-2 on logits and final tokens
"""

import dataclasses
import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kernels  # noqa: F401  (the models need the SSD op; fail loudly here if it is missing)
from helpers import rel_err
from linearizer import models
from linearizer.errors import UserError
from linearizer.models import build, common
from linearizer.models.adventurer import AdventurerConfig, Block, adventurer_config
from linearizer.models.mamba2 import Mamba2
from linearizer.models.vit import ViTConfig, vit_config

RTOL = 1e-4
RESAMPLE_ATOL = 1e-5
BF16_RTOL = 5e-2


# Every forward pass goes through these jitted callers: on CPU, eager op-by-op execution of
# the chunked scan costs several seconds per new shape, one jit compile about one. Models
# with the same config and input shapes share a compiled program.
@functools.partial(nnx.jit, static_argnames=("train",))
def forward(model, x, mask=None, train=False):
  return model(x, mask=mask, train=train)


block_forward = nnx.jit(lambda block, h: block(h, train=False)[0])  # (output, mixer branch)
mixer_forward = nnx.jit(lambda mixer, u: mixer(u))


def output_shapes(model, x, mask=None):
  """Traces a forward pass without compiling it: enough where only shapes matter."""
  return nnx.eval_shape(lambda m, x, mask: m(x, mask=mask), model, x, mask)


def tiny_student(**overrides):
  """A seconds-sized Adventurer: 32x32 images, patch 8 (4x4 grid, 17 tokens), 3 classes."""
  kw = dict(width=32, depth=2, image_size=32, d_state=16, headdim=16, chunk_size=8, num_classes=3)
  kw.update(overrides)
  seed = kw.pop("seed", 0)
  return build("adventurer", "Ti/8", seed=seed, **kw)


def images(batch, h=32, w=32, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, h, w, 3)), jnp.float32)


def set_param(param, value):
  param.value = jnp.asarray(value, jnp.float32)


def np64(param):
  return np.asarray(param[...], np.float64)


# ------------------------------------------------------------------------------------------
# 1. Mamba-2 mixer parity with transformers' Mamba2Mixer
# ------------------------------------------------------------------------------------------
HF = dict(
  hidden_size=128,
  state_size=64,
  head_dim=64,
  expand=2,
  n_groups=1,
  conv_kernel=4,
  use_bias=False,
  use_conv_bias=True,
  chunk_size=16,
)


@pytest.fixture(scope="module")
def hf_mixer():
  torch = pytest.importorskip("torch")
  modeling = pytest.importorskip("transformers.models.mamba2.modeling_mamba2")
  from transformers.models.mamba2.configuration_mamba2 import Mamba2Config

  heads = HF["expand"] * HF["hidden_size"] // HF["head_dim"]
  # HF's default layer_norm_epsilon is 1e-5 already (the gated norm's eps); set it explicitly
  # so the comparison does not depend on that default. Ours is 1e-5 (method.md §6 step 5).
  cfg = Mamba2Config(num_heads=heads, num_hidden_layers=1, layer_norm_epsilon=1e-5, **HF)
  torch.manual_seed(0)
  mixer = modeling.Mamba2Mixer(cfg, layer_idx=0).eval()  # eval: never the fused train path
  assert mixer.norm.variance_epsilon == 1e-5
  assert tuple(mixer.time_step_limit) == (0.0, float("inf"))  # no dt clamping to mirror
  with torch.no_grad():  # make every parameter non-trivial
    mixer.A_log.copy_(torch.log(torch.empty(heads).uniform_(1, 16)))
    mixer.dt_bias.copy_(torch.randn(heads) - 3.0)  # Δ spread around softplus(-3) ≈ 0.05
    mixer.D.copy_(torch.randn(heads))
    mixer.norm.weight.copy_(1 + 0.3 * torch.randn_like(mixer.norm.weight))
    mixer.conv1d.weight.copy_(0.5 * torch.randn_like(mixer.conv1d.weight))
    mixer.conv1d.bias.copy_(0.2 * torch.randn_like(mixer.conv1d.bias))
    mixer.in_proj.weight.copy_(
      torch.randn_like(mixer.in_proj.weight) / math.sqrt(HF["hidden_size"])
    )
  return mixer


def mixer_from_hf(mixer, impl):
  """Our Mamba2 with the HF mixer's weights, mapped name by name."""
  ours = Mamba2(
    HF["hidden_size"],
    d_state=HF["state_size"],
    headdim=HF["head_dim"],
    expand=HF["expand"],
    ngroups=HF["n_groups"],
    d_conv=HF["conv_kernel"],
    chunk_size=HF["chunk_size"],
    ssd_impl=impl,
    rngs=nnx.Rngs(1),
  )
  sd = {k: v.detach().numpy() for k, v in mixer.state_dict().items()}
  assert set(sd) == {
    "in_proj.weight",
    "conv1d.weight",
    "conv1d.bias",
    "dt_bias",
    "A_log",
    "D",
    "norm.weight",
    "out_proj.weight",
  }
  set_param(ours.in_proj.kernel, sd["in_proj.weight"].T)  # torch (out, in) -> (in, out)
  set_param(ours.conv_weight, sd["conv1d.weight"][:, 0, :].T)  # (C, 1, K) -> (K, C)
  set_param(ours.conv_bias, sd["conv1d.bias"])
  set_param(ours.dt_bias, sd["dt_bias"])
  set_param(ours.A_log, sd["A_log"])
  set_param(ours.D, sd["D"])
  set_param(ours.norm_weight, sd["norm.weight"])
  set_param(ours.out_proj.kernel, sd["out_proj.weight"].T)
  return ours


@pytest.mark.parametrize("impl", ["xla", "reference"])
@pytest.mark.parametrize("length", [37, 65])
def test_mamba2_matches_transformers(hf_mixer, impl, length):
  import torch

  u = np.random.default_rng(length).normal(size=(2, length, HF["hidden_size"])).astype(np.float32)
  with torch.no_grad():
    ref = hf_mixer(torch.from_numpy(u)).numpy()
  ours = mixer_forward(mixer_from_hf(hf_mixer, impl), jnp.asarray(u))
  assert ours.shape == ref.shape
  assert rel_err(ours, ref) <= RTOL, rel_err(ours, ref)


# ------------------------------------------------------------------------------------------
# 2. One Adventurer block against a float64 NumPy loop written from method.md §5–6
# ------------------------------------------------------------------------------------------
def silu(x):
  return x / (1 + np.exp(-x))


def softplus(x):
  return np.log1p(np.exp(x))


def rmsnorm(x, w, eps=1e-5):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def flip64(t):
  """[p_1 … p_N, cls] -> [p_N … p_1, cls]."""
  return np.concatenate([t[:, :-1][:, ::-1], t[:, -1:]], axis=1)


def mixer64(u, p, d_state, headdim):
  """method.md §6, one token at a time, float64. u: (b, L, D)."""
  batch, length, _ = u.shape
  inner = p["norm_weight"].shape[0]
  heads = inner // headdim
  proj = u @ p["in_proj"]
  z, xbc, dt = proj[..., :inner], proj[..., inner : 2 * inner + 2 * d_state], proj[..., -heads:]
  # Causal depthwise conv, width K: out_t = b + Σ_k w[k] · xbc_{t-K+1+k} (zeros before t=0).
  w = p["conv_weight"]
  k_width = w.shape[0]
  conv = np.empty_like(xbc)
  for t in range(length):
    acc = p["conv_bias"].copy()[None].repeat(batch, 0)
    for k in range(k_width):
      src = t - k_width + 1 + k
      if src >= 0:
        acc = acc + w[k] * xbc[:, src]
    conv[:, t] = acc
  xbc = silu(conv)
  x = xbc[..., :inner].reshape(batch, length, heads, headdim)
  B, C = xbc[..., inner : inner + d_state], xbc[..., inner + d_state :]
  delta = softplus(dt + p["dt_bias"])
  A = -np.exp(p["A_log"])
  y = np.empty_like(x)
  for b in range(batch):
    for h in range(heads):
      s = np.zeros((headdim, d_state))
      for t in range(length):
        s = np.exp(delta[b, t, h] * A[h]) * s + delta[b, t, h] * np.outer(x[b, t, h], B[b, t])
        y[b, t, h] = s @ C[b, t] + p["D"][h] * x[b, t, h]
  g = y.reshape(batch, length, inner) * silu(z)
  return rmsnorm(g, p["norm_weight"]) @ p["out_proj"]


def block64(h, p, flip, d_state, headdim):
  """method.md §5 block: mixer branch with heading average and flip, then SwiGLU."""
  t = rmsnorm(h, p["norm"])
  if flip:
    t = flip64(t)
  seq = np.concatenate([t.mean(axis=1, keepdims=True), t], axis=1)
  t = mixer64(seq, p, d_state, headdim)[:, 1:]
  if flip:
    t = flip64(t)
  h = h + t
  m = rmsnorm(h, p["norm_mlp"])
  a = m @ p["w1"] + p["b1"]
  b = m @ p["w2"] + p["b2"]
  return h + (silu(a) * b) @ p["w3"] + p["b3"]


def randomize_block(block, seed):
  """Make the parameters that init sets to constants non-trivial too."""
  r = np.random.default_rng(seed)
  mx = block.mixer
  for norm in (block.norm, block.norm_mlp):
    set_param(norm.scale, 1 + 0.3 * r.normal(size=norm.scale.shape))
  set_param(mx.norm_weight, 1 + 0.3 * r.normal(size=mx.norm_weight.shape))
  set_param(mx.D, r.normal(size=mx.D.shape))
  set_param(mx.dt_bias, r.normal(size=mx.dt_bias.shape) - 2.0)
  set_param(mx.out_proj.kernel, r.normal(size=mx.out_proj.kernel.shape) * 0.1)
  for lin in (block.mlp.w1, block.mlp.w2, block.mlp.w3):
    set_param(lin.bias, 0.1 * r.normal(size=lin.bias.shape))


def block_params64(block):
  mx, mlp = block.mixer, block.mlp
  return dict(
    norm=np64(block.norm.scale),
    norm_mlp=np64(block.norm_mlp.scale),
    in_proj=np64(mx.in_proj.kernel),
    conv_weight=np64(mx.conv_weight),
    conv_bias=np64(mx.conv_bias),
    dt_bias=np64(mx.dt_bias),
    A_log=np64(mx.A_log),
    D=np64(mx.D),
    norm_weight=np64(mx.norm_weight),
    out_proj=np64(mx.out_proj.kernel),
    w1=np64(mlp.w1.kernel),
    b1=np64(mlp.w1.bias),
    w2=np64(mlp.w2.kernel),
    b2=np64(mlp.w2.bias),
    w3=np64(mlp.w3.kernel),
    b3=np64(mlp.w3.bias),
  )


BLOCK_CFG = AdventurerConfig(
  width=32, depth=2, patch=8, image_size=32, d_state=16, headdim=16, chunk_size=8
)


@pytest.mark.parametrize("impl", ["xla", "reference"])
@pytest.mark.parametrize("flip", [False, True])
def test_block_matches_numpy_float64(flip, impl):
  cfg = dataclasses.replace(BLOCK_CFG, ssd_impl=impl)
  block = Block(cfg, 0.0, flip, rngs=nnx.Rngs(3))
  randomize_block(block, seed=4)
  h = np.random.default_rng(5).normal(size=(2, 17, cfg.width))  # 16 patches + CLS
  ref = block64(h, block_params64(block), flip, cfg.d_state, cfg.headdim)
  ours = np.asarray(block_forward(block, jnp.asarray(h, jnp.float32)), np.float64)
  assert rel_err(ours - h, ref - h) <= RTOL, rel_err(ours - h, ref - h)


def test_flip_changes_the_block():
  """Guards the test above against being vacuous: the flip must matter."""
  h = jnp.asarray(np.random.default_rng(5).normal(size=(2, 17, 32)), jnp.float32)
  cfg = dataclasses.replace(BLOCK_CFG, ssd_impl="xla")
  a = block_forward(Block(cfg, 0.0, False, rngs=nnx.Rngs(3)), h)
  b = block_forward(Block(cfg, 0.0, True, rngs=nnx.Rngs(3)), h)
  assert rel_err(a - h, b - h) > 1e-2


# ------------------------------------------------------------------------------------------
# 3. Output contract of both models
# ------------------------------------------------------------------------------------------
def test_student_output_contract():
  model = tiny_student()
  out = forward(model, images(2))
  assert out.logits.shape == (2, 3)
  assert out.tokens.shape == (2, 17, 32)
  assert isinstance(out.blocks, tuple) and len(out.blocks) == 2
  assert all(b.shape == (2, 17, 32) for b in out.blocks)
  np.testing.assert_allclose(out.tokens, model.norm_f(out.blocks[-1]), rtol=1e-6, atol=1e-6)
  # Student order [patches, cls]: logits read the last token only.
  np.testing.assert_allclose(out.logits, model.head(out.tokens[:, -1]), rtol=1e-6, atol=1e-6)
  # and the embedding puts CLS (+ the last pos-embed slot) last.
  emb = model.embed(images(2))
  np.testing.assert_allclose(
    emb[:, -1],
    jnp.broadcast_to(model.cls_token[...][0, 0] + model.pos_embed[...][0, -1], (2, 32)),
    rtol=1e-6,
    atol=1e-6,
  )
  out = output_shapes(tiny_student(depth=3, num_classes=0), images(2))
  assert out.logits is None and out.tokens.shape == (2, 17, 32) and len(out.blocks) == 3


def test_teacher_output_contract():
  model = build("vit", "Ti/8", image_size=32, depth=2, num_classes=5)
  r = np.random.default_rng(0)  # the head is zero-initialised; make it informative
  set_param(model.head.kernel, r.normal(size=model.head.kernel.shape))
  set_param(model.head.bias, r.normal(size=model.head.bias.shape))
  out = forward(model, images(2))
  assert out.logits.shape == (2, 5)
  assert out.tokens.shape == (2, 17, 192)
  assert isinstance(out.blocks, tuple) and len(out.blocks) == 2
  assert all(b.shape == (2, 17, 192) for b in out.blocks)
  np.testing.assert_allclose(out.tokens, model.norm(out.blocks[-1]), rtol=1e-5, atol=1e-5)
  # Teacher order [cls, patches]: logits read the first token.
  np.testing.assert_allclose(out.logits, model.head(out.tokens[:, 0]), rtol=1e-5, atol=1e-5)
  out = output_shapes(build("vit", "Ti/8", image_size=32, depth=2), images(2))
  assert out.logits is None and out.tokens.shape == (2, 17, 192) and len(out.blocks) == 2
  with pytest.raises(ValueError):
    forward(model, images(2), jnp.zeros((2, 16), bool))


def test_teacher_gap_pool_reads_the_mean_patch_token():
  model = build("vit", "Ti/8", image_size=32, depth=2, num_classes=5, pool="gap")
  set_param(model.head.kernel, np.random.default_rng(0).normal(size=model.head.kernel.shape))
  out = forward(model, images(2))
  np.testing.assert_allclose(
    out.logits, model.head(out.tokens[:, 1:].mean(1)), rtol=1e-5, atol=1e-5
  )
  assert not np.allclose(out.logits, model.head(out.tokens[:, 0]), atol=1e-3)
  with pytest.raises(ValueError, match="pool 'mean'"):
    build("vit", "Ti/8", pool="mean")


def test_token_roles_are_the_hand_slices():
  """`out.cls` / `out.patches` (and `roles.cls_of` / `patches_of` on every block) are the
  slices the tests above take by hand: ViT [cls, patches], Adventurer [patches, cls]; the
  logits read `out.cls` (ViT pool 'cls')."""
  student = tiny_student()
  out = forward(student, images(2))
  assert out.roles == student.roles == models.Adventurer.roles
  assert models.Adventurer.roles == common.TokenRoles(cls=-1, patches=(0, -1))
  assert out.cls.shape == (2, 1, 32) and out.patches.shape == (2, 16, 32)
  np.testing.assert_array_equal(out.cls, out.tokens[:, -1:])
  np.testing.assert_array_equal(out.patches, out.tokens[:, :-1])
  for block in out.blocks:
    np.testing.assert_array_equal(out.roles.cls_of(block), block[:, -1:])
    np.testing.assert_array_equal(out.roles.patches_of(block), block[:, :-1])
  np.testing.assert_allclose(out.logits, student.head(out.cls[:, 0]), rtol=1e-6, atol=1e-6)

  teacher = build("vit", "Ti/8", image_size=32, depth=2, num_classes=5)
  r = np.random.default_rng(0)  # the head is zero-initialised; make it informative
  set_param(teacher.head.kernel, r.normal(size=teacher.head.kernel.shape))
  set_param(teacher.head.bias, r.normal(size=teacher.head.bias.shape))
  assert teacher.cfg.pool == "cls"
  out = forward(teacher, images(2))
  assert out.roles == teacher.roles == common.TokenRoles(cls=0, patches=(1, None))
  assert out.cls.shape == (2, 1, 192) and out.patches.shape == (2, 16, 192)
  np.testing.assert_array_equal(out.cls, out.tokens[:, :1])
  np.testing.assert_array_equal(out.patches, out.tokens[:, 1:])
  for block in out.blocks:
    np.testing.assert_array_equal(out.roles.cls_of(block), block[:, :1])
    np.testing.assert_array_equal(out.roles.patches_of(block), block[:, 1:])
  np.testing.assert_allclose(out.logits, teacher.head(out.cls[:, 0]), rtol=1e-5, atol=1e-5)

  # A model without CLS: `cls` is None, the patches are what the roles say.
  tokens = jnp.arange(2 * 5 * 3, dtype=jnp.float32).reshape(2, 5, 3)
  no_cls = common.ModelOutput(
    logits=None, tokens=tokens, blocks=(), roles=common.TokenRoles(cls=None, patches=(0, 4))
  )
  assert no_cls.cls is None
  np.testing.assert_array_equal(no_cls.patches, tokens[:, :4])


# ------------------------------------------------------------------------------------------
# 4. Masking
# ------------------------------------------------------------------------------------------
def test_mask_replaces_patch_embeddings_before_position_embedding():
  model = tiny_student()
  x = images(3)
  mask = np.random.default_rng(1).random((3, 16)) < 0.5
  mask[0, :] = False
  mask[1, :] = True
  base = np.asarray(model.embed(x))
  masked = np.asarray(model.embed(x, jnp.asarray(mask)))
  pos = np.asarray(model.pos_embed[...])[0]
  token = np.asarray(model.mask_token[...])[0, 0]
  for b in range(3):
    for i in range(16):
      want = token + pos[i] if mask[b, i] else base[b, i]
      np.testing.assert_allclose(masked[b, i], want, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(masked[:, -1], base[:, -1])  # CLS never masked
  # Masked positions no longer depend on the image.
  other = np.asarray(model.embed(images(3, seed=9), jnp.asarray(mask)))
  np.testing.assert_array_equal(other[:, :16][mask], masked[:, :16][mask])


def test_all_false_mask_equals_no_mask():
  model = tiny_student()
  x = images(2)
  a = forward(model, x, jnp.zeros((2, 16), bool))
  b = forward(model, x)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_array_equal(model.embed(x, jnp.zeros((2, 16), bool)), model.embed(x))


@pytest.mark.parametrize("shape", [(2, 17), (16,), (3, 16), (2, 4, 4)])
def test_wrong_mask_shape_raises(shape):
  model = tiny_student()
  with pytest.raises(ValueError, match="mask"):
    forward(model, images(2), jnp.zeros(shape, bool))


# ------------------------------------------------------------------------------------------
# 5. Position-embedding resampling
# ------------------------------------------------------------------------------------------
def torch_bicubic(tokens, old_grid, new_grid):
  """(..., h*w, D) raster tokens through torch's F.interpolate(bicubic, align_corners=False)."""
  torch = pytest.importorskip("torch")
  t = np.array(tokens, np.float32)  # a writable copy for torch.from_numpy
  lead, d = t.shape[:-2], t.shape[-1]
  grid = torch.from_numpy(t.reshape(-1, *old_grid, d)).permute(0, 3, 1, 2)
  out = torch.nn.functional.interpolate(
    grid, size=tuple(new_grid), mode="bicubic", align_corners=False
  )
  return out.permute(0, 2, 3, 1).reshape(*lead, new_grid[0] * new_grid[1], d).numpy()


@pytest.mark.parametrize(
  "old,new",
  [
    ((4, 4), (7, 7)),
    ((7, 7), (4, 4)),
    ((3, 5), (6, 4)),
    ((6, 4), (3, 5)),
    ((5, 5), (2, 3)),
    ((14, 14), (16, 16)),
    ((2, 2), (1, 1)),
  ],
)
def test_resample_grid_matches_torch_bicubic(old, new):
  tokens = np.random.default_rng(0).normal(size=(2, old[0] * old[1], 6)).astype(np.float32)
  ours = common.resample_grid(jnp.asarray(tokens), old, new)
  assert ours.shape == (2, new[0] * new[1], 6)
  np.testing.assert_allclose(ours, torch_bicubic(tokens, old, new), atol=RESAMPLE_ATOL, rtol=0)


def test_resample_pos_embed_keeps_cls_slot():
  pos = jnp.asarray(np.random.default_rng(1).normal(size=(1, 4 * 6 + 1, 8)), jnp.float32)
  # Identity when the grid does not change.
  for cls_at in ("first", "last"):
    np.testing.assert_array_equal(common.resample_pos_embed(pos, (4, 6), (4, 6), cls_at), pos)
  out = common.resample_pos_embed(pos, (4, 6), (5, 3), cls_at="last")
  assert out.shape == (1, 16, 8)
  np.testing.assert_array_equal(out[:, -1], pos[:, -1])
  np.testing.assert_allclose(
    out[:, :-1], torch_bicubic(pos[:, :-1], (4, 6), (5, 3)), atol=RESAMPLE_ATOL, rtol=0
  )
  out = common.resample_pos_embed(pos, (4, 6), (5, 3), cls_at="first")
  np.testing.assert_array_equal(out[:, 0], pos[:, 0])
  np.testing.assert_allclose(
    out[:, 1:], torch_bicubic(pos[:, 1:], (4, 6), (5, 3)), atol=RESAMPLE_ATOL, rtol=0
  )
  with pytest.raises(ValueError):
    common.resample_pos_embed(pos, (4, 6), (5, 3), cls_at="middle")


def test_student_runs_at_new_resolution_like_a_resampled_model():
  model = tiny_student()  # trained at 32x32: 4x4 grid
  x = images(2, 48, 48)  # 6x6 grid
  out = forward(model, x)
  assert out.tokens.shape == (2, 37, 32) and out.logits.shape == (2, 3)

  # The same weights with the position embedding resampled ahead of time, independently:
  # torch's bicubic on the 16 patch slots, the CLS slot (last) kept as it is.
  ahead = tiny_student(image_size=48)
  nnx.update(ahead, nnx.state(model))
  pos = np.asarray(model.pos_embed[...])
  set_param(
    ahead.pos_embed,
    np.concatenate([torch_bicubic(pos[:, :-1], (4, 4), (6, 6)), pos[:, -1:]], axis=1),
  )
  assert ahead.pos_embed.shape == (1, 37, 32)
  out_ahead = forward(ahead, x)
  assert rel_err(out.tokens, out_ahead.tokens) <= 1e-5
  assert rel_err(out.logits, out_ahead.logits) <= 1e-5
  # Non-square inputs work too.
  out = output_shapes(model, images(2, 32, 48))
  assert out.tokens.shape == (2, 4 * 6 + 1, 32)


# ------------------------------------------------------------------------------------------
# 6. Parameter counts (method.md §5)
# ------------------------------------------------------------------------------------------
def count_params(model):
  return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize(
  "variant,millions", [("Ti/16", 11.6), ("S/16", 44.5), ("B/16", 98.7), ("L/16", 346.0)]
)
def test_parameter_counts(variant, millions):
  model = nnx.eval_shape(lambda: build("adventurer", variant, num_classes=1000))
  n = count_params(model)
  assert abs(n / 1e6 - millions) <= 0.005 * millions, n


def test_b8_builds():
  model = nnx.eval_shape(lambda: build("adventurer", "B/8", num_classes=1000))
  assert model.pos_embed.shape == (1, 28 * 28 + 1, 768)
  assert len(model.layers) == 12 and model.patch_embed.kernel.shape == (8, 8, 3, 768)


# ------------------------------------------------------------------------------------------
# 7. Flip patterns and drop path
# ------------------------------------------------------------------------------------------
def test_flip_patterns():
  flips = lambda pattern: [
    layer.flip
    for layer in nnx.eval_shape(lambda: tiny_student(depth=7, flip_pattern=pattern)).layers
  ]
  assert flips("alternate") == [i % 2 == 1 for i in range(7)]
  assert [i for i, f in enumerate(flips("alternate")) if f] == [1, 3, 5]
  assert [i for i, f in enumerate(flips("released")) if f] == [2, 3]
  assert [i for i, f in enumerate(flips("pairs")) if f] == [2, 3, 6]  # (i // 2) % 2 == 1
  assert not any(flips("none"))
  assert adventurer_config("Ti/16").flip_pattern == "alternate"  # the paper's default
  with pytest.raises(ValueError, match="flip_pattern"):
    build("adventurer", "Ti/16", flip_pattern="every_third")


def test_drop_path_rates():
  depth, rate = 6, 0.3
  model = nnx.eval_shape(lambda: tiny_student(depth=depth, drop_path=rate))
  want = ([0.0] + np.linspace(0, rate, depth).tolist())[:depth]
  np.testing.assert_allclose(
    [layer.drop_path.rate for layer in model.layers], want, rtol=0, atol=1e-12
  )


def test_drop_path_is_per_sample():
  dp = common.DropPath(0.5, rngs=nnx.Rngs(0))
  x = jnp.ones((64, 5, 3))
  y = np.asarray(dp(x, train=True))
  per_sample = y.reshape(64, -1)
  assert np.all(per_sample == per_sample[:, :1])  # whole sample kept or dropped
  assert set(np.unique(per_sample)) == {0.0, 2.0}  # kept ones scaled by 1/keep
  np.testing.assert_array_equal(dp(x, train=False), x)


def test_drop_path_train_vs_eval():
  model = tiny_student(depth=4, drop_path=0.8)
  x = jnp.broadcast_to(images(1), (8, 32, 32, 3))  # 8 identical samples
  t1 = np.asarray(forward(model, x, train=True).tokens)
  t2 = np.asarray(forward(model, x, train=True).tokens)
  assert not np.allclose(t1, t2)  # stochastic across calls
  assert any(not np.allclose(t1[0], t1[i]) for i in range(1, 8))  # and per sample
  e1 = np.asarray(forward(model, x).tokens)
  e2 = np.asarray(forward(model, x).tokens)
  np.testing.assert_array_equal(e1, e2)
  np.testing.assert_allclose(e1, np.broadcast_to(e1[:1], e1.shape), rtol=1e-6, atol=1e-6)


def test_remat_recomputes_the_same_values_and_gradients():
  """remat=True changes what the backward keeps, not what it computes: the same loss and
  gradients, drop path's draws included."""
  x = images(2)

  def value_and_grads(remat):
    model = tiny_student(depth=3, drop_path=0.5, remat=remat)
    return nnx.value_and_grad(lambda m: jnp.sum(m(x, train=True).tokens ** 2))(model)

  (v0, g0), (v1, g1) = value_and_grads(False), value_and_grads(True)
  assert float(v0) == float(v1)
  for remat in (False, True):  # the branches are checkpointed only when asked
    graphdef, state = nnx.split(tiny_student(remat=remat))
    program = str(jax.make_jaxpr(lambda st: nnx.merge(graphdef, st)(x).tokens)(state))
    assert ("remat" in program) == remat
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------
# 8. Initialisation (method.md §5–6)
# ------------------------------------------------------------------------------------------
def test_init_properties():
  width, depth = 32, 8
  model = tiny_student(depth=depth)  # 4 heads per block, 32 in all
  mixers = [layer.mixer for layer in model.layers]
  a_log = np.concatenate([np64(m.A_log) for m in mixers])
  assert np.all(a_log >= 0) and np.all(a_log <= math.log(16) + 1e-6)
  assert a_log.min() < math.log(4) and a_log.max() > math.log(8)  # spread over [1, 16]
  dt0 = softplus(np.concatenate([np64(m.dt_bias) for m in mixers]))
  assert np.all(dt0 >= 1e-4) and np.all(dt0 <= 0.1 * (1 + 1e-5))
  assert dt0.min() < 5e-3 and dt0.max() > 2e-2  # log-uniform over [1e-3, 0.1]
  for m in mixers:
    np.testing.assert_array_equal(m.D[...], 1.0)
    np.testing.assert_array_equal(m.norm_weight[...], 1.0)
  for layer in model.layers:
    np.testing.assert_array_equal(layer.norm.scale[...], 1.0)
    np.testing.assert_array_equal(layer.norm_mlp.scale[...], 1.0)
  np.testing.assert_array_equal(model.norm_f.scale[...], 1.0)

  # torch.nn.Linear default U(±1/sqrt(fan_in)) => std 1/sqrt(3 fan_in); out_proj also / sqrt(depth).
  inner = 2 * width
  in_std = np.mean([np64(m.in_proj.kernel).std() for m in mixers])
  out_std = np.mean([np64(m.out_proj.kernel).std() for m in mixers])
  assert in_std == pytest.approx(1 / math.sqrt(3 * width), rel=0.05)
  assert out_std == pytest.approx(1 / math.sqrt(3 * inner * depth), rel=0.05)
  # The same ratio, fan-in corrected: out_proj is 1/sqrt(depth) of an in_proj-like init.
  assert (out_std * math.sqrt(inner)) / (in_std * math.sqrt(width)) == pytest.approx(
    1 / math.sqrt(depth), rel=0.05
  )
  assert np.abs(np64(mixers[0].out_proj.kernel)).max() <= 1 / math.sqrt(inner * depth) + 1e-7
  for m in mixers:
    assert m.in_proj.bias is None and m.out_proj.bias is None  # no projection biases

  # Linear biases zero: SwiGLU, head, patch embedding.
  for layer in model.layers:
    for lin in (layer.mlp.w1, layer.mlp.w2, layer.mlp.w3):
      np.testing.assert_array_equal(lin.bias[...], 0.0)
  np.testing.assert_array_equal(model.head.bias[...], 0.0)
  np.testing.assert_array_equal(model.patch_embed.bias[...], 0.0)

  # pos-embed / CLS trunc-normal 0.02 (truncated at two standard deviations).
  for p in (model.pos_embed, model.cls_token, model.mask_token):
    assert np.abs(np64(p)).max() <= 0.04 + 1e-7
  # jax's truncated_normal(0.02) is N(0, 0.02) cut at ±2σ, whose std is 0.88 · 0.02.
  assert np64(model.pos_embed).std() == pytest.approx(0.02 * 0.8796, rel=0.1)


# ------------------------------------------------------------------------------------------
# 9. bfloat16 compute
# ------------------------------------------------------------------------------------------
def test_bfloat16_student_close_to_float32():
  f32 = tiny_student()
  bf16 = tiny_student(dtype="bfloat16")
  for a, b in zip(
    jax.tree.leaves(nnx.state(f32, nnx.Param)), jax.tree.leaves(nnx.state(bf16, nnx.Param))
  ):
    assert b.dtype == jnp.float32  # parameters stay float32
    np.testing.assert_array_equal(a, b)
  r = np.random.default_rng(0)
  set_param(f32.head.kernel, r.normal(size=f32.head.kernel.shape) / 8)
  set_param(bf16.head.kernel, f32.head.kernel[...])
  x = images(2)
  ref, out = forward(f32, x), forward(bf16, x)
  assert np.all(np.isfinite(np.asarray(out.logits, np.float32)))
  assert rel_err(np.asarray(out.logits, np.float32), ref.logits) <= BF16_RTOL
  assert rel_err(np.asarray(out.tokens, np.float32), ref.tokens) <= BF16_RTOL


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
def test_student_with_pallas_kernel_matches_xla(impl):
  """The whole student with a Pallas SSD kernel (interpret mode on CPU) gives the outputs
  and parameter gradients of the xla impl: same weights, 4 heads of headdim 16, d_state 16,
  18 scanned tokens in chunks of 16 (so state crosses a chunk boundary). Gradients get
  5e-4 of each leaf's max: each scan matches a float64 loop to ~2e-7 at the op
  (tests/models/test_ssd.py), but float32 rounding in a different order, carried through two
  blocks' backward, moved whole-model gradient leaves by up to 2.4e-4 between impls."""
  fields = dict(
    width=32, depth=2, headdim=16, d_state=16, chunk_size=16, image_size=16, num_classes=3
  )
  ref = build("adventurer", "Ti/4", seed=0, ssd_impl="xla", **fields)
  fast = build("adventurer", "Ti/4", seed=0, ssd_impl=impl, ssd_interpret=True, **fields)
  images = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))

  def loss_and_grads(model):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
      out = nnx.merge(graphdef, p, rest)(images)
      return jnp.sum(out.logits**2) + jnp.sum(out.tokens**2), out

    (value, out), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return out, jax.tree.leaves(grads)

  (out_ref, g_ref), (out_fast, g_fast) = loss_and_grads(ref), loss_and_grads(fast)
  for a, b in [
    (out_ref.logits, out_fast.logits),
    (out_ref.tokens, out_fast.tokens),
    *zip(out_ref.blocks, out_fast.blocks),
  ]:
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-4 * float(jnp.max(jnp.abs(a))))
  for a, b in zip(g_ref, g_fast):
    np.testing.assert_allclose(b, a, rtol=0, atol=5e-4 * float(jnp.max(jnp.abs(a))) + 1e-7)


# ------------------------------------------------------------------------------------------
# 10. The model table and config validation
# ------------------------------------------------------------------------------------------
TINY_CONFIGS = {
  "adventurer": lambda: adventurer_config(
    "Ti/8", width=32, depth=2, image_size=32, d_state=16, headdim=16, chunk_size=8, num_classes=3
  ),
  "vit": lambda: vit_config("Ti/8", image_size=32, depth=2, num_classes=5),
}


def abstract_params(model):
  """{path: (shape, dtype)} of a model's parameters."""
  return {k: (v.shape, v.dtype) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("kind", ["adventurer", "vit"])
def test_model_table_round_trips(kind):
  cfg = TINY_CONFIGS[kind]()
  assert kind in models.ARCHITECTURES
  assert isinstance(cfg, models.ARCHITECTURES[kind].config)
  assert models.kind_of(cfg) == kind
  model = nnx.eval_shape(lambda: models.from_config(cfg))  # shapes only: nothing compiled
  assert isinstance(model, models.ARCHITECTURES[kind].module)
  assert models.kind_of(model) == kind and model.cfg == cfg
  # from_config builds what build() builds from the variant string and the same fields.
  overrides = {
    f.name: getattr(cfg, f.name)
    for f in dataclasses.fields(cfg)
    if f.name not in ("width", "depth", "patch")
  }
  built = nnx.eval_shape(lambda: build(kind, "Ti/8", width=cfg.width, depth=cfg.depth, **overrides))
  assert built.cfg == cfg and abstract_params(built) == abstract_params(model)
  # The config's JSON form (model.json: tuples become lists) comes back as the same config.
  fields = json.loads(json.dumps(dataclasses.asdict(cfg)))
  assert models.config_from_dict(kind, fields) == cfg
  with pytest.raises(UserError, match="bogus"):
    models.config_from_dict(kind, {**fields, "bogus": 1})


def test_model_table_unknown_kind_names_the_known_ones(monkeypatch):
  for call in (lambda: build("mamba", "Ti/8"), lambda: models.config_from_dict("mamba", {})):
    with pytest.raises(UserError, match="mamba") as e:
      call()
    assert "'adventurer'" in str(e.value) and "'vit'" in str(e.value)
  with pytest.raises(UserError) as e:
    models.kind_of(object())
  assert "'adventurer'" in str(e.value) and "'vit'" in str(e.value)
  # A registered kind is built through the table and named in the errors.
  monkeypatch.setattr(models, "ARCHITECTURES", dict(models.ARCHITECTURES))
  models.register("vit_too", ViTConfig, models.ViT, vit_config)
  model = nnx.eval_shape(lambda: build("vit_too", "Ti/8", image_size=32, depth=1))
  assert isinstance(model, models.ViT) and model.cfg == vit_config("Ti/8", image_size=32, depth=1)
  with pytest.raises(UserError, match="vit_too"):
    build("mamba", "Ti/8")


ADVENTURER_FIELDS = dict(width=32, depth=2, patch=8, d_state=16, headdim=16, chunk_size=8)
VIT_FIELDS = dict(width=192, depth=2, num_heads=3, mlp_dim=768, patch=8)


@pytest.mark.parametrize(
  "config,fields,bad,names",
  [
    (AdventurerConfig, ADVENTURER_FIELDS, dict(ssd_impl="nope"), ("ssd_impl",)),
    (AdventurerConfig, ADVENTURER_FIELDS, dict(chunk_size=2.5), ("chunk_size",)),
    (AdventurerConfig, ADVENTURER_FIELDS, dict(chunk_size=-16), ("chunk_size",)),
    (AdventurerConfig, ADVENTURER_FIELDS, dict(remat="yes"), ("remat",)),
    (ViTConfig, VIT_FIELDS, dict(style="nope"), ("style",)),
    (ViTConfig, VIT_FIELDS, dict(num_heads=5), ("num_heads", "width")),  # 192 % 5 = 2
  ],
)
def test_config_validation(config, fields, bad, names):
  """A bad field fails when the config is made, however it is made: directly, through
  `dataclasses.replace` (how a user override reaches a loaded config), from model.json."""
  good = config(**fields)
  assert dataclasses.replace(good, **{k: getattr(good, k) for k in bad}) == good
  kind = models.kind_of(good)
  for make in (
    lambda: config(**{**fields, **bad}),
    lambda: dataclasses.replace(good, **bad),
    lambda: models.config_from_dict(kind, {**dataclasses.asdict(good), **bad}),
  ):
    with pytest.raises(UserError) as e:
      make()
    assert all(name in str(e.value) for name in names), str(e.value)
  # Good values of the same fields pass.
  ok = {"ssd_impl": "reference", "chunk_size": 16, "style": "clip", "num_heads": 6, "remat": True}
  assert dataclasses.replace(good, **{k: ok[k] for k in bad}) != good


def test_causal_conv_accumulates_in_float32():
  """bf16 inputs: the K products are summed in f32 and rounded once (as causal_conv1d).

  x = [1, 2^-8, 2^-8, 2^-8] with unit weights: summed in bf16, each 1 + 2^-8 rounds back to
  1 (the spacing of bf16 at 1 is 2^-7), giving 1; in f32 the sum is 1 + 3·2^-8, which rounds
  once to 1 + 2^-6 (1.5 spacings, ties to even)."""
  mixer = Mamba2(32, d_state=16, headdim=16, dtype="bfloat16", rngs=nnx.Rngs(0))
  mixer.conv_weight[...] = jnp.ones_like(mixer.conv_weight[...])
  mixer.conv_bias[...] = jnp.zeros_like(mixer.conv_bias[...])
  x = jnp.asarray([1.0, 2**-8, 2**-8, 2**-8], jnp.bfloat16)[None, :, None]
  x = jnp.broadcast_to(x, (1, 4, mixer.conv_weight.shape[1]))
  out = mixer.causal_conv(x)
  assert out.dtype == jnp.bfloat16
  want = np.asarray(jnp.asarray(1 + 3 * 2**-8, jnp.float32).astype(jnp.bfloat16))
  assert float(want) == 1 + 2**-6
  np.testing.assert_array_equal(np.asarray(out[0, 3], np.float32), float(want))
