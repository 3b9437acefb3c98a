"""Sequential reference scan of the Mamba-2 SSD (method.md §6 step 4).

The oracle every fast impl is tested against (as in mamba-ssm): one `lax.scan`
step per token, state (batch, H, P, S), everything in float32. O(L) sequential
steps, so slow on accelerators; use it for checking, not for training.
"""
import jax
import jax.numpy as jnp

_EXACT = jax.lax.Precision.HIGHEST  # an oracle must not use TF32/bf16 passes on GPU/TPU


def ssd_reference(x, dt, A, B, C, D=None, *, chunk_size=256, interpret=False):
    """s_t = exp(dt_t A) s_{t-1} + dt_t x_t ⊗ B_t;  y_t = s_t C_t + D x_t (method.md §6.4)."""
    del chunk_size, interpret  # no chunks and no Pallas here
    batch, _, H, P = x.shape
    G, S = B.shape[2:]
    f32 = jnp.float32
    # Head h reads group h // (H // G): repeat each group's B, C over its heads.
    Bh = jnp.repeat(B.astype(f32), H // G, axis=2)  # (batch, L, H, S)
    Ch = jnp.repeat(C.astype(f32), H // G, axis=2)
    A = A.astype(f32)

    def step(s, inp):
        x_t, dt_t, B_t, C_t = inp  # (batch, H, P), (batch, H), (batch, H, S) x2
        s = jnp.exp(dt_t * A)[..., None, None] * s + jnp.einsum(
            "bhp,bhn->bhpn", dt_t[..., None] * x_t, B_t, precision=_EXACT)
        return s, jnp.einsum("bhpn,bhn->bhp", s, C_t, precision=_EXACT)

    s0 = jnp.zeros((batch, H, P, S), f32)
    seq = tuple(jnp.moveaxis(v, 1, 0) for v in (x.astype(f32), dt.astype(f32), Bh, Ch))
    _, y = jax.lax.scan(step, s0, seq)  # scan runs over L (axis 0)
    y = jnp.moveaxis(y, 0, 1)  # (batch, L, H, P)
    if D is not None:
        y = y + D.astype(f32)[:, None] * x.astype(f32)
    return y.astype(x.dtype)
