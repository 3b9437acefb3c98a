"""Chunked ("SSD") form of the Mamba-2 scan in plain XLA ops (method.md §6 step 4).

    y_t = sum_{s<=t} (C_t . B_s) exp(A sum_{r=s+1..t} dt_r) dt_s x_s + D x_t

The sequence is cut into chunks of Q tokens. Inside a chunk the sum above is a
masked (Q x Q) matmul, which runs on the matrix units; across chunks only a
(P x S) state per head is carried, so the cost stays linear in L.

The backward is written by hand (a custom_vjp, as mamba-ssm's chunked kernels do): it
keeps only the inputs and the (P x S) state entering each chunk, and recomputes the
per-chunk decays and the (Q x Q) mixing matrix instead of storing them, so nothing of
size L x Q per head outlives the forward. Being a custom_vjp (like the Pallas kernels), it
has reverse-mode derivatives (grad, vjp, and grad of grad) but no forward mode (jvp).

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
from typing import NamedTuple

import jax
import jax.numpy as jnp

from kernels.reference import segment_chunks

_f32 = jnp.float32
_mm = functools.partial(jnp.einsum, preferred_element_type=_f32)


class _Chunking(NamedTuple):
  """How (batch, L, ...) arrays are cut into (batch * nc * G, Q, ...) chunks."""

  batch: int
  L: int
  G: int
  R: int  # heads per group
  P: int
  Q: int  # tokens per chunk
  nc: int  # chunks

  @classmethod
  def of(cls, x_shape, groups, chunk_size):
    batch, L, H, P = x_shape
    Q = min(chunk_size, L)  # a sequence shorter than one chunk needs no padding
    return cls(batch, L, groups, H // groups, P, Q, -(-L // Q))

  def split(self, v):
    """(batch, L, G, ...) -> (batch * nc * G, Q, ...). The pad has dt = 0: decay 1,
    input 0, so it changes nothing (and gets no gradient that reaches a real token)."""
    v = jnp.pad(v, [(0, 0), (0, self.nc * self.Q - self.L)] + [(0, 0)] * (v.ndim - 2))
    v = jnp.moveaxis(v.reshape(self.batch, self.nc, self.Q, *v.shape[2:]), 3, 2)
    return v.reshape(self.batch * self.nc * self.G, self.Q, *v.shape[4:])

  def join(self, v):
    """The inverse of `split`: (batch * nc * G, Q, ...) -> (batch, L, G, ...)."""
    v = jnp.moveaxis(v.reshape(self.batch, self.nc, self.G, self.Q, *v.shape[2:]), 2, 3)
    return v.reshape(self.batch, self.nc * self.Q, self.G, *v.shape[4:])[:, : self.L]

  def per_chunk(self, v):
    """x ... -> b c g ... (for the scan over chunks)."""
    return v.reshape(self.batch, self.nc, self.G, *v.shape[1:])


class _Chunks(NamedTuple):
  """The chunked inputs both passes start from (recomputed by the backward)."""

  x: jax.Array  # x l h p, input dtype
  B: jax.Array  # x l n
  C: jax.Array  # x l n
  dt: jax.Array  # x l h, f32
  A: jax.Array  # x 1 h, f32
  a_cum: jax.Array  # x l h: within-chunk cumsums of dt * A (log-decays <= 0)
  xdt: jax.Array  # x l h p: dt_s x_s, f32
  seg: "_Segments | None"  # packed sequences: which tokens share a segment; None: one


class _Segments(NamedTuple):
  """Where a packed sequence's state must not pass (`segment_ids`; segments are runs of
  one id, so two tokens share a segment iff no boundary lies between them)."""

  same: jax.Array  # x l s: token l and token s of a chunk share a segment
  to_end: jax.Array  # x l 1: token l shares the chunk's last token's segment
  from_start: jax.Array  # x l 1: token l shares the previous chunk's last token's segment
  carry: jax.Array  # b c g: chunk c's last token shares the previous chunk's last token's


def _segments(ch, segment_ids):
  """`_Segments` of (batch, L) ids; the padding takes the last token's id."""
  ids, prev = segment_chunks(segment_ids, ch.Q)  # b c Q, b c
  ids = jnp.broadcast_to(ids[:, :, None], (ch.batch, ch.nc, ch.G, ch.Q))
  end = ids[..., -1]  # b c g
  prev_end = jnp.broadcast_to(prev[:, :, None], end.shape)
  flat = lambda v: v.reshape(ch.batch * ch.nc * ch.G, *v.shape[3:])
  return _Segments(
    same=flat(ids[..., :, None] == ids[..., None, :]),
    to_end=flat(ids == end[..., None])[..., None],
    from_start=flat(ids == prev_end[..., None])[..., None],
    carry=end == prev_end,
  )


