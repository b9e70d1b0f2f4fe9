"""G5 `performer`: FAVOR+ (Choromanski et al. 2021, "Rethinking Attention with Performers").

Positive orthogonal random features approximate the softmax kernel exp(q.k / sqrt(d)):
  x^ = x d^(-1/4);  phi(x^)_r = m^(-1/2) (exp(w_r.x^ - |x^|^2 / 2 - c) + eps),  r = 1..m,
then phi goes into the linear-attention formula of `linear_elu` (O(N m d) per head).
- w: stacked d x d blocks of Gaussian matrices orthogonalised by QR, rows rescaled by the norms of
  Gaussian vectors (chi_d), as in the official FAVOR+ code; shared by the heads of a layer.
- c: the stabiliser, the max of w.x^ per row for queries and over all valid keys and features for
  keys (under stop_gradient: it cancels in the ratio up to eps). eps = 1e-6 (official default).
- m defaults to int(d ln d) (266 for d = 64) and w is redrawn every 1000 training steps: the defaults
  of the reference PyTorch port (the paper leaves m as a tuning knob).

Randomness without state: w is a pure function of (`feature_seed`, the layer's module path,
step // redraw_interval), so runs are reproducible and nothing has to live in a variable collection.
Without `ctx.step` (the model does not pass one by default) the draw of step 0 is used, at training
and evaluation alike. Under `nn.scan` all layers share one module path and hence one draw.

[CLS] scores: `cls_probs_mode="model"` gives the row of the weights the layer used (an approximation
of softmax, capability `approx`); `"exact_softmax"` recomputes the exact softmax row (R1).
"""
import math
import zlib
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitjax.attention import registry
from vitjax.attention.base import (Attention, AttnContext, Capabilities, additive_key_bias,
                                   collect_aux)
from vitjax.attention.linear_elu import cls_query, kernel_attend, key_weights
from vitjax.attention.mhsa import cls_softmax_row

IMPLS = ("reference", "xla")
CLS_MODES = ("model", "exact_softmax")


def default_num_features(d: int) -> int:
  return int(d * math.log(d))


def random_projection(key, m: int, d: int, orthogonal: bool = True):
  """[m, d] feature directions: orthogonal blocks with chi_d row norms, or i.i.d. Gaussian rows."""
  gkey, nkey = jax.random.split(key)
  if not orthogonal:
    return jax.random.normal(gkey, (m, d), jnp.float32)
  blocks = -(-m // d)
  gauss = jax.random.normal(gkey, (blocks, d, d), jnp.float32)
  qmat, _ = jnp.linalg.qr(gauss)                     # orthonormal columns per block
  rows = jnp.swapaxes(qmat, 1, 2).reshape(blocks * d, d)[:m]
  norms = jnp.linalg.norm(jax.random.normal(nkey, (m, d), jnp.float32), axis=-1)
  return rows * norms[:, None]


def favor_features(x, omega, *, is_query: bool, kw=None, eps: float = 1e-6):
  """Positive random features of x [B,N,H,d] -> [B,N,H,m] float32."""
  x = x.astype(jnp.float32) * x.shape[-1] ** -0.25
  proj = jnp.einsum("bnhd,md->bnhm", x, omega)
  sq = 0.5 * jnp.sum(x * x, axis=-1, keepdims=True)
  if is_query:
    c = proj.max(axis=-1, keepdims=True)
  else:  # one constant per (batch, head) over the keys that count
    p = proj if kw is None else jnp.where(kw[:, :, None, None] > 0, proj, -jnp.inf)
    c = p.max(axis=(1, 3), keepdims=True)
  c = jax.lax.stop_gradient(c)
  return omega.shape[0] ** -0.5 * (jnp.exp(proj - sq - c) + eps)


@registry.register(
    "performer", caps=Capabilities(cls_probs="approx"),
    paper="Rethinking Attention with Performers, FAVOR+ (Choromanski et al. 2021)",
    complexity="O(N m D)")
class PerformerAttention(Attention):
  """FAVOR+ attention with positive orthogonal random features."""
  num_features: Optional[int] = None  # m; None -> int(d ln d)
  orthogonal: bool = True
  redraw_interval: int = 1000         # redraw w every this many steps of ctx.step; 0 = never
  feature_seed: int = 0
  cls_probs_mode: str = "model"
  eps: float = 1e-6
  materialise: bool = False

  def projection(self, d: int, ctx: Optional[AttnContext]):
    m = self.num_features or default_num_features(d)
    layer = zlib.crc32("/".join(map(str, self.path)).encode())
    key = jax.random.fold_in(jax.random.key(self.feature_seed), layer)
    if self.redraw_interval and ctx is not None and ctx.step is not None:
      key = jax.random.fold_in(key, jnp.asarray(ctx.step, jnp.int32) // self.redraw_interval)
    return random_projection(key, m, d, self.orthogonal)

  @nn.compact
  def __call__(self, x, ctx: Optional[AttnContext] = None, *, need=(), deterministic=True):
    if self.impl not in IMPLS:
      raise ValueError(f"performer attention has impls {IMPLS}, got {self.impl!r}")
    if self.cls_probs_mode not in CLS_MODES:
      raise ValueError(f"cls_probs_mode must be one of {CLS_MODES}, got {self.cls_probs_mode!r}")
    q, k, v = self.project_qkv(x)
    bias = additive_key_bias(ctx, x.shape[1])
    kw = key_weights(bias)
    omega = self.projection(q.shape[-1], ctx)
    fq = favor_features(q, omega, is_query=True, eps=self.eps)
    fk = favor_features(k, omega, is_query=False, kw=kw, eps=self.eps)
    y, probs, row_fn = kernel_attend(self, fq, fk, v, kw, eps=0.0, need=need,
                                     deterministic=deterministic, materialise=self.materialise,
                                     ctx=ctx)
    if self.cls_probs_mode == "exact_softmax":
      cls_index = cls_query(ctx)
      row_fn = lambda: cls_softmax_row(q, k, bias, cls_index())  # noqa: E731
      probs_for_aux = None
    else:
      probs_for_aux = probs
    aux = collect_aux([f for f in need if f != "attn"], probs=probs_for_aux, q=q, k=k, v=v,
                      ctx=ctx, row_fn=row_fn)
    if "attn" in need:
      aux["attn"] = probs
    return self.project_out(y, x.shape[-1], deterministic), aux
