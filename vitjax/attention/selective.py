"""G17 `selective`: softmax attention with per-query and per-value temperatures.

Selective Attention / SSA (Zhang et al. 2024) scales each query by a temperature that depends on
the query token and its position, and each value by a token temperature. The abstract fixes only
that structure; the exact SSA parametrisation was not verified (the spec marks it so), and this
module uses the spec's form (own design):
  tau_q(i) = (1 + tanh(w_q^T x_i + c_q)) * (1 + softplus(beta) * log(n / n0)),
  tau_v(j) = 1 + tanh(w_v^T x_j + c_v),
  q_i <- tau_q(i) q_i,  v_j <- tau_v(j) v_j,  then softmax attention (logits / `temperature`).
One (w_q, c_q, w_v, c_v) per head, all initialised to 0, so at initialisation the layer is MHSA.
The position term follows SSA's log-length scaling against n0 = `ref_tokens`, the training-time key
count; n counts tokens by size (sum_j s_j over valid keys) so merged tokens keep it fixed. With
`ref_tokens=None` (default) the term is 1: in a fixed-N ViT the positional part is constant.
`temperature` is the global test-time temperature of the robustness study the spec pairs with SSA
(Gu et al. 2022, [002]); 1 leaves the logits unchanged.
"""
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitjax.attention import registry
from vitjax.attention.base import (Attention, AttnContext, Capabilities, additive_key_bias,
                                   collect_aux, weighted_values)
from vitjax.attention.mhsa import softmax_weights


def length_factor(ctx: Optional[AttnContext], n: int, ref_tokens: Optional[int], beta):
  """1 + softplus(beta) * log(n / n0), [B, 1, 1, 1]; 1 when no reference length is set."""
  if ref_tokens is None:
    return jnp.ones((1, 1, 1, 1), jnp.float32)
  count = jnp.full((1,), float(n), jnp.float32)
  if ctx is not None and ctx.size is not None:
    size = ctx.size.astype(jnp.float32)
    if ctx.valid is not None:
      size = size * ctx.valid
    count = size.sum(-1)
  scale = 1 + jax.nn.softplus(beta) * jnp.log(count / ref_tokens)
  return scale.reshape(-1, 1, 1, 1)


@registry.register(
    "selective", caps=Capabilities(),
    paper="Selective Attention (Zhang et al. 2024); temperature scaling (Gu et al. 2022)",
    complexity="O(N^2 D) + O(N D)")
class Selective(Attention):
  """Softmax attention with token-dependent query and value temperatures."""
  ref_tokens: Optional[int] = None
  temperature: float = 1.0

  @nn.compact
  def __call__(self, x, ctx: Optional[AttnContext] = None, *, need=(), deterministic=True):
    if self.impl != "reference":
      raise ValueError(f"selective has only impl='reference', got {self.impl!r}")
    q, k, v = self.project_qkv(x)
    gate = lambda name: nn.Dense(self.num_heads, dtype=jnp.float32, name=name,
                                 kernel_init=nn.initializers.zeros)
    xf = x.astype(jnp.float32)
    beta = self.param("beta", nn.initializers.zeros, ())
    tau_q = (1 + jnp.tanh(gate("tau_q")(xf)))[..., None]
    tau_q = tau_q * length_factor(ctx, x.shape[1], self.ref_tokens, beta)
    tau_v = (1 + jnp.tanh(gate("tau_v")(xf)))[..., None]
    q = (q.astype(jnp.float32) * tau_q / self.temperature).astype(q.dtype)
    v = (v.astype(jnp.float32) * tau_v).astype(v.dtype)
    probs = softmax_weights(q, k, additive_key_bias(ctx, x.shape[1]))
    w = self.dropout_weights(probs, deterministic)
    y = weighted_values(w.astype(v.dtype), v)
    aux = collect_aux(need, probs=probs, q=q, k=k, v=v, ctx=ctx)
    return self.project_out(y, x.shape[-1], deterministic), aux
