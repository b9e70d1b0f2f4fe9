"""The plain ViT / DeiT family, with a pluggable attention and a token-reduction slot per block.

Block: x = x + attn(norm(x)); x, state = reduce(x, state, aux); x = x + mlp(norm(x)).
Variant strings follow big_vision ("S/16", "B/32", "Ti/16", ...); parameter counts match timm.
"""
import math
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitjax import attention as attn_lib
from vitjax import tokens as tokens_lib

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


def drop_path(module: nn.Module, x, rate, deterministic: bool):
  """Stochastic depth: drops the whole residual branch per example."""
  if deterministic or (isinstance(rate, (int, float)) and rate == 0.0):
    return x
  keep = 1.0 - rate
  mask = jax.random.bernoulli(module.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / keep, jnp.zeros_like(x))


class Mlp(nn.Module):
  mlp_dim: int
  dropout: float = 0.0
  gelu_approximate: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic=True):
    width = x.shape[-1]
    x = nn.Dense(self.mlp_dim, dtype=self.dtype, name="fc1")(x)
    x = nn.gelu(x, approximate=self.gelu_approximate)
    x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
    x = nn.Dense(width, dtype=self.dtype, name="fc2")(x)
    return nn.Dropout(self.dropout)(x, deterministic=deterministic)


class LayerScale(nn.Module):
  init_value: float

  @nn.compact
  def __call__(self, x):
    gamma = self.param("gamma", nn.initializers.constant(self.init_value), (x.shape[-1],))
    return x * gamma.astype(x.dtype)


class Block(nn.Module):
  """One encoder block, split at the token-reduction slot (attend | reduce | feed_forward)."""
  attention: Any  # attention spec: name or dict(name=..., **options)
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  attn_dropout: float = 0.0
  drop_path_rate: Any = 0.0
  layerscale: Optional[float] = None
  qk_norm: bool = False
  qkv_bias: bool = True
  impl: str = "reference"
  gelu_approximate: bool = False
  dtype: Any = jnp.float32

  def setup(self):
    self.norm1 = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype)
    self.attn = attn_lib.build(self.attention, num_heads=self.num_heads, dtype=self.dtype,
                               qk_norm=self.qk_norm, qkv_bias=self.qkv_bias,
                               attn_drop=self.attn_dropout, proj_drop=self.dropout,
                               impl=self.impl)
    self.norm2 = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype)
    self.mlp = Mlp(self.mlp_dim, self.dropout, self.gelu_approximate, self.dtype)
    if self.layerscale is not None:
      self.ls1, self.ls2 = LayerScale(self.layerscale), LayerScale(self.layerscale)

  def attend(self, x, ctx, need=(), deterministic=True):
    h, aux = self.attn(self.norm1(x), ctx, need=tuple(need), deterministic=deterministic)
    if self.layerscale is not None:
      h = self.ls1(h)
    return x + drop_path(self, h, self.drop_path_rate, deterministic), aux

  def feed_forward(self, x, deterministic=True):
    h = self.mlp(self.norm2(x), deterministic=deterministic)
    if self.layerscale is not None:
      h = self.ls2(h)
    return x + drop_path(self, h, self.drop_path_rate, deterministic)

  def __call__(self, x, ctx, deterministic=True):
    x, _ = self.attend(x, ctx, (), deterministic)
    return self.feed_forward(x, deterministic)


