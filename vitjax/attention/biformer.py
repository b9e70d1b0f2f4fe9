"""S7 `biformer`: bi-level routing attention (Zhu et al. 2023, "BiFormer: Vision Transformer with
Bi-Level Routing Attention"), following the official code (https://github.com/rayleizhu/BiFormer,
ops/bra_legacy.py: BiLevelRoutingAttention, TopkRouting, KVGather, QKVLinear; the defaults of
the released models in models/biformer.py: biformer_tiny / small / base).

The patch grid is cut into n_win x n_win regions of T = (h / n_win)(w / n_win) tokens each:
  q, k, v = split(x W_qkv)                     widths qk_dim, qk_dim, D (one Linear `qkv`)
  A = mean_region(q) mean_region(k)^T          region affinity [n_win^2, n_win^2], under
                                               stop-gradient (the official detach)
  I = top-k of each row of A                   the k routed regions of every region
  y_p = softmax(q_p K_I^T * qk_dim^-1/2) V_I   per head, for every query p of a region: its keys
                                               and values are the k T tokens of its routed regions
  out = W_o (y + LCE(v))                       LCE: a depthwise s x s conv (bias, padding s // 2)
                                               of v on the whole grid (`lepe`); `wo`: Linear
The scale is the official one, the full query-key width qk_dim^-1/2 (not the head width's); the
routing affinity's scale does not change its top-k. Routing is hard and not differentiable, as
in every released model (param_routing, diff_routing and soft_routing False): no gradient reaches
the routing, and the routing weights are not used.

Defaults: n_win 7, topk 4 (the module's default; the released models take 1, 4, 16 in stages 1-3),
side_dwconv 5, qk_dim = D (every released model), kv_downsample_mode "identity" (every released
model; the other modes are not provided). The released models' stage 4 (topk -2) is not this
layer with topk = n_win^2 but models/_common.py's AttentionLePE: head-width scale, no qkv bias,
and the conv applied to the layer input rather than to v.

Grid sizes: the official module asserts that n_win divides the grid unless `auto_pad`, which
zero-pads the layer input at the bottom and right to multiples of n_win before the projection;
the padded tokens are then projected (their q, k, v are the projection's biases), enter the
region means, are attended and convolved like any other, and their outputs are cut off. Here
auto_pad defaults to True, so any grid works (the 4x4 grid of a tiny ViT becomes 7x7 regions of
one token each); where n_win divides the grid (every stage of the released models at 224 px, a
/16 ViT's 14x14 grid) nothing is padded and the layer computes what the official default
(auto_pad False) computes. auto_pad=False refuses such grids, as the official assert.

Deviations (own design, also in the README):
- Static shapes: topk is a Python int, the routed indices come from jax.lax.top_k (a tie at the
  k-th place goes to the lower region index; torch.topk leaves the choice among ties open).
- Prefix tokens ([CLS], registers; BiFormer has none), cls_mode "global_row": a prefix query
  attends to every token (prefix and patches, not padding) with the same qk_dim^-1/2 scale and
  gets no LCE; patch queries do not see the prefix. That row is exact, so `cls_probs` is too.
  cls_mode "none" refuses prefix tokens.
- A key bias or key mask from the context is refused (the routing averages the keys of a
  region), as is qk_norm (BiFormer normalises neither queries nor keys). `attn_drop` and
  `proj_drop` act as in every other mechanism (the official module has neither; 0 by default).
impl "reference" materialises each region's weights; "xla" runs jax.nn.dot_product_attention with
the regions as the batch (it needs qk_dim = D).
"""
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitjax.attention import registry
from vitjax.attention.base import Attention, Capabilities
from vitjax.attention.spatial import begin, finish, from_windows, to_windows

# The [CLS] row is exact (prefix rows attend globally); keys, sizes, the full matrix: none.
CAPS = Capabilities(cls_probs="exact", key_metric=False, size_semantics=False, key_bias=False,
                    needs_grid=True, full_attn=False)