def _chunks(ch, x, dt, A, B, C, segment_ids=None):
  """The inputs cut into chunks (`_Chunking.split`), with the cumsums and dt x both
  passes use, and the segments' masks (`_segments`) of a packed sequence."""
  G, R = ch.G, ch.R
  xc = ch.split(x.reshape(ch.batch, ch.L, G, R, ch.P))
  dtc = ch.split(dt.astype(_f32).reshape(ch.batch, ch.L, G, R))
  A_x = jnp.broadcast_to(A.astype(_f32).reshape(G, R), (ch.batch * ch.nc, G, R)).reshape(-1, 1, R)
  a_cum = jnp.cumsum(dtc * A_x, axis=1)
  seg = None if segment_ids is None else _segments(ch, segment_ids)
  xdt = xc.astype(_f32) * dtc[..., None]
  return _Chunks(xc, ch.split(B), ch.split(C), dtc, A_x, a_cum, xdt, seg)


def _causal_decay(a_cum, same=None):
  """(x l h) within-chunk cumsums of dt*A -> (x h l s) matrix
  exp(A sum_{r=s+1..l} dt_r) for s <= l, exactly 0 above the diagonal (and, given `same`
  (x l s), between tokens of different segments).

  Segment sums are differences of the chunk's cumulative sum (bounded, since
  a chunk is short). The mask goes in BEFORE exp: exp(-inf) = 0, whereas masking
  after exp would meet exp(+large) = inf and give inf * 0 = NaN.
  """
  cum = jnp.moveaxis(a_cum, 1, -1)  # x h l
  seg = cum[..., :, None] - cum[..., None, :]  # x h l s
  q = seg.shape[-1]
  keep = jnp.tril(jnp.ones((q, q), bool))
  if same is not None:
    keep = keep & same[:, None]
  return jnp.exp(jnp.where(keep, seg, -jnp.inf))


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


def _to_end(c):
  """(x l h) exp(A sum_{r=l+1..end} dt_r): how token l's input decays to its chunk's end
  state (0 where the segment changes before the end)."""
  to_end = jnp.exp(c.a_cum[:, -1:] - c.a_cum)
  return to_end if c.seg is None else to_end * c.seg.to_end


def _from_start(c):
  """(x l h) exp(A sum_{r<=l} dt_r): how the state entering the chunk decays to token l
  (0 where token l's segment is not the one that state belongs to)."""
  decay = jnp.exp(c.a_cum)
  return decay if c.seg is None else decay * c.seg.from_start


def _chunk_decay(ch, c):
  """(b c g h) how the carried state decays across each whole chunk (0 across a boundary)."""
  decay = ch.per_chunk(jnp.exp(c.a_cum[:, -1]))
  return decay if c.seg is None else decay * c.seg.carry[..., None]


def _mixing(c):
  """A chunk's decays (x h l s) and its mixing matrix W = (C_l . B_s) * decay (x h l s)."""
  decays = _causal_decay(c.a_cum, None if c.seg is None else c.seg.same)
  return decays, _mm("xln,xsn->xls", c.C, c.B)[:, None] * decays


def _pass_states_bwd(starts, chunk_decay, d_starts):
  """The transpose of `_pass_states` (carry_{c+1} = carry_c decay_c + own_c, starts_c =
  carry_c): a reverse scan of g_c, the gradient of carry_{c+1}. Returns the gradients of
  each chunk's own state (g_c) and of its decay (starts_c . g_c)."""

  def step(g, inp):
    start, decay, d_start = inp
    return d_start + decay[..., None, None] * g, (g, jnp.sum(start * g, (-2, -1)))

  inputs = tuple(jnp.moveaxis(v, 1, 0) for v in (starts, chunk_decay, d_starts))
  _, (d_own, d_decay) = jax.lax.scan(step, jnp.zeros_like(starts[:, 0]), inputs, reverse=True)
  return jnp.moveaxis(d_own, 0, 1), jnp.moveaxis(d_decay, 0, 1)


def ssd_xla(x, dt, A, B, C, D=None, *, chunk_size=256, interpret=False, segment_ids=None):
  """Chunked SSD; same contract as `kernels.ssd` (shapes validated there)."""
  del interpret  # only Pallas impls use it
  return _ssd(x, dt, A, B, C, D, segment_ids, chunk_size)


def ssd_xla_autodiff(x, dt, A, B, C, D=None, *, chunk_size=256, segment_ids=None):
  """The same forward differentiated by JAX's autodiff (a check on the hand-written one)."""
  return _forward(x, dt, A, B, C, D, segment_ids, chunk_size)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _ssd(x, dt, A, B, C, D, segment_ids, chunk_size):
  return _forward(x, dt, A, B, C, D, segment_ids, chunk_size)[0]


