"""GC ViT (Hatamizadeh et al. 2023, "Global Context Vision Transformers"): a conv stem, four
stages that alternate local window attention and global query attention at halving resolution,
a normed last stage, pooling, a linear head.

Follows timm's `timm/models/gcvit.py` (huggingface/pytorch-image-models: GlobalContextVit,
GlobalContextVitStage, GlobalContextVitBlock, WindowAttentionGlobal, FeatureBlock, Downsample2d,
MbConvBlock, Stem), the reference for parity, and the official NVlabs/GCVit (models/gc_vit.py:
GCViT, GCViTLayer, GCViTBlock, GlobalQueryGen, FeatExtract, ReduceSize, PatchEmbed):
  stem     3x3 stride-2 conv (bias), then Downsample2d: LayerNorm, an MbConv block (depthwise 3x3,
           GELU, squeeze-and-excitation, 1x1 conv, residual; `vitjax.attention.gcvit.MbConv`),
           a 3x3 stride-2 conv without bias, LayerNorm: 1/4 of the image, embed_dim channels;
  stage s  (s > 0) Downsample2d to twice the width at half the grid; the global query tokens
           G = FeatureBlock(x) (log2(grid / window) times MbConv + 3x3 stride-2 max pool, or one
           MbConv when the grid is the window: exactly one window of tokens); then depth_s
           blocks (`vitjax.models.stage.Block`, LayerScale in S and B), even ones local window
           attention (`window`: Swin's W-MSA with relative position bias, no shift), odd ones
           global query attention (`gcvit_global`, G handed to it in the attention context);
  head     LayerNorm after the last stage, global average pool, (dropout,) Linear.
LayerNorm epsilon is 1e-5 everywhere, GELU is exact, qkv projections have biases, stochastic
depth rises linearly over all blocks. Windows: timm's window_ratio (32, 32, 16, 32): the window of
stage s is image_size // window_ratio[s] (7, 7, 14, 7 at 224 px), or window_size if given.

Official code and timm differ, and this follows timm, in: the squeeze-and-excitation width
(make_divisible(C / 4, 8) against int(C / 4), the same at GC ViT's widths); dropout (timm's
drop_rate only before the head; the official drop_rate also after the stem and in the blocks);
and the place of the downsampling (timm: at the start of a stage, so its global queries come from
the downsampled map; official: at the end of the previous stage; the same network).

Variants ("XXT", "XT", "T", "S", "B"): timm's gcvit_{xxtiny,xtiny,tiny,small,base}; parameter
counts equal timm's with 1000 classes (XXT 11,995,428; XT 19,981,294; T 28,221,974; S 51,092,173;
B 90,320,836).

Deviations (own design, also in the README):
- Initialisation: flax defaults (LeCun normal kernels, zero biases), the tables N(0, .02^2)
  truncated, and a zero-initialised head, as vitjax's Swin; timm keeps PyTorch's defaults.
- Stage grids must be the window times a power of 2 (what timm's reshapes assume); other image
  sizes are refused when the model is built.
- No token reduction and no scanned blocks: local and global blocks alternate and the windows,
  convolutions and global queries need the full grid; both are refused when the model is built.
"""
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from vitjax import attention as attn_lib
from vitjax.attention import gcvit as gc
from vitjax.attention.spatial import pair
from vitjax.models.stage import Stage, WithoutTokenReduction, drop_path_rates

# name: (embed_dim, depths, num_heads, mlp_ratio, layer_scale)
VARIANTS = {
    "XXT": (64, (2, 2, 6, 2), (2, 4, 8, 16), 3.0, None),
    "XT": (64, (3, 4, 6, 5), (2, 4, 8, 16), 3.0, None),
    "T": (64, (3, 4, 19, 5), (2, 4, 8, 16), 3.0, None),
    "S": (96, (3, 4, 19, 5), (3, 6, 12, 24), 2.0, 1e-5),
    "B": (128, (3, 4, 19, 5), (4, 8, 16, 32), 2.0, 1e-5),
}
NORM_EPSILON = 1e-5  # timm's GC ViT norm_eps
STEM_STRIDE = 4


def decode_variant(variant: str) -> dict:
  """"T" -> dict(embed_dim=64, depths=(3, 4, 19, 5), num_heads=(2, 4, 8, 16), mlp_ratio=3.0,
  layer_scale=None)."""
  if variant not in VARIANTS:
    raise ValueError(f"unknown GC ViT variant {variant!r}; valid: {', '.join(VARIANTS)}")
  dim, depths, heads, ratio, scale = VARIANTS[variant]
  return dict(embed_dim=dim, depths=depths, num_heads=heads, mlp_ratio=ratio, layer_scale=scale)


