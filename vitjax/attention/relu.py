"""G3 `relu`: ReLU attention.

W_h = ReLU(Q_h K_h^T / sqrt(d)) / n;  O_h = W_h V_h.
The sigmoid-attention paper names ReLU as the other elementwise activation; the 1/n (sequence-length)
scaling follows Wortsman et al. 2023, "Replacing softmax with ReLU in Vision Transformers", which
divides ReLU(S) by the sequence length L.

Sizes (R2): with the key bias beta_j = log s_j the weight of key j is s_j * ReLU(S_ij) / sum_j s_j,
so a size-s token acts like s copies; beta_j = -inf removes key j from both the weights and n.
Pitfall: a query whose logits are all negative gets a zero row (and a zero output).
"""
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitjax.attention import registry
from vitjax.attention.base import (Attention, AttnContext, Capabilities, additive_key_bias,
                                   collect_aux, weighted_values)

IMPLS = ("reference", "xla")  # both run the einsum path


def relu_weights(logits, bias=None):
  """ReLU(S) * s_j / sum_j s_j, float32 [B,H,N,M]."""
  w = jax.nn.relu(logits)
  if bias is None:
    return w / logits.shape[-1]
  sizes = jnp.exp(bias)
  return w * sizes / sizes.sum(axis=-1, keepdims=True)


@registry.register(
    "relu",
    caps=Capabilities(cls_probs="exact", cls_score_norm="row"),
    paper="ReLU attention (named in Ramapuram et al. 2024; Wortsman et al. 2023)",
    complexity="O(N^2 D)")
class ReLUAttention(Attention):
  """Elementwise ReLU attention scaled by 1/n."""

  @nn.compact
  def __call__(self, x, ctx: Optional[AttnContext] = None, *, need=(), deterministic=True):
    if self.impl not in IMPLS:
      raise ValueError(f"relu attention has impls {IMPLS}, got {self.impl!r}")
    q, k, v = self.project_qkv(x)
    bias = additive_key_bias(ctx, x.shape[1])
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bnhd,bmhd->bhnm", q, k, preferred_element_type=jnp.float32) * scale
    w = relu_weights(logits, bias)
    wd = self.dropout_weights(w, deterministic)
    y = weighted_values(wd.astype(v.dtype), v)
    aux = collect_aux(need, probs=w, q=q, k=k, v=v, ctx=ctx)
    return self.project_out(y, x.shape[-1], deterministic), aux
