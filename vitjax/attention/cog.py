"""G11 `cog`: attention with negative weights (Lv et al. 2024, "More Expressive Attention with
Negative Weights", Cog attention; the U-ViC form of the official CogAttn code).

P = sign(S) * softmax_j(|S|), S = Q K^T / sqrt(d);  O = P V.
Rows satisfy sum_j |P_ij| = 1; a head can subtract (delete) as well as add (copy) tokens.
The paper keeps plain softmax in the first and last blocks: configure that with
`attention=dict(name="cog", per_layer={0: "mhsa", L-1: "mhsa"})`.
sign(0) = 0, so a logit of exactly 0 gives weight 0 (and gradient 0 through the sign).

Sizes (R2): log s_j is added to |S_ij| (a size-s token weighs like s copies of the same sign);
a -inf bias removes the key.
"""
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitjax.attention import registry
from vitjax.attention.base import (Attention, AttnContext, Capabilities, additive_key_bias,
                                   collect_aux, weighted_values)

IMPLS = ("reference", "xla")  # both run the einsum path


def cog_weights(logits, bias=None):
  """sign(S) softmax(|S| + bias), float32 [B,H,N,M]."""
  mag = jnp.abs(logits)
  if bias is not None:
    mag = mag + bias
  return jnp.sign(logits) * jax.nn.softmax(mag, axis=-1)


@registry.register(
    "cog", caps=Capabilities(cls_score_norm="abs_row"),
    paper="More Expressive Attention with Negative Weights (Cog attention)",
    complexity="O(N^2 D)")
class CogAttention(Attention):
  """Signed attention: sign of the logit times the softmax of its magnitude."""

  @nn.compact
  def __call__(self, x, ctx: Optional[AttnContext] = None, *, need=(), deterministic=True):
    if self.impl not in IMPLS:
      raise ValueError(f"cog attention has impls {IMPLS}, got {self.impl!r}")
    q, k, v = self.project_qkv(x)
    bias = additive_key_bias(ctx, x.shape[1])
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bnhd,bmhd->bhnm", q, k, preferred_element_type=jnp.float32) * scale
    w = cog_weights(logits, bias)
    wd = self.dropout_weights(w, deterministic)
    y = weighted_values(wd.astype(v.dtype), v)
    aux = collect_aux(need, probs=w, q=q, k=k, v=v, ctx=ctx)
    return self.project_out(y, x.shape[-1], deterministic), aux
