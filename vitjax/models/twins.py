"""Twins (Chu et al. 2021, "Twins: Revisiting the Design of Spatial Attention in Vision
Transformers"): Twins-SVT and Twins-PCPVT, pyramids of four encoder stages.

Follows timm's `timm/models/twins.py` (huggingface/pytorch-image-models: Twins, Block,
LocallyGroupedAttn, GlobalSubSampleAttn, PosConv, PatchEmbed) and the official
Meituan-AutoML/Twins `gvt.py`:
  stage i  PatchEmbed: a p x p stride-p conv (p = 4 for the first stage, 2 after) + LayerNorm;
           depth_i blocks of the encoder stage (`vitjax.models.stage`); the PEG (`models.cpe`,
           timm's PosConv: depthwise 3x3 conv + residual) after the stage's first block;
  head     LayerNorm, global average pool, Linear.
Twins-SVT's blocks alternate, as timm's `ws=1 if wss is None or i % 2 == 1 else wss[k]`:
even blocks locally-grouped self-attention (`twins_lsa`, ws x ws windows, no position bias, no
shift), odd blocks global sub-sampled attention (`twins_gsa`: keys and values from an sr x sr
stride-sr conv + LayerNorm, none when sr = 1). A window size of 1 makes a stage all-GSA (timm's
rule): Twins-PCPVT is window_sizes (1, 1, 1, 1). There is no per-stage norm.

LayerNorms: eps 1e-6 in the blocks and at the end (timm's norm_layer), 1e-5 after the patch
embeddings and inside GSA (PyTorch's default, as timm). Stochastic depth rises linearly over all
blocks of all stages. Variants "svt_s", "svt_b", "svt_l", "pcpvt_s", "pcpvt_b", "pcpvt_l"
(timm's twins_svt_{small,base,large}, twins_pcpvt_{small,base,large}).

Deviations from timm:
- Every stage's grid must divide by its window and by its sr ratio; otherwise the model is
  refused when built. timm zero-pads LSA windows with tokens that are attended and floors the GSA
  conv; the window attention here gives padding no weight, so the two would differ. 224 px with
  window 7 and sr 8, 4, 2, 1 (all released models) divides everywhere.
- No token reduction and no scanned blocks (the stages need their full grids, their blocks differ
  and a PEG sits between them); both are refused when the model is built.
- Initialisation: flax defaults except the patch embeddings (timm's fan-out normal) and the head
  (truncated normal 0.02, as timm); timm draws every Linear from a truncated normal (std 0.02).
"""
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from vitjax.attention import registry as attn_registry
from vitjax.models.stage import Stage, WithoutTokenReduction, drop_path_rates, fan_out_normal

# variant: (embed dims, depths, num heads, mlp ratios); SVT's windows are 7 in every stage and all
# variants share sr ratios (8, 4, 2, 1)
SVT_VARIANTS = {
    "svt_s": ((64, 128, 256, 512), (2, 2, 10, 4), (2, 4, 8, 16), (4, 4, 4, 4)),
    "svt_b": ((96, 192, 384, 768), (2, 2, 18, 2), (3, 6, 12, 24), (4, 4, 4, 4)),
    "svt_l": ((128, 256, 512, 1024), (2, 2, 18, 2), (4, 8, 16, 32), (4, 4, 4, 4)),
}
PCPVT_VARIANTS = {
    "pcpvt_s": ((64, 128, 320, 512), (3, 4, 6, 3), (1, 2, 5, 8), (8, 8, 4, 4)),
    "pcpvt_b": ((64, 128, 320, 512), (3, 4, 18, 3), (1, 2, 5, 8), (8, 8, 4, 4)),
    "pcpvt_l": ((64, 128, 320, 512), (3, 8, 27, 3), (1, 2, 5, 8), (8, 8, 4, 4)),
}
STEM, DOWNSAMPLE = 4, 2  # patch sizes of the first stage's embedding and of the later ones
WINDOW = 7


def decode_variant(variant: str) -> dict:
  """"svt_s" -> dict(embed_dims=(64, 128, 256, 512), depths=(2, 2, 10, 4), num_heads=(2, 4, 8,
  16), mlp_ratios=(4, 4, 4, 4), window_sizes=(7, 7, 7, 7)); PCPVT's window_sizes are 1 (GSA)."""
  table = {**SVT_VARIANTS, **PCPVT_VARIANTS}
  if variant not in table:
    raise ValueError(f"unknown Twins variant {variant!r}; valid: {', '.join(table)}")
  dims, depths, heads, ratios = table[variant]
  windows = (WINDOW if variant in SVT_VARIANTS else 1,) * len(depths)
  return dict(embed_dims=dims, depths=depths, num_heads=heads, mlp_ratios=ratios,
              window_sizes=windows)


