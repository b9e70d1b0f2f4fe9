"""G4 `linear_elu`: kernel linear attention with phi(x) = elu(x) + 1 (Katharopoulos et al. 2020,
"Transformers are RNNs").

A_ij = phi(q_i).phi(k_j) / (sum_j phi(q_i).phi(k_j) + eps);  O = A V, computed in O(N) as
O_i = phi(q_i)^T (sum_j phi(k_j) v_j^T) / (phi(q_i)^T sum_j phi(k_j) + eps).
phi acts per head on the raw q and k (no 1/sqrt(d)); eps = 1e-6 as in the spec.

The kernel helpers below are shared by the linear family (`performer`, `flatten` plug their own
feature maps into them). The O(N) path is the default; the N x N weights are built only when the
full matrix is asked for (`attn`), for attention dropout, or with `materialise=True`. The [CLS] row
is exact either way (one query row against all keys, O(N d)).

Sizes (R2): phi(k_j) is replaced by s_j phi(k_j) in numerator and denominator, with s_j = exp(beta_j)
from the key bias (log sizes; -inf masks a key).
"""
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitjax.attention import registry
from vitjax.attention.base import (Attention, AttnContext, Capabilities, additive_key_bias,
                                   collect_aux, weighted_values)

IMPLS = ("reference", "xla")  # plain einsum either way (no kernel is needed for linear attention)


def key_weights(bias) -> Optional[jax.Array]:
  """[B,1,1,M] additive key bias -> [B,M] multiplicative key weights s_j = exp(beta_j)."""
  return None if bias is None else jnp.exp(bias[:, 0, 0, :])


def _weigh_keys(fk, kw):
  return fk if kw is None else fk * kw[:, :, None, None]


def kernel_attention(fq, fk, v, kw=None, eps: float = 1e-6):
  """O(N) form. fq [B,N,H,r], fk [B,M,H,r], v [B,M,H,d], kw [B,M] -> [B,N,H,d] float32."""
  fk = _weigh_keys(fk, kw)
  kv = jnp.einsum("bmhr,bmhd->bhrd", fk, v.astype(jnp.float32))
  ksum = fk.sum(axis=1)
  num = jnp.einsum("bnhr,bhrd->bnhd", fq, kv)
  den = jnp.einsum("bnhr,bhr->bnh", fq, ksum) + eps
  return num / den[..., None]


def kernel_weights(fq, fk, kw=None, eps: float = 1e-6):
  """Materialised weights A [B,H,N,M] float32 (rows sum to 1 up to eps)."""
  a = jnp.einsum("bnhr,bmhr->bhnm", fq, _weigh_keys(fk, kw))
  return a / (a.sum(axis=-1, keepdims=True) + eps)


def kernel_row(fq, fk, kw, eps: float, index: int):
  """The exact row of query `index` of A: [B,H,M], O(M r)."""
  a = jnp.einsum("bhr,bmhr->bhm", fq[:, index], _weigh_keys(fk, kw))
  return a / (a.sum(axis=-1, keepdims=True) + eps)


def cls_query(ctx: Optional[AttnContext]):
  """A thunk returning the [CLS] query index; it raises only when a [CLS] row is asked for."""
  def index():
    if ctx is not None and ctx.cls_index is None:
      raise ValueError("this model has no [CLS] token, so there is no [CLS] attention row")
    return 0 if ctx is None else ctx.cls_index
  return index


def kernel_attend(module: Attention, fq, fk, v, kw, *, eps: float, need, deterministic: bool,
                  materialise: bool, ctx: Optional[AttnContext]):
  """Runs the O(N) or the materialised path; returns (y [B,N,H,d] in v.dtype, probs, row_fn)."""
  dense = materialise or "attn" in need or (module.attn_drop > 0 and not deterministic)
  probs = None
  if dense:
    probs = kernel_weights(fq, fk, kw, eps)
    w = module.dropout_weights(probs, deterministic)
    y = weighted_values(w, v.astype(jnp.float32))
  else:
    y = kernel_attention(fq, fk, v, kw, eps)
  cls_index = cls_query(ctx)
  row_fn = lambda: kernel_row(fq, fk, kw, eps, cls_index())  # noqa: E731
  return y.astype(v.dtype), probs, row_fn


def elu_feature(x):
  return jax.nn.elu(x.astype(jnp.float32)) + 1.0


@registry.register(
    "linear_elu", caps=Capabilities(cls_probs="exact"),
    paper="Transformers are RNNs: linear attention (Katharopoulos et al. 2020)",
    complexity="O(N d D)")
class LinearELUAttention(Attention):
  """Linear attention with the elu+1 feature map."""
  eps: float = 1e-6
  materialise: bool = False  # build the N x N weights (reference form) instead of the O(N) path

  @nn.compact
  def __call__(self, x, ctx: Optional[AttnContext] = None, *, need=(), deterministic=True):
    if self.impl not in IMPLS:
      raise ValueError(f"linear_elu attention has impls {IMPLS}, got {self.impl!r}")
    q, k, v = self.project_qkv(x)
    kw = key_weights(additive_key_bias(ctx, x.shape[1]))
    y, probs, row_fn = kernel_attend(self, elu_feature(q), elu_feature(k), v, kw, eps=self.eps,
                                     need=need, deterministic=deterministic,
                                     materialise=self.materialise, ctx=ctx)
    aux = collect_aux(need, probs=probs, q=q, k=k, v=v, ctx=ctx, row_fn=row_fn)
    return self.project_out(y, x.shape[-1], deterministic), aux
