"""A student initialised from its ViT teacher (linearizer/distillation/teacher_init.py) and the multi-group
Mamba-2 it needs (AdventurerConfig.ngroups).

Oracles, independent of the code under test: the teacher's own modules (its LayerNorm, qkv,
fc1/fc2) run on the same tokens; a float64 NumPy loop of Mamba-2 over the teacher's q, k, v
written from method.md §6 with mamba-ssm's grouped gated norm; `jax.image.resize` applied to
patches for the PI-resize.

Tolerances (stated once, used below; "relative" is max|ours - ref| / max|ref|):
  x, B, C vs SiLU of the teacher's V, K, Q:  relative <= 1e-4 (LayerNorm eps 1e-6 vs
    RMSNorm eps 1e-5 on zero-mean tokens: ~5e-6, plus float32)
  the mixer vs the float64 loop:             relative <= 1e-4
  the SwiGLU vs the teacher's GELU MLP:      relative <= 2e-2 (QuickGELU is within 0.021 of
    GELU pointwise); vs a QuickGELU teacher:  relative <= 1e-4
  PI-resize, upsampling (exact):             relative <= 1e-5
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import rel_err
from linearizer import models
from linearizer.distillation import teacher_init
from linearizer.errors import UserError
from linearizer.export import to_onnx as onnx_export
from linearizer.export import to_torch as torch_export
from linearizer.models import saved
from linearizer.models.adventurer import AdventurerConfig

RTOL = 1e-4
MLP_RTOL = 2e-2
RESIZE_RTOL = 1e-5
TEACHER = dict(width=32, depth=2, num_heads=2, mlp_dim=64, image_size=16)
# The student every mapped weight fits (teacher_fit.fitting_overrides of TEACHER).
FIT = dict(width=32, depth=2, expand=1, headdim=16, ngroups=2, d_state=16, mlp_ratio=2.0)
STUDENT = dict(image_size=16, chunk_size=8, **FIT)


def np64(param):
  return np.asarray(param[...], np.float64)


def randomize(model, seed):
  """Every parameter non-trivial (LayerNorm biases and qkv biases are 0 at init): scales
  around 1, the rest N(0, 0.3²)."""
  r = np.random.default_rng(seed)

  def draw(path, value):
    noise = 0.3 * r.normal(size=value.shape)
    return jnp.asarray(noise + (1.0 if path[-1].key == "scale" else 0.0), value.dtype)

  params = nnx.state(model, nnx.Param).to_pure_dict()
  nnx.update(model, nnx.State(jax.tree_util.tree_map_with_path(draw, params)))
  return model


def teacher(seed=0, **overrides):
  return randomize(models.build("vit", "Ti/4", seed=seed, **{**TEACHER, **overrides}), seed + 1)


def student(variant="Ti/4", seed=5, **overrides):
  return models.build("adventurer", variant, seed=seed, **{**STUDENT, **overrides})


def zero_mean_tokens(shape, seed):
  """Tokens with zero mean over the width: LayerNorm and RMSNorm then differ by eps only."""
  h = np.random.default_rng(seed).normal(size=shape)
  return jnp.asarray(h - h.mean(-1, keepdims=True), jnp.float32)


def teacher_qkv(block, h):
  """The teacher's q, k, v per head, (b, L, heads, head_dim) each, from its own modules."""
  b, length, d = h.shape
  qkv = np.asarray(block.attn.qkv(block.norm1(h)), np.float64)
  return qkv.reshape(b, length, 3, block.attn.num_heads, -1).transpose(2, 0, 1, 3, 4)


def silu(x):
  return x / (1 + np.exp(-x))


def softplus(x):
  return np.log1p(np.exp(x))


mixer_inputs = nnx.jit(lambda mixer, u: mixer.ssd_inputs(u)[0])
mixer_forward = nnx.jit(lambda mixer, u: mixer(u))


@functools.partial(nnx.jit, static_argnames=("train",))
def forward(model, x, train=False):
  return model(x, train=train)


