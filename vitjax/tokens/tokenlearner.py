"""`tokenlearner` (v1.1), `tokenlearner_v1` (v1.0) and the TokenFuser (Ryoo et al., NeurIPS 2021),
following the official Flax code (google-research/scenic, projects/token_learner).

v1.1: alpha = softmax over the image tokens of MLP_{D -> 64 -> S}(LN(x)) (GELU); y_s = sum_i
alpha_si x_i with the raw tokens. Each learned token is a convex combination of the inputs.
v1.0: four 3x3 convolutions on the token grid (no bias, GELU between them), a sigmoid, then sum
(or mean) pooling of the raw tokens with those maps; it needs the grid at its location.
TokenFuser (`fuser=True`): at every block from the location on, the block runs on the S learned
tokens and the fuser maps them back onto the N tokens it started from:
t = LN(Dense_{S -> S, zero init}(LN(y)^T)^T); beta = sigmoid(MLP_{D -> 64 -> S}(LN(x))) [N, S];
out = beta t + x. The zero-initialised mixing makes the fuser the identity at initialisation.

Dropout (v1.1 learner and fuser): the encoder's rate unless `dropout` is given, as scenic passes
the encoder's dropout_rate to both (projects/token_learner/model.py, EncoderMod L312-314,
EncoderModFuser L397-399 and L415); v1.0 has none (scenic's TokenLearnerModule takes no rate).

The prefix (CLS, registers) is never pooled: it passes through (the paper's models have no CLS and
pool with GAP). Sizes after a learner are alpha @ size (soft merge, see tokens.base.merge_state).
"""
import math
from typing import Optional

import jax
import jax.numpy as jnp
import flax.linen as nn

from vitjax.tokens import registry
from vitjax.tokens.base import (BEFORE_ATTENTION, Layout, Plan, Reducer, at_blocks, cumulative_counts,
                                merge_state)

DEFAULT_TOKENS = 8  # scenic's EncoderMod default (small models); the ImageNet config uses 16
# scenic's MlpBlock initialisation
_mlp_init = dict(kernel_init=nn.initializers.xavier_uniform(),
                 bias_init=nn.initializers.normal(1e-6))


class MlpBlock(nn.Module):
  """Dense -> GELU (tanh form, flax's default) -> dropout -> Dense -> dropout (scenic MlpBlock)."""
  mlp_dim: int
  out_dim: int
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool):
    x = nn.gelu(nn.Dense(self.mlp_dim, dtype=self.dtype, **_mlp_init)(x))
    x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
    x = nn.Dense(self.out_dim, dtype=self.dtype, **_mlp_init)(x)
    return nn.Dropout(self.dropout)(x, deterministic=deterministic)


class TokenLearnerV11(nn.Module):
  """tokens [B, N, D] -> (learned tokens [B, S, D], pooling weights [B, S, N], rows sum to 1)."""
  num_tokens: int
  bottleneck: int = 64
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool):
    h = nn.LayerNorm(dtype=self.dtype, name="norm")(x)
    h = MlpBlock(self.bottleneck, self.num_tokens, self.dropout, self.dtype,
                 name="token_masking")(h, deterministic)
    alpha = jax.nn.softmax(h.astype(jnp.float32).transpose(0, 2, 1), axis=-1)
    return jnp.einsum("bsn,bnd->bsd", alpha.astype(x.dtype), x), alpha


class TokenLearnerV10(nn.Module):
  """tokens on a grid [B, h*w, D] -> (learned tokens [B, S, D], pooling weights [B, S, h*w])."""
  num_tokens: int
  grid: tuple
  sum_pooling: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool):
    b, n, d = x.shape
    h = nn.LayerNorm(dtype=self.dtype, name="norm")(x).reshape(b, *self.grid, d)
    for i in range(4):
      h = nn.Conv(self.num_tokens, (3, 3), padding="SAME", use_bias=False, dtype=self.dtype,
                  name=f"conv_{i}")(h)
      h = nn.gelu(h) if i < 3 else h
    maps = jax.nn.sigmoid(h.reshape(b, n, self.num_tokens).astype(jnp.float32)).transpose(0, 2, 1)
    weights = maps if self.sum_pooling else maps / n
    return jnp.einsum("bsn,bnd->bsd", weights.astype(x.dtype), x), weights


