"""G15 `latte`: bidirectional latent attention (Latte, Dolga et al. 2024).

Attention through L latent states per head: p(j|i) = sum_l p(l|i) p(j|l) with
  p(l|i) = softmax_l(x_i W_q)      (row softmax over latents; W_q: D -> H*L),
  p(j|l) = softmax_j(x_j W_k + b_j) (column softmax over tokens; W_k: D -> H*L),
  y_i = W_o concat_h sum_l p(l|i) sum_j p(j|l) v_j,   v = x W_v.
No 1/sqrt(d) scale (the logits are per-latent linear maps, as in the paper). Cost O(N L D): the
[N, N] matrix P_eff = softmax_L(Q~) softmax_N(K~)^T is built only when asked for (`attn`); the [CLS]
row of it is exact in O(L N). Sizes and masks enter the token softmax (R2: add log s_j to column j).
Default L = 64 for N ~ 197 (the spec's choice; the paper tunes L per task). The paper's causal form
and its local-window hybrid are not part of this bidirectional module.
The latent logits are not d-dimensional keys, so `key_metric` is not provided (ToMe falls back to x).
"""
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitjax.attention import registry
from vitjax.attention.base import Attention, AttnContext, Capabilities, additive_key_bias


def latent_weights(qt, kt, bias=None):
  """qt, kt [B,N,H,L] -> p(l|i) [B,H,N,L] and p(j|l) [B,H,L,N] in float32."""
  a = jax.nn.softmax(qt.astype(jnp.float32), axis=-1).transpose(0, 2, 1, 3)
  logits = kt.astype(jnp.float32).transpose(0, 2, 3, 1)
  if bias is not None:
    logits = logits + bias[:, :, 0, :][:, :, None, :]
  return a, jax.nn.softmax(logits, axis=-1)


def latte_macs(n, width, num_heads, *, num_latents, **_):
  """Latent maps D -> H L for queries and keys, value and output projections, and the two
  latent products p(j|l) V and p(l|i) (.), n L D each."""
  latents = 2 * n * width * num_heads * num_latents + 2 * n * num_latents * width
  return latents + 2 * n * width * width


@registry.register("latte", caps=Capabilities(key_metric=False),
                   paper="Latte: Latent Attention for Linear Time Transformers (Dolga et al. 2024)",
                   complexity="O(N L D)", macs=latte_macs)
class Latte(Attention):
  """Two softmaxes through L latents per head; linear in the number of tokens."""
  num_latents: int = 64

  @nn.compact
  def __call__(self, x, ctx: Optional[AttnContext] = None, *, need=(), deterministic=True):
    if self.qk_norm:
      raise ValueError("latte has no query/key head vectors to normalise; set qk_norm=False")
    b, n, width = x.shape
    d, h, lat = self.head_dim(width), self.num_heads, self.num_latents
    dense = lambda f, name: nn.Dense(f, use_bias=self.qkv_bias, dtype=self.dtype, name=name)
    qt = dense(h * lat, "q_latent")(x).reshape(b, n, h, lat)
    kt = dense(h * lat, "k_latent")(x).reshape(b, n, h, lat)
    v = dense(width, "v")(x).reshape(b, n, h, d)
    a, p = latent_weights(qt, kt, additive_key_bias(ctx, n))
    y, aux = self.attend_factored(a, p, v.astype(jnp.float32), ctx, need=tuple(need),
                                  deterministic=deterministic)
    return self.project_out(y.astype(v.dtype), width, deterministic), aux