class ScanBlock(nn.Module):
  """Adapter so that `nn.scan` can carry x and scan over per-layer drop-path rates."""
  block_kwargs: dict
  ctx: Any
  deterministic: bool

  @nn.compact
  def __call__(self, x, rate):
    x = Block(drop_path_rate=rate, name="block", **self.block_kwargs)(x, self.ctx, self.deterministic)
    return x, None


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

  def reduction_plan(self) -> list:
    """Per block: None or (registry entry, static kwargs) of the token reducer there."""
    name, options = tokens_lib.registry.split_spec(self.tokens)
    options = {k: v for k, v in options.items() if k != "prop_attn"}
    entry = tokens_lib.get(name)
    n_patches = self.grid[0] * self.grid[1]
    plan = entry.cls.plan(options, depth=self.depth, num_patches=n_patches,
                          num_prefix=self.num_prefix)
    if getattr(entry.cls, "reads_cls_score_norm", False) and "score_norm" not in options:
      # score-based reducers read a non-softmax [CLS] row the way its attention says (zoo R4)
      specs = self.attention_specs()
      plan = [kw if kw is None else {**kw, "score_norm": attn_lib.get(
          attn_lib.registry.split_spec(specs[i])[0]).caps.cls_score_norm}
              for i, kw in enumerate(plan)]
    return [None if kw is None else (entry, kw) for kw in plan]

  @property
  def prop_attn(self) -> bool:
    _, options = tokens_lib.registry.split_spec(self.tokens)
    return bool(options.get("prop_attn", False))

  def layer_needs(self, plan) -> list:
    """Aux signals each block's attention must return for the reducers."""
    needs = [set() for _ in range(self.depth)]
    for i, item in enumerate(plan):
      if item is None:
        continue
      entry, _ = item
      src = i - 1 if entry.slot == "pre" else i  # "mid" and "ahead" read their own block
      if entry.needs and src < 0:
        raise ValueError(f"token reducer {entry.name!r} at block 0 needs the attention of the "
                         "previous block; place it at block 1 or later")
      if src >= 0:
        needs[src] |= set(entry.needs)
    return [tuple(sorted(n)) for n in needs]

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
    specs = self.attention_specs()
    entries = [attn_lib.registry.check(s)[0] for s in specs]
    plan = self.reduction_plan()
    needs = self.layer_needs(plan)
    reduced = False
    for i in range(self.depth):
      item = plan[i]
      if item is not None and item[0].slot in ("pre", "ahead"):
        reduced = True
      if entries[i].caps.needs_grid and reduced:
        raise ValueError(f"block {i} uses grid attention {entries[i].name!r} after a token "
                         "reduction; only grid-free (Tier G) attention may follow a reduction")
      missing = set(needs[i]) - set(entries[i].caps.provides())
      if missing:
        red = next(p[0] for p in plan if p is not None)
        ok = tokens_lib.registry.compatible_attentions(red)
        raise ValueError(f"token reducer {red.name!r} needs {sorted(missing)} from the attention "
                         f"of block {i}, which {entries[i].name!r} cannot give; compatible "
                         f"attentions: {', '.join(ok)}")
      if item is not None:
        entry = item[0]
        if entry.needs_cls and not self.class_token:
          raise ValueError(f"token reducer {entry.name!r} needs a [CLS] token (class_token=True)")
        if entry.needs_grid and reduced and entry.slot == "mid":
          raise ValueError(f"token reducer {entry.name!r} needs the token grid at block {i}")
        reduced = True
    if self.scan and (any(p is not None for p in plan) or any(s != specs[0] for s in specs)):
      raise ValueError("scan=True needs identical blocks: no token reduction and no per-layer "
                       "attention overrides")
    return plan, needs

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

  def block_kwargs(self, spec) -> dict:
    return dict(attention=spec, num_heads=self.num_heads, mlp_dim=self.mlp_dim,
                dropout=self.dropout, attn_dropout=self.attn_dropout, layerscale=self.layerscale,
                qk_norm=self.qk_norm, qkv_bias=self.qkv_bias, impl=self.impl,
                gelu_approximate=self.gelu_approximate, dtype=self.dtype)

  def context(self, state, reduced: bool):
    key_bias = jnp.log(state.size) if (self.prop_attn and reduced) else None
    return attn_lib.AttnContext(
        key_bias=key_bias, size=state.size, valid=state.valid, pos=state.pos,
        grid=None if reduced else self.grid, num_prefix=self.num_prefix,
        cls_index=0 if self.class_token else None)

  def encode(self, x, state, train: bool, out: dict):
    plan, needs = self.validate()
    specs = self.attention_specs()
    rates = np.linspace(0.0, self.drop_path, self.depth).tolist()
    if self.scan:
      block = ScanBlock
      if self.remat:
        block = nn.remat(block, static_argnums=())
      scanned = nn.scan(block, variable_axes={"params": 0, "batch_stats": 0},
                        split_rngs={"params": True, "dropout": True}, in_axes=0, length=self.depth)
      # The carry keeps one dtype: a block returns a float32 residual stream (as the unrolled
      # path has after its first block) even when the embedding is computed in bfloat16.
      x, _ = scanned(self.block_kwargs(specs[0]), self.context(state, False), not train,
                     name="encoder")(x.astype(jnp.float32), jnp.asarray(rates, jnp.float32))
      return x, state
    attend, feed_forward = Block.attend, Block.feed_forward
    if self.remat:  # recompute activations in the backward pass; the module is argument 0
      attend = nn.remat(Block.attend, static_argnums=(3, 4))
      feed_forward = nn.remat(Block.feed_forward, static_argnums=(2,))
    reduced, prev_aux = False, {}
    for i in range(self.depth):
      blk = Block(drop_path_rate=rates[i], name=f"block_{i}", **self.block_kwargs(specs[i]))
      reducer = None
      if plan[i] is not None:
        entry, kw = plan[i]
        reducer = entry.cls(num_prefix=self.num_prefix, dtype=self.dtype, name=f"reduce_{i}", **kw)
      need, before = needs[i], (x, state)
      if reducer is not None and entry.slot == "ahead":
        # one-step-ahead (MCTF): this block's attention on the tokens before the reduction feeds
        # the reducer; its output is discarded (XLA drops the unused P.V and projection)
        _, ahead_aux = attend(blk, x, self.context(state, reduced), need, not train)
        need = ()
      if reducer is not None and entry.slot in ("pre", "ahead"):
        x, state = reducer(x, state, ahead_aux if entry.slot == "ahead" else prev_aux,
                           deterministic=not train)
        reduced = True
        self.record_state(out, i, state)
      x, aux = attend(blk, x, self.context(state, reduced), need, not train)
      if reducer is not None and entry.slot == "mid":
        x, state = reducer(x, state, aux, deterministic=not train)
        reduced = True
        self.record_state(out, i, state)
      x = feed_forward(blk, x, not train)
      if reducer is not None and getattr(reducer, "fuses_back", False):
        # TokenFuser: the block ran on learned tokens; map them back onto its input tokens
        x, state = reducer.fuse_back(x, state, *before, deterministic=not train)
      prev_aux = aux
      out[f"block_{i}"] = x
    return x, state

  def record_state(self, out: dict, block: int, state):
    """With track_source=True, keeps each reducer's output state as out["token_state_{block}"]."""
    if self.track_source:
      out[f"token_state_{block}"] = state

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    out = {}
    x = self.embed(images)
    x = self.add_prefix_and_posemb(x)
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    out["stem"] = x
    with_pos = any(attn_lib.get(attn_lib.registry.split_spec(s)[0]).caps.needs_pos
                   for s in self.attention_specs())
    state = tokens_lib.initial_state(x.shape[0], self.num_prefix, self.grid,
                                     track_source=self.track_source, with_pos=with_pos)
    x, state = self.encode(x, state, train, out)
    out["token_state"] = state
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
