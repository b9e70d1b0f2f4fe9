"""`sinkhorn`: optimal-transport token merging with learned centres (Haurum et al. 2023 benchmark).

x_hat = L2-normalised image tokens; centres c [M, D] kept at unit norm; Z = c x_hat^T [M, N].
Log-domain Sinkhorn with uniform, unbalanced marginals (-log(M+N) on both sides), eps = 1 and 3
iterations, v updated last: Pi = exp(Z/eps + u + v + log(M+N)). After the last iteration every
token's column of Pi sums to 1 (its unit of mass is split among the centres); rows do not sum to a
constant. Output y = Pi x_hat, from normalised tokens and not divided by the row mass. Sizes
follow the transport plan, Pi @ size, which conserves the total number of patches.
"""
import jax
import jax.numpy as jnp
import flax.linen as nn

from vitjax.attention.base import l2_normalize
from vitjax.tokens import registry
from vitjax.tokens.base import BEFORE_ATTENTION, DEFAULT_LOCATIONS, REQUIRED, Reducer, merge_state


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

  @nn.compact
  def __call__(self, x, state, aux, *, deterministic=True):
    p, d = self.num_prefix, x.shape[-1]
    xn = normalize(x[:, p:].astype(jnp.float32))
    v = self.param("centers", unit_sphere, (self.count, d))
    # The reference renormalises the parameter in place without gradient and then uses it as is:
    # its value is unit-norm and the gradient passes straight through to the parameter.
    c = v + jax.lax.stop_gradient(normalize(v) - v)
    plan = log_sinkhorn(jnp.einsum("md,bnd->bmn", c, xn), self.sinkhorn_eps, self.iters)
    y = jnp.einsum("bmn,bnd->bmd", plan, xn).astype(x.dtype)
    return jnp.concatenate([x[:, :p], y], axis=1), merge_state(state, plan, p)
