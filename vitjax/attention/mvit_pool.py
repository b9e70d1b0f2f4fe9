"""S16 `mvit_pool`: MViTv2's pooling attention (Li et al. 2022, "MViTv2: Improved Multiscale
Vision Transformers for Classification and Detection"), following the official code
(https://github.com/facebookresearch/mvit, mvit/models/attention.py: MultiScaleAttention,
attention_pool, cal_rel_pos_spatial) and timm's timm/models/mvitv2.py (MultiScaleAttention,
mode "conv", pool_first=False), the PyTorch reference for parity.

  q, k, v = split(x W_qkv)                       per head [N, d], d = dim_out / H
  q = LN(P_q(q)), k = LN(P_k(k)), v = LN(P_v(v))   P: depthwise k x k conv (padding k // 2, no
                                                  bias), stride s_q for q and s_kv for k and v,
                                                  one d-channel kernel shared by every head
  S = q k^T / sqrt(d) + q . R_h[i_h, j_h] + q . R_w[i_w, j_w]     (decomposed rel-pos bias)
  y = (softmax(S) v + q) W_proj                   (residual pooling: + the pooled query)

Pooling acts on the patch grid; prefix tokens ([CLS]) are taken out before it and put back in
front before the LayerNorm (`attention_pool`), so they are normed but not pooled. The query is
pooled too: with s_q > 1 the layer returns prefix + h' w' tokens of width dim_out
(h' = floor((h - 1) / s_q) + 1 for k = 3), not N; the backbone's first block of a stage does
that. With kernel 1 and stride 1 a pooling (and its LayerNorm) is skipped, as both codes do.

Relative positions (cal_rel_pos_spatial): the offset of query row i and key row j on a common
scale is i max(k_h / q_h, 1) - j max(q_h / k_h, 1) + (k_h - 1) max(q_h / k_h, 1), computed in
float32 and truncated as the official code; R_h (and R_w the same along the width) are learned
[2 max(q_h, k_h) - 1, d] tables shared by the heads; the bias is q . R of the (pooled, normed,
unscaled) query, added to the patch-patch logits only (prefix rows and columns get none).

Defaults: kernel 3, s_q = 1, s_kv = 1 (MViTv2's stage 3, the 1/16-resolution stage where the
grid of a /16 ViT sits: with these, the layer maps (B, N, D) -> (B, N, D) and is a drop-in
mechanism); the MViTv2 backbone (`vitjax.models.mvitv2`) sets s_q = 2 in each stage's first
block and s_kv by MViTv2's adaptive rule (4 at stride 4, divided by each query pooling).

Where the two codes differ, timm is followed (parity), named here:
- Residual pooling with a [CLS] token: timm adds the pooled query to every row, the [CLS] row
  included; the official code adds it to the patch rows only.
Deviations (own design, also in the README):
- Table lengths come from the pooled sizes of each axis, 2 max(q_h, k_h) - 1 (and w); both codes
  take 2 max(size // s_q, size // s_kv) - 1 of a square grid. The two agree wherever the codes'
  indices stay inside their table (every even grid, so every MViTv2 stage at 224 px); a
  non-square grid is refused by both codes and works here.
- A context key bias or mask is refused (the keys are pooled), as is qk_norm (the pooling's
  LayerNorms normalise q and k already). The layer gives no [CLS] row, keys or weights.
"""
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitjax.attention import registry
from vitjax.attention.base import (Attention, AttnContext, Capabilities, scores,
                                   weighted_values)
from vitjax.attention.spatial import bias_init, pair, patch_grid

NORM_EPSILON = 1e-6  # MViTv2's LayerNorm (both codes pass eps 1e-6 to the pooling norms)


