"""MaxViT (Tu et al. 2022, "MaxViT: Multi-Axis Vision Transformer"): a conv stem, four stages
of MaxViT blocks (MBConv, block attention, grid attention) at halving resolution, a pooled head
with a tanh pre-logits layer.

Follows the official google-research/maxvit (`maxvit/models/maxvit.py`: MaxViT, MBConvBlock,
TransformerBlock, `maxvit/models/attention_utils.py` for the relative position bias) as timm's
`timm/models/maxxvit.py` reproduces it in its `_tf_` configs (huggingface/pytorch-image-models:
MaxxVit, Stem, MbConvBlock, Downsample2d, PartitionAttentionCl, NormMlpClassifierHead,
`maxvit_{tiny,small,base}_tf` in model_cfgs with `_tf_cfg()`), the configs that load the
official weights:
  stem     3x3 stride-2 conv (bias) -> BatchNorm + GELU -> 3x3 conv (bias), TF 'SAME' padding;
  block    MBConv: shortcut (stride 2: 2x2 average pool, zero-padding counted, then a 1x1 conv
           with bias where the width changes); BatchNorm (no activation) -> 1x1 expand conv to
           mid = 4 * out (no bias) -> BatchNorm + GELU -> 3x3 depthwise conv (stride 2 in each
           stage's first block, 'SAME', no bias) -> BatchNorm + GELU -> squeeze-excitation (mean
           pool, 1x1 conv to int(0.25 * out) channels (of the *output* width), SiLU, 1x1 conv,
           sigmoid gate) -> 1x1 project conv (bias); residual with drop path;
           then `maxvit_block` attention (P x P windows) and `maxvit_grid` attention (a G x G
           grid), each an encoder block of `vitjax.models.stage.Block`:
             x = x + attn(LN(x)); x = x + mlp(LN(x)), heads of width 32, MLP ratio 4,
           relative position bias in the official (RelPosBiasTf) layout, P = G = 7;
  head     global average pool, LayerNorm, Linear + tanh (pre-logits, width head_hidden),
           (dropout,) Linear.
GELU is the tanh approximation everywhere (timm's 'gelu_tanh', as TensorFlow's), BatchNorm has
epsilon 1e-3 and the official momentum 0.99 (TensorFlow's and flax's convention: PyTorch's 0.01),
LayerNorm epsilon 1e-5, and stochastic depth rises linearly over the MaxViT blocks (the three
parts of a block share it).

Variants ("T", "S", "B"): timm's maxvit_{tiny,small,base}_tf_224; parameter counts equal timm's
(T 30,916,528; S 68,927,956; B 119,467,708 with 1000 classes); analytic MACs at 224
px T 5.55 G, S 11.58 G, B 23.90 G (the paper: 5.6, 11.7, 23.4 G).

Deviations (own design, also in the README):
- A stage grid that P or G does not divide is padded at the bottom and right with keys that get
  no weight (the attention's rule); timm and the official code require divisibility (timm
  derives P = G = image size / 32, which always divides).
- BatchNorm statistics in training are over the whole (global) batch, as the official
  TpuBatchNormalization over its shard groups; PyTorch updates its running variance with the
  unbiased batch variance, flax with the biased one (n / (n - 1) apart). timm keeps PyTorch's
  momentum 0.1 (`bn_momentum=0.9` here); evaluation uses the running statistics in all three.
- Stochastic depth: block i of n drops with rate drop_path * i / (n - 1), as timm; the official
  code anneals with i / n.
- An odd side before a stride-2 block: the shortcut's average pool counts the zero padding, as
  timm; TensorFlow's 'SAME' pooling in the official code leaves it out (at 224 px every side is
  even and the two agree).
- Initialisation: flax defaults (LeCun normal kernels, zero biases, BatchNorm 1 / 0) and a
  zero-initialised head; the relative position tables are N(0, 0.02^2) truncated at +-2.
- No token reduction and no scanned blocks: convolutions and partitions need the full grid and
  a block's three parts differ; both are refused when the model is built.
"""
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from vitjax import attention as attn_lib
from vitjax.models.stage import Block, WithoutTokenReduction, drawn_as_matrix, drop_path, \
    drop_path_rates

