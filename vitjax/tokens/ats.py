"""T5 `ats`: Adaptive Token Sampling (Fayyaz et al., ECCV 2022), as in the Haurum benchmark.

In the blocks at `locations`, after the attention: significance S_j = sum_h P_h[cls, j] * |v_hj|
over the non-prefix tokens, normalised to sum 1; its cumulative sum (token order) is the CDF. K
evenly spaced quantiles (k + 1/2) / K each pick the token whose CDF bin contains them; duplicates
collapse, so at most K distinct tokens (plus the prefix) survive. Only the picked query rows matter
from this block on, which equals gathering the post-attention tokens (an after-attention reducer).

Static shapes (own design): the output always has prefix + K slots, in token order; slots left
over by duplicates carry `valid=False` and later attention layers mask them as keys (the ViT
passes `state.valid` to the attention context). `mode="mask"` keeps all N tokens and only marks
the unpicked ones invalid (same semantics, full compute; the oracle for the gather mode).
Deviations: the benchmark code builds its K-1 steps with torch.arange (float endpoint), maps each
step to the token of nearest CDF value (which can pick zero-significance tokens) and shifts the
CDF of invalid tokens by 0.1; we take exactly K midpoints and the proper inverse CDF (the official
ATS also starts its quantiles at the first non-zero CDF value), so empty bins are never sampled.
"""
import jax
import jax.numpy as jnp

from vitjax.tokens import registry
from vitjax.tokens.base import (DEFAULT_LOCATIONS, SCORE_NORMS, Layout, Plan, Reducer, at_blocks,
                                cumulative_counts, keep_prefix_and, normalize_row, score_norm_at,
                                take_state, take_tokens)

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


@registry.register("ats", paper="ATS: Adaptive Token Sampling for Efficient Vision Transformers "
                                "(Fayyaz et al., ECCV 2022)")
class ATS(Reducer):
  """Samples at most `samples` tokens by the inverse CDF of their significance."""
  samples: int = 1
  mode: str = "gather"
  score_norm: str = "none"

  needs = ("cls_probs_per_head", "value_norm")
  needs_cls = True
  options = {"keep_rate": None, "samples": None, "locations": DEFAULT_LOCATIONS, "mode": "gather",
             "score_norm": None}
  choices = {"mode": MODES, "score_norm": (None,) + SCORE_NORMS}

  @classmethod
  def plan(cls, options, layout: Layout) -> Plan:
    opts = cls.parse(options, layout)
    locations = opts["locations"]
    if (opts["keep_rate"] is None) == (opts["samples"] is None):
      raise ValueError("token reducer 'ats' needs exactly one of keep_rate (K_s = int(kr**s * "
                       "patches)) or samples (one K per location)")
    if opts["samples"] is not None:
      counts = [int(k) for k in opts["samples"]]
      if len(counts) != len(locations) or min(counts) < 1:
        raise ValueError(f"token reducer 'ats': samples {counts} must give one K >= 1 for each "
                         f"of the {len(locations)} locations")
    else:
      counts = cumulative_counts("ats", opts["keep_rate"], locations, layout.num_patches)[1]
    blocks, slots = {}, layout.num_patches
    for loc, k in zip(locations, counts):
      blocks[loc] = dict(samples=min(k, slots), mode=opts["mode"],
                         score_norm=score_norm_at(layout, loc, opts["score_norm"]))
      slots = min(k, slots) if opts["mode"] == "gather" else slots
    return Plan(at_blocks(layout.depth, blocks))

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
    full = keep_prefix_and(idx, p)
    new_state = take_state(state, full)
    slot_valid = jnp.take_along_axis(picked, idx, axis=1)
    new_state = new_state.replace(valid=jnp.concatenate([prefix_valid, slot_valid], axis=1))
    return take_tokens(x, full), new_state
