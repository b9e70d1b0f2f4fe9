"""G5 `performer`: FAVOR+ (Choromanski et al. 2021, "Rethinking Attention with Performers"), after
the official JAX code (https://github.com/google-research/google-research/blob/master/performer/
fast_attention/jax/fast_attention.py, `make_fast_softmax_attention`).

Positive orthogonal random features approximate the softmax kernel exp(q.k / sqrt(d)):
  x^ = x d^(-1/4);  phi(x^)_r = m^(-1/2) (exp(w_r.x^ - |x^|^2 / 2 - c) + eps),  r = 1..m,
then phi goes into the kernel core (`base.Attention.attend_kernel`, O(N m d) per head).
- w: stacked d x d blocks of Gaussian matrices orthogonalised by QR, rows rescaled by the norms of
  Gaussian vectors (chi_d), as in the official code; shared by the heads of a layer.
- c: the stabiliser, the max of w.x^ per row for queries and over all valid keys and features for
  keys (under stop_gradient: it cancels in the ratio up to eps). eps = 1e-6 (official default).
- m = 256 (the official `nb_features`).
- w is redrawn on every training call (official `redraw_features=True`), from the "dropout" rng
  stream the trainer passes; in evaluation (deterministic) w is a fixed draw, a pure function of
  (`feature_seed`, the layer's module path), so evaluation is reproducible without any state.
  `redraw=False` keeps that fixed draw in training too. Under `nn.scan` all layers share one
  module path and hence one evaluation draw. The official code seeds each redraw from the sum of
  the queries, in evaluation too; here evaluation does not depend on the batch.

[CLS] scores: `cls_probs_mode="model"` gives the row of the weights the layer used (an approximation
of softmax, capability `approx`); `"exact_softmax"` recomputes the exact softmax row (R1).
"""
import zlib

import jax
import jax.numpy as jnp

from vitjax.attention import registry
from vitjax.attention.base import (Attention, Capabilities, cls_aux, cls_position, kernel_macs,
                                   key_weights, query_row, softmax_weights)

CLS_MODES = ("model", "exact_softmax")


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


def performer_macs(n, width, num_heads, *, num_features, **_):
  """The kernel core with m features + the feature maps of q and k, 2 n m D."""
  return kernel_macs(n, width, num_heads, num_features) + 2 * n * num_features * width


# The features are drawn inside the forward (threefry bits and QR for m / d blocks), which XLA
# counts as ~0.3M flops/2 per call at m = 256, d = 16 and MACs do not: a quarter of a layer at the
# registry test's tiny shapes, nothing at ViT sizes; hence the wider tolerance.
@registry.register(
    "performer", caps=Capabilities(cls_probs="approx"), impls=("reference", "xla"),
    paper="Rethinking Attention with Performers, FAVOR+ (Choromanski et al. 2021)",
    official="https://github.com/google-research/google-research/tree/master/performer",
    complexity="O(N m D)", macs=performer_macs, macs_tolerance=0.35)
class PerformerAttention(Attention):
  """FAVOR+ attention with positive orthogonal random features."""
  num_features: int = 256             # m
  orthogonal: bool = True
  redraw: bool = True                 # new features on every training call
  feature_seed: int = 0
  cls_probs_mode: str = "model"
  eps: float = 1e-6
  materialise: bool = False

  def projection(self, d: int, deterministic: bool = True):
    if self.redraw and not deterministic:
      key = self.make_rng("dropout")
    else:
      layer = zlib.crc32("/".join(map(str, self.path)).encode())
      key = jax.random.fold_in(jax.random.key(self.feature_seed), layer)
    return random_projection(key, self.num_features, d, self.orthogonal)

  def mix(self, x, q, k, v, bias, ctx, *, need, deterministic):
    if self.cls_probs_mode not in CLS_MODES:
      raise ValueError(f"cls_probs_mode must be one of {CLS_MODES}, got {self.cls_probs_mode!r}")
    kw = key_weights(bias)
    omega = self.projection(q.shape[-1], deterministic)
    fq = favor_features(q, omega, is_query=True, eps=self.eps)
    fk = favor_features(k, omega, is_query=False, kw=kw, eps=self.eps)
    y, aux = self.attend_kernel(fq, fk, v, kw, ctx, eps=0.0, need=need,
                                deterministic=deterministic, keys=k, materialise=self.materialise)
    if self.cls_probs_mode == "exact_softmax":
      aux.update(cls_aux(need, lambda: query_row(softmax_weights, q, k, bias, cls_position(ctx))))
    return y, aux
