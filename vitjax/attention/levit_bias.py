"""G20 `levit_bias`: softmax attention with LeViT's learned attention bias (Graham et al. 2021;
official code: https://github.com/facebookresearch/LeViT).

  S_h = Q_h K_h^T / sqrt(d) + b_h[|y_i - y_j|, |x_i - x_j|] + key bias,  P_h = softmax(S_h).
One table of h*w entries per head, indexed by the absolute row and column offsets of the two tokens,
zero-initialised (as LeViT). Coordinates come from `ctx.pos` ([B, N, 2] (row, col) in patch units),
so pruned tokens keep theirs and merged tokens use whatever position the reducer gives them (rounded
to the nearest cell here, offsets clipped to the table). Prefix tokens (pos = NaN) get bias 0 in their
rows and columns (own design). The table size is the patch grid: `grid=(h, w)`, or ctx.grid when
the block still sees the raster grid (after a token reduction ctx.grid is None: set `grid`).
LeViT's Hardswish on the output and its subsampling "shrink" attention belong to the LeViT backbone,
not to this module.
"""
from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from vitjax.attention import registry
from vitjax.attention.base import (Attention, Capabilities, grid_size, quadratic_macs,
                                   softmax_weights)


def pair_bias(table, pos, grid: tuple):
  """table [H, h*w], pos [B, N, 2] -> [B, H, N, N] bias, 0 on rows/cols of NaN positions."""
  known = ~jnp.isnan(pos).any(-1)  # [B, N]
  p = jnp.where(known[..., None], jnp.round(pos), 0.0)
  dy = jnp.clip(jnp.abs(p[:, :, None, 0] - p[:, None, :, 0]), 0, grid[0] - 1).astype(jnp.int32)
  dx = jnp.clip(jnp.abs(p[:, :, None, 1] - p[:, None, :, 1]), 0, grid[1] - 1).astype(jnp.int32)
  bias = table[:, dy * grid[1] + dx].transpose(1, 0, 2, 3)  # [B, H, N, N]
  both = known[:, None, :, None] & known[:, None, None, :]
  return jnp.where(both, bias, 0.0)


@registry.register("levit_bias", caps=Capabilities(needs_pos=True),
                   paper="LeViT: a Vision Transformer in ConvNet's Clothing (Graham et al. 2021)",
                   official="https://github.com/facebookresearch/LeViT",
                   complexity="O(N^2 D) + O(N^2 H) gather", macs=quadratic_macs)
class LeViTBias(Attention):
  """Softmax attention plus a learned per-head bias on absolute (row, col) offsets."""
  grid: Optional[tuple] = None

  def mix(self, x, q, k, v, bias, ctx, *, need, deterministic):
    if ctx is None or ctx.pos is None:
      raise ValueError("levit_bias needs token positions (ctx.pos)")
    grid = grid_size(self.grid, ctx, "levit_bias")
    table = self.param("attention_biases", nn.initializers.zeros,
                       (self.num_heads, grid[0] * grid[1]))
    pair = pair_bias(table, ctx.pos.astype(jnp.float32), grid)
    return self.attend(q, k, v, pair if bias is None else pair + bias, ctx, need=need,
                       deterministic=deterministic, weights=softmax_weights)
