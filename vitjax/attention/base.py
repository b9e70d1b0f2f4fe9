"""The contract every attention mechanism of the zoo implements.

A mechanism maps tokens (B, N, D) -> (B, N, D) and, on request (a static tuple `need`), returns the
signals that token reducers read (see `AUX_FIELDS`). Its `Capabilities` say which signals it can give,
so that incompatible (attention, reducer) pairs fail when the model is built, not deep inside JAX.
"""
import dataclasses
from typing import Any, Optional, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

# Signals a token reducer may ask an attention layer for (all float32):
#   cls_probs           [B, N]     head-mean attention row of the [CLS] query over all keys (CLS included)
#   cls_probs_per_head  [B, H, N]  the same row per head (ATS)
#   value_norm          [B, H, N]  |v_hj| (ATS)
#   key_metric          [B, N, d]  head-mean keys (ToMe)
#   attn                [B, H, N, N] the full weights (MCTF, K-Medoids; tests)
AUX_FIELDS = ("cls_probs", "cls_probs_per_head", "value_norm", "key_metric", "attn")
CLS_PROBS_MODES = ("exact", "recompute", "approx", "none")


@flax.struct.dataclass
class AttnContext:
  """What an attention layer may know about its tokens besides their features."""
  key_bias: Optional[jax.Array] = None  # [B, N] additive per-key logit bias (ToMe's log size)
  size: Optional[jax.Array] = None      # [B, N] how many patches each token stands for
  valid: Optional[jax.Array] = None     # [B, N] bool, False = padding / dropped key; or a
                                        # {0,1} float keep policy (DynamicViT training)
  pos: Optional[jax.Array] = None       # [B, N, 2] (row, col) in patch units, NaN for prefix tokens
  step: Optional[jax.Array] = None      # training step, for schedules inside a mechanism
  grid: Optional[tuple] = flax.struct.field(pytree_node=False, default=None)  # (h, w), raster order
  num_prefix: int = flax.struct.field(pytree_node=False, default=1)  # CLS + dist + registers
  cls_index: Optional[int] = flax.struct.field(pytree_node=False, default=0)  # None: no CLS


@dataclasses.dataclass(frozen=True)
class Capabilities:
  """Static facts about a mechanism, checked against token reducers at config time."""
  cls_probs: str = "exact"        # one of CLS_PROBS_MODES
  key_metric: bool = True         # can return head-mean keys
  size_semantics: bool = True     # honours token sizes (R2 of the spec)
  key_bias: bool = True           # accepts an additive per-key bias / key mask
  needs_grid: bool = False        # Tier S: tokens must be a raster grid
  needs_pos: bool = False         # needs per-token coordinates
  causal: bool = False
  full_attn: bool = True          # can materialise [B, H, N, N] weights
  cls_score_norm: str = "none"    # how EViT should read a non-softmax row: none | row | abs_row

  def provides(self) -> tuple:
    out = []
    if self.cls_probs != "none":
      out += ["cls_probs", "cls_probs_per_head"]
    if self.key_metric:
      out.append("key_metric")
    if self.full_attn:
      out += ["attn", "value_norm"]
    return tuple(out)


def additive_key_bias(ctx: Optional[AttnContext], n: int) -> Optional[jax.Array]:
  """Combines `key_bias` and `valid` of a context into one float32 bias of shape [B, 1, 1, n]."""
  if ctx is None:
    return None
  bias = None
  if ctx.key_bias is not None:
    bias = ctx.key_bias.astype(jnp.float32)
  if ctx.valid is not None:
    if jnp.issubdtype(ctx.valid.dtype, jnp.floating):
      mask = policy_key_bias(ctx.valid)
    else:
      mask = jnp.where(ctx.valid, 0.0, -jnp.inf).astype(jnp.float32)
    bias = mask if bias is None else bias + mask
  if bias is None:
    return None
  if bias.shape[-1] != n:
    raise ValueError(f"key bias has {bias.shape[-1]} keys but the layer sees {n} tokens")
  return bias[:, None, None, :]


POLICY_EPS = 1e-20  # weight left to a dropped key, relative: invisible in fp32 and bf16 outputs


def policy_key_bias(policy: jax.Array) -> jax.Array:
  """A {0, 1} float keep policy [B, N] as an additive key bias with DynamicViT's gradient.

  DynamicViT multiplies exp(logits) by the policy, so a dropped key j still passes the gradient
  sum_i q_ij (...) to its decision (q: the softmax weight it would have). A -inf bias passes none.
  Forward: bias 0 for kept keys and log(eps) for dropped ones; backward: d bias / d policy =
  1 / (policy + eps), the derivative of log(policy + eps), which reproduces that gradient.
  """
  p = policy.astype(jnp.float32)
  hard = jax.lax.stop_gradient(p)
  bias = jnp.where(hard > 0.5, 0.0, jnp.log(POLICY_EPS)).astype(jnp.float32)
  return bias + (p - hard) / (hard + POLICY_EPS)


