"""Test stand-in for timm.models.layers: the initialisers, `to_2tuple` and `DropPath`."""

import math

from torch import nn


def trunc_normal_(tensor, mean=0.0, std=1.0, a=-2.0, b=2.0):
  return nn.init.trunc_normal_(tensor, mean, std, a, b)


def lecun_normal_(tensor):
  """Normal of variance 1 / fan_in truncated at 2 std (timm's, via variance_scaling_)."""
  fan_in, _ = nn.init._calculate_fan_in_and_fan_out(tensor)
  std = math.sqrt(1.0 / fan_in) / 0.87962566103423978
  return trunc_normal_(tensor, std=std, a=-2 * std, b=2 * std)


def to_2tuple(x):
  return tuple(x) if isinstance(x, (tuple, list)) else (x, x)


class DropPath(nn.Module):
  """Drops the whole residual branch per sample while training; the identity in eval."""

  def __init__(self, drop_prob=0.0, scale_by_keep=True):
    super().__init__()
    self.drop_prob, self.scale_by_keep = drop_prob, scale_by_keep

  def forward(self, x):
    if self.drop_prob == 0.0 or not self.training:
      return x
    keep = 1 - self.drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep if self.scale_by_keep else x * mask
