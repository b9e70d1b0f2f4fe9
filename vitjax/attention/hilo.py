"""S6 `hilo`: HiLo attention (Pan et al. 2022, "Fast Vision Transformers with HiLo Attention"),
following the official code (https://github.com/ziplab/LITv2, hilo.py; LITv2's defaults from its
classification configs).

The heads are split in two groups with their own projections, and their outputs are concatenated
along the channels (Hi-Fi first) with no shared output projection:
  Hi-Fi, H - floor(alpha H) heads (`h_qkv`, `h_proj`): softmax attention inside non-overlapping
      s x s windows of the patch grid (local detail);
  Lo-Fi, floor(alpha H) heads (`l_q`, `l_kv`, `l_proj`): every query attends to keys and values
      of the grid average-pooled over the same s x s windows (global structure).
s = 1 makes every head Lo-Fi: global multi-head attention (as the official code). Defaults: alpha
0.9 and s = 2 (LITv2-S/M/B in their attention stages; the last stage there uses s = 1).

Deviations (own design, also in the README): prefix tokens ([CLS], registers; LITv2 has none)
are extra unpooled Lo-Fi keys, and in the Hi-Fi heads a prefix query attends to every token while
patch queries do not see the prefix (`cls_mode="global_row"`, as `window`); the official module
applies no attention or output dropout, here `attn_drop` and `proj_drop` act as in every other
mechanism (both 0 by default). A grid the window does not divide is refused, as the official
code assumes it away. The layer gives no [CLS] row (its Lo-Fi keys are pooled), so reducers that
read one are refused when the model is built.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from vitjax.attention import registry
from vitjax.attention.base import Attention, AttnContext, Capabilities
from vitjax.attention.spatial import (from_windows, partitioned_attention, patch_grid,
                                      prefix_rows, to_windows)


def split_heads(num_heads: int, alpha: float, window: int) -> tuple:
  """(Hi-Fi heads, Lo-Fi heads) as the official code splits them."""
  lo = num_heads if window == 1 else int(num_heads * alpha)
  return num_heads - lo, lo


def hilo_macs(n, width, num_heads, *, alpha, window_size, num_prefix=1, **_):
  """Hi-Fi: its projections, the windows and the prefix rows; Lo-Fi: its projections (kv on the
  pooled keys) and the queries over the pooled keys."""
  hi, lo = split_heads(num_heads, alpha, window_size)
  d = width // num_heads
  patches = n - num_prefix
  keys = num_prefix + patches // window_size ** 2
  hi_macs = (3 * n * width * hi * d + 2 * patches * window_size ** 2 * hi * d
             + 2 * num_prefix * n * hi * d + n * (hi * d) ** 2) if hi else 0
  lo_macs = (n * width * lo * d + 2 * keys * width * lo * d + 2 * n * keys * lo * d
             + n * (lo * d) ** 2) if lo else 0
  return hi_macs + lo_macs


@registry.register(
    "hilo", caps=Capabilities(cls_probs="none", key_metric=False, size_semantics=False,
                              key_bias=False, needs_grid=True, full_attn=False),
    paper="Fast Vision Transformers with HiLo Attention (Pan et al. 2022)",
    official="https://github.com/ziplab/LITv2",
    complexity="O((1-a) N s^2 D + a N^2/s^2 D)", macs=hilo_macs)
class HiLo(Attention):
  """High-frequency heads in s x s windows beside low-frequency heads over s x s-pooled keys."""
  alpha: float = 0.9
  window_size: int = 2

  @nn.compact
  def __call__(self, x, ctx=None, *, need=(), deterministic=True):
    ctx = AttnContext() if ctx is None else ctx
    if need:
      raise ValueError(f"error: hilo gives none of {sorted(need)}; it gives no [CLS] row, keys "
                       "or weights")
    if ctx.key_bias is not None or ctx.valid is not None:
      raise ValueError("error: hilo takes no key bias or mask (its Lo-Fi keys are pooled "
                       "windows); use it before any token reduction")
    if self.qk_norm:
      raise ValueError("error: hilo has no qk_norm (LITv2's HiLo normalises neither queries nor "
                       "keys); use qk_norm=False")
    if not 0.0 <= self.alpha <= 1.0 or self.window_size < 1:
      raise ValueError(f"error: hilo alpha={self.alpha}, window_size={self.window_size}; alpha "
                       "is in [0, 1] and the window an int >= 1")
    b, n, width = x.shape
    d = self.head_dim(width)
    grid, npre = patch_grid(ctx, n, "hilo")
    s = self.window_size
    if grid[0] % s or grid[1] % s:
      raise ValueError(f"error: hilo window_size {s} does not divide the {grid[0]}x{grid[1]} "
                       "grid; use a window that divides it (1 is global attention)")
    hi, lo = split_heads(self.num_heads, self.alpha, s)
    outs = []
    if hi:
      outs.append(self.hifi(x, grid, npre, hi, d, deterministic))
    if lo:
      outs.append(self.lofi(x, grid, npre, lo, d, deterministic))
    y = jnp.concatenate(outs, axis=-1)
    return nn.Dropout(self.proj_drop)(y, deterministic=deterministic), {}

  def dense(self, features, name, bias=None):
    return nn.Dense(features, use_bias=self.qkv_bias if bias is None else bias, dtype=self.dtype,
                    name=name)

  def drop(self, deterministic):
    return lambda w: self.dropout_weights(w, deterministic)

  def hifi(self, x, grid, npre, heads, d, deterministic):
    b, n, _ = x.shape
    q, k, v = jnp.split(self.dense(3 * heads * d, "h_qkv")(x).reshape(b, n, 3, heads, d), 3, 2)
    q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]
    window = (self.window_size,) * 2
    cut = lambda t, fill: to_windows(t, window, (0, 0), fill)  # noqa: E731
    paste = lambda t: from_windows(t, window, grid)  # noqa: E731
    drop = self.drop(deterministic) if self.dropping(deterministic) else None
    y = partitioned_attention(q[:, npre:], k[:, npre:], v[:, npre:], None, grid, cut, paste,
                              drop=drop)
    if npre:
      y = jnp.concatenate([prefix_rows(q, k, v, None, npre, self.drop(deterministic)), y], 1)
    return self.dense(heads * d, "h_proj", bias=True)(y.reshape(b, n, heads * d))

  def lofi(self, x, grid, npre, heads, d, deterministic):
    b, n, width = x.shape
    s = self.window_size
    pooled = x[:, npre:]
    if s > 1:
      pooled = pooled.reshape(b, grid[0] // s, s, grid[1] // s, s, width).mean(axis=(2, 4))
      pooled = pooled.reshape(b, -1, width)
    keys = jnp.concatenate([x[:, :npre], pooled], axis=1)
    q = self.dense(heads * d, "l_q")(x).reshape(b, n, heads, d)
    k, v = jnp.split(self.dense(2 * heads * d, "l_kv")(keys).reshape(b, -1, 2, heads, d), 2, 2)
    logits = jnp.einsum("bnhd,bmhd->bhnm", q, k[:, :, 0],
                        preferred_element_type=jnp.float32) * d ** -0.5
    w = self.dropout_weights(jax.nn.softmax(logits, axis=-1), deterministic).astype(v.dtype)
    y = jnp.einsum("bhnm,bmhd->bnhd", w, v[:, :, 0])
    return self.dense(heads * d, "l_proj", bias=True)(y.reshape(b, n, heads * d))

