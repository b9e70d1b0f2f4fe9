"""G8 `cosine`: scaled cosine attention with a learned temperature (Swin Transformer V2,
Liu et al. 2022; the normalised-QK idea also appears in nGPT).

S_h = tau_h cos(q_i, k_j) + beta;  P_h = softmax(S_h);  tau_h = exp(min(theta_h, ln 100)),
one theta per head and layer, initialised to ln 10 (Swin V2's logit scale and clamp).
q and k are L2-normalised with eps = 1e-6 (x / max(|x|, eps)); with the base `qk_norm=True` a
LayerNorm comes first. The softmax runs through the `mhsa` paths (reference, xla, cudnn, pallas) on
q' = tau sqrt(d) q/|q|, so the fused kernels' 1/sqrt(d) gives tau cos exactly.
"""
import math
from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from vitjax.attention import registry
from vitjax.attention.base import (Attention, AttnContext, Capabilities, additive_key_bias,
                                   collect_aux, l2_normalize, weighted_values)
from vitjax.attention.mhsa import IMPLS, cls_softmax_row, fused_softmax, softmax_weights


@registry.register(
    "cosine", caps=Capabilities(),
    paper="Scaled cosine attention, Swin Transformer V2 (Liu et al. 2022)",
    complexity="O(N^2 D)")
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

  @nn.compact
  def __call__(self, x, ctx: Optional[AttnContext] = None, *, need=(), deterministic=True):
    if self.impl not in IMPLS:
      raise ValueError(f"unknown attention impl {self.impl!r}; valid: {IMPLS}")
    q, k, v = self.project_qkv(x)
    d = q.shape[-1]
    tau = self.temperature()
    q = (l2_normalize(q, self.eps) * (tau[:, None] * math.sqrt(d))).astype(v.dtype)
    k = l2_normalize(k, self.eps)
    bias = additive_key_bias(ctx, x.shape[1])
    materialise = self.impl == "reference" or "attn" in need or (
        self.attn_drop > 0 and not deterministic)
    probs = None
    if materialise:
      probs = softmax_weights(q, k, bias)
      w = self.dropout_weights(probs, deterministic)
      y = weighted_values(w.astype(v.dtype), v)
    else:
      y = fused_softmax(q, k, v, bias, self.impl)
    cls_index = 0 if ctx is None else ctx.cls_index
    aux = collect_aux(need, probs=probs, q=q, k=k, v=v, ctx=ctx,
                      row_fn=lambda: cls_softmax_row(q, k, bias, cls_index))
    return self.project_out(y, x.shape[-1], deterministic), aux
