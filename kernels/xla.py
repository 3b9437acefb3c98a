"""Chunked ("SSD") form of the Mamba-2 scan in plain XLA ops (method.md §6 step 4).

    y_t = sum_{s<=t} (C_t . B_s) exp(A sum_{r=s+1..t} dt_r) dt_s x_s + D x_t

The sequence is cut into chunks of Q tokens. Inside a chunk the sum above is a
masked (Q x Q) matmul, which runs on the matrix units; across chunks only a
(P x S) state per head is carried, so the cost stays linear in L.

Einsum index letters: b batch, c chunk, l / s target / source token in a chunk,
g group of B and C, h head within its group, p head dim, n state dim (S).
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
    """(b c l g h) within-chunk cumsums of dt*A -> (b c g h l s) matrix
    exp(A sum_{r=s+1..l} dt_r) for s <= l, exactly 0 above the diagonal.

    Segment sums are differences of the chunk's cumulative sum (bounded, since
    a chunk is short). The mask goes in BEFORE exp: exp(-inf) = 0 with zero
    gradient, whereas masking after exp would meet exp(+large) = inf and give
    inf * 0 = NaN in values or gradients.
    """
    cum = jnp.moveaxis(a_cum, 2, -1)  # b c g h l
    seg = cum[..., :, None] - cum[..., None, :]  # b c g h l s
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
    Q = min(chunk_size, L)  # a sequence shorter than one chunk needs no padding
    pad = -L % Q
    nc = (L + pad) // Q

    def chunked(v):  # (batch, L, ...) -> (batch, nc, Q, ...). The pad has dt = 0:
        v = jnp.pad(v, [(0, 0), (0, pad)] + [(0, 0)] * (v.ndim - 2))  # decay 1, input 0,
        return v.reshape(batch, nc, Q, *v.shape[2:])  # so it changes nothing.

    xc = chunked(x).reshape(batch, nc, Q, G, H // G, P)  # b c l g h p
    Bc, Cc = chunked(B), chunked(C)  # b c l g n
    dtc = chunked(dt.astype(_f32)).reshape(batch, nc, Q, G, H // G)  # b c l g h
    a_cum = jnp.cumsum(dtc * A.astype(_f32).reshape(G, H // G), axis=2)  # log-decays <= 0
    xdt = xc.astype(_f32) * dtc[..., None]  # dt_s x_s, b c l g h p
    cdt = x.dtype  # matmul operand dtype

    # 1. Within a chunk: y_l = sum_{s<=l} (C_l . B_s) exp(A sum_{r=s+1..l} dt_r) dt_s x_s.
    CB = _mm("bclgn,bcsgn->bcgls", Cc, Bc)
    W = CB[:, :, :, None] * _causal_decay(a_cum)  # b c g h l s
    y = _mm("bcghls,bcsghp->bclghp", W.astype(cdt), xdt.astype(cdt))

    # 2. Each chunk's own end state: sum_s exp(A (cum_end - cum_s)) dt_s x_s ⊗ B_s.
    to_end = jnp.exp(a_cum[:, :, -1:] - a_cum)  # b c l g h
    states = _mm("bclgn,bclghp->bcghpn", Bc, (xdt * to_end[..., None]).astype(cdt))

    # 3. Carry states across chunks, then add C_l . state_start exp(A cum_l).
    starts = _pass_states(states, jnp.exp(a_cum[:, :, -1]))  # f32, b c g h p n
    y = y + _mm("bclgn,bcghpn->bclghp", Cc, starts) * jnp.exp(a_cum)[..., None]

    y = y.reshape(batch, nc * Q, H, P)[:, :L]
    if D is not None:
        y = y + D.astype(_f32)[:, None] * x.astype(_f32)
    return y.astype(x.dtype)
