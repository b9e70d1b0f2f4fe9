"""MViTv2 (Li et al. 2022, "MViTv2: Improved Multiscale Vision Transformers for Classification and
Detection"): a conv patch embedding, four stages of pooling-attention blocks at halving
resolution, a final norm, average pooling and the head.

Follows timm's `timm/models/mvitv2.py` (huggingface/pytorch-image-models: MultiScaleVit,
MultiScaleVitStage, MultiScaleBlock, MultiScaleAttention) and the official
facebookresearch/mvit (mvit/models/mvit_model.py, mvit/models/attention.py):
  patch embed  7x7 stride-4 convolution, padding 3, with bias (no norm);
  stage s      depth_s blocks of width embed_dims[s] with num_heads[s] heads, every one
               pre-norm with `mvit_pool` attention (conv-pooled and normed q, k, v with kernel
               3, the decomposed relative position bias, residual pooling):
                 x = shortcut(x) + attn(norm1(x)); x = x + mlp(norm2(x));
               the stage's first block (s > 0) pools its query with stride 2 and widens the
               attention to the stage's width (timm's expand_attn=True, the official
               DIM_MUL_IN_ATT=True of the T/S/B configs: the width grows in the attention of a
               stage's first block, not in the MLP of the previous stage's last block): its
               shortcut is `shortcut_proj_attn` (a Linear of the *normed* input, as both codes)
               followed by a max pool (kernel 3, stride 2, padding 1); the keys and values of
               every block are pooled with MViTv2's adaptive stride (4 in stage 0, divided by
               each query pooling: 4, 2, 1, 1);
  head         LayerNorm, the mean over the tokens, (dropout,) Linear (timm's global_pool
               "avg"; the official head adds a softmax in evaluation, timm and this give logits).
The blocks after a stage's first are the encoder stage's (`vitjax.models.stage.Block`); the
first block of a stage that pools or widens is `PoolingBlock` (named `pool_block_{s}`).
LayerNorm epsilon is 1e-6 everywhere, qkv projections have biases, and stochastic depth rises
linearly over all blocks (timm's stagewise rates are the same numbers). mvitv2_tiny in timm has
no [CLS] token (use_cls_token=False, as T, S and B here; timm's *_cls variants are not built).

Variants ("T", "S", "B"): timm's mvitv2_{tiny,small,base}; parameter counts equal timm's (T
24,173,320; S 34,870,216; B 51,472,744 with 1000 classes).

Deviations (own design, also in the README):
- Initialisation: flax defaults (LeCun normal kernels, zero biases), N(0, 0.02) rel-pos tables
  and a zero-initialised head, as vitjax's other backbones; timm draws every Linear from a
  truncated normal (std 0.02).
- `dropout` is timm's drop_rate: dropout before the head only.
- Relative position tables take their lengths from the pooled sizes of each axis (see
  `vitjax.attention.mvit_pool`): the same as timm's at every even grid (all of 224 px); timm
  asserts a square grid, a non-square image works here.
- No token reduction and no scanned blocks: the token count changes within a stage and the
  poolings need the full grid; both are refused when the model is built.
"""
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from vitjax import attention as attn_lib
from vitjax.attention import mvit_pool
from vitjax.models.stage import (Mlp, Stage, WithoutTokenReduction, drawn_as_matrix, drop_path,
                                 drop_path_rates)

# name: (embed_dims, depths, num_heads)
VARIANTS = {
    "T": ((96, 192, 384, 768), (1, 2, 5, 2), (1, 2, 4, 8)),
    "S": ((96, 192, 384, 768), (1, 2, 11, 2), (1, 2, 4, 8)),
    "B": ((96, 192, 384, 768), (2, 3, 16, 3), (1, 2, 4, 8)),
}
NORM_EPSILON = 1e-6  # timm's MultiScaleVitCfg.norm_eps
PATCH_KERNEL, PATCH_STRIDE = 7, 4
KERNEL_QKV = 3
KV_STRIDE_ADAPTIVE = 4  # stride_kv_adaptive at stage 0


def decode_variant(variant: str) -> dict:
  """"T" -> dict(embed_dims=(96, 192, 384, 768), depths=(1, 2, 5, 2), num_heads=(1, 2, 4, 8))."""
  if variant not in VARIANTS:
    raise ValueError(f"unknown MViTv2 variant {variant!r}; valid: {', '.join(VARIANTS)}")
  dims, depths, heads = VARIANTS[variant]
  return dict(embed_dims=dims, depths=depths, num_heads=heads)


