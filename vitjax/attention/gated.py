"""G10 `gated`: gated attention (Bondarenko et al. 2023, "Quantizable Transformers: Removing Outliers
by Helping Attention Heads Do Nothing"), following the official Qualcomm code.

O_ih = g_ih (P_h V_h)_i with g_ih = sigmoid(f_h(x_i^(h))), x_i^(h) the h-th d-sized chunk of the
layer's input (the block's normalised hidden state, not V): a per-token, per-head gate that lets a
head output nothing without pushing its softmax to extremes (the official `conditional_per_token`).
- `gate_type="linear"`: f_h = Linear(d -> 1) per head, bias initialised to logit(gate_init);
  the README example is gate_init = 0.25 (the default here; the ViT value is not verified).
- `gate_type="mlp"`: f_h = d -> d/4 -> 1 with ReLU (the BERT script's gate; PyTorch default init).
Weights without a special init follow PyTorch's Linear default, U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
The softmax is untouched (query-side gate), so it runs through the `mhsa` paths and the [CLS] row is
exact softmax; sizes enter as log s_j on the logits.
"""
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitjax.attention import registry
from vitjax.attention.base import (Attention, AttnContext, Capabilities, additive_key_bias,
                                   collect_aux, weighted_values)
from vitjax.attention.mhsa import IMPLS, cls_softmax_row, fused_softmax, softmax_weights

GATE_TYPES = ("linear", "mlp")


def torch_uniform(fan_in: int):
  bound = 1.0 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class HeadGate(nn.Module):
  """Per-head gate predictor: x [B,N,H,d] -> sigmoid gate [B,N,H,1] (float32)."""
  gate_type: str = "linear"
  gate_init: float = 0.25

  @nn.compact
  def __call__(self, xh):
    h, d = xh.shape[-2:]
    xh = xh.astype(jnp.float32)
    if self.gate_type == "linear":
      w = self.param("kernel", torch_uniform(d), (h, d))
      logit = math.log(self.gate_init / (1.0 - self.gate_init))
      b = self.param("bias", nn.initializers.constant(logit), (h,))
      alpha = jnp.einsum("bnhd,hd->bnh", xh, w) + b
    else:
      r = max(d // 4, 1)
      w1 = self.param("kernel1", torch_uniform(d), (h, d, r))
      b1 = self.param("bias1", torch_uniform(d), (h, r))
      w2 = self.param("kernel2", torch_uniform(r), (h, r))
      b2 = self.param("bias2", torch_uniform(r), (h,))
      hid = jax.nn.relu(jnp.einsum("bnhd,hdr->bnhr", xh, w1) + b1)
      alpha = jnp.einsum("bnhr,hr->bnh", hid, w2) + b2
    return jax.nn.sigmoid(alpha)[..., None]


@registry.register(
    "gated", caps=Capabilities(),
    paper="Quantizable Transformers: gated attention (Bondarenko et al. 2023)",
    complexity="O(N^2 D) + O(N D)")
class GatedAttention(Attention):
  """Softmax attention whose per-head output is scaled by a token-conditioned sigmoid gate."""
  gate_type: str = "linear"
  gate_init: float = 0.25

  @nn.compact
  def __call__(self, x, ctx: Optional[AttnContext] = None, *, need=(), deterministic=True):
    if self.impl not in IMPLS:
      raise ValueError(f"unknown attention impl {self.impl!r}; valid: {IMPLS}")
    if self.gate_type not in GATE_TYPES:
      raise ValueError(f"gate_type must be one of {GATE_TYPES}, got {self.gate_type!r}")
    q, k, v = self.project_qkv(x)
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
    xh = x.reshape(*x.shape[:2], self.num_heads, -1)
    y = y * HeadGate(self.gate_type, self.gate_init, name="gate")(xh).astype(y.dtype)
    cls_index = 0 if ctx is None else ctx.cls_index
    aux = collect_aux(need, probs=probs, q=q, k=k, v=v, ctx=ctx,
                      row_fn=lambda: cls_softmax_row(q, k, bias, cls_index))
    return self.project_out(y, x.shape[-1], deterministic), aux
