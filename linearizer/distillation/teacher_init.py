"""A student that starts from its teacher's weights: `distill.student_init='teacher'`.

Attention becomes Mamba-2 as in MambaInLlama's `init_with_kqvo` (Wang et al. 2024, "The
Mamba in the Llama: Distilling and Accelerating Hybrid Models", NeurIPS; jxiw/MambaInLlama,
mamba2/hybrid_wrapper.py): in the in_proj order [z, x, B, C, dt], x ← V, B ← K, C ← Q, and
out_proj ← O. With expand=1, ngroups = the teacher's heads and d_state = its head dim, SSM
head h reads group h (kernels.ssd: head h uses group h // (heads / groups)), so each SSM
head starts as its attention head with the softmax replaced by a decaying linear kernel:
y_t = Σ_{s≤t} (C_t·B_s) decay Δ_s x_s with x, B, C = φ(v), φ(k), φ(q), φ = SiLU. Norm scales, the MLP (as a
SwiGLU), the patch embedding (FlexiViT's PI-resize for another patch size), CLS and the
position embeddings (CLS moved to the tail, method.md §5) are copied too; everything else
keeps the student's own init. `init_from_teacher` returns the table of what came from where.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from linearizer.distillation import teacher_fit
from linearizer.models import vit
from linearizer.models.adventurer import Adventurer
from linearizer.models.vit import ViT

OWN_INIT = "random (student's own init)"
NOT_COPIED = "-"  # the student column of a teacher parameter that has no counterpart
# GELU(a) = a·Φ(a) ≈ a·σ(1.702·a) (Hendrycks & Gimpel 2016, "Gaussian Error Linear Units",
# §2; CLIP's QuickGELU); with SiLU(a) = a·σ(a): SiLU(1.702·a) / 1.702 ≈ GELU(a).
GELU_SCALE = 1.702


class Row(NamedTuple):
  """One line of the table: a student parameter (or slice) and where its value comes from.
  `{i}` in a path stands for every block: block i of the student takes block i's."""

  student: str  # the student's parameter, or NOT_COPIED for a teacher one left out
  source: str  # the teacher's parameter (and how it is transformed), or OWN_INIT
  note: str = ""


# ---------------------------------------------------------------------------------------
# The copy.
# ---------------------------------------------------------------------------------------
def init_from_teacher(
  student: nnx.Module, teacher: nnx.Module, *, allow_partial: bool, mixer: bool = True
) -> list:
  """Copies `teacher`'s weights into the freshly built `student`, in place.

  Args:
    student: an Adventurer just built (its own init is what stays where nothing is copied).
    teacher: a ViT.
    allow_partial: when some shapes do not fit, copy the rest (else refuse, see check_fit).
    mixer: copy attention into the mixer; False (`student_init='teacher_mlp'`) copies the
      norms, embeddings and MLPs only and leaves the mixer at its own init: "Copy the Same,
      Distill the Difference" (2026) found attention weights carry nothing into a linear
      mixer (75.6 top-1 against 76.5 from random) and the MLPs most of the gain.
  Returns:
    The table: a `Row` per student parameter (or slice) and per teacher parameter left out.
  Raises:
    UserError: models of other kinds, or shapes that do not fit and not `allow_partial`.
  """
  found = teacher_fit.check_fit(student.cfg, teacher.cfg, allow_partial=allow_partial, mixer=mixer)
  blocked = {m.part: m.reason for m in found}
  if not mixer:
    blocked["mixer"] = "student_init='teacher_mlp': the mixer keeps its own init"
  rows = _embeddings(student, teacher, blocked)
  for copy in (_norms, _mixer, _mlp):
    rows += copy(student, teacher, blocked)
  return rows + _final(student, teacher, blocked)


def _blocked(blocked: dict, *parts: str) -> str:
  """Why (if at all) what needs `parts` to fit cannot be copied: the first that does not."""
  return next((blocked[p] for p in parts if p in blocked), "")


