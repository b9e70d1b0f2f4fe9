"""T3 `tome`: Token Merging by bipartite soft matching (Bolya et al., ICLR 2023).

In every block, after the attention residual: split the tokens by parity (A = even, B = odd),
match each A token to its most similar B token (cosine of the head-mean keys), merge the r best
matched A tokens into their B partners (size-weighted average) and keep the others. Prefix tokens
are never merged. `prop_attn=True` (the official default; False switches it off) adds log(size)
to the attention logits of every later block.
"""
import jax
import jax.numpy as jnp
import numpy as np

from vitjax.tokens import registry
from vitjax.tokens.base import (DEFAULT_LOCATIONS, Layout, Plan, Reducer, TokenState, per_location,
                                take_tokens)

METRICS = ("keys", "x")


def parse_r(num_layers: int, r, inflect: float = 0.0) -> list:
  """ToMe's r schedule: an int (constant, or with an inflection) or an explicit list (0-padded).

  inflect -1 is the paper's "decreasing" schedule, from about 2r down to 0.
  """
  if isinstance(r, (list, tuple)):
    r = [int(v) for v in r]
    if len(r) > num_layers:
      raise ValueError(f"tome.r lists {len(r)} values for {num_layers} blocks")
    return r + [0] * (num_layers - len(r))
  lo = int(r * (1.0 - inflect))
  hi = 2 * r - lo
  step = (hi - lo) / (num_layers - 1) if num_layers > 1 else 0.0
  return [int(lo + step * i) for i in range(num_layers)]


