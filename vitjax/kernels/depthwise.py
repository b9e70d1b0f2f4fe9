"""Depthwise k x k convolution (stride 1, zero 'SAME' padding, one filter per channel) with the
program chosen per platform when it is compiled (`lax.platform_dependent`): XLA's grouped
convolution on GPU and TPU; on CPU the same conv as k^2 shifted multiply-adds of the zero-padded
input. XLA:CPU runs the grouped form far below its dense speed: a 3x3 conv of [8, 56, 56, 256]
takes about 120 ms there and 3-5 ms as shifted sums (gradient 433 against about 100 ms), where a
dense 256 -> 1024 product of the same tokens takes about 80 ms (`experiments/depthwise.py`). The two forms
are the same sum in another order (float32 results within a few ulps).
"""
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp
from jax import lax


def grouped(x, kernel):
  """x [B, H, W, C], kernel [k, k, 1, C] -> [B, H, W, C] through XLA's grouped convolution."""
  return lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                  feature_group_count=x.shape[-1])


def shifted(x, kernel):
  """The same conv as sum_ab kernel[a, b] * x_padded[a:a + H, b:b + W]."""
  k, (h, w) = kernel.shape[0], x.shape[1:3]
  p = jnp.pad(x, ((0, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)))
  out = p[:, :h, :w] * kernel[0, 0, 0]
  for a in range(k):
    for b in range(k):
      if a or b:
        out = out + p[:, a:a + h, b:b + w] * kernel[a, b, 0]
  return out


def depthwise_conv(x, kernel):
  """x [B, H, W, C], kernel [k, k, 1, C] (k odd) -> [B, H, W, C]: shifted sums on CPU, the grouped
  convolution elsewhere."""
  return lax.platform_dependent(x, kernel, cpu=shifted, default=grouped)


class DepthwiseConv(nn.Module):
  """flax's nn.Conv(C, (k, k), padding="SAME", feature_group_count=C) with the same parameters
  (`kernel` [k, k, 1, C], `bias` [C]) and initialisers, computed by `depthwise_conv`."""
  kernel_size: int = 3
  use_bias: bool = True
  dtype: Any = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self, x):
    k, c = self.kernel_size, x.shape[-1]
    if k < 1 or k % 2 == 0:
      raise ValueError(f"depthwise kernel_size {k}; an odd int >= 1 keeps the grid's size")
    kernel = self.param("kernel", self.kernel_init, (k, k, 1, c))
    y = depthwise_conv(x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (c,)).astype(self.dtype)
    return y