# ------------------------------------------------------------------------------------------
# 1. Where each teacher weight goes
# ------------------------------------------------------------------------------------------
def test_a_rope_teacher_copies_what_carries_over():
  """DINOv3's shape (RoPE only, registers, no qkv bias, a SwiGLU): its SwiGLU is the
  student's own MLP, copied exactly (norm2's bias folded in); there is no table to copy, and
  the table of the copy says so."""
  t = teacher(rope="dinov3", pos_embed=False, registers=4, qkv_bias=False, mlp="swiglu")
  s = student()
  own_pos = np.asarray(s.pos_embed[...])
  rows = teacher_init.init_from_teacher(s, t, allow_partial=False)
  np.testing.assert_array_equal(s.pos_embed[...], own_pos)
  np.testing.assert_array_equal(s.cls_token[...], t.cls_token[...])
  h = zero_mean_tokens((2, 5, 32), seed=3)
  block, layer = t.blocks[0], s.layers[0]
  want = np.asarray(block.mlp(block.norm2(h)), np.float64)
  got = np.asarray(layer.mlp(block.norm2(h) - block.norm2.bias[...]), np.float64)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  text = teacher_init.format_table(rows, depth=2)
  assert "no absolute position table (RoPE only)" in text and "RoPE (dinov3)" in text


def test_copied_tensors_sit_where_the_mapping_says():
  t, s = teacher(), student()
  teacher_init.init_from_teacher(s, t, allow_partial=False)
  np.testing.assert_array_equal(s.patch_embed.kernel[...], t.patch_embed.kernel[...])
  np.testing.assert_array_equal(s.patch_embed.bias[...], t.patch_embed.bias[...])
  np.testing.assert_array_equal(s.cls_token[...], t.cls_token[...])
  # [cls, p_1 … p_N] -> [p_1 … p_N, cls]: CLS's position moves to the tail.
  np.testing.assert_array_equal(s.pos_embed[...][:, :-1], t.pos_embed[...][:, 1:])
  np.testing.assert_array_equal(s.pos_embed[...][:, -1], t.pos_embed[...][:, 0])
  for sb, tb in zip(s.layers, t.blocks):
    np.testing.assert_array_equal(sb.norm.scale[...], tb.norm1.scale[...])
    np.testing.assert_array_equal(sb.norm_mlp.scale[...], tb.norm2.scale[...])
    np.testing.assert_array_equal(sb.mixer.out_proj.kernel[...], tb.attn.proj.kernel[...])
    conv = np.zeros(sb.mixer.conv_weight[...].shape)
    conv[-1] = 1  # the identity: out_t = x_t + bias
    np.testing.assert_array_equal(sb.mixer.conv_weight[...], conv)
    np.testing.assert_array_equal(sb.mlp.w3.kernel[...], tb.fc2.kernel[...])
    np.testing.assert_array_equal(sb.mlp.w3.bias[...], tb.fc2.bias[...])
  np.testing.assert_array_equal(s.norm_f.scale[...], t.norm.scale[...])


