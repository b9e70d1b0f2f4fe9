"""The contract every attention mechanism of the zoo implements, and the cores its families share.

A mechanism maps tokens (B, N, D) -> (B, N, D) and, on request (a static tuple `need`), returns the
signals that token reducers read (see `AUX_FIELDS`). Its `Capabilities` say which signals it can give,
so that incompatible (attention, reducer) pairs fail when the model is built, not deep inside JAX.

`Attention.__call__` projects x to q, k, v, hands them to the mechanism's `mix` and projects the
result back. A mechanism file states only what differs, through one of three family cores:
  softmax      `Attention.attend` with softmax weights: materialised for impl="reference" (or when
               the weights themselves are needed), else a fused kernel with an exact [CLS] row;
  elementwise  `Attention.attend` with `weights=elementwise(map)`: scores -> map(scores, bias);
  factored     `Attention.attend_factored`: weights P = L R of rank r (kernel features, agents,
               latents), applied as L (R V) in O(N r d) unless P itself is needed.
"""
import dataclasses
import functools
from typing import Any, Callable, Optional, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# Signals a token reducer may ask an attention layer for (all float32):
#   cls_probs           [B, N]     head-mean attention row of the [CLS] query over all keys (CLS included)
#   cls_probs_per_head  [B, H, N]  the same row per head (ATS)
#   value_norm          [B, H, N]  |v_hj| (ATS)
#   key_metric          [B, N, d]  head-mean keys (ToMe)
#   attn                [B, H, N, N] the full weights (MCTF, K-Medoids; tests)
AUX_FIELDS = ("cls_probs", "cls_probs_per_head", "value_norm", "key_metric", "attn")
CLS_PROBS_MODES = ("exact", "recompute", "approx", "none")
# the impls of softmax attention (see `fused_softmax`), for mechanisms whose weights are softmax's
SOFTMAX_IMPLS = ("reference", "xla", "cudnn", "pallas")


@flax.struct.dataclass
class AttnContext:
  """What an attention layer may know about its tokens besides their features."""
  key_bias: Optional[jax.Array] = None  # [B, N] additive per-key logit bias (ToMe's log size)
  size: Optional[jax.Array] = None      # [B, N] how many patches each token stands for
  valid: Optional[jax.Array] = None     # [B, N] bool, False = padding / dropped key; or a
                                        # {0,1} float keep policy (DynamicViT training)
  pos: Optional[jax.Array] = None       # [B, N, 2] (row, col) in patch units, NaN for prefix tokens
  step: Optional[jax.Array] = None      # training step, for schedules inside a mechanism
  progress: Optional[jax.Array] = None  # float32 scalar in [0, 1]: step / total steps; None in
                                        # evaluation
  global_query: Optional[jax.Array] = None  # [B, T, D] queries from outside the layer, shared
                                            # by every window of T tokens (GC ViT's global
                                            # query tokens, made once per stage)
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


# ----------------------------------------------------------------------------- keys and tokens
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


def key_weights(bias) -> Optional[jax.Array]:
  """[B,1,1,M] additive key bias -> [B,M] multiplicative key weights s_j = exp(beta_j)."""
  return None if bias is None else jnp.exp(bias[:, 0, 0, :])


NO_CLS = "this model has no [CLS] token, so there is no [CLS] attention row"


def cls_position(ctx: Optional[AttnContext]) -> int:
  """Index of the [CLS] query (0 without a context); raises where the model has none."""
  index = 0 if ctx is None else ctx.cls_index
  if index is None:
    raise ValueError(NO_CLS)
  return index


def cls_row(probs: jax.Array, cls_index: Optional[int]) -> jax.Array:
  """[B, H, N, N] weights -> [B, H, N], the row of the [CLS] query."""
  if cls_index is None:
    raise ValueError(NO_CLS)
  return probs[:, :, cls_index, :].astype(jnp.float32)


def grid_size(own: Optional[tuple], ctx: Optional[AttnContext], name: str) -> tuple:
  """The patch grid (h, w): the mechanism's own option, else ctx.grid."""
  grid = own if own is not None else (None if ctx is None else ctx.grid)
  if grid is None:
    raise ValueError(f"{name} needs the patch grid size: pass attention option grid=(h, w) "
                     "(ctx.grid is unset after a token reduction)")
  return tuple(int(g) for g in grid)


