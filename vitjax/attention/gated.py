"""G10 `gated`: gated attention (Bondarenko et al. 2023, "Quantizable Transformers: Removing Outliers
by Helping Attention Heads Do Nothing"), following the official Qualcomm code
(https://github.com/Qualcomm-AI-research/outlier-free-transformers).

O_ih = g_ih (P_h V_h)_i with g_ih = sigmoid(f_h(x_i^(h))), x_i^(h) the h-th d-sized chunk of the
layer's input (the block's normalised hidden state, not V): a per-token, per-head gate that lets a
head output nothing without pushing its softmax to extremes (the official `conditional_per_token`).
- `gate_type="linear"`: f_h = Linear(d -> 1) per head, bias initialised to logit(gate_init);
  the README example is gate_init = 0.25 (the default here; the ViT value is not verified).
- `gate_type="mlp"`: f_h = d -> d/4 -> 1 with ReLU (the BERT script's gate; PyTorch default init).
Weights without a special init follow PyTorch's Linear default, U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
The softmax is untouched (query-side gate), so it runs through the softmax core's paths and the
[CLS] row is exact softmax; sizes enter as log s_j on the logits.
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitjax.attention import registry
from vitjax.attention.base import Attention, SOFTMAX_IMPLS, quadratic_macs

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


def gated_macs(n, width, num_heads, *, gate_type, **_):
  """+ the gate on every token and head: d -> 1 (linear) or d -> d/4 -> 1 (mlp)."""
  d = width // num_heads
  r = max(d // 4, 1)
  gate = width if gate_type == "linear" else num_heads * (d * r + r)
  return quadratic_macs(n, width, num_heads) + n * gate


@registry.register("gated", impls=SOFTMAX_IMPLS,
                   paper="Quantizable Transformers: gated attention (Bondarenko et al. 2023)",
                   official="https://github.com/Qualcomm-AI-research/outlier-free-transformers",
                   complexity="O(N^2 D) + O(N D)", macs=gated_macs)
class GatedAttention(Attention):
  """Softmax attention whose per-head output is scaled by a token-conditioned sigmoid gate."""
  gate_type: str = "linear"
  gate_init: float = 0.25

  def mix(self, x, q, k, v, bias, ctx, *, need, deterministic):
    if self.gate_type not in GATE_TYPES:
      raise ValueError(f"gate_type must be one of {GATE_TYPES}, got {self.gate_type!r}")
    y, aux = super().mix(x, q, k, v, bias, ctx, need=need, deterministic=deterministic)
    xh = x.reshape(*x.shape[:2], self.num_heads, -1)
    return y * HeadGate(self.gate_type, self.gate_init, name="gate")(xh).astype(y.dtype), aux
