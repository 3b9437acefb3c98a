"""Pallas GPU kernel of the Mamba-2 SSD scan (method.md §6 step 4), forward and backward.

    y_t = sum_{s<=t} (C_t . B_s) exp(A sum_{r=s+1..t} dt_r) dt_s x_s + D x_t

Backend: Pallas' Triton lowering (`jax.experimental.pallas.triton`,
`pl.pallas_call(..., compiler_params=plgpu.CompilerParams(num_warps, num_stages))`).
The Pallas changelog for JAX 0.11.0 marks the Triton backend *deprecated* ("will be
removed in a future version of JAX ... migrate to the Mosaic GPU backend"), and
lowering a Triton pallas_call on 0.11.x emits a DeprecationWarning ("jax-pallas-triton"),
but the lowering is present and working in 0.11.x (and in jax main of August 2026),
so it is the pragmatic choice for the jax 0.10.2 / 0.11.2 we target: one kernel
source runs on Ampere and Hopper, and in interpret mode on a CPU for the tests.
Mosaic GPU would be the backend to port to (its `pl.pallas_call` entry is itself
deprecated in favour of `plgpu.kernel`, and it needs Hopper-specific code: TMA,
wgmma, warpgroups) once the Triton lowering goes away.

Design (per (batch, head) program; Q = tokens per chunk, P = headdim, S = d_state)
  grid (batch, H); every program walks the chunks of its sequence in order
  (lax.fori_loop), carrying its (P x S) float32 state in registers. Per chunk it
  loads x (Q x P), dt (Q), B and C (Q x S) of its group (head h reads group
  h // (H // G)) and computes, with a_t = A dt_t, cum_t = sum_{r<=t} a_r (masked
  sum, in float32), tot = sum_r a_r:
    decay_ts = exp(cum_t - cum_s) for s <= t, else 0 (mask BEFORE exp, as in
               kernels/xla.py `_causal_decay`: no inf * 0 in values or grads)
    W        = (C B^T) * decay                              (Q x Q, tensor cores)
    y        = W (dt x) + exp(cum) * (C s0^T) + D x         s0 = state entering
    s_end    = exp(tot) s0 + ((dt x) * exp(tot - cum))^T B  (P x S)
  Matmul operands are in the input dtype (bf16 stays bf16; float32 uses IEEE fp32,
  not TF32, to keep float32 results exact to ~1e-6) with float32 accumulation;
  decays, cumulative sums and states are float32.
  L is padded to a multiple of Q with x = B = C = 0, dt = 0 (decay 1, no input):
  the pad comes after every real token and changes nothing.

Backward (jax.custom_vjp; the backward is a second Pallas kernel)
  The forward saves only s0 of every chunk (float32, (batch, H, nc*P, S)) besides its
  inputs. The backward walks the chunks in reverse with the same grid, carrying
  dS = dL/d(state leaving the chunk) (zero after the last chunk), recomputes the
  chunk's quantities from s0 and its inputs, and with dY = dL/dy, xdt = dt x,
  g = exp(tot - cum), e = exp(cum):
    dW   = dY xdt^T            dCB = dW * decay          dseg = dW * W
    dxdt = W^T dY + (B dS^T) * g
    dC   = dCB B + (dY s0) * e
    dB   = dCB^T C + (xdt * g) dS
    ds0  = exp(tot) dS + (dY * e)^T C                    (the next carry)
    dcum = rowsum(dseg) - colsum(dseg)                   (seg_ts = cum_t - cum_s)
           + rowsum(C * (dY s0) * e)                     (through e)
           - rowsum(xdt * (B dS^T) * g)                  (through g, via -cum)
    dtot = exp(tot) <dS, s0> + sum_s rowsum(xdt * (B dS^T) * g)_s
    da_r = sum_{t>=r} dcum_t + dtot                      (cum_t = sum_{r<=t} a_r)
    dx   = dt dxdt + D dY      ddt = rowsum(x * dxdt) + A da
    dA   = sum dt da           dD = sum rowsum(dY * x)
  dB and dC are written per head and summed over the heads of each group in the
  XLA wrapper; dA and dD are written per token and summed over batch and length.

Packed sequences (`segment_ids`, as segment runs): two more (batch, Lp) f32 inputs, the
run ids and each chunk's previous chunk's last id; `_chunk_decays` zeroes the decay, e, g
and exp(tot) wherever they cross a boundary, and the backward above reads only those.

Shapes the Triton lowering accepts: every tile a power of two and every dot
operand dimension >= 16, so P and S must be powers of two in [16, 128]; the chunk
is the largest power of two <= min(chunk_size, 64) (any chunk size gives the same
result; 64 keeps the Q x Q float32 tiles in registers, so the model's default 256
runs as 64-token chunks) and never more than L rounded up to a power of two >= 16.
`unsupported_reason` says why a shape is refused; `kernels.ssd(impl="auto")`
then falls back to the XLA impl.

Limitations (none measured on a GPU yet): parallelism is batch x H programs (small
for batch-1 inference; a P-block grid axis would add more); L % Q != 0 costs an
XLA pad copy of x, dt, B, C (and dy); the saved states are nc * P * S float32 per
(batch, head), about 2x a bf16 x at Q = 64; dB and dC go through per-head float32
buffers before the group sum; float32 inputs use IEEE (CUDA-core) dots.
Tuning knobs (untuned; to measure on an H100): FWD_PARAMS / BWD_PARAMS
(num_warps, num_stages) and MAX_CHUNK below.
"""