# name: (embed_dims, depths, head_hidden); stem width 64 in all
VARIANTS = {
    "T": ((64, 128, 256, 512), (2, 2, 5, 2), 512),
    "S": ((96, 192, 384, 768), (2, 2, 5, 2), 768),
    "B": ((96, 192, 384, 768), (2, 6, 14, 2), 768),
}
NORM_EPSILON = 1e-5  # the transformer blocks' and the head's LayerNorm (timm's _tf_cfg)
BN_EPSILON = 1e-3    # the stem's and MBConv's BatchNorm (timm's _tf_cfg, TensorFlow's default)
BN_MOMENTUM = 0.99   # the official bn_momentum (TensorFlow's convention, flax's: PyTorch's 0.01)


def decode_variant(variant: str) -> dict:
  """"T" -> dict(embed_dims=(64, 128, 256, 512), depths=(2, 2, 5, 2), head_hidden=512)."""
  if variant not in VARIANTS:
    raise ValueError(f"unknown MaxViT variant {variant!r}; valid: {', '.join(VARIANTS)}")
  dims, depths, hidden = VARIANTS[variant]
  return dict(embed_dims=dims, depths=depths, head_hidden=hidden)


def make_divisible(v: float, divisor: int = 8) -> int:
  """timm's channel rounding: the nearest multiple of divisor, not below 90% of v."""
  out = max(divisor, int(v + divisor / 2) // divisor * divisor)
  return out + divisor if out < 0.9 * v else out


def conv(features: int, kernel: int, dtype, name: str, *, stride: int = 1, bias: bool = True,
         groups: int = 1) -> nn.Conv:
  """A conv with TensorFlow's 'SAME' padding (timm's padding='same': pad bottom / right first)."""
  return nn.Conv(features, (kernel, kernel), strides=stride, padding="SAME", use_bias=bias,
                 feature_group_count=groups, dtype=dtype, name=name,
                 kernel_init=drawn_as_matrix(nn.initializers.lecun_normal()))


def batch_norm(train: bool, epsilon: float, momentum: float, dtype, name: str):
  return nn.BatchNorm(use_running_average=not train, momentum=momentum, epsilon=epsilon,
                      dtype=dtype, name=name)


def avg_pool2(x):
  """2x2 stride-2 average pooling, an odd side zero-padded at the bottom / right and the zeros
  counted (timm's AvgPool2dSame with count_include_pad)."""
  h, w = x.shape[1:3]
  x = jnp.pad(x, [(0, 0), (0, h % 2), (0, w % 2), (0, 0)])
  return nn.avg_pool(x, (2, 2), strides=(2, 2))


class Stem(nn.Module):
  """[B, H, W, C] -> [B, ceil(H/2), ceil(W/2), widths[1]]: conv 3x3 / 2, BatchNorm + GELU, conv."""
  widths: Sequence[int]
  bn_epsilon: float = BN_EPSILON
  bn_momentum: float = BN_MOMENTUM
  gelu_approximate: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = conv(self.widths[0], 3, self.dtype, "conv1", stride=2)(x)
    x = batch_norm(train, self.bn_epsilon, self.bn_momentum, self.dtype, "norm1")(x)
    x = nn.gelu(x, approximate=self.gelu_approximate)
    return conv(self.widths[1], 3, self.dtype, "conv2")(x)


class SqueezeExcite(nn.Module):
  """x * sigmoid(fc2(silu(fc1(mean(x))))), fc1 / fc2 1x1 convs with biases (timm's SEModule)."""
  reduced: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    s = x.mean(axis=(1, 2), keepdims=True)
    s = nn.silu(conv(self.reduced, 1, self.dtype, "fc1")(s))
    s = conv(x.shape[-1], 1, self.dtype, "fc2")(s)
    return x * nn.sigmoid(s)


class MBConv(nn.Module):
  """timm's MbConvBlock in the _tf_ config (see the module docstring)."""
  features: int
  stride: int = 1
  expand_ratio: float = 4.0
  se_ratio: float = 0.25
  drop_path_rate: float = 0.0
  bn_epsilon: float = BN_EPSILON
  bn_momentum: float = BN_MOMENTUM
  gelu_approximate: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    mid = make_divisible(self.features * self.expand_ratio)  # from the output width
    norm = lambda name: batch_norm(train, self.bn_epsilon, self.bn_momentum, self.dtype, name)
    act = lambda t: nn.gelu(t, approximate=self.gelu_approximate)
    shortcut = x
    if self.stride == 2:
      shortcut = avg_pool2(x)
      if x.shape[-1] != self.features:
        shortcut = conv(self.features, 1, self.dtype, "shortcut_expand")(shortcut)
    x = norm("pre_norm")(x)
    x = act(norm("norm1")(conv(mid, 1, self.dtype, "conv1_1x1", bias=False)(x)))
    x = conv(mid, 3, self.dtype, "conv2_kxk", stride=self.stride, bias=False, groups=mid)(x)
    x = act(norm("norm2")(x))
    x = SqueezeExcite(int(self.se_ratio * self.features), self.dtype, name="se")(x)
    x = conv(self.features, 1, self.dtype, "conv3_1x1")(x)
    return shortcut + drop_path(self, x, self.drop_path_rate, not train)


class MaxViTBlock(nn.Module):
  """MBConv, then block attention + MLP, then grid attention + MLP, on [B, h, w, C] maps."""
  features: int
  stride: int
  block_kwargs: dict  # the two encoder blocks' Block kwargs (attention aside)
  partition_sizes: tuple  # (P, G)
  mbconv_kwargs: dict

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = MBConv(self.features, self.stride, name="conv", **self.mbconv_kwargs)(x, train)
    b, h, w, c = x.shape
    ctx = attn_lib.AttnContext(grid=(h, w), num_prefix=0, cls_index=None)
    t = x.reshape(b, h * w, c)
    for part, size in zip(("block", "grid"), self.partition_sizes):
      spec = {"name": f"maxvit_{part}", "partition_size": size}
      t = Block(attention=spec, name=f"attn_{part}", **self.block_kwargs)(t, ctx, not train)
    return t.reshape(b, h, w, c)


class MaxViTStage(nn.Module):
  """A stage's MaxViT blocks `block_{j}`, the first with stride 2."""
  features: int
  rates: tuple  # drop path, per block
  block_kwargs: dict
  partition_sizes: tuple
  mbconv_kwargs: dict
  remat: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    # recompute activations in the backward pass; the module is argument 0
    cls = nn.remat(MaxViTBlock, static_argnums=(2,)) if self.remat else MaxViTBlock
    for j, rate in enumerate(self.rates):
      x = cls(self.features, 2 if j == 0 else 1, dict(self.block_kwargs, drop_path_rate=rate),
              self.partition_sizes, dict(self.mbconv_kwargs, drop_path_rate=rate),
              name=f"block_{j}")(x, train)
    return x


class MaxViT(nn.Module, WithoutTokenReduction):
  """MaxViT. Returns (logits, out); out["stage_{s}"] is stage s's [B, h, w, C] map."""
  num_classes: int
  embed_dims: Sequence[int] = (64, 128, 256, 512)
  depths: Sequence[int] = (2, 2, 5, 2)  # MaxViT blocks per stage
  stem_width: Any = 64  # an int or (conv1, conv2) widths
  head_dim: int = 32    # heads = width / head_dim in every stage
  window_size: int = 7  # P of block attention
  grid_size: int = 7    # G of grid attention
  mlp_ratio: float = 4.0
  expand_ratio: float = 4.0  # MBConv's mid width / its output width
  se_ratio: float = 0.25     # squeeze-excitation width / the MBConv's output width
  head_hidden: Optional[int] = None  # the pre-logits width (None: the last stage's width)
  image_size: Sequence[int] = (224, 224)
  drop_path: float = 0.0
  dropout: float = 0.0  # before the head's last Linear (timm's drop_rate)
  qkv_bias: bool = True
  gelu_approximate: bool = True  # timm's 'gelu_tanh' (TensorFlow's GELU)
  norm_epsilon: float = NORM_EPSILON
  bn_epsilon: float = BN_EPSILON
  bn_momentum: float = BN_MOMENTUM  # flax's convention (1 - PyTorch's); timm's is 0.9 here
  impl: str = "reference"  # of both attentions
  tokens: Any = None   # refused unless none (see validate)
  scan: bool = False   # refused (see validate)
  remat: bool = False
  dtype: Any = jnp.float32

  distill_token = False  # no distillation token: DeiT's distillation recipe does not apply

  # ----- static structure -----
  @property
  def depth(self) -> int:
    """The layers that layer-wise lr decay counts: one per stage (timm's group_matcher)."""
    return len(self.depths)

  @property
  def stem_widths(self) -> tuple:
    w = self.stem_width
    return (int(w), int(w)) if isinstance(w, (int, np.integer)) else tuple(int(v) for v in w)

  @property
  def grid(self) -> tuple:
    """The stem's output grid."""
    return tuple(-(-s // 2) for s in self.image_size)

  def stage_grids(self) -> list:
    grids, grid = [], self.grid
    for _ in self.depths:
      grid = tuple(-(-g // 2) for g in grid)
      grids.append(grid)
    return grids

  def num_heads(self, s: int) -> int:
    return self.embed_dims[s] // self.head_dim

  def mbconv_kwargs(self) -> dict:
    return dict(expand_ratio=self.expand_ratio, se_ratio=self.se_ratio,
                bn_epsilon=self.bn_epsilon, bn_momentum=self.bn_momentum,
                gelu_approximate=self.gelu_approximate, dtype=self.dtype)

  def stage(self, s: int, name: Optional[str] = None) -> "MaxViTStage":
    """Stage s's MaxViT blocks."""
    first = sum(self.depths[:s])
    rates = drop_path_rates(self.drop_path, sum(self.depths))[first:first + self.depths[s]]
    width = self.embed_dims[s]
    kwargs = dict(num_heads=self.num_heads(s), mlp_dim=int(width * self.mlp_ratio),
                  qkv_bias=self.qkv_bias, impl=self.impl,
                  gelu_approximate=self.gelu_approximate, norm_epsilon=self.norm_epsilon,
                  dtype=self.dtype)
    return MaxViTStage(width, tuple(rates), kwargs, (self.window_size, self.grid_size),
                       self.mbconv_kwargs(), self.remat, name=name)

  def attention_specs(self) -> list:
    return [{"name": "maxvit_block", "partition_size": self.window_size},
            {"name": "maxvit_grid", "partition_size": self.grid_size}]

  def layer_id(self, path: str) -> int:
    """Layer-wise lr decay's layer of a parameter, as timm's group_matcher: 0 for the stem,
    1 + s for stage s, depth + 1 for the head (its norm, pre-logits and classifier)."""
    first = path.split("/")[0]
    if first == "stem":
      return 0
    if first.startswith("stage_"):
      return 1 + int(first[len("stage_"):])
    return self.depth + 1

  def validate(self):
    """Config-time checks; raises ValueError naming what would be valid."""
    self.refuse_tokens_and_scan("MaxViT", "its convolutions and partitions need the full grid",
                                "a block's MBConv, block and grid attention differ (remat=True "
                                "saves memory instead)")
    n = len(self.depths)
    if n < 1 or len(self.embed_dims) != n:
      raise ValueError(f"embed_dims {tuple(self.embed_dims)} and depths {tuple(self.depths)} "
                       "must name the same number (>= 1) of stages")
    if any(int(v) < 1 for v in (*self.depths, *self.embed_dims, *self.stem_widths)):
      raise ValueError(f"embed_dims {tuple(self.embed_dims)}, depths {tuple(self.depths)} and "
                       f"stem_width {self.stem_width} must be positive ints")
    if len(self.image_size) != 2 or any(int(v) < 1 for v in self.image_size):
      raise ValueError(f"image size {tuple(self.image_size)}; give (height, width), positive")
    if min(int(self.window_size), int(self.grid_size)) < 1:
      raise ValueError(f"window_size {self.window_size} and grid_size {self.grid_size}; both "
                       "are positive ints (7 in every variant)")
    for s, width in enumerate(self.embed_dims):
      if self.head_dim < 1 or width % self.head_dim:
        raise ValueError(f"stage {s} has width {width}, not divisible by head_dim "
                         f"{self.head_dim}; use a head_dim dividing every embed_dims[s]")
    if int(self.se_ratio * min(self.embed_dims)) < 1:
      raise ValueError(f"se_ratio {self.se_ratio} gives no squeeze-excitation channel for width "
                       f"{min(self.embed_dims)}; use se_ratio >= 1 / {min(self.embed_dims)}")
    for spec in self.attention_specs():
      attn_lib.registry.check(spec, self.impl)

  # ----- forward -----
  @nn.compact
  def __call__(self, images, *, train: bool = False, step=None, progress=None):
    """images [B, H, W, C] -> (logits [B, classes], out: named intermediates)."""
    del step, progress  # no schedule inside MaxViT
    if tuple(images.shape[1:3]) != tuple(self.image_size):
      raise ValueError(f"images are {images.shape[1]}x{images.shape[2]} but the model was built "
                       f"for {tuple(self.image_size)}")
    x = Stem(self.stem_widths, self.bn_epsilon, self.bn_momentum, self.gelu_approximate,
             self.dtype, name="stem")(images.astype(self.dtype), train)
    out = {"stem": x}
    for s in range(len(self.depths)):
      x = self.stage(s, name=f"stage_{s}")(x, train)
      out[f"stage_{s}"] = x
    x = x.mean(axis=(1, 2))
    x = nn.LayerNorm(epsilon=self.norm_epsilon, dtype=self.dtype, name="norm")(x)
    x = jnp.tanh(nn.Dense(self.head_hidden or self.embed_dims[-1], dtype=self.dtype,
                          name="pre_logits")(x))
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
    """Analytic multiply-accumulates of one image: stem, every MBConv's convs and SE, both
    attentions as their registry entries count them, MLPs and the head (norms, activations,
    pooling and softmax left out, as in the papers)."""
    (h, w), (c0, c1) = self.grid, self.stem_widths
    total = h * w * 9 * (channels * c0 + c0 * c1)
    grid, width = self.grid, c1
    for s, (out_grid, out) in enumerate(zip(self.stage_grids(), self.embed_dims)):
      n = out_grid[0] * out_grid[1]
      mid = make_divisible(out * self.expand_ratio)
      for j in range(self.depths[s]):
        n_in = grid[0] * grid[1] if j == 0 else n
        total += n * width * out if (j == 0 and width != out) else 0  # the shortcut's conv
        total += n_in * width * mid + n * 9 * mid + 2 * mid * int(self.se_ratio * out) \
            + n * mid * out
        for spec in self.attention_specs():
          entry, options = attn_lib.registry.check(spec, self.impl)
          total += entry.macs(n, out, self.num_heads(s), num_prefix=0, **options)
          total += 2 * n * out * int(out * self.mlp_ratio)
        width = out
      grid = out_grid
    hidden = self.head_hidden or self.embed_dims[-1]
    return total + width * hidden + hidden * self.num_classes