def _set(param: nnx.Param, value, name: str) -> None:
  # A copy: a buffer shared with the teacher would be donated with the student's state.
  value = jnp.array(value, param[...].dtype, copy=True)
  if value.shape != param[...].shape:  # the fit checks make this a bug, never a user's error
    raise ValueError(f"teacher_init: {name} is {param[...].shape}, the value {value.shape}")
  param.value = value


def _own(*names: str, note: str = "") -> list:
  return [Row(n, OWN_INIT, note) for n in names]


def pi_resize(kernel, new: int) -> np.ndarray:
  """A (p, p, in, out) patch kernel resized to (new, new, in, out) by FlexiViT's PI-resize.

  Beyer et al. 2023, "FlexiViT: One Model for All Patch Sizes" (CVPR), §3.4; big_vision's
  `resample_patchemb`: with B the bilinear resize of a p×p patch to new×new (a matrix), the
  kernel ŵ = pinv(Bᵀ) w makes ⟨B x, ŵ⟩ = ⟨x, w⟩ for every p×p patch x when new ≥ p, and is
  the least-squares fit of it when new < p (the demo's 7 -> 4): the student's token of a
  patch is the teacher's token of that patch resized to the teacher's patch size.
  """
  kernel = np.asarray(kernel, np.float64)
  old = kernel.shape[0]
  if old == new:
    return kernel
  resize = lambda x: jax.image.resize(x, (new, new), "bilinear", antialias=False)
  basis = np.eye(old * old, dtype=np.float32).reshape(old * old, old, old)
  B = np.asarray(jax.vmap(resize)(basis), np.float64).reshape(old * old, new * new).T
  w = kernel.reshape(old * old, -1)
  return (np.linalg.pinv(B.T) @ w).reshape(new, new, *kernel.shape[2:])


def _embeddings(student: Adventurer, teacher: ViT, blocked: dict) -> list:
  rows = _own("mask_token", note="no counterpart: a distillation-only token")
  if teacher.ln_pre is not None:
    rows.append(Row(NOT_COPIED, "ln_pre", "no counterpart: the student has no pre-norm"))
  if teacher.register_tokens is not None:
    rows.append(Row(NOT_COPIED, "register_tokens", "no counterpart: the student has none"))
  if teacher.cfg.rope is not None:  # frequencies, not weights: nothing to copy, said here
    rows.append(Row(NOT_COPIED, f"RoPE ({teacher.cfg.rope})", "no counterpart: the scan orders"))
  if reason := _blocked(blocked, "width"):
    names = ("patch_embed.kernel", "patch_embed.bias", "cls_token", "pos_embed")
    return _own(*names, note=reason) + rows
  patch = [_patch_kernel(student, teacher)]
  if teacher.patch_embed.bias is not None:
    _set(student.patch_embed.bias, teacher.patch_embed.bias[...], "patch_embed.bias")
    patch.append(Row("patch_embed.bias", "patch_embed.bias"))
  else:  # CLIP's patch conv has no bias: the teacher's is zero
    _set(student.patch_embed.bias, jnp.zeros_like(student.patch_embed.bias[...]), "bias")
    patch.append(Row("patch_embed.bias", "zeros", "the teacher's patch conv has no bias"))
  return patch + _cls_and_positions(student, teacher) + rows


def _patch_kernel(student: Adventurer, teacher: ViT) -> Row:
  t, s = teacher.cfg.patch, student.cfg.patch
  _set(student.patch_embed.kernel, pi_resize(teacher.patch_embed.kernel[...], s), "patch kernel")
  if t == s:
    return Row("patch_embed.kernel", "patch_embed.kernel")
  return Row("patch_embed.kernel", f"patch_embed.kernel, PI-resized {t}→{s}", "FlexiViT §3.4")


