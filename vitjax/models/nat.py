"""NAT and DiNAT: the Neighborhood Attention Transformer (Hassani et al. 2023) and the Dilated
Neighborhood Attention Transformer (Hassani & Shi 2022), a convolutional tokenizer, four encoder
stages at halving resolution, average pooling.

Follows the official code, SHI-Labs/Neighborhood-Attention-Transformer
`classification/nat.py` (NAT, NATBlock, NATLayer, ConvTokenizer, ConvDownsampler) and
`classification/dinat.py` (DiNAT: NAT with per-block dilations):
  stem     ConvTokenizer: 3x3 stride-2 convolution to embed/2 channels, 3x3 stride-2 convolution
           to embed channels (both padding 1, with bias, no activation between), LayerNorm;
  stage s  (s > 0) ConvDownsampler: 3x3 stride-2 convolution C -> 2C (padding 1, no bias),
           LayerNorm (the official code runs it at the end of stage s - 1; here it opens stage s,
           as Swin's patch merging); then depth_s pre-norm blocks (`vitjax.models.stage`) with
           neighbourhood attention (`neighborhood`, kernel 7, natten's relative position bias
           `rpb`) and an MLP of ratio 3 (M, T) or 2 (S, B, L); layer scale 1e-5 where the
           official variant has it (NAT-S, NAT-B, DiNAT-B);
  head     LayerNorm, global average pool, Linear.
DiNAT alternates NA (dilation 1, even blocks) and DiNA (`dilated_neighborhood`, odd blocks) with
dilation max(1, min(h, w) // kernel) of the stage's grid: the official lists (8, 4, 2, 1) at
224 px and (13, 6, 3, 1) at 384 px, which the rule gives; `dilations` (one list per stage, one
int per block) sets them explicitly, as the official constructor argument.
LayerNorm epsilon is PyTorch's 1e-5, stochastic depth rises linearly over all blocks, and the
relative position tables are not weight-decayed (the official no_weight_decay_keywords {"rpb"}).

Variants ("M", "T", "S", "B"; DiNAT also "L"): the official nat_{mini,tiny,small,base} and
dinat_{mini,tiny,small,base,large}; parameter counts equal the official models' (tests/test_nat.py).

Deviations (own design, also in the README):
- A stage grid smaller than kernel x dilation is refused when the model is built; natten pads such
  a grid with zero tokens up to kernel x dilation and attends to them. Where every grid is at least
  kernel x dilation (193 px and up with kernel 7 and DiNAT's rule) the two agree.
- Initialisation: flax defaults (LeCun normal kernels, zero biases) and a zero-initialised head,
  as vitjax's ViT and Swin; the official code draws every Linear from a truncated normal (std
  0.02) and keeps PyTorch's convolution init. The `rpb` tables are N(0, 0.02^2) truncated at +-2.
- drop_path defaults to 0.0 (vitjax's ViT default); the official recipes use 0.2 (M, T), 0.3 (S),
  0.5 (B), 0.35 (DiNAT-L).
- No token reduction and no scanned blocks: neighbourhood attention needs the full grid, and a
  DiNAT stage's blocks differ in dilation; both are refused when the model is built.
"""
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from vitjax import attention as attn_lib
from vitjax.models.stage import (Stage, WithoutTokenReduction, drawn_as_matrix, drop_path_rates,
                                 pyramid)

# name: (embed_dim, depths, num_heads, mlp_ratio, layer scale)
NAT_VARIANTS = {
    "M": (64, (3, 4, 6, 5), (2, 4, 8, 16), 3.0, None),
    "T": (64, (3, 4, 18, 5), (2, 4, 8, 16), 3.0, None),
    "S": (96, (3, 4, 18, 5), (3, 6, 12, 24), 2.0, 1e-5),
    "B": (128, (3, 4, 18, 5), (4, 8, 16, 32), 2.0, 1e-5),
}
# The official DiNAT-S has no layer scale (NAT-S has); DiNAT adds L.
DINAT_VARIANTS = {
    **NAT_VARIANTS,
    "S": (96, (3, 4, 18, 5), (3, 6, 12, 24), 2.0, None),
    "L": (192, (3, 4, 18, 5), (6, 12, 24, 48), 2.0, None),
}
NORM_EPSILON = 1e-5  # PyTorch's LayerNorm default, which the official code keeps
EMBEDDING = ("embedding_conv_0", "embedding_conv_1", "embedding_norm")


def variant_decoder(family: str, variants: dict):
  def decode_variant(variant: str) -> dict:
    """"T" -> dict(embed_dim=64, depths=(3, 4, 18, 5), num_heads=(2, 4, 8, 16), ...)."""
    if variant not in variants:
      raise ValueError(f"unknown {family} variant {variant!r}; valid: {', '.join(variants)}")
    embed_dim, depths, heads, mlp_ratio, layerscale = variants[variant]
    return dict(embed_dim=embed_dim, depths=depths, num_heads=heads, mlp_ratio=mlp_ratio,
                layerscale=layerscale)
  return decode_variant


