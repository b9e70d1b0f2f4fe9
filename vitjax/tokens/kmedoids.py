"""`kmedoids`: K-Medoids token clustering (Haurum et al. 2023 benchmark).

Before blocks 3/6/9 the image tokens are clustered into M = floor(N0 * kr^s) clusters and the M
medoids, exact copies of input tokens, are kept. Token weights w_j = attention received in the
previous block, summed over heads and all queries (CLS included). Medoids start at the top-M
tokens by w (or, with `equal_weight`, by the benchmark's farthest-point sampling), then
`cluster_iters` rounds of: assign every token to its nearest medoid (Euclidean); move each medoid
to the member that minimises the update cost. `medoid_update="haurum"` is the benchmark's cost,
w_i * sum over **all** tokens j of d(i, j); "textbook" is sum over the cluster's members of
w_j * d(i, j). Clustering runs under stop-gradient; gradients flow into the copied tokens.
A medoid's size and source are the sums over its final cluster; its position is its own.
"""
import jax
import jax.numpy as jnp
import flax.linen as nn

from vitjax.tokens import registry
from vitjax.tokens.base import (BEFORE_ATTENTION, DEFAULT_LOCATIONS, REQUIRED, Reducer, merge_state,
                                pairwise_dist, take_tokens)

UPDATES = ("haurum", "textbook")
_MASKED_ROW = 1e6  # the benchmark masks non-members' distance rows with 1e6 before summing them


def assign(dist, idx):
  """Nearest medoid of every token: dist [B, N, N], medoids idx [B, M] -> [B, N] in 0..M-1."""
  return jnp.argmin(jnp.take_along_axis(dist, idx[:, None, :], axis=2), axis=-1)


def update_medoids(dist, w, labels, m: int, rule: str):
  """New medoid of each cluster: argmin over its members of the update cost -> [B, M]."""
  member = jax.nn.one_hot(labels, m, dtype=jnp.bool_).transpose(0, 2, 1)  # [B, M, N]
  n = dist.shape[-1]
  if rule == "haurum":
    total = w * dist.sum(-1)                                              # [B, N]
    cost = jnp.where(member, total[:, None, :], n * _MASKED_ROW)          # empty cluster -> token 0
  else:
    within = jnp.einsum("bmj,bij->bmi", member * w[:, None, :], dist)     # sum_{j in k} w_j d_ij
    cost = jnp.where(member, within, jnp.inf)
  return jnp.argmin(cost, axis=-1)


def farthest_points(dist, m: int, start):
  """The benchmark's seeding for equal weights: from `start`, repeatedly add the token whose
  largest distance to a chosen medoid is largest (chosen tokens score 0)."""
  b, n, _ = dist.shape
  idx = jnp.zeros((b, m), jnp.int32).at[:, 0].set(start)
  chosen = jax.nn.one_hot(jnp.full((b,), start), n, dtype=jnp.bool_)
  far = jnp.take_along_axis(dist, jnp.full((b, n, 1), start), axis=2)[..., 0]

  def body(k, carry):
    idx, chosen, far = carry
    new = jnp.argmax(jnp.where(chosen, 0.0, far), axis=-1)
    col = jnp.take_along_axis(dist, new[:, None, None].repeat(n, 1), axis=2)[..., 0]
    return (idx.at[:, k].set(new), chosen | jax.nn.one_hot(new, n, dtype=jnp.bool_),
            jnp.maximum(far, col))

  idx, _, _ = jax.lax.fori_loop(1, m, body, (idx, chosen, far))
  return idx


def kmedoids(x, w, m: int, iters: int, rule: str = "haurum", start=None):
  """x [B, N, D], weights w [B, N] or None (equal) -> (medoid indices [B, M], labels [B, N])."""
  dist = pairwise_dist(x.astype(jnp.float32))
  if w is None:
    idx = farthest_points(dist, m, 0 if start is None else start)
    w = jnp.ones(x.shape[:2], jnp.float32)
  else:
    _, idx = jax.lax.top_k(w, m)
  for _ in range(iters):
    idx = update_medoids(dist, w, assign(dist, idx), m, rule)
  return idx, assign(dist, idx)


@registry.register("kmedoids", paper="K-Medoids token clustering (Haurum et al. 2023 benchmark)")
class KMedoids(Reducer):
  count: int = 1              # M: medoids kept, floor(N0 * kr^s)
  cluster_iters: int = 3
  equal_weight: bool = False
  medoid_update: str = "haurum"

  hook = BEFORE_ATTENTION
  needs = ('attn',)
  options = {"keep_rate": REQUIRED, "locations": DEFAULT_LOCATIONS, "cluster_iters": 3,
             "equal_weight": False, "medoid_update": "haurum"}
  choices = {"medoid_update": UPDATES}

  @classmethod
  def macs(cls, n: int, width: int, *, count: int, cluster_iters: int = 3,
           medoid_update: str = "haurum", num_prefix: int = 1, **kwargs) -> int:
    """The Gram matrix of the distances, n^2 width; the textbook update adds M n^2 per round."""
    del kwargs
    m = n - num_prefix
    rounds = cluster_iters * count * m * m if medoid_update == "textbook" else 0
    return m * m * width + rounds

  @nn.compact
  def __call__(self, x, state, aux, *, deterministic=True):
    p = self.num_prefix
    img = x[:, p:]
    w, start = None, None
    if self.equal_weight:
      # the benchmark seeds from a random token (np.random); evaluation starts at token 0
      if not deterministic:
        start = jax.random.randint(self.make_rng("dropout"), (), 0, img.shape[1])
    else:
      w = aux["attn"].astype(jnp.float32).sum(axis=(1, 2))[:, p:]
    idx, labels = kmedoids(jax.lax.stop_gradient(img), w, self.count, self.cluster_iters,
                           self.medoid_update, start)
    y = take_tokens(img, idx)
    new = merge_state(state, jax.nn.one_hot(labels, self.count).transpose(0, 2, 1), p)
    if state.pos is not None:
      pos = take_tokens(state.pos[:, p:], idx)
      new = new.replace(pos=jnp.concatenate([state.pos[:, :p], pos], 1))
    return jnp.concatenate([x[:, :p], y], axis=1), new
