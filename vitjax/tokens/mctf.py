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
from vitjax.tokens.base import (BEFORE_ATTENTION, OWN_BLOCK, Layout, Plan, Reducer, TokenState,
                                take_tokens)

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
  m = jax.lax.stop_gradient(x.astype(jnp.float32))
  m = m / jnp.linalg.norm(m, axis=-1, keepdims=True)
  a, b = m[:, ::2], m[:, 1::2]
  scores = jnp.einsum("bid,bjd->bij", a, b)
  scores = ((scores + 1) / 2) ** (1.0 / tau_sim) if tau_sim else jnp.ones_like(scores)
  if tau_info:
    scores = scores * criterion(1.0 / attn.mean(axis=(1, 2)), tau_info)
  scores = scores * criterion(1.0 / size, tau_size)
  rows = jnp.arange(a.shape[1]) * 2 < num_prefix
  return jnp.where(rows[None, :, None], -jnp.inf, scores)


def best_first(scores, r: int):
  """Greedy step of the matching: rows sorted by their best score -> (src, rest, partner)."""
  node_max, node_idx = scores.max(-1), scores.argmax(-1)
  order = jnp.argsort(-node_max, axis=-1, stable=True)
  src = order[:, :r]
  return src, order[:, r:], jnp.take_along_axis(node_idx, src, axis=1)


def match(scores, r: int, bidirection: bool):
  """A -> B for r1 = r//2 (r if one-directional), then B -> unmerged A for the rest."""
  r1 = r // 2 if bidirection else r
  src, unm, dst = best_first(scores, r1)
  unm = jnp.sort(unm, axis=-1)  # keeps [CLS] first
  if not bidirection:
    return (unm, src, dst), None
  back = jnp.take_along_axis(scores, unm[:, :, None], axis=1).transpose(0, 2, 1)  # [B, nB, nU]
  src2, unm2, dst2 = best_first(back, r - r1)  # reference keeps unm2 in score order
  return (unm, src, dst), (unm2, src2, dst2)


def scatter_sum(base, moved, dst):
  """base [B, n, ...] + sum of moved [B, r, ...] into rows dst [B, r] (one-hot contraction)."""
  if moved.shape[1] == 0:  # r = 1 leaves the A -> B step of the bidirectional matching empty
    return base
  onehot = jax.nn.one_hot(dst, base.shape[1], dtype=moved.dtype)
  flat = moved.reshape(*moved.shape[:2], -1)
  return base + jnp.einsum("brn,brf->bnf", onehot, flat).reshape(base.shape)


def merge_sum(t, step1, step2):
  """Sums merged groups: [B, T, ...] -> [B, T - r, ...] in the reference's output order."""
  unm, src, dst = step1
  a, b = t[:, ::2], t[:, 1::2]
  b = scatter_sum(b, take_tokens(a, src), dst)
  kept_a = take_tokens(a, unm)
  if step2 is None:
    return jnp.concatenate([kept_a, b], axis=1)
  unm2, src2, dst2 = step2
  kept_a = scatter_sum(kept_a, take_tokens(b, src2), dst2)
  return jnp.concatenate([kept_a, take_tokens(b, unm2)], axis=1)


def merge_mean(t, w, step1, step2):
  """sum(w t) / sum(w) per merged group, accumulated in fp32; tokens that take part in no merge
  pass through bit-exactly."""
  wt = w.reshape(w.shape + (1,) * (t.ndim - 2)).astype(jnp.float32)
  num = merge_sum(t.astype(jnp.float32) * wt, step1, step2)
  count = merge_sum(jnp.ones(t.shape[:2] + (1,) * (t.ndim - 2), jnp.float32), step1, step2)
  mean = (num / merge_sum(wt, step1, step2)).astype(t.dtype)
  return jnp.where(count > 1, mean, merge_sum(t, step1, step2))


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

  def __call__(self, x, state, aux, *, deterministic=True):
    attn = jax.lax.stop_gradient(aux["attn"].astype(jnp.float32))  # no gradient in the reference
    size = state.size
    scores = pair_scores(x, attn, size, tau_sim=self.tau_sim, tau_info=self.tau_info,
                         tau_size=self.tau_size, num_prefix=self.num_prefix)
    step1, step2 = match(scores, self.r, self.bidirection)
    if self.pooling == "attn":
      w = jax.lax.stop_gradient(attn.mean(axis=(1, 2))) * size / size.max(-1, keepdims=True)
    else:
      w = size
    x = merge_mean(x, w, step1, step2)
    return x, self.merge_state(state, step1, step2)

  @staticmethod
  def merge_state(state: TokenState, step1, step2) -> TokenState:
    def summed(t):
      return None if t is None else merge_sum(t, step1, step2)
    pos = None
    if state.pos is not None:
      pos = merge_mean(jnp.nan_to_num(state.pos), state.size, step1, step2)
      pos = pos.at[:, 0].set(jnp.nan)  # [CLS] stays first
    valid = None
    if state.valid is not None:
      valid = merge_sum(state.valid.astype(jnp.float32), step1, step2) > 0
    index = None
    if state.index is not None:  # a token that absorbed others is a new one
      alone = merge_sum(jnp.ones(state.size.shape, jnp.int32), step1, step2) == 1
      index = jnp.where(alone, merge_sum(state.index, step1, step2), -1)
    return TokenState(size=summed(state.size), source=summed(state.source), pos=pos,
                      valid=valid, index=index)