def _cls_and_positions(student: Adventurer, teacher: ViT) -> list:
  """CLS first in the ViT, last in the student: `[cls, p_1 … p_N]` → `[p_1 … p_N, cls]`,
  the patch part resampled to the student's grid as the teacher itself resamples it. A
  RoPE-only teacher (DINOv3) has no table: the student keeps its own."""
  if teacher.pos_embed is None:
    note = "the teacher has no absolute position table (RoPE only)"
    if teacher.cls_token is None:
      return _own("cls_token", "pos_embed", note="the teacher has neither CLS nor a table")
    _set(student.cls_token, teacher.cls_token[...], "cls_token")
    return [Row("cls_token", "cls_token"), *_own("pos_embed", note=note)]
  pos = teacher.resample_pos_embed(teacher.cfg, teacher.pos_embed[...], teacher.grid, student.grid)
  new = student.pos_embed[...]
  if teacher.cls_token is None:  # SigLIP: patches only; the CLS slot keeps the student's
    _set(student.pos_embed, jnp.concatenate([pos, new[:, -1:]], axis=1), "pos_embed")
    note = "the teacher has no CLS token"
    return [
      *_own("cls_token", note=note),
      Row("pos_embed[:, :-1] (patches)", _resampled(teacher, student, "pos_embed")),
      *_own("pos_embed[:, -1] (CLS)", note=note),
    ]
  _set(student.cls_token, teacher.cls_token[...], "cls_token")
  _set(student.pos_embed, jnp.concatenate([pos[:, 1:], pos[:, :1]], axis=1), "pos_embed")
  return [
    Row("cls_token", "cls_token"),
    Row("pos_embed[:, :-1] (patches)", _resampled(teacher, student, "pos_embed[:, 1:]")),
    Row("pos_embed[:, -1] (CLS)", "pos_embed[:, 0]", "CLS moved to the tail"),
  ]


def _resampled(teacher: ViT, student: Adventurer, name: str) -> str:
  if teacher.grid == student.grid:
    return name
  (h, w), (nh, nw) = teacher.grid, student.grid
  return f"{name}, resampled {h}x{w}→{nh}x{nw} ({teacher.cfg.pos_interpolation})"


def _norms(student: Adventurer, teacher: ViT, blocked: dict) -> list:
  """LayerNorm → RMSNorm: the scales are copied (the mean is no longer subtracted); each
  LayerNorm's bias goes into the bias of what follows it (`_mixer`, `_mlp`)."""
  names = ("layers.{i}.norm.scale", "layers.{i}.norm_mlp.scale")
  if reason := _blocked(blocked, "width", "depth"):
    return _own(*names, note=reason)
  for s, t in zip(student.layers, teacher.blocks):
    _set(s.norm.scale, t.norm1.scale[...], "norm.scale")
    _set(s.norm_mlp.scale, t.norm2.scale[...], "norm_mlp.scale")
  note = "LayerNorm → RMSNorm: no mean subtracted"
  return [Row(names[0], "blocks.{i}.norm1.scale", note), Row(names[1], "blocks.{i}.norm2.scale")]


