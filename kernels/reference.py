"""Reference forms of the Mamba-2 SSD (method.md §6 step 4): the oracles of the fast impls.

`ssd_reference` is the sequential scan, the oracle every fast impl is tested against (as
in mamba-ssm): one `lax.scan` step per token, state (batch, H, P, S), everything in
float32. O(L) sequential steps, so slow on accelerators; use it for checking, not for
training.

`ssd_quadratic` is the same map in its L x L ("quadratic", attention-like) form: per head
y = M x + D x with the lower-triangular mixing matrix `ssd_matrix`,

  M[t, s] = (C_t . B_s) exp(A sum_{r=s+1..t} dt_r) dt_s   for s <= t,   0 above.

It shares no code path with the scan (no state, no recurrence), so the two check each
other; M itself is what the visualisations draw. O(L^2) time and memory per head, and
float32 too (float64 for float64 inputs with jax_enable_x64, for tight checks).
"""

import jax
import jax.numpy as jnp

_EXACT = jax.lax.Precision.HIGHEST  # an oracle must not use TF32/bf16 passes on GPU/TPU


def ssd_reference(x, dt, A, B, C, D=None, *, chunk_size=256, interpret=False, segment_ids=None):
  """s_t = exp(dt_t A) s_{t-1} + dt_t x_t ⊗ B_t;  y_t = s_t C_t + D x_t (method.md §6.4).

  With `segment_ids` (batch, L) the state is zero before a token whose segment differs
  from the previous token's: each segment of a packed sequence scans alone (mamba-ssm's
  `seq_idx`)."""
  del chunk_size, interpret  # no chunks and no Pallas here
  batch, _, H, P = x.shape
  G, S = B.shape[2:]
  f32 = jnp.float32
  # Head h reads group h // (H // G): repeat each group's B, C over its heads.
  Bh = jnp.repeat(B.astype(f32), H // G, axis=2)  # (batch, L, H, S)
  Ch = jnp.repeat(C.astype(f32), H // G, axis=2)
  A = A.astype(f32)

  def step(s, inp):
    x_t, dt_t, B_t, C_t, new_t = inp  # (batch, H, P), (batch, H), (batch, H, S) x2, (batch,)
    s = jnp.where(new_t[:, None, None, None], 0.0, s)  # a new segment starts from zero
    s = jnp.exp(dt_t * A)[..., None, None] * s + jnp.einsum(
      "bhp,bhn->bhpn", dt_t[..., None] * x_t, B_t, precision=_EXACT
    )
    return s, jnp.einsum("bhpn,bhn->bhp", s, C_t, precision=_EXACT)

  s0 = jnp.zeros((batch, H, P, S), f32)
  starts = jnp.zeros(x.shape[:2], bool)
  if segment_ids is not None:
    starts = starts.at[:, 1:].set(segment_ids[:, 1:] != segment_ids[:, :-1])
  seq = tuple(jnp.moveaxis(v, 1, 0) for v in (x.astype(f32), dt.astype(f32), Bh, Ch, starts))
  _, y = jax.lax.scan(step, s0, seq)  # scan runs over L (axis 0)
  y = jnp.moveaxis(y, 0, 1)  # (batch, L, H, P)
  if D is not None:
    y = y + D.astype(f32)[:, None] * x.astype(f32)
  return y.astype(x.dtype)


def segment_runs(segment_ids):
  """(batch, L) ids -> (batch, L) int32 run indices 0, 1, 2, ...: a new run wherever the id
  changes, so an id that comes back later (0, 1, 0) is another segment, as the scan treats
  it (every impl and the attention read packed sequences this way)."""
  change = (segment_ids[:, 1:] != segment_ids[:, :-1]).astype(jnp.int32)
  return jnp.pad(jnp.cumsum(change, axis=1), ((0, 0), (1, 0)))


def segment_chunks(runs, Q: int) -> tuple:
  """(ids (batch, nc, Q), previous (batch, nc)) of (batch, L) segment runs cut into chunks of
  Q: the ids padded to whole chunks with the last one (the pad starts no segment), and the
  id of the previous chunk's last token (chunk 0: its own first, its entering state being
  zero anyway): what the chunked impls mask their decays with."""
  batch, L = runs.shape
  ids = jnp.pad(runs, ((0, 0), (0, -L % Q)), mode="edge").reshape(batch, -1, Q)
  return ids, jnp.concatenate([ids[:, :1, 0], ids[:, :-1, -1]], axis=1)


def _segsum(a):
  """(..., L) per-token log-decays -> (..., L, L) sum_{r=s+1..t} a_r for s <= t, -inf above.

  Each entry is its own masked cumulative sum from zero (as mamba-ssm's `segsum`), not a
  difference of two long cumulative sums: no cancellation, however long the sequence.
  The mask goes in before exp (exp(-inf) = 0 with zero gradient; see kernels/xla.py).
  """
  L = a.shape[-1]
  rows = jnp.broadcast_to(a[..., :, None], (*a.shape, L))  # [..., r, s] = a_r
  seg = jnp.cumsum(jnp.where(jnp.tril(jnp.ones((L, L), bool), -1), rows, 0), axis=-2)
  return jnp.where(jnp.tril(jnp.ones((L, L), bool)), seg, -jnp.inf)


def ssd_matrix(dt, A, B, C, segment_ids=None):
  """The SSD's per-head mixing matrix M: y = M x + D x, the L x L form of `ssd_reference`.

  M[t, s] = (C_t . B_s) exp(A sum_{r=s+1..t} dt_r) dt_s for s <= t, exactly 0 above the
  diagonal: token s enters the state as dt_s x_s B_s, decays by exp(dt_r A) at each
  later token r <= t, and is read out with C_t. With `segment_ids`, also 0 where t and s
  are in different segments (`segment_runs`: a packed sequence's images).

  Args:
    dt: (batch, L, H) step sizes (already softplus'ed).
    A: (H,) per-head decay rates (negative).
    B, C: (batch, L, G, S) with H % G == 0; head h uses group h // (H // G).
    segment_ids: (batch, L) integers, or None (one segment).

  Returns:
    M: (batch, H, L, L), float32 (float64 for float64 inputs with jax_enable_x64).
  """
  H = dt.shape[-1]
  G = B.shape[2]
  f = jnp.result_type(jnp.float32, dt, A, B, C)
  # C_t . B_s once per group, then repeated over the group's heads.
  cb = jnp.einsum("btgn,bsgn->bgts", C.astype(f), B.astype(f), precision=_EXACT)
  cb = jnp.repeat(cb, H // G, axis=1)  # (batch, H, L, L)
  dt_h = jnp.moveaxis(dt.astype(f), 1, -1)  # (batch, H, L)
  decay = jnp.exp(_segsum(dt_h * A.astype(f)[:, None]))  # (batch, H, L, L)
  if segment_ids is not None:
    runs = segment_runs(segment_ids)
    decay = decay * (runs[:, None, :, None] == runs[:, None, None, :])
  return cb * decay * dt_h[..., None, :]


def ssd_quadratic(x, dt, A, B, C, D=None, *, chunk_size=256, interpret=False, segment_ids=None):
  """y = M x + D x with M = `ssd_matrix(dt, A, B, C)`: the SSD as one masked matmul.

  Same contract as `kernels.ssd` and `ssd_reference` (x: (batch, L, H, P), the other
  arguments as in `ssd_matrix`, D: (H,) or None); computed in float32 (float64 for
  float64 inputs with jax_enable_x64), returned in x.dtype. chunk_size and interpret are
  accepted for a uniform signature and ignored.
  """
  del chunk_size, interpret  # no chunks and no Pallas here
  M = ssd_matrix(dt, A, B, C, segment_ids)
  f = jnp.result_type(M, x)
  y = jnp.einsum("bhts,bshp->bthp", M, x.astype(f), precision=_EXACT)
  if D is not None:
    y = y + D.astype(f)[:, None] * x.astype(f)
  return y.astype(x.dtype)
