"""`patchmerger`: PatchMerger (Renggli et al. 2022), as re-implemented in the Haurum et al.
benchmark.

M learned queries W [M, D] attend over the layer-normed image tokens z = LN(x):
A = softmax over tokens of (W z^T * c), y = A z, with c = 1 (or D^-1/2 with `scaled=True`).
The outputs are built from the normalised tokens. Each output is a convex combination of the
inputs, so this is a soft merge: sizes become assignment-weighted (A @ size, which keeps each new
token at the mean size of what it averages), and proportional attention should stay off after it.
"""
import jax
import jax.numpy as jnp
import flax.linen as nn

from vitjax.tokens import registry
from vitjax.tokens.base import BEFORE_ATTENTION, DEFAULT_LOCATIONS, REQUIRED, Reducer, merge_state


@registry.register(
    "patchmerger", paper="PatchMerger (Renggli et al. 2022); Haurum et al. 2023 benchmark")
class PatchMerger(Reducer):
  count: int = 1           # M: output tokens, floor(N0 * kr^s)
  scaled: bool = False     # logits scaled by D^-1/2 (the benchmark's `scaled_attention`)

  hook = BEFORE_ATTENTION
  soft = True
  options = {"keep_rate": REQUIRED, "locations": DEFAULT_LOCATIONS, "scaled": False}

  @classmethod
  def macs(cls, n: int, width: int, *, count: int, num_prefix: int = 1, **kwargs) -> int:
    """The query logits and the pooling, each M n width."""
    del kwargs
    return 2 * count * (n - num_prefix) * width

  @nn.compact
  def __call__(self, x, state, aux, *, deterministic=True):
    p, d = self.num_prefix, x.shape[-1]
    z = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="norm")(x[:, p:])  # torch default eps
    queries = self.param("queries", nn.initializers.normal(1.0), (self.count, d))  # randn init
    logits = jnp.einsum("md,bnd->bmn", queries.astype(z.dtype), z,
                        preferred_element_type=jnp.float32)
    attn = jax.nn.softmax(logits * (d ** -0.5 if self.scaled else 1.0), axis=-1)
    y = jnp.einsum("bmn,bnd->bmd", attn.astype(z.dtype), z)
    return jnp.concatenate([x[:, :p], y.astype(x.dtype)], axis=1), merge_state(state, attn, p)
