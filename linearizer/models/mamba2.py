"""The Mamba-2 token mixer (method.md §6; mamba-ssm 2.0.4 `Mamba2`, as Adventurer uses it)."""

import math

import jax
import jax.numpy as jnp
from flax import nnx

import kernels
from linearizer.errors import UserError
from linearizer.models import common


def _uniform(low, high):
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, low, high)


def _dt_bias_init(dt_min=1e-3, dt_max=0.1, floor=1e-4):
  """softplus⁻¹(Δ0) with Δ0 = exp(U[ln dt_min, ln dt_max]) clamped ≥ floor (§6 init)."""

  def init(key, shape, dtype=jnp.float32):
    log_dt = jax.random.uniform(key, shape, dtype, math.log(dt_min), math.log(dt_max))
    dt = jnp.maximum(jnp.exp(log_dt), floor)
    return dt + jnp.log(-jnp.expm1(-dt))

  return init


class Mamba2(nnx.Module):
  """in_proj → causal depthwise conv → SSD scan → gated RMSNorm → out_proj.

  Parameter names follow mamba-ssm so checkpoints map one to one; the depthwise conv
  weight is stored as (width, channels).
  """

  def __init__(
    self,
    d_model: int,
    *,
    d_state: int = 64,
    headdim: int = 64,
    expand: int = 2,
    ngroups: int = 1,
    d_conv: int = 4,
    chunk_size: int = 0,
    ssd_impl: str = "auto",
    ssd_interpret: bool = False,
    out_proj_scale: float = 1.0,
    dtype: str = "float32",
    rngs: nnx.Rngs,
  ):
    inner = expand * d_model
    if inner % headdim:
      raise UserError(f"expand*d_model={inner} is not a multiple of headdim={headdim}.")
    self.inner, self.d_state, self.headdim, self.ngroups = inner, d_state, headdim, ngroups
    self.num_heads = inner // headdim
    self.chunk_size, self.ssd_impl, self.ssd_interpret = chunk_size, ssd_impl, ssd_interpret
    conv_dim = inner + 2 * ngroups * d_state
    dense = dict(use_bias=False, dtype=jnp.dtype(dtype), rngs=rngs)
    # Projection order [z, x, B, C, dt], as in mamba-ssm.
    self.in_proj = nnx.Linear(
      d_model,
      2 * inner + 2 * ngroups * d_state + self.num_heads,
      kernel_init=common.torch_linear_init,
      **dense,
    )
    bound = 1 / math.sqrt(d_conv)  # torch's Conv1d default, which Adventurer keeps
    self.conv_weight = nnx.Param(_uniform(-bound, bound)(rngs.params(), (d_conv, conv_dim)))
    self.conv_bias = nnx.Param(_uniform(-bound, bound)(rngs.params(), (conv_dim,)))
    self.dt_bias = nnx.Param(_dt_bias_init()(rngs.params(), (self.num_heads,)))
    self.A_log = nnx.Param(jnp.log(_uniform(1.0, 16.0)(rngs.params(), (self.num_heads,))))
    self.D = nnx.Param(jnp.ones((self.num_heads,)))
    self.norm_weight = nnx.Param(jnp.ones((inner,)))
    # torch default init shrunk by out_proj_scale (Adventurer: 1/sqrt(depth)).
    scaled = nnx.initializers.variance_scaling(out_proj_scale**2 / 3, "fan_in", "uniform")
    self.out_proj = nnx.Linear(inner, d_model, kernel_init=scaled, **dense)

  def causal_conv(self, xbc, segment_ids=None):
    """Depthwise causal conv, width K: out_t = b + Σ_k w_k · x_{t-K+1+k}; with
    `segment_ids` (B, L) only taps in t's own segment count (a packed sequence's images do
    not leak into each other, as `causal_conv1d`'s seq_idx).

    Accumulated in float32 and cast back once, as `causal_conv1d` does: in bfloat16 each of
    the K partial sums would round.
    """
    w = self.conv_weight[...].astype(jnp.float32)
    k, length = w.shape[0], xbc.shape[1]
    padded = jnp.pad(xbc, ((0, 0), (k - 1, 0), (0, 0))).astype(jnp.float32)
    taps = [padded[:, i : i + length] for i in range(k)]
    if segment_ids is not None:
      runs = jnp.pad(kernels.segment_runs(segment_ids), ((0, 0), (k - 1, 0)), constant_values=-1)
      own = [(runs[:, i : i + length] == runs[:, k - 1 :])[..., None] for i in range(k)]
      taps = [jnp.where(keep, tap, 0.0) for tap, keep in zip(taps, own)]
    out = sum(tap * w[i] for i, tap in enumerate(taps))
    return (out + self.conv_bias[...].astype(jnp.float32)).astype(xbc.dtype)

  def gated_norm(self, y, z):
    """RMSNorm(y ⊙ SiLU(z)) per group, in float32 (norm after gating, §6 step 5)."""
    g = y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
    g = g.reshape(*g.shape[:-1], self.ngroups, -1)
    g = g * jax.lax.rsqrt(jnp.mean(g * g, axis=-1, keepdims=True) + 1e-5)
    return g.reshape(y.shape) * self.norm_weight[...]

  def ssd_inputs(self, u, segment_ids=None):
    """Everything the scan consumes, plus the gate z: x (b,L,H,P), Δ (b,L,H) f32, A, B, C."""
    b, length, _ = u.shape
    s, g = self.d_state, self.ngroups
    z, xbc, dt = jnp.split(self.in_proj(u), [self.inner, 2 * self.inner + 2 * g * s], axis=-1)
    xbc = jax.nn.silu(self.causal_conv(xbc, segment_ids))
    x, B, C = jnp.split(xbc, [self.inner, self.inner + g * s], axis=-1)
    delta = jax.nn.softplus(dt.astype(jnp.float32) + self.dt_bias[...])
    A = -jnp.exp(self.A_log[...].astype(jnp.float32))
    return dict(
      x=x.reshape(b, length, self.num_heads, self.headdim),
      dt=delta,
      A=A,
      B=B.reshape(b, length, g, s),
      C=C.reshape(b, length, g, s),
    ), z

  def __call__(self, u, segment_ids=None):
    """u (B, L, D) -> (B, L, D); `segment_ids` (B, L): a packed sequence, its conv and scan
    restarting where the segment changes."""
    inputs, z = self.ssd_inputs(u, segment_ids)
    try:
      y = kernels.ssd(
        **inputs,
        D=self.D[...].astype(jnp.float32),
        chunk_size=self.chunk_size,
        impl=self.ssd_impl,
        interpret=self.ssd_interpret,
        segment_ids=segment_ids,
      )
    except ValueError as e:  # kernels/ is standalone; what it refuses here is the user's setting
      raise UserError(f"ssd_impl={self.ssd_impl!r}, chunk_size={self.chunk_size}: {e}") from e
    y = self.gated_norm(y.reshape(z.shape), z).astype(u.dtype)
    return self.out_proj(y)
