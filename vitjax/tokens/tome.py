"""T3 `tome`: Token Merging by bipartite soft matching (Bolya et al., ICLR 2023).

In every block, after the attention residual: split the tokens by parity (A = even, B = odd),
match each A token to its most similar B token (cosine of the head-mean keys), merge the r best
matched A tokens into their B partners (size-weighted average) and keep the others. Output
[unmerged A ; B], the unmerged A tokens in the matching's order (descending best score); only
with a prefix are they sorted back into token order, which keeps the prefix first, as the
official code sorts them only with a class token (facebookresearch/ToMe, tome/merge.py,
`bipartite_soft_matching`, L66-68). Prefix tokens are never merged. `prop_attn=True` (the
official `apply_patch` default; False switches it off) adds log(size) to the attention logits of
every later block.
"""
import logging

import jax.numpy as jnp
import numpy as np

from vitjax.tokens import registry
from vitjax.tokens.base import (DEFAULT_LOCATIONS, Groups, Layout, Plan, Reducer,
                                bipartite_groups, bipartite_similarity, greedy_match, group_mean,
                                merge_state, per_location, reorder)

METRICS = ("keys", "x")


def parse_r(num_layers: int, r, inflect: float = 0.0) -> list:
  """ToMe's r schedule: an int (constant, or with an inflection) or an explicit list (0-padded).

  inflect -1 is the paper's "decreasing" schedule, from about 2r down to 0.
  """
  values = list(r) if isinstance(r, (list, tuple)) else [r]
  if any(not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 0 for v in values):
    raise ValueError(f"token reducer 'tome': r must be an int >= 0 (tokens merged per block) or a "
                     f"list of them, got {r!r}")
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
  if min(targets) < 1:
    raise ValueError(f"token reducer 'tome': keep_rate {keep_rate} leaves no token at a location "
                     f"(counts {targets} of {num_patches} patches): use a larger keep_rate")
  prev = [num_patches] + targets[:-1]
  return [p - t for p, t in zip(prev, targets)]


_WARNED = set()


def _adjusted(opts, merged):
  """ToMe merges at most half the tokens of a block (the official code clamps r the same way, and
  the keep-rate variant caps a stage so): merged as far as it goes, with a warning that says
  what was used."""
  asked = f"r={opts['r']}" if opts["keep_rate"] is None else f"keep_rate={opts['keep_rate']}"
  msg = (f"token reducer 'tome': {asked} asks for more merges than the tokens allow (at most "
         f"half of a block's tokens); merging r={tuple(merged)} per block instead")
  if msg not in _WARNED:
    _WARNED.add(msg)
    logging.warning(msg)


def output_order(num_unm: int, num_b: int, num_prefix: int) -> np.ndarray:
  """Static permutation of [unm ; dst] that puts the prefix back in front, in its order."""
  prefix = [(p // 2) if p % 2 == 0 else num_unm + p // 2 for p in range(num_prefix)]
  n_pa, n_pb = (num_prefix + 1) // 2, num_prefix // 2
  rest = list(range(n_pa, num_unm)) + list(range(num_unm + n_pb, num_unm + num_b))
  return np.asarray(prefix + rest, np.int32)


def match(metric, r: int, num_prefix: int) -> Groups:
  """Bipartite soft matching under stop-gradient: the r best matched A tokens merge into their
  B partners. Unmerged A tokens keep the matching's order, sorted back into token order only
  when there is a prefix to keep first (the official `if class_token:` sort)."""
  scores = bipartite_similarity(metric)
  rows = jnp.arange(scores.shape[1]) * 2 < num_prefix      # protected A tokens
  cols = jnp.arange(scores.shape[2]) * 2 + 1 < num_prefix  # protected B tokens (distillation)
  scores = jnp.where(rows[None, :, None] | cols[None, None, :], -jnp.inf, scores)
  src, unm, dst = greedy_match(scores, r)
  if num_prefix:
    unm = jnp.sort(unm, axis=-1)
  groups = bipartite_groups(metric.shape[1], unm, src, dst)
  if not num_prefix:
    return groups
  return reorder(groups, output_order(unm.shape[1], scores.shape[2], num_prefix))


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
    merged = merge_counts(rs, layout.num_prefix + num_patches, layout.num_prefix)
    if merged != list(rs):
      _adjusted(opts, merged)
    rs = merged
    return Plan(tuple(dict(r=r, metric=opts["metric"]) if r > 0 else None for r in rs),
                prop_attn=bool(opts["prop_attn"]))

  @classmethod
  def macs(cls, n: int, width: int, *, r: int, metric: str = "keys", num_heads=None,
           **kwargs) -> int:
    """Similarity of the A to the B tokens, nA nB d (d: the head-mean keys' width, or width with
    metric="x"), and the merge's one-hot contraction, r (n - r) width."""
    del kwargs
    if metric == "keys" and not num_heads:
      raise ValueError("tome's MACs with metric='keys' need num_heads (the keys' width is "
                       "width // num_heads)")
    d = width if metric == "x" else width // num_heads
    return (n + 1) // 2 * (n // 2) * d + r * (n - r) * width

  def __call__(self, x, state, aux, *, deterministic=True):
    metric = x if self.metric == "x" else aux["key_metric"]
    groups = match(metric, self.r, self.num_prefix)
    return group_mean(x, state.size, groups), merge_state(state, groups, self.num_prefix)
