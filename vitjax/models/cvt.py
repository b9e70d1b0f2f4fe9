"""CvT (Wu et al. 2021, "CvT: Introducing Convolutions to Vision Transformers"): three stages,
each a convolutional token embedding and blocks with convolutional projections; a [CLS] token in
the last stage; no position embedding.

Follows the official code (https://github.com/microsoft/CvT, lib/models/cls_cvt.py:
ConvolutionalVisionTransformer, VisionTransformer, ConvEmbed, Block, Attention; the model built by
`get_cls_model` and the configs experiments/imagenet/cvt/cvt-{13,21}-224x224.yaml and
cvt-w24-384x384.yaml):
  stage s  ConvEmbed (`embed_{s}`): a k x k convolution with bias (7 / stride 4 / padding 2 for
           s = 0, 3 / 2 / 1 after) of the previous stage's map, then LayerNorm; the last stage
           puts the learned [CLS] token (`cls`) in front; then depth_s pre-norm blocks
           (`vitjax.models.stage.Block`): x = x + attn(norm1(x)); x = x + mlp(norm2(x)), the
           attention `cvt_conv_proj` (depthwise 3x3 conv + BatchNorm per q, k, v, k and v of
           stride 2, the [CLS] token unconvolved, scale width^-1/2), the MLP ratio 4 with
           QuickGELU (x * sigmoid(1.702 x), the official models' act_layer);
  head     LayerNorm of the [CLS] token, Linear (without [CLS]: LayerNorm of every token, then
           their mean, the official order).
LayerNorm epsilon 1e-5 everywhere; qkv biases (QKV_BIAS True in every config); stochastic depth
rises linearly within each stage to that stage's rate (`drop_path`: one rate per stage, or one
for all; the official configs use (0, 0, 0.1), W24 (0, 0, 0.3)).

Variants ("13", "21", "W24"): parameter counts equal the official models' at 1000 classes
(13: 19,997,480; 21: 31,622,696; W24: 277,196,392).

Deviations (own design, also in the README):
- Initialisation: flax defaults (LeCun normal kernels, zero biases, BatchNorm 1 / 0 with
  statistics 0 / 1) and a zero-initialised head; the official code draws every Linear and the
  [CLS] token from a truncated normal (std 0.02) and keeps PyTorch's conv init.
- BatchNorm statistics in training are over the whole (global) batch, as a synchronised
  BatchNorm; PyTorch updates its running variance with the unbiased batch variance, flax with the
  biased one.
- No token reduction and no scanned blocks: the convolutional projections need the full grid and
  a stage's blocks are too few for a reducer's schedule; both are refused when the model is built.
"""
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from vitjax import attention as attn_lib
from vitjax.models.stage import Stage, WithoutTokenReduction, drawn_as_matrix, drop_path_rates

# name: (embed_dims, depths, num_heads)
VARIANTS = {
    "13": ((64, 192, 384), (1, 2, 10), (1, 3, 6)),
    "21": ((64, 192, 384), (1, 4, 16), (1, 3, 6)),
    "W24": ((192, 768, 1024), (2, 2, 20), (3, 12, 16)),
}
NORM_EPSILON = 1e-5  # the official LayerNorm(eps=1e-5)
PATCH_SIZES, PATCH_STRIDES, PATCH_PADDINGS = (7, 3, 3), (4, 2, 2), (2, 1, 1)


def decode_variant(variant: str) -> dict:
  """"13" -> dict(embed_dims=(64, 192, 384), depths=(1, 2, 10), num_heads=(1, 3, 6))."""
  if variant not in VARIANTS:
    raise ValueError(f"unknown CvT variant {variant!r}; valid: {', '.join(VARIANTS)}")
  dims, depths, heads = VARIANTS[variant]
  return dict(embed_dims=dims, depths=depths, num_heads=heads)


def conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
  return (size + 2 * padding - kernel) // stride + 1


class ConvEmbed(nn.Module):
  """[B, H, W, C] -> [B, h, w, D]: the official ConvEmbed (conv with bias, then LayerNorm)."""
  features: int
  kernel: int
  stride: int
  padding: int
  norm_epsilon: float = NORM_EPSILON
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    pad = ((self.padding, self.padding),) * 2
    x = nn.Conv(self.features, (self.kernel, self.kernel), strides=self.stride, padding=pad,
                dtype=self.dtype, kernel_init=drawn_as_matrix(nn.initializers.lecun_normal()),
                name="proj")(x)
    return nn.LayerNorm(epsilon=self.norm_epsilon, dtype=self.dtype, name="norm")(x)