class PatchEmbed(nn.Module):
  """A p x p stride-p conv, then LayerNorm (eps 1e-5, as timm): [B,H,W,C] -> [B,H/p,W/p,D]."""
  width: int
  patch: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    p = self.patch
    x = nn.Conv(self.width, (p, p), strides=p, padding="VALID", dtype=self.dtype,
                kernel_init=fan_out_normal, name="proj")(x)
    return nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="norm")(x)


class TwinsStage(nn.Module):
  """One stage: patch embedding, the encoder stage's blocks with the PEG after the first one.
  [B,H,W,C] -> ([B,h,w,D], the stage's per-block outputs)."""
  blocks: Sequence[dict]
  grid: tuple
  width: int
  patch: int
  pos_dropout: float = 0.0
  remat: bool = False
  dtype: Any = jnp.float32

  def stage(self, parent=None) -> Stage:
    """The encoder stage of the blocks (unbound unless a parent is given)."""
    return Stage(blocks=self.blocks, grid=self.grid, num_prefix=0, class_token=False,
                 remat=self.remat, pos_conv_after=0, dtype=self.dtype, parent=parent)

  @nn.compact
  def __call__(self, x, *, train: bool = False, step=None, progress=None):
    x = PatchEmbed(self.width, self.patch, dtype=self.dtype, name="patch_embed")(x)
    x = nn.Dropout(self.pos_dropout)(x, deterministic=not train)
    b, h, w, _ = x.shape
    stage = self.stage(parent=self)
    nn.share_scope(self, stage)  # the blocks and the PEG sit next to patch_embed
    x, _, out = stage(x.reshape(b, h * w, -1), train=train, step=step, progress=progress)
    return x.reshape(b, h, w, -1), out


