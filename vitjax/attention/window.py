"""S1 `window` and `shifted_window`: Swin's window attention W-MSA and shifted-window SW-MSA (Liu et
al. 2021, "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows"), following the
official code (https://github.com/microsoft/Swin-Transformer, models/swin_transformer.py) and timm's
swin_transformer.py (padding to the window, non-square windows).

Patch tokens of the (h, w) grid attend within non-overlapping ws x ws windows:
  S = Q K^T / sqrt(d) + B[offset(i, j)] (+ M),  P = softmax(S),  one window per softmax;
B is the relative position bias, a learned table of (2 ws - 1)^2 entries per head indexed by the
in-window offset (query - key), initialised N(0, 0.02^2). `shifted_window` first rolls the grid by
(-shift, -shift) (shift = ws // 2 by default) and adds M = -100 between tokens of a window that
came from different regions of the unrolled grid, then rolls back: alternating W and SW blocks
connect neighbouring windows. As in the official code, a window no smaller than the grid becomes
the grid, and is then not shifted (per axis, as timm). Projections: timm's fused `qkv` and `proj`.

Deviations (own design, named here and in the README):
- Padding: a grid that is not a multiple of the window is padded at the bottom and right (as timm)
  and the padded keys get logit -1e9, so padding never receives weight; timm's padded zero tokens
  are attended. At 224 px every Swin stage divides by 7, so the two agree there.
- Prefix tokens ([CLS], registers; Swin has none), `cls_mode="global_row"`: each prefix query
  attends to every token with plain softmax (no position bias), patch queries do not see the prefix
  tokens. That row is exact, so `cls_probs` is too. `cls_mode="none"` refuses prefix tokens.
- A key bias or key mask from the context (ToMe's log-sizes, padding) is added to the logits of
  that key in its window.
Variants with their own papers, the same computation without the relative position bias:
`twins_lsa`, Twins-SVT's locally-grouped self-attention (Chu et al. 2021, "Twins: Revisiting the
Design of Spatial Attention in Vision Transformers"; https://github.com/Meituan-AutoML/Twins,
LocallyGroupedAttn in timm's twins.py), and `davit_window`, DaViT's spatial window attention (Ding
et al. 2022, "DaViT: Dual Attention Vision Transformers"; https://github.com/dingmyu/davit,
WindowAttention in timm's davit.py). Both pad the grid with zero tokens that are attended; here
padding gets no weight, as above (at 224 px every stage of both divides by 7), unless
`davit_window` is given padding="zeros": DaViT's own padding, which the DaViT backbone uses.
impl "reference" materialises each window's weights; "xla" runs jax.nn.dot_product_attention with
the windows as the batch and the bias and mask as one [windows, H, T, T] bias; "pallas" runs the
flash kernel (vitjax.kernels.flash_attention) with the windows as the batch, the relative position
bias (+ shift mask) as its full bias [nW, H, T, T] (one [H, T, T] without a shift), read per
window b % nW and never expanded over the images, and padding / context key biases as its per-key
bias; it needs head dims 32, 64 or 128 and takes the reference path under attention dropout.
"""
import math

import jax.numpy as jnp

from vitjax.attention import registry
from vitjax.attention.base import Attention, projection_macs
from vitjax.attention.spatial import (PARTITIONED_CAPS, begin, bias_init, finish, fit_window,
                                      from_windows, padded, pair, partitioned_attention,
                                      patch_grid, shift_mask, table_size, to_windows, window_bias)


def window_macs(n, width, num_heads, *, window_size, shift_size, num_prefix=1,
                padding="masked", **_):
  """Projections of the n tokens (of all padded ones with padding "zeros"), Q K^T and P V of
  every padded patch over its window's T tokens, and the prefix rows over all n keys (the grid
  is taken as square)."""
  del num_heads
  side = math.isqrt(n - num_prefix)
  window = pair(window_size) if padding == "zeros" else \
      fit_window((side, side), window_size, shift_size or 0)[0]
  hp, wp = padded((side, side), window)
  projected = n if padding != "zeros" else num_prefix + hp * wp
  return (projection_macs(projected, width) + 2 * hp * wp * window[0] * window[1] * width
          + 2 * num_prefix * n * width)


@registry.register(
    "window", caps=PARTITIONED_CAPS,
    paper="Swin Transformer: Hierarchical Vision Transformer using Shifted Windows (Liu et al. 2021)",
    official="https://github.com/microsoft/Swin-Transformer",
    complexity="O(N ws^2 D)", impls=("reference", "xla", "pallas"), macs=window_macs)
