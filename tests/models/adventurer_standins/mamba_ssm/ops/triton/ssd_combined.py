"""Test stand-in for mamba_ssm.ops.triton.ssd_combined: the sequential scan (the reference
that the chunked kernels compute), in float64, and the fused block built on it as
mamba-ssm's `mamba_split_conv1d_scan_ref` builds it."""

import torch
import torch.nn.functional as F

from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn


def mamba_chunk_scan_combined(
  x,  # (b, l, h, p)
  dt,  # (b, l, h)
  A,  # (h,)
  B,  # (b, l, g, n)
  C,  # (b, l, g, n)
  chunk_size=None,  # the kernels' blocking: no part of what is computed
  D=None,  # (h,) or (h, p)
  z=None,  # (b, l, h, p): y · SiLU(z)
  dt_bias=None,
  initial_states=None,
  seq_idx=None,
  dt_softplus=False,
  dt_limit=(0.0, float("inf")),
  return_final_states=False,
):
  """s_t = exp(dt_t·A) s_{t-1} + dt_t·x_t ⊗ B_t,  y_t = s_t·C_t + D·x_t, token by token."""
  assert seq_idx is None, "test stand-in: one sequence per row"
  dtype, (b, length, h, p), g = x.dtype, x.shape, B.shape[2]
  x, dt, A, B, C = (t.double() for t in (x, dt, A, B, C))
  if dt_bias is not None:
    dt = dt + dt_bias.double()
  dt = (F.softplus(dt) if dt_softplus else dt).clamp(*dt_limit)
  B, C = (t.repeat_interleave(h // g, dim=2) for t in (B, C))  # group -> its heads
  s = x.new_zeros(b, h, p, B.shape[-1]) if initial_states is None else initial_states.double()
  ys = []
  for t in range(length):
    decay = torch.exp(dt[:, t] * A)[..., None, None]
    s = decay * s + torch.einsum("bhp,bhn->bhpn", dt[:, t, :, None] * x[:, t], B[:, t])
    ys.append(torch.einsum("bhpn,bhn->bhp", s, C[:, t]))
  y = torch.stack(ys, 1)
  if D is not None:
    y = y + x * (D.double()[:, None] if D.dim() == 1 else D.double())
  if z is not None:
    y = y * F.silu(z.double())
  return (y.to(dtype), s) if return_final_states else y.to(dtype)


def mamba_split_conv1d_scan_combined(
  zxbcdt,  # (b, l, [z, x, B, C, dt])
  conv1d_weight,  # (conv_dim, width)
  conv1d_bias,
  dt_bias,
  A,
  D,
  chunk_size,
  initial_states=None,
  seq_idx=None,
  dt_limit=(0.0, float("inf")),
  return_final_states=False,
  activation="silu",
  rmsnorm_weight=None,
  rmsnorm_eps=1e-6,
  outproj_weight=None,
  outproj_bias=None,
  headdim=None,
  ngroups=1,
  norm_before_gate=True,
):
  """Split, causal depthwise conv + SiLU, scan, gated RMSNorm, out projection."""
  assert activation in ("silu", "swish") and initial_states is None and not return_final_states
  heads = D.shape[0]
  dim = heads * (headdim if D.dim() == 1 else D.shape[1])
  d_state = (zxbcdt.shape[-1] - 2 * dim - heads) // ngroups // 2
  z, xbc, dt = torch.split(zxbcdt, [dim, dim + 2 * ngroups * d_state, heads], dim=-1)
  length, width = xbc.shape[1], conv1d_weight.shape[-1]
  xbc = F.conv1d(
    xbc.transpose(1, 2),
    conv1d_weight[:, None],
    conv1d_bias,
    padding=width - 1,
    groups=xbc.shape[-1],
  )
  xbc = F.silu(xbc[..., :length].transpose(1, 2))  # causal: the first `length` outputs
  x, B, C = torch.split(xbc, [dim, ngroups * d_state, ngroups * d_state], dim=-1)
  y = mamba_chunk_scan_combined(
    x.unflatten(-1, (heads, -1)),
    dt,
    A,
    B.unflatten(-1, (ngroups, d_state)),
    C.unflatten(-1, (ngroups, d_state)),
    chunk_size,
    D=D,
    z=None if rmsnorm_weight is not None else z.unflatten(-1, (heads, -1)),
    dt_bias=dt_bias,
    seq_idx=seq_idx,
    dt_softplus=True,
    dt_limit=dt_limit,
  ).flatten(-2)
  if rmsnorm_weight is not None:
    y = rmsnorm_fn(y, rmsnorm_weight, None, z, rmsnorm_eps, norm_before_gate=norm_before_gate)
  return y if outproj_weight is None else F.linear(y, outproj_weight, outproj_bias)
