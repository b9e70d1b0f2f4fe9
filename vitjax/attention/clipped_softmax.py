"""G9 `clipped_softmax` (Bondarenko et al. 2023, "Quantizable Transformers: Removing Outliers by
Helping Attention Heads Do Nothing"), following the official Qualcomm code.

P = clip((zeta - gamma) softmax(S) + gamma, 0, 1);  O = P V.
gamma < 0 lets a head reach exact zeros (a "no-op") without pushing the logits to extremes.
Official setting: zeta = 1 and gamma = -alpha / T with T the sequence length. Both official
pre-training scripts land near gamma = -0.025: BERT uses "clipped(-.025:1)" at T = 128, OPT uses
alpha = 12 at T = 512 (gamma = -0.0234). The ViT value is not verified, so the default is the fixed
gamma = -0.025 of the BERT script; `alpha` switches to gamma = -alpha / T (the spec suggests sweeping
alpha in {2, 4, 12} at T = 197). A fixed gamma also keeps small models alive: alpha = 12 at N = 17
would clip every weight below 0.41.
T: `seq_len` when given (keep the training-time length after pruning), else the number of keys of
the layer (the total key size when sizes are passed).

Sizes (R2, own derivation): with p = softmax(S + log s) and s_j = exp(beta_j), key j gets
clip((zeta - gamma) p_j + gamma s_j, 0, s_j), which is exactly the total weight of s_j clipped copies.
A masked key (s_j = 0) gets weight 0.
"""
from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from vitjax.attention import registry
from vitjax.attention.base import (Attention, AttnContext, Capabilities, additive_key_bias,
                                   collect_aux, weighted_values)
from vitjax.attention.mhsa import softmax_weights

IMPLS = ("reference", "xla")  # both run the einsum path


def clipped_weights(probs, gamma, zeta: float, sizes=None):
  """Stretch-and-clip of softmax weights [B,H,N,M]; sizes [B,1,1,M] or None (all 1)."""
  s = 1.0 if sizes is None else sizes
  return jnp.clip((zeta - gamma) * probs + gamma * s, 0.0, s)


@registry.register(
    "clipped_softmax", caps=Capabilities(),
    paper="Quantizable Transformers: clipped softmax (Bondarenko et al. 2023)",
    complexity="O(N^2 D)")
class ClippedSoftmaxAttention(Attention):
  """Softmax stretched to [gamma, zeta] and clipped to [0, 1]."""
  gamma: float = -0.025
  zeta: float = 1.0
  alpha: Optional[float] = None   # if set, gamma = -alpha / T instead of `gamma`
  seq_len: Optional[int] = None   # T for gamma = -alpha / T; None: the current key count

  def stretch_low(self, bias, n: int):
    if self.alpha is None:
      return self.gamma
    if self.seq_len is not None:
      return -self.alpha / self.seq_len
    if bias is None:
      return -self.alpha / n
    return -self.alpha / jnp.exp(bias).sum(axis=-1, keepdims=True)

  @nn.compact
  def __call__(self, x, ctx: Optional[AttnContext] = None, *, need=(), deterministic=True):
    if self.impl not in IMPLS:
      raise ValueError(f"clipped_softmax attention has impls {IMPLS}, got {self.impl!r}")
    q, k, v = self.project_qkv(x)
    bias = additive_key_bias(ctx, x.shape[1])
    sizes = None if bias is None else jnp.exp(bias)
    w = clipped_weights(softmax_weights(q, k, bias), self.stretch_low(bias, x.shape[1]),
                        self.zeta, sizes)
    wd = self.dropout_weights(w, deterministic)
    y = weighted_values(wd.astype(v.dtype), v)
    aux = collect_aux(need, probs=w, q=q, k=k, v=v, ctx=ctx)
    return self.project_out(y, x.shape[-1], deterministic), aux