def pooled_size(size: int, kernel: int, stride: int) -> int:
  """One axis after a pooling with padding kernel // 2 (PyTorch's floor rule)."""
  return (size + 2 * (kernel // 2) - kernel) // stride + 1


def pools(kernel, stride) -> bool:
  """Both codes skip a pooling (and its norm) whose kernel and stride are 1."""
  return math.prod(pair(kernel)) > 1 or math.prod(pair(stride)) > 1


def pooled_grid(grid, kernel, stride) -> tuple:
  if not pools(kernel, stride):
    return tuple(grid)
  return tuple(pooled_size(g, k, s) for g, k, s in zip(grid, pair(kernel), pair(stride)))


def rel_pos_index(q_size: int, k_size: int) -> np.ndarray:
  """[q, k] table index of every (query, key) pair along one axis (cal_rel_pos_spatial: offsets
  on the scale of the finer grid, float32 products truncated)."""
  q_ratio = np.float32(max(k_size / q_size, 1.0))
  k_ratio = max(q_size / k_size, 1.0)
  dist = (np.arange(q_size, dtype=np.float32)[:, None] * q_ratio
          - np.arange(k_size, dtype=np.float32)[None, :] * np.float32(k_ratio))
  return (dist + np.float32((k_size - 1) * k_ratio)).astype(np.int32)


def table_length(q_size: int, k_size: int) -> int:
  return 2 * max(q_size, k_size) - 1


def mvit_pool_macs(n, width, num_heads, *, q_stride, kv_stride, kernel_size, rel_pos,
                   dim_out=None, num_prefix=1, **_):
  """qkv projection, the three depthwise poolings, Q K^T and P V over the pooled tokens, the
  rel-pos products q . R and the output projection (the grid taken as square)."""
  del num_heads
  out = dim_out or width
  side = math.isqrt(n - num_prefix)
  kernel = pair(kernel_size)
  qg, kg = (pooled_grid((side, side), kernel, s) for s in (q_stride, kv_stride))
  nq, nk = num_prefix + qg[0] * qg[1], num_prefix + kg[0] * kg[1]
  conv = lambda g, s: g[0] * g[1] * kernel[0] * kernel[1] * out if pools(kernel, s) else 0  # noqa
  total = 3 * n * width * out + conv(qg, q_stride) + 2 * conv(kg, kv_stride)
  total += 2 * nq * nk * out + nq * out * out
  if rel_pos:
    total += qg[0] * qg[1] * (kg[0] + kg[1]) * out
  return total


@registry.register(
    "mvit_pool", caps=Capabilities(cls_probs="none", key_metric=False, size_semantics=False,
                                   key_bias=False, needs_grid=True, full_attn=False),
    paper="MViTv2: Improved Multiscale Vision Transformers for Classification and Detection "
          "(Li et al. 2022)",
    official="https://github.com/facebookresearch/mvit",
    complexity="O(N/s_q^2 N/s_kv^2 D + N k^2 D)", macs=mvit_pool_macs)
class MViTPoolAttention(Attention):
  """Pooling attention: conv-pooled, normed q / k / v, decomposed rel-pos bias, + pooled q."""
  q_stride: int = 1           # an int or (sh, sw)
  kv_stride: int = 1          # an int or (sh, sw)
  kernel_size: int = 3        # an int or (kh, kw); the same for q, k and v (kernel_qkv)
  rel_pos: bool = True        # rel_pos_type "spatial"
  residual_pooling: bool = True
  dim_out: Optional[int] = None  # output (and q, k, v) width; None: the input's
  norm_epsilon: float = NORM_EPSILON

  @nn.compact
  def __call__(self, x, ctx: Optional[AttnContext] = None, *, need=(), deterministic=True):
    self.check(ctx, need)
    b, n, _ = x.shape
    grid, npre = patch_grid(ctx, n, "mvit_pool")
    out = self.dim_out or x.shape[-1]
    if out % self.num_heads:
      raise ValueError(f"error: mvit_pool width {out} is not divisible by num_heads "
                       f"{self.num_heads}; use heads dividing dim_out")
    d = out // self.num_heads
    qkv = nn.Dense(3 * out, use_bias=self.qkv_bias, dtype=self.dtype, name="qkv")(x)
    q, k, v = (t.reshape(b, n, self.num_heads, d) for t in jnp.split(qkv, 3, axis=-1))
    q, q_grid = self.pool("q", q, grid, npre, self.q_stride)
    k, k_grid = self.pool("k", k, grid, npre, self.kv_stride)
    v, _ = self.pool("v", v, grid, npre, self.kv_stride)
    logits = scores(q, k)
    if self.rel_pos:
      logits = logits + self.rel_pos_bias(q[:, npre:], q_grid, k_grid, npre)
    w = self.dropout_weights(jax.nn.softmax(logits, axis=-1), deterministic)
    y = weighted_values(w.astype(v.dtype), v)
    if self.residual_pooling:
      y = y + q
    y = nn.Dense(out, dtype=self.dtype, name="proj")(y.reshape(b, -1, out))
    return nn.Dropout(self.proj_drop)(y, deterministic=deterministic), {}

  def check(self, ctx, need):
    if need:
      raise ValueError(f"error: mvit_pool gives none of {sorted(need)}; its keys are pooled, so "
                       "it has no [CLS] row, keys or weights over the tokens")
    if ctx is not None and (ctx.key_bias is not None or ctx.valid is not None):
      raise ValueError("error: mvit_pool takes no key bias or mask (its keys are pooled); use it "
                       "before any token reduction")
    if self.qk_norm:
      raise ValueError("error: mvit_pool has no qk_norm (its pooling LayerNorms normalise q and "
                       "k); use qk_norm=False")
    if min(pair(self.kernel_size)) < 1 or min(pair(self.q_stride)) < 1 \
        or min(pair(self.kv_stride)) < 1:
      raise ValueError(f"error: mvit_pool kernel_size={self.kernel_size}, q_stride="
                       f"{self.q_stride}, kv_stride={self.kv_stride}; each is an int >= 1")

  def pool(self, which: str, t, grid, npre: int, stride):
    """t [B, prefix + h*w, H, d] -> (the pooled and normed tokens, their grid)."""
    if not pools(self.kernel_size, stride):
      return t, tuple(grid)
    b, _, heads, d = t.shape
    kernel = pair(self.kernel_size)
    # heads into the batch: one d-channel depthwise kernel serves every head (mode "conv")
    g = t[:, npre:].reshape(b, *grid, heads, d).transpose(0, 3, 1, 2, 4)
    conv = nn.Conv(d, kernel, strides=pair(stride), padding=[(kk // 2, kk // 2) for kk in kernel],
                   feature_group_count=d, use_bias=False, dtype=self.dtype, name=f"pool_{which}")
    g = conv(g.reshape(b * heads, *grid, d))
    new = g.shape[1:3]
    g = g.reshape(b, heads, new[0] * new[1], d).transpose(0, 2, 1, 3)
    t = jnp.concatenate([t[:, :npre].astype(g.dtype), g], axis=1)
    norm = nn.LayerNorm(epsilon=self.norm_epsilon, dtype=self.dtype, name=f"norm_{which}")
    return norm(t), tuple(new)

  def rel_pos_bias(self, q, q_grid, k_grid, npre: int):
    """q [B, qh*qw, H, d] patch queries -> the [B, H, prefix + qh qw, prefix + kh kw] float32
    bias q . R_h + q . R_w (zero in the prefix rows and columns)."""
    b, _, heads, d = q.shape
    tables = []
    for axis, name in enumerate(("rel_pos_h", "rel_pos_w")):
      qs, ks = q_grid[axis], k_grid[axis]
      table = self.param(name, bias_init(), (table_length(qs, ks), d))
      idx = jnp.asarray(rel_pos_index(qs, ks).reshape(-1))
      tables.append(jnp.take(table.astype(jnp.float32), idx, axis=0).reshape(qs, ks, d))
    rq = q.astype(jnp.float32).reshape(b, *q_grid, heads, d)
    bias_h = jnp.einsum("byxhc,ykc->bhyxk", rq, tables[0])
    bias_w = jnp.einsum("byxhc,xkc->bhyxk", rq, tables[1])
    bias = (bias_h[..., :, None] + bias_w[..., None, :]).reshape(
        b, heads, q_grid[0] * q_grid[1], k_grid[0] * k_grid[1])
    return jnp.pad(bias, ((0, 0), (0, 0), (npre, 0), (npre, 0)))
