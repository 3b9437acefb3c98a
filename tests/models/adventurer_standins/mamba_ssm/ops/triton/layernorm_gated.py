"""Test stand-in for mamba_ssm.ops.triton.layernorm_gated: the gated RMSNorm, float64 inside
(mamba-ssm's `rms_norm_ref`)."""

import torch
import torch.nn.functional as F
from torch import nn


def rmsnorm_fn(x, weight, bias=None, z=None, eps=1e-6, group_size=None, norm_before_gate=True):
  """RMSNorm(x) · SiLU(z) (norm_before_gate) or RMSNorm(x · SiLU(z)), per group of features."""
  dtype, x = x.dtype, x.double()
  z = None if z is None else z.double()
  if z is not None and not norm_before_gate:
    x = x * F.silu(z)
  groups = x.unflatten(-1, (-1, group_size or x.shape[-1]))
  out = (groups * torch.rsqrt(groups.square().mean(-1, keepdim=True) + eps)).flatten(-2)
  out = out * weight.double() + (0 if bias is None else bias.double())
  if z is not None and norm_before_gate:
    out = out * F.silu(z)
  return out.to(dtype)


class RMSNorm(nn.Module):
  def __init__(
    self, hidden_size, eps=1e-5, group_size=None, norm_before_gate=True, device=None, dtype=None
  ):
    super().__init__()
    self.eps, self.group_size, self.norm_before_gate = eps, group_size, norm_before_gate
    self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
    self.register_parameter("bias", None)

  def forward(self, x, z=None):
    return rmsnorm_fn(
      x, self.weight, self.bias, z, self.eps, self.group_size, self.norm_before_gate
    )
