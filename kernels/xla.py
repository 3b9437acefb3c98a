"""Chunked ("SSD") form of the Mamba-2 scan in plain XLA ops (method.md §6 step 4).

    y_t = sum_{s<=t} (C_t . B_s) exp(A sum_{r=s+1..t} dt_r) dt_s x_s + D x_t

The sequence is cut into chunks of Q tokens. Inside a chunk the sum above is a
masked (Q x Q) matmul, which runs on the matrix units; across chunks only a
(P x S) state per head is carried, so the cost stays linear in L.

Einsum index letters: x one (batch, chunk, group) triple, l / s target / source
token in a chunk, h head within its group, p head dim, n state dim (S). Batch,
chunk and group share one leading axis: the broadcast of C.B over a group's heads
then has its gradient reduced over a plain axis, which XLA's CPU backend does
~5x faster than with unit axes (chunk or group of size 1) around it.
Decays, cumulative sums and states are float32 whatever the input dtype
(method.md §6, last line); matmul operands keep the input dtype (bf16 stays
bf16) and accumulate in float32.
"""

import functools

import jax
import jax.numpy as jnp

_f32 = jnp.float32
_mm = functools.partial(jnp.einsum, preferred_element_type=_f32)


def _causal_decay(a_cum):
  """(x l h) within-chunk cumsums of dt*A -> (x h l s) matrix
  exp(A sum_{r=s+1..l} dt_r) for s <= l, exactly 0 above the diagonal.

  Segment sums are differences of the chunk's cumulative sum (bounded, since
  a chunk is short). The mask goes in BEFORE exp: exp(-inf) = 0 with zero
  gradient, whereas masking after exp would meet exp(+large) = inf and give
  inf * 0 = NaN in values or gradients.
  """
  cum = jnp.moveaxis(a_cum, 1, -1)  # x h l
  seg = cum[..., :, None] - cum[..., None, :]  # x h l s
  q = seg.shape[-1]
  causal = jnp.tril(jnp.ones((q, q), bool))
  return jnp.exp(jnp.where(causal, seg, -jnp.inf))


def _pass_states(states, chunk_decay):
  """State entering each chunk, from each chunk's own state (b c g h p n)
  and its total decay (b c g h): a scan over chunks. Multiplying decays keeps
  it exact for any number of chunks (no long cumulative sums), and the loop is
  only L / Q steps of small elementwise ops."""

  def step(carry, inp):  # carry: state entering this chunk
    own, decay = inp
    return carry * decay[..., None, None] + own, carry

  init = jnp.zeros_like(states[:, 0])
  per_chunk = (jnp.moveaxis(states, 1, 0), jnp.moveaxis(chunk_decay, 1, 0))  # scan over axis 0
  _, starts = jax.lax.scan(step, init, per_chunk)
  return jnp.moveaxis(starts, 0, 1)


def ssd_xla(x, dt, A, B, C, D=None, *, chunk_size=256, interpret=False):
  """Chunked SSD; same contract as `kernels.ssd` (shapes validated there)."""
  del interpret  # only Pallas impls use it
  batch, L, H, P = x.shape
  G = B.shape[2]
  R = H // G  # heads per group
  Q = min(chunk_size, L)  # a sequence shorter than one chunk needs no padding
  pad = -L % Q
  nc = (L + pad) // Q

  def chunked(v):  # (batch, L, G, ...) -> (batch * nc * G, Q, ...). The pad has dt = 0:
    v = jnp.pad(v, [(0, 0), (0, pad)] + [(0, 0)] * (v.ndim - 2))  # decay 1, input 0,
    v = jnp.moveaxis(v.reshape(batch, nc, Q, *v.shape[2:]), 3, 2)  # so it changes nothing.
    return v.reshape(batch * nc * G, Q, *v.shape[4:])

  xc = chunked(x.reshape(batch, L, G, R, P))  # x l h p
  Bc, Cc = chunked(B), chunked(C)  # x l n
  dtc = chunked(dt.astype(_f32).reshape(batch, L, G, R))  # x l h
  A_x = jnp.broadcast_to(A.astype(_f32).reshape(G, R), (batch * nc, G, R)).reshape(-1, 1, R)
  a_cum = jnp.cumsum(dtc * A_x, axis=1)  # log-decays <= 0, x l h
  xdt = xc.astype(_f32) * dtc[..., None]  # dt_s x_s, x l h p
  cdt = x.dtype  # matmul operand dtype

  # 1. Within a chunk: y_l = sum_{s<=l} (C_l . B_s) exp(A sum_{r=s+1..l} dt_r) dt_s x_s.
  CB = _mm("xln,xsn->xls", Cc, Bc)
  W = CB[:, None] * _causal_decay(a_cum)  # x h l s
  y = _mm("xhls,xshp->xlhp", W.astype(cdt), xdt.astype(cdt))

  if nc > 1:  # one chunk (short sequences) has no state coming in
    # 2. Each chunk's own end state: sum_s exp(A (cum_end - cum_s)) dt_s x_s ⊗ B_s.
    to_end = jnp.exp(a_cum[:, -1:] - a_cum)  # x l h
    states = _mm("xln,xlhp->xhpn", Bc, (xdt * to_end[..., None]).astype(cdt))

    # 3. Carry states across chunks, then add C_l . state_start exp(A cum_l).
    def per_chunk(v):  # x ... -> b c g ...
      return v.reshape(batch, nc, G, *v.shape[1:])

    starts = _pass_states(per_chunk(states), per_chunk(jnp.exp(a_cum[:, -1])))
    starts = starts.reshape(states.shape)  # f32, x h p n
    y = y + _mm("xln,xhpn->xlhp", Cc, starts) * jnp.exp(a_cum)[..., None]

  y = jnp.moveaxis(y.reshape(batch, nc, G, Q, R, P), 2, 3).reshape(batch, nc * Q, H, P)[:, :L]
  if D is not None:
    y = y + D.astype(_f32)[:, None] * x.astype(_f32)
  return y.astype(x.dtype)
