"""ConViT (d'Ascoli et al. 2021, "ConViT: Improving Vision Transformers with Soft Convolutional
Inductive Biases"): a ViT whose first blocks use gated positional self-attention (GPSA) on the
patches alone; the [CLS] token joins before the remaining plain self-attention blocks.

Follows timm's `timm/models/convit.py` (huggingface/pytorch-image-models: ConVit, GPSA, MHSA,
Block, convit_tiny / small / base, `_init_weights` and `local_init`) and the official
facebookresearch/convit `convit.py`:

  stem      16x16 stride-16 patch embedding, + a learned position embedding of the patches only
  local     blocks 0 .. L-1 (L = local_up_to_layer) of the encoder stage (`vitjax.models.stage`)
            on the patch tokens, with `gpsa` attention (`vitjax.attention.gpsa`: qk and v without
            bias, the locality init of the official code at strength `locality_strength`)
  [CLS]     concatenated in front of the patch tokens (it never gets a position embedding)
  global    blocks L .. depth-1 with `mhsa` (qkv without bias)
  head      LayerNorm (eps 1e-6, timm's and the official), the [CLS] token (or the mean of the
            patch tokens, pool="gap": timm's global_pool="avg"), Linear

Variants (width = 48 x heads, depth 12, L = 10, MLP ratio 4, locality strength 1.0): "Ti" (4
heads, 192 wide), "S" (9, 432), "B" (16, 768); parameter counts equal timm's convit_tiny / small /
base at 1000 classes (5,710,512 / 27,777,322 / 86,540,040). Blocks and reducers are named
`block_{i}` with i counted over the whole model (timm's `blocks.{i}`), so that layer-wise lr decay
groups them as timm's group_matcher (stem and [CLS] 0, block i -> i + 1, final norm and head
last); `pos_embedding` and `cls` are not weight-decayed (timm's no_weight_decay), nor are the 1-D
gating parameters (as every 1-D parameter, and as timm's optimizer factory).

Deviations (own design, also in the README):
- Token reduction and `scan` are refused when the model is built: GPSA needs the full patch grid,
  and the two plain blocks after it are too few to place a reducer's schedule on.
- `local_attention` / `attention` choose the mechanism of the two parts (default "gpsa" /
  "mhsa"); `impl` applies to the global blocks (GPSA has the reference path only; a local spec may
  name its own `impl`).
- Initialisation: flax defaults for the Dense kernels (LeCun normal, zero biases) and a zero head,
  as vitjax's ViT; timm draws every Linear from a truncated normal (std 0.02). GPSA's `v` is the
  identity and its positional projection carries the official locality pattern (as timm); the
  [CLS] token and the position embedding are truncated N(0, 0.02^2), as timm.
- drop_path defaults to 0.0 (vitjax's ViT); `dropout` acts after the position embedding and in
  the blocks (timm's pos_drop_rate and proj_drop_rate); there is no separate head dropout.
"""
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from vitjax import attention as attn_lib
from vitjax.models.stage import Stage, WithoutTokenReduction, drop_path_rates

HEAD_WIDTH = 48  # timm's and the official embed_dim: the width per head
VARIANTS = {"Ti": 4, "S": 9, "B": 16}  # name: heads
DEPTH, LOCAL_UP_TO_LAYER, MLP_RATIO = 12, 10, 4
POOLS = ("cls", "gap")
POSEMBS = ("learn", "none")
NORM_EPSILON = 1e-6


def decode_variant(variant: str) -> dict:
  """"S" -> dict(width=432, num_heads=9, depth=12, mlp_dim=1728, local_up_to_layer=10)."""
  if variant not in VARIANTS:
    raise ValueError(f"unknown ConViT variant {variant!r}; valid: {', '.join(VARIANTS)}")
  heads = VARIANTS[variant]
  width = HEAD_WIDTH * heads
  return dict(width=width, num_heads=heads, depth=DEPTH, mlp_dim=MLP_RATIO * width,
              local_up_to_layer=LOCAL_UP_TO_LAYER)


def as_spec(spec) -> dict:
  """An attention spec (name, dict or ConfigDict) as a plain dict."""
  if isinstance(spec, str):
    return {"name": spec}
  return dict(spec.to_dict() if hasattr(spec, "to_dict") else spec)