def _forward(x, dt, A, B, C, D, segment_ids, chunk_size):
  """y and what the backward keeps: the inputs and the state entering each chunk."""
  ch = _Chunking.of(x.shape, B.shape[2], chunk_size)
  c = _chunks(ch, x, dt, A, B, C, segment_ids)
  cdt = x.dtype  # matmul operand dtype

  # 1. Within a chunk: y_l = sum_{s<=l} (C_l . B_s) exp(A sum_{r=s+1..l} dt_r) dt_s x_s.
  _, W = _mixing(c)
  y = _mm("xhls,xshp->xlhp", W.astype(cdt), c.xdt.astype(cdt))

  starts = None
  if ch.nc > 1:  # one chunk (short sequences) has no state coming in
    # 2. Each chunk's own end state: sum_s exp(A (cum_end - cum_s)) dt_s x_s ⊗ B_s.
    to_end = _to_end(c)  # x l h
    states = _mm("xln,xlhp->xhpn", c.B, (c.xdt * to_end[..., None]).astype(cdt))
    # 3. Carry states across chunks, then add C_l . state_start exp(A cum_l).
    starts = _pass_states(ch.per_chunk(states), _chunk_decay(ch, c)).reshape(states.shape)
    y = y + _mm("xln,xhpn->xlhp", c.C, starts) * _from_start(c)[..., None]  # starts: f32

  y = ch.join(y).reshape(x.shape)
  if D is not None:
    y = y + D.astype(_f32)[:, None] * x.astype(_f32)
  return y.astype(x.dtype), (x, dt, A, B, C, D, segment_ids, starts)


def _backward(chunk_size, saved, dy):
  """The forward's steps transposed: 1 (within a chunk, independent of the others), then 3
  and 2, the reverse of their order. Gradients of the chunk cumsums of dt * A collect in
  d_cum; one reverse cumsum turns them into gradients of dt and A."""
  x, dt, A, B, C, D, segment_ids, starts = saved
  ch = _Chunking.of(x.shape, B.shape[2], chunk_size)
  c = _chunks(ch, x, dt, A, B, C, segment_ids)
  cdt = x.dtype
  dy = dy.astype(_f32)
  dyc = ch.split(dy.reshape(ch.batch, ch.L, ch.G, ch.R, ch.P))  # x l h p

  # 1. y = W xdt with W = (C.B) * decay: the decay's log-gradient is d_W * W, which is 0
  # above the diagonal (W is), so no exp of a masked entry is ever needed.
  decays, W = _mixing(c)
  d_W = _mm("xlhp,xshp->xhls", dyc.astype(cdt), c.xdt.astype(cdt))
  d_xdt = _mm("xhls,xlhp->xshp", W.astype(cdt), dyc.astype(cdt))
  d_seg = d_W * W  # gradient of seg[l, s] = cum_l - cum_s
  d_cum = jnp.moveaxis(d_seg.sum(-1) - d_seg.sum(-2), 1, -1)  # x l h
  d_CB = _mm("xhls,xhls->xls", d_W, decays).astype(cdt)
  d_C = _mm("xls,xsn->xln", d_CB, c.B)
  d_B = _mm("xls,xln->xsn", d_CB, c.C)

  if ch.nc > 1:
    # 3. y += exp(cum_l) C_l . starts, starts from the scan over chunks.
    dye = dyc * _from_start(c)[..., None]
    d_C = d_C + _mm("xlhp,xhpn->xln", dye, starts)
    d_starts = _mm("xln,xlhp->xhpn", c.C, dye)
    d_cum = d_cum + jnp.sum(dye * _mm("xln,xhpn->xlhp", c.C, starts), -1)
    decay = _chunk_decay(ch, c)  # b c g h
    d_states, d_decay = _pass_states_bwd(ch.per_chunk(starts), decay, ch.per_chunk(d_starts))
    d_states = d_states.reshape(starts.shape).astype(cdt)
    decay = decay.reshape(c.a_cum[:, -1].shape)
    # 2. states = B^T (xdt * exp(cum_end - cum_s)).
    to_end = _to_end(c)  # x l h
    d_B = d_B + _mm("xhpn,xlhp->xln", d_states, (c.xdt * to_end[..., None]).astype(cdt))
    d_u = _mm("xln,xhpn->xlhp", c.B, d_states)
    d_xdt = d_xdt + d_u * to_end[..., None]
    d_to_end = jnp.sum(d_u * c.xdt, -1) * to_end  # gradient of cum_end - cum_s
    d_cum = d_cum - d_to_end
    d_cum = d_cum.at[:, -1].add(jnp.sum(d_to_end, 1) + (d_decay.reshape(decay.shape) * decay))

  # xdt = x dt and a_cum = cumsum(dt A).
  d_a = jax.lax.cumsum(d_cum, axis=1, reverse=True)
  d_dt = jnp.sum(d_xdt * c.x.astype(_f32), -1) + d_a * c.A
  d_A = jnp.sum(d_a * c.dt, 1).reshape(ch.batch * ch.nc, ch.G * ch.R).sum(0)
  d_x = ch.join(d_xdt * c.dt[..., None]).reshape(x.shape)
  d_D = None
  if D is not None:
    d_x = d_x + D.astype(_f32)[:, None] * dy
    d_D = jnp.sum(dy * x.astype(_f32), (0, 1, 3)).astype(D.dtype)
  return (
    d_x.astype(x.dtype),
    ch.join(d_dt).reshape(dt.shape).astype(dt.dtype),
    d_A.astype(A.dtype),
    ch.join(d_B).astype(B.dtype),
    ch.join(d_C).astype(C.dtype),
    d_D,
    None,  # segment_ids: integers, no gradient
  )


_ssd.defvjp(_forward, _backward)
