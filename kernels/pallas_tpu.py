"""Pallas TPU (Mosaic) kernel for the chunked Mamba-2 SSD (method.md §6 step 4).

    y_t = sum_{s<=t} (C_t . B_s) exp(A sum_{r=s+1..t} dt_r) dt_s x_s + D x_t

Same contract as `kernels.ssd` / `ssd_xla`; `unsupported_reason` says (in one
line) when the kernel cannot take a shape, so the dispatcher can fall back.

Forward and backward stay together in this one file, past the 400-line rule (which a
Pallas kernel file may be): the backward is the forward's derivation run in reverse. It
recomputes each chunk with the forward's own in-kernel helpers (`_chunk`, the iota masks,
the exact row <-> column moves, `_dot`), reads the states the forward saves through the
same block specs (`_specs`), and both are bound by one `jax.custom_vjp`. Split, those
helpers would become an interface between two halves that must change in lockstep, and
the derivation below (forward formulas, then their gradients) would span two files.

Layout. x, y and dx keep the model's own layout where a block of heads fills whole
128-lane rows (hb * P a multiple of 128, or all H heads of one group): "token-major",
  x, y, dx   (batch, L, H * P)        a reshape of (batch, L, H, P): no copy, no pad
read unpadded, so the last chunk's rows past L are masked to zero in the kernel (the
block there reads past the array; its writes past L are dropped). Elsewhere (small
headdims, as in the tests) "head-major", transposed and padded by XLA in the wrapper:
  x, y, dx   (batch, H, Lp, P)        Lp = L padded to nc chunks of Q tokens
The head-major copies cost four passes over x-sized arrays, each twice its bytes when P =
64 half-fills a 128-lane tile: 793 MiB of temporaries for a forward at 4,098 tokens (batch
8, 24 heads) against 9 MiB token-major (docs/results/aot.md). Always, from XLA:
  dt, ddt    (batch, H, nc, 1, Q) f32  one row of Q step sizes per (head, chunk)
  B, C       (batch, G, Lp, S)
  A, D       (H,) f32 in SMEM (scalars per head)
The pad has dt = 0 and x = B = C = 0: decay 1, input 0, so it changes nothing.
Every block's last two dims are full array dims, or (Q, .) with Q a multiple of
8 (16 for bf16), so the TPU block-shape rule holds for any P, S and L.

Grid (batch, H / hb, nc), dimension semantics (parallel, parallel, arbitrary):
one step handles hb heads of one group (they share B, C and so C.B^T) for one
chunk; the (P x S) state of each head lives in VMEM scratch across the
sequential chunk axis and is reset at chunk 0.

Per head and chunk (names as method.md §6; l, s target / source token):
  a = dt A,  cum_l = sum_{r<=l} a_r,  e_l = exp(cum_l),
  f_s = exp(cum_{Q-1} - cum_s),  E = exp(cum_{Q-1}),  xd_s = dt_s x_s
  L_ls = exp(cum_l - cum_s) for s <= l, else 0  (mask BEFORE exp: no inf * 0)
  CB = C B^T,  W = CB * L                                    (Q x Q, MXU)
  y = W xd + e * (C h_in^T) + D x
  h_out = E h_in + (f * xd)^T B                              (P x S, f32)
Cumulative sums and the row <-> column moves of per-token vectors use iota
masks and exact f32 lane / sublane reductions on the VPU (Mosaic lowers no
cumsum, and this keeps them exact without HIGHEST-precision matmuls).

Backward (its own Pallas kernel, chunks walked in reverse on the sequential
axis). The forward saves only h_in of every chunk, f32 (batch, nc, H, P, S).
With dy = dL/dy and dh = dL/dh_out carried in VMEM scratch (0 after the last
chunk), the chunk recomputes cum, L, CB, W, xd and then
  Z    = B dh^T                      G  = dy xd^T,  GL = G * L,  M = GL * CB
  dxd  = W^T dy + f * Z              dx = dt * dxd + D dy
  dC   = GL B + e * (dy h_in)        dB = GL^T C + f * (xd dh)   (per head;
                                        summed over the heads of a group)
  dh_in = E dh + (e * dy)^T C        (carried to the previous chunk)
  dcum_l = sum_s M_ls - sum_s M_sl + (dy_l . y_off_l) - phi_l
           + [l = Q-1] (E <dh, h_in> + sum_s phi_s),
           with y_off = e * (C h_in^T), phi_s = f_s (xd_s . Z_s)
  da_r = sum_{l>=r} dcum_l           (cum is a cumsum of a)
  ddt  = x . dxd + A da,   dA = sum dt da,   dD = sum x . dy
dA and dD leave the kernel per token and are summed over batch and length in
the wrapper, as are dB, dC over the head blocks of a group.

Packed sequences (`segment_ids`, as segment runs): one more input, `seg` (batch, nc, 2, Q)
f32, each chunk's run ids and the previous chunk's last id; `_chunk` zeroes every decay
that crosses a boundary (L off the segment's block, e where a token's segment is not the
entering state's, f where it is not the chunk end's, E when the chunk holds a boundary).
The backward above reads only those decays, so it needs no other change.

Precision: float32 or bfloat16 inputs; decays, cumsums, states and every
accumulation are float32. Matmul operands keep the input dtype (bf16 stays
bf16) except those meeting the f32 state, as in `ssd_xla`; f32 x f32 matmuls
ask for Precision.HIGHEST (Mosaic's fp32 contract precision).
"""