class ConViT(nn.Module, WithoutTokenReduction):
  """ConViT. Returns (logits, out) with out["block_{i}"] the tokens after block i."""
  num_classes: int
  patch_size: int = 16
  width: int = 192
  depth: int = DEPTH
  mlp_dim: int = 768
  num_heads: int = 4
  local_up_to_layer: int = LOCAL_UP_TO_LAYER
  locality_strength: float = 1.0
  image_size: Sequence[int] = (224, 224)
  pool: str = "cls"
  posemb: str = "learn"  # "none": timm's use_pos_embed=False
  qkv_bias: bool = False
  drop_path: float = 0.0
  dropout: float = 0.0
  attn_dropout: float = 0.0
  gelu_approximate: bool = False
  local_attention: Any = "gpsa"
  attention: Any = "mhsa"
  impl: str = "reference"
  tokens: Any = None   # refused unless none (see validate)
  scan: bool = False   # refused (see validate)
  remat: bool = False
  dtype: Any = jnp.float32

  distill_token = False  # no distillation token: DeiT's distillation recipe does not apply

  # ----- static structure -----
  @property
  def grid(self) -> tuple:
    return tuple(s // self.patch_size for s in self.image_size)

  def attention_spec(self, block: int) -> dict:
    """Block i's attention: `local_attention` (GPSA, with the locality strength) before
    local_up_to_layer, `attention` (with the model's impl) from there on."""
    if block < self.local_up_to_layer:
      spec = as_spec(self.local_attention)
      if spec["name"] == "gpsa":
        spec.setdefault("locality_strength", self.locality_strength)
      return spec
    spec = as_spec(self.attention)
    spec.setdefault("impl", self.impl)
    return spec

  def stage(self, local: bool, parent=None, name: Optional[str] = None) -> Stage:
    """The local (patches only) or the global ([CLS] + patches) blocks as an encoder stage
    (unbound unless a parent is given)."""
    rates = drop_path_rates(self.drop_path, self.depth)
    first, last = (0, self.local_up_to_layer) if local else (self.local_up_to_layer, self.depth)
    blocks = [dict(attention=self.attention_spec(i), num_heads=self.num_heads,
                   mlp_dim=self.mlp_dim, dropout=self.dropout, attn_dropout=self.attn_dropout,
                   drop_path_rate=rates[i], qkv_bias=self.qkv_bias,
                   gelu_approximate=self.gelu_approximate, norm_epsilon=NORM_EPSILON,
                   dtype=self.dtype)
              for i in range(first, last)]
    return Stage(blocks=blocks, grid=self.grid, num_prefix=0 if local else 1,
                 class_token=not local, first_block=first, remat=self.remat, dtype=self.dtype,
                 parent=parent, name=name)

  def validate(self):
    """Config-time checks; raises ValueError naming what would be valid."""
    self.refuse_tokens_and_scan("ConViT", "its GPSA blocks need the full patch grid",
                                "its GPSA and self-attention blocks differ")
    if self.pool not in POOLS:
      raise ValueError(f"unknown ConViT pool {self.pool!r}; valid: {', '.join(POOLS)}")
    if self.posemb not in POSEMBS:
      raise ValueError(f"unknown ConViT posemb {self.posemb!r}; valid: {', '.join(POSEMBS)}")
    if not 0 <= self.local_up_to_layer < self.depth:
      raise ValueError(f"local_up_to_layer={self.local_up_to_layer} with depth {self.depth}: the "
                       "[CLS] token joins before block local_up_to_layer, so it must be in "
                       f"[0, {self.depth - 1}]")
    for s in self.image_size:
      if s % self.patch_size:
        raise ValueError(f"image size {tuple(self.image_size)} is not divisible by the patch "
                         f"size {self.patch_size}")
    if self.width % self.num_heads:
      raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
    for local in (True, False):
      self.stage(local).check()

  # ----- forward -----
  def embed(self, images):
    """The stride-p patch convolution as a reshape + matmul (same parameters as the ViT's)."""
    p, d = self.patch_size, self.width
    b, h, w, c = images.shape
    if (h, w) != tuple(self.image_size):
      raise ValueError(f"images are {h}x{w} but the model was built for {tuple(self.image_size)}")
    kernel = self.param("embedding_kernel",
                        nn.initializers.lecun_normal(in_axis=(0, 1, 2), out_axis=3), (p, p, c, d))
    bias = self.param("embedding_bias", nn.initializers.zeros, (d,))
    x = images.astype(self.dtype).reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    x = jnp.einsum("bhwpqc,pqcd->bhwd", x, kernel.astype(self.dtype)) + bias.astype(self.dtype)
    x = x.reshape(b, -1, d)
    if self.posemb == "learn":
      pe = self.param("pos_embedding", nn.initializers.truncated_normal(0.02), (1, x.shape[1], d))
      x = x + pe.astype(x.dtype)
    return x

  @nn.compact
  def __call__(self, images, *, train: bool = False, step=None, progress=None):
    """images [B, H, W, C] -> (logits [B, classes], out: named intermediates)."""
    x = nn.Dropout(self.dropout)(self.embed(images), deterministic=not train)
    out = {"stem": x}
    for local in (True, False):
      if not local:
        cls = self.param("cls", nn.initializers.truncated_normal(0.02), (1, 1, self.width))
        x = jnp.concatenate([jnp.tile(cls, (x.shape[0], 1, 1)).astype(x.dtype), x], axis=1)
      stage = self.stage(local, parent=self)
      nn.share_scope(self, stage)  # the blocks' parameters stay at the top level (block_i)
      x, state, blocks = stage(x, train=train, step=step, progress=progress)
      out.update(blocks)
    out["token_state"] = state
    x = nn.LayerNorm(epsilon=NORM_EPSILON, dtype=self.dtype, name="norm")(x)
    out["encoded"] = x
    x = x[:, 0] if self.pool == "cls" else x[:, 1:].mean(axis=1)
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
    """Analytic MACs of one image: patch embedding, each block's attention as its registry entry
    counts it, the MLPs and the head (norms and softmax left out, as the papers)."""
    n = self.grid[0] * self.grid[1]
    total = n * self.patch_size ** 2 * channels * self.width
    for i in range(self.depth):
      prefix = int(i >= self.local_up_to_layer)
      entry, options = attn_lib.registry.check(self.attention_spec(i))
      total += entry.macs(n + prefix, self.width, self.num_heads, **{"num_prefix": prefix,
                                                                     **options})
      total += 2 * (n + prefix) * self.width * self.mlp_dim
    return total + self.width * self.num_classes
