"""G22 `rope1d` and `rope2d_axial`: softmax attention with rotary position embedding (RoPE).

q and k (after projection and the optional qk-norm) are rotated by position-dependent angles, so that
q_m . k_n depends on the positions only through m - n:
  `rope1d` (as iLLaMA, https://github.com/techmonsterwang/iLLaMA): theta_k = base^(-2k/d), k < d/2;
      each adjacent pair (2k, 2k+1) is rotated by p * theta_k (the complex view of adjacent pairs).
  `rope2d_axial` (own knowledge): the first d/2 channels are rotated by the row coordinate, the last
      d/2 by the column, each half with theta_k = base^(-2k/(d/2)), adjacent pairs.
Positions come from ctx.pos ((row, col) in patch units; they travel with pruned and merged tokens,
merged tokens at their size-weighted mean, which RoPE takes as a continuous angle). rope1d uses the
raster index p = row * w + col (w from `grid` or ctx.grid), which for the plain ViT is the patch
sequence index of iLLaMA. Prefix tokens (pos = NaN): rope1d `cls_pos="post"` puts them at p = h*w,
just after the last patch, as iLLaMA's post-sequence CLS; `cls_pos="none"` leaves them unrotated
(p = 0). rope2d_axial leaves prefix tokens unrotated (the same as position (0, 0)).
ToMe's `key_metric` uses the pre-RoPE keys, so token matching is not position-biased (spec).
"""
from typing import Optional

import jax.numpy as jnp

from vitjax.attention import registry
from vitjax.attention.base import (Attention, Capabilities, SOFTMAX_IMPLS, grid_size,
                                   quadratic_macs, raster_index)


def rotate_pairs(x, angles):
  """Rotates adjacent channel pairs of x [B,N,H,c] by angles [B,N,c/2] (float32 math)."""
  xf = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
  cos, sin = jnp.cos(angles)[:, :, None], jnp.sin(angles)[:, :, None]
  re = xf[..., 0] * cos - xf[..., 1] * sin
  im = xf[..., 0] * sin + xf[..., 1] * cos
  return jnp.stack([re, im], -1).reshape(x.shape).astype(x.dtype)


def frequencies(channels: int, base: float):
  """theta_k = base^(-2k/channels), k < channels/2."""
  return base ** (-jnp.arange(0, channels, 2, dtype=jnp.float32) / channels)


def rope_1d(x, p, base: float):
  """x [B,N,H,d], p [B,N] -> rotated x."""
  return rotate_pairs(x, p[..., None] * frequencies(x.shape[-1], base))


def rope_2d_axial(x, pos, base: float):
  """x [B,N,H,d], pos [B,N,2] -> first half rotated by row, second half by column."""
  half = x.shape[-1] // 2
  freq = frequencies(half, base)
  rows = rotate_pairs(x[..., :half], pos[..., 0:1] * freq)
  cols = rotate_pairs(x[..., half:], pos[..., 1:2] * freq)
  return jnp.concatenate([rows, cols], axis=-1)


class RoPEAttention(Attention):
  """Softmax attention over rotated q, k; subclasses map ctx.pos to angles."""
  base: float = 10_000.0

  def rotate(self, t, ctx):
    raise NotImplementedError

  def mix(self, x, q, k, v, bias, ctx, *, need, deterministic):
    if ctx is None or ctx.pos is None:
      raise ValueError(f"{type(self).__name__} needs token positions (ctx.pos)")
    return self.attend(self.rotate(q, ctx), self.rotate(k, ctx), v, bias, ctx, need=need,
                       deterministic=deterministic, keys=k)


@registry.register("rope1d", caps=Capabilities(needs_pos=True), impls=SOFTMAX_IMPLS,
                   paper="RoPE (Su et al. 2021) as used by iLLaMA (Wang et al. 2024)",
                   official="https://github.com/techmonsterwang/iLLaMA",
                   complexity="O(N^2 D) + O(N D)", macs=quadratic_macs)
class RoPE1D(RoPEAttention):
  """1-D RoPE over the raster index of each token; prefix tokens after the sequence."""
  cls_pos: str = "post"
  grid: Optional[tuple] = None

  def rotate(self, t, ctx):
    if self.cls_pos not in ("post", "none"):
      raise ValueError(f"unknown cls_pos {self.cls_pos!r}; valid: post, none")
    gh, gw = grid_size(self.grid, ctx, "rope1d")
    raster, known = raster_index(ctx.pos, gw)
    prefix = float(gh * gw) if self.cls_pos == "post" else 0.0
    return rope_1d(t, jnp.where(known, raster, prefix), self.base)


@registry.register("rope2d_axial", caps=Capabilities(needs_pos=True), impls=SOFTMAX_IMPLS,
                   paper="2-D axial RoPE (own knowledge; RoPE: Su et al. 2021)",
                   complexity="O(N^2 D) + O(N D)", macs=quadratic_macs)
class RoPE2DAxial(RoPEAttention):
  """Axial 2-D RoPE: half the channels by row, half by column; prefix tokens unrotated."""

  def rotate(self, t, ctx):
    if t.shape[-1] % 4:
      raise ValueError(f"rope2d_axial needs a head dim divisible by 4, got {t.shape[-1]}")
    pos = ctx.pos.astype(jnp.float32)
    pos = jnp.where(jnp.isnan(pos).any(-1, keepdims=True), 0.0, pos)
    return rope_2d_axial(t, pos, self.base)
