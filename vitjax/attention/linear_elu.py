"""G4 `linear_elu`: kernel linear attention with phi(x) = elu(x) + 1 (Katharopoulos et al. 2020,
"Transformers are RNNs").

A_ij = phi(q_i).phi(k_j) / (sum_j phi(q_i).phi(k_j) + eps);  O = A V, computed in O(N) as
O_i = phi(q_i)^T (sum_j phi(k_j) v_j^T) / (phi(q_i)^T sum_j phi(k_j) + eps).
phi acts per head on the raw q and k (no 1/sqrt(d)); eps = 1e-6 as in the spec.

The kernel core (`base.Attention.attend_kernel`) is shared by the linear family (`performer`,
`flatten` plug their own feature maps into it). The O(N) path is the default; the N x N weights
are built only when the full matrix is asked for (`attn`), for attention dropout, or with
`materialise=True`. The [CLS] row is exact either way (one query row against all keys, O(N d)).

Sizes (R2): phi(k_j) is replaced by s_j phi(k_j) in numerator and denominator, with s_j = exp(beta_j)
from the key bias (log sizes; -inf masks a key).
"""
import jax
import jax.numpy as jnp

from vitjax.attention import registry
from vitjax.attention.base import Attention, Capabilities, kernel_macs, key_weights


def elu_feature(x):
  return jax.nn.elu(x.astype(jnp.float32)) + 1.0


@registry.register("linear_elu", caps=Capabilities(cls_probs="exact"), impls=("reference", "xla"),
                   paper="Transformers are RNNs: linear attention (Katharopoulos et al. 2020)",
                   complexity="O(N d D)", macs=kernel_macs)
class LinearELUAttention(Attention):
  """Linear attention with the elu+1 feature map."""
  eps: float = 1e-6
  materialise: bool = False  # build the N x N weights (reference form) instead of the O(N) path

  def mix(self, x, q, k, v, bias, ctx, *, need, deterministic):
    return self.attend_kernel(elu_feature(q), elu_feature(k), v, key_weights(bias), ctx,
                              eps=self.eps, need=need, deterministic=deterministic, keys=k,
                              materialise=self.materialise)