def kv_strides(q_strides: Sequence[int], first: int = KV_STRIDE_ADAPTIVE) -> tuple:
  """MViTv2's adaptive key/value stride per stage: `first`, divided (floor, at least 1) by each
  stage's query stride from the stage that pools on (timm's stride_kv_adaptive rule)."""
  out, stride = [], first
  for q in q_strides:
    if q > 1:
      stride = max(stride // q, 1)
    out.append(stride)
  return tuple(out)


def pooled_tokens(x, grid, stride: int, num_prefix: int):
  """The shortcut of a query-pooled block: [B, prefix + h*w, C] -> max pool with kernel
  stride + 1, padding (stride + 1) // 2 (timm's shortcut_pool_attn); prefix tokens pass."""
  b, _, c = x.shape
  kernel = stride + 1
  pad = kernel // 2
  g = x[:, num_prefix:].reshape(b, *grid, c)
  g = nn.max_pool(g, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)))
  return jnp.concatenate([x[:, :num_prefix], g.reshape(b, -1, c)], axis=1)


class PoolingBlock(nn.Module):
  """A stage's first block when its query is pooled or its width grows (timm's MultiScaleBlock
  with stride_q > 1 or dim != dim_out, expand_attn=True)."""
  features: int
  num_heads: int
  grid: tuple
  q_stride: int
  kv_stride: int
  mlp_ratio: float = 4.0
  drop_path_rate: Any = 0.0
  qkv_bias: bool = True
  gelu_approximate: bool = False
  norm_epsilon: float = NORM_EPSILON
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic=True):
    width = x.shape[-1]
    x_norm = nn.LayerNorm(epsilon=self.norm_epsilon, dtype=self.dtype, name="norm1")(x)
    shortcut = x
    if width != self.features:  # projected from the normed input, as both codes
      shortcut = nn.Dense(self.features, dtype=self.dtype, name="shortcut_proj_attn")(x_norm)
    if self.q_stride > 1:
      shortcut = pooled_tokens(shortcut, self.grid, self.q_stride, 0)
    attn = attn_lib.build(self.attention_spec(), num_heads=self.num_heads, dtype=self.dtype,
                          qkv_bias=self.qkv_bias, name="attn")
    ctx = attn_lib.AttnContext(grid=tuple(self.grid), num_prefix=0, cls_index=None)
    h, _ = attn(x_norm, ctx, deterministic=deterministic)
    x = shortcut + drop_path(self, h, self.drop_path_rate, deterministic)
    h = nn.LayerNorm(epsilon=self.norm_epsilon, dtype=self.dtype, name="norm2")(x)
    h = Mlp(int(self.features * self.mlp_ratio), 0.0, self.gelu_approximate, self.dtype,
            name="mlp")(h, deterministic=deterministic)
    return x + drop_path(self, h, self.drop_path_rate, deterministic)

  def attention_spec(self) -> dict:
    return dict(name="mvit_pool", q_stride=self.q_stride, kv_stride=self.kv_stride,
                kernel_size=KERNEL_QKV, dim_out=self.features, norm_epsilon=self.norm_epsilon)


