"""G12 `mqa`, G13 `gqa`, `kdgqa`, `dgqa`: softmax attention whose query heads share fewer K/V heads.

K and V project D -> G*d. `gqa` (Ainslie et al. 2023) sends query head h to K/V head floor(h*G/H);
`mqa` (Shazeer 2019) is G = 1. The key-driven variants of *Beyond Uniform Query Distribution:
Key-Driven Grouped Query Attention* (Khan et al. 2024) give each K/V head a number of query heads
proportional to the norm of that key head:
  n_g = ||K_g||,  n^_g = (n_g - min n) / (max n - min n)  (min-max scaling, as the paper describes),
  Q_g = n^_g * H / sum_g n^_g, rounded to integers that sum to H (largest remainder; ties to the lower
  index), and query heads are handed out to groups in index order.
`kdgqa` reads the norms of the current forward pass (per example: the paper does not say whether the
norm spans the batch, and a per-example rule keeps one image's output independent of its batch).
`dgqa` reads an exponential moving average of the norms kept in the `batch_stats` collection (updated
when that collection is mutable and the call is not deterministic), so the allocation evolves with
training. Equal norms (e.g. at initialisation) give the uniform split. The allocation is a discrete
choice under stop-gradient; the norms get no gradient through it. With min-max scaling the
weakest group gets no query head, as the paper's rule implies. Unverified details are marked in
the spec as (own knowledge ?).
"""
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from vitjax.attention import registry
from vitjax.attention.base import Attention, AttnContext, Capabilities, SOFTMAX_IMPLS

PAPER = "Key-Driven Grouped Query Attention (Khan et al. 2024); GQA (Ainslie et al. 2023)"