class Twins(nn.Module, WithoutTokenReduction):
  """Twins-SVT / Twins-PCPVT. Returns (logits, out); out["stage_{i}"] is the [B, h, w, D] map
  after stage i (before the final norm)."""
  num_classes: int
  embed_dims: Sequence[int] = SVT_VARIANTS["svt_s"][0]
  depths: Sequence[int] = SVT_VARIANTS["svt_s"][1]
  num_heads: Sequence[int] = SVT_VARIANTS["svt_s"][2]
  mlp_ratios: Sequence[float] = SVT_VARIANTS["svt_s"][3]
  window_sizes: Sequence[int] = (WINDOW,) * 4  # 1: GSA in every block of the stage (PCPVT)
  sr_ratios: Sequence[int] = (8, 4, 2, 1)
  image_size: Sequence[int] = (224, 224)
  qkv_bias: bool = True
  drop_path: float = 0.0
  dropout: float = 0.0       # in the blocks (timm's proj_drop_rate)
  attn_dropout: float = 0.0
  pos_dropout: float = 0.0   # after each patch embedding (timm's pos_drop_rate)
  head_dropout: float = 0.0  # before the head (timm's drop_rate)
  gelu_approximate: bool = False
  impl: str = "reference"
  tokens: Any = None   # refused unless none (see validate)
  scan: bool = False   # refused (see validate)
  remat: bool = False
  dtype: Any = jnp.float32

  # ----- static structure -----
  @property
  def num_stages(self) -> int:
    return len(self.depths)

  @property
  def depth(self) -> int:
    """All blocks of all stages (what layer-wise lr decay counts, as timm's group_matcher)."""
    return int(sum(self.depths))

  @property
  def grids(self) -> list:
    """The token grid (h, w) of each stage."""
    grids = [tuple(s // STEM for s in self.image_size)]
    for _ in range(1, self.num_stages):
      grids.append(tuple(g // DOWNSAMPLE for g in grids[-1]))
    return grids

  def window(self, i: int) -> int:
    """Stage i's LSA window; 1 when the stage has GSA only (PCPVT)."""
    return int(self.window_sizes[i])

  def attention_spec(self, i: int, j: int) -> dict:
    """Block j of stage i: LSA at even j when the stage has a window > 1, else GSA."""
    if j % 2 == 0 and self.window(i) > 1:
      return {"name": "twins_lsa", "window_size": self.window(i)}
    return {"name": "twins_gsa", "sr_ratio": int(self.sr_ratios[i])}

  def stages(self) -> list:
    """The pyramid stages (unbound): their blocks, grids and widths."""
    rates = drop_path_rates(self.drop_path, self.depth)
    out, start = [], 0
    for i, (grid, depth) in enumerate(zip(self.grids, self.depths)):
      width = self.embed_dims[i]
      block = dict(num_heads=self.num_heads[i], mlp_dim=int(width * self.mlp_ratios[i]),
                   dropout=self.dropout, attn_dropout=self.attn_dropout, qkv_bias=self.qkv_bias,
                   impl=self.impl, gelu_approximate=self.gelu_approximate, norm_epsilon=1e-6,
                   dtype=self.dtype)
      blocks = [dict(block, attention=self.attention_spec(i, j), drop_path_rate=rates[start + j])
                for j in range(depth)]
      out.append(TwinsStage(blocks=blocks, grid=grid, width=width,
                            patch=DOWNSAMPLE if i else STEM, pos_dropout=self.pos_dropout,
                            remat=self.remat, dtype=self.dtype, parent=None))
      start += depth
    return out

  def layer_id(self, path: str) -> int:
    """Layer-wise lr decay's layer of a parameter (timm's group_matcher): 0 for the first patch
    embedding, 1 + the global index of a block, a later stage's patch embedding and every PEG
    with its stage's first block, depth + 1 for the final norm and the head."""
    parts = path.split("/")
    if not parts[0].startswith("stage_") or len(parts) < 2:
      return self.depth + 1
    i = int(parts[0][len("stage_"):])
    first = 1 + int(np.sum(self.depths[:i]))
    if parts[1] == "patch_embed":
      return 0 if i == 0 else first
    if parts[1].startswith("block_"):
      return first + int(parts[1][len("block_"):])
    return first  # pos_block

  def macs(self, channels: int = 3) -> int:
    """Analytic MACs of one image: patch embeddings, each block's attention (its registry entry),
    MLPs and PEGs, and the head; norms and softmax left out (as `tokens.macs.model_macs`)."""
    total, prev = 0, channels
    for i, (grid, width) in enumerate(zip(self.grids, self.embed_dims)):
      n, patch = grid[0] * grid[1], DOWNSAMPLE if i else STEM
      total += n * patch * patch * prev * width + 9 * n * width  # embedding, PEG
      for j in range(self.depths[i]):
        entry, options = attn_registry.check(self.attention_spec(i, j), self.impl)
        total += entry.macs(n, width, self.num_heads[i], **{"shift_size": 0, **options,
                                                           "num_prefix": 0})
        total += 2 * n * width * int(width * self.mlp_ratios[i])
      prev = width
    return total + self.embed_dims[-1] * self.num_classes

  def validate(self):
    """Config-time checks; raises ValueError naming what would be valid."""
    n = self.num_stages
    for name in ("embed_dims", "num_heads", "mlp_ratios", "sr_ratios", "window_sizes"):
      if len(getattr(self, name)) != n:
        raise ValueError(f"Twins {name} has {len(getattr(self, name))} entries for {n} stages "
                         f"(depths={tuple(self.depths)}); give one per stage")
    if n < 1 or any(int(d) < 1 for d in self.depths):
      raise ValueError(f"Twins depths {tuple(self.depths)}: give one positive int per stage")
    self.refuse_tokens_and_scan("Twins", "its stages need every token of their grid",
                                "its blocks alternate and a PEG sits between them")
    side = STEM * DOWNSAMPLE ** (n - 1)
    if any(s % side for s in self.image_size):
      raise ValueError(f"Twins image size {tuple(self.image_size)} is not divisible by {side} "
                       f"(the patch embeddings of its {n} stages); use a multiple of {side}")
    for i, (grid, width, heads) in enumerate(zip(self.grids, self.embed_dims, self.num_heads)):
      if width % heads:
        raise ValueError(f"Twins stage {i}: width {width} is not divisible by {heads} heads")
      self.check_grid(i, grid)
    for stage in self.stages():
      stage.stage().check()

  def check_grid(self, i: int, grid: tuple):
    """Stage i's grid must divide by its window and its sr ratio (see the module docstring)."""
    ws, sr = self.window(i), int(self.sr_ratios[i])
    if ws < 1 or sr < 1:
      raise ValueError(f"Twins stage {i}: window {ws} and sr ratio {sr} must be >= 1")
    if ws > 1 and (grid[0] % ws or grid[1] % ws):
      raise ValueError(f"Twins stage {i}: its {grid[0]}x{grid[1]} grid (image "
                       f"{tuple(self.image_size)}) is not divisible by window {ws} (timm pads "
                       "it with attended zero tokens); use an image size whose stage grids the "
                       "windows divide, e.g. 224 with window 7")
    if sr > 1 and (grid[0] % sr or grid[1] % sr):
      raise ValueError(f"Twins stage {i}: its {grid[0]}x{grid[1]} grid (image "
                       f"{tuple(self.image_size)}) is not divisible by sr ratio {sr}; use an "
                       "image size and sr_ratios that divide (with sr 8, 4, 2, 1: a multiple of "
                       "32, e.g. 224)")

  # ----- forward -----
  @nn.compact
  def __call__(self, images, *, train: bool = False, step=None, progress=None):
    """images [B, H, W, C] -> (logits [B, classes], out: named intermediates)."""
    if tuple(images.shape[1:3]) != tuple(self.image_size):
      raise ValueError(f"images are {images.shape[1]}x{images.shape[2]} but the model was built "
                       f"for {tuple(self.image_size)}")
    x, out = images.astype(self.dtype), {}
    for i, stage in enumerate(self.stages()):
      x, blocks = stage.clone(parent=self, name=f"stage_{i}")(x, train=train, step=step,
                                                              progress=progress)
      out[f"stage_{i}"] = x
      out.update({f"stage_{i}/{k}": v for k, v in blocks.items()})
    x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm")(x)
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
