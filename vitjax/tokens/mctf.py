"""T13 `mctf`: Multi-Criteria Token Fusion with one-step-ahead attention (Lee et al., CVPR 2024).

Before the attention of each active block (1..depth-1), the block's own attention on the current
tokens (one step ahead) scores bipartite pairs (A = even, B = odd positions of the tokens x) by
  similarity    W_sim  = ((cos(x_a, x_b) + 1) / 2) ** (1 / tau_sim)
  informativeness W_info = (iota_a * iota_b) ** (1 / tau_info),  iota = 1 / mean attention received
  size          W_size = (sigma_a * sigma_b) ** (1 / tau_size),  sigma = 1 / size
(each normalised by its max; a tau of 0 switches that criterion off, as in mlvlab/MCTF), then
merges r tokens: floor(r/2) A -> B, then the rest from B into the unmerged A tokens
(bidirectional). Fused token = sum(w x) / sum(w) with w = attention received * size / max size.

Deviation: the reference's default (one_step_ahead=1) runs the block on the merged attention map
A' (rows/columns pooled) with V of the merged tokens; our attention modules take no external
weights, so the block recomputes its attention on the merged tokens instead. That is the
reference's "precise" mode (one_step_ahead=2): a before-attention reducer that reads its own
block's attention (`reads = OWN_BLOCK`).
"""
import jax
import jax.numpy as jnp

from vitjax.tokens import registry
from vitjax.tokens.base import (BEFORE_ATTENTION, OWN_BLOCK, Groups, Layout, Plan, Reducer,
                                bipartite_groups, bipartite_similarity, greedy_match, group_mean,
                                merge_state, then)

POOLINGS = ("attn", "size")


def mctf_counts(r: int, locations, depth: int, num_tokens: int, num_prefix: int) -> list:
  """Per block: merged r (0 if inactive). r' = t - 10 when t - r < 10, then min(r', (t-p)//2)."""
  t, out = num_tokens, [0] * depth
  for loc in locations:
    rr = int(r)
    if t - rr < 10:
      rr = t - 10
    rr = max(0, min(rr, (t - num_prefix) // 2))
    out[loc] = rr
    t -= rr
  return out


def criterion(values, tau: float):
  """(v_a v_b) ** (1/tau) for the bipartite pairs of a [B, T] vector, max-normalised; 1 if off."""
  if not tau:
    return 1.0
  v = values / values.max(-1, keepdims=True)
  return (v[:, ::2, None] * v[:, None, 1::2]) ** (1.0 / tau)


def pair_scores(x, attn, size, *, tau_sim, tau_info, tau_size, num_prefix: int):
  """[B, nA, nB] multi-criteria scores under stop-gradient; protected A rows are -inf."""
  scores = bipartite_similarity(x)
  scores = ((scores + 1) / 2) ** (1.0 / tau_sim) if tau_sim else jnp.ones_like(scores)
  if tau_info:
    scores = scores * criterion(1.0 / attn.mean(axis=(1, 2)), tau_info)
  scores = scores * criterion(1.0 / size, tau_size)
  rows = jnp.arange(scores.shape[1]) * 2 < num_prefix
  return jnp.where(rows[None, :, None], -jnp.inf, scores)


def match(scores, r: int, bidirection: bool) -> Groups:
  """A -> B for r1 = r//2 (r if one-directional), then B -> unmerged A for the rest."""
  r1 = r // 2 if bidirection else r
  src, unm, dst = greedy_match(scores, r1)
  unm = jnp.sort(unm, axis=-1)  # keeps [CLS] first
  groups = bipartite_groups(sum(scores.shape[1:]), unm, src, dst)  # [kept A ; B]
  if not bidirection:
    return groups
  back = jnp.take_along_axis(scores, unm[:, :, None], axis=1).transpose(0, 2, 1)  # [B, nB, nU]
  src2, unm2, dst2 = greedy_match(back, r - r1)  # reference keeps unm2 in score order
  nu = unm.shape[1]
  kept_a = jnp.broadcast_to(jnp.arange(nu, dtype=jnp.int32), unm.shape)
  second = Groups(jnp.concatenate([kept_a, nu + unm2.astype(jnp.int32)], axis=1),
                  nu + src2.astype(jnp.int32), dst2.astype(jnp.int32))
  return then(groups, second)  # [kept A ; unmerged B]


@registry.register("mctf", paper="MCTF: Multi-criteria Token Fusion with One-step-ahead Attention "
                                 "(Lee et al., CVPR 2024)",
                   official="https://github.com/mlvlab/MCTF")
class MCTF(Reducer):
  """Merges `r` tokens by similarity, informativeness and size before the block's attention."""
  r: int = 0
  tau_sim: float = 1.0
  tau_info: float = 20.0
  tau_size: float = 40.0
  bidirection: bool = True
  pooling: str = "attn"   # "attn": weights = attention received x size (type 1); "size" (type 0)

  needs = ("attn",)
  hook = BEFORE_ATTENTION
  reads = OWN_BLOCK
  needs_cls = True
  # locations None: blocks 1..depth-1; prop_attn on, as in the official run scripts
  options = {"r": 16, "locations": None, "tau_sim": 1.0, "tau_info": 20.0, "tau_size": 40.0,
             "bidirection": True, "pooling": "attn", "prop_attn": True}
  choices = {"pooling": POOLINGS}

  @classmethod
  def plan(cls, options, layout: Layout) -> Plan:
    opts = cls.parse(options, layout)
    if layout.num_prefix != 1:
      raise ValueError("token reducer 'mctf' supports a [CLS]-only prefix (no distillation token "
                       "or registers), as the reference")
    locations = opts.pop("locations") or tuple(range(1, layout.depth))
    if locations and locations[0] == 0:
      raise ValueError("token reducer 'mctf' cannot act at block 0 (the reference activates "
                       "blocks 1..depth-1)")
    rs = mctf_counts(opts.pop("r"), locations, layout.depth,
                     layout.num_prefix + layout.num_patches, layout.num_prefix)
    prop_attn = bool(opts.pop("prop_attn"))
    return Plan(tuple(dict(r=r, **opts) if r > 0 else None for r in rs), prop_attn=prop_attn)

  @classmethod
  def macs(cls, n: int, width: int, *, r: int, num_heads: int = 1, **kwargs) -> int:
    """Similarity nA nB width, the attention each token receives (one accumulate per attention
    weight, num_heads n^2) and the merge's one-hot contraction, r (n - r) width."""
    del kwargs
    return (n + 1) // 2 * (n // 2) * width + num_heads * n * n + r * (n - r) * width

  def __call__(self, x, state, aux, *, deterministic=True):
    attn = jax.lax.stop_gradient(aux["attn"].astype(jnp.float32))  # no gradient in the reference
    size = state.size
    scores = pair_scores(x, attn, size, tau_sim=self.tau_sim, tau_info=self.tau_info,
                         tau_size=self.tau_size, num_prefix=self.num_prefix)
    groups = match(scores, self.r, self.bidirection)
    if self.pooling == "attn":
      w = jax.lax.stop_gradient(attn.mean(axis=(1, 2))) * size / size.max(-1, keepdims=True)
    else:
      w = size
    return group_mean(x, w, groups), merge_state(state, groups, self.num_prefix)