class CvT(nn.Module, WithoutTokenReduction):
  """CvT. Returns (logits, out); out["stage_{s}"] is stage s's [B, h, w, C] map (patch tokens)."""
  num_classes: int
  embed_dims: Sequence[int] = (64, 192, 384)
  depths: Sequence[int] = (1, 2, 10)
  num_heads: Sequence[int] = (1, 3, 6)
  patch_sizes: Sequence[int] = PATCH_SIZES
  patch_strides: Sequence[int] = PATCH_STRIDES
  patch_paddings: Sequence[int] = PATCH_PADDINGS
  mlp_ratio: float = 4.0
  kernel_size: int = 3  # of the convolutional projections (KERNEL_QKV)
  stride_kv: int = 2    # of their k and v (STRIDE_KV)
  class_token: bool = True  # in the last stage (CLS_TOKEN [False, False, True])
  image_size: Sequence[int] = (224, 224)
  drop_path: Any = 0.0  # one rate per stage, or one for every stage (each rising within it)
  dropout: float = 0.0  # the official drop_rate: after the embedding, in the attention and MLP
  attn_dropout: float = 0.0
  qkv_bias: bool = True
  activation: str = "quick_gelu"  # the official models' QuickGELU; "gelu" is nn.GELU
  norm_epsilon: float = NORM_EPSILON
  impl: str = "reference"  # of the softmax core
  tokens: Any = None   # refused unless none (see validate)
  scan: bool = False   # refused (see validate)
  remat: bool = False
  dtype: Any = jnp.float32

  distill_token = False  # no distillation token: DeiT's distillation recipe does not apply

  # ----- static structure -----
  @property
  def depth(self) -> int:
    """All blocks of all stages (what layer-wise lr decay counts)."""
    return int(sum(self.depths))

  def stage_grids(self) -> list:
    grids, size = [], tuple(self.image_size)
    for k, s, p in zip(self.patch_sizes, self.patch_strides, self.patch_paddings):
      size = tuple(conv_out(g, k, s, p) for g in size)
      grids.append(size)
    return grids

  def stage_rates(self) -> list:
    rates = self.drop_path
    if isinstance(rates, (int, float)):
      rates = (rates,) * len(self.depths)
    return [float(r) for r in rates]

  def has_cls(self, s: int) -> bool:
    return self.class_token and s == len(self.depths) - 1

  def attention_spec(self) -> dict:
    return {"name": "cvt_conv_proj", "kernel_size": self.kernel_size,
            "stride_kv": self.stride_kv}

  def stage(self, s: int, parent=None, name: Optional[str] = None) -> Stage:
    """Stage s's encoder blocks (unbound unless a parent is given; `name` names it there)."""
    rates = drop_path_rates(self.stage_rates()[s], self.depths[s])
    width = self.embed_dims[s]
    blocks = [dict(attention=self.attention_spec(), num_heads=self.num_heads[s],
                   mlp_dim=int(width * self.mlp_ratio), dropout=self.dropout,
                   attn_dropout=self.attn_dropout, drop_path_rate=rates[j],
                   qkv_bias=self.qkv_bias, impl=self.impl, norm_epsilon=self.norm_epsilon,
                   activation=self.activation, dtype=self.dtype)
              for j in range(self.depths[s])]
    cls = self.has_cls(s)
    return Stage(blocks=blocks, grid=self.stage_grids()[s], num_prefix=int(cls), class_token=cls,
                 remat=self.remat, dtype=self.dtype, parent=parent, name=name)

  def layer_id(self, path: str) -> int:
    """Layer-wise lr decay's layer of a parameter: 0 for the first embedding, 1 + the global
    index of a block, a later stage's embedding (and the [CLS] token, with the last) with that
    stage's first block, and depth + 1 for the final norm and the head."""
    parts = path.split("/")
    offsets = np.cumsum([0, *self.depths])
    if parts[0].startswith("stage_") and len(parts) > 1 and parts[1].startswith("block_"):
      return 1 + int(offsets[int(parts[0][len("stage_"):])]) + int(parts[1][len("block_"):])
    if parts[0].startswith("embed_"):
      s = int(parts[0][len("embed_"):])
      return 0 if s == 0 else 1 + int(offsets[s])
    if parts[0] == "cls":
      return 1 + int(offsets[len(self.depths) - 1])
    return self.depth + 1

  def validate(self):
    """Config-time checks; raises ValueError naming what would be valid."""
    self.refuse_tokens_and_scan("CvT", "its convolutional projections need the full grid",
                                "its stages differ (remat=True saves memory instead)")
    n = len(self.depths)
    lists = dict(embed_dims=self.embed_dims, depths=self.depths, num_heads=self.num_heads,
                 patch_sizes=self.patch_sizes, patch_strides=self.patch_strides,
                 patch_paddings=self.patch_paddings)
    if n < 1 or any(len(v) != n for v in lists.values()):
      shown = ", ".join(f"{k} {tuple(v)}" for k, v in lists.items())
      raise ValueError(f"{shown} must name the same number (>= 1) of stages")
    if any(int(v) < 1 for v in (*self.depths, *self.num_heads, *self.embed_dims)):
      raise ValueError(f"embed_dims {tuple(self.embed_dims)}, depths {tuple(self.depths)} and "
                       f"num_heads {tuple(self.num_heads)} must be positive ints")
    rates = self.stage_rates()
    if len(rates) != n or any(not 0.0 <= r < 1.0 for r in rates):
      raise ValueError(f"drop_path {self.drop_path!r}; give one rate in [0, 1) or one per stage "
                       f"({n})")
    if len(self.image_size) != 2 or any(int(s) < 1 for s in self.image_size):
      raise ValueError(f"image size {tuple(self.image_size)}; give (height, width), positive")
    for s, grid in enumerate(self.stage_grids()):
      if min(grid) < 1:
        raise ValueError(f"image size {tuple(self.image_size)} leaves stage {s} no tokens; use "
                         "larger images")
    for s, (width, heads) in enumerate(zip(self.embed_dims, self.num_heads)):
      if width % heads:
        raise ValueError(f"stage {s} has width {width}, not divisible by its num_heads {heads}; "
                         "use heads dividing embed_dims[s]")
    attn_lib.registry.check(self.attention_spec(), self.impl)
    for s in range(n):
      self.stage(s).check()

  # ----- forward -----
  @nn.compact
  def __call__(self, images, *, train: bool = False, step=None, progress=None):
    """images [B, H, W, C] -> (logits [B, classes], out: named intermediates)."""
    if tuple(images.shape[1:3]) != tuple(self.image_size):
      raise ValueError(f"images are {images.shape[1]}x{images.shape[2]} but the model was built "
                       f"for {tuple(self.image_size)}")
    x, out = images.astype(self.dtype), {}
    for s, width in enumerate(self.embed_dims):
      x = ConvEmbed(width, self.patch_sizes[s], self.patch_strides[s], self.patch_paddings[s],
                    self.norm_epsilon, self.dtype, name=f"embed_{s}")(x)
      b, h, w, _ = x.shape
      tokens = x.reshape(b, h * w, width)
      if self.has_cls(s):
        cls = self.param("cls", nn.initializers.truncated_normal(0.02), (1, 1, width))
        tokens = jnp.concatenate([jnp.tile(cls, (b, 1, 1)).astype(tokens.dtype), tokens], 1)
      tokens = nn.Dropout(self.dropout)(tokens, deterministic=not train)
      tokens, _, _ = self.stage(s, self, f"stage_{s}")(tokens, train=train, step=step,
                                                       progress=progress)
      npre = int(self.has_cls(s))
      x = tokens[:, npre:].reshape(b, h, w, width)
      out[f"stage_{s}"] = x
    norm = nn.LayerNorm(epsilon=self.norm_epsilon, dtype=self.dtype, name="norm")
    x = norm(tokens[:, 0]) if self.class_token else norm(tokens).mean(axis=1)
    out["pre_logits"] = x
    if not self.num_classes:
      return x, out
    head = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=nn.initializers.zeros,
                    name="head")
    logits = head(x).astype(jnp.float32)
    out["logits"] = logits
    return logits, out

  # ----- cost -----
  def macs(self, channels: int = 3) -> int:
    """Analytic multiply-accumulates of one image: the embedding convolutions, every block's
    attention as its registry entry counts it (the official `compute_macs` without biases),
    the MLPs and the head (norms, BatchNorm and softmax left out, as the paper)."""
    entry, options = attn_lib.registry.check(self.attention_spec())
    total, c = 0, channels
    for s, (grid, width) in enumerate(zip(self.stage_grids(), self.embed_dims)):
      patches = grid[0] * grid[1]
      total += patches * self.patch_sizes[s] ** 2 * c * width
      npre = int(self.has_cls(s))
      n = patches + npre
      for _ in range(self.depths[s]):
        total += entry.macs(n, width, self.num_heads[s], num_prefix=npre, grid=grid, **options)
        total += 2 * n * width * int(width * self.mlp_ratio)
      c = width
    return total + self.embed_dims[-1] * self.num_classes