class TokenFuser(nn.Module):
  """(learned tokens after a block [B, S, D], the tokens they came from [B, N, D]) -> update
  [B, N, D] to add to the latter; zero at initialisation."""
  bottleneck: int = 64
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens, original, deterministic: bool):
    s = tokens.shape[1]
    t = nn.LayerNorm(dtype=self.dtype, name="mix_norm1")(tokens)
    t = nn.Dense(s, kernel_init=nn.initializers.zeros, dtype=self.dtype,
                 name="mix")(t.transpose(0, 2, 1)).transpose(0, 2, 1)
    t = nn.LayerNorm(dtype=self.dtype, name="mix_norm2")(t)
    o = nn.LayerNorm(dtype=self.dtype, name="norm")(original)
    beta = jax.nn.sigmoid(MlpBlock(self.bottleneck, s, self.dropout, self.dtype,
                                   name="token_masking")(o, deterministic))
    out = jnp.einsum("bsd,bns->bnd", t, beta.astype(t.dtype))
    return nn.Dropout(self.dropout)(out, deterministic=deterministic)


def learned_counts(name: str, opts: dict, n_locs: int, num_patches: int) -> list:
  """S per location from `num_tokens` or from a cumulative `keep_rate`."""
  if opts["num_tokens"] is not None and opts["keep_rate"] is not None:
    raise ValueError(f"token reducer {name!r}: give num_tokens or keep_rate, not both")
  if opts["keep_rate"] is not None:
    if isinstance(opts["keep_rate"], (list, tuple)):
      raise ValueError(f"token reducer {name!r}: keep_rate is one float (cumulative counts)")
    return cumulative_counts(name, opts["keep_rate"], (0,) * n_locs, num_patches)[1]
  s = DEFAULT_TOKENS if opts["num_tokens"] is None else opts["num_tokens"]
  counts = [int(c) for c in s] if isinstance(s, (tuple, list)) else [int(s)] * n_locs
  if len(counts) != n_locs or min(counts) < 1:
    raise ValueError(f"token reducer {name!r}: learned token counts {counts} for {n_locs} "
                     "location(s)")
  return counts


@registry.register("tokenlearner", paper="TokenLearner v1.1 (Ryoo et al., NeurIPS 2021; scenic)",
                   official="https://github.com/google-research/scenic (projects/token_learner)")