@pytest.mark.parametrize("headdim", [16, 8])  # one SSM head per attention head, or two
def test_x_B_C_are_the_teachers_V_K_Q_of_each_head(headdim):
  """The student's scan inputs on a token are SiLU of the teacher's V, K, Q on it: x of SSM
  head h from attention head h // r (r SSM heads per attention head), B and C of group j
  from head j (the LayerNorm and qkv biases carried by the conv bias)."""
  t, s = teacher(), student(headdim=headdim)
  teacher_init.init_from_teacher(s, t, allow_partial=False)
  h = zero_mean_tokens((2, 9, 32), seed=3)
  for sb, tb in zip(s.layers, t.blocks):
    q, k, v = teacher_qkv(tb, h)
    got = mixer_inputs(sb.mixer, sb.norm(h))
    b, length, heads, hd = v.shape
    assert got["x"].shape == (b, length, heads * hd // headdim, headdim)
    assert rel_err(got["x"].reshape(v.shape), silu(v)) <= RTOL
    assert got["B"].shape == k.shape and rel_err(got["B"], silu(k)) <= RTOL
    assert got["C"].shape == q.shape and rel_err(got["C"], silu(q)) <= RTOL


def mamba2_from_attention64(q, k, v, u, mixer, o):
  """method.md §6 over the teacher's q, k, v (x = SiLU(v), B = SiLU(k), C = SiLU(q), SSM head
  h reading attention head h // r), float64, token by token; z, dt, A, D and the gated
  norm's weight the mixer's own; the gated norm per group as mamba-ssm's RMSNormGated
  (group_size = inner / ngroups); out = (...) @ o, the teacher's attention projection."""
  b, length, n_att, hd = v.shape
  w = np64(mixer.in_proj.kernel)
  inner, heads, p, groups = mixer.inner, mixer.num_heads, mixer.headdim, mixer.ngroups
  z, dt = u @ w[:, :inner], u @ w[:, -heads:]
  x = silu(v).reshape(b, length, heads, p)  # head h: columns h·p… of V (head h // r's)
  B, C = silu(k), silu(q)
  delta = softplus(dt + np64(mixer.dt_bias))
  A, D = -np.exp(np64(mixer.A_log)), np64(mixer.D)
  r = heads // n_att
  y = np.empty_like(x)
  for i in range(b):
    for head in range(heads):
      j, s = head // r, np.zeros((p, hd))
      for t in range(length):
        dt_t = delta[i, t, head]
        s = np.exp(dt_t * A[head]) * s + dt_t * np.outer(x[i, t, head], B[i, t, j])
        y[i, t, head] = s @ C[i, t, j] + D[head] * x[i, t, head]
  g = (y.reshape(b, length, inner) * silu(z)).reshape(b, length, groups, -1)
  g = g / np.sqrt(np.mean(g * g, axis=-1, keepdims=True) + 1e-5)
  return (g.reshape(b, length, inner) * np64(mixer.norm_weight)) @ o


@pytest.mark.parametrize("impl", ["xla", "reference"])
@pytest.mark.parametrize("headdim", [16, 8])
def test_the_mixer_scans_each_attention_heads_q_k_v(impl, headdim):
  """The whole mixer (ngroups = 2 groups; 2 or 4 SSM heads) against the float64 loop over
  the teacher's own q, k, v and attention projection: the grouping in kernels.ssd and in the
  gated norm, the identity conv and out_proj <- O, end to end (13 tokens, chunks of 8)."""
  t, s = teacher(), student(headdim=headdim, ssd_impl=impl)
  teacher_init.init_from_teacher(s, t, allow_partial=False)
  sb, tb = s.layers[1], t.blocks[1]
  h = zero_mean_tokens((2, 13, 32), seed=4)
  q, k, v = teacher_qkv(tb, h)
  u = sb.norm(h)
  ref = mamba2_from_attention64(
    q, k, v, np.asarray(u, np.float64), sb.mixer, np64(tb.attn.proj.kernel)
  )
  assert rel_err(mixer_forward(sb.mixer, u), ref) <= RTOL


# ------------------------------------------------------------------------------------------
# 2. The MLP as a SwiGLU
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("activation,tolerance", [("gelu", MLP_RTOL), ("quick_gelu", RTOL)])
def test_the_swiglu_computes_the_teachers_mlp(activation, tolerance):
  """w1 = 1.702·fc1, w2 = 0 with bias 1/1.702, w3 = fc2: fc2(QuickGELU(fc1 ·)) on the same
  normalised token, norm2's bias folded into w1's; exact for a QuickGELU (CLIP) teacher."""
  t, s = teacher(activation=activation), student()
  teacher_init.init_from_teacher(s, t, allow_partial=False)
  h = zero_mean_tokens((4, 9, 32), seed=6)
  for sb, tb in zip(s.layers, t.blocks):
    ref = tb.fc2(tb.act(tb.fc1(tb.norm2(h))))
    assert rel_err(sb.feed_forward(h), ref) <= tolerance
  if activation == "gelu":  # the tolerance is not loose enough to pass the SiLU gate
    silu_mlp = tb.fc2(jax.nn.silu(tb.fc1(tb.norm2(h))))
    assert rel_err(silu_mlp, ref) > 2 * MLP_RTOL


def test_layer_scale_folds_into_both_branches():
  """DINOv2's LayerScale gains: into out_proj's columns and into w3."""
  t, s = teacher(layer_scale=0.1), student()
  teacher_init.init_from_teacher(s, t, allow_partial=False)
  tb, sb = t.blocks[0], s.layers[0]
  np.testing.assert_allclose(
    sb.mixer.out_proj.kernel[...], tb.attn.proj.kernel[...] * tb.ls1[...], rtol=1e-6
  )
  h = zero_mean_tokens((2, 9, 32), seed=7)
  ref = tb.fc2(tb.act(tb.fc1(tb.norm2(h)))) * tb.ls2[...]
  assert rel_err(sb.feed_forward(h), ref) <= MLP_RTOL


# ------------------------------------------------------------------------------------------
# 3. Patch and grid of their own
# ------------------------------------------------------------------------------------------
def test_pi_resize_upsampling_is_exact():
  """FlexiViT's PI-resize, patch 4 -> 8: the student's token of a patch upsampled
  bilinearly is the teacher's token of the patch."""
  w = np.random.default_rng(0).normal(size=(4, 4, 3, 5))
  new = teacher_init.pi_resize(w, 8)
  x = np.random.default_rng(1).normal(size=(6, 4, 4, 3))
  up = jax.image.resize(jnp.asarray(x), (6, 8, 8, 3), "bilinear", antialias=False)
  ours = np.einsum("nhwc,hwco->no", np.asarray(up, np.float64), new)
  assert rel_err(ours, np.einsum("nhwc,hwco->no", x, w)) <= RESIZE_RTOL


def test_pi_resize_downsampling_is_the_least_squares_fit():
  """Patch 7 -> 4 (the demo's pair) has no exact kernel: PI-resize's is the least-squares
  one, so the residual of ⟨resize(x), ŵ⟩ ≈ ⟨x, w⟩ is orthogonal to every resized patch."""
  w = np.random.default_rng(0).normal(size=(7, 7, 1, 3))
  new = teacher_init.pi_resize(w, 4)
  basis = np.eye(49).reshape(49, 7, 7, 1)
  B = np.asarray(jax.image.resize(basis, (49, 4, 4, 1), "bilinear", antialias=False))
  B = B.reshape(49, 16).T  # (16, 49): resize of a flattened 7×7 patch
  residual = w.reshape(49, 3) - B.T @ new.reshape(16, 3)
  assert np.abs(B @ residual).max() <= 1e-6 * np.abs(w).max()
  assert np.abs(residual).max() > 1e-3  # not exact: the test above would not cover this


def test_another_patch_takes_the_pi_resized_kernel():
  """A patch-8 student at 32² (the teacher's 4×4 grid): the kernel PI-resized 4 -> 8, the
  positions as they are."""
  t, s = teacher(), student("Ti/8", image_size=32)
  teacher_init.init_from_teacher(s, t, allow_partial=False)
  want = teacher_init.pi_resize(t.patch_embed.kernel[...], 8)
  np.testing.assert_allclose(s.patch_embed.kernel[...], want, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(s.pos_embed[...][:, :-1], t.pos_embed[...][:, 1:])


def test_a_different_grid_resamples_the_positions_as_the_teacher_does():
  t, s = teacher(), student("Ti/2")  # 16² at patch 2: an 8×8 grid for the teacher's 4×4
  teacher_init.init_from_teacher(s, t, allow_partial=False)
  want = t.resample_pos_embed(t.cfg, t.pos_embed[...], (4, 4), (8, 8))
  np.testing.assert_allclose(s.pos_embed[...][:, :-1], want[:, 1:], rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(s.pos_embed[...][:, -1], t.pos_embed[...][:, 0])
  out = forward(s, jnp.zeros((1, 16, 16, 3)))
  assert out.tokens.shape == (1, 65, 32) and np.isfinite(np.asarray(out.tokens)).all()


# ------------------------------------------------------------------------------------------
# 4. What does not fit
# ------------------------------------------------------------------------------------------
def test_widths_that_do_not_fit_are_refused_naming_parameters_and_fix():
  s = student(width=24, headdim=12, ngroups=1)
  before = nnx.state(s, nnx.Param).to_pure_dict()
  with pytest.raises(UserError) as e:
    teacher_init.init_from_teacher(s, teacher(), allow_partial=False)
  msg = str(e.value)
  for phrase in (
    "patch_embed, cls_token, pos_embed, layers.*, norm_f",
    "student width 24 ≠ teacher width 32",
    "student ngroups 1 ≠ teacher num_heads 2",
    "layers.{i}.mlp.{w1, w2, w3}",
    "student.overrides = dict(width=32, depth=2, expand=1, headdim=16, ngroups=2, d_state=16, "
    "mlp_ratio=2.0)",
    "--config.distill.teacher_init_partial=true",
  ):
    assert phrase in msg, msg
  after = nnx.state(s, nnx.Param).to_pure_dict()
  jax.tree.map(np.testing.assert_array_equal, before, after)  # refused before any copy


def test_allow_partial_copies_what_fits_and_lists_the_rest():
  """Width and depth fit, the mixer (one group) and the MLP (ratio 2.5) do not: norms and
  embeddings copied, mixer and MLP as the student built them, each listed with why."""
  t = teacher()
  s, fresh = student(ngroups=1, mlp_ratio=2.5), student(ngroups=1, mlp_ratio=2.5)
  rows = teacher_init.init_from_teacher(s, t, allow_partial=True)
  np.testing.assert_array_equal(s.layers[0].norm.scale[...], t.blocks[0].norm1.scale[...])
  np.testing.assert_array_equal(s.cls_token[...], t.cls_token[...])
  for name in ("in_proj", "out_proj"):
    kernel = lambda m: getattr(m.layers[1].mixer, name).kernel[...]
    np.testing.assert_array_equal(kernel(s), kernel(fresh))
  np.testing.assert_array_equal(s.layers[1].mlp.w1.kernel[...], fresh.layers[1].mlp.w1.kernel[...])
  by_name = {r.student: r for r in rows}
  assert by_name["layers.{i}.mixer.out_proj.kernel"].source == teacher_init.OWN_INIT
  assert "ngroups 1 ≠ teacher num_heads 2" in by_name["layers.{i}.mixer.out_proj.kernel"].note
  assert "mlp_dim 64" in by_name["layers.{i}.mlp.w1.kernel"].note
  assert by_name["layers.{i}.norm.scale"].source == "blocks.{i}.norm1.scale"


def test_a_deeper_student_keeps_every_block_its_own():
  t, s = teacher(), student(depth=3)
  rows = teacher_init.init_from_teacher(s, t, allow_partial=True)
  fresh = student(depth=3)
  np.testing.assert_array_equal(s.layers[0].norm.scale[...], fresh.layers[0].norm.scale[...])
  np.testing.assert_array_equal(s.patch_embed.kernel[...], t.patch_embed.kernel[...])
  assert (
    "student depth 3 ≠ teacher depth 2"
    in {r.student: r for r in rows}["layers.{i}.norm.scale"].note
  )


def test_only_a_vit_teacher_and_an_adventurer_student():
  with pytest.raises(UserError, match="maps a ViT teacher.*'adventurer'"):
    teacher_init.init_from_teacher(student(), student(), allow_partial=True)
  with pytest.raises(UserError, match="builds an Adventurer student.*'vit'"):
    teacher_init.init_from_teacher(teacher(), teacher(), allow_partial=True)


def test_a_teacher_without_cls_token_leaves_the_students():
  """SigLIP-like (no CLS, 'gap' pool): the CLS token and its position stay the student's."""
  t, s = teacher(cls_token=False, pool="gap"), student()
  fresh = student()
  rows = teacher_init.init_from_teacher(s, t, allow_partial=False)
  np.testing.assert_array_equal(s.cls_token[...], fresh.cls_token[...])
  np.testing.assert_array_equal(s.pos_embed[...][:, -1], fresh.pos_embed[...][:, -1])
  np.testing.assert_array_equal(s.pos_embed[...][:, :-1], t.pos_embed[...])
  assert {r.student: r.source for r in rows}["cls_token"] == teacher_init.OWN_INIT


# ------------------------------------------------------------------------------------------
# 5. The table
# ------------------------------------------------------------------------------------------
def test_the_table_lists_every_student_parameter():
  t, s = teacher(), student()
  rows = teacher_init.init_from_teacher(s, t, allow_partial=False)
  flat = nnx.state(s, nnx.Param).flat_state()
  paths = {".".join("{i}" if isinstance(p, int) else str(p) for p in path) for path, _ in flat}
  listed = [r.student for r in rows]
  for path in paths:  # a row for it, or for slices of it
    assert any(name == path or name.startswith(path + "[") for name in listed), path
  table = teacher_init.format_table(rows, s.cfg.depth)
  assert "{i} = 0..1" in table.splitlines()[0]
  line = next(x for x in table.splitlines() if "(x)" in x and "in_proj" in x)
  assert "in_proj.kernel[:, 32:64] (x)" in line and "qkv.kernel[:, 64:96] (V)" in line


# ------------------------------------------------------------------------------------------
# 6. ngroups itself
# ------------------------------------------------------------------------------------------
def test_ngroups_must_divide_the_heads():
  with pytest.raises(UserError, match=r"ngroups=3.*4 SSM heads"):
    AdventurerConfig(width=32, depth=1, patch=4, headdim=16, ngroups=3)  # 64 / 16 = 4 heads
  with pytest.raises(UserError, match=r"ngroups=0"):
    AdventurerConfig(width=32, depth=1, patch=4, headdim=16, ngroups=0)


def test_a_multigroup_student_trains_and_its_impls_agree():
  """ngroups=2 through the whole model: xla and the sequential reference scan agree, and
  the gradient reaches every group's B/C columns."""
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 3)), jnp.float32)
  a, b = student(ssd_impl="xla"), student(ssd_impl="reference")
  assert rel_err(forward(a, x).tokens, forward(b, x).tokens) <= RTOL
  grads = nnx.grad(lambda m: jnp.sum(m(x).tokens ** 2))(a)
  in_proj = np.asarray(grads["layers"][0]["mixer"]["in_proj"]["kernel"][...])
  for g in range(2):  # B of group g: columns 2E + g·S … (E = 32, S = 16)
    assert np.abs(in_proj[:, 64 + 16 * g : 80 + 16 * g]).max() > 0


