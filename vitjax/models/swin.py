"""The Swin Transformer (Liu et al. 2021, "Swin Transformer: Hierarchical Vision Transformer using
Shifted Windows"): a patch stem, four encoder stages at halving resolution, average pooling.

Follows timm's `timm/models/swin_transformer.py` (huggingface/pytorch-image-models:
SwinTransformer, SwinTransformerStage, PatchMerging) and the official
microsoft/Swin-Transformer `models/swin_transformer.py`:
  stem     4x4 stride-4 convolution (patch embedding) + LayerNorm;
  stage s  (s > 0) PatchMerging: the 2x2 neighbours concatenated in timm's order (row 0 col 0,
           row 1 col 0, row 0 col 1, row 1 col 1), LayerNorm(4C), Linear 4C -> 2C without bias;
           then depth_s blocks (`vitjax.models.stage`), alternating W-MSA (`window`) and SW-MSA
           (`shifted_window`, shift = window // 2) with relative position bias; a window no
           smaller than the stage's grid becomes the grid and is not shifted (per axis, as timm);
  head     LayerNorm, global average pool, Linear.
LayerNorm epsilon is PyTorch's 1e-5 (timm's Swin), stochastic depth rises linearly over all
blocks, and the relative position tables are not weight-decayed (timm's no_weight_decay).

Variants ("T", "S", "B", "L"): timm's swin_{tiny,small,base,large}_patch4_window7_224; parameter
counts equal timm's (T 28,288,354; S 49,606,258; B 87,768,224; L 196,532,476 with 1000 classes).

Deviations (own design, also in the README):
- Grids that the window does not divide are padded at the bottom and right with keys that get no
  weight (the window attention's rule); timm rolls, then pads with zero tokens that are attended.
  Where every stage's grid divides by the window or is smaller than it (224 px with window 7, or
  384 px with window 12) the two agree. An odd grid is zero-padded before merging, as timm does.
- Initialisation: flax defaults (LeCun normal kernels, zero biases) and a zero-initialised head,
  as vitjax's ViT; timm draws every Linear from a truncated normal (std 0.02). The relative
  position tables are N(0, 0.02^2) truncated at +-2, as timm.
- drop_path defaults to 0.0 (vitjax's ViT default); timm's recipes use 0.2 / 0.3 / 0.5 (T / S / B).
- No token reduction and no scanned blocks: the blocks of a stage differ (window vs shifted), and
  a reducer would break the grid the windows need; both are refused when the model is built.
"""
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from vitjax import attention as attn_lib
from vitjax.models.stage import Stage, WithoutTokenReduction, drop_path_rates, pyramid

# name: (embed_dim, depths, num_heads)
VARIANTS = {
    "T": (96, (2, 2, 6, 2), (3, 6, 12, 24)),
    "S": (96, (2, 2, 18, 2), (3, 6, 12, 24)),
    "B": (128, (2, 2, 18, 2), (4, 8, 16, 32)),
    "L": (192, (2, 2, 18, 2), (6, 12, 24, 48)),
}
NORM_EPSILON = 1e-5  # PyTorch's LayerNorm default, which timm's Swin keeps
EMBEDDING = ("embedding_kernel", "embedding_bias", "embedding_norm")


def decode_variant(variant: str) -> dict:
  """"T" -> dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))."""
  if variant not in VARIANTS:
    raise ValueError(f"unknown Swin variant {variant!r}; valid: {', '.join(VARIANTS)}")
  embed_dim, depths, heads = VARIANTS[variant]
  return dict(embed_dim=embed_dim, depths=depths, num_heads=heads)


class PatchMerging(nn.Module):
  """[B, h, w, C] -> [B, ceil(h/2), ceil(w/2), out_dim]: 2x2 neighbours concatenated, normed,
  projected (timm's PatchMerging; an odd side is zero-padded first)."""
  out_dim: int
  norm_epsilon: float = NORM_EPSILON
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    x = jnp.pad(x, [(0, 0), (0, h % 2), (0, w % 2), (0, 0)])
    h, w = x.shape[1] // 2, x.shape[2] // 2
    # [B, h, dy, w, dx, C] -> [B, h, w, dx, dy, C]: channel blocks in timm's (and the official
    # x0, x1, x2, x3) order, so that the reduction's input rows line up with theirs
    x = x.reshape(b, h, 2, w, 2, c).transpose(0, 1, 3, 4, 2, 5).reshape(b, h, w, 4 * c)
    x = nn.LayerNorm(epsilon=self.norm_epsilon, dtype=self.dtype, name="norm")(x)
    return nn.Dense(self.out_dim, use_bias=False, dtype=self.dtype, name="reduction")(x)


