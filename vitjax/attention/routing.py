"""G23 `routing`: content-based sparse attention through online k-means (Routing Transformer,
Roy et al. 2021).

Queries and keys are L2-normalised per head and assigned to the nearest of C centroids
(C = ceil(sqrt(N)) by default); a query attends only to keys of its own cluster:
  S_ij = q_i k_j / sqrt(d) + bias_j  if c(q_i) = c(k_j) or i = j,  else -inf;  P = softmax(S).
The centroids live in the `batch_stats` collection and follow the paper's online k-means: an
exponential moving average (decay 0.999) of the mean normalised query/key vectors assigned to each
centroid, updated when that collection is mutable and the call is not deterministic (the k-means
update carries no gradient). Each token also sees itself, so no row is empty when its query and its
key land in different clusters (own design; the paper shares Q and K in most runs).
This reference path builds the masked dense [N, N] weights: it has the routed semantics but not the
O(N^1.5 d) cost of the paper's balanced top-w sparse kernel (not implemented: at N ~ 197 it
brings no speed, the spec's pitfall). The [CLS] row is the layer's own, but it covers only the CLS's cluster:
as a token-importance score it is partial, hence `cls_probs="approx"`.
"""
import math
from typing import Optional

import jax
import jax.numpy as jnp

from vitjax.attention import registry
from vitjax.attention.base import (Attention, Capabilities, l2_normalize, quadratic_macs,
                                   softmax_weights)


def normalise(t, eps: float = 1e-6):
  return l2_normalize(t.astype(jnp.float32), eps)


def nearest(t, centroids):
  """t [B,N,H,d] normalised, centroids [H,C,d] -> cluster index [B,N,H]."""
  return jnp.argmax(jnp.einsum("bnhd,hcd->bnhc", t, centroids), axis=-1)


def kmeans_update(centroids, points, assign, decay: float):
  """EMA of the mean of the points assigned to each centroid (unassigned centroids stay put)."""
  onehot = jax.nn.one_hot(assign, centroids.shape[1], dtype=jnp.float32)  # [B,N,H,C]
  total = jnp.einsum("bnhc,bnhd->hcd", onehot, points)
  count = onehot.sum((0, 1))[..., None]
  mean = total / jnp.maximum(count, 1.0)
  new = decay * centroids + (1 - decay) * mean
  return jnp.where(count > 0, normalise(new), centroids)


def routing_macs(n, width, num_heads, *, num_clusters, **_):
  """The full score map of this reference path, + the nearest-centroid search of q and k."""
  clusters = num_clusters or math.ceil(math.sqrt(n))
  return quadratic_macs(n, width, num_heads) + 2 * n * clusters * width


@registry.register(
    "routing", caps=Capabilities(cls_probs="approx"),
    paper="Efficient Content-Based Sparse Attention with Routing Transformers (Roy et al. 2021)",
    complexity="O(N^2 D) reference (paper: O(N^1.5 D))", macs=routing_macs)
class Routing(Attention):
  """Softmax attention restricted to pairs whose query and key share a k-means cluster."""
  num_clusters: Optional[int] = None
  decay: float = 0.999

  def centroids(self, h, c, d):
    init = lambda: normalise(jax.random.normal(self.make_rng("params"), (h, c, d)))
    if self.has_variable("batch_stats", "centroids") or self.is_mutable_collection("batch_stats"):
      return self.variable("batch_stats", "centroids", init)
    # applied with params only: fixed centroids drawn from a constant seed
    return None

  def mix(self, x, q, k, v, bias, ctx, *, need, deterministic):
    n, h, d = q.shape[1], q.shape[2], q.shape[3]
    c = self.num_clusters or math.ceil(math.sqrt(n))
    var = self.centroids(h, c, d)
    mu = var.value if var is not None else normalise(
        jax.random.normal(jax.random.PRNGKey(0), (h, c, d)))
    qn, kn = jax.lax.stop_gradient(normalise(q)), jax.lax.stop_gradient(normalise(k))
    cq, ck = nearest(qn, mu), nearest(kn, mu)
    if var is not None and not deterministic and self.is_mutable_collection("batch_stats"):
      points = jnp.concatenate([qn, kn], axis=1)
      var.value = kmeans_update(mu, points, jnp.concatenate([cq, ck], axis=1), self.decay)
    same = (cq.transpose(0, 2, 1)[..., :, None] == ck.transpose(0, 2, 1)[..., None, :])
    route = jnp.where(same | jnp.eye(n, dtype=bool), 0.0, -jnp.inf)
    return self.attend(q, k, v, route if bias is None else route + bias, ctx, need=need,
                       deterministic=deterministic, weights=softmax_weights)