class WindowAttention(Attention):
  """Softmax attention inside ws x ws windows of the patch grid, with relative position bias."""
  window_size: int = 7          # an int or (wh, ww)
  shift_size: int = 0           # an int or (sh, sw); None: window // 2
  rel_pos_bias: bool = True
  cls_mode: str = "global_row"

  def shift(self):
    if self.shift_size is not None:
      return self.shift_size
    wh, ww = (self.window_size, self.window_size) if isinstance(self.window_size, int) \
        else self.window_size
    return wh // 2, ww // 2

  def mix(self, x, q, k, v, bias, ctx, *, need, deterministic):
    del x
    grid, npre = begin(self, q, ctx, need)
    window, shift = fit_window(grid, self.window_size, self.shift())
    table = None
    if self.rel_pos_bias:
      table = self.param("relative_position_bias_table", bias_init(),
                         (table_size(window), self.num_heads))
    key_bias = None if bias is None else bias[:, 0, 0, npre:]
    y = self.windowed(q[:, npre:], k[:, npre:], v[:, npre:], key_bias, table, grid, window, shift,
                      deterministic)
    return finish(self, y, q, k, v, bias, ctx, need, deterministic)

  def windowed(self, q, k, v, key_bias, table, grid, window, shift, deterministic):
    """Patch queries [B, h*w, H, d] over their windows -> [B, h*w, H, d]."""
    cut = lambda t, fill: to_windows(t, window, shift, fill)  # noqa: E731
    paste = lambda t: from_windows(t, window, grid, shift)  # noqa: E731
    bias = None if table is None else window_bias(table.astype(jnp.float32), window)
    drop = (lambda w: self.dropout_weights(w, deterministic)) if self.dropping(deterministic) \
        else None
    return partitioned_attention(q, k, v, key_bias, grid, cut, paste, bias,
                                 shift_mask(grid, window, shift), impl=self.impl, drop=drop)


@registry.register("shifted_window", like="window")
class ShiftedWindowAttention(WindowAttention):
  """Swin's SW-MSA: window attention on the grid rolled by (-ws // 2, -ws // 2), with its mask."""
  shift_size: int = None


@registry.register(
    "twins_lsa", like="window",
    paper="Twins: Revisiting the Design of Spatial Attention in Vision Transformers (Chu et al. 2021)",
    official="https://github.com/Meituan-AutoML/Twins")
class TwinsLSA(WindowAttention):
  """Twins' locally-grouped self-attention (LSA): windows without position bias or shift."""
  rel_pos_bias: bool = False


PADDINGS = ("masked", "zeros")


@registry.register("davit_window", like="window",
                   paper="DaViT: Dual Attention Vision Transformers (Ding et al. 2022)",
                   official="https://github.com/dingmyu/davit")
class DaViTWindow(WindowAttention):
  """DaViT's spatial window attention: windows without position bias or shift.

  padding "masked": the rule above (padded keys get no weight, a window no smaller than the grid
  becomes the grid). "zeros": DaViT's own (timm's SpatialBlock): the layer input is zero-padded
  at the bottom and right to multiples of the window, whatever the grid's size, and the padded
  tokens are projected and attended like any other (their keys and values are the projection
  biases); their outputs are cut off.
  """
  rel_pos_bias: bool = False
  padding: str = "masked"

  def __call__(self, x, ctx=None, *, need=(), deterministic=True):
    if self.padding not in PADDINGS:
      raise ValueError(f"error: davit_window padding {self.padding!r}; valid: "
                       f"{', '.join(PADDINGS)}")
    if self.padding == "masked":
      return super().__call__(x, ctx, need=need, deterministic=deterministic)
    grid, npre = patch_grid(ctx, x.shape[1], type(self).__name__)
    full = padded(grid, pair(self.window_size))
    pad = lambda t, fill: None if t is None else pad_grid(t, grid, full, npre, fill)  # noqa: E731
    ctx = ctx.replace(grid=full, key_bias=pad(ctx.key_bias, 0.0), valid=pad(ctx.valid, True),
                      size=pad(ctx.size, 1.0), pos=None)
    y, aux = super().__call__(pad(x, 0.0), ctx, need=need, deterministic=deterministic)
    cut = lambda t: crop_grid(t, grid, full, npre)  # noqa: E731
    return cut(y), {k: jnp.moveaxis(cut(jnp.moveaxis(v, -1, 1)), 1, -1) for k, v in aux.items()}


def pad_grid(t, grid, full, num_prefix: int, fill):
  """[B, prefix + h*w, ...] raster tokens -> the same on the (H, W) grid `full`, padded at the
  bottom and right with `fill`."""
  b, rest = t.shape[0], t.shape[2:]
  patches = t[:, num_prefix:].reshape(b, *grid, *rest)
  pads = [(0, 0), (0, full[0] - grid[0]), (0, full[1] - grid[1])] + [(0, 0)] * len(rest)
  patches = jnp.pad(patches, pads, constant_values=fill).reshape(b, full[0] * full[1], *rest)
  return jnp.concatenate([t[:, :num_prefix], patches.astype(t.dtype)], axis=1)


def crop_grid(t, grid, full, num_prefix: int):
  """The inverse of `pad_grid`: the tokens of the (h, w) grid `grid` at the top left of `full`."""
  b, rest = t.shape[0], t.shape[2:]
  patches = t[:, num_prefix:].reshape(b, *full, *rest)[:, :grid[0], :grid[1]]
  return jnp.concatenate([t[:, :num_prefix], patches.reshape(b, -1, *rest)], axis=1)
