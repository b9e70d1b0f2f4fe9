"""G18 `neural`: Neural Attention (DiGiugno & Mahmood 2025): a small MLP replaces the dot product.

Per head (following the official awayfromzel/neural-attention-research code):
  q'_i = A q_i, k'_j = B k_j            (d -> p, shared by all heads, with bias; p = d // 32 there)
  s_ij = w_3^T act(W_2 act(W_1 [q'_i; k'_j] + b_1) + b_2) + b_3   (2p -> p -> p/2 -> 1, act = ReLU)
  P = softmax_j(s_ij + bias_j),  y = W_o concat_h P_h V_h   (no 1/sqrt(d); the MLP sets the scale).
W_1 [q'; k'] is evaluated as W_1q q'_i + W_1k k'_j broadcast over (i, j), the same map as the
concatenation without building it; the hidden state is still [B, H, N, N, p]: keep p small and use
the layer in one block (the paper uses it in the first layer only: per_layer={0: "neural"}).
p defaults to max(2, d // 32) (2 for d = 64, the official default). `activation="identity"` makes
s_ij = a_i + b_j, so every query row is the same (a test oracle).
"""
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitjax.attention import registry
from vitjax.attention.base import (Attention, AttnContext, Capabilities, additive_key_bias,
                                   collect_aux, weighted_values)

ACTIVATIONS = {"relu": jax.nn.relu, "identity": lambda t: t}


class ScoreMLP(nn.Module):
  """s(q'_i, k'_j) for all pairs: q' [B,N,H,p], k' [B,M,H,p] -> [B,H,N,M] float32."""
  width: int
  activation: str = "relu"

  @nn.compact
  def __call__(self, qp, kp):
    act = ACTIVATIONS[self.activation]
    p = self.width
    w1 = self.param("fc1_kernel", nn.initializers.lecun_normal(), (2 * p, p))
    b1 = self.param("fc1_bias", nn.initializers.zeros, (p,))
    a = jnp.einsum("bnhp,pc->bhnc", qp.astype(jnp.float32), w1[:p]) + b1
    c = jnp.einsum("bmhp,pc->bhmc", kp.astype(jnp.float32), w1[p:])
    hidden = act(a[:, :, :, None, :] + c[:, :, None, :, :])
    hidden = act(nn.Dense(max(1, p // 2), dtype=jnp.float32, name="fc2")(hidden))
    return nn.Dense(1, dtype=jnp.float32, name="fc3")(hidden)[..., 0]


@registry.register(
    "neural", caps=Capabilities(),
    paper="Neural Attention (DiGiugno & Mahmood 2025)", complexity="O(N^2 H p) + O(N^2 D)")
class Neural(Attention):
  """Softmax attention over MLP scores of (query, key) pairs."""
  projection_dim: Optional[int] = None
  activation: str = "relu"

  @nn.compact
  def __call__(self, x, ctx: Optional[AttnContext] = None, *, need=(), deterministic=True):
    if self.impl != "reference":
      raise ValueError(f"neural has only impl='reference', got {self.impl!r}")
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"unknown activation {self.activation!r}; valid: {sorted(ACTIVATIONS)}")
    q, k, v = self.project_qkv(x)
    p = self.projection_dim or max(2, q.shape[-1] // 32)
    qp = nn.Dense(p, dtype=self.dtype, name="q_proj")(q)
    kp = nn.Dense(p, dtype=self.dtype, name="k_proj")(k)
    logits = ScoreMLP(p, self.activation, name="score")(qp, kp)
    bias = additive_key_bias(ctx, x.shape[1])
    if bias is not None:
      logits = logits + bias
    probs = jax.nn.softmax(logits, axis=-1)
    w = self.dropout_weights(probs, deterministic)
    y = weighted_values(w.astype(v.dtype), v)
    aux = collect_aux(need, probs=probs, q=q, k=k, v=v, ctx=ctx)
    return self.project_out(y, x.shape[-1], deterministic), aux