class MViTv2(nn.Module, WithoutTokenReduction):
  """MViTv2. Returns (logits, out); out["stage_{s}"] is stage s's [B, h, w, C] map."""
  num_classes: int
  embed_dims: Sequence[int] = (96, 192, 384, 768)
  depths: Sequence[int] = (1, 2, 5, 2)
  num_heads: Sequence[int] = (1, 2, 4, 8)
  q_strides: Sequence[int] = (1, 2, 2, 2)  # of each stage's first block (timm's stride_q)
  kv_stride: int = KV_STRIDE_ADAPTIVE      # stage 0's; later stages' by the adaptive rule
  mlp_ratio: float = 4.0
  image_size: Sequence[int] = (224, 224)
  drop_path: float = 0.0
  dropout: float = 0.0  # before the head (timm's drop_rate)
  qkv_bias: bool = True
  gelu_approximate: bool = False
  norm_epsilon: float = NORM_EPSILON
  tokens: Any = None   # refused unless none (see validate)
  scan: bool = False   # refused (see validate)
  remat: bool = False
  dtype: Any = jnp.float32

  distill_token = False  # no distillation token: DeiT's distillation recipe does not apply

  # ----- static structure -----
  @property
  def depth(self) -> int:
    return int(sum(self.depths))

  @property
  def grid(self) -> tuple:
    """The patch embedding's output grid."""
    return tuple(mvit_pool.pooled_size(s, PATCH_KERNEL, PATCH_STRIDE) for s in self.image_size)

  def stage_grids(self) -> list:
    """Each stage's grid (after its first block's query pooling)."""
    grids, grid = [], self.grid
    for q in self.q_strides:
      grid = mvit_pool.pooled_grid(grid, KERNEL_QKV, q)
      grids.append(grid)
    return grids

  def stage_kv_strides(self) -> tuple:
    return kv_strides(self.q_strides, self.kv_stride)

  def pools(self, s: int) -> bool:
    """Whether stage s begins with a PoolingBlock (its query pooled or its width grown)."""
    width_in = self.embed_dims[s - 1] if s else self.embed_dims[0]
    return self.q_strides[s] > 1 or width_in != self.embed_dims[s]

  def rates(self, s: int) -> list:
    first = int(sum(self.depths[:s]))
    return drop_path_rates(self.drop_path, self.depth)[first:first + self.depths[s]]

  def attention_spec(self, s: int) -> dict:
    """The attention of stage s's blocks after a PoolingBlock (query unpooled)."""
    return dict(name="mvit_pool", q_stride=1, kv_stride=self.stage_kv_strides()[s],
                kernel_size=KERNEL_QKV, norm_epsilon=self.norm_epsilon)

  def pooling_block(self, s: int, parent=None) -> PoolingBlock:
    grid_in = self.stage_grids()[s - 1] if s else self.grid
    # remat: recompute its activations in the backward pass (`deterministic`, argument 2 after
    # the module and x, is static)
    cls = nn.remat(PoolingBlock, static_argnums=(2,)) if self.remat else PoolingBlock
    return cls(self.embed_dims[s], self.num_heads[s], tuple(grid_in), self.q_strides[s],
                        self.stage_kv_strides()[s], self.mlp_ratio, self.rates(s)[0],
                        self.qkv_bias, self.gelu_approximate, self.norm_epsilon, self.dtype,
                        parent=parent, name=None if parent is None else f"pool_block_{s}")

  def stage(self, s: int, parent=None, name: Optional[str] = None) -> Stage:
    """Stage s's blocks after its PoolingBlock (all of them where it has none), numbered from
    there (unbound unless a parent is given)."""
    first = 1 if self.pools(s) else 0
    width = self.embed_dims[s]
    blocks = [dict(attention=self.attention_spec(s), num_heads=self.num_heads[s],
                   mlp_dim=int(width * self.mlp_ratio), drop_path_rate=rate,
                   qkv_bias=self.qkv_bias, gelu_approximate=self.gelu_approximate,
                   norm_epsilon=self.norm_epsilon, dtype=self.dtype)
              for rate in self.rates(s)[first:]]
    return Stage(blocks=blocks, grid=tuple(self.stage_grids()[s]), num_prefix=0,
                 class_token=False, remat=self.remat, first_block=first, dtype=self.dtype,
                 parent=parent, name=name)

  def layer_id(self, path: str) -> int:
    """Layer-wise lr decay's layer of a parameter: 0 for the patch embedding, 1 + the global
    index of a block, and depth + 1 for the final norm and the head."""
    parts = path.split("/")
    if parts[0] == "patch_embed":
      return 0
    offsets = np.cumsum([0, *self.depths])
    if parts[0].startswith("pool_block_"):
      return 1 + int(offsets[int(parts[0][len("pool_block_"):])])
    if parts[0].startswith("stage_") and len(parts) > 1 and parts[1].startswith("block_"):
      block = int(parts[1][len("block_"):])
      return 1 + int(offsets[int(parts[0][len("stage_"):])]) + block
    return self.depth + 1

  def validate(self):
    """Config-time checks; raises ValueError naming what would be valid."""
    self.refuse_tokens_and_scan("MViTv2", "its query pooling changes the token count and its "
                                "poolings need the full grid",
                                "a stage's first block differs from the rest (remat=True saves "
                                "memory instead)")
    n = len(self.depths)
    lengths = {len(self.num_heads), len(self.embed_dims), len(self.q_strides)}
    if n < 1 or lengths != {n}:
      raise ValueError(f"embed_dims {tuple(self.embed_dims)}, depths {tuple(self.depths)}, "
                       f"num_heads {tuple(self.num_heads)} and q_strides "
                       f"{tuple(self.q_strides)} must name the same number (>= 1) of stages")
    if any(int(v) < 1 for v in (*self.depths, *self.num_heads, *self.embed_dims,
                                *self.q_strides, self.kv_stride)):
      raise ValueError(f"embed_dims {tuple(self.embed_dims)}, depths {tuple(self.depths)}, "
                       f"num_heads {tuple(self.num_heads)}, q_strides {tuple(self.q_strides)} "
                       f"and kv_stride {self.kv_stride} must be positive ints")
    if len(self.image_size) != 2 or any(int(s) < 1 for s in self.image_size):
      raise ValueError(f"image size {tuple(self.image_size)}; give (height, width), positive")
    for s, (width, heads) in enumerate(zip(self.embed_dims, self.num_heads)):
      if width % heads:
        raise ValueError(f"stage {s} has width {width}, not divisible by its num_heads {heads}; "
                         "use heads dividing embed_dims[s]")
    for s in range(n):
      attn_lib.registry.check(self.attention_spec(s))
      if self.stage(s).blocks:
        self.stage(s).check()

  # ----- forward -----
  @nn.compact
  def __call__(self, images, *, train: bool = False, step=None, progress=None):
    """images [B, H, W, C] -> (logits [B, classes], out: named intermediates)."""
    if tuple(images.shape[1:3]) != tuple(self.image_size):
      raise ValueError(f"images are {images.shape[1]}x{images.shape[2]} but the model was built "
                       f"for {tuple(self.image_size)}")
    pad = PATCH_KERNEL // 2
    x = nn.Conv(self.embed_dims[0], (PATCH_KERNEL, PATCH_KERNEL), strides=PATCH_STRIDE,
                padding=((pad, pad), (pad, pad)), dtype=self.dtype,
                kernel_init=drawn_as_matrix(nn.initializers.lecun_normal()),
                name="patch_embed")(images.astype(self.dtype))
    out = {"stem": x}
    b = x.shape[0]
    x = x.reshape(b, -1, self.embed_dims[0])
    for s, width in enumerate(self.embed_dims):
      if self.pools(s):
        x = self.pooling_block(s, self)(x, not train)
      if len(self.stage(s).blocks):
        x, _, _ = self.stage(s, self, f"stage_{s}")(x, train=train, step=step, progress=progress)
      out[f"stage_{s}"] = x.reshape(b, *self.stage_grids()[s], width)
    x = nn.LayerNorm(epsilon=self.norm_epsilon, dtype=self.dtype, name="norm")(x)
    out["encoded"] = x
    x = x.mean(axis=1)
    out["pre_logits"] = x
    if not self.num_classes:
      return x, out
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    head = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=nn.initializers.zeros,
                    name="head")
    logits = head(x).astype(jnp.float32)
    out["logits"] = logits
    return logits, out

  # ----- cost -----
  def macs(self, channels: int = 3) -> int:
    """Analytic multiply-accumulates of one image: patch embedding, every block's attention as
    its registry entry counts it (poolings and rel-pos products included), shortcut
    projections, MLPs and the head (norms, max pools and softmax left out, as in the papers)."""
    entry = attn_lib.get("mvit_pool")
    grid, width_in = self.grid, self.embed_dims[0]
    total = grid[0] * grid[1] * PATCH_KERNEL ** 2 * channels * width_in
    for s, width in enumerate(self.embed_dims):
      heads, kv = self.num_heads[s], self.stage_kv_strides()[s]
      out_grid = self.stage_grids()[s]
      n_in, n_out = grid[0] * grid[1], out_grid[0] * out_grid[1]
      mlp = 2 * int(width * self.mlp_ratio) * width
      first = 0
      if self.pools(s):
        total += entry.macs(n_in, width_in, heads, num_prefix=0, q_stride=self.q_strides[s],
                            kv_stride=kv, dim_out=width)
        total += n_in * width_in * width if width_in != width else 0
        total += n_out * mlp
        first = 1
      for _ in range(first, self.depths[s]):
        total += entry.macs(n_out, width, heads, num_prefix=0, kv_stride=kv) + n_out * mlp
      grid, width_in = out_grid, width
    return total + width_in * self.num_classes
