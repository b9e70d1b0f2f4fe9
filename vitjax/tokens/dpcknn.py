"""`dpcknn`: density-peaks clustering with k nearest neighbours (the CTM of TCFormer, Zeng et al.
2022), as in the Haurum et al. 2023 benchmark.

Under stop-gradient: d_ij = |x_i - x_j| / sqrt(C); density rho_i = exp(-mean of d^2 over the k
nearest tokens, itself included); delta_i = distance to the nearest denser token (the largest
distance for the densest); the M tokens with the largest rho * delta are the centres, and every
token joins its nearest centre (centres join their own cluster). Merge: w_i = exp(Linear(x_i))
(or 1 with `equal_weight`); y_c = sum_{i in c} w_i x_i / (sum_{i in c} w_i + 1e-6). Hard clusters:
sizes and sources add.

Deviation: the reference adds U(0, 1e-6) noise to rho to break ties; here ties are broken by the
token index (a lower index counts as denser, and top-k prefers lower indices), so the result is
deterministic and reproducible. The two differ only where densities are within 1e-6.
"""
import jax
import jax.numpy as jnp
import flax.linen as nn

from vitjax.tokens import registry
from vitjax.tokens.base import (BEFORE_ATTENTION, DEFAULT_LOCATIONS, REQUIRED, Reducer, merge_state,
                                pairwise_dist)

_dense = dict(kernel_init=nn.initializers.truncated_normal(0.02), bias_init=nn.initializers.zeros)


def dpc_knn(x, m: int, k: int):
  """x [B, N, C] -> (cluster label of each token [B, N] in 0..M-1, centre indices [B, M])."""
  b, n, c = x.shape
  dist = pairwise_dist(x) / c ** 0.5
  nearest = -jax.lax.top_k(-dist, k)[0]
  density = jnp.exp(-(nearest ** 2).mean(-1))                               # [B, N]
  ids = jnp.arange(n)
  denser = ((density[:, None, :] > density[:, :, None])                     # [b, i, j]: j denser
            | ((density[:, None, :] == density[:, :, None]) & (ids[None, :] < ids[:, None])))
  dist_max = dist.reshape(b, -1).max(-1)[:, None, None]
  delta = jnp.where(denser, dist, dist_max).min(-1)
  _, centers = jax.lax.top_k(delta * density, m)
  labels = jnp.argmin(jnp.take_along_axis(dist, centers[:, :, None], axis=1), axis=1)
  labels = jax.vmap(lambda l, cen: l.at[cen].set(jnp.arange(m)))(labels, centers)
  return labels, centers


def merge_clusters(x, w, labels, m: int):
  """y_c = sum_{i in c} w_i x_i / (sum_{i in c} w_i + 1e-6) -> (y [B, M, C], weights [B, M, N])."""
  onehot = jax.nn.one_hot(labels, m, dtype=x.dtype).transpose(0, 2, 1)     # [B, M, N]
  total = jnp.einsum("bmn,bn->bm", onehot, w) + 1e-6
  weights = onehot * w[:, None, :] / total[:, :, None]
  return jnp.einsum("bmn,bnc->bmc", weights, x), onehot


@registry.register(
    "dpcknn", paper="DPC-KNN token clustering (TCFormer CTM; Haurum et al. 2023 benchmark)")
class DPCKNN(Reducer):
  count: int = 1          # M: clusters, floor(N0 * kr^s)
  k_neighbors: int = 5
  equal_weight: bool = False

  hook = BEFORE_ATTENTION
  options = {"keep_rate": REQUIRED, "locations": DEFAULT_LOCATIONS, "k_neighbors": 5,
             "equal_weight": False}

  @classmethod
  def macs(cls, n: int, width: int, *, count: int, equal_weight: bool = False,
           num_prefix: int = 1, **kwargs) -> int:
    """The Gram matrix of the distances, n^2 width, the token weights' projection (n width) and
    the clusters' weighted sums, M n width."""
    del kwargs
    m = n - num_prefix
    return m * m * width + (0 if equal_weight else m * width) + count * m * width

  @nn.compact
  def __call__(self, x, state, aux, *, deterministic=True):
    p = self.num_prefix
    img = x[:, p:]
    if self.equal_weight:
      w = jnp.ones(img.shape[:2], jnp.float32)
    else:
      w = jnp.exp(nn.Dense(1, dtype=self.dtype, name="score", **_dense)(img)[..., 0]
                  .astype(jnp.float32))
    labels, _ = dpc_knn(jax.lax.stop_gradient(img.astype(jnp.float32)), self.count,
                        self.k_neighbors)
    y, onehot = merge_clusters(img.astype(jnp.float32), w, labels, self.count)
    return (jnp.concatenate([x[:, :p], y.astype(x.dtype)], axis=1),
            merge_state(state, onehot, p))
