"""PVTv2, the Pyramid Vision Transformer v2 (Wang et al. 2022, "PVTv2: Improved Baselines with
Pyramid Vision Transformer"): overlapping patch embeddings, four encoder stages at strides
4, 8, 16, 32, spatial-reduction attention and a depthwise conv in every MLP, average pooling.

Reference: timm `timm/models/pvt_v2.py` (PyramidVisionTransformerV2, OverlapPatchEmbed,
MlpWithDepthwiseConv, Attention, PyramidVisionTransformerStage) in
github.com/huggingface/pytorch-image-models, itself from github.com/whai362/PVT
(`classification/pvt_v2.py`). Parameter counts and logits equal timm's.

  stem       conv 7x7 stride 4 padding 3 + LayerNorm              -> grid H/4
  stage i    (i > 0) conv 3x3 stride 2 padding 1 + LayerNorm      -> grid H/2^(i+2)
             depth_i blocks of the encoder stage (`vitjax.models.stage`):
               x = x + sra(LN(x)),  sra with R = sr_ratio_i (`vitjax.attention.sra`)
               x = x + fc2(GELU(dwconv3x3(fc1(LN(x)))))          (`Mlp(dwconv_grid=...)`)
             LayerNorm
  head       mean over the last stage's tokens, Linear

`linear=True` (variant "b2_li"): linear SRA, K and V from GELU(LN(Conv_1x1(AvgPool_7x7(grid))))
in every stage, and a ReLU between fc1 and the depthwise conv.

LayerNorms: eps 1e-6 in the blocks and after each stage (timm's LayerNorm), 1e-5 after the patch
embeddings and inside SRA (PyTorch's default, as timm). Stochastic depth rises linearly over all
blocks of all stages (timm). Variants "b0", "b1", "b2", "b2_li" (timm's pvt_v2_b0/b1/b2/b2_li).

Deviations from timm: the attention of the blocks can be any registered mechanism (default "sra",
which gets each stage's sr_ratio); token reduction and `scan` are refused (the stages' grids and
the depthwise conv need every token); parameters are initialised with flax's defaults except the
patch embeddings (timm's fan-out normal) and the head (truncated normal 0.02, as timm).
"""
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from vitjax.attention import registry as attn_registry
from vitjax.models.stage import Stage, WithoutTokenReduction, drop_path_rates, fan_out_normal

# variant: (embed dims, depths); all share heads (1, 2, 5, 8), sr ratios (8, 4, 2, 1) and
# mlp ratios (8, 8, 4, 4)
VARIANTS = {
    "b0": ((32, 64, 160, 256), (2, 2, 2, 2)),
    "b1": ((64, 128, 320, 512), (2, 2, 2, 2)),
    "b2": ((64, 128, 320, 512), (3, 4, 6, 3)),
}
LINEAR_VARIANTS = {"b2_li": "b2"}  # linear SRA: keys and values pooled to 7x7
STEM = (7, 4)        # kernel, stride of the first patch embedding (padding kernel // 2)
DOWNSAMPLE = (3, 2)  # the same for stages 1..3


def decode_variant(variant: str) -> dict:
  """"b0" -> dict(embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2)); "b2_li" adds linear=True."""
  if variant in LINEAR_VARIANTS:
    return dict(decode_variant(LINEAR_VARIANTS[variant]), linear=True)
  if variant not in VARIANTS:
    raise ValueError(f"unknown PVTv2 variant {variant!r}; valid: "
                     f"{', '.join([*VARIANTS, *LINEAR_VARIANTS])}")
  dims, depths = VARIANTS[variant]
  return dict(embed_dims=dims, depths=depths)