def _mixer(student: Adventurer, teacher: ViT, blocked: dict) -> list:
  """x ← V, B ← K, C ← Q in in_proj, O → out_proj (MambaInLlama's `init_with_kqvo`).

  The depthwise causal conv between in_proj and the scan is set to the identity (last tap
  1, the others 0), unlike MambaInLlama, which keeps its random init: random taps of either
  sign (U[±0.5]) would mix each of x, B, C with the three tokens before it, so the copied
  V, K, Q would reach the scan scrambled. With the identity, x = SiLU(V u + b_v), B =
  SiLU(K u + b_k), C = SiLU(Q u + b_q) per token, the teacher's own projections (through
  SiLU); the conv bias carries the qkv bias (with norm1's LayerNorm bias folded in: in_proj
  has none). All of it stays trainable. z (the gate), dt, dt_bias, A_log, D and the gated
  norm keep the student's init, as in MambaInLlama.
  """
  e, g, s_, k = _in_proj_layout(student)
  d = teacher.cfg.width
  own = _own(
    f"layers.{{i}}.mixer.in_proj.kernel[:, 0:{e}] (z)",
    f"layers.{{i}}.mixer.in_proj.kernel[:, {2 * e + 2 * g * s_}:] (dt)",
    "layers.{i}.mixer.dt_bias",
    "layers.{i}.mixer.A_log",
    "layers.{i}.mixer.D",
    "layers.{i}.mixer.norm_weight",
  )
  dropped = [Row(NOT_COPIED, "blocks.{i}.attn.proj.bias", "no counterpart: out_proj has no bias")]
  if reason := _blocked(blocked, "width", "depth", "mixer"):
    names = ("in_proj.kernel[:, x, B, C]", "conv_weight", "conv_bias", "out_proj.kernel")
    dropped += [Row(NOT_COPIED, f"blocks.{{i}}.{n}", reason) for n in ("norm1.bias", "attn.qkv")]
    return _own(*(f"layers.{{i}}.mixer.{n}" for n in names), note=reason) + own + dropped
  for s, t in zip(student.layers, teacher.blocks):
    _copy_attention(s.mixer, t)
  if teacher.cfg.attn_norm:
    note = "no counterpart: out_proj reads the scan's output directly"
    dropped.append(Row(NOT_COPIED, "blocks.{i}.attn.norm", note))
  return _attention_rows(e, g * s_, k, d, teacher.cfg.layer_scale is not None) + own + dropped


def _attention_rows(e: int, gs: int, k: int, d: int, layer_scale: bool) -> list:
  """The rows of `_copy_attention`: in_proj and conv columns of x, B, C, and their sources
  in the fused qkv (columns [Q d, K d, V d], head j's at j·head_dim within each)."""
  mixer, qkv = "layers.{i}.mixer", "blocks.{i}.attn.qkv"
  parts = (("x", e, 2 * d, "V"), ("B", gs, d, "K"), ("C", gs, 0, "Q"))
  rows, at = [], e
  for name, n, src, what in parts:
    cols = f"{at}:{at + n}"
    rows.append(
      Row(
        f"{mixer}.in_proj.kernel[:, {cols}] ({name})", f"{qkv}.kernel[:, {src}:{src + d}] ({what})"
      )
    )
    at += n
  at = 0
  for name, n, src, what in parts:
    rows.append(
      Row(
        f"{mixer}.conv_bias[{at}:{at + n}] ({name})",
        f"{qkv}.bias[{src}:{src + d}] + norm1.bias @ {what}'s kernel",
        "in_proj has no bias",
      )
    )
    at += n
  ls = " · ls1" if layer_scale else ""
  return [
    *rows[:3],
    Row(
      f"{mixer}.conv_weight", f"identity (tap {k - 1} = 1, the others 0)", "x, B, C: SiLU(V, K, Q)"
    ),
    *rows[3:],
    Row(f"{mixer}.out_proj.kernel", f"blocks.{{i}}.attn.proj.kernel{ls} (O)"),
  ]


def _in_proj_layout(student: Adventurer) -> tuple:
  """(inner E, groups G, d_state S, conv width K): in_proj's columns are [z E, x E, B G·S,
  C G·S, dt heads] (mamba2.py, mamba-ssm's order); B's are group-major (group g: g·S…)."""
  m = student.layers[0].mixer
  return m.inner, m.ngroups, m.d_state, m.conv_weight[...].shape[0]


