"""S2 `neighborhood` (NA) and S3 `dilated_neighborhood` (DiNA): neighbourhood attention (Hassani et
al. 2023, "Neighborhood Attention Transformer"; Hassani & Shi 2022, "Dilated Neighborhood
Attention Transformer"), following the official code
(https://github.com/SHI-Labs/Neighborhood-Attention-Transformer, and natten's window-start and
bias-start rules).

Each patch query attends to k x k keys of its dilation group (tokens congruent to it modulo delta
per axis): the window centred on it, shifted inward at the borders so that it keeps k x k keys (a
corner query sees the top-left k x k block of its group). Logits
  S = Q K^T / sqrt(d) + B[h, dy + k - 1, dx + k - 1],  (dy, dx) = (key - query) / delta,
with the relative position bias B (natten's `rpb`, (2k - 1)^2 per head, N(0, 0.02^2)) indexed by
the actual offset, so border queries read other entries than interior ones. `dilated_neighborhood`
takes delta = max(1, min(h, w) // k) by default (DiNAT's per-stage dilations 8, 4, 2, 1 at 224 px
with k = 7); `neighborhood` has delta = 1. Projections: timm-style fused `qkv` and `proj`.

Deviations (own design): a dilation group shorter than k along an axis is attended whole (the
official module instead pads the grid with zero tokens up to k * delta, and those are attended);
prefix tokens attend globally and patch queries do not see them (`cls_mode="global_row"`, as the
window attentions); a context key bias or mask is added to that key's logits.
impl "reference" gathers each query's k^2 keys and values (the definition, O(N k^2 D)); no fused
kernel yet.
"""
import math

import jax
import jax.numpy as jnp

from vitjax.attention import registry
from vitjax.attention.base import Attention, projection_macs
from vitjax.attention.spatial import PARTITIONED_CAPS, begin, bias_init, finish, neighborhood_2d, pair


def dilation_for(grid, kernel, dilation) -> tuple:
  """The dilation per axis: the option, or DiNAT's rule max(1, min(h, w) // k) where it is None."""
  if dilation is None:
    return (max(1, min(grid) // max(kernel)),) * 2
  return pair(dilation)


def neighborhood_macs(n, width, num_heads, *, kernel_size, dilation, num_prefix=1, **_):
  """Projections, Q K^T and P V of each patch over its k^2 keys (fewer where a dilation group is
  shorter than k), prefix rows over all n keys; the grid is taken as square."""
  del num_heads
  side = math.isqrt(n - num_prefix)
  kernel = pair(kernel_size)
  dil = dilation_for((side, side), kernel, dilation)
  kh, kw = (min(k, -(-side // dd)) for k, dd in zip(kernel, dil))
  return (projection_macs(n, width) + 2 * side * side * kh * kw * width
          + 2 * num_prefix * n * width)


@registry.register(
    "neighborhood", caps=PARTITIONED_CAPS,
    paper="Neighborhood Attention Transformer (Hassani et al. 2023)",
    official="https://github.com/SHI-Labs/Neighborhood-Attention-Transformer",
    complexity="O(N k^2 D)", macs=neighborhood_macs)
class NeighborhoodAttention(Attention):
  """Softmax attention of each patch over its k x k (dilated) neighbourhood."""
  kernel_size: int = 7
  dilation: int = 1     # an int or a pair; None: max(1, min(h, w) // k)
  rel_pos_bias: bool = True
  cls_mode: str = "global_row"

  def mix(self, x, q, k, v, bias, ctx, *, need, deterministic):
    del x
    kernel = pair(self.kernel_size)
    if any(kk < 1 or kk % 2 == 0 for kk in kernel):
      raise ValueError(f"error: kernel_size {self.kernel_size}; neighbourhood attention needs an "
                       "odd kernel size >= 1")
    grid, npre = begin(self, q, ctx, need)
    dilation = dilation_for(grid, kernel, self.dilation)
    if any(dd < 1 for dd in dilation):
      raise ValueError(f"error: dilation {self.dilation}; a dilation is an int >= 1")
    table = None
    if self.rel_pos_bias:
      table = self.param("rpb", bias_init(), (self.num_heads, 2 * kernel[0] - 1,
                                              2 * kernel[1] - 1))
    key_bias = None if bias is None else bias[:, 0, 0, npre:]
    y = self.local(q[:, npre:], k[:, npre:], v[:, npre:], key_bias, table, grid, kernel, dilation,
                   deterministic)
    return finish(self, y, q, k, v, bias, ctx, need, deterministic)

  def local(self, q, k, v, key_bias, table, grid, kernel, dilation, deterministic):
    """Patch queries [B, P, H, d] over their gathered neighbours -> [B, P, H, d]."""
    keys, valid, offset = (jnp.asarray(a) for a in neighborhood_2d(grid, kernel, dilation))
    kg, vg = k[:, keys], v[:, keys]                     # [B, P, K, H, d]
    logits = jnp.einsum("bphd,bpkhd->bhpk", q, kg,
                        preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
    if table is not None:
      logits = logits + table.reshape(table.shape[0], -1).astype(jnp.float32)[:, offset]
    if key_bias is not None:
      logits = logits + key_bias.astype(jnp.float32)[:, keys][:, None]
    logits = jnp.where(valid, logits, -jnp.inf)
    w = self.dropout_weights(jax.nn.softmax(logits, axis=-1), deterministic)
    return jnp.einsum("bhpk,bpkhd->bphd", w.astype(v.dtype), vg)


@registry.register("dilated_neighborhood", like="neighborhood",
                   paper="Dilated Neighborhood Attention Transformer (Hassani & Shi 2022)")
class DilatedNeighborhoodAttention(NeighborhoodAttention):
  """DiNA: neighbourhood attention within each dilation group; delta = min(h, w) // k by default."""
  dilation: int = None
