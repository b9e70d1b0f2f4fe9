"""T5 `ats`: Adaptive Token Sampling (Fayyaz et al., ECCV 2022), as in the Haurum benchmark.

In the blocks at `locations`, after the attention: significance S_j = sum_h P_h[cls, j] * |v_hj|
over the non-prefix tokens, normalised to sum 1; its cumulative sum (token order) is the CDF. K
evenly spaced quantiles (k + 1/2) / K each pick the token whose CDF bin contains them; duplicates
collapse, so at most K distinct tokens (plus the prefix) survive. Only the picked query rows matter
from this block on, which equals gathering the post-attention tokens (the `mid` slot).

Static shapes (own design): the output always has prefix + K slots, in token order; slots left
over by duplicates carry `valid=False` and later attention layers mask them as keys (the ViT
passes `state.valid` to the attention context). `mode="mask"` keeps all N tokens and only marks
the unpicked ones invalid (same semantics, full compute; the oracle for the gather mode).
Deviations: the benchmark code builds its K-1 steps with torch.arange (float endpoint), maps each
step to the token of nearest CDF value (which can pick zero-significance tokens) and shifts the
CDF of invalid tokens by 0.1; we take exactly K midpoints and the proper inverse CDF (the official
ATS also starts its quantiles at the first non-zero CDF value), so empty bins are never sampled.
"""
from typing import ClassVar

import jax
import jax.numpy as jnp

from vitjax.tokens import registry
from vitjax.tokens.base import Reducer, take_state, take_tokens
from vitjax.tokens.evit import (DEFAULT_LOCATIONS, SCORE_NORMS, check_locations, check_options,
                                normalize_row)
from vitjax.tokens.topk import topk_counts

MODES = ("gather", "mask")
EPS = 1e-6


def significance(aux: dict, num_prefix: int, valid=None, score_norm: str = "none"):
  """[B, n] significance of the non-prefix tokens, normalised to sum 1 (0 for invalid ones)."""
  probs = normalize_row(aux["cls_probs_per_head"].astype(jnp.float32), score_norm)
  score = (probs * aux["value_norm"].astype(jnp.float32)).sum(axis=1)[:, num_prefix:]
  if valid is not None:
    score = jnp.where(valid[:, num_prefix:], score, 0.0)
  return score / jnp.maximum(score.sum(-1, keepdims=True), 1e-30)


def sample(score, samples: int):
  """Inverse-transform sampling -> [B, n] bool: the tokens picked by at least one quantile.

  Quantile q picks the first token with CDF >= q, i.e. the token whose CDF bin contains q, so a
  token of zero significance (an empty bin, e.g. an invalid slot) is never picked.
  """
  cdf = jnp.cumsum(score, axis=-1)
  steps = (jnp.arange(samples, dtype=jnp.float32) + 0.5) / samples
  below = (cdf[:, None, :] < steps[None, :, None] * cdf[:, -1:, None]).sum(-1)  # [B, K]
  picked = jnp.minimum(below, score.shape[1] - 1)
  return jax.nn.one_hot(picked, score.shape[1], dtype=jnp.float32).max(axis=1) > 0


@registry.register("ats", needs=("cls_probs_per_head", "value_norm"), slot="mid", needs_cls=True,
                   paper="ATS: Adaptive Token Sampling for Efficient Vision Transformers "
                         "(Fayyaz et al., ECCV 2022)")
class ATS(Reducer):
  """Samples at most `samples` tokens by the inverse CDF of their significance."""
  samples: int = 1
  mode: str = "gather"
  score_norm: str = "none"

  reads_cls_score_norm: ClassVar[bool] = True
  options: ClassVar[tuple] = ("keep_rate", "samples", "locations", "mode", "score_norm")

  @classmethod
  def plan(cls, options, *, depth, num_patches, num_prefix):
    check_options("ats", options, cls.options)
    locations = check_locations("ats", options.get("locations", DEFAULT_LOCATIONS), depth)
    if ("keep_rate" in options) == ("samples" in options):
      raise ValueError("ats needs exactly one of keep_rate (K_s = int(kr**s * patches)) or "
                       "samples (one K per location)")
    if "samples" in options:
      counts = [int(k) for k in options["samples"]]
      if len(counts) != len(locations):
        raise ValueError(f"ats.samples has {len(counts)} entries for {len(locations)} locations")
    else:
      counts = topk_counts(options["keep_rate"], num_patches, locations)
    mode = options.get("mode", "gather")
    if mode not in MODES:
      raise ValueError(f"ats.mode must be one of {MODES}, got {mode!r}")
    extra = {"score_norm": options["score_norm"]} if "score_norm" in options else {}
    if extra.get("score_norm", "none") not in SCORE_NORMS:
      raise ValueError(f"ats.score_norm must be one of {SCORE_NORMS}")
    plan, slots = [None] * depth, num_patches
    for loc, k in zip(locations, counts):
      if not 1 <= k:
        raise ValueError(f"ats samples {k} tokens at block {loc}; it needs at least 1")
      plan[loc] = dict(samples=min(k, slots), mode=mode, **extra)
      slots = min(k, slots) if mode == "gather" else slots
    return plan

  def __call__(self, x, state, aux, *, deterministic=True):
    p = self.num_prefix
    valid = state.valid
    score = significance(aux, p, valid, self.score_norm)
    picked = sample(score, self.samples)
    prefix_valid = jnp.ones((x.shape[0], p), bool) if valid is None else valid[:, :p]
    if self.mode == "mask":
      new_valid = jnp.concatenate([prefix_valid, picked], axis=1)
      return x, state.replace(valid=new_valid)
    n = picked.shape[1]
    rank = jnp.where(picked, 0, n) + jnp.arange(n)  # picked tokens first, each group in order
    idx = jnp.argsort(rank, axis=-1)[:, :self.samples]
    prefix = jnp.broadcast_to(jnp.arange(p), (x.shape[0], p))
    full = jnp.concatenate([prefix, idx + p], axis=1)
    new_state = take_state(state, full)
    slot_valid = jnp.take_along_axis(picked, idx, axis=1)
    new_state = new_state.replace(valid=jnp.concatenate([prefix_valid, slot_valid], axis=1))
    return take_tokens(x, full), new_state