def raster_index(pos, width: int):
  """pos [B,N,2] (row, col) -> (row * width + col [B,N] float32, 0 where unknown; known [B,N])."""
  pos = pos.astype(jnp.float32)
  known = ~jnp.isnan(pos).any(-1)
  return jnp.where(known, pos[..., 0] * width + pos[..., 1], 0.0), known


def adaptive_pool_matrix(size_in: int, size_out: int) -> np.ndarray:
  """[out, in] averaging matrix with PyTorch's AdaptiveAvgPool bins [floor(i*in/out), ceil(...))."""
  m = np.zeros((size_out, size_in), np.float32)
  for i in range(size_out):
    lo, hi = (i * size_in) // size_out, -(-((i + 1) * size_in) // size_out)
    m[i, lo:hi] = 1.0 / (hi - lo)
  return m


# ----------------------------------------------------------------------------- weights
def scores(q, k, scale: Optional[float] = None):
  """q [B,N,H,d], k [B,M,H,d] -> scale * Q K^T, float32 [B,H,N,M]; scale 1/sqrt(d) by default."""
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  return jnp.einsum("bnhd,bmhd->bhnm", q, k, preferred_element_type=jnp.float32) * scale


def softmax_weights(q, k, bias=None):
  """q [B,N,H,d], k [B,M,H,d] -> softmax weights [B,H,N,M] in float32."""
  logits = scores(q, k)
  if bias is not None:
    logits = logits + bias
  return jax.nn.softmax(logits, axis=-1)


def elementwise(weight_map: Callable, scale: Optional[float] = None) -> Callable:
  """The elementwise family's weights(q, k, bias) = weight_map(scores(q, k, scale), bias)."""
  return lambda q, k, bias: weight_map(scores(q, k, scale), bias)


def query_row(weights: Callable, q, k, bias, index: int):
  """Row `index` of weights(q, k, bias), [B,H,M], from that one query (R1 of the spec)."""
  return weights(q[:, index][:, None], k, bias)[:, :, 0].astype(jnp.float32)


def fused_softmax(q, k, v, bias, impl: str):
  """Softmax attention through a fused path; returns [B,N,H,d]."""
  if impl == "pallas":
    from vitjax.kernels import flash_attention  # pylint: disable=import-outside-toplevel
    return flash_attention.attention(q, k, v, bias)
  b = None if bias is None else jnp.broadcast_to(bias, (q.shape[0], 1, 1, k.shape[1]))
  if b is not None and impl == "cudnn":
    b = jnp.broadcast_to(b, (q.shape[0], q.shape[2], q.shape[1], k.shape[1])).astype(q.dtype)
  return jax.nn.dot_product_attention(q, k, v, bias=b, implementation=impl)


def kernel_factors(fq, fk, kw=None, eps: float = 1e-6):
  """Kernel (linear) attention A_ij = phi_i . s_j phi_j / (sum_j phi_i . s_j phi_j + eps) as the
  factors of `attend_factored`: fq [B,N,H,r], fk [B,M,H,r], kw [B,M] -> L [B,H,N,r], R [B,H,r,M]."""
  fk = fk if kw is None else fk * kw[:, :, None, None]
  den = jnp.einsum("bnhr,bhr->bhn", fq, fk.sum(axis=1)) + eps
  return fq.transpose(0, 2, 1, 3) / den[..., None], fk.transpose(0, 2, 3, 1)


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


# ----------------------------------------------------------------------------- aux signals
def cls_aux(need: Sequence[str], row_fn: Callable) -> dict:
  """The requested [CLS] signals from `row_fn() -> [B,H,N]`; the row is built only if asked for."""
  if not any(f in need for f in ("cls_probs", "cls_probs_per_head")):
    return {}
  row = row_fn()
  aux = {"cls_probs": row.mean(axis=1), "cls_probs_per_head": row}
  return {f: aux[f] for f in aux if f in need}