class Downsample2d(nn.Module):
  """timm's Downsample2d: [B, h, w, C] -> [B, ceil(h/2), ceil(w/2), out]: LayerNorm, MbConv,
  3x3 stride-2 conv (padding 1, no bias), LayerNorm (the official ReduceSize)."""
  features: int
  norm_epsilon: float = NORM_EPSILON
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = nn.LayerNorm(epsilon=self.norm_epsilon, dtype=self.dtype, name="norm1")(x)
    x = gc.MbConv(self.dtype, name="conv_block")(x)
    x = gc.conv(self.features, 3, self.dtype, "reduction", stride=2)(x)
    return nn.LayerNorm(epsilon=self.norm_epsilon, dtype=self.dtype, name="norm2")(x)


class Stem(nn.Module):
  """timm's Stem (the official PatchEmbed): a 3x3 stride-2 conv with bias, then Downsample2d at
  the same width: [B, H, W, C] -> [B, ceil(H/4), ceil(W/4), D]."""
  features: int
  norm_epsilon: float = NORM_EPSILON
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = gc.conv(self.features, 3, self.dtype, "conv1", stride=2, bias=True)(x)
    return Downsample2d(self.features, self.norm_epsilon, self.dtype, name="down")(x)


class GCViT(nn.Module, WithoutTokenReduction):
  """GC ViT. Returns (logits, out); out["stage_{s}"] is stage s's [B, h, w, C] map and
  out["global_query_{s}"] its [B, wh, ww, C] global query tokens."""
  num_classes: int
  embed_dim: int = 64
  depths: Sequence[int] = (3, 4, 19, 5)
  num_heads: Sequence[int] = (2, 4, 8, 16)
  window_ratio: Sequence[int] = (32, 32, 16, 32)  # window of stage s: image_size // ratio
  window_size: Any = None  # an int or per-stage ints / pairs; overrides window_ratio
  mlp_ratio: float = 3.0
  layer_scale: Optional[float] = None
  image_size: Sequence[int] = (224, 224)
  drop_path: float = 0.0
  dropout: float = 0.0  # before the head (timm's drop_rate)
  qkv_bias: bool = True
  gelu_approximate: bool = False
  norm_epsilon: float = NORM_EPSILON
  impl: str = "reference"
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
    return tuple(-(-s // STEM_STRIDE) for s in self.image_size)

  def widths(self) -> list:
    return [self.embed_dim * 2 ** s for s in range(len(self.depths))]

  def stage_grids(self) -> list:
    grids = [self.grid]
    for _ in self.depths[1:]:
      grids.append(tuple(-(-g // 2) for g in grids[-1]))
    return grids

  def windows(self) -> list:
    """(wh, ww) of every stage."""
    n = len(self.depths)
    if self.window_size is None:
      return [tuple(s // r for s in self.image_size) for r in self.window_ratio[:n]]
    if isinstance(self.window_size, (int, np.integer)):
      return [(int(self.window_size),) * 2] * n
    return [pair(w) for w in self.window_size[:n]]

  def feature_levels(self, s: int) -> Optional[int]:
    return gc.feature_levels(self.stage_grids()[s], self.windows()[s])

  def attention_spec(self, s: int, block: int) -> dict:
    """Even blocks of a stage local window attention, odd blocks global query attention."""
    name = "gcvit_global" if block % 2 else "window"
    spec = {"name": name, "window_size": self.windows()[s]}
    return spec if block % 2 else {**spec, "shift_size": 0}

  def stage(self, s: int, parent=None, name: Optional[str] = None) -> Stage:
    """Stage s's encoder blocks (unbound unless a parent is given; `name` names it there)."""
    first = int(sum(self.depths[:s]))
    rates = drop_path_rates(self.drop_path, self.depth)[first:first + self.depths[s]]
    width = self.widths()[s]
    blocks = [dict(attention=self.attention_spec(s, j), num_heads=self.num_heads[s],
                   mlp_dim=int(width * self.mlp_ratio), drop_path_rate=rates[j],
                   layerscale=self.layer_scale, qkv_bias=self.qkv_bias, impl=self.impl,
                   gelu_approximate=self.gelu_approximate, norm_epsilon=self.norm_epsilon,
                   dtype=self.dtype)
              for j in range(self.depths[s])]
    return Stage(blocks=blocks, grid=self.stage_grids()[s], num_prefix=0, class_token=False,
                 first_block=first, remat=self.remat, dtype=self.dtype, parent=parent, name=name)

  def layer_id(self, path: str) -> int:
    """Layer-wise lr decay's layer of a parameter: 0 for the stem, 1 + the global index of a
    block, a stage's downsampling and global query generator with that stage's first block, and
    depth + 1 for the final norm and the head."""
    parts = path.split("/")
    if parts[0] == "stem":
      return 0
    if parts[0].startswith("stage_") and len(parts) > 1 and parts[1].startswith("block_"):
      return 1 + int(parts[1][len("block_"):])
    offsets = np.cumsum([0, *self.depths])
    for prefix in ("downsample_", "global_"):
      if parts[0].startswith(prefix):
        return 1 + int(offsets[int(parts[0][len(prefix):])])
    return self.depth + 1

  def validate(self):
    """Config-time checks; raises ValueError naming what would be valid."""
    self.refuse_tokens_and_scan("GC ViT", "its windows, convolutions and global queries need the "
                                "full grid", "local and global blocks alternate (remat=True saves "
                                "memory instead)")
    n = len(self.depths)
    if n < 1 or len(self.num_heads) != n:
      raise ValueError(f"depths {tuple(self.depths)} and num_heads {tuple(self.num_heads)} must "
                       "name the same number (>= 1) of stages")
    if any(int(v) < 1 for v in (*self.depths, *self.num_heads, self.embed_dim)):
      raise ValueError(f"embed_dim {self.embed_dim}, depths {tuple(self.depths)} and num_heads "
                       f"{tuple(self.num_heads)} must be positive ints")
    if len(self.image_size) != 2 or any(int(s) < 1 for s in self.image_size):
      raise ValueError(f"image size {tuple(self.image_size)}; give (height, width), positive")
    per_stage = self.window_ratio if self.window_size is None else self.window_size
    if not isinstance(per_stage, (int, np.integer)) and len(per_stage) < n:
      raise ValueError(f"{'window_ratio' if self.window_size is None else 'window_size'} "
                       f"{tuple(per_stage)} names fewer than the {n} stages; give one per stage")
    for s, (width, heads) in enumerate(zip(self.widths(), self.num_heads)):
      if width % heads:
        raise ValueError(f"stage {s} has width {width}, not divisible by its num_heads {heads}; "
                         "use heads dividing embed_dim * 2^s")
      grid, window = self.stage_grids()[s], self.windows()[s]
      if min(window) < 1 or self.feature_levels(s) is None:
        raise ValueError(f"stage {s} has a {grid[0]}x{grid[1]} grid and a {window[0]}x"
                         f"{window[1]} window; GC ViT needs the grid to be the window times a "
                         "power of 2 on both axes (choose image_size and window_size so)")
    attn_lib.registry.check(self.attention_spec(0, 1), self.impl)
    for s in range(n):
      self.stage(s).check()

  # ----- forward -----
  @nn.compact
  def __call__(self, images, *, train: bool = False, step=None, progress=None):
    """images [B, H, W, C] -> (logits [B, classes], out: named intermediates)."""
    if tuple(images.shape[1:3]) != tuple(self.image_size):
      raise ValueError(f"images are {images.shape[1]}x{images.shape[2]} but the model was built "
                       f"for {tuple(self.image_size)}")
    x = Stem(self.embed_dim, self.norm_epsilon, self.dtype, name="stem")(images.astype(self.dtype))
    out = {"stem": x}
    for s, width in enumerate(self.widths()):
      if s:
        x = Downsample2d(width, self.norm_epsilon, self.dtype, name=f"downsample_{s}")(x)
      b, h, w, _ = x.shape
      query = gc.FeatureBlock(self.feature_levels(s), self.dtype, name=f"global_{s}")(x)
      out[f"global_query_{s}"] = query
      tokens, _, _ = self.stage(s, self, f"stage_{s}")(
          x.reshape(b, h * w, width), train=train, step=step, progress=progress,
          global_query=query.reshape(b, -1, width))
      x = tokens.reshape(b, h, w, width)
      out[f"stage_{s}"] = x
    x = nn.LayerNorm(epsilon=self.norm_epsilon, dtype=self.dtype, name="norm")(x)
    out["encoded"] = x
    x = x.mean(axis=(1, 2))
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
    """Analytic multiply-accumulates of one image: stem, downsampling, the global query
    generators, every block's attention as its registry entry counts it (the global queries
    given), MLPs and the head (norms, activations, pooling and softmax left out)."""
    grids, widths = self.stage_grids(), self.widths()
    half = tuple(-(-s // 2) for s in self.image_size)
    total = half[0] * half[1] * 9 * channels * widths[0] + downsample_macs(half, widths[0],
                                                                            widths[0])
    for s, (grid, width) in enumerate(zip(grids, widths)):
      n = grid[0] * grid[1]
      if s:
        total += downsample_macs(grids[s - 1], widths[s - 1], width)
      total += gc.feature_macs(grid, self.feature_levels(s), width)
      for j in range(self.depths[s]):
        entry, options = attn_lib.registry.check(self.attention_spec(s, j), self.impl)
        if j % 2:
          options["derived"] = False
        total += entry.macs(n, width, self.num_heads[s], num_prefix=0, **options)
        total += 2 * n * width * int(width * self.mlp_ratio)
    return total + widths[-1] * self.num_classes


def downsample_macs(grid, width: int, out: int) -> int:
  """Downsample2d on a grid: its MbConv and the 3x3 stride-2 conv."""
  reduced = (-(-grid[0] // 2)) * (-(-grid[1] // 2))
  return gc.feature_macs(grid, 0, width) + reduced * 9 * width * out
