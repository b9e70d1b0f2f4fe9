"""`sit`: the token slimming module (TSM) of Self-slimmed ViT (Zong et al. 2022), as in the
Haurum et al. benchmark.

W = MLP(LN(x); D -> D/2 -> M, GELU) in R^{N x M}; A = softmax over tokens of (kappa * W), with a
learned scalar kappa initialised to 1; y = A^T x (raw tokens). Each output is a convex combination
of the inputs (soft merge): sizes become assignment-weighted, A^T @ size. The feature-recalibration
distillation (FRD, reverse TSM) of the paper is a training objective and is not part of this module.
"""
import jax
import jax.numpy as jnp
import flax.linen as nn

from vitjax.tokens import registry
from vitjax.tokens.base import BEFORE_ATTENTION, DEFAULT_LOCATIONS, REQUIRED, Reducer, merge_state

_dense = dict(kernel_init=nn.initializers.truncated_normal(0.02), bias_init=nn.initializers.zeros)


@registry.register(
    "sit", paper="SiT token slimming (Zong et al. 2022); Haurum et al. 2023 benchmark")
class SiT(Reducer):
  count: int = 1            # M: output tokens, floor(N0 * kr^s)
  hidden_ratio: float = 0.5

  hook = BEFORE_ATTENTION
  soft = True
  options = {"keep_rate": REQUIRED, "locations": DEFAULT_LOCATIONS, "hidden_ratio": 0.5}

  @classmethod
  def macs(cls, n: int, width: int, *, count: int, hidden_ratio: float = 0.5, num_prefix: int = 1,
           **kwargs) -> int:
    """The MLP D -> D/2 -> M on the image tokens and the pooling A^T x."""
    del kwargs
    hidden = int(width * hidden_ratio)
    return (n - num_prefix) * (width * hidden + hidden * count + count * width)

  @nn.compact
  def __call__(self, x, state, aux, *, deterministic=True):
    p, d = self.num_prefix, x.shape[-1]
    img = x[:, p:]
    h = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="norm")(img)  # torch default eps
    h = nn.Dense(int(d * self.hidden_ratio), dtype=self.dtype, name="fc1", **_dense)(h)
    w = nn.Dense(self.count, dtype=self.dtype, name="fc2", **_dense)(nn.gelu(h, approximate=False))
    kappa = self.param("scale", nn.initializers.ones, (1,))
    attn = jax.nn.softmax(w.astype(jnp.float32) * kappa, axis=1)   # over tokens: [B, N, M]
    attn = attn.transpose(0, 2, 1)                                  # [B, M, N]
    y = jnp.einsum("bmn,bnd->bmd", attn.astype(img.dtype), img)
    return jnp.concatenate([x[:, :p], y], axis=1), merge_state(state, attn, p)
