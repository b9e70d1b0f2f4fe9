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
from typing import ClassVar, Sequence

import jax
import jax.numpy as jnp

from vitjax.tokens import registry
from vitjax.tokens.base import Reducer, TokenState, take_state, take_tokens

SCORE_NORMS = ("none", "row", "abs_row")
DEFAULT_LOCATIONS = (3, 6, 9)


def check_options(name: str, options: dict, valid: Sequence[str]):
  bad = set(options) - set(valid)
  if bad:
    raise ValueError(f"token reducer {name!r} has no option(s) {sorted(bad)}; valid options: "
                     f"{sorted(valid)}")


def check_locations(name: str, locations, depth: int) -> tuple:
  locations = tuple(int(i) for i in locations)
  if list(locations) != sorted(set(locations)):
    raise ValueError(f"{name}.locations must be increasing and distinct, got {locations}")
  for i in locations:
    if not 0 <= i < depth:
      raise ValueError(f"{name}.locations has block {i}; blocks are 0..{depth - 1}")
  return locations


def per_location(name: str, value, locations: tuple) -> list:
  """A keep rate given once, or once per location -> one float per location, each in (0, 1]."""
  rates = list(value) if isinstance(value, (list, tuple)) else [value] * len(locations)
  if len(rates) != len(locations):
    raise ValueError(f"{name}.keep_rate has {len(rates)} entries for {len(locations)} locations")
  for kr in rates:
    if not 0.0 < float(kr) <= 1.0:
      raise ValueError(f"{name}.keep_rate must be in (0, 1], got {kr}")
  return [float(kr) for kr in rates]


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


def normalize_row(row, mode: str):
  """Reads a non-softmax attention row like a softmax one (zoo R4); row [..., N] over all keys."""
  if mode == "none":
    return row
  if mode == "abs_row":
    row = jnp.abs(row)
  elif mode != "row":
    raise ValueError(f"unknown score_norm {mode!r}; valid: {SCORE_NORMS}")
  return row / jnp.maximum(row.sum(-1, keepdims=True), 1e-12)


def cls_scores(aux: dict, num_prefix: int, score_norm: str = "none"):
  """[B, n] float32 scores of the non-prefix tokens: the head-mean [CLS] row minus its prefix."""
  if "cls_probs" not in aux:
    raise ValueError("EViT/Top-K need aux['cls_probs'] from the attention of their block")
  row = normalize_row(aux["cls_probs"].astype(jnp.float32), score_norm)
  return row[:, num_prefix:]


def select(scores, k: int, keep_order: bool):
  """Indices [B, k] of the k best scores: descending score order, or ascending token order."""
  _, idx = jax.lax.top_k(jax.lax.stop_gradient(scores), k)
  return jnp.sort(idx, axis=-1) if keep_order else idx


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
  return TokenState(size=size, source=source, pos=pos, valid=valid)


def concat_states(a: TokenState, b: TokenState) -> TokenState:
  def cat(x, y):
    return None if x is None else jnp.concatenate([x, y.astype(x.dtype)], axis=1)
  return TokenState(size=cat(a.size, b.size), source=cat(a.source, b.source),
                    pos=cat(a.pos, b.pos), valid=cat(a.valid, b.valid))


def reorganize(x, state: TokenState, scores, keep: int, *, num_prefix: int, fuse: bool,
               keep_order: bool = False):
  """Keeps the prefix and the `keep` best-scoring tokens; optionally fuses the rest (EViT)."""
  n = scores.shape[1]
  idx = select(scores, keep, keep_order)
  prefix = jnp.broadcast_to(jnp.arange(num_prefix), (x.shape[0], num_prefix))
  full = jnp.concatenate([prefix, idx + num_prefix], axis=1)
  out, new_state = take_tokens(x, full), take_state(state, full)
  if not fuse:
    return out, new_state
  mask = dropped_mask(idx, n)
  weights = mask * scores  # raw a_j: no division by their sum
  # fp32 accumulation of the masked sum (a "total - kept" difference would cancel in bf16)
  x_f = jnp.einsum("bn,bnd->bd", weights, x[:, num_prefix:].astype(jnp.float32))
  out = jnp.concatenate([out, x_f[:, None].astype(x.dtype)], axis=1)
  return out, concat_states(new_state, fused_state(state, num_prefix, mask, weights))


@registry.register("evit", needs=("cls_probs",), slot="mid", needs_cls=True,
                   paper="EViT: Not All Patches are What You Need (Liang et al., ICLR 2022)")
class EViT(Reducer):
  """Keeps the `keep` most attended tokens and fuses the others into one token."""
  keep: int = 1                # non-prefix tokens kept (static)
  fuse: bool = True
  keep_order: bool = False     # True: kept tokens in token order (needed by causal attention)
  score_norm: str = "none"     # how to read a non-softmax [CLS] row (zoo R4)

  reads_cls_score_norm: ClassVar[bool] = True
  options: ClassVar[tuple] = ("keep_rate", "locations", "fuse", "keep_order", "score_norm")

  @classmethod
  def plan(cls, options, *, depth, num_patches, num_prefix):
    check_options("evit", options, cls.options)
    if "keep_rate" not in options:
      raise ValueError("evit needs keep_rate (in (0, 1]), e.g. tokens=dict(name='evit', "
                       "keep_rate=0.7)")
    locations = check_locations("evit", options.get("locations", DEFAULT_LOCATIONS), depth)
    rates = per_location("evit", options["keep_rate"], locations)
    fuse = bool(options.get("fuse", True))
    extra = {k: options[k] for k in ("keep_order", "score_norm") if k in options}
    if extra.get("score_norm", "none") not in SCORE_NORMS:
      raise ValueError(f"evit.score_norm must be one of {SCORE_NORMS}")
    plan, n = [None] * depth, num_patches
    for loc, kr in zip(locations, rates):
      keep = math.ceil(kr * n)  # the reference expression, on the count including a fused token
      if keep < n:
        plan[loc] = dict(keep=keep, fuse=fuse, **extra)
        n = keep + int(fuse)
    return plan

  def __call__(self, x, state, aux, *, deterministic=True):
    scores = cls_scores(aux, self.num_prefix, self.score_norm)
    return reorganize(x, state, scores, self.keep, num_prefix=self.num_prefix, fuse=self.fuse,
                      keep_order=self.keep_order)
