"""The plain ViT / DeiT family: patch embedding, one encoder stage, a pooling head.

The stage (`vitjax.models.stage`) runs the blocks with their attention mechanism and token reducer.
Variant strings follow big_vision ("S/16", "B/32", "Ti/16", ...); parameter counts match timm.
"""
import math
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitjax.models.stage import Mlp, Stage, drop_path_rates

# name: (width, depth, mlp_dim, heads)
VARIANTS = {
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "H": (1280, 32, 5120, 16),
}
POOLS = ("cls", "gap", "map")
POSEMBS = ("learn", "sincos2d")


def decode_variant(variant: str) -> dict:
  """"S/16" -> dict(width=384, depth=12, mlp_dim=1536, num_heads=6, patch_size=16)."""
  if not isinstance(variant, str) or "/" not in variant:
    raise ValueError(f"variant must look like 'S/16' (name/patch), got {variant!r}; "
                     f"valid names: {', '.join(VARIANTS)}")
  name, patch = variant.split("/", 1)
  if name not in VARIANTS:
    raise ValueError(f"unknown ViT variant {name!r} in {variant!r}; valid: {', '.join(VARIANTS)}")
  if not patch.isdigit() or int(patch) <= 0:
    raise ValueError(f"patch size in {variant!r} must be a positive integer")
  width, depth, mlp_dim, heads = VARIANTS[name]
  return dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=heads, patch_size=int(patch))


def sincos2d(grid: Sequence[int], width: int, temperature: float = 10_000.0) -> np.ndarray:
  """Fixed 2-D sin-cos position embedding [1, h*w, width] (MoCo v3 / big_vision layout)."""
  if width % 4:
    raise ValueError(f"sincos2d position embedding needs width divisible by 4, got {width}")
  y, x = np.mgrid[:grid[0], :grid[1]]
  omega = 1.0 / temperature ** (np.arange(width // 4) / (width // 4 - 1 or 1))
  y = y.reshape(-1)[:, None] * omega[None]
  x = x.reshape(-1)[:, None] * omega[None]
  pe = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
  return pe[None].astype(np.float32)


def resample_posemb(posemb, new_grid: Sequence[int], num_prefix: int = 0):
  """Bilinearly resamples a learned [1, prefix + h*w, D] embedding to a new grid."""
  posemb = np.asarray(posemb)
  prefix, grid_emb = posemb[:, :num_prefix], posemb[:, num_prefix:]
  old = int(round(math.sqrt(grid_emb.shape[1])))
  if old * old != grid_emb.shape[1]:
    raise ValueError(f"cannot resample a non-square position embedding of {grid_emb.shape[1]} "
                     "patch tokens")
  if tuple(new_grid) == (old, old):
    return posemb
  grid_emb = grid_emb.reshape(1, old, old, -1)
  grid_emb = jax.image.resize(grid_emb, (1, *new_grid, grid_emb.shape[-1]), method="bilinear")
  return np.concatenate([prefix, np.asarray(grid_emb).reshape(1, -1, posemb.shape[-1])], axis=1)


class MAPHead(nn.Module):
  """Multi-head attention pooling: a learned probe attends over the tokens."""
  num_heads: int
  mlp_dim: int
  dtype: Any = jnp.float32
  gelu_approximate: bool = False

  @nn.compact
  def __call__(self, x, valid=None):
    probe = self.param("probe", nn.initializers.xavier_uniform(), (1, 1, x.shape[-1]))
    probe = jnp.tile(probe, (x.shape[0], 1, 1)).astype(x.dtype)
    mask = None if valid is None else valid[:, None, None, :]
    x = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, dtype=self.dtype)(
        probe, x, mask=mask)
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype)(x)
    x = x + Mlp(self.mlp_dim, gelu_approximate=self.gelu_approximate, dtype=self.dtype)(y)
    return x[:, 0]


def _as_dict(spec):
  """ConfigDict / FrozenDict / dict -> plain dict (recursively); anything else unchanged."""
  if hasattr(spec, "to_dict"):
    spec = spec.to_dict()
  if isinstance(spec, Mapping):
    return {k: _as_dict(v) for k, v in spec.items()}
  return spec


