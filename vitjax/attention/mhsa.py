"""G1 `mhsa`: softmax multi-head self-attention (ViT, DeiT).

S_h = Q_h K_h^T / sqrt(d) + bias;  P_h = softmax(S_h);  y = concat_h(P_h V_h) W_o.
`impl="reference"` materialises P; `impl="xla"`/`"cudnn"` use `jax.nn.dot_product_attention` and,
when a reducer needs the [CLS] row, recompute only that row exactly (about 1/N of QK^T).
"""
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitjax.attention import registry
from vitjax.attention.base import (Attention, AttnContext, Capabilities, additive_key_bias,
                                   collect_aux, weighted_values)

IMPLS = ("reference", "xla", "cudnn", "pallas")


def softmax_weights(q, k, bias=None):
  """q [B,N,H,d], k [B,M,H,d] -> softmax weights [B,H,N,M] in float32."""
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum("bnhd,bmhd->bhnm", q, k, preferred_element_type=jnp.float32) * scale
  if bias is not None:
    logits = logits + bias
  return jax.nn.softmax(logits, axis=-1)


def cls_softmax_row(q, k, bias, cls_index: int):
  """The exact [CLS]-query softmax row [B,H,M] without materialising the other rows."""
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum("bhd,bmhd->bhm", q[:, cls_index], k,
                      preferred_element_type=jnp.float32) * scale
  if bias is not None:
    logits = logits + bias[:, :, 0, :]
  return jax.nn.softmax(logits, axis=-1)


def fused_softmax(q, k, v, bias, impl: str):
  """Softmax attention through a fused path; returns [B,N,H,d]."""
  if impl == "pallas":
    from vitjax.kernels import flash_attention  # pylint: disable=import-outside-toplevel
    return flash_attention.attention(q, k, v, bias)
  b = None if bias is None else jnp.broadcast_to(bias, (q.shape[0], 1, 1, k.shape[1]))
  if b is not None and impl == "cudnn":
    b = jnp.broadcast_to(b, (q.shape[0], q.shape[2], q.shape[1], k.shape[1])).astype(q.dtype)
  return jax.nn.dot_product_attention(q, k, v, bias=b, implementation=impl)


@registry.register(
    "mhsa", caps=Capabilities(),
    paper="ViT (Dosovitskiy et al. 2021); DeiT (Touvron et al. 2021)", complexity="O(N^2 D)")
class MHSA(Attention):
  """Softmax multi-head self-attention with a backend choice."""

  @nn.compact
  def __call__(self, x, ctx: Optional[AttnContext] = None, *, need=(), deterministic=True):
    if self.impl not in IMPLS:
      raise ValueError(f"unknown attention impl {self.impl!r}; valid: {IMPLS}")
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
    cls_index = 0 if ctx is None else ctx.cls_index
    aux = collect_aux(need, probs=probs, q=q, k=k, v=v, ctx=ctx,
                      row_fn=lambda: cls_softmax_row(q, k, bias, cls_index))
    return self.project_out(y, x.shape[-1], deterministic), aux
