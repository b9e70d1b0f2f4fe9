"""T1 `evit`: EViT token reorganisation (Liang et al. 2022, "Not All Patches are What You Need").

In the blocks at `locations` (0-indexed, default 3, 6, 9), after the attention residual:
  a_j = mean_h P_h[cls, j] over all keys (CLS included), prefix entries dropped, not renormalised;
  keep the k = ceil(keep_rate * n) highest-scoring non-prefix tokens (n includes an earlier fused
  token), in descending score order (torch.topk(sorted=True) in the official code);
  fuse the rest into one token x_f = sum_{j not kept} a_j x_j, appended last.
Output: [prefix, kept (k), fused]. No gradient flows through the indices; it flows into the
attention probabilities through x_f.
"""
import math
from typing import Sequence

import jax
import jax.numpy as jnp

from vitjax.tokens import registry
from vitjax.tokens.base import (DEFAULT_LOCATIONS, REQUIRED, SCORE_NORMS, Layout, Plan, Reducer,
                                TokenState, at_blocks, cls_scores, keep_prefix_and, per_location,
                                score_norm_at, select, take_state, take_tokens)


def evit_counts(keep_rate, num_patches: int = 196, locations: Sequence[int] = DEFAULT_LOCATIONS,
                fuse: bool = True) -> list:
  """Non-prefix tokens after each location: n_s = ceil(kr * n_{s-1}) + fuse, a no-op if nothing is
  dropped (the reference's `left_tokens == N - 1` early return)."""
  rates = per_location("evit", keep_rate, tuple(locations))
  n, counts = num_patches, []
  for kr in rates:
    keep = math.ceil(kr * n)
    if keep < n:
      n = keep + int(fuse)
    counts.append(n)
  return counts


def dropped_mask(idx, n: int):
  """[B, n] float32: 1 for tokens not in idx, 0 for kept ones (a constant: no index gradient)."""
  kept = jax.nn.one_hot(idx, n, dtype=jnp.float32).sum(axis=1)
  return jax.lax.stop_gradient(1.0 - kept)


def fused_state(state: TokenState, num_prefix: int, mask, weights) -> TokenState:
  """State of the fused token [B, 1, ...]: sizes and sources add up, pos is the a-weighted mean."""
  def image(t):
    return t[:, num_prefix:]
  size = (mask * image(state.size)).sum(1, keepdims=True)
  source = None
  if state.source is not None:
    source = jnp.einsum("bn,bnm->bm", mask, image(state.source))[:, None]
  pos = None
  if state.pos is not None:
    p = jnp.nan_to_num(image(state.pos))
    total = weights.sum(1, keepdims=True)
    mean = jnp.einsum("bn,bnc->bc", weights, p) / jnp.maximum(total, 1e-12)
    pos = jnp.where(total > 0, mean, jnp.nan)[:, None]
  valid = None if state.valid is None else jnp.ones_like(state.valid[:, :1])
  index = None if state.index is None else jnp.full_like(state.index[:, :1], -1)
  return TokenState(size=size, source=source, pos=pos, valid=valid, index=index)


def concat_states(a: TokenState, b: TokenState) -> TokenState:
  def cat(x, y):
    return None if x is None else jnp.concatenate([x, y.astype(x.dtype)], axis=1)
  return TokenState(size=cat(a.size, b.size), source=cat(a.source, b.source),
                    pos=cat(a.pos, b.pos), valid=cat(a.valid, b.valid),
                    index=cat(a.index, b.index))


def reorganize(x, state: TokenState, scores, keep: int, *, num_prefix: int, fuse: bool,
               keep_order: bool = False):
  """Keeps the prefix and the `keep` best-scoring tokens; optionally fuses the rest (EViT)."""
  n = scores.shape[1]
  idx = select(scores, keep, keep_order)
  full = keep_prefix_and(idx, num_prefix)
  out, new_state = take_tokens(x, full), take_state(state, full)
  if not fuse:
    return out, new_state
  mask = dropped_mask(idx, n)
  weights = mask * scores  # raw a_j: no division by their sum
  # fp32 accumulation of the masked sum (a "total - kept" difference would cancel in bf16)
  x_f = jnp.einsum("bn,bnd->bd", weights, x[:, num_prefix:].astype(jnp.float32))
  out = jnp.concatenate([out, x_f[:, None].astype(x.dtype)], axis=1)
  return out, concat_states(new_state, fused_state(state, num_prefix, mask, weights))


@registry.register("evit", paper="EViT: Not All Patches are What You Need (Liang et al., ICLR 2022)",
                   official="https://github.com/youweiliang/evit (evit.py)")
class EViT(Reducer):
  """Keeps the `keep` most attended tokens and fuses the others into one token."""
  keep: int = 1                # non-prefix tokens kept (static)
  fuse: bool = True
  keep_order: bool = False     # True: kept tokens in token order (needed by causal attention)
  score_norm: str = "none"     # how to read a non-softmax [CLS] row (zoo R4)

  needs = ("cls_probs",)
  needs_cls = True
  # warmup: EViT's keep-rate warm-up in training (tokens.schedule.Warmup; its keys and defaults)
  options = {"keep_rate": REQUIRED, "locations": DEFAULT_LOCATIONS, "fuse": True,
             "keep_order": False, "score_norm": None, "warmup": None}
  choices = {"score_norm": (None,) + SCORE_NORMS}

  @classmethod
  def plan(cls, options, layout: Layout) -> Plan:
    opts = cls.parse(options, layout)
    rates = per_location("evit", opts["keep_rate"], opts["locations"])
    blocks, n = {}, layout.num_patches
    for loc, kr in zip(opts["locations"], rates):
      keep = math.ceil(kr * n)  # the reference expression, on the count including a fused token
      if keep < n:
        blocks[loc] = dict(keep=keep, fuse=bool(opts["fuse"]), keep_order=opts["keep_order"],
                           score_norm=score_norm_at(layout, loc, opts["score_norm"]))
        n = keep + int(opts["fuse"])
    return Plan(at_blocks(layout.depth, blocks))

  @classmethod
  def warmup(cls, options, layout: Layout, *, steps_per_epoch: int):
    opts = cls.parse(options, layout)
    if opts["warmup"] is None:
      return None
    from vitjax.tokens import schedule  # pylint: disable=import-outside-toplevel
    return schedule.Warmup.build(cls, opts, layout, steps_per_epoch=steps_per_epoch)

  @classmethod
  def macs(cls, n: int, width: int, *, fuse: bool = True, num_prefix: int = 1, **kwargs) -> int:
    """The fused token, sum_j a_j x_j over the image tokens (the dropped ones weighted)."""
    del kwargs
    return (n - num_prefix) * width if fuse else 0

  def __call__(self, x, state, aux, *, deterministic=True):
    scores = cls_scores(aux, self.num_prefix, self.score_norm)
    return reorganize(x, state, scores, self.keep, num_prefix=self.num_prefix, fuse=self.fuse,
                      keep_order=self.keep_order)