def cls_row(probs: jax.Array, cls_index: Optional[int]) -> jax.Array:
  """[B, H, N, N] weights -> [B, H, N], the row of the [CLS] query."""
  if cls_index is None:
    raise ValueError("this model has no [CLS] token, so there is no [CLS] attention row")
  return probs[:, :, cls_index, :].astype(jnp.float32)


class Attention(nn.Module):
  """Shared fields and projections of multi-head attention mechanisms.

  Subclasses implement an `@nn.compact` `__call__(x, ctx=None, *, need=(), deterministic=True)`
  returning (y, aux); the helpers below create their submodules inside it.
  """
  num_heads: int
  qkv_bias: bool = True
  qk_norm: bool = False
  attn_drop: float = 0.0
  proj_drop: float = 0.0
  impl: str = "reference"
  dtype: Any = jnp.float32
  caps = Capabilities()  # replaced by the registry decorator

  def head_dim(self, width: int) -> int:
    if width % self.num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
    return width // self.num_heads

  def project_qkv(self, x, num_kv_heads: Optional[int] = None):
    """x [B,N,D] -> q [B,N,H,d], k and v [B,N,Hkv,d] (fused projection, timm's `qkv` layout)."""
    width = x.shape[-1]
    d = self.head_dim(width)
    hkv = self.num_heads if num_kv_heads is None else num_kv_heads
    feats = (self.num_heads + 2 * hkv) * d
    qkv = nn.Dense(feats, use_bias=self.qkv_bias, dtype=self.dtype, name="qkv")(x)
    q, k, v = jnp.split(qkv, [self.num_heads * d, (self.num_heads + hkv) * d], axis=-1)
    q = q.reshape(*x.shape[:2], self.num_heads, d)
    k = k.reshape(*x.shape[:2], hkv, d)
    v = v.reshape(*x.shape[:2], hkv, d)
    if self.qk_norm:
      q = nn.LayerNorm(dtype=self.dtype, name="q_norm")(q)
      k = nn.LayerNorm(dtype=self.dtype, name="k_norm")(k)
    return q, k, v

  def project_out(self, y, width: int, deterministic: bool):
    """[B,N,H,d] -> [B,N,D] through the output projection and dropout."""
    y = y.reshape(*y.shape[:2], -1)
    y = nn.Dense(width, dtype=self.dtype, name="proj")(y)
    return nn.Dropout(self.proj_drop)(y, deterministic=deterministic)

  def dropout_weights(self, w, deterministic: bool):
    if self.attn_drop == 0.0:
      return w
    return nn.Dropout(self.attn_drop)(w, deterministic=deterministic)


def l2_normalize(x, eps: float):
  """x / max(|x|, eps) over the last axis, computed in float32 and returned in x's dtype; the
  gradient stays finite at x = 0 (a zero-initialised [CLS] gives exact zero queries)."""
  x32 = x.astype(jnp.float32)
  sq = jnp.sum(x32 * x32, axis=-1, keepdims=True)
  return (x32 * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))).astype(x.dtype)


def weighted_values(w, v):
  """sum_m w[b,h,n,m] v[b,m,h,d] -> [B,N,H,d].

  Contracted head-major ([B,H,M,d] -> [B,H,N,d]) and transposed back: XLA:CPU runs the single
  einsum into [B,N,H,d] about 2x slower (ViT-S/16 shapes at batch 32: 101 ms vs 57 ms per layer
  for the attention core); accelerators pick their own layouts either way.
  """
  return jnp.einsum("bhnm,bhmd->bhnd", w, v.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)


def collect_aux(need: Sequence[str], *, probs=None, q=None, k=None, v=None, ctx=None,
                row_fn=None) -> dict:
  """Builds the requested aux signals from whatever the mechanism has at hand.

  probs: [B,H,N,N] materialised weights, or None on a fused path; then `row_fn()` must return the
  [B,H,N] [CLS] row recomputed exactly (R1 of the spec).
  """
  aux = {}
  cls_index = None if ctx is None else ctx.cls_index
  ctx_cls = 0 if ctx is None else cls_index
  if any(f in need for f in ("cls_probs", "cls_probs_per_head")):
    row = cls_row(probs, ctx_cls) if probs is not None else row_fn()
    if "cls_probs" in need:
      aux["cls_probs"] = row.mean(axis=1)
    if "cls_probs_per_head" in need:
      aux["cls_probs_per_head"] = row
  if "key_metric" in need:
    aux["key_metric"] = k.astype(jnp.float32).mean(axis=2)
  if "value_norm" in need:
    aux["value_norm"] = jnp.linalg.norm(v.astype(jnp.float32), axis=-1).transpose(0, 2, 1)
  if "attn" in need:
    if probs is None:
      raise ValueError("the full attention matrix was requested from a path that does not build it")
    aux["attn"] = probs.astype(jnp.float32)
  unknown = set(need) - set(AUX_FIELDS)
  if unknown:
    raise ValueError(f"unknown aux fields {sorted(unknown)}; valid: {AUX_FIELDS}")
  return aux