def merge_counts(rs, num_tokens: int, num_prefix: int) -> list:
  """The r actually merged in each block: min(r_l, (t - p) // 2), with t the current count."""
  t, out = num_tokens, []
  for r in rs:
    r = max(0, min(int(r), (t - num_prefix) // 2))
    out.append(r)
    t -= r
  return out


def haurum_rs(keep_rate, locations, num_patches: int) -> list:
  """Benchmark variant: r_s = n_{s-1} - int(num_patches * kr**s), from the target counts."""
  kr = per_location("tome", keep_rate, tuple(locations))
  ratios = kr if isinstance(keep_rate, (list, tuple)) else [kr[0] ** (s + 1) for s in
                                                            range(len(kr))]
  targets = [int(r * num_patches) for r in ratios]
  prev = [num_patches] + targets[:-1]
  return [p - t for p, t in zip(prev, targets)]


def output_order(num_unm: int, num_b: int, num_prefix: int) -> np.ndarray:
  """Static permutation of [unm ; dst] that puts the prefix back in front, in its order."""
  prefix = [(p // 2) if p % 2 == 0 else num_unm + p // 2 for p in range(num_prefix)]
  n_pa, n_pb = (num_prefix + 1) // 2, num_prefix // 2
  rest = list(range(n_pa, num_unm)) + list(range(num_unm + n_pb, num_unm + num_b))
  return np.asarray(prefix + rest, np.int32)


def match(metric, r: int, num_prefix: int):
  """Bipartite soft matching under stop-gradient -> (unm [B,nA-r], src [B,r], dst [B,r]).

  unm indexes A (sorted, so the prefix stays first), src indexes A, dst indexes B.
  """
  metric = jax.lax.stop_gradient(metric.astype(jnp.float32))
  metric = metric / jnp.linalg.norm(metric, axis=-1, keepdims=True)
  a, b = metric[:, ::2], metric[:, 1::2]
  scores = jnp.einsum("bid,bjd->bij", a, b)
  rows = jnp.arange(a.shape[1]) * 2 < num_prefix      # protected A tokens
  cols = jnp.arange(b.shape[1]) * 2 + 1 < num_prefix  # protected B tokens (distillation token)
  scores = jnp.where(rows[None, :, None] | cols[None, None, :], -jnp.inf, scores)
  node_max, node_idx = scores.max(-1), scores.argmax(-1)
  order = jnp.argsort(-node_max, axis=-1, stable=True)
  src, unm = order[:, :r], jnp.sort(order[:, r:], axis=-1)
  dst = jnp.take_along_axis(node_idx, src, axis=1)
  return unm, src, dst


def merge_sum(t, unm, src, dst, num_prefix: int):
  """Sums each merged A entry into its B partner: [B,T,...] -> [B,T-r,...], prefix first.

  One one-hot contraction (deterministic) instead of a scatter loop over sources.
  """
  a, b = t[:, ::2], t[:, 1::2]
  moved = take_tokens(a, src)
  onehot = jax.nn.one_hot(dst, b.shape[1], dtype=moved.dtype)          # [B, r, nB]
  flat = moved.reshape(*moved.shape[:2], -1)
  b = b + jnp.einsum("brn,brf->bnf", onehot, flat).reshape(b.shape)
  out = jnp.concatenate([take_tokens(a, unm), b], axis=1)
  return out[:, output_order(unm.shape[1], b.shape[1], num_prefix)]


def merge_weighted(t, weight, unm, src, dst, num_prefix: int):
  """Weighted mean of each merged group, sum(w * t) / sum(w), with weight [B, T].

  Tokens that take part in no merge pass through bit-exactly (no w * t / w round trip).
  """
  w = weight.reshape(weight.shape + (1,) * (t.ndim - 2)).astype(jnp.float32)
  a, b = t[:, ::2], t[:, 1::2]
  wa, wb = w[:, ::2], w[:, 1::2]
  onehot = jax.nn.one_hot(dst, b.shape[1], dtype=jnp.float32)         # [B, r, nB]

  def gathered(v):  # sum of the moved A entries per B token
    moved = take_tokens(v, src)
    flat = moved.reshape(*moved.shape[:2], -1)
    return jnp.einsum("brn,brf->bnf", onehot, flat).reshape(v.shape[:1] + (b.shape[1],) +
                                                            v.shape[2:])
  den = wb + gathered(wa)
  merged = (wb * b.astype(jnp.float32) + gathered(wa * a.astype(jnp.float32))) / den
  touched = onehot.sum(1).reshape(b.shape[:2] + (1,) * (t.ndim - 2)) > 0
  b = jnp.where(touched, merged.astype(t.dtype), b)
  out = jnp.concatenate([take_tokens(a, unm), b], axis=1)
  return out[:, output_order(unm.shape[1], b.shape[1], num_prefix)]


def merge_state(state: TokenState, unm, src, dst, num_prefix: int) -> TokenState:
  """Sizes and sources add up; pos is the size-weighted mean; valid is kept from the B side."""
  def summed(t):
    return None if t is None else merge_sum(t, unm, src, dst, num_prefix)
  pos = None
  if state.pos is not None:
    pos = merge_weighted(jnp.nan_to_num(state.pos), state.size, unm, src, dst, num_prefix)
    is_prefix = jnp.arange(pos.shape[1]) < num_prefix
    pos = jnp.where(is_prefix[None, :, None], jnp.nan, pos)
  valid = None
  if state.valid is not None:
    valid = merge_sum(state.valid.astype(jnp.float32), unm, src, dst, num_prefix) > 0
  index = None
  if state.index is not None:  # a token that absorbed others is a new one
    alone = merge_sum(jnp.ones(state.size.shape, jnp.int32), unm, src, dst, num_prefix) == 1
    index = jnp.where(alone, merge_sum(state.index, unm, src, dst, num_prefix), -1)
  return TokenState(size=summed(state.size), source=summed(state.source), pos=pos, valid=valid,
                    index=index)


@registry.register("tome", paper="ToMe: Token Merging: Your ViT but Faster (Bolya et al., ICLR 2023)",
                   official="https://github.com/facebookresearch/ToMe (tome/merge.py, "
                            "tome/patch/timm.py)")
class ToMe(Reducer):
  """Merges `r` tokens into their most similar partners (size-weighted average)."""
  r: int = 0
  metric: str = "keys"   # "keys": head-mean keys of this block; "x": the tokens themselves

  needs = ("key_metric",)
  # prop_attn: the official `apply_patch(model, prop_attn=True)` default
  options = {"r": None, "inflect": 0.0, "metric": "keys", "keep_rate": None, "locations": None,
             "prop_attn": True}
  choices = {"metric": METRICS}

  @classmethod
  def plan(cls, options, layout: Layout) -> Plan:
    opts = cls.parse(options, layout)
    depth, num_patches = layout.depth, layout.num_patches
    if opts["keep_rate"] is not None:
      if opts["r"] is not None:
        raise ValueError("token reducer 'tome' takes either r (per block) or keep_rate "
                         "(+ locations), not both")
      locations = opts["locations"] or DEFAULT_LOCATIONS
      rs = [0] * depth
      for loc, r in zip(locations, haurum_rs(opts["keep_rate"], locations, num_patches)):
        rs[loc] = r
    else:
      if opts["locations"] is not None:
        raise ValueError("token reducer 'tome': locations goes with keep_rate; with r, ToMe "
                         "merges in every block")
      rs = parse_r(depth, opts["r"] or 0, float(opts["inflect"]))
    rs = merge_counts(rs, layout.num_prefix + num_patches, layout.num_prefix)
    return Plan(tuple(dict(r=r, metric=opts["metric"]) if r > 0 else None for r in rs),
                prop_attn=bool(opts["prop_attn"]))

  def __call__(self, x, state, aux, *, deterministic=True):
    metric = x if self.metric == "x" else aux["key_metric"]
    unm, src, dst = match(metric, self.r, self.num_prefix)
    x = merge_weighted(x, state.size, unm, src, dst, self.num_prefix)
    return x, merge_state(state, unm, src, dst, self.num_prefix)