def padded_grid(grid, n_win: int, auto_pad: bool) -> tuple:
  """The grid the regions cut: padded to multiples of n_win (auto_pad), else the grid itself."""
  if not auto_pad:
    return tuple(grid)
  return tuple(-(-g // n_win) * n_win for g in grid)


def biformer_macs(n, width, num_heads, *, n_win, topk, side_dwconv, qk_dim=None, auto_pad=True,
                  num_prefix=1, **_):
  """The qkv projection of the prefix and the padded patches, the output projection of the n
  tokens, the region affinity, Q K^T and P V of every padded patch over its k T routed keys, the
  LCE's depthwise conv and the prefix rows over all n tokens (the grid is taken as square)."""
  del num_heads
  side = math.isqrt(n - num_prefix)
  hp, wp = padded_grid((side, side), n_win, auto_pad)
  qk = width if qk_dim is None else qk_dim
  patches = hp * wp
  region = patches // n_win ** 2
  return ((num_prefix + patches) * width * (2 * qk + width) + n * width * width
          + n_win ** 4 * qk + patches * topk * region * (qk + width)
          + patches * width * side_dwconv ** 2 + num_prefix * n * (qk + width))


@registry.register(
    "biformer", caps=CAPS,
    paper="BiFormer: Vision Transformer with Bi-Level Routing Attention (Zhu et al. 2023)",
    official="https://github.com/rayleizhu/BiFormer",
    complexity="O(N k N/S^2 D) + S^4 D routing + s^2 N D (LCE)", impls=("reference", "xla"),
    macs=biformer_macs)
class BiLevelRoutingAttention(Attention):
  """Softmax attention of each region's queries over the tokens of its top-k regions (routed by
  region-mean affinity), plus a depthwise conv of the values (LCE)."""
  n_win: int = 7                  # regions per side
  topk: int = 4                   # routed regions per region
  side_dwconv: int = 5            # LCE kernel; 0: no LCE
  qk_dim: Optional[int] = None    # query-key width; None: the layer width
  auto_pad: bool = True           # pad the grid to multiples of n_win (official default False)
  cls_mode: str = "global_row"

  @nn.compact
  def __call__(self, x, ctx=None, *, need=(), deterministic=True):
    grid, npre = begin(self, x, ctx, need)
    b, n, width = x.shape
    qk = self.check(ctx, grid, width)
    h, dq, dv = self.num_heads, qk // self.num_heads, width // self.num_heads
    full = padded_grid(grid, self.n_win, self.auto_pad)
    img = x[:, npre:].reshape(b, *grid, width)
    img = jnp.pad(img, [(0, 0), (0, full[0] - grid[0]), (0, full[1] - grid[1]), (0, 0)])
    t = jnp.concatenate([x[:, :npre], img.reshape(b, -1, width)], axis=1)
    qkv = nn.Dense(2 * qk + width, use_bias=self.qkv_bias, dtype=self.dtype, name="qkv")(t)
    # the official scale qk_dim^-1/2 = (qk_dim / H)^-1/2 H^-1/2: q takes H^-1/2, the cores the rest
    q, k, v = jnp.split(qkv, [qk, 2 * qk], axis=-1)
    q = q * jnp.asarray(h ** -0.5, q.dtype)
    on_grid = lambda a: a[:, npre:].reshape(b, *full, a.shape[-1])  # noqa: E731
    y = self.routed(on_grid(q), on_grid(k), on_grid(v), deterministic)      # [B, hp, wp, D]
    if self.side_dwconv:
      y = y + nn.Conv(width, (self.side_dwconv,) * 2, padding=self.side_dwconv // 2,
                      feature_group_count=width, dtype=self.dtype, name="lepe")(on_grid(v))
    y = y[:, :grid[0], :grid[1]].reshape(b, -1, h, dv)
    real = lambda a, d: jnp.concatenate(  # noqa: E731
        [a[:, :npre], on_grid(a)[:, :grid[0], :grid[1]].reshape(b, -1, a.shape[-1])],
        axis=1).reshape(b, n, h, d)
    y, aux = finish(self, y, real(q, dq), real(k, dq), real(v, dv), None, ctx, need,
                    deterministic)
    y = nn.Dense(width, dtype=self.dtype, name="wo")(y.reshape(b, n, width))
    return nn.Dropout(self.proj_drop)(y, deterministic=deterministic), aux

  def routed(self, q, k, v, deterministic):
    """q, k [B, hp, wp, qk_dim] (q scaled by H^-1/2), v [B, hp, wp, D] -> [B, hp, wp, D]: every
    region's queries over the keys and values of its top-k regions."""
    b, hp, wp = q.shape[:3]
    region = (hp // self.n_win, wp // self.n_win)
    cut = lambda a: to_windows(a, region).reshape(b, self.n_win ** 2, -1, a.shape[-1])  # noqa
    qr, kr, vr = cut(q), cut(k), cut(v)                           # [B, R, T, C]
    affinity = jnp.einsum("brc,bsc->brs", qr.mean(axis=2), kr.mean(axis=2),
                          preferred_element_type=jnp.float32)
    _, idx = jax.lax.top_k(jax.lax.stop_gradient(affinity), self.topk)   # [B, R, k]
    self.sow("intermediates", "routing", idx)
    gather = jax.vmap(lambda a, i: a[i])      # per image: [R, T, C], [R, k] -> [R, k, T, C]
    heads = lambda a: a.reshape(b * self.n_win ** 2, -1, self.num_heads,  # noqa: E731
                                a.shape[-1] // self.num_heads)
    qh, kh, vh = heads(qr), heads(gather(kr, idx)), heads(gather(vr, idx))
    y = self.attend_regions(qh, kh, vh, deterministic)            # [B R, T, H, dv]
    return from_windows(y.reshape(b * self.n_win ** 2, region[0] * region[1], -1), region,
                        (hp, wp))

  def attend_regions(self, q, k, v, deterministic):
    """Softmax attention with the regions as the batch: q [BR, T, H, d], k and v [BR, kT, H, .]."""
    if self.impl == "xla" and not self.dropping(deterministic):
      return jax.nn.dot_product_attention(q, k, v, implementation="xla")
    logits = jnp.einsum("bnhd,bmhd->bhnm", q, k, preferred_element_type=jnp.float32)
    w = jax.nn.softmax(logits * q.shape[-1] ** -0.5, axis=-1)
    w = self.dropout_weights(w, deterministic).astype(v.dtype)
    return jnp.einsum("bhnm,bmhd->bnhd", w, v)

  def check(self, ctx, grid, width) -> int:
    """One-line errors for options and inputs the layer cannot take; returns qk_dim."""
    qk = width if self.qk_dim is None else self.qk_dim
    if ctx.key_bias is not None or ctx.valid is not None:
      raise ValueError("error: biformer takes no key bias or mask (its routing averages the keys "
                       "of a region); use it before any token reduction")
    if self.qk_norm:
      raise ValueError("error: biformer has no qk_norm (BiFormer normalises neither queries nor "
                       "keys); use qk_norm=False")
    if qk % self.num_heads or width % self.num_heads:
      raise ValueError(f"error: biformer qk_dim {qk} and width {width} must both divide by "
                       f"num_heads {self.num_heads}")
    if self.impl == "xla" and qk != width:
      raise ValueError(f"error: biformer impl 'xla' needs qk_dim equal to the width {width}, got "
                       f"{qk}; use impl='reference'")
    if self.n_win < 1 or not 1 <= self.topk <= self.n_win ** 2:
      raise ValueError(f"error: biformer n_win={self.n_win}, topk={self.topk}; n_win is >= 1 "
                       f"and topk in [1, n_win^2]")
    if self.side_dwconv < 0 or (self.side_dwconv and self.side_dwconv % 2 == 0):
      raise ValueError(f"error: biformer side_dwconv={self.side_dwconv}; the LCE kernel is odd "
                       "(padding k // 2 keeps the grid) or 0 (no LCE)")
    if not self.auto_pad and (grid[0] % self.n_win or grid[1] % self.n_win):
      raise ValueError(f"error: biformer n_win {self.n_win} does not divide the "
                       f"{grid[0]}x{grid[1]} grid; use auto_pad=True or an n_win that divides it")
    return qk
