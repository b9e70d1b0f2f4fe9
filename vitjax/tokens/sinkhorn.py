"""`sinkhorn`: optimal-transport token merging with learned centres (Haurum et al. 2023 benchmark).

x_hat = L2-normalised image tokens; centres c [M, D] kept at unit norm; Z = c x_hat^T [M, N].
Log-domain Sinkhorn with uniform, unbalanced marginals (-log(M+N) on both sides), eps = 1 and 3
iterations, v updated last: Pi = exp(Z/eps + u + v + log(M+N)). After the last iteration every
token's column of Pi sums to 1 (its unit of mass is split among the centres); rows do not sum to a
constant. Output y = Pi x_hat, from normalised tokens and not divided by the row mass. Sizes
follow the transport plan, Pi @ size, which conserves the total number of patches.

The centres (JoakimHaurum/TokenReduction, models/sinkhorn.py, `Sinkhorn.forward` L72-77): before
every forward the benchmark renormalises its parameter in place without gradient and then uses it
as it is, so the centres are the normalised parameter, their gradient reaches the parameter
unchanged, and the optimizer (AdamW, weight decay included) steps from the unit-norm value. Under
a functional optimizer the forward cannot write the parameter, so the two halves are split: the
forward uses normalize(v) with the gradient passed straight through (the benchmark's value and
gradient at any stored v), and `keep_centers_normalized()`, chained after the optimizer, makes
every update land on unit rows, which is the benchmark's stored value. Without it the forward is
still the benchmark's, but the optimizer steps from an un-normalised v whose norm drifts, which
scales the centres' effective step by 1 / ||v||.
"""
import jax
import jax.numpy as jnp
import flax.linen as nn
import optax

from vitjax.attention.base import l2_normalize
from vitjax.tokens import registry
from vitjax.tokens.base import BEFORE_ATTENTION, DEFAULT_LOCATIONS, REQUIRED, Reducer, merge_state

CENTERS = "centers"  # the parameter `keep_centers_normalized` renormalises


def unit_sphere(key, shape, dtype=jnp.float32):
  """N(0, 1) rows normalised to unit length: the reference's centres after its first forward."""
  v = jax.random.normal(key, shape, dtype)
  return v / jnp.linalg.norm(v, axis=-1, keepdims=True)


def normalize(x, eps=1e-12):
  """torch.nn.functional.normalize(x, dim=-1)."""
  return l2_normalize(x, eps)


def log_sinkhorn(scores, eps: float, iters: int):
  """scores [B, M, N] -> transport plan [B, M, N] whose columns sum to 1 after the last step."""
  m, n = scores.shape[-2:]
  norm = -jnp.log(float(m + n))
  z = scores / eps
  u = jnp.zeros(scores.shape[:-1], scores.dtype)
  v = jnp.zeros(scores.shape[:-2] + (n,), scores.dtype)
  for _ in range(iters):
    u = norm - jax.nn.logsumexp(z + v[:, None, :], axis=2)
    v = norm - jax.nn.logsumexp(z + u[:, :, None], axis=1)
  return jnp.exp(z + u[:, :, None] + v[:, None, :] - norm)


@registry.register("sinkhorn", paper="Sinkhorn token clustering (Haurum et al. 2023 benchmark)")
class Sinkhorn(Reducer):
  count: int = 1          # M: output tokens, floor(N0 * kr^s)
  sinkhorn_eps: float = 1.0
  iters: int = 3          # the benchmark's cluster_iters

  hook = BEFORE_ATTENTION
  soft = True
  options = {"keep_rate": REQUIRED, "locations": DEFAULT_LOCATIONS, "sinkhorn_eps": 1.0, "iters": 3}

  @classmethod
  def macs(cls, n: int, width: int, *, count: int, num_prefix: int = 1, **kwargs) -> int:
    """The scores c x_hat^T and the pooling Pi x_hat, each M n width (the Sinkhorn iterations are
    log-sum-exps, not multiply-accumulates)."""
    del kwargs
    return 2 * count * (n - num_prefix) * width

  @classmethod
  def after_update(cls):
    return keep_centers_normalized()

  @nn.compact
  def __call__(self, x, state, aux, *, deterministic=True):
    p, d = self.num_prefix, x.shape[-1]
    xn = normalize(x[:, p:].astype(jnp.float32))
    v = self.param(CENTERS, unit_sphere, (self.count, d))
    c = v + jax.lax.stop_gradient(normalize(v) - v)  # value normalised, gradient straight through
    plan = log_sinkhorn(jnp.einsum("md,bnd->bmn", c, xn), self.sinkhorn_eps, self.iters)
    y = jnp.einsum("bmn,bnd->bmd", plan, xn).astype(x.dtype)
    return jnp.concatenate([x[:, :p], y], axis=1), merge_state(state, plan, p)


def is_centers(path) -> bool:
  """Whether a parameter path names a Sinkhorn reducer's centres."""
  return getattr(path[-1], "key", None) == CENTERS


def keep_centers_normalized() -> optax.GradientTransformation:
  """Chained last after an optimizer: the update of every Sinkhorn centre parameter lands on
  unit rows, normalize(v + u) - v (the benchmark's in-place renormalisation); others pass as
  given."""
  def update(updates, state, params=None):
    if params is None:
      raise ValueError("keep_centers_normalized needs the params: call tx.update(grads, state, "
                       "params)")
    def fix(path, u, v):
      return normalize(v + u) - v if is_centers(path) else u
    return jax.tree_util.tree_map_with_path(fix, updates, params), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)
