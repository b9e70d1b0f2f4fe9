"""G7 `agent`: agent attention (Han et al. 2024, "Agent Attention: On the Integration of Softmax and
Linear Attention"), following the official DeiT code
(https://github.com/LeapLabTHU/Agent-Attention).

n agent tokens A per head first aggregate from the keys, then broadcast to the queries:
  V_A = softmax(A K^T / sqrt(d) + B1) V;   O = softmax(Q A^T / sqrt(d) + B2) V_A   (O(N n d)),
so the effective weights are P_eff = softmax(Q A^T) softmax(A K^T), row-stochastic.

Agent sources:
- `agent` (Tier G, own design): n learned agent vectors (`agent_source="learned"`), no position
  biases and no DWC, so it runs on any token set (pruned, merged, with registers).
- `agent_grid` (the original, needs the grid): A = AdaptiveAvgPool_{sqrt(n) x sqrt(n)}(Q over the
  patch grid, prefix tokens excluded); n = 49 in the DeiT models; learned position biases B1/B2
  (sqrt(n) x sqrt(n) tables resized bilinearly to the grid, plus row and column terms, plus separate
  terms for the prefix tokens); DWC_3x3(V) added to the patch tokens' outputs.
Attention dropout acts on both softmaxes, as in the official code.

Sizes (R2): log s_j (the key bias) enters the aggregation softmax over keys; the broadcast softmax
runs over agents and needs nothing. The [CLS] row is exact: P_eff[cls] = P_q[cls] P_a, O(n N).
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitjax.attention import registry
from vitjax.attention.base import (Attention, Capabilities, adaptive_pool_matrix,
                                   projection_macs)

SOURCES = ("learned", "pool_grid")


def pool_agents(q, grid, num_prefix: int, num_agents: int):
  """Average-pools the patch queries [B,N,H,d] to a sqrt(n) x sqrt(n) grid: [B,n,H,d]."""
  side = math.isqrt(num_agents)
  rows = jnp.asarray(adaptive_pool_matrix(grid[0], side))
  cols = jnp.asarray(adaptive_pool_matrix(grid[1], side))
  img = q[:, num_prefix:].reshape(q.shape[0], grid[0], grid[1], *q.shape[2:])
  pooled = jnp.einsum("ai,cj,bijhd->bachd", rows, cols, img)
  return pooled.reshape(q.shape[0], num_agents, *q.shape[2:])


def agent_factors(q, k, agents, bias=None, agent_key_bias=None, query_agent_bias=None):
  """P_q = softmax(Q A^T s + B2) [B,H,N,n] and P_a = softmax(A K^T s + B1 + beta) [B,H,n,M]."""
  scale = q.shape[-1] ** -0.5
  la = jnp.einsum("bahd,bmhd->bham", agents, k, preferred_element_type=jnp.float32) * scale
  lq = jnp.einsum("bnhd,bahd->bhna", q, agents, preferred_element_type=jnp.float32) * scale
  if agent_key_bias is not None:
    la = la + agent_key_bias
  if bias is not None:
    la = la + bias
  if query_agent_bias is not None:
    lq = lq + query_agent_bias
  return jax.nn.softmax(lq, axis=-1), jax.nn.softmax(la, axis=-1)


class AgentBiases(nn.Module):
  """The official position biases: B1 [H,n,N] (agent -> key) and B2 [H,N,n] (query -> agent)."""
  num_heads: int
  num_agents: int

  def table(self, name, shape):
    return self.param(name, nn.initializers.truncated_normal(0.02), shape)

  def spatial(self, prefix: str, grid):
    h, n, side = self.num_heads, self.num_agents, math.isqrt(self.num_agents)
    t = self.table(f"{prefix}_bias", (h, n, side, side))
    t = jax.image.resize(t, (h, n, *grid), method="bilinear", antialias=False)
    rc = self.table(f"{prefix}_row", (h, n, grid[0], 1)) + self.table(f"{prefix}_col",
                                                                      (h, n, 1, grid[1]))
    return (t + rc).reshape(h, n, grid[0] * grid[1])

  @nn.compact
  def __call__(self, grid, num_prefix: int):
    h, n = self.num_heads, self.num_agents
    b1 = self.spatial("an", grid)
    b1 = jnp.concatenate([jnp.broadcast_to(self.table("ac_bias", (h, n, 1)), (h, n, num_prefix)),
                          b1], axis=-1)
    b2 = self.spatial("na", grid).transpose(0, 2, 1)
    b2 = jnp.concatenate([jnp.broadcast_to(self.table("ca_bias", (h, 1, n)), (h, num_prefix, n)),
                          b2], axis=1)
    return b1[None], b2[None]


def agent_macs(n, width, num_heads, *, num_agents, agent_source, biases, dwc, num_prefix=1,
               **_):
  """Projections + the four agent products (A K^T, P_a V, Q A^T, P_q V_A), 4 n a D; the grid form
  adds the query pooling, the bilinear resize of the bias tables and the 3x3 depthwise conv."""
  grid = math.isqrt(n - num_prefix)
  side = math.isqrt(num_agents)
  total = projection_macs(n, width) + 4 * n * num_agents * width
  if agent_source == "pool_grid":  # rows, then columns of the patch grid
    total += side * grid * grid * width + side * side * grid * width
  if biases:  # two tables per direction, each resized along rows, then columns
    total += 2 * num_heads * num_agents * (grid * side * side + grid * grid * side)
  if dwc:
    total += (n - num_prefix) * 9 * width
  return total


@registry.register(
    "agent", caps=Capabilities(cls_probs="exact"), impls=("reference", "xla"),
    paper="Agent Attention: On the Integration of Softmax and Linear Attention (Han et al. 2024)",
    official="https://github.com/LeapLabTHU/Agent-Attention", complexity="O(N n D)",
    macs=agent_macs)
class AgentAttention(Attention):
  """Agent attention; this name is the grid-free variant with learned agents (see `agent_grid`)."""
  num_agents: int = 49
  agent_source: str = "learned"
  biases: bool = False
  dwc: bool = False
  materialise: bool = False

  def check(self, ctx):
    if self.agent_source not in SOURCES:
      raise ValueError(f"agent_source must be one of {SOURCES}, got {self.agent_source!r}")
    grid_bound = self.agent_source == "pool_grid" or self.biases or self.dwc
    if grid_bound and not self.caps.needs_grid:
      raise ValueError("agent with pool_grid agents, position biases or DWC needs the token grid: "
                       "use the attention name 'agent_grid' (not valid after token reduction)")
    if grid_bound and (ctx is None or ctx.grid is None):
      raise ValueError("agent_grid needs ctx.grid (tokens in raster order)")
    if self.agent_source == "pool_grid" and math.isqrt(self.num_agents) ** 2 != self.num_agents:
      raise ValueError(f"pool_grid needs a square number of agents, got {self.num_agents}")

  def agents(self, q, ctx):
    if self.agent_source == "pool_grid":
      return pool_agents(q, ctx.grid, ctx.num_prefix, self.num_agents)
    a = self.param("agents", nn.initializers.normal(0.02), (self.num_agents, *q.shape[2:]))
    return jnp.broadcast_to(a.astype(q.dtype), (q.shape[0], *a.shape))

  def rank_restoration(self, y, v, ctx):
    p, (gh, gw) = ctx.num_prefix, ctx.grid
    b, n, h, d = v.shape
    img = v[:, p:].reshape(b, gh, gw, h * d)
    conv = nn.Conv(h * d, (3, 3), padding="SAME", feature_group_count=h * d, dtype=self.dtype,
                   name="dwc")(img)
    return y.at[:, p:].add(conv.reshape(b, n - p, h, d).astype(y.dtype))

  def mix(self, x, q, k, v, bias, ctx, *, need, deterministic):
    self.check(ctx)
    b1 = b2 = None
    if self.biases:
      b1, b2 = AgentBiases(self.num_heads, self.num_agents, name="pos_bias")(ctx.grid,
                                                                          ctx.num_prefix)
    pq, pa = agent_factors(q, k, self.agents(q, ctx), bias, b1, b2)
    y, aux = self.attend_factored(pq, pa, v, ctx, need=need, deterministic=deterministic, keys=k,
                                  materialise=self.materialise, drop_factors=True)
    return (self.rank_restoration(y, v, ctx) if self.dwc else y), aux


@registry.register("agent_grid", like="agent",
                   caps=Capabilities(cls_probs="exact", needs_grid=True),
                   complexity="O(N n D) + 9 N D")
class AgentGridAttention(AgentAttention):
  """The original DeiT form: pooled-query agents, position biases and a 3x3 DWC on V."""
  agent_source: str = "pool_grid"
  biases: bool = True
  dwc: bool = True
