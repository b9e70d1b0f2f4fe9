"""G16 `sra` and `sra_tokenset`: spatial-reduction attention (PVT, Wang et al. 2021; PVTv2 2022;
official code: https://github.com/whai362/PVT).

Queries are all N tokens; keys and values come from a reduced token set:
  `sra` (PVT): x_r = LN(Conv_{RxR, stride R}(patch grid)), skipped when R = 1; with `linear=True`
      the PVTv2 linear SRA x_r = GELU(LN(Conv_1x1(AdaptiveAvgPool_{P x P}(grid)))).
  `sra_tokenset` (the spec's grid-free variant, own design): x_r = LN(softmax_j(W LN(x_j) + b_j)^T x),
      M = ceil(n/R^2) learned pooling queries over the n non-prefix tokens (PatchMerger form). Sizes
      and masks enter the pooling softmax (b_j = log s_j / -inf), so a token of size s pools like s
      copies and a masked token is gone.
  y = W_o concat_h softmax(q_h k_rh^T / sqrt(d)) v_rh,  [k_r, v_r] = W_kv [prefix tokens; x_r].
Layout as in PVT: separate `q` (D->D) and `kv` (D->2D) projections. PVT's SRA stages have no [CLS];
here the prefix tokens (CLS, registers) stay unpooled extra keys (own design; PVTv1's last stage,
the one with a CLS, has R = 1 so its CLS is an ordinary key there too).
The layer's own [CLS] row is over pooled keys, not tokens: `cls_probs` is `recompute` (R1) against
the full-token keys W_k x (an extra N*D*d), a distribution the layer did not use; `key_metric` is the
head-mean of W_k x. The [N, M] weights are not [N, N]: no `attn`.
`twins_gsa` is Twins-SVT's global sub-sampled attention (Chu et al. 2021, "Twins: Revisiting the
Design of Spatial Attention in Vision Transformers"; https://github.com/Meituan-AutoML/Twins,
GlobalSubSampleAttn in timm's twins.py): the same layers and computation as `sra` (R x R conv of
stride R + LayerNorm, `q`, `kv`, `proj`), under its own paper's name; Twins-SVT alternates it with
`twins_lsa` (R 8/4/2/1 per stage).
LayerNorm eps 1e-5 after the reduction (PyTorch default, as PVT). Defaults: R = 2 (the PVT stage at
1/16 resolution, i.e. a 14x14 ViT grid; PVT uses 8/4/2/1 per stage), P = 7 for the linear form.
"""
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitjax.attention import registry
from vitjax.attention.base import (Attention, AttnContext, Capabilities, adaptive_pool_matrix,
                                   additive_key_bias, collect_aux, cls_position, query_row,
                                   softmax_weights)


class SpatialReduction(Attention):
  """Shared body: attention of all queries over [prefix tokens; reduced tokens]."""
  sr_ratio: int = 2

  def reduce(self, patches, ctx, bias):
    """patches [B,n,D] -> reduced tokens [B,M,D]."""
    raise NotImplementedError

  @nn.compact
  def __call__(self, x, ctx: Optional[AttnContext] = None, *, need=(), deterministic=True):
    ctx = AttnContext() if ctx is None else ctx
    b, n, width = x.shape
    d, h, npre = self.head_dim(width), self.num_heads, ctx.num_prefix
    bias = additive_key_bias(ctx, n)
    reduced = self.reduce(x[:, npre:], ctx, None if bias is None else bias[:, 0, 0, npre:])
    dense = lambda f, name: nn.Dense(f, use_bias=self.qkv_bias, dtype=self.dtype, name=name)
    q_norm = nn.LayerNorm(dtype=self.dtype, name="q_norm") if self.qk_norm else (lambda t: t)
    k_norm = nn.LayerNorm(dtype=self.dtype, name="k_norm") if self.qk_norm else (lambda t: t)
    kv_dense = dense(2 * width, "kv")
    q = q_norm(dense(width, "q")(x).reshape(b, n, h, d))
    keys = jnp.concatenate([x[:, :npre], reduced.astype(x.dtype)], axis=1)
    k, v = jnp.split(kv_dense(keys).reshape(b, keys.shape[1], 2, h, d), 2, axis=2)
    k, v = k_norm(k[:, :, 0]), v[:, :, 0]
    key_bias = None
    if bias is not None:  # prefix keys keep their bias; pooled keys already used theirs
      key_bias = jnp.pad(bias[..., :npre], ((0, 0), (0, 0), (0, 0), (0, reduced.shape[1])))
    y, _ = self.attend(q, k, v, key_bias, ctx, need=(), deterministic=deterministic,
                       weights=softmax_weights)
    aux = {}
    if need:  # R1 recompute: the [CLS] softmax row over the full-token keys W_k x
      k_full = k_norm(jnp.split(kv_dense(x), 2, axis=-1)[0].reshape(b, n, h, d))
      aux = collect_aux(need, k=k_full, ctx=ctx, row_fn=lambda: query_row(
          softmax_weights, q, k_full, bias, cls_position(ctx)))
    return self.project_out(y, width, deterministic), aux