def collect_aux(need: Sequence[str], *, probs=None, q=None, k=None, v=None, ctx=None,
                row_fn=None) -> dict:
  """Builds the requested aux signals from whatever the mechanism has at hand.

  probs: [B,H,N,N] materialised weights, or None on a fused path; then `row_fn()` must return the
  [B,H,N] [CLS] row recomputed exactly (R1 of the spec). q is accepted for callers' symmetry.
  """
  del q
  unknown = set(need) - set(AUX_FIELDS)
  if unknown:
    raise ValueError(f"unknown aux fields {sorted(unknown)}; valid: {AUX_FIELDS}")
  cls_index = 0 if ctx is None else ctx.cls_index
  aux = cls_aux(need, (lambda: cls_row(probs, cls_index)) if probs is not None else row_fn)
  if "key_metric" in need:
    aux["key_metric"] = k.astype(jnp.float32).mean(axis=2)
  if "value_norm" in need:
    aux["value_norm"] = jnp.linalg.norm(v.astype(jnp.float32), axis=-1).transpose(0, 2, 1)
  if "attn" in need:
    if probs is None:
      raise ValueError("the full attention matrix was requested from a path that does not build it")
    aux["attn"] = probs.astype(jnp.float32)
  return aux


# ----------------------------------------------------------------------------- analytic cost
def projection_macs(n: int, width: int) -> int:
  """q, k, v and output projections of n tokens: 4 n D^2."""
  return 4 * n * width * width


def quadratic_macs(n: int, width: int, num_heads: int, **_) -> int:
  """Softmax-shaped attention on n tokens: 4 n D^2 projections + 2 n^2 D for Q K^T and P V."""
  del num_heads
  return projection_macs(n, width) + 2 * n * n * width


def kernel_macs(n: int, width: int, num_heads: int, features: Optional[int] = None, **_) -> int:
  """Kernel attention with r features per head (d by default): projections, phi(K)^T V and
  phi(Q) (K^T V), 2 n r D, and the normaliser phi(Q) . sum_j phi(K), n r H."""
  r = width // num_heads if features is None else features
  return projection_macs(n, width) + 2 * n * r * width + n * r * num_heads


