"""S `gcvit_global`: GC ViT's global query attention (Hatamizadeh et al. 2023, "Global Context
Vision Transformers"), following the official code (https://github.com/NVlabs/GCVit,
models/gc_vit.py: WindowAttentionGlobal, GlobalQueryGen, FeatExtract, SE) and timm's gcvit.py
(WindowAttentionGlobal with use_global=True, FeatureBlock, MbConvBlock), which is the reference for
parity where the two differ.

The patch grid is cut into ws x ws windows as Swin's W-MSA (no shift); the keys and values of a
window are its own tokens (one fused `qkv` projection of width 2 D: keys, then values), but the
queries are the T = ws^2 global query tokens G [B, T, D], the same for every window of an image
and used as they are, split into heads (no query projection):
  S = G K_w^T / sqrt(d) + B[offset(i, j)],  P = softmax(S),  y_w = P V_w,
B Swin's relative position bias (a (2 ws - 1)^2 x H table, query - key offsets, N(0, .02^2)
truncated), then the output projection `proj`. Query i of every window sits at in-window
position i, so the bias and the outputs are laid out as in local window attention.

Where G comes from: GC ViT makes it once per stage from the stage's input (the FeatureBlock path
below, timm's `global_block`) and hands it to every block in the attention context
(`AttnContext.global_query`, [B, T, D]); the GC ViT backbone (`vitjax.models.gcvit`) does so.
Used on its own (no global query in the context, e.g. picked by name in a ViT), the layer derives
G from its own input (the block's normed tokens, where GC ViT reads the stage's input once; own
design, with its own FeatureBlock per layer) by the same path: the patch tokens as a [B, h, w, D]
map, zero-padded at the bottom and right to multiples of the window (as the windows are), then
the FeatExtract path: k = log2(padded / window) times an MbConv block followed by a 3x3
stride-2 max pool (padding 1), or one MbConv block alone when k = 0 (timm's FeatureBlock with k
levels; the official GlobalQueryGen for the 224 px stages). An MbConv block is
x + conv_pw(SE(GELU(conv_dw(x)))): a depthwise 3x3 conv, exact GELU, squeeze-and-excitation
(mean over the map, 1x1 conv to make_divisible(D / 4, 8) channels, GELU, 1x1 conv, sigmoid gate)
and a 1x1 conv, none with a bias.
A padded grid that is not the window times 2^k (the same k on both axes) is refused.

Padding: a grid that the window does not divide is padded at the bottom and right and the padded
keys get no weight (the zoo's rule, as `window`); GC ViT itself needs grids the window divides.
A window no smaller than the grid becomes the grid (Swin's rule).

Differences between the official code and timm, where this follows timm:
- the squeeze-and-excitation width: timm's make_divisible(D / 4, 8) (at least 8) against the
  official int(D / 4); the two agree for every width GC ViT uses (multiples of 32).
Own design (named here and in the README):
- Prefix tokens ([CLS], registers; GC ViT has none), cls_mode "global_row": a prefix token
  attends to every token with plain softmax and no bias; as the global queries, its query is its
  own feature vector split into heads (the layer has no query projection). cls_mode "none"
  refuses prefix tokens.
- A key bias or key mask from the context is added to the logits of that key in its window.
impl "reference" materialises each window's weights; "xla" runs jax.nn.dot_product_attention with
the windows as the batch.
"""
import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from vitjax.attention import registry
from vitjax.attention.base import Attention, additive_key_bias
from vitjax.attention.spatial import (PARTITIONED_CAPS, begin, bias_init, finish, fit_window,
                                      from_windows, padded, partitioned_attention,
                                      table_size, to_windows, window_bias)

SE_RATIO, SE_DIVISOR = 0.25, 8