def default_kv_heads(num_heads: int) -> int:
  """Half the heads, rounded down to a divisor of H (1 for H <= 3)."""
  return max([g for g in range(1, num_heads // 2 + 1) if num_heads % g == 0] or [1])


def uniform_groups(num_heads: int, num_groups: int) -> np.ndarray:
  """Static GQA: query head h -> K/V head floor(h*G/H)."""
  return (np.arange(num_heads) * num_groups) // num_heads


def allocate_queries(norms, num_heads: int):
  """Key-norm driven allocation: norms [..., G] -> group index of each query head [..., H]."""
  norms = jax.lax.stop_gradient(norms.astype(jnp.float32))
  lo, hi = norms.min(-1, keepdims=True), norms.max(-1, keepdims=True)
  span = hi - lo
  scaled = jnp.where(span > 0, (norms - lo) / jnp.where(span > 0, span, 1.0), 1.0)
  share = scaled / scaled.sum(-1, keepdims=True) * num_heads
  counts = jnp.floor(share)
  left = num_heads - counts.sum(-1, keepdims=True)
  order = jnp.argsort(-(share - counts), axis=-1, stable=True)
  rank = jnp.argsort(order, axis=-1, stable=True)
  counts = counts + (rank < left)
  bounds = jnp.cumsum(counts, axis=-1)  # [..., G]
  heads = jnp.arange(num_heads, dtype=jnp.float32)
  return (bounds[..., None, :] <= heads[:, None]).sum(-1).astype(jnp.int32)


def key_head_norms(k, ctx: Optional[AttnContext]):
  """||K_g|| per example over tokens and channels, [B, G]; a token of size s counts s times."""
  sq = jnp.sum(jnp.square(k.astype(jnp.float32)), axis=-1)  # [B, N, G]
  if ctx is not None and ctx.size is not None:
    sq = sq * ctx.size[:, :, None].astype(jnp.float32)
  if ctx is not None and ctx.valid is not None:
    sq = sq * ctx.valid[:, :, None]
  return jnp.sqrt(sq.sum(1))


def expand_heads(t, groups):
  """t [B,N,G,d] -> [B,N,H,d]; groups is a static [H] or a per-example [B,H] index."""
  if isinstance(groups, np.ndarray):
    return t[:, :, groups]
  return jnp.take_along_axis(t, groups[:, None, :, None], axis=2)


class GroupedQueryAttention(Attention):
  """Softmax attention with G K/V heads; `allocation` picks how query heads find their group."""
  num_kv_heads: Optional[int] = None
  allocation: str = "uniform"   # uniform | key_norm | key_norm_ema
  ema_decay: float = 0.99       # dgqa; own choice, the paper's smoothing constant is not known

  def groups(self, k, ctx, deterministic):
    g = k.shape[2]
    if self.allocation == "uniform":
      return uniform_groups(self.num_heads, g)
    norms = key_head_norms(k, ctx)
    if self.allocation == "key_norm":
      return allocate_queries(norms, self.num_heads)
    if self.allocation == "key_norm_ema":
      return jnp.broadcast_to(allocate_queries(self.norm_ema(norms, deterministic), self.num_heads),
                              (k.shape[0], self.num_heads))
    raise ValueError(f"unknown allocation {self.allocation!r}; "
                     "valid: uniform, key_norm, key_norm_ema")

  def norm_ema(self, norms, deterministic):
    """dgqa's running key-head norms; absent from the variables (params-only apply): uniform."""
    g = norms.shape[-1]
    if not (self.has_variable("batch_stats", "key_norm_ema")
            or self.is_mutable_collection("batch_stats")):
      return jnp.ones((g,), jnp.float32)
    ema = self.variable("batch_stats", "key_norm_ema", lambda: jnp.ones((g,), jnp.float32))
    if not deterministic and self.is_mutable_collection("batch_stats"):
      batch = jax.lax.stop_gradient(norms.mean(0))
      ema.value = self.ema_decay * ema.value + (1 - self.ema_decay) * batch
    return ema.value

  def kv_heads(self) -> int:
    g = default_kv_heads(self.num_heads) if self.num_kv_heads is None else self.num_kv_heads
    if not 1 <= g <= self.num_heads:
      raise ValueError(f"num_kv_heads must be in 1..{self.num_heads}, got {g}")
    return g

  def project(self, x):
    return self.project_qkv(x, num_kv_heads=self.kv_heads())

  def mix(self, x, q, k, v, bias, ctx, *, need, deterministic):
    # repeated K/V on every path: at ViT lengths there is no K/V cache to save (spec pitfall)
    groups = self.groups(k, ctx, deterministic)
    return self.attend(q, expand_heads(k, groups), expand_heads(v, groups), bias, ctx, need=need,
                       deterministic=deterministic, keys=k)


def gqa_macs(n, width, num_heads, *, num_kv_heads, **_):
  """q and output projections n D^2 each, K/V projections 2 n D G d, Q K^T and P V 2 n^2 D."""
  g = default_kv_heads(num_heads) if num_kv_heads is None else num_kv_heads
  return 2 * n * width * width + 2 * n * width * g * (width // num_heads) + 2 * n * n * width


CAPS = Capabilities()


@registry.register("gqa", caps=CAPS, impls=SOFTMAX_IMPLS, paper=PAPER,
                   complexity="O(N^2 D); K/V params x G/H", macs=gqa_macs)
class GQA(GroupedQueryAttention):
  """Grouped-query attention, static uniform groups (default G: half the heads)."""


@registry.register("mqa", caps=CAPS, impls=SOFTMAX_IMPLS,
                   paper="Multi-query attention (Shazeer 2019); GQA family",
                   complexity="O(N^2 D); K/V params x 1/H", macs=gqa_macs)
class MQA(GroupedQueryAttention):
  """Multi-query attention: every query head shares one K/V head (G = 1)."""
  num_kv_heads: Optional[int] = 1


@registry.register("kdgqa", caps=CAPS, impls=SOFTMAX_IMPLS, paper=PAPER,
                   complexity="O(N^2 D) + O(N D)", macs=gqa_macs)
class KDGQA(GroupedQueryAttention):
  """Key-distributed GQA: query heads allocated from this pass's key-head norms."""
  allocation: str = "key_norm"


@registry.register("dgqa", caps=CAPS, impls=SOFTMAX_IMPLS, paper=PAPER,
                   complexity="O(N^2 D) + O(N D)", macs=gqa_macs)
class DGQA(GroupedQueryAttention):
  """Dynamic key-distributed GQA: query heads allocated from an EMA of key-head norms."""
  allocation: str = "key_norm_ema"
