"""S4 `maxvit_block` and `maxvit_grid`: MaxViT's multi-axis attention (Tu et al. 2022, "MaxViT:
Multi-Axis Vision Transformer"), following the official code
(https://github.com/google-research/maxvit) and timm's maxxvit.py (its `RelPosBiasTf`).

Block attention: softmax attention inside non-overlapping P x P windows (local). Grid attention:
the grid is split into a G x G grid of cells and each group gathers the one token per cell at the
same position, i.e. G x G tokens spaced h / G apart (sparse, global). Both add a relative position
bias B[h, dy + P - 1, dx + P - 1], (dy, dx) = key - query in partition units (positions within
the window or the group), a (2P - 1)^2 table per head initialised N(0, 0.02^2). A MaxViT block
runs MBConv -> block attention -> MLP -> grid attention -> MLP; the backbone composes those.
Defaults P = G = 7.

Deviations (own design): a grid that does not divide by P or G is padded at the bottom/right and
padded keys get no weight (the official code requires divisibility); prefix tokens attend
globally and patch queries do not see them (`cls_mode="global_row"`); a context key bias or mask
is added to that key's logits. impl "reference" materialises each part's weights; "xla" runs
jax.nn.dot_product_attention with the parts as the batch; "pallas" the flash kernel with the parts
as the batch and the relative position bias [H, T, T] as its full bias (head dims 32, 64, 128).
"""
import math

import jax.numpy as jnp

from vitjax.attention import registry
from vitjax.attention.base import Attention, projection_macs
from vitjax.attention.spatial import (PARTITIONED_CAPS, begin, bias_init, finish, from_grid,
                                      from_windows, padded, pair, partitioned_attention,
                                      relative_position_index, to_grid, to_windows)


def partition_macs(n, width, num_heads, *, partition_size, num_prefix=1, **_):
  """Projections, Q K^T and P V of each padded patch over its part's P^2 tokens, prefix rows
  over all n keys; the grid is taken as square."""
  del num_heads
  side = math.isqrt(n - num_prefix)
  size = pair(partition_size)
  hp, wp = padded((side, side), size)
  return (projection_macs(n, width) + 2 * hp * wp * size[0] * size[1] * width
          + 2 * num_prefix * n * width)


def tf_bias(table, size):
  """table [H, 2P-1, 2P-1] -> [H, T, T], entry (query, key) at key - query + P - 1 per axis."""
  idx = relative_position_index(size).T  # the flat index of key - query
  return table.reshape(table.shape[0], -1)[:, idx]


@registry.register(
    "maxvit_block", caps=PARTITIONED_CAPS,
    paper="MaxViT: Multi-Axis Vision Transformer (Tu et al. 2022), block attention",
    official="https://github.com/google-research/maxvit",
    complexity="O(N P^2 D)", impls=("reference", "xla", "pallas"), macs=partition_macs)
class MaxViTBlockAttention(Attention):
  """Softmax attention inside P x P windows, with MaxViT's relative position bias."""
  partition_size: int = 7   # an int or a pair: P (block) or G (grid)
  rel_pos_bias: bool = True
  cls_mode: str = "global_row"

  def partition(self, size, grid):
    """(cut, paste) of this attention's partition of the grid."""
    return (lambda t, fill: to_windows(t, size, (0, 0), fill),
            lambda t: from_windows(t, size, grid))

  def mix(self, x, q, k, v, bias, ctx, *, need, deterministic):
    del x
    grid, npre = begin(self, q, ctx, need)
    size = pair(self.partition_size)
    if min(size) < 1:
      raise ValueError(f"error: partition_size {self.partition_size}; it is >= 1")
    pair_bias = None
    if self.rel_pos_bias:
      table = self.param("relative_position_bias_table", bias_init(),
                         (self.num_heads, 2 * size[0] - 1, 2 * size[1] - 1))
      pair_bias = tf_bias(table.astype(jnp.float32), size)
    cut, paste = self.partition(size, grid)
    drop = (lambda w: self.dropout_weights(w, deterministic)) if self.dropping(deterministic) \
        else None
    key_bias = None if bias is None else bias[:, 0, 0, npre:]
    y = partitioned_attention(q[:, npre:], k[:, npre:], v[:, npre:], key_bias, grid, cut, paste,
                              pair_bias, impl=self.impl, drop=drop)
    return finish(self, y, q, k, v, bias, ctx, need, deterministic)


@registry.register("maxvit_grid", like="maxvit_block",
                   paper="MaxViT: Multi-Axis Vision Transformer (Tu et al. 2022), grid attention")
class MaxViTGridAttention(MaxViTBlockAttention):
  """Softmax attention among the G x G tokens spaced h / G apart, with the same bias."""

  def partition(self, size, grid):
    return (lambda t, fill: to_grid(t, size, fill), lambda t: from_grid(t, size, grid))
