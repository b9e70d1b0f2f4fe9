"""G18 `neural`: Neural Attention (DiGiugno & Mahmood 2025): a small MLP replaces the dot product.

Per head (following the official code, https://github.com/awayfromzel/neural-attention-research):
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
from vitjax.attention.base import Attention, projection_macs

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


def neural_macs(n, width, num_heads, *, projection_dim, **_):
  """Projections, q' and k' (n H d p each), the score MLP's first layer per token (n H p^2 for
  each side), its p -> p/2 -> 1 layers on every pair (n^2 H (p p/2 + p/2)), and P V (n^2 D)."""
  d = width // num_heads
  p = projection_dim or max(2, d // 32)
  half = max(1, p // 2)
  per_token = 2 * n * num_heads * (d * p + p * p)
  per_pair = n * n * num_heads * (p * half + half)
  return projection_macs(n, width) + per_token + per_pair + n * n * width


@registry.register("neural", paper="Neural Attention (DiGiugno & Mahmood 2025)",
                   official="https://github.com/awayfromzel/neural-attention-research",
                   complexity="O(N^2 H p) + O(N^2 D)", macs=neural_macs)
class Neural(Attention):
  """Softmax attention over MLP scores of (query, key) pairs."""
  projection_dim: Optional[int] = None
  activation: str = "relu"

  def mix(self, x, q, k, v, bias, ctx, *, need, deterministic):
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"unknown activation {self.activation!r}; valid: {sorted(ACTIVATIONS)}")
    p = self.projection_dim or max(2, q.shape[-1] // 32)
    qp = nn.Dense(p, dtype=self.dtype, name="q_proj")(q)
    kp = nn.Dense(p, dtype=self.dtype, name="k_proj")(k)
    score = ScoreMLP(p, self.activation, name="score")

    def weights(qp, kp, bias):
      logits = score(qp, kp)
      return jax.nn.softmax(logits if bias is None else logits + bias, axis=-1)
    return self.attend(qp, kp, v, bias, ctx, need=need, deterministic=deterministic,
                       weights=weights, keys=k)
