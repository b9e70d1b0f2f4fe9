"""G9 `clipped_softmax` (Bondarenko et al. 2023, "Quantizable Transformers: Removing Outliers by
Helping Attention Heads Do Nothing"), following the official Qualcomm code
(https://github.com/Qualcomm-AI-research/outlier-free-transformers).

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

import jax
import jax.numpy as jnp

from vitjax.attention import registry
from vitjax.attention.base import Attention, elementwise, quadratic_macs


def clipped_weights(probs, gamma, zeta: float, sizes=None):
  """Stretch-and-clip of softmax weights [B,H,N,M]; sizes [B,1,1,M] or None (all 1)."""
  s = 1.0 if sizes is None else sizes
  return jnp.clip((zeta - gamma) * probs + gamma * s, 0.0, s)


@registry.register("clipped_softmax", impls=("reference", "xla"),
                   paper="Quantizable Transformers: clipped softmax (Bondarenko et al. 2023)",
                   official="https://github.com/Qualcomm-AI-research/outlier-free-transformers",
                   complexity="O(N^2 D)", macs=quadratic_macs)
class ClippedSoftmaxAttention(Attention):
  """Softmax stretched to [gamma, zeta] and clipped to [0, 1] (impl xla: the same einsums)."""
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

  def clip(self, logits, bias):
    probs = jax.nn.softmax(logits if bias is None else logits + bias, axis=-1)
    sizes = None if bias is None else jnp.exp(bias)
    return clipped_weights(probs, self.stretch_low(bias, logits.shape[-1]), self.zeta, sizes)

  def weight_fn(self):
    return elementwise(self.clip)
