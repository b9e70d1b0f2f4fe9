"""DaViT (Ding et al. 2022, "DaViT: Dual Attention Vision Transformers"): a conv stem, four
stages of dual attention blocks at halving resolution, pooling, a normed head.

Follows timm's `timm/models/davit.py` (huggingface/pytorch-image-models: DaVit, DaVitStage,
SpatialBlock, ChannelBlock, ConvPosEnc, Stem, Downsample) and the official dingmyu/davit:
  stem     7x7 stride-4 convolution (padding 3; the image padded at the bottom and right to a
           multiple of 4 first) + LayerNorm;
  stage s  (s > 0) Downsample: LayerNorm, then a 2x2 stride-2 convolution (an odd grid padded at
           the bottom and right with zeros after the norm); then depth_s dual units, each a
           spatial block (`davit_window`: attention in 7x7 windows, no position table, no shift)
           followed by a channel block (`davit_channel`, timm's default ChannelAttention, not v2).
           Every block is the encoder stage's (`vitjax.models.stage.Block` with `cpe_grid`):
             x = cpe1(x); x = x + attn(norm1(x)); x = cpe2(x); x = x + mlp(norm2(x)),
           cpe a depthwise 3x3 conv with bias added to its input (ConvPosEnc, no activation);
  head     global average pool, LayerNorm, (dropout,) Linear: timm's default head order
           (head_norm_first=False: pool, then norm).
LayerNorm epsilon is 1e-5 everywhere, qkv projections have biases, and stochastic depth rises
linearly over the dual units (both blocks of a unit share its rate, as timm's stagewise rates).

Windows: a stage grid that the window does not divide is padded as timm does (`davit_window`
with padding="zeros", the default here): the normed tokens are zero-padded at the bottom and
right to multiples of the window, even where the grid is smaller than it, and the padded tokens
are attended (their keys and values are the qkv biases). padding="masked" takes the zoo's rule
instead (padded keys get no weight, a window no smaller than the grid becomes the grid).

Variants ("T", "S", "B"): timm's davit_{tiny,small,base}; parameter counts equal timm's (T
28,360,168; S 49,745,896; B 87,954,408 with 1000 classes).

Deviations (own design, also in the README):
- Initialisation: flax defaults (LeCun normal kernels, zero biases) and a zero-initialised head,
  as vitjax's ViT and Swin; timm draws every Linear from a truncated normal (std 0.02) and keeps
  PyTorch's conv defaults.
- `dropout` is timm's drop_rate: dropout before the head only (timm has no dropout elsewhere).
- No token reduction and no scanned blocks: spatial and channel blocks alternate and the
  windows and convolutions need the full grid; both are refused when the model is built.
"""
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from vitjax import attention as attn_lib
from vitjax.models.stage import Stage, WithoutTokenReduction, drawn_as_matrix, drop_path_rates

# name: (embed_dims, depths (dual units), num_heads)
VARIANTS = {
    "T": ((96, 192, 384, 768), (1, 1, 3, 1), (3, 6, 12, 24)),
    "S": ((96, 192, 384, 768), (1, 1, 9, 1), (3, 6, 12, 24)),
    "B": ((128, 256, 512, 1024), (1, 1, 9, 1), (4, 8, 16, 32)),
}
NORM_EPSILON = 1e-5  # timm's DaViT norm_eps
STEM_STRIDE, STEM_KERNEL = 4, 7
PADDINGS = ("zeros", "masked")


def decode_variant(variant: str) -> dict:
  """"T" -> dict(embed_dims=(96, 192, 384, 768), depths=(1, 1, 3, 1), num_heads=(3, 6, 12, 24))."""
  if variant not in VARIANTS:
    raise ValueError(f"unknown DaViT variant {variant!r}; valid: {', '.join(VARIANTS)}")
  dims, depths, heads = VARIANTS[variant]
  return dict(embed_dims=dims, depths=depths, num_heads=heads)


def conv(features: int, kernel: int, stride: int, padding, dtype, name: str) -> nn.Conv:
  return nn.Conv(features, (kernel, kernel), strides=stride, padding=padding, dtype=dtype,
                 kernel_init=drawn_as_matrix(nn.initializers.lecun_normal()), name=name)