def reduced_macs(n: int, width: int, keys: int) -> int:
  """q and output projections on n tokens, kv on the keys, Q K^T and P V over the keys."""
  return 2 * n * width * width + 2 * keys * width * width + 2 * n * keys * width


def sra_macs(n, width, num_heads, *, sr_ratio, linear, pool_size, num_prefix=1, **_):
  """+ the R x R stride-R conv (n D^2 over the patches), or PVTv2's pooling and 1 x 1 conv."""
  del num_heads
  patches = n - num_prefix
  if linear:  # pooled along rows, then columns, of a square grid
    pooled = pool_size ** 2
    reduce = (pool_size * patches + pooled * math.isqrt(patches)) * width + pooled * width * width
  else:
    pooled = patches // sr_ratio ** 2
    reduce = patches * width * width if sr_ratio > 1 else 0
  return reduced_macs(n, width, num_prefix + pooled) + reduce


def tokenset_macs(n, width, num_heads, *, sr_ratio, num_pooled, num_prefix=1, **_):
  """+ the pooling logits and the pooled sum, n M D each."""
  del num_heads
  patches = n - num_prefix
  pooled = num_pooled or max(1, math.ceil(patches / sr_ratio ** 2))
  return reduced_macs(n, width, num_prefix + pooled) + 2 * patches * width * pooled


# pooled grid cells as keys: no size semantics, no key bias, no [N, N] weights
SRA_CAPS = Capabilities(cls_probs="recompute", size_semantics=False, key_bias=False,
                        needs_grid=True, full_attn=False)


@registry.register("sra", caps=SRA_CAPS,
                   paper="PVT spatial-reduction attention (Wang et al. 2021; PVTv2 2022)",
                   official="https://github.com/whai362/PVT",
                   complexity="O(N N/R^2 D) + N D^2 (conv)", macs=sra_macs)
class SRA(SpatialReduction):
  """PVT SRA over the raster grid of patch tokens (strided conv, or PVTv2's pooled linear form)."""
  linear: bool = False
  pool_size: int = 7

  def reduce(self, patches, ctx, bias):
    if ctx.grid is None:
      raise ValueError("sra needs the token grid (ctx.grid); use sra_tokenset after a token "
                       "reduction or without a grid")
    if bias is not None:
      raise ValueError("sra cannot take a key bias or key mask: its keys are pooled grid cells")
    gh, gw = ctx.grid
    b, n, width = patches.shape
    if n != gh * gw:
      raise ValueError(f"sra got {n} non-prefix tokens for a {gh}x{gw} grid")
    grid = patches.reshape(b, gh, gw, width)
    if self.linear:
      pool_h = adaptive_pool_matrix(gh, self.pool_size)
      pool_w = adaptive_pool_matrix(gw, self.pool_size)
      grid = jnp.einsum("ph,qw,bhwc->bpqc", pool_h, pool_w, grid)
      grid = nn.Conv(width, (1, 1), dtype=self.dtype, name="sr")(grid)
      out = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="norm")(grid.reshape(b, -1, width))
      return nn.gelu(out, approximate=False)
    r = self.sr_ratio
    if r == 1:
      return patches
    if gh % r or gw % r:
      raise ValueError(f"sra_ratio {r} does not divide the {gh}x{gw} grid")
    conv = nn.Conv(width, (r, r), strides=(r, r), padding="VALID", dtype=self.dtype, name="sr")
    grid = conv(grid)
    return nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="norm")(grid.reshape(b, -1, width))


@registry.register(
    "twins_gsa", like="sra",
    paper="Twins: Revisiting the Design of Spatial Attention in Vision Transformers (Chu et al. 2021)",
    official="https://github.com/Meituan-AutoML/Twins")
class TwinsGSA(SRA):
  """Twins' global sub-sampled attention (GSA): PVT's SRA with its strided-conv reduction."""


@registry.register(
    "sra_tokenset", caps=Capabilities(cls_probs="recompute", full_attn=False),
    paper="PVT spatial-reduction attention, grid-free pooling (own design; PatchMerger pooling)",
    complexity="O(N M D) + O(M N D) pooling", macs=tokenset_macs)
class SRATokenSet(SpatialReduction):
  """SRA whose keys come from M learned softmax pools over the token set (no grid needed)."""
  num_pooled: Optional[int] = None  # M; default ceil(n / R^2)

  def reduce(self, patches, ctx, bias):
    b, n, width = patches.shape
    m = self.num_pooled or max(1, math.ceil(n / self.sr_ratio ** 2))
    normed = nn.LayerNorm(dtype=self.dtype, name="pool_norm")(patches)
    logits = nn.Dense(m, use_bias=False, dtype=self.dtype, name="pool")(normed).astype(jnp.float32)
    if bias is not None:
      logits = logits + bias[:, :, None]
    weights = jax.nn.softmax(logits, axis=1)  # over tokens
    pooled = jnp.einsum("bnm,bnc->bmc", weights, patches.astype(jnp.float32))
    return nn.LayerNorm(dtype=self.dtype, name="norm")(pooled.astype(patches.dtype))