def make_divisible(v: float, divisor: int = SE_DIVISOR) -> int:
  """timm's make_divisible with round_limit 0: v rounded to the nearest multiple of the divisor,
  at least the divisor."""
  return max(divisor, int(v + divisor / 2) // divisor * divisor)


def feature_levels(grid, window) -> int:
  """k with grid = window * 2^k on both axes (the max pools of the FeatExtract path); None when
  there is no such k."""
  ratios = [g / w for g, w in zip(grid, window)]
  k = math.log2(ratios[0]) if ratios[0] >= 1 else -1
  if ratios[0] != ratios[1] or k != int(k):
    return None
  return int(k)


def lecun_matrix(key, shape, dtype=jnp.float32):
  """LeCun normal conv kernels [kh, kw, in, out] drawn as the [kh * kw * in, out] matrix: the same
  distribution, and XLA:CPU compiles a rank-2 draw several times faster (as the models' stage
  module does; the attention package cannot import it)."""
  flat = (math.prod(shape[:-1]), shape[-1])
  return nn.initializers.lecun_normal()(key, flat, dtype).reshape(shape)


def conv(features: int, kernel: int, dtype, name: str, *, stride: int = 1, groups: int = 1,
         bias: bool = False) -> nn.Conv:
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=stride, padding=[(pad, pad)] * 2,
                 feature_group_count=groups, use_bias=bias, dtype=dtype, name=name,
                 kernel_init=lecun_matrix)


class MbConv(nn.Module):
  """timm's MbConvBlock (the official FeatExtract / ReduceSize conv): [B, h, w, C] -> the same,
  x + conv_pw(SE(GELU(conv_dw(x)))), no biases, no norm."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    h = nn.gelu(conv(c, 3, self.dtype, "conv_dw", groups=c)(x), approximate=False)
    h = SqueezeExcite(self.dtype, name="se")(h)
    return x + conv(c, 1, self.dtype, "conv_pw")(h)


class SqueezeExcite(nn.Module):
  """timm's SEModule as MbConvBlock configures it (the official SE): x * sigmoid(fc2(GELU(fc1(
  mean of x over the map)))), fc1 and fc2 1x1 convs without bias, fc1 to make_divisible(C / 4)."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    s = x.mean(axis=(1, 2), keepdims=True)
    s = nn.gelu(conv(make_divisible(c * SE_RATIO), 1, self.dtype, "fc1")(s), approximate=False)
    return x * nn.sigmoid(conv(c, 1, self.dtype, "fc2")(s)).astype(x.dtype)


def max_pool(x):
  """PyTorch's MaxPool2d(3, stride 2, padding 1): the padding never wins."""
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


class FeatureBlock(nn.Module):
  """GC ViT's global query generator (timm's FeatureBlock, the official GlobalQueryGen's
  FeatExtract blocks): `levels` times MbConv + max pool, or one MbConv when levels is 0;
  [B, h, w, C] -> [B, h / 2^levels, w / 2^levels, C]. Its MbConv blocks are conv1, conv2, ..."""
  levels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    for i in range(max(1, self.levels)):
      x = MbConv(self.dtype, name=f"conv{i + 1}")(x)
      if i < self.levels:
        x = max_pool(x)
    return x