class Stem(nn.Module):
  """[B, H, W, C] images -> [B, ceil(H/4), ceil(W/4), D]: timm's Stem (pad to a multiple of 4 at
  the bottom and right, 7x7 stride-4 conv with padding 3, LayerNorm)."""
  features: int
  norm_epsilon: float = NORM_EPSILON
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    h, w = x.shape[1:3]
    pad = STEM_KERNEL // 2
    extra = [(-s) % STEM_STRIDE for s in (h, w)]
    x = conv(self.features, STEM_KERNEL, STEM_STRIDE, [(pad, pad + e) for e in extra],
             self.dtype, "conv")(x)
    return nn.LayerNorm(epsilon=self.norm_epsilon, dtype=self.dtype, name="norm")(x)


class Downsample(nn.Module):
  """[B, h, w, C] -> [B, ceil(h/2), ceil(w/2), out]: LayerNorm, zero pad to even, 2x2 stride-2
  conv (timm's Downsample with its default kernel 2)."""
  features: int
  norm_epsilon: float = NORM_EPSILON
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    h, w = x.shape[1:3]
    x = nn.LayerNorm(epsilon=self.norm_epsilon, dtype=self.dtype, name="norm")(x)
    x = jnp.pad(x, [(0, 0), (0, h % 2), (0, w % 2), (0, 0)])
    return conv(self.features, 2, 2, "VALID", self.dtype, "conv")(x)