import functools
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels import limits
from kernels.reference import segment_chunks

__all__ = ["ssd_pallas_gpu", "unsupported_reason"]

_f32 = jnp.float32
MAX_CHUNK = 64  # tokens per chunk at most (Q x Q float32 tiles live in registers)
MIN_DIM, MAX_DIM = 16, 128  # Triton dots need >= 16; above 128 the state tile spills
FWD_PARAMS = dict(num_warps=4, num_stages=2)
BWD_PARAMS = dict(num_warps=8, num_stages=2)
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def _pow2(n):
  return n >= 1 and n & (n - 1) == 0


def unsupported_reason(x_shape, B_shape, chunk_size, dtype):
  """None if the kernel supports these shapes, else a one-line reason."""
  if len(x_shape) != 4 or len(B_shape) != 4:
    return f"x and B must be 4-d, got x {tuple(x_shape)} and B {tuple(B_shape)}"
  P, S = x_shape[3], B_shape[3]
  try:
    dtype = jnp.dtype(dtype)
  except TypeError:
    return f"dtype {dtype!r} is not a numeric dtype"
  if dtype not in _DTYPES:
    return f"dtype {dtype.name} is not supported (float32 or bfloat16)"
  for name, n in (("headdim P", P), ("d_state S", S)):
    if not (_pow2(n) and MIN_DIM <= n <= MAX_DIM):
      return (
        f"{name} = {n} must be a power of two in [{MIN_DIM}, {MAX_DIM}] "
        "(Triton tiles are powers of two, dot dims >= 16)"
      )
  if not (isinstance(chunk_size, numbers.Integral) and chunk_size >= MIN_DIM):
    return f"chunk_size = {chunk_size!r} must be an int >= {MIN_DIM} (Triton dot dims)"
  batch, L, H, _ = x_shape
  Q = chunk_len(chunk_size, L)
  Lp = -(-L // Q) * Q
  return limits.int32_overflow_reason(
    "pallas_gpu",
    {
      "x": (batch, Lp, H, P),
      "B": (batch, Lp, B_shape[2], S),
      "saved states": (batch, H, Lp // Q * P, S),
      "per-head dB": (batch, Lp, H, S),
    },
  )


def chunk_len(chunk_size, L):
  """Largest power of two <= min(chunk_size, MAX_CHUNK), and no longer than needed."""
  q = 1 << (min(int(chunk_size), MAX_CHUNK).bit_length() - 1)
  need = max(MIN_DIM, 1 << max(L - 1, 0).bit_length())  # next power of two >= L
  return min(q, need)


# ------------------------------------------------------------------ in-kernel helpers


def _mm(a, b, ca, cb, cdt):
  """a . b contracting a's axis ca with b's axis cb; operands in cdt, float32 acc."""
  prec = lax.Precision.HIGHEST if cdt == _f32 else None  # f32: IEEE, not TF32
  return lax.dot_general(
    a.astype(cdt),
    b.astype(cdt),
    (((ca,), (cb,)), ((), ())),
    precision=prec,
    preferred_element_type=_f32,
  )


def _rowsum(v):
  return jnp.sum(v, axis=1)


class _Decays(NamedTuple):
  cum: jax.Array  # (Q,) sum_{r<=t} a_r
  decay: jax.Array  # (Q, Q) exp(cum_t - cum_s) for s <= t
  e: jax.Array  # (Q, 1) exp(cum): the entering state's weight on token t
  g: jax.Array  # (Q, 1) exp(tot - cum): token s's weight on the leaving state
  E: jax.Array  # () exp(tot): the entering state's weight on the leaving one


def _chunk_decays(a, causal, seg=None):
  """a (Q,) = A dt (<= 0) -> `_Decays`, all float32. cum is a masked sum (no scan
  primitive needed); the mask goes in before exp.

  seg: None, or (ids, prev) (Q,) each, a packed sequence's segment runs and the previous
  chunk's last id: every weight that crosses a boundary is zeroed (decay off the segment's
  block, e after a reset, g before one, E when the chunk holds one). Runs never decrease,
  so the chunk's last id is its largest. The backward reads the same zeros."""
  cum = _rowsum(jnp.where(causal, a[None, :], 0.0))  # cum_t = sum_{r<=t} a_r
  tot = jnp.sum(a)
  e, g, E = jnp.exp(cum), jnp.exp(tot - cum), jnp.exp(tot)
  if seg is not None:
    ids, prev = seg
    last, before = jnp.max(ids), jnp.max(prev)
    causal = causal & (ids[:, None] == ids[None, :])
    e, g = jnp.where(ids == before, e, 0.0), jnp.where(ids == last, g, 0.0)
    E = jnp.where(last == before, E, 0.0)
  decay = jnp.exp(jnp.where(causal, cum[:, None] - cum[None, :], -jnp.inf))
  return _Decays(cum, decay, e[:, None], g[:, None], E)


def _causal_mask(q, transposed=False):
  """[t, s] = s <= t (or, transposed, [r, t] = t >= r), from iotas."""
  row = lax.broadcasted_iota(jnp.int32, (q, q), 0)
  col = lax.broadcasted_iota(jnp.int32, (q, q), 1)
  return row <= col if transposed else row >= col


# ------------------------------------------------------------------ forward kernel


def _segments(rest, segments):
  """(the segment refs (ids, prev) or None, the refs after them)."""
  return (rest[:2], rest[2:]) if segments else (None, rest)


def _fwd_kernel(x_ref, dt_ref, A_ref, B_ref, C_ref, D_ref, *rest, Q, nc, cdt, segments):
  seg_refs, (y_ref, *maybe_states) = _segments(rest, segments)
  P, S = x_ref.shape[-1], B_ref.shape[-1]
  A, D = A_ref[...], D_ref[...]
  causal = _causal_mask(Q)

  def chunk(c, s0):  # s0: state entering chunk c, (P, S) float32
    rows = pl.ds(c * Q, Q)
    x, dt = x_ref[rows, :], dt_ref[rows]
    Bm, Cm = B_ref[rows, :], C_ref[rows, :]
    k = _chunk_decays(dt * A, causal, seg_refs and tuple(r[rows] for r in seg_refs))
    xdt = x.astype(_f32) * dt[:, None]
    W = _mm(Cm, Bm, 1, 1, cdt) * k.decay  # (C B^T) * decay, (Q, Q)
    y = _mm(W, xdt, 1, 0, cdt)
    y += _mm(Cm, s0, 1, 1, cdt) * k.e  # C s0^T
    y += D * x.astype(_f32)
    y_ref[rows, :] = y.astype(y_ref.dtype)
    if maybe_states:
      maybe_states[0][pl.ds(c * P, P), :] = s0
    return k.E * s0 + _mm(xdt * k.g, Bm, 0, 0, cdt)

  lax.fori_loop(0, nc, chunk, jnp.zeros((P, S), _f32))


# ------------------------------------------------------------------ backward kernel


def _bwd_kernel(
  x_ref, dt_ref, A_ref, B_ref, C_ref, D_ref, st_ref, dy_ref, *rest, Q, nc, cdt, segments
):
  seg_refs, (dx_ref, ddt_ref, dA_ref, dD_ref, dB_ref, dC_ref) = _segments(rest, segments)
  P, S = x_ref.shape[-1], B_ref.shape[-1]
  A, D = A_ref[...], D_ref[...]
  causal = _causal_mask(Q)
  later = _causal_mask(Q, transposed=True)  # [r, t] = t >= r

  def chunk(i, dS):  # dS: dL/d(state leaving chunk c), (P, S) float32
    c = nc - 1 - i
    rows = pl.ds(c * Q, Q)
    x, dt = x_ref[rows, :].astype(_f32), dt_ref[rows]
    Bm, Cm = B_ref[rows, :], C_ref[rows, :]
    dy = dy_ref[rows, :].astype(_f32)
    s0 = st_ref[pl.ds(c * P, P), :]
    k = _chunk_decays(dt * A, causal, seg_refs and tuple(r[rows] for r in seg_refs))
    decay, e, g = k.decay, k.e, k.g
    xdt = x * dt[:, None]

    # Within the chunk: y = W xdt, W = (C B^T) * decay.
    W = _mm(Cm, Bm, 1, 1, cdt) * decay
    dW = _mm(dy, xdt, 1, 1, cdt)  # dY xdt^T (zero-weighted above the diagonal)
    dxdt = _mm(W, dy, 0, 0, cdt)  # W^T dY
    dCB = dW * decay
    dC = _mm(dCB, Bm, 1, 0, cdt)
    dB = _mm(dCB, Cm, 0, 0, cdt)
    dseg = dW * W
    dcum = _rowsum(dseg) - jnp.sum(dseg, axis=0)

    # State entering the chunk: y += e * (C s0^T).
    dys0 = _mm(dy, s0, 1, 0, cdt) * e  # (Q, S)
    dC += dys0
    dcum += _rowsum(Cm.astype(_f32) * dys0)
    ds0 = k.E * dS + _mm(dy * e, Cm, 0, 0, cdt)

    # State leaving the chunk: s_end = exp(tot) s0 + (xdt * g)^T B.
    dxdt_end = _mm(Bm, dS, 1, 1, cdt) * g  # (B dS^T) * g, (Q, P)
    dxdt += dxdt_end
    dB += _mm(xdt * g, dS, 1, 0, cdt)
    through_g = _rowsum(xdt * dxdt_end)  # dL/dg_s * g_s
    dcum -= through_g
    dtot = k.E * jnp.sum(_rowsum(dS * s0)) + jnp.sum(through_g)

    da = _rowsum(jnp.where(later, dcum[None, :], 0.0)) + dtot  # sum_{t>=r} dcum_t
    dx_ref[rows, :] = (dxdt * dt[:, None] + D * dy).astype(dx_ref.dtype)
    ddt_ref[rows] = _rowsum(x * dxdt) + A * da
    dA_ref[rows] = dt * da
    dD_ref[rows] = _rowsum(dy * x)
    dB_ref[rows, :] = dB
    dC_ref[rows, :] = dC
    return ds0

  lax.fori_loop(0, nc, chunk, jnp.zeros((P, S), _f32))


# ------------------------------------------------------------------ pallas_call wrappers


def _specs(batch, Lp, H, G, P, S):
  hpg = H // G

  def seq(d):
    return pl.BlockSpec((None, Lp, None, d), lambda b, h: (b, 0, h, 0))

  grp = pl.BlockSpec((None, Lp, None, S), lambda b, h: (b, 0, h // hpg, 0))
  vec = pl.BlockSpec((None, Lp, None), lambda b, h: (b, 0, h))
  head = pl.BlockSpec((None,), lambda b, h: (h,))
  return seq, grp, vec, head


def _padded(Q, x, dt, A, B, C, D):
  L = x.shape[1]
  pad = -L % Q

  def padL(v):
    return jnp.pad(v, [(0, 0), (0, pad)] + [(0, 0)] * (v.ndim - 2)) if pad else v

  return (padL(x), padL(dt.astype(_f32)), A.astype(_f32), padL(B), padL(C), D.astype(_f32))


def chunk_segments(runs, Q):
  """(ids, prev), each (batch, Lp) float32, of (batch, L) segment runs: the chunked ids and,
  per token, its chunk's previous chunk's last id (`segment_chunks`). Exact below 2^24
  tokens."""
  ids, prev = segment_chunks(runs, Q)
  prev = jnp.broadcast_to(prev[..., None], ids.shape)
  return tuple(v.reshape(runs.shape[0], -1).astype(_f32) for v in (ids, prev))


def _forward(Q, interpret, x, dt, A, B, C, D, seg, *, save_states):
  batch, L, H, P = x.shape
  G, S = B.shape[2:]
  xp, dtp, Af, Bp, Cp, Df = _padded(Q, x, dt, A, B, C, D)
  Lp = xp.shape[1]
  nc = Lp // Q
  seq, grp, vec, head = _specs(batch, Lp, H, G, P, S)
  token = pl.BlockSpec((None, Lp), lambda b, h: (b, 0))
  segments = ([token, token], list(seg)) if seg is not None else ([], [])
  out_shape = [jax.ShapeDtypeStruct(xp.shape, x.dtype)]
  out_specs = [seq(P)]
  if save_states:
    out_shape.append(jax.ShapeDtypeStruct((batch, H, nc * P, S), _f32))
    out_specs.append(pl.BlockSpec((None, None, nc * P, S), lambda b, h: (b, h, 0, 0)))
  out = pl.pallas_call(
    functools.partial(_fwd_kernel, Q=Q, nc=nc, cdt=x.dtype, segments=seg is not None),
    grid=(batch, H),
    in_specs=[seq(P), vec, head, grp, grp, head, *segments[0]],
    out_specs=out_specs,
    out_shape=out_shape,
    compiler_params=plgpu.CompilerParams(**FWD_PARAMS),
    interpret=interpret,
    name="ssd_gpu_fwd",
  )(xp, dtp, Af, Bp, Cp, Df, *segments[1])
  y = out[0][:, :L]
  return (y, out[1]) if save_states else y


def _backward(Q, interpret, res, dy):
  x, dt, A, B, C, D, seg, states = res
  batch, L, H, P = x.shape
  G, S = B.shape[2:]
  xp, dtp, Af, Bp, Cp, Df = _padded(Q, x, dt, A, B, C, D)
  Lp = xp.shape[1]
  nc = Lp // Q
  dyp = jnp.pad(dy, [(0, 0), (0, Lp - L), (0, 0), (0, 0)])
  seq, grp, vec, head = _specs(batch, Lp, H, G, P, S)
  token = pl.BlockSpec((None, Lp), lambda b, h: (b, 0))
  segments = ([token, token], list(seg)) if seg is not None else ([], [])
  per_head = pl.BlockSpec((None, Lp, None, S), lambda b, h: (b, 0, h, 0))
  tok = jax.ShapeDtypeStruct((batch, Lp, H), _f32)
  bc = jax.ShapeDtypeStruct((batch, Lp, H, S), _f32)
  dx, ddt, dA_tok, dD_tok, dB_h, dC_h = pl.pallas_call(
    functools.partial(_bwd_kernel, Q=Q, nc=nc, cdt=x.dtype, segments=seg is not None),
    grid=(batch, H),
    in_specs=[
      seq(P),
      vec,
      head,
      grp,
      grp,
      head,
      pl.BlockSpec((None, None, nc * P, S), lambda b, h: (b, h, 0, 0)),
      seq(P),
      *segments[0],
    ],
    out_specs=[seq(P), vec, vec, vec, per_head, per_head],
    out_shape=[jax.ShapeDtypeStruct(xp.shape, x.dtype), tok, tok, tok, bc, bc],
    compiler_params=plgpu.CompilerParams(**BWD_PARAMS),
    interpret=interpret,
    name="ssd_gpu_bwd",
  )(xp, dtp, Af, Bp, Cp, Df, states, dyp, *segments[1])

  def group_sum(v):
    return v[:, :L].reshape(batch, L, G, H // G, S).sum(3)

  return (
    dx[:, :L],
    ddt[:, :L].astype(dt.dtype),
    dA_tok.sum((0, 1)).astype(A.dtype),
    group_sum(dB_h).astype(B.dtype),
    group_sum(dC_h).astype(C.dtype),
    dD_tok.sum((0, 1)).astype(D.dtype),
    None if seg is None else tuple(jnp.zeros_like(v) for v in seg),
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _ssd(Q, interpret, x, dt, A, B, C, D, seg):
  return _forward(Q, interpret, x, dt, A, B, C, D, seg, save_states=False)


def _ssd_fwd(Q, interpret, x, dt, A, B, C, D, seg):
  y, states = _forward(Q, interpret, x, dt, A, B, C, D, seg, save_states=True)
  return y, (x, dt, A, B, C, D, seg, states)


_ssd.defvjp(_ssd_fwd, _backward)


def ssd_pallas_gpu(x, dt, A, B, C, D=None, *, chunk_size=64, interpret=False, segment_ids=None):
  """Same contract as `kernels.ssd` (shapes validated there; `segment_ids`: segment runs,
  `kernels.segment_runs`, or None); returns y in x.dtype.

  Raises ValueError (at trace time) with `unsupported_reason` for shapes or dtypes
  the kernel does not handle. interpret=True runs the kernel in the Pallas
  interpreter (any backend, e.g. the CPU tests)."""
  reason = unsupported_reason(x.shape, B.shape, chunk_size, x.dtype)
  if reason is not None:
    raise ValueError(f"ssd: impl='pallas_gpu' does not support this call: {reason}")
  Q = chunk_len(chunk_size, x.shape[1])
  if D is None:
    D = jnp.zeros(x.shape[2], _f32)  # D x = 0; its gradient goes nowhere
  seg = None if segment_ids is None else chunk_segments(segment_ids, Q)
  return _ssd(Q, bool(interpret), x, dt, A, B, C, D, seg)