def _copy_attention(mixer, block) -> None:
  e, gs = mixer.inner, mixer.ngroups * mixer.d_state
  d = block.attn.qkv.kernel[...].shape[0]
  w = block.attn.qkv.kernel[...]
  b = block.attn.qkv.bias[...] if block.attn.qkv.bias is not None else jnp.zeros(3 * d)
  # norm1's bias β enters qkv as β @ W: in_proj has no bias, the conv bias (after an identity
  # conv) is the same place.
  b = b + block.norm1.bias[...] @ w
  q, k, v = (w[:, j * d : (j + 1) * d] for j in range(3))
  bq, bk, bv = (b[j * d : (j + 1) * d] for j in range(3))
  kernel = mixer.in_proj.kernel[...]
  kernel = kernel.at[:, e : 2 * e].set(v).at[:, 2 * e : 2 * e + gs].set(k)
  _set(mixer.in_proj.kernel, kernel.at[:, 2 * e + gs : 2 * e + 2 * gs].set(q), "in_proj")
  conv = mixer.conv_weight[...]
  _set(mixer.conv_weight, jnp.zeros_like(conv).at[-1].set(1.0), "conv_weight")
  _set(mixer.conv_bias, jnp.concatenate([bv, bk, bq]), "conv_bias")
  o = block.attn.proj.kernel[...]
  _set(mixer.out_proj.kernel, o if block.ls1 is None else o * block.ls1[...], "out_proj")


def _mlp(student: Adventurer, teacher: ViT, blocked: dict) -> list:
  """fc2(act(fc1 x)) as the SwiGLU w3(SiLU(w1 x) ⊙ w2 x): w1 ← 1.702·fc1, w2 ← kernel 0 and
  bias 1/1.702, w3 ← fc2, so the SwiGLU computes fc2(a·σ(1.702·a)) with a = fc1 x: QuickGELU,
  exactly a CLIP teacher's activation and within 0.021 of GELU (exact or tanh) everywhere.
  (w1 ← fc1, w2 bias 1 would give SiLU(a) = a·σ(a), up to 0.19 from GELU.) The zero w2 kernel
  still trains: its gradient is SiLU(w1 x) times the output's.
  """
  names = [f"layers.{{i}}.mlp.{w}.{p}" for w in ("w1", "w2", "w3") for p in ("kernel", "bias")]
  if reason := _blocked(blocked, "width", "depth", "mlp"):
    fc = [Row(NOT_COPIED, f"blocks.{{i}}.{n}", reason) for n in ("fc1", "fc2", "norm2.bias")]
    return _own(*names, note=reason) + fc
  if teacher.cfg.mlp == "swiglu":
    return _copy_swiglu(student, teacher, names)
  for s, t in zip(student.layers, teacher.blocks):
    w1, b1 = t.fc1.kernel[...], t.fc1.bias[...] + t.norm2.bias[...] @ t.fc1.kernel[...]
    w3, b3 = t.fc2.kernel[...], t.fc2.bias[...]
    if t.ls2 is not None:  # DINOv2's LayerScale on the MLP branch folds into w3
      w3, b3 = w3 * t.ls2[...], b3 * t.ls2[...]
    mlp = s.mlp
    _set(mlp.w1.kernel, GELU_SCALE * w1, "w1.kernel")
    _set(mlp.w1.bias, GELU_SCALE * b1, "w1.bias")
    _set(mlp.w2.kernel, jnp.zeros_like(mlp.w2.kernel[...]), "w2.kernel")
    _set(mlp.w2.bias, jnp.full_like(mlp.w2.bias[...], 1 / GELU_SCALE), "w2.bias")
    _set(mlp.w3.kernel, w3, "w3.kernel")
    _set(mlp.w3.bias, b3, "w3.bias")
  ls = " · ls2" if teacher.cfg.layer_scale is not None else ""
  quick = (teacher.cfg.activation or vit.STYLES[teacher.cfg.style][0]) == "quick_gelu"
  act = "QuickGELU, the teacher's" if quick else "QuickGELU ≈ the teacher's GELU"
  fc1 = "blocks.{i}.fc1"
  return [
    Row(names[0], f"{GELU_SCALE} · {fc1}.kernel", act),
    Row(names[1], f"{GELU_SCALE} · ({fc1}.bias + norm2.bias @ {fc1}.kernel)"),
    Row(names[2], "zeros", "w2 x = 1/1.702: the SwiGLU's gate is the activation"),
    Row(names[3], f"1/{GELU_SCALE}"),
    Row(names[4], f"blocks.{{i}}.fc2.kernel{ls}"),
    Row(names[5], f"blocks.{{i}}.fc2.bias{ls}"),
  ]


