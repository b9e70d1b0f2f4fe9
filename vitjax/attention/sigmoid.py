"""G2 `sigmoid`: sigmoid self-attention (Ramapuram et al. 2024, "Theory, Analysis, and Best
Practices for Sigmoid Self-Attention"; official code:
https://github.com/apple/ml-sigmoid-attention).

W_h = sigma(exp(t) * Q_h K_h^T / sqrt(d) + b) elementwise, no row normalisation;  O_h = W_h V_h.
b = -log n (n keys) keeps the initial row mass near 1, the failure mode the paper stabilises.
The official module exposes `attn_bias` and `attn_temp` as fixed buffers and QK-norm as an option
(here the `qk_norm` field of the base class).

Token sizes (R2 of the spec) arrive as the additive key bias beta_j = log s_j (ToMe's proportional
attention) or -inf for dropped keys: the weight of key j is s_j * sigma(.) = exp(beta_j) * sigma(.),
and b = -log sum_j s_j, so a token of size s acts exactly like s copies and a masked key like a
deleted one. Without a bias, s_j = 1 and b = -log n.
"""
import math
from typing import Optional

import jax
import jax.numpy as jnp

from vitjax.attention import registry
from vitjax.attention.base import Attention, Capabilities, elementwise, quadratic_macs


def log_mass(bias, n: int):
  """log sum_j s_j with s_j = exp(bias_j): [B,1,1,1] (or a scalar log n without a bias)."""
  if bias is None:
    return jnp.log(jnp.float32(n))
  return jax.nn.logsumexp(bias, axis=-1, keepdims=True)


def sigmoid_weights(logits, bias=None, attn_bias: Optional[float] = None):
  """Elementwise sigmoid weights with the sequence-length offset and size multipliers."""
  b = -log_mass(bias, logits.shape[-1]) if attn_bias is None else attn_bias
  w = jax.nn.sigmoid(logits + b)
  if bias is not None:
    w = w * jnp.exp(bias)  # exp(-inf) = 0 removes masked keys exactly
  return w


@registry.register(
    "sigmoid", caps=Capabilities(cls_probs="exact", cls_score_norm="row"),
    impls=("reference", "xla", "pallas"),
    paper="Theory, Analysis, and Best Practices for Sigmoid Self-Attention (Ramapuram et al. 2024)",
    official="https://github.com/apple/ml-sigmoid-attention", complexity="O(N^2 D)",
    macs=quadratic_macs)
class SigmoidAttention(Attention):
  """Sigmoid attention; `attn_bias=None` recomputes b = -log(sum of key sizes) every call.
  impl reference and xla run the weights; pallas runs FlashSigmoid."""
  attn_bias: Optional[float] = None  # fixed b instead of -log n
  attn_temp: float = 0.0             # logits are scaled by exp(attn_temp) (official default 0)

  def weight_fn(self):
    temp = math.exp(self.attn_temp)
    return elementwise(lambda s, bias: sigmoid_weights(s * temp, bias, self.attn_bias))

  def fused_fn(self):
    return self.flash if self.impl == "pallas" else None

  def flash(self, q, k, v, bias):
    """The FlashSigmoid kernel: no row max or sum; sizes enter as key weights exp(bias)."""
    from vitjax.kernels import flash_sigmoid  # pylint: disable=import-outside-toplevel
    key_weight = None if bias is None else jnp.exp(bias[:, 0, 0])
    scale = q.shape[-1] ** -0.5 * math.exp(self.attn_temp)
    return flash_sigmoid.sigmoid_attention(q, k, v, key_weight=key_weight, scale=scale,
                                           offset=self.attn_bias)