# ----------------------------------------------------------------------------- the module
class Attention(nn.Module):
  """Shared fields, projections and family cores of the multi-head attention mechanisms.

  `__call__(x, ctx=None, *, need=(), deterministic=True)` returns (y, aux). A mechanism overrides
  `mix` (the part between the projections; by default softmax attention through `attend` with the
  `weight_fn` and `fused_fn` hooks), or `__call__` itself when its projections differ.
  """
  num_heads: int
  qkv_bias: bool = True
  qk_norm: bool = False
  attn_drop: float = 0.0
  proj_drop: float = 0.0
  impl: str = "reference"
  dtype: Any = jnp.float32
  caps = Capabilities()  # replaced by the registry decorator

  @nn.compact
  def __call__(self, x, ctx: Optional[AttnContext] = None, *, need=(), deterministic=True):
    q, k, v = self.project(x)
    bias = additive_key_bias(ctx, x.shape[1])
    y, aux = self.mix(x, q, k, v, bias, ctx, need=tuple(need), deterministic=deterministic)
    return self.project_out(y, x.shape[-1], deterministic), aux

  def mix(self, x, q, k, v, bias, ctx, *, need, deterministic):
    """(y [B,N,H,d] or [B,N,D], aux) from the projected tokens; x is the layer input."""
    del x
    return self.attend(q, k, v, bias, ctx, need=need, deterministic=deterministic,
                       weights=self.weight_fn(), fused=self.fused_fn())

  def weight_fn(self) -> Optional[Callable]:
    """weights(q, k, bias) -> [B,H,N,M] float32 of the default `mix`; None: softmax."""
    return None

  def fused_fn(self) -> Optional[Callable]:
    """A path fused(q, k, v, bias) -> [B,N,H,d] that builds no weights; None: softmax's kernels
    for impl != "reference" when `weight_fn` is softmax, else none."""
    return None

  def quant_point(self, kind: str, x):
    """The identity; where post-training quantization (`vitjax.quant`) quantizes an input of the
    attention core's matmuls (kind: query, key, value, softmax or other weights, the factors
    left / right of the factored family). Only materialised weights pass here."""
    del kind
    return x

  def head_dim(self, width: int) -> int:
    if width % self.num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
    return width // self.num_heads

  def project(self, x):
    return self.project_qkv(x)

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
    """[B,N,H,d] (or [B,N,D]) -> [B,N,D] through the output projection and dropout."""
    y = y.reshape(*y.shape[:2], -1)
    y = nn.Dense(width, dtype=self.dtype, name="proj")(y)
    return nn.Dropout(self.proj_drop)(y, deterministic=deterministic)

  def dropout_weights(self, w, deterministic: bool):
    if self.attn_drop == 0.0:
      return w
    return nn.Dropout(self.attn_drop)(w, deterministic=deterministic)

  def dropping(self, deterministic: bool) -> bool:
    return self.attn_drop > 0 and not deterministic

  def attend(self, q, k, v, bias, ctx, *, need, deterministic, weights=None, fused=None,
             keys=None):
    """The softmax and elementwise families' core: (y [B,N,H,d], aux).

    weights(q, k, bias) -> [B,H,N,M] float32 builds the weights (None: softmax, whose fused kernels
    serve impl != "reference"); fused(q, k, v, bias) is a path without them, taken unless they are
    needed (`attn`, attention dropout); its [CLS] row is then recomputed from `weights` for that
    one query. keys: what `key_metric` reads (default k).
    """
    kind = "softmax" if weights is None else "weights"
    if weights is None:
      weights = softmax_weights
      if fused is None and self.impl != "reference":
        fused = functools.partial(fused_softmax, impl=self.impl)
    probs = None
    if fused is None or "attn" in need or self.dropping(deterministic):
      q, k, v = (self.quant_point(n, t) for n, t in (("query", q), ("key", k), ("value", v)))
      probs = self.quant_point(kind, weights(q, k, bias))
      y = weighted_values(self.dropout_weights(probs, deterministic).astype(v.dtype), v)
    else:
      y = fused(q, k, v, bias)
    row = lambda: query_row(weights, q, k, bias, cls_position(ctx))  # noqa: E731
    aux = collect_aux(need, probs=probs, k=k if keys is None else keys, v=v, ctx=ctx, row_fn=row)
    return y, aux

  def attend_factored(self, left, right, v, ctx, *, need, deterministic, keys=None,
                      materialise: bool = False, drop_factors: bool = False):
    """The factored family's core: weights P = L R, L [B,H,N,r], R [B,H,r,M]; (y [B,N,H,d], aux).

    P is built only when asked for (`attn`, `materialise`) or for attention dropout on P; the
    [CLS] row is exact either way (L_cls R, O(r M)). drop_factors: attention dropout acts on L and
    R instead (agent attention's official form).
    """
    left, right = self.quant_point("left", left), self.quant_point("right", right)
    v = self.quant_point("value", v)
    dropping = self.dropping(deterministic)
    probs = None
    if materialise or "attn" in need or (dropping and not drop_factors):
      probs = jnp.einsum("bhnr,bhrm->bhnm", left, right)
    if probs is not None and not (dropping and drop_factors):
      y = weighted_values(self.dropout_weights(probs, deterministic).astype(v.dtype), v)
    else:
      wl, wr = left, right
      if dropping:
        wl, wr = (self.dropout_weights(t, deterministic) for t in (left, right))
      state = jnp.einsum("bhrm,bmhd->bhrd", wr.astype(v.dtype), v)
      y = jnp.einsum("bhnr,bhrd->bnhd", wl.astype(v.dtype), state)
    row = lambda: jnp.einsum("bhr,bhrm->bhm", left[:, :, cls_position(ctx)], right)  # noqa: E731
    aux = collect_aux(need, probs=probs, k=keys, v=v, ctx=ctx, row_fn=row)
    return y, aux

  def attend_kernel(self, fq, fk, v, kw, ctx, *, eps: float, need, deterministic, keys,
                    materialise: bool = False):
    """Kernel attention with features fq [B,N,H,r], fk [B,M,H,r] and key weights kw [B,M]; y in
    v's dtype. The values enter in float32: the sums over all keys keep their precision."""
    left, right = kernel_factors(fq, fk, kw, eps)
    y, aux = self.attend_factored(left, right, v.astype(jnp.float32), ctx, need=need,
                                  deterministic=deterministic, keys=keys, materialise=materialise)
    return y.astype(v.dtype), aux