def conv_out(size: int, kernel: int, stride: int) -> int:
  """Output length of a conv with padding kernel // 2 (PyTorch's floor rule)."""
  return (size + 2 * (kernel // 2) - kernel) // stride + 1


class OverlapPatchEmbed(nn.Module):
  """A conv whose kernel is larger than its stride, then LayerNorm: [B,H,W,C] -> [B,h,w,D]."""
  width: int
  kernel: int
  stride: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    pad = self.kernel // 2
    x = nn.Conv(self.width, (self.kernel, self.kernel), strides=self.stride,
                padding=((pad, pad), (pad, pad)), dtype=self.dtype,
                kernel_init=fan_out_normal,
                name="proj")(x)
    return nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="norm")(x)


class PyramidStage(nn.Module):
  """One PVTv2 stage: the downsampling patch embedding (stages after the first), the encoder
  stage's blocks on its grid, a final LayerNorm. [B,H,W,C] -> [B,h,w,D]."""
  blocks: Sequence[dict]
  grid: tuple
  width: int
  downsample: bool
  remat: bool = False
  dtype: Any = jnp.float32

  def stage(self, parent=None) -> Stage:
    """The encoder stage of the blocks (unbound unless a parent is given)."""
    return Stage(blocks=self.blocks, grid=self.grid, num_prefix=0, class_token=False,
                 remat=self.remat, dtype=self.dtype, parent=parent)

  @nn.compact
  def __call__(self, x, *, train: bool = False, step=None, progress=None):
    if self.downsample:
      x = OverlapPatchEmbed(self.width, *DOWNSAMPLE, dtype=self.dtype, name="downsample")(x)
    b, h, w, _ = x.shape
    stage = self.stage(parent=self)
    nn.share_scope(self, stage)  # the blocks' parameters sit next to downsample and norm
    x, _, out = stage(x.reshape(b, h * w, -1), train=train, step=step, progress=progress)
    x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm")(x)
    return x.reshape(b, h, w, -1), out


class PVTv2(nn.Module, WithoutTokenReduction):
  """PVTv2. Returns (logits, out) with out["stage_{i}"] the [B, h, w, D] map after stage i."""
  num_classes: int
  embed_dims: Sequence[int] = VARIANTS["b2"][0]
  depths: Sequence[int] = VARIANTS["b2"][1]
  num_heads: Sequence[int] = (1, 2, 5, 8)
  sr_ratios: Sequence[int] = (8, 4, 2, 1)
  mlp_ratios: Sequence[float] = (8, 8, 4, 4)
  image_size: Sequence[int] = (224, 224)
  qkv_bias: bool = True
  linear: bool = False  # linear SRA (K, V from a 7x7 average pool) and a ReLU before the dwconv
  drop_path: float = 0.0
  dropout: float = 0.0       # in the blocks (timm's proj_drop_rate)
  attn_dropout: float = 0.0
  head_dropout: float = 0.0  # before the head (timm's drop_rate)
  gelu_approximate: bool = False
  attention: Any = "sra"
  impl: str = "reference"
  tokens: Any = None
  scan: bool = False
  remat: bool = False
  dtype: Any = jnp.float32

  # ----- static structure -----
  @property
  def num_stages(self) -> int:
    return len(self.depths)

  @property
  def depth(self) -> int:
    """Layer groups between stem and head, as timm's layer-wise lr decay groups PVTv2: one per
    stage (`stage_{i}` has layer id i + 1)."""
    return self.num_stages

  @property
  def grids(self) -> list:
    """The token grid (h, w) of each stage."""
    grid = tuple(conv_out(s, *STEM) for s in self.image_size)
    grids = [grid]
    for _ in range(1, self.num_stages):
      grid = tuple(conv_out(s, *DOWNSAMPLE) for s in grid)
      grids.append(grid)
    return grids

  def attention_spec(self, i: int) -> dict:
    """Stage i's attention: `attention` as a dict, with the stage's sr_ratio for `sra`."""
    spec = self.attention
    if isinstance(spec, str):
      spec = {"name": spec}
    spec = dict(spec.to_dict() if hasattr(spec, "to_dict") else spec)
    if spec["name"] == "sra":
      spec.setdefault("sr_ratio", self.sr_ratios[i])
      if self.linear:
        spec.setdefault("linear", True)
    return spec

  def sr_ratio(self, i: int) -> int:
    """How much stage i's attention pools its grid (1: not at all)."""
    spec = self.attention_spec(i)
    return spec["sr_ratio"] if spec["name"] == "sra" and not spec.get("linear") else 1

  def stages(self) -> list:
    """The pyramid stages (unbound): their blocks, grids and widths."""
    rates = drop_path_rates(self.drop_path, sum(self.depths))
    out, start = [], 0
    for i, (grid, depth) in enumerate(zip(self.grids, self.depths)):
      width = self.embed_dims[i]
      block = dict(attention=self.attention_spec(i), num_heads=self.num_heads[i],
                   mlp_dim=int(width * self.mlp_ratios[i]), dropout=self.dropout,
                   attn_dropout=self.attn_dropout, qkv_bias=self.qkv_bias, impl=self.impl,
                   gelu_approximate=self.gelu_approximate, mlp_grid=grid,
                   mlp_relu=self.linear, dtype=self.dtype)
      blocks = [dict(block, drop_path_rate=r) for r in rates[start:start + depth]]
      out.append(PyramidStage(blocks=blocks, grid=grid, width=width, downsample=i > 0,
                              remat=self.remat, dtype=self.dtype, parent=None))
      start += depth
    return out

  def macs(self, channels: int = 3) -> int:
    """Analytic MACs of one image: patch embeddings, each block's attention (its registry entry)
    and MLP (depthwise conv included), head and norms left out (as `tokens.macs.model_macs`)."""
    total, prev = 0, channels
    for i, (grid, width) in enumerate(zip(self.grids, self.embed_dims)):
      n, kernel = grid[0] * grid[1], (DOWNSAMPLE if i else STEM)[0]
      hidden = int(width * self.mlp_ratios[i])
      entry, options = attn_registry.check(self.attention_spec(i), self.impl)
      attn = entry.macs(n, width=width, num_heads=self.num_heads[i], **{**options, "num_prefix": 0})
      total += n * kernel * kernel * prev * width
      total += self.depths[i] * (attn + 2 * n * width * hidden + 9 * n * hidden)
      prev = width
    return total

  def validate(self):
    """Config-time checks; raises ValueError naming what would be valid."""
    n = self.num_stages
    for name in ("embed_dims", "num_heads", "sr_ratios", "mlp_ratios"):
      if len(getattr(self, name)) != n:
        raise ValueError(f"PVTv2 {name} has {len(getattr(self, name))} entries for {n} stages "
                         f"(depths={tuple(self.depths)}); give one per stage")
    self.refuse_tokens_and_scan("PVTv2", "its stages need every token of their grid",
                                "its stages differ")
    for i, (grid, width, heads) in enumerate(zip(self.grids, self.embed_dims, self.num_heads)):
      if width % heads:
        raise ValueError(f"PVTv2 stage {i}: width {width} is not divisible by {heads} heads")
      r = self.sr_ratio(i)
      if grid[0] % r or grid[1] % r:
        raise ValueError(f"PVTv2 stage {i}: its {grid[0]}x{grid[1]} grid (image "
                         f"{tuple(self.image_size)}) is not divisible by sr_ratio {r}; use an "
                         "image size and sr_ratios that divide (with sr 8, 4, 2, 1: a multiple "
                         "of 32, e.g. 224)")
    for stage in self.stages():
      stage.stage().check()

  # ----- forward -----
  @nn.compact
  def __call__(self, images, *, train: bool = False, step=None, progress=None):
    """images [B, H, W, C] -> (logits [B, classes], out: named intermediates)."""
    if tuple(images.shape[1:3]) != tuple(self.image_size):
      raise ValueError(f"images are {images.shape[1]}x{images.shape[2]} but the model was built "
                       f"for {tuple(self.image_size)}")
    x = OverlapPatchEmbed(self.embed_dims[0], *STEM, dtype=self.dtype, name="patch_embed")(
        images.astype(self.dtype))
    out = {}
    for i, stage in enumerate(self.stages()):
      x, blocks = stage.clone(parent=self, name=f"stage_{i}")(x, train=train, step=step,
                                                              progress=progress)
      out[f"stage_{i}"] = x
      out.update({f"stage_{i}/{k}": v for k, v in blocks.items()})
    x = x.mean(axis=(1, 2))
    out["pre_logits"] = x
    if not self.num_classes:
      return x, out
    x = nn.Dropout(self.head_dropout)(x, deterministic=not train)
    head = nn.Dense(self.num_classes, dtype=self.dtype,
                    kernel_init=nn.initializers.truncated_normal(0.02), name="head")
    logits = head(x).astype(jnp.float32)
    out["logits"] = logits
    return logits, out