def feature_macs(grid, levels: int, width: int) -> int:
  """The FeatureBlock's multiply-accumulates on a grid: per MbConv, the depthwise 3x3 and 1x1
  convs over the map and the two SE convs (pooling left out)."""
  total, (h, w) = 0, grid
  for i in range(max(1, levels)):
    total += h * w * (9 * width + width * width) + 2 * width * make_divisible(width * SE_RATIO)
    if i < levels:
      h, w = -(-h // 2), -(-w // 2)
  return total


def gcvit_macs(n, width, num_heads, *, window_size, num_prefix=1, derived=True, **_):
  """The key-value and output projections of the n tokens (3 n D^2), G K^T and P V of every
  padded patch over its window, the prefix rows over all n keys, and (derived=True: no global
  query in the context) the FeatureBlock on the padded grid (the grid is taken as square)."""
  del num_heads
  side = math.isqrt(n - num_prefix)
  window = fit_window((side, side), window_size, 0)[0]
  hp, wp = padded((side, side), window)
  total = 3 * n * width * width + 2 * hp * wp * window[0] * window[1] * width
  total += 2 * num_prefix * n * width
  if derived:
    total += feature_macs((hp, wp), feature_levels((hp, wp), window) or 0, width)
  return total


@registry.register(
    "gcvit_global", caps=PARTITIONED_CAPS,
    paper="Global Context Vision Transformers (Hatamizadeh et al. 2023)",
    official="https://github.com/NVlabs/GCVit",
    complexity="O(N ws^2 D)", impls=("reference", "xla"), macs=gcvit_macs,
    # the derived global queries' exact GELUs (erf), SE gates and max pools are elementwise work
    # as large as their convs at the test's widths (XLA counts 1.22-1.28x the MACs there)
    macs_tolerance=0.3)
class GlobalQueryAttention(Attention):
  """Window attention whose queries are the global query tokens (ctx.global_query, or derived
  from the layer's input when the context has none)."""
  window_size: int = 7          # an int or (wh, ww)
  cls_mode: str = "global_row"

  @nn.compact
  def __call__(self, x, ctx=None, *, need=(), deterministic=True):
    name = type(self).__name__
    if self.qk_norm:
      raise ValueError(f"error: {name} has no query projection to normalise (qk_norm=True); "
                       "use qk_norm=False")
    grid, npre = begin(self, x, ctx, need)
    window = fit_window(grid, self.window_size, 0)[0]
    b, n, width = x.shape
    d = self.head_dim(width)
    kv = nn.Dense(2 * width, use_bias=self.qkv_bias, dtype=self.dtype, name="qkv")(x)
    k, v = (t.reshape(b, n, self.num_heads, d) for t in jnp.split(kv, 2, axis=-1))
    queries = ctx.global_query
    if queries is None:
      queries = self.derive(x[:, npre:], grid, window)
    t = window[0] * window[1]
    if queries.shape != (b, t, width):
      raise ValueError(f"error: {name} got global queries of shape {tuple(queries.shape)}; "
                       f"expected {(b, t, width)} (one query per token of a {window} window)")
    q = self.tiled(queries.astype(k.dtype).reshape(b, t, self.num_heads, d), grid, window)
    q = jnp.concatenate([x[:, :npre].astype(k.dtype).reshape(b, npre, self.num_heads, d), q], 1)
    table = self.param("relative_position_bias_table", bias_init(),
                       (table_size(window), self.num_heads))
    bias = additive_key_bias(ctx, n)
    key_bias = None if bias is None else bias[:, 0, 0, npre:]
    drop = (lambda w: self.dropout_weights(w, deterministic)) if self.dropping(deterministic) \
        else None
    y = partitioned_attention(
        q[:, npre:], k[:, npre:], v[:, npre:], key_bias, grid,
        lambda a, fill: to_windows(a, window, (0, 0), fill),
        lambda a: from_windows(a, window, grid), window_bias(table.astype(jnp.float32), window),
        impl=self.impl, drop=drop)
    y, aux = finish(self, y, q, k, v, bias, ctx, need, deterministic)
    return self.project_out(y, width, deterministic), aux

  @staticmethod
  def tiled(queries, grid, window):
    """[B, T, H, d] window queries -> [B, h*w, H, d]: query i at position i of every window."""
    b = queries.shape[0]
    hp, wp = padded(grid, window)
    count = (hp // window[0]) * (wp // window[1])
    per_window = jnp.broadcast_to(queries[:, None], (b, count, *queries.shape[1:]))
    full = from_windows(per_window.reshape(b * count, *queries.shape[1:]), window, grid)
    return full.reshape(b, grid[0] * grid[1], *queries.shape[2:])

  def derive(self, patches, grid, window):
    """The global queries from the layer's own patch tokens [B, h*w, D] (see the module
    docstring): [B, T, D]."""
    b, _, width = patches.shape
    full = padded(grid, window)
    levels = feature_levels(full, window)
    if levels is None:
      raise ValueError(f"error: {type(self).__name__} derives its global queries from a "
                       f"{grid[0]}x{grid[1]} grid padded to {full[0]}x{full[1]}, which is not "
                       f"the {window[0]}x{window[1]} window times a power of 2 on both axes; "
                       "give ctx.global_query or a window that fits")
    img = patches.reshape(b, *grid, width)
    img = jnp.pad(img, [(0, 0), (0, full[0] - grid[0]), (0, full[1] - grid[1]), (0, 0)])
    out = FeatureBlock(levels, self.dtype, name="global_block")(img)
    return out.reshape(b, window[0] * window[1], width)