decode_variant = variant_decoder("NAT", NAT_VARIANTS)
decode_dinat_variant = variant_decoder("DiNAT", DINAT_VARIANTS)


def conv3x3_stride2(features: int, use_bias: bool, dtype, name: str) -> nn.Conv:
  """PyTorch's Conv2d(kernel 3, stride 2, padding 1): an h x w map becomes ceil(h/2) x ceil(w/2)."""
  return nn.Conv(features, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), use_bias=use_bias,
                 dtype=dtype, kernel_init=drawn_as_matrix(nn.initializers.lecun_normal()),
                 name=name)


class ConvDownsampler(nn.Module):
  """[B, h, w, C] -> [B, ceil(h/2), ceil(w/2), out_dim]: 3x3 stride-2 conv (no bias), LayerNorm."""
  out_dim: int
  norm_epsilon: float = NORM_EPSILON
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = conv3x3_stride2(self.out_dim, False, self.dtype, "reduction")(x)
    return nn.LayerNorm(epsilon=self.norm_epsilon, dtype=self.dtype, name="norm")(x)


class NAT(nn.Module, WithoutTokenReduction):
  """Neighborhood Attention Transformer. Returns (logits, out); out["stage_{s}"] is stage s's
  [B, h, w, C] map."""
  num_classes: int
  embed_dim: int = 64
  depths: Sequence[int] = (3, 4, 18, 5)
  num_heads: Sequence[int] = (2, 4, 8, 16)
  kernel_size: int = 7
  dilations: Optional[Sequence[Sequence[int]]] = None  # per stage, per block; None: the family's
  mlp_ratio: float = 3.0
  layerscale: Optional[float] = None
  image_size: Sequence[int] = (224, 224)
  drop_path: float = 0.0
  dropout: float = 0.0
  attn_dropout: float = 0.0
  qkv_bias: bool = True
  gelu_approximate: bool = False
  norm_epsilon: float = NORM_EPSILON
  impl: str = "reference"
  tokens: Any = None   # refused unless none (see validate)
  scan: bool = False   # refused (see validate)
  remat: bool = False
  dtype: Any = jnp.float32

  family = "NAT"
  distill_token = False  # no distillation token: DeiT's distillation recipe does not apply

  # ----- static structure -----
  @property
  def depth(self) -> int:
    """All blocks of all stages (what layer-wise lr decay counts)."""
    return int(sum(self.depths))

  @property
  def grid(self) -> tuple:
    """The stem's output grid: two stride-2 convolutions."""
    return tuple(-(-(-(-s // 2)) // 2) for s in self.image_size)

  def stage_grids(self) -> list:
    grids = [self.grid]
    for _ in self.depths[1:]:
      grids.append(tuple(-(-g // 2) for g in grids[-1]))
    return grids

  def widths(self) -> list:
    return [self.embed_dim * 2 ** s for s in range(len(self.depths))]

  def default_dilation(self, s: int, block: int) -> int:
    """NAT: no dilation."""
    del s, block
    return 1

  def block_dilations(self, s: int) -> list:
    if self.dilations is not None:
      return [int(d) for d in self.dilations[s]]
    return [self.default_dilation(s, j) for j in range(self.depths[s])]

  def attention_spec(self, s: int, block: int) -> dict:
    """NA where the block's dilation is 1, DiNA (the dilated entry) elsewhere."""
    dilation = self.block_dilations(s)[block]
    name = "neighborhood" if dilation == 1 else "dilated_neighborhood"
    return {"name": name, "kernel_size": self.kernel_size, "dilation": dilation}

  def stage(self, s: int, parent=None, name: Optional[str] = None) -> Stage:
    """Stage s's encoder blocks (unbound unless a parent is given; `name` names it there)."""
    first = int(sum(self.depths[:s]))
    rates = drop_path_rates(self.drop_path, self.depth)[first:first + self.depths[s]]
    width = self.widths()[s]
    blocks = [dict(attention=self.attention_spec(s, j), num_heads=self.num_heads[s],
                   mlp_dim=int(width * self.mlp_ratio), dropout=self.dropout,
                   attn_dropout=self.attn_dropout, drop_path_rate=rate, qkv_bias=self.qkv_bias,
                   layerscale=self.layerscale, impl=self.impl,
                   gelu_approximate=self.gelu_approximate, norm_epsilon=self.norm_epsilon,
                   dtype=self.dtype)
              for j, rate in enumerate(rates)]
    return Stage(blocks=blocks, grid=self.stage_grids()[s], num_prefix=0, class_token=False,
                 remat=self.remat, dtype=self.dtype, parent=parent, name=name)

  def layer_id(self, path: str) -> int:
    """Layer-wise lr decay's layer of a parameter: 0 for the stem, 1 + the global index of a
    block, a stage's downsampler with that stage's first block, depth + 1 for the final norm
    and the head."""
    parts = path.split("/")
    first = parts[0]
    if first in EMBEDDING:
      return 0
    offsets = np.cumsum([0, *self.depths])
    if first.startswith("stage_") and len(parts) > 1 and parts[1].startswith("block_"):
      return 1 + int(offsets[int(first[len("stage_"):])]) + int(parts[1][len("block_"):])
    if first.startswith("merge_"):
      return 1 + int(offsets[int(first[len("merge_"):])])
    return self.depth + 1

  def validate(self):
    """Config-time checks; raises ValueError naming what would be valid."""
    family = self.family
    self.refuse_tokens_and_scan(family, "its neighbourhood attention needs the full grid",
                                "its stages' blocks are built one by one (remat=True saves "
                                "memory instead)")
    n = len(self.depths)
    if n < 1 or len(self.num_heads) != n:
      raise ValueError(f"depths {tuple(self.depths)} and num_heads {tuple(self.num_heads)} must "
                       "name the same number (>= 1) of stages")
    if any(int(d) < 1 for d in self.depths) or any(int(h) < 1 for h in self.num_heads):
      raise ValueError(f"depths {tuple(self.depths)} and num_heads {tuple(self.num_heads)} must "
                       "be positive ints")
    if self.embed_dim % 2:
      raise ValueError(f"embed_dim {self.embed_dim} is odd; the tokenizer's first convolution "
                       "has embed_dim // 2 channels, use an even embed_dim")
    if self.kernel_size < 1 or self.kernel_size % 2 == 0:
      raise ValueError(f"kernel_size {self.kernel_size}; neighbourhood attention needs an odd "
                       "kernel_size >= 1 (the official models use 7)")
    if self.dilations is not None:
      shape = [len(d) for d in self.dilations]
      if shape != [int(d) for d in self.depths]:
        raise ValueError(f"dilations give {shape} blocks per stage for depths "
                         f"{tuple(self.depths)}; give one dilation per block of each stage")
      if any(int(d) < 1 for ds in self.dilations for d in ds):
        raise ValueError(f"dilations {self.dilations} must be ints >= 1")
    for s, (width, heads) in enumerate(zip(self.widths(), self.num_heads)):
      if width % heads:
        raise ValueError(f"stage {s} has width {width}, not divisible by its num_heads {heads}; "
                         "use heads dividing embed_dim * 2**stage")
    for s, grid in enumerate(self.stage_grids()):
      need = self.kernel_size * max(self.block_dilations(s))
      if min(grid) < need:
        raise ValueError(f"stage {s}'s grid {grid[0]}x{grid[1]} (image "
                         f"{tuple(self.image_size)}) is smaller than kernel x dilation = {need}; "
                         f"use a larger image, a smaller kernel_size or dilation")
    attn_lib.registry.check(self.attention_spec(0, 0), self.impl)
    for s in range(n):
      self.stage(s).check()

  # ----- forward -----
  def embed(self, images):
    """ConvTokenizer: two 3x3 stride-2 convolutions (embed/2, then embed channels), LayerNorm."""
    b, h, w, c = images.shape
    del b, c
    if (h, w) != tuple(self.image_size):
      raise ValueError(f"images are {h}x{w} but the model was built for {tuple(self.image_size)}")
    x = images.astype(self.dtype)
    x = conv3x3_stride2(self.embed_dim // 2, True, self.dtype, "embedding_conv_0")(x)
    x = conv3x3_stride2(self.embed_dim, True, self.dtype, "embedding_conv_1")(x)
    return nn.LayerNorm(epsilon=self.norm_epsilon, dtype=self.dtype, name="embedding_norm")(x)

  @nn.compact
  def __call__(self, images, *, train: bool = False, step=None, progress=None):
    """images [B, H, W, C] -> (logits [B, classes], out: named intermediates)."""
    x = self.embed(images)
    return pyramid(self, x, ConvDownsampler, train=train, step=step, progress=progress)

  # ----- cost -----
  def macs(self, channels: int = 3) -> int:
    """Analytic multiply-accumulates of one image: tokenizer and downsampler convolutions, every
    block's attention as its registry entry counts it, MLPs and the head (norms and softmax left
    out, as in the papers)."""
    grids, widths = self.stage_grids(), self.widths()
    half = tuple(-(-s // 2) for s in self.image_size)
    total = half[0] * half[1] * 9 * channels * (self.embed_dim // 2)
    total += grids[0][0] * grids[0][1] * 9 * (self.embed_dim // 2) * widths[0]
    for s, (grid, width) in enumerate(zip(grids, widths)):
      n = grid[0] * grid[1]
      if s:
        total += n * 9 * widths[s - 1] * width
      for j in range(self.depths[s]):
        entry, options = attn_lib.registry.check(self.attention_spec(s, j), self.impl)
        total += entry.macs(n, width, self.num_heads[s], num_prefix=0, **options)
        total += 2 * n * width * int(width * self.mlp_ratio)
    return total + widths[-1] * self.num_classes


class DiNAT(NAT):
  """Dilated Neighborhood Attention Transformer: NAT whose odd blocks are dilated by
  max(1, min(h, w) // kernel) of their stage's grid (unless `dilations` says otherwise)."""
  family = "DiNAT"

  def default_dilation(self, s: int, block: int) -> int:
    if block % 2 == 0:
      return 1
    return max(1, min(self.stage_grids()[s]) // self.kernel_size)