import functools
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels import limits
from kernels.reference import segment_chunks

__all__ = ["ssd_pallas_tpu", "unsupported_reason"]

_f32 = jnp.float32
MAX_CHUNK = 256  # a dozen (Q x Q) f32 temporaries must fit the scoped VMEM
MAX_DIM = 256  # headdim P and d_state S
_HEADS_PER_STEP = 4  # at most this many heads of one group per grid step
_SQUEEZED = getattr(pl, "squeezed", None)  # `None` in older jax


def _sublanes(dtype):
  """Rows of a native TPU tile: 8 for 32-bit, 16 for 16-bit dtypes."""
  return 8 * (4 // jnp.dtype(dtype).itemsize)


def unsupported_reason(x_shape, B_shape, chunk_size, dtype):
  """None if the kernel takes these shapes, else a one-line reason."""
  if len(x_shape) != 4 or len(B_shape) != 4:
    return f"pallas_tpu: x and B must be 4-d, got {tuple(x_shape)} and {tuple(B_shape)}"
  _, _, H, P = x_shape
  G, S = B_shape[2], B_shape[3]
  if G < 1 or H % G:
    return f"pallas_tpu: H = {H} heads must be divisible by G = {G} groups"
  try:
    dtype = jnp.dtype(dtype)
  except TypeError:
    return f"pallas_tpu: unknown dtype {dtype!r}"
  if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
    return f"pallas_tpu: dtype {dtype.name} unsupported, expected float32 or bfloat16"
  m = _sublanes(dtype)
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
    return f"pallas_tpu: chunk_size must be a positive int, got {chunk_size!r}"
  if chunk_size % m or chunk_size > MAX_CHUNK:
    return (
      f"pallas_tpu: chunk_size {chunk_size} must be a multiple of {m} "
      f"(for {dtype.name}) and at most {MAX_CHUNK}"
    )
  for name, n in (("headdim P", P), ("d_state S", S)):
    if n % 8 or n > MAX_DIM:
      return f"pallas_tpu: {name} = {n} must be a multiple of 8 and at most {MAX_DIM}"
  batch, L = x_shape[:2]
  Q = min(int(chunk_size), -(-L // m) * m)  # as ssd_pallas_tpu pads
  Lp = -(-L // Q) * Q
  return limits.int32_overflow_reason(
    "pallas_tpu",
    {
      "x": (batch, H, Lp, P),
      "B": (batch, G, Lp, S),
      "saved states": (batch, Lp // Q, H, P, S),
      "per-head dB": (batch, H, Lp, S),
    },
  )


# ---------------------------------------------------------------- in-kernel helpers


class _Masks(NamedTuple):
  causal: jax.Array  # (Q, Q) bool, row >= col
  eye: jax.Array  # (Q, Q) bool
  last: jax.Array  # (Q, 1) bool, the chunk's last token


def _masks(Q):
  row = lax.broadcasted_iota(jnp.int32, (Q, Q), 0)
  col = lax.broadcasted_iota(jnp.int32, (Q, Q), 1)
  last = lax.broadcasted_iota(jnp.int32, (Q, 1), 0) == Q - 1
  return _Masks(row >= col, row == col, last)


def _col(row, m):
  """(1, Q) -> (Q, 1), exactly (a diagonal mask and a lane reduction)."""
  return jnp.sum(jnp.where(m.eye, row, 0.0), axis=1, keepdims=True)


def _row(col, m):
  """(Q, 1) -> (1, Q), exactly (a diagonal mask and a sublane reduction)."""
  return jnp.sum(jnp.where(m.eye, col, 0.0), axis=0, keepdims=True)


def _total(v):
  """Sum of a 2-d array as a (1, 1) array."""
  return jnp.sum(jnp.sum(v, axis=1, keepdims=True), axis=0, keepdims=True)


def _dot(a, b, tb=False):
  """a @ b (or a @ b^T), f32 accumulation; HIGHEST for f32 x f32."""
  dims = (((1,), (1 if tb else 0,)), ((), ()))
  exact = a.dtype == _f32 and b.dtype == _f32
  return lax.dot_general(
    a, b, dims, preferred_element_type=_f32, precision=lax.Precision.HIGHEST if exact else None
  )


def _dot_tn(a, b):
  """a^T @ b for an f32 `a` cast to b's dtype: an explicit f32 2-d transpose
  (the well-trodden Mosaic path), then a plain matmul."""
  return _dot(a.T.astype(b.dtype), b)


class _Chunk(NamedTuple):
  """Within-chunk quantities of one head (see the module docstring)."""

  dt_col: jax.Array  # (Q, 1)
  cum_col: jax.Array  # (Q, 1)
  e_col: jax.Array  # (Q, 1)  exp(cum_l)
  f_col: jax.Array  # (Q, 1)  exp(cum_end - cum_s)
  E: jax.Array  # (1, 1)  exp(cum_end)
  L: jax.Array  # (Q, Q)  causal decays
  xd: jax.Array  # (Q, P) f32, dt_s x_s


def _chunk(dt_row, A, x, m, seg=None):
  """The chunk's quantities; `seg` (2, Q) f32, a packed sequence's segment runs (row 0:
  each token's run id, row 1: the previous chunk's last token's id): the decays that cross
  a boundary are zeroed (L off the segment's block, e for tokens after a reset, f for
  tokens before one, E when the chunk holds one), which is all the backward needs too."""
  a_row = dt_row * A  # (1, Q) log-decays <= 0
  cum_col = jnp.sum(jnp.where(m.causal, a_row, 0.0), axis=1, keepdims=True)
  cum_row = _row(cum_col, m)  # bitwise the same numbers: the diagonal is exactly 0
  cum_end = jnp.sum(jnp.where(m.last, cum_col, 0.0), axis=0, keepdims=True)  # (1, 1)
  causal, e_col, f_col, E = m.causal, jnp.exp(cum_col), jnp.exp(cum_end - cum_col), None
  if seg is not None:
    ids_row, prev = seg[0:1], jnp.max(seg[1:2], axis=1, keepdims=True)  # (1, Q), (1, 1)
    ids_col = _col(ids_row, m)
    last = jnp.sum(jnp.where(m.last, ids_col, 0.0), axis=0, keepdims=True)  # (1, 1)
    causal = causal & (ids_col == ids_row)
    e_col = jnp.where(ids_col == prev, e_col, 0.0)
    f_col = jnp.where(ids_col == last, f_col, 0.0)
    E = jnp.where(last == prev, jnp.exp(cum_end), 0.0)
  L = jnp.exp(jnp.where(causal, cum_col - cum_row, -jnp.inf))
  dt_col = _col(dt_row, m)
  return _Chunk(
    dt_col,
    cum_col,
    e_col,
    f_col,
    jnp.exp(cum_end) if E is None else E,
    L,
    x.astype(_f32) * dt_col,
  )


# ---------------------------------------------------------------- kernels


def _head(ref, i, cfg):
  """Head i of the block's hb heads, (Q, P): a lane slice of a token-major block."""
  if cfg.token_major:
    return ref[:, i * cfg.P : (i + 1) * cfg.P]
  return ref[i]


def _set_head(ref, i, cfg, value):
  if cfg.token_major:
    ref[:, i * cfg.P : (i + 1) * cfg.P] = value
  else:
    ref[i] = value


def _in_sequence(cfg, chunk):
  """(Q, 1) bool: the chunk's tokens that are in the sequence. A token-major block reads
  the arrays unpadded, so the last chunk's rows past L hold whatever lies there; they are
  zeroed before use (as the padded layout's zeros: dt = 0 there already)."""
  row = chunk * cfg.Q + lax.broadcasted_iota(jnp.int32, (cfg.Q, 1), 0)
  return row < cfg.L


def _fwd_kernel(A_ref, D_ref, x_ref, dt_ref, B_ref, C_ref, *rest, cfg, save):
  seg = rest[0][...] if cfg.segments else None
  rest = rest[1:] if cfg.segments else rest
  if save:
    y_ref, h0_ref, state_ref = rest
  else:
    y_ref, state_ref = rest
  hb = cfg.hb
  j, c = pl.program_id(1), pl.program_id(2)
  valid = _in_sequence(cfg, c)

  @pl.when(c == 0)
  def _():
    state_ref[...] = jnp.zeros(state_ref.shape, _f32)

  Bm, Cm = B_ref[...], C_ref[...]  # (Q, S), input dtype
  cd = Bm.dtype
  m = _masks(Bm.shape[0])
  CB = _dot(Cm, Bm, tb=True)  # (Q, Q) f32, shared by the hb heads of this group
  Cf = Cm.astype(_f32)
  for i in range(hb):
    h = j * hb + i
    x = jnp.where(valid, _head(x_ref, i, cfg), 0)  # (Q, P)
    k = _chunk(dt_ref[i], A_ref[h], x, m, seg)
    h_in = state_ref[i]  # (P, S) f32
    if save:
      h0_ref[i] = h_in
    W = (CB * k.L).astype(cd)
    y = _dot(W, k.xd.astype(cd)) + k.e_col * _dot(Cf, h_in, tb=True) + D_ref[h] * x.astype(_f32)
    _set_head(y_ref, i, cfg, y.astype(y_ref.dtype))
    state_ref[i] = k.E * h_in + _dot_tn(k.xd * k.f_col, Bm)


def _bwd_kernel(A_ref, D_ref, x_ref, dt_ref, B_ref, C_ref, dy_ref, h0_ref, *rest, cfg):
  seg = rest[0][...] if cfg.segments else None
  rest = rest[1:] if cfg.segments else rest
  dx_ref, ddt_ref, dB_ref, dC_ref, dA_ref, dD_ref, dh_ref = rest
  hb = cfg.hb
  j, c = pl.program_id(1), pl.program_id(2)  # c counts chunks from the end
  valid = _in_sequence(cfg, pl.num_programs(2) - 1 - c)

  @pl.when(c == 0)
  def _():
    dh_ref[...] = jnp.zeros(dh_ref.shape, _f32)

  Bm, Cm = B_ref[...], C_ref[...]
  cd = Bm.dtype
  m = _masks(Bm.shape[0])
  CB = _dot(Cm, Bm, tb=True)
  Bf, Cf = Bm.astype(_f32), Cm.astype(_f32)
  dB = jnp.zeros(Bm.shape, _f32)
  dC = jnp.zeros(Cm.shape, _f32)
  for i in range(hb):
    h = j * hb + i
    A, D = A_ref[h], D_ref[h]
    x = jnp.where(valid, _head(x_ref, i, cfg), 0)
    xf = x.astype(_f32)
    dt_row = dt_ref[i]
    k = _chunk(dt_row, A, xf, m, seg)
    h_in, dh = h0_ref[i], dh_ref[i]  # (P, S) f32
    dy = jnp.where(valid, _head(dy_ref, i, cfg), 0)  # (Q, P) input dtype
    dyf = dy.astype(_f32)
    xdc = k.xd.astype(cd)

    Z = _dot(Bf, dh, tb=True)  # (Q, P)
    dxd = _dot_tn(CB * k.L, dy) + k.f_col * Z  # W^T dy + f * Z
    GL = _dot(dy, xdc, tb=True) * k.L  # (Q, Q)
    M = GL * CB
    dC = dC + _dot(GL.astype(cd), Bm) + k.e_col * _dot(dyf, h_in)
    dB = dB + _dot_tn(GL, Cm) + k.f_col * _dot(k.xd, dh)
    dh_ref[i] = k.E * dh + _dot_tn(k.e_col * dyf, Cf)

    y_off = k.e_col * _dot(Cf, h_in, tb=True)
    phi = k.f_col * jnp.sum(k.xd * Z, axis=1, keepdims=True)  # (Q, 1)
    end = k.E * _total(dh * h_in) + _total(phi)  # (1, 1)
    dcum = (
      jnp.sum(M, axis=1, keepdims=True)
      - _col(jnp.sum(M, axis=0, keepdims=True), m)
      + jnp.sum(dyf * y_off, axis=1, keepdims=True)
      - phi
      + jnp.where(m.last, end, 0.0)
    )  # (Q, 1)
    da = jnp.sum(jnp.where(m.causal, dcum, 0.0), axis=0, keepdims=True)  # (1, Q)

    _set_head(dx_ref, i, cfg, (k.dt_col * dxd + D * dyf).astype(dx_ref.dtype))
    ddt_ref[i] = _row(jnp.sum(xf * dxd, axis=1, keepdims=True), m) + A * da
    dA_ref[i] = dt_row * da
    dD_ref[i] = _row(jnp.sum(xf * dyf, axis=1, keepdims=True), m)
  dB_ref[...] = dB
  dC_ref[...] = dC


# ---------------------------------------------------------------- pallas_call wrappers


class _Cfg(NamedTuple):
  Q: int  # chunk length
  hb: int  # heads per grid step
  interpret: object  # False, True or a pltpu.InterpretParams
  L: int  # tokens in the sequence (the rest of the last chunk is padding)
  P: int  # headdim
  token_major: bool  # x, y, dx, dy as (batch, L, H * P), else (batch, H, Lp, P)
  segments: bool = False  # a packed sequence: `seg` (batch, nc, 2, Q) follows the inputs


def _compiler_params():
  cls = getattr(pltpu, "CompilerParams", None) or getattr(pltpu, "TPUCompilerParams")
  return cls(dimension_semantics=("parallel", "parallel", "arbitrary"))


def _interpret(flag):
  if flag is True:
    return pltpu.InterpretParams()  # models VMEM scratch and the sequential grid
  return flag


def _specs(cfg, H, G, P, S, nc, reverse):
  """Block specs of (x-like, dt-like, B/C, per-group-block, state) arrays."""
  hb, Q = cfg.hb, cfg.Q
  blocks_per_group = H // G // hb
  ch = (lambda c: nc - 1 - c) if reverse else (lambda c: c)
  sq = _SQUEEZED
  if cfg.token_major:
    x = pl.BlockSpec((sq, Q, hb * P), lambda b, j, c: (b, ch(c), j))
  else:
    x = pl.BlockSpec((sq, hb, Q, P), lambda b, j, c: (b, j, ch(c), 0))
  dt = pl.BlockSpec((sq, hb, sq, 1, Q), lambda b, j, c: (b, j, ch(c), 0, 0))
  # Head block j reads group j // blocks_per_group (lax.div: j >= 0, and Mosaic
  # lowers no floor division in index maps).
  bc = pl.BlockSpec((sq, sq, Q, S), lambda b, j, c: (b, lax.div(j, blocks_per_group), ch(c), 0))
  per_block = pl.BlockSpec((sq, sq, Q, S), lambda b, j, c: (b, j, ch(c), 0))
  state = pl.BlockSpec((sq, sq, hb, P, S), lambda b, j, c: (b, ch(c), j, 0, 0))
  smem = pl.BlockSpec(memory_space=pltpu.SMEM)
  seg = pl.BlockSpec((sq, sq, 2, Q), lambda b, j, c: (b, ch(c), 0, 0))
  return smem, x, dt, bc, per_block, state, seg


def _forward(cfg, xt, dtt, A, Bt, Ct, D, seg, save):
  batch, H, nc = dtt.shape[:3]
  P, (G, S) = cfg.P, (Bt.shape[1], Bt.shape[3])
  smem, x, dt, bc, _, state, seg_spec = _specs(cfg, H, G, P, S, nc, reverse=False)
  segments = ([seg_spec], [seg]) if cfg.segments else ([], [])
  out_shape = [jax.ShapeDtypeStruct(xt.shape, xt.dtype)]
  out_specs = [x]
  if save:
    out_shape.append(jax.ShapeDtypeStruct((batch, nc, H, P, S), _f32))
    out_specs.append(state)
  out = pl.pallas_call(
    functools.partial(_fwd_kernel, cfg=cfg, save=save),
    out_shape=out_shape,
    grid=(batch, H // cfg.hb, nc),
    in_specs=[smem, smem, x, dt, bc, bc, *segments[0]],
    out_specs=out_specs,
    scratch_shapes=[pltpu.VMEM((cfg.hb, P, S), _f32)],
    compiler_params=_compiler_params(),
    interpret=_interpret(cfg.interpret),
    name="ssd_tpu_fwd",
  )(A, D, xt, dtt, Bt, Ct, *segments[1])
  return out if save else (out[0], None)


def _backward(cfg, xt, dtt, A, Bt, Ct, D, seg, h0, dy):
  batch, H, nc = dtt.shape[:3]
  P, (G, S), Lp = cfg.P, (Bt.shape[1], Bt.shape[3]), Bt.shape[2]
  smem, x, dt, bc, per_block, state, seg_spec = _specs(cfg, H, G, P, S, nc, reverse=True)
  segments = ([seg_spec], [seg]) if cfg.segments else ([], [])
  nb = H // cfg.hb
  dx, ddt, dB, dC, dA, dD = pl.pallas_call(
    functools.partial(_bwd_kernel, cfg=cfg),
    out_shape=[
      jax.ShapeDtypeStruct(xt.shape, xt.dtype),
      jax.ShapeDtypeStruct(dtt.shape, _f32),
      jax.ShapeDtypeStruct((batch, nb, Lp, S), _f32),
      jax.ShapeDtypeStruct((batch, nb, Lp, S), _f32),
      jax.ShapeDtypeStruct(dtt.shape, _f32),
      jax.ShapeDtypeStruct(dtt.shape, _f32),
    ],
    grid=(batch, nb, nc),
    in_specs=[smem, smem, x, dt, bc, bc, x, state, *segments[0]],
    out_specs=[x, dt, per_block, per_block, dt, dt],
    scratch_shapes=[pltpu.VMEM((cfg.hb, P, S), _f32)],
    compiler_params=_compiler_params(),
    interpret=_interpret(cfg.interpret),
    name="ssd_tpu_bwd",
  )(A, D, xt, dtt, Bt, Ct, dy, h0, *segments[1])

  # Sum the head blocks of each group, and dA, dD over batch and tokens.
  def group_sum(g):
    return g.reshape(batch, G, nb // G, Lp, S).sum(2).astype(Bt.dtype)

  return (dx, ddt, dA.sum((0, 2, 3, 4)), group_sum(dB), group_sum(dC), dD.sum((0, 2, 3, 4)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ssd_core(cfg, xt, dtt, A, Bt, Ct, D, seg):
  return _forward(cfg, xt, dtt, A, Bt, Ct, D, seg, save=False)[0]


def _ssd_core_fwd(cfg, xt, dtt, A, Bt, Ct, D, seg):
  y, h0 = _forward(cfg, xt, dtt, A, Bt, Ct, D, seg, save=True)
  return y, (xt, dtt, A, Bt, Ct, D, seg, h0)


def _ssd_core_bwd(cfg, res, dy):
  xt, dtt, A, Bt, Ct, D, seg, h0 = res
  dx, ddt, dA, dB, dC, dD = _backward(cfg, xt, dtt, A, Bt, Ct, D, seg, h0, dy)
  return dx, ddt, dA, dB, dC, dD, None if seg is None else jnp.zeros_like(seg)


_ssd_core.defvjp(_ssd_core_fwd, _ssd_core_bwd)


def _head_blocks(H, G, P):
  """(heads per grid step, token-major?): the most heads of one group, at most
  _HEADS_PER_STEP, that divide the group; token-major where some such count fills whole
  128-lane rows (hb * P a multiple of 128) or the block is all H heads (one group): the
  TPU block rule for a (Q, hb * P) block of a (., L, H * P) array."""
  per_group = H // G
  counts = [d for d in range(1, min(per_group, _HEADS_PER_STEP) + 1) if per_group % d == 0]
  lane_rows = [d for d in counts if (d * P) % 128 == 0 or (G == 1 and d == H)]
  if lane_rows:
    return max(lane_rows), True
  return max(counts), False


def ssd_pallas_tpu(x, dt, A, B, C, D=None, *, chunk_size=256, interpret=False, segment_ids=None):
  """Chunked SSD as a Pallas TPU kernel; same contract as `kernels.ssd`.

  interpret: False (compile with Mosaic for TPU), True (TPU interpret mode,
  runs anywhere, e.g. CPU tests) or a `pltpu.InterpretParams`.
  segment_ids: (batch, L) segment runs (`kernels.segment_runs`), or None.
  Raises ValueError (at trace time) with `unsupported_reason` for shapes the
  kernel does not take.
  """
  reason = unsupported_reason(x.shape, B.shape, chunk_size, x.dtype)
  if reason:
    raise ValueError(reason)
  batch, L, H, P = x.shape
  G, S = B.shape[2:]
  m = _sublanes(x.dtype)
  Q = min(int(chunk_size), -(-L // m) * m)  # a short sequence is one (padded) chunk
  pad = -L % Q
  nc = (L + pad) // Q
  hb, token_major = _head_blocks(H, G, P)
  cfg = _Cfg(Q, hb, interpret, L, P, token_major, segment_ids is not None)

  def padded(v):  # pad the token axis (1) with zeros: dt = 0 changes nothing
    return jnp.pad(v, [(0, 0), (0, pad)] + [(0, 0)] * (v.ndim - 2))

  if token_major:  # the model's own layout: no copy of x or y (a reshape is free)
    xt = x.reshape(batch, L, H * P)
  else:
    xt = padded(x).transpose(0, 2, 1, 3)  # (batch, H, Lp, P)
  dtt = padded(dt.astype(_f32)).transpose(0, 2, 1).reshape(batch, H, nc, 1, Q)
  Bt = padded(B.astype(x.dtype)).transpose(0, 2, 1, 3)  # (batch, G, Lp, S)
  Ct = padded(C.astype(x.dtype)).transpose(0, 2, 1, 3)
  Dv = jnp.zeros((H,), _f32) if D is None else D.astype(_f32)
  seg = None if segment_ids is None else chunk_segments(segment_ids, Q)
  yt = _ssd_core(cfg, xt, dtt, A.astype(_f32), Bt, Ct, Dv, seg)
  if token_major:
    return yt.reshape(batch, L, H, P)
  return yt.transpose(0, 2, 1, 3)[:, :L]


def chunk_segments(runs, Q):
  """(batch, nc, 2, Q) f32 of (batch, L) segment runs: each chunk's ids and, broadcast, the
  previous chunk's last id (`segment_chunks`). Exact below 2^24 tokens."""
  ids, prev = segment_chunks(runs, Q)
  return jnp.stack([ids, jnp.broadcast_to(prev[..., None], ids.shape)], axis=2).astype(_f32)
