"""G7 `agent`: agent attention (Han et al. 2024, "Agent Attention: On the Integration of Softmax and
Linear Attention"), following the official LeapLabTHU DeiT code.

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
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitjax.attention import registry
from vitjax.attention.base import (Attention, AttnContext, Capabilities, additive_key_bias,
                                   collect_aux, weighted_values)
from vitjax.attention.linear_elu import cls_query

IMPLS = ("reference", "xla")
SOURCES = ("learned", "pool_grid")


def adaptive_pool_matrix(size_in: int, size_out: int) -> np.ndarray:
  """[out, in] averaging matrix with PyTorch's AdaptiveAvgPool bins [floor(i*in/out), ceil(...))."""
  m = np.zeros((size_out, size_in), np.float32)
  for i in range(size_out):
    lo, hi = (i * size_in) // size_out, -(-((i + 1) * size_in) // size_out)
    m[i, lo:hi] = 1.0 / (hi - lo)
  return m


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


@registry.register(
    "agent", caps=Capabilities(cls_probs="exact"),
    paper="Agent Attention: On the Integration of Softmax and Linear Attention (Han et al. 2024)",
    complexity="O(N n D)")
class AgentAttention(Attention):
  """Agent attention; this name is the grid-free variant with learned agents (see `agent_grid`)."""
  num_agents: int = 49
  agent_source: str = "learned"
  biases: bool = False
  dwc: bool = False
  materialise: bool = False

  def check(self, ctx):
    if self.impl not in IMPLS:
      raise ValueError(f"agent attention has impls {IMPLS}, got {self.impl!r}")
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

  @nn.compact
  def __call__(self, x, ctx: Optional[AttnContext] = None, *, need=(), deterministic=True):
    self.check(ctx)
    q, k, v = self.project_qkv(x)
    bias = additive_key_bias(ctx, x.shape[1])
    b1 = b2 = None
    if self.biases:
      b1, b2 = AgentBiases(self.num_heads, self.num_agents, name="pos_bias")(ctx.grid,
                                                                          ctx.num_prefix)
    pq, pa = agent_factors(q, k, self.agents(q, ctx), bias, b1, b2)
    wq, wa = self.dropout_weights(pq, deterministic), self.dropout_weights(pa, deterministic)
    probs = None
    if self.materialise or "attn" in need:
      probs = jnp.einsum("bhna,bham->bhnm", pq, pa)
    if self.materialise and wq is pq and wa is pa:
      y = weighted_values(probs.astype(v.dtype), v)
    else:
      va = jnp.einsum("bham,bmhd->bahd", wa.astype(v.dtype), v)
      y = jnp.einsum("bhna,bahd->bnhd", wq.astype(v.dtype), va)
    if self.dwc:
      y = self.rank_restoration(y, v, ctx)
    cls_index = cls_query(ctx)
    row_fn = lambda: jnp.einsum("bha,bham->bhm", pq[:, :, cls_index()], pa)  # noqa: E731
    aux = collect_aux(need, probs=probs, q=q, k=k, v=v, ctx=ctx, row_fn=row_fn)
    return self.project_out(y, x.shape[-1], deterministic), aux


@registry.register(
    "agent_grid", caps=Capabilities(cls_probs="exact", needs_grid=True),
    paper="Agent Attention: On the Integration of Softmax and Linear Attention (Han et al. 2024)",
    complexity="O(N n D) + 9 N D", tier="S")
class AgentGridAttention(AgentAttention):
  """The original DeiT form: pooled-query agents, position biases and a 3x3 DWC on V."""
  agent_source: str = "pool_grid"
  biases: bool = True
  dwc: bool = True
