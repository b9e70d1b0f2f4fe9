"""G8 `cosine`: scaled cosine attention with a learned temperature (Swin Transformer V2,
Liu et al. 2022, official code: https://github.com/microsoft/Swin-Transformer; the normalised-QK
idea also appears in nGPT).

S_h = tau_h cos(q_i, k_j) + beta;  P_h = softmax(S_h);  tau_h = exp(min(theta_h, ln 100)),
one theta per head and layer, initialised to ln 10 (Swin V2's logit scale and clamp).
q and k are L2-normalised with eps = 1e-6 (x / max(|x|, eps)); with the base `qk_norm=True` a
LayerNorm comes first. The softmax runs through the softmax core's paths (reference, xla, cudnn,
pallas) on q' = tau sqrt(d) q/|q|, so the fused kernels' 1/sqrt(d) gives tau cos exactly.
"""
import math

import flax.linen as nn
import jax.numpy as jnp

from vitjax.attention import registry
from vitjax.attention.base import Attention, SOFTMAX_IMPLS, l2_normalize, quadratic_macs


@registry.register("cosine", impls=SOFTMAX_IMPLS,
                   paper="Scaled cosine attention, Swin Transformer V2 (Liu et al. 2022)",
                   official="https://github.com/microsoft/Swin-Transformer", complexity="O(N^2 D)",
                   macs=quadratic_macs)
class CosineAttention(Attention):
  """Softmax over temperature-scaled cosine similarities."""
  tau_init: float = 10.0
  tau_max: float = 100.0
  learn_tau: bool = True
  eps: float = 1e-6

  def temperature(self):
    init = math.log(self.tau_init)
    if self.learn_tau:
      theta = self.param("logit_scale", nn.initializers.constant(init), (self.num_heads,))
    else:
      theta = jnp.full((self.num_heads,), init, jnp.float32)
    return jnp.exp(jnp.minimum(theta, math.log(self.tau_max)))

  def mix(self, x, q, k, v, bias, ctx, *, need, deterministic):
    tau = self.temperature()
    q = (l2_normalize(q, self.eps) * (tau[:, None] * math.sqrt(q.shape[-1]))).astype(v.dtype)
    return super().mix(x, q, l2_normalize(k, self.eps), v, bias, ctx, need=need,
                       deterministic=deterministic)
