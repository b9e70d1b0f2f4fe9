"""G6 `flatten`: focused linear attention (Han et al. 2023, "FLatten Transformer: Vision Transformer
using Focused Linear Attention"), following the official code
(https://github.com/LeapLabTHU/FLatten-Transformer).

1. u = ReLU(x) + 1e-6, then u / softplus(theta); theta in R^D is learned, initialised to 0.
2. Focusing function f_p(u) = (|u| / |u^p|) u^p with p = 3; the norms run over all D channels,
   before the head split.
3. Per head: O_i = phi(q_i)^T kv z_i with kv = mean_j phi(k_j) v_j^T and
   z_i = 1 / (phi(q_i) . mean_j phi(k_j) + 1e-6) (the official mean form; O(N) by default).
4. Rank restoration (`dwc=True`): O += DWConv_kxk(V) over the h x w grid, one depthwise kernel of d
   channels shared by all heads, with bias. Prefix tokens ([CLS], registers) get no DWC term.
5. `k_pos=True`: a learned position embedding (zeros at init, sized to the input length) added to K.

`flatten` is the grid-free (Tier G) variant: no DWC and no K position embedding, since the first
needs the raster grid and the second a fixed token count (both break under token reduction).
`flatten_grid` is the original form with both (capability needs_grid).

Sizes (R2): the means over keys become size-weighted means, sum_j s_j (.) / sum_j s_j, s_j = exp(beta_j).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from vitjax.attention import registry
from vitjax.attention.base import Attention, Capabilities, kernel_macs, key_weights



def focused_feature(x, scale_param, p: int):
  """[B,N,D] -> phi(x) [B,N,D] float32: ReLU, learned scale, then the norm-preserving power."""
  u = jax.nn.relu(x.astype(jnp.float32)) + 1e-6
  u = u / jax.nn.softplus(scale_param.astype(jnp.float32))
  up = u ** p
  norm_u = jnp.linalg.norm(u, axis=-1, keepdims=True)
  return up * (norm_u / jnp.linalg.norm(up, axis=-1, keepdims=True))


def mean_weights(kw, n: int, batch: int):
  """Key weights of a (size-weighted) mean over keys: [B,M], summing to 1 per example."""
  if kw is None:
    return jnp.full((batch, n), 1.0 / n, jnp.float32)
  return kw / kw.sum(axis=-1, keepdims=True)


class DepthwiseConv(nn.Module):
  """k x k depthwise conv over the grid, one kernel of d channels shared by the heads."""
  kernel_size: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, v, grid):
    b, n, h, d = v.shape
    img = v.transpose(0, 2, 1, 3).reshape(b * h, grid[0], grid[1], d)
    out = nn.Conv(d, (self.kernel_size, self.kernel_size), padding="SAME",
                  feature_group_count=d, dtype=self.dtype, name="conv")(img)
    return out.reshape(b, h, n, d).transpose(0, 2, 1, 3)


def flatten_macs(n, width, num_heads, *, dwc, kernel_size, num_prefix=1, **_):
  """The kernel core with d features + the depthwise k x k conv on the patch tokens (dwc)."""
  conv = (n - num_prefix) * kernel_size ** 2 * width if dwc else 0
  return kernel_macs(n, width, num_heads) + conv


@registry.register("flatten", caps=Capabilities(cls_probs="exact"), impls=("reference", "xla"),
                   paper="FLatten Transformer: focused linear attention (Han et al. 2023)",
                   official="https://github.com/LeapLabTHU/FLatten-Transformer",
                   complexity="O(N d D)", macs=flatten_macs)
class FLattenAttention(Attention):
  """Focused linear attention; this name is the grid-free variant (see `flatten_grid`)."""
  focusing_factor: int = 3
  kernel_size: int = 5
  dwc: bool = False
  k_pos: bool = False
  materialise: bool = False

  def check(self, ctx):
    if (self.dwc or self.k_pos) and not self.caps.needs_grid:
      raise ValueError("flatten with dwc=True or k_pos=True needs the token grid: use the "
                       "attention name 'flatten_grid' (not valid after token reduction)")
    if self.dwc and (ctx is None or ctx.grid is None):
      raise ValueError("flatten_grid's DWC term needs ctx.grid (tokens in raster order)")

  def features(self, q, k):
    b, n, h, d = q.shape
    theta = self.param("scale", nn.initializers.zeros, (h * d,))
    kf = k.reshape(b, n, h * d)
    if self.k_pos:
      kf = kf + self.param("k_pos", nn.initializers.zeros, (1, n, h * d)).astype(kf.dtype)
    fq = focused_feature(q.reshape(b, n, h * d), theta, self.focusing_factor)
    fk = focused_feature(kf, theta, self.focusing_factor)
    return fq.reshape(b, n, h, d), fk.reshape(b, n, h, d)

  def rank_restoration(self, y, v, ctx):
    p = ctx.num_prefix
    conv = DepthwiseConv(self.kernel_size, self.dtype, name="dwc")(v[:, p:], ctx.grid)
    return y.at[:, p:].add(conv.astype(y.dtype))

  def mix(self, x, q, k, v, bias, ctx, *, need, deterministic):
    self.check(ctx)
    fq, fk = self.features(q, k)
    kw = mean_weights(key_weights(bias), x.shape[1], x.shape[0])
    y, aux = self.attend_kernel(fq, fk, v, kw, ctx, eps=1e-6, need=need,
                                deterministic=deterministic, keys=k, materialise=self.materialise)
    if self.dwc:
      y = self.rank_restoration(y, v, ctx)
    return y, aux


@registry.register("flatten_grid", like="flatten",
                   caps=Capabilities(cls_probs="exact", needs_grid=True),
                   complexity="O(N d D) + k^2 N D")
class FLattenGridAttention(FLattenAttention):
  """The original FLatten: + DWC rank restoration over the grid and a K position embedding."""
  dwc: bool = True
  k_pos: bool = True
