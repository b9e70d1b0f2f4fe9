"""Conditional positional encoding: the PEG of CPVT (Chu et al. 2023, "Conditional Positional
Encodings for Vision Transformers"; https://github.com/Meituan-AutoML/CPVT), as Twins (timm's
twins.py `PosConv`) and DaViT (timm's davit.py `ConvPosEnc`) use it.

  patches <- patches + act(DWConv_{k x k}(patches on the grid)),  stride 1, zero 'SAME' padding,
with a bias; prefix tokens ([CLS], registers) pass through unchanged. The zero padding is the
absolute-position cue, and the conv runs at any grid size, so no table is resampled. `act`:
DaViT's `cpe_act` (GELU on the conv output; off by default, as in Twins, CPVT and DaViT).
The conv is `proj` (kernel [k, k, 1, D], one filter per channel), timm's name, computed by
`vitjax.kernels.depthwise` (shifted sums on CPU, XLA's grouped conv elsewhere).
"""
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from vitjax.kernels.depthwise import DepthwiseConv


class PEG(nn.Module):
  """x [B, prefix + h*w, D] on the raster grid -> the same shape, positions encoded."""
  kernel_size: int = 3
  act: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, grid: Sequence[int], num_prefix: int = 0):
    b, n, width = x.shape
    h, w = (int(g) for g in grid)
    if n != num_prefix + h * w:
      raise ValueError(f"error: PEG got {n} tokens for a {h}x{w} grid with {num_prefix} prefix "
                       f"tokens; expected {num_prefix + h * w}")
    if self.kernel_size < 1 or self.kernel_size % 2 == 0:
      raise ValueError(f"error: PEG kernel_size {self.kernel_size}; an odd int >= 1 keeps the "
                       "grid's size and centre")
    patches = x[:, num_prefix:].reshape(b, h, w, width)
    feat = DepthwiseConv(self.kernel_size, dtype=self.dtype, name="proj")(patches)
    if self.act:
      feat = nn.gelu(feat, approximate=False)
    patches = (patches + feat).reshape(b, h * w, width)
    return jnp.concatenate([x[:, :num_prefix], patches], axis=1)
