"""G11 `cog`: attention with negative weights (Lv et al. 2024, "More Expressive Attention with
Negative Weights", Cog attention; the U-ViC form of the official code,
https://github.com/trestad/CogAttn).

P = sign(S) * softmax_j(|S|), S = Q K^T / sqrt(d);  O = P V.
Rows satisfy sum_j |P_ij| = 1; a head can subtract (delete) as well as add (copy) tokens.
The paper keeps plain softmax in the first and last blocks: configure that with
`attention=dict(name="cog", per_layer={0: "mhsa", L-1: "mhsa"})`.
sign(0) = 0, so a logit of exactly 0 gives weight 0 (and gradient 0 through the sign).

Sizes (R2): log s_j is added to |S_ij| (a size-s token weighs like s copies of the same sign);
a -inf bias removes the key.
"""
import jax
import jax.numpy as jnp

from vitjax.attention import registry
from vitjax.attention.base import Attention, Capabilities, elementwise, quadratic_macs


def cog_weights(logits, bias=None):
  """sign(S) softmax(|S| + bias), float32 [B,H,N,M]."""
  mag = jnp.abs(logits)
  if bias is not None:
    mag = mag + bias
  return jnp.sign(logits) * jax.nn.softmax(mag, axis=-1)


@registry.register("cog", caps=Capabilities(cls_score_norm="abs_row"), impls=("reference", "xla"),
                   paper="More Expressive Attention with Negative Weights (Cog attention)",
                   official="https://github.com/trestad/CogAttn", complexity="O(N^2 D)",
                   macs=quadratic_macs)
class CogAttention(Attention):
  """Signed attention: sign of the logit times the softmax of its magnitude."""

  def weight_fn(self):
    return elementwise(cog_weights)