def _copy_swiglu(student: Adventurer, teacher: ViT, names: list) -> list:
  """A SwiGLU teacher (EVA-02, DINOv3+) is the student's MLP: w1 ← gate, w2 ← fc1 (the
  value), w3 ← fc2, norm2's bias folded into both; EVA-02's sub-LN has no counterpart."""
  for s, t in zip(student.layers, teacher.blocks):
    beta = t.norm2.bias[...]
    w3, b3 = t.fc2.kernel[...], t.fc2.bias[...]
    if t.ls2 is not None:
      w3, b3 = w3 * t.ls2[...], b3 * t.ls2[...]
    for ours, theirs in ((s.mlp.w1, t.gate), (s.mlp.w2, t.fc1)):
      _set(ours.kernel, theirs.kernel[...], "kernel")
      _set(ours.bias, theirs.bias[...] + beta @ theirs.kernel[...], "bias")
    _set(s.mlp.w3.kernel, w3, "w3.kernel")
    _set(s.mlp.w3.bias, b3, "w3.bias")
  ls = " · ls2" if teacher.cfg.layer_scale is not None else ""
  rows = [
    Row(names[0], "blocks.{i}.gate.kernel", "the teacher's SwiGLU: SiLU on the gate"),
    Row(names[1], "blocks.{i}.gate.bias + norm2.bias @ gate.kernel"),
    Row(names[2], "blocks.{i}.fc1.kernel"),
    Row(names[3], "blocks.{i}.fc1.bias + norm2.bias @ fc1.kernel"),
    Row(names[4], f"blocks.{{i}}.fc2.kernel{ls}"),
    Row(names[5], f"blocks.{{i}}.fc2.bias{ls}"),
  ]
  if teacher.cfg.mlp_norm:
    rows.append(
      Row(NOT_COPIED, "blocks.{i}.mlp_norm", "no counterpart: the student's has no sub-LN")
    )
  return rows


def _final(student: Adventurer, teacher: ViT, blocked: dict) -> list:
  rows = [Row(NOT_COPIED, "norm.bias", "no counterpart: RMSNorm has no bias")]
  if teacher.norm is None:  # EVA-02's pooled models, PE spatial: no final norm
    rows = _own("norm_f.scale", note="the teacher has no final norm")
  elif reason := _blocked(blocked, "width"):
    rows = _own("norm_f.scale", note=reason) + rows
  else:
    _set(student.norm_f.scale, teacher.norm.scale[...], "norm_f.scale")
    rows = [Row("norm_f.scale", "norm.scale", "LayerNorm → RMSNorm")] + rows
  if student.head is not None:
    rows += _own("head.kernel", "head.bias")
  for name in ("map_head", "head"):
    if getattr(teacher, name) is not None:
      rows.append(Row(NOT_COPIED, f"{name}.*", "a classifier's: the student's is its own"))
  return rows


# ---------------------------------------------------------------------------------------
# The table, for the log.
# ---------------------------------------------------------------------------------------
def format_table(rows: list, depth: int) -> str:
  """The rows as aligned text: student parameter, where it comes from, why.

  Args:
    rows: what `init_from_teacher` returned.
    depth: the student's depth, for the legend of `{i}`.
  Returns:
    The table, one line per row under a header (no trailing newline).
  """
  head = Row("student parameter", "from the teacher", "note")
  widths = [max(len(r[c]) for r in [head, *rows]) for c in range(2)]
  lines = [f"{{i}} = 0..{depth - 1}: student block i takes teacher block i."]
  for r in [head, *rows]:
    lines.append(f"{r.student:<{widths[0]}}  {r.source:<{widths[1]}}  {r.note}".rstrip())
  return "\n".join(lines)
