"""G3 `relu`: ReLU attention.

W_h = ReLU(Q_h K_h^T / sqrt(d)) / n;  O_h = W_h V_h.
The sigmoid-attention paper names ReLU as the other elementwise activation; the 1/n (sequence-length)
scaling follows Wortsman et al. 2023, "Replacing softmax with ReLU in Vision Transformers", which
divides ReLU(S) by the sequence length L.

Sizes (R2): with the key bias beta_j = log s_j the weight of key j is s_j * ReLU(S_ij) / sum_j s_j,
so a size-s token acts like s copies; beta_j = -inf removes key j from both the weights and n.
Pitfall: a query whose logits are all negative gets a zero row (and a zero output).
"""
import jax
import jax.numpy as jnp

from vitjax.attention import registry
from vitjax.attention.base import Attention, Capabilities, elementwise, quadratic_macs


def relu_weights(logits, bias=None):
  """ReLU(S) * s_j / sum_j s_j, float32 [B,H,N,M]."""
  w = jax.nn.relu(logits)
  if bias is None:
    return w / logits.shape[-1]
  sizes = jnp.exp(bias)
  return w * sizes / sizes.sum(axis=-1, keepdims=True)


@registry.register("relu", caps=Capabilities(cls_probs="exact", cls_score_norm="row"),
                   impls=("reference", "xla"),
                   paper="ReLU attention (named in Ramapuram et al. 2024; Wortsman et al. 2023)",
                   complexity="O(N^2 D)", macs=quadratic_macs)
class ReLUAttention(Attention):
  """Elementwise ReLU attention scaled by 1/n (impl xla runs the same einsums)."""

  def weight_fn(self):
    return elementwise(relu_weights)