def layer_attention_specs(attention, depth: int) -> list:
  """Expands `attention` (+ its `per_layer` overrides) into one spec per block.

  per_layer: a list of `depth` specs, or a mapping {"3": spec, "11": spec} (string or int keys).
  """
  base = _as_dict(attention)
  base = base if isinstance(base, dict) else {"name": base}
  per_layer = base.pop("per_layer", None)
  specs = [base] * depth
  if per_layer is None:
    return specs
  if isinstance(per_layer, (list, tuple)):
    if len(per_layer) != depth:
      raise ValueError(f"attention.per_layer has {len(per_layer)} entries for {depth} blocks")
    return [_as_dict(s) if isinstance(_as_dict(s), dict) else {"name": s} for s in per_layer]
  for key, spec in _as_dict(per_layer).items():
    i = int(key)
    if not 0 <= i < depth:
      raise ValueError(f"attention.per_layer names block {i}; blocks are 0..{depth - 1}")
    spec = _as_dict(spec)
    specs[i] = spec if isinstance(spec, dict) else {"name": spec}
  return specs


class ViT(nn.Module):
  """Vision Transformer. Returns (logits, out) with named intermediates in `out`."""
  num_classes: int
  patch_size: int = 16
  width: int = 384
  depth: int = 12
  mlp_dim: int = 1536
  num_heads: int = 6
  image_size: Sequence[int] = (224, 224)
  pool: str = "cls"
  fc_norm: bool = True  # pool="gap": LayerNorm after pooling (timm); False: before it (big_vision)
  class_token: bool = True
  num_registers: int = 0
  distill_token: bool = False
  posemb: str = "learn"
  posemb_prefix: bool = True   # the prefix tokens get a position embedding too (timm's ViT/DeiT)
  layerscale: Optional[float] = None
  drop_path: float = 0.0
  dropout: float = 0.0
  attn_dropout: float = 0.0
  qk_norm: bool = False
  qkv_bias: bool = True
  gelu_approximate: bool = False
  scan: bool = False
  remat: bool = False
  attention: Any = "mhsa"
  impl: str = "reference"
  tokens: Any = None
  track_source: bool = False
  dtype: Any = jnp.float32

  # ----- static structure, computed from the fields (Python ints; shapes stay static) -----
  @property
  def grid(self) -> tuple:
    return tuple(s // self.patch_size for s in self.image_size)

  @property
  def num_prefix(self) -> int:
    return int(self.class_token) + int(self.distill_token) + self.num_registers

  def attention_specs(self) -> list:
    return layer_attention_specs(self.attention, self.depth)

  def stage(self, parent=None) -> Stage:
    """The encoder: `depth` blocks with their attention and the token reducer (unbound unless a
    parent is given: its static methods plan and check without parameters)."""
    rates = drop_path_rates(self.drop_path, self.depth)
    blocks = [dict(attention=spec, num_heads=self.num_heads, mlp_dim=self.mlp_dim,
                   dropout=self.dropout, attn_dropout=self.attn_dropout, drop_path_rate=rate,
                   layerscale=self.layerscale, qk_norm=self.qk_norm, qkv_bias=self.qkv_bias,
                   impl=self.impl, gelu_approximate=self.gelu_approximate, dtype=self.dtype)
              for spec, rate in zip(self.attention_specs(), rates)]
    return Stage(blocks=blocks, grid=self.grid, num_prefix=self.num_prefix,
                 class_token=self.class_token, tokens=self.tokens,
                 track_source=self.track_source, scan=self.scan, remat=self.remat,
                 dtype=self.dtype, parent=parent)

  def token_warmup(self, steps_per_epoch: int):
    """The reducer's training-time schedule (tokens.schedule.Warmup), or None."""
    return self.stage().warmup(steps_per_epoch)

  def after_update(self):
    """An optax step to chain after the optimizer (a reducer's parameter constraint), or None."""
    return self.stage().after_update()

  def with_tokens(self, overrides: Mapping):
    """This model with its reducer options updated (e.g. a warm-up piece's keep rate)."""
    spec = _as_dict(self.tokens)
    spec = {"name": spec} if isinstance(spec, str) else dict(spec or {})
    return self.clone(tokens={**spec, **dict(overrides)})

  def validate(self):
    """Config-time checks; raises ValueError naming what would be valid."""
    if self.pool not in POOLS:
      raise ValueError(f"unknown pool {self.pool!r}; valid: {POOLS}")
    if self.posemb not in POSEMBS:
      raise ValueError(f"unknown posemb {self.posemb!r}; valid: {POSEMBS}")
    if self.distill_token and (self.pool != "cls" or not self.class_token):
      raise ValueError("distill_token=True needs pool='cls' and class_token=True (DeiT layout)")
    if self.pool == "cls" and not self.class_token:
      raise ValueError("pool='cls' needs class_token=True; use pool='gap' or 'map' without it")
    for s in self.image_size:
      if s % self.patch_size:
        raise ValueError(f"image size {tuple(self.image_size)} is not divisible by the patch "
                         f"size {self.patch_size}")
    if self.width % self.num_heads:
      raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
    self.stage().check()

  # ----- forward -----
  def embed(self, images):
    p = self.patch_size
    b, h, w, c = images.shape
    if (h, w) != tuple(self.image_size):
      raise ValueError(f"images are {h}x{w} but the model was built for {tuple(self.image_size)}")
    kernel = self.param("embedding_kernel", nn.initializers.lecun_normal(in_axis=(0, 1, 2), out_axis=3),
                        (p, p, c, self.width))
    bias = self.param("embedding_bias", nn.initializers.zeros, (self.width,))
    # A stride-p convolution written as a reshape + matmul: same parameters, faster on CPU.
    x = images.astype(self.dtype).reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    x = jnp.einsum("bhwpqc,pqcd->bhwd", x, kernel.astype(self.dtype)) + bias.astype(self.dtype)
    return x.reshape(b, -1, self.width)

  def add_prefix_and_posemb(self, x):
    b, n, _ = x.shape
    prefix = []
    if self.class_token:
      prefix.append(self.param("cls", nn.initializers.zeros, (1, 1, self.width)))
    if self.distill_token:
      prefix.append(self.param("dist", nn.initializers.zeros, (1, 1, self.width)))
    prefix = [jnp.tile(t, (b, 1, 1)).astype(x.dtype) for t in prefix]
    if self.posemb == "sincos2d":
      x = x + jnp.asarray(sincos2d(self.grid, self.width), x.dtype)
      x = jnp.concatenate(prefix + [x], axis=1)
    elif self.posemb_prefix:
      x = jnp.concatenate(prefix + [x], axis=1)
      pe = self.param("pos_embedding", nn.initializers.normal(0.02), (1, x.shape[1], self.width))
      x = x + pe.astype(x.dtype)
    else:
      pe = self.param("pos_embedding", nn.initializers.normal(0.02), (1, n, self.width))
      x = jnp.concatenate(prefix + [x + pe.astype(x.dtype)], axis=1)
    if self.num_registers:
      reg = self.param("registers", nn.initializers.normal(0.02), (1, self.num_registers, self.width))
      k = int(self.class_token) + int(self.distill_token)
      x = jnp.concatenate([x[:, :k], jnp.tile(reg, (b, 1, 1)).astype(x.dtype), x[:, k:]], axis=1)
    return x

  @nn.compact
  def __call__(self, images, *, train: bool = False, step=None, progress=None):
    """images [B, H, W, C] -> (logits [B, classes], out: named intermediates).

    step / progress: the training step and step / total steps, for mechanisms with a schedule.
    """
    x = self.embed(images)
    x = self.add_prefix_and_posemb(x)
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    stem = x
    stage = self.stage(parent=self)
    nn.share_scope(self, stage)  # the blocks' parameters stay at the top level (block_i, reduce_i)
    x, state, out = stage(x, train=train, step=step, progress=progress)
    out.update(stem=stem, token_state=state)
    x = self.pool_tokens(x, state, out)
    return self.classify(x, train, out)

  def mean_patch_tokens(self, x, state):
    tokens = x[:, self.num_prefix:]
    if state.valid is None:
      return tokens.mean(axis=1)
    v = state.valid[:, self.num_prefix:, None].astype(x.dtype)
    return (tokens * v).sum(1) / jnp.maximum(v.sum(1), 1)

  def pool_tokens(self, x, state, out):
    if self.pool == "gap" and self.fc_norm:
      pooled = self.mean_patch_tokens(x, state)
      return nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="fc_norm")(pooled)
    x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm")(x)
    out["encoded"] = x
    if self.pool == "gap":
      return self.mean_patch_tokens(x, state)
    if self.pool == "map":
      return MAPHead(self.num_heads, self.mlp_dim, self.dtype, self.gelu_approximate,
                     name="map_head")(x, state.valid)
    if self.distill_token:
      out["dist_pre_logits"] = x[:, 1]
    return x[:, 0]

  def classify(self, x, train, out):
    out["pre_logits"] = x
    if not self.num_classes:
      return x, out
    head = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=nn.initializers.zeros,
                    name="head")
    logits = head(x).astype(jnp.float32)
    if self.distill_token:
      dist = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=nn.initializers.zeros,
                      name="head_dist")(out["dist_pre_logits"]).astype(jnp.float32)
      out["dist_logits"] = dist
      if not train:  # DeiT: average the two heads at inference
        logits = (logits + dist) / 2
    out["logits"] = logits
    return logits, out