class TokenLearner(Reducer):
  """Learns `count` tokens from the image tokens; with `fuser`, maps them back after the block."""
  count: int = DEFAULT_TOKENS
  num_patches: int = 0       # N0, checked in fuser mode (every fused block starts from N0 tokens)
  fuser: bool = False
  bottleneck: int = 64
  dropout: float = 0.0

  hook = BEFORE_ATTENTION
  soft = True
  # num_tokens: int or one per location (default 8) or keep_rate (cumulative counts floor(N0 *
  # kr^s)); locations None: 3/4 of the depth (block 9 of 12 as in the scenic config); dropout
  # None: the encoder's rate
  options = {"num_tokens": None, "keep_rate": None, "locations": None, "fuser": False,
             "bottleneck": 64, "dropout": None}

  @classmethod
  def plan(cls, options, layout: Layout) -> Plan:
    name, opts = cls.name_in_registry, cls.parse(options, layout)
    depth, num_patches = layout.depth, layout.num_patches
    locs = opts.pop("locations") or (depth * 3 // 4,)
    counts = learned_counts(name, opts, len(locs), num_patches)
    del opts["num_tokens"], opts["keep_rate"]
    if opts["dropout"] is None:
      opts["dropout"] = layout.dropout
    if opts["fuser"] and len(locs) != 1:
      raise ValueError(f"token reducer {name!r}: with fuser=True give one location (learn and "
                       f"fuse at every block from there on), got {locs}")
    if cls.needs_grid and len(locs) != 1 and not opts["fuser"]:
      raise ValueError(f"token reducer {name!r} (v1.0) needs the token grid, which exists only at "
                       f"its first location; give one location, got {locs}")
    if cls.needs_grid:
      side = math.isqrt(num_patches)
      if side * side != num_patches:
        raise ValueError(f"token reducer {name!r} (v1.0) needs a square token grid, got "
                         f"{num_patches} patches")
      opts["grid"] = (side, side)
    blocks = range(locs[0], depth) if opts["fuser"] else locs
    return Plan(at_blocks(depth, {
        loc: dict(count=counts[0 if opts["fuser"] else i], num_patches=num_patches, **opts)
        for i, loc in enumerate(blocks)}))

  @classmethod
  def macs(cls, n: int, width: int, *, count: int, bottleneck: int = 64, fuser: bool = False,
           num_prefix: int = 1, **kwargs) -> int:
    """The learner on the m = n - p image tokens; with the fuser, also its S x S mixing, its MLP
    on the original tokens and the map back, m S width."""
    m = n - num_prefix
    total = cls.learner_macs(m, width, count, bottleneck, **kwargs)
    if fuser:
      mlp = m * (width * bottleneck + bottleneck * count)
      total += width * count * count + mlp + m * count * width
    return total

  @classmethod
  def learner_macs(cls, m: int, width: int, count: int, bottleneck: int, **kwargs) -> int:
    """v1.1: the MLP D -> bottleneck -> S on m tokens and the pooling, S m width."""
    del kwargs
    return m * (width * bottleneck + bottleneck * count) + count * m * width

  def make_learner(self):
    return TokenLearnerV11(self.count, self.bottleneck, self.dropout, self.dtype)

  def setup(self):
    self.learner = self.make_learner()
    if self.fuser:
      self.token_fuser = TokenFuser(self.bottleneck, self.dropout, self.dtype)

  def __call__(self, x, state, aux, *, deterministic=True):
    p = self.num_prefix
    if self.fuser and x.shape[1] != p + self.num_patches:
      raise ValueError(f"TokenFuser blocks expect the {self.num_patches} image tokens to be "
                       f"restored after each block, got {x.shape[1] - p}; the model must call "
                       "`after_block` after the block")
    y, weights = self.learner(x[:, p:], deterministic)
    return jnp.concatenate([x[:, :p], y], axis=1), merge_state(state, weights, p)

  def after_block(self, x, state, before, *, deterministic=True):
    """TokenFuser: x [B, p+S, D] after the block -> the block's input tokens, updated."""
    if not self.fuser:
      return x, state
    (x_before, state_before), p = before, self.num_prefix
    res = x_before[:, p:]
    img = self.token_fuser(x[:, p:], res, deterministic) + res
    return jnp.concatenate([x[:, :p], img], axis=1), state_before


@registry.register("tokenlearner_v1", paper="TokenLearner v1.0 (Ryoo et al., NeurIPS 2021; scenic)",
                   official="https://github.com/google-research/scenic (projects/token_learner)")
class TokenLearnerV1(TokenLearner):
  """v1.0: convolutional spatial maps with a sigmoid; needs the grid at its location."""
  grid: Optional[tuple] = None
  sum_pooling: bool = True

  needs_grid = True
  options = {**TokenLearner.options, "sum_pooling": True}

  @classmethod
  def learner_macs(cls, m: int, width: int, count: int, bottleneck: int, *, grid=None,
                   **kwargs) -> int:
    """Four 3x3 convolutions (D -> S, then S -> S three times) and the pooling, S m width; a
    zero-padded 3x3 convolution on an h x w grid has (3h - 2)(3w - 2) in-bounds taps."""
    del bottleneck, kwargs
    h, w = grid if grid is not None else (math.isqrt(m),) * 2
    return (3 * h - 2) * (3 * w - 2) * (width * count + 3 * count * count) + count * m * width

  def make_learner(self):
    return TokenLearnerV10(self.count, tuple(self.grid), self.sum_pooling, self.dtype)