def test_exports_written_for_one_group_refuse_several(tmp_path):
  saved.save(student(num_classes=0), tmp_path / "s")
  with pytest.raises(UserError, match="ngroups=2"):
    torch_export.to_torch(str(tmp_path / "s"), str(tmp_path / "s.pth"))
  with pytest.raises(UserError, match="ngroups=2"):
    onnx_export.to_onnx(str(tmp_path / "s"), str(tmp_path / "s.onnx"))


def test_the_standalone_torch_model_refuses_several_groups():
  torch_adventurer = pytest.importorskip("linearizer.export.torch_adventurer")  # needs torch
  fields = dict(width=32, depth=1, patch=4, headdim=16)
  assert torch_adventurer.AdventurerConfig.from_dict({**fields, "ngroups": 1}).width == 32
  with pytest.raises(ValueError, match="ngroups=2"):
    torch_adventurer.AdventurerConfig.from_dict({**fields, "ngroups": 2})


def test_the_student_shares_no_buffer_with_the_teacher():
  """The distillation step donates the student's state while the frozen teacher is an
  argument of the same call: a copied weight that kept the teacher's buffer fails there
  ("a buffer that was previously donated"). Every copied value is a buffer of its own, and
  a donating step that reads both runs."""
  t, s = teacher(), student()
  teacher_init.init_from_teacher(s, t, allow_partial=False)
  t_params, s_params = nnx.state(t, nnx.Param), nnx.state(s, nnx.Param)
  pointers = lambda tree: {x.unsafe_buffer_pointer() for x in jax.tree_util.tree_leaves(tree)}
  assert not pointers(t_params) & pointers(s_params)
  step = jax.jit(lambda own, frozen: jax.tree_util.tree_map(lambda a: a + 0, own), donate_argnums=0)
  jax.block_until_ready(step(s_params, t_params))