class Swin(nn.Module, WithoutTokenReduction):
  """Swin Transformer. Returns (logits, out); out["stage_{s}"] is stage s's [B, h, w, C] map."""
  num_classes: int
  patch_size: int = 4
  embed_dim: int = 96
  depths: Sequence[int] = (2, 2, 6, 2)
  num_heads: Sequence[int] = (3, 6, 12, 24)
  window_size: int = 7
  mlp_ratio: float = 4.0
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

  distill_token = False  # no distillation token: DeiT's distillation recipe does not apply

  # ----- static structure -----
  @property
  def depth(self) -> int:
    """All blocks of all stages (what layer-wise lr decay counts)."""
    return int(sum(self.depths))

  @property
  def grid(self) -> tuple:
    return tuple(s // self.patch_size for s in self.image_size)

  def stage_grids(self) -> list:
    grids = [self.grid]
    for _ in self.depths[1:]:
      grids.append(tuple(-(-g // 2) for g in grids[-1]))
    return grids

  def widths(self) -> list:
    return [self.embed_dim * 2 ** s for s in range(len(self.depths))]

  def attention_spec(self, block: int) -> dict:
    """Even blocks W-MSA, odd blocks SW-MSA (the official and timm's alternation)."""
    name = "window" if block % 2 == 0 else "shifted_window"
    return {"name": name, "window_size": self.window_size}

  def stage(self, s: int, parent=None, name: Optional[str] = None) -> Stage:
    """Stage s's encoder blocks (unbound unless a parent is given; `name` names it there)."""
    first = int(sum(self.depths[:s]))
    rates = drop_path_rates(self.drop_path, self.depth)[first:first + self.depths[s]]
    width = self.widths()[s]
    blocks = [dict(attention=self.attention_spec(j), num_heads=self.num_heads[s],
                   mlp_dim=int(width * self.mlp_ratio), dropout=self.dropout,
                   attn_dropout=self.attn_dropout, drop_path_rate=rate, qkv_bias=self.qkv_bias,
                   impl=self.impl, gelu_approximate=self.gelu_approximate,
                   norm_epsilon=self.norm_epsilon, dtype=self.dtype)
              for j, rate in enumerate(rates)]
    return Stage(blocks=blocks, grid=self.stage_grids()[s], num_prefix=0, class_token=False,
                 remat=self.remat, dtype=self.dtype, parent=parent, name=name)

  def layer_id(self, path: str) -> int:
    """Layer-wise lr decay's layer of a parameter: 0 for the stem, 1 + the global index of a
    block, a stage's patch merging with that stage's first block (timm's group_matcher), and
    depth + 1 for the final norm and the head."""
    first = path.split("/")[0]
    if first in EMBEDDING:
      return 0
    parts = path.split("/")
    offsets = np.cumsum([0, *self.depths])
    if first.startswith("stage_") and len(parts) > 1 and parts[1].startswith("block_"):
      return 1 + int(offsets[int(first[len("stage_"):])]) + int(parts[1][len("block_"):])
    if first.startswith("merge_"):
      return 1 + int(offsets[int(first[len("merge_"):])])
    return self.depth + 1

  def validate(self):
    """Config-time checks; raises ValueError naming what would be valid."""
    self.refuse_tokens_and_scan("Swin", "its window attention needs the full grid",
                                "window and shifted-window blocks alternate (remat=True saves "
                                "memory instead)")
    n = len(self.depths)
    if n < 1 or len(self.num_heads) != n:
      raise ValueError(f"depths {tuple(self.depths)} and num_heads {tuple(self.num_heads)} must "
                       "name the same number (>= 1) of stages")
    if any(int(d) < 1 for d in self.depths) or any(int(h) < 1 for h in self.num_heads):
      raise ValueError(f"depths {tuple(self.depths)} and num_heads {tuple(self.num_heads)} must "
                       "be positive ints")
    for s in self.image_size:
      if s % self.patch_size:
        raise ValueError(f"image size {tuple(self.image_size)} is not divisible by the patch "
                         f"size {self.patch_size}")
    for s, (width, heads) in enumerate(zip(self.widths(), self.num_heads)):
      if width % heads:
        raise ValueError(f"stage {s} has width {width}, not divisible by its num_heads {heads}; "
                         "use heads dividing embed_dim * 2**stage")
    attn_lib.registry.check(self.attention_spec(0), self.impl)
    for s in range(n):
      self.stage(s).check()

  # ----- forward -----
  def embed(self, images):
    """4x4 stride-4 convolution as a reshape + matmul (same parameters), then LayerNorm."""
    p, d = self.patch_size, self.embed_dim
    b, h, w, c = images.shape
    if (h, w) != tuple(self.image_size):
      raise ValueError(f"images are {h}x{w} but the model was built for {tuple(self.image_size)}")
    kernel = self.param("embedding_kernel",
                        nn.initializers.lecun_normal(in_axis=(0, 1, 2), out_axis=3), (p, p, c, d))
    bias = self.param("embedding_bias", nn.initializers.zeros, (d,))
    x = images.astype(self.dtype).reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    x = jnp.einsum("bhwpqc,pqcd->bhwd", x, kernel.astype(self.dtype)) + bias.astype(self.dtype)
    return nn.LayerNorm(epsilon=self.norm_epsilon, dtype=self.dtype, name="embedding_norm")(x)

  @nn.compact
  def __call__(self, images, *, train: bool = False, step=None, progress=None):
    """images [B, H, W, C] -> (logits [B, classes], out: named intermediates)."""
    x = self.embed(images)
    return pyramid(self, x, PatchMerging, train=train, step=step, progress=progress)

  # ----- cost -----
  def macs(self, channels: int = 3) -> int:
    """Analytic multiply-accumulates of one image: stem, merging, every block's attention as its
    registry entry counts it, MLPs and the head (norms and softmax left out, as in the papers)."""
    grids, widths = self.stage_grids(), self.widths()
    total = grids[0][0] * grids[0][1] * self.patch_size ** 2 * channels * widths[0]
    for s, (grid, width) in enumerate(zip(grids, widths)):
      n = grid[0] * grid[1]
      if s:
        total += n * 4 * widths[s - 1] * width
      for j in range(self.depths[s]):
        entry, options = attn_lib.registry.check(self.attention_spec(j), self.impl)
        total += entry.macs(n, width, self.num_heads[s], num_prefix=0,
                            **{"shift_size": None, **options})
        total += 2 * n * width * int(width * self.mlp_ratio)
    return total + widths[-1] * self.num_classes