class DaViT(nn.Module, WithoutTokenReduction):
  """DaViT. Returns (logits, out); out["stage_{s}"] is stage s's [B, h, w, C] map."""
  num_classes: int
  embed_dims: Sequence[int] = (96, 192, 384, 768)
  depths: Sequence[int] = (1, 1, 3, 1)  # dual units (a spatial and a channel block) per stage
  num_heads: Sequence[int] = (3, 6, 12, 24)
  window_size: int = 7
  mlp_ratio: float = 4.0
  image_size: Sequence[int] = (224, 224)
  drop_path: float = 0.0
  dropout: float = 0.0  # before the head (timm's drop_rate)
  qkv_bias: bool = True
  gelu_approximate: bool = False
  norm_epsilon: float = NORM_EPSILON
  padding: str = "zeros"  # windows on a grid they do not divide: "zeros" (timm) or "masked"
  impl: str = "reference"  # of the window attention (the channel attention has one)
  tokens: Any = None   # refused unless none (see validate)
  scan: bool = False   # refused (see validate)
  remat: bool = False
  dtype: Any = jnp.float32

  distill_token = False  # no distillation token: DeiT's distillation recipe does not apply

  # ----- static structure -----
  @property
  def depth(self) -> int:
    """All dual units of all stages (what layer-wise lr decay counts, as timm's blocks)."""
    return int(sum(self.depths))

  @property
  def grid(self) -> tuple:
    return tuple(-(-s // STEM_STRIDE) for s in self.image_size)

  def stage_grids(self) -> list:
    grids = [self.grid]
    for _ in self.depths[1:]:
      grids.append(tuple(-(-g // 2) for g in grids[-1]))
    return grids

  def attention_spec(self, block: int) -> dict:
    """Even blocks of a stage spatial (windows), odd blocks channel attention."""
    if block % 2:
      return {"name": "davit_channel"}
    return {"name": "davit_window", "window_size": self.window_size, "padding": self.padding}

  def block_impl(self, block: int) -> str:
    return "reference" if block % 2 else self.impl

  def stage(self, s: int, parent=None, name: Optional[str] = None) -> Stage:
    """Stage s's encoder blocks (unbound unless a parent is given; `name` names it there)."""
    first = int(sum(self.depths[:s]))
    rates = drop_path_rates(self.drop_path, self.depth)[first:first + self.depths[s]]
    width, grid = self.embed_dims[s], self.stage_grids()[s]
    blocks = [dict(attention=self.attention_spec(j), num_heads=self.num_heads[s],
                   mlp_dim=int(width * self.mlp_ratio), cpe_grid=grid,
                   drop_path_rate=rates[j // 2], qkv_bias=self.qkv_bias,
                   impl=self.block_impl(j), gelu_approximate=self.gelu_approximate,
                   norm_epsilon=self.norm_epsilon, dtype=self.dtype)
              for j in range(2 * self.depths[s])]
    return Stage(blocks=blocks, grid=grid, num_prefix=0, class_token=False, remat=self.remat,
                 dtype=self.dtype, parent=parent, name=name)

  def layer_id(self, path: str) -> int:
    """Layer-wise lr decay's layer of a parameter: 0 for the stem, 1 + the global index of a
    dual unit (both its blocks), a stage's downsampling with that stage's first unit (timm's
    group_matcher), and depth + 1 for the head's norm and the head."""
    parts = path.split("/")
    if parts[0] == "stem":
      return 0
    offsets = np.cumsum([0, *self.depths])
    if parts[0].startswith("stage_") and len(parts) > 1 and parts[1].startswith("block_"):
      unit = int(parts[1][len("block_"):]) // 2
      return 1 + int(offsets[int(parts[0][len("stage_"):])]) + unit
    if parts[0].startswith("downsample_"):
      return 1 + int(offsets[int(parts[0][len("downsample_"):])])
    return self.depth + 1

  def validate(self):
    """Config-time checks; raises ValueError naming what would be valid."""
    self.refuse_tokens_and_scan("DaViT", "its windows and convolutions need the full grid",
                                "spatial and channel blocks alternate (remat=True saves memory "
                                "instead)")
    n = len(self.depths)
    if n < 1 or len(self.num_heads) != n or len(self.embed_dims) != n:
      raise ValueError(f"embed_dims {tuple(self.embed_dims)}, depths {tuple(self.depths)} and "
                       f"num_heads {tuple(self.num_heads)} must name the same number (>= 1) of "
                       "stages")
    if any(int(v) < 1 for v in (*self.depths, *self.num_heads, *self.embed_dims)):
      raise ValueError(f"embed_dims {tuple(self.embed_dims)}, depths {tuple(self.depths)} and "
                       f"num_heads {tuple(self.num_heads)} must be positive ints")
    if self.padding not in PADDINGS:
      raise ValueError(f"DaViT padding {self.padding!r}; valid: {', '.join(PADDINGS)}")
    if len(self.image_size) != 2 or any(int(s) < 1 for s in self.image_size):
      raise ValueError(f"image size {tuple(self.image_size)}; give (height, width), positive")
    for s, (width, heads) in enumerate(zip(self.embed_dims, self.num_heads)):
      if width % heads:
        raise ValueError(f"stage {s} has width {width}, not divisible by its num_heads {heads}; "
                         "use heads dividing embed_dims[s]")
    attn_lib.registry.check(self.attention_spec(0), self.impl)
    for s in range(n):
      self.stage(s).check()

  # ----- forward -----
  @nn.compact
  def __call__(self, images, *, train: bool = False, step=None, progress=None):
    """images [B, H, W, C] -> (logits [B, classes], out: named intermediates)."""
    if tuple(images.shape[1:3]) != tuple(self.image_size):
      raise ValueError(f"images are {images.shape[1]}x{images.shape[2]} but the model was built "
                       f"for {tuple(self.image_size)}")
    x = Stem(self.embed_dims[0], self.norm_epsilon, self.dtype, name="stem")(
        images.astype(self.dtype))
    out = {"stem": x}
    for s, width in enumerate(self.embed_dims):
      if s:
        x = Downsample(width, self.norm_epsilon, self.dtype, name=f"downsample_{s}")(x)
      b, h, w, _ = x.shape
      tokens, _, _ = self.stage(s, self, f"stage_{s}")(x.reshape(b, h * w, width), train=train,
                                                      step=step, progress=progress)
      x = tokens.reshape(b, h, w, width)
      out[f"stage_{s}"] = x
    x = x.mean(axis=(1, 2))
    x = nn.LayerNorm(epsilon=self.norm_epsilon, dtype=self.dtype, name="norm")(x)
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
    """Analytic multiply-accumulates of one image: stem, downsampling, every block's two
    ConvPosEnc convs, its attention as its registry entry counts it, MLPs and the head (norms
    and softmax left out, as in the papers)."""
    grids, widths = self.stage_grids(), self.embed_dims
    total = grids[0][0] * grids[0][1] * STEM_KERNEL ** 2 * channels * widths[0]
    for s, (grid, width) in enumerate(zip(grids, widths)):
      n = grid[0] * grid[1]
      if s:
        total += n * 4 * widths[s - 1] * width
      for j in range(2 * self.depths[s]):
        entry, options = attn_lib.registry.check(self.attention_spec(j), self.block_impl(j))
        total += entry.macs(n, width, self.num_heads[s], num_prefix=0, **options)
        total += 2 * n * width * 9 + 2 * n * width * int(width * self.mlp_ratio)
    return total + widths[-1] * self.num_classes
