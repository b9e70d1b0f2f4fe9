"""T5 `ats`: Adaptive Token Sampling (Fayyaz et al., ECCV 2022): official code or the benchmark's.

In the blocks at `locations`, after the attention, the non-prefix tokens are scored by their
significance and sampled by the inverse of its CDF; only the picked query rows matter from this
block on, which equals gathering the post-attention tokens (an after-attention reducer).

form="official" (default): the official code (github.com/adaptivetokensampling/ATS,
libs/models/transformers/ats_block.py):
  S_j = (sum_h A_h[cls, j]) * ||v_j||, ||v_j|| the norm of the whole value vector, all heads
  (`score_assignment_step`, L87-113; here ||v_j||^2 = sum_h |v_hj|^2), normalised to sum 1;
  the scores sorted ascending, their CDF min-max normalised to [0, 1] (L129-133);
  N0 values evenly spaced from the smallest non-zero CDF value to 1, N0 the patches of the input
  (`create_ys`, L55-84, n_ref_tokens - 1), each picking the token of nearest CDF value
  (L143-151), duplicates collapsing (`get_unique_indices`, L37-53);
  the distinct picks, in ascending significance, fill at most K slots (L170-184), K at least 7
  (the official floor of 8 tokens with the [CLS], L216). Without keep_rate / samples there is no
  cap (the DeiT-S config's NUM_TOKENS = 197); at blocks 3..depth-1 (its ATS_BLOCKS 3..11).
  As in the official code, the least significant token is never picked unless an invalid
  (zero) slot is scored with it (the min-max normalisation puts it at 0), and a cap keeps the
  least significant picks.
form="haurum": the Haurum et al. 2023 benchmark (JoakimHaurum/TokenReduction, models/ats.py):
  S_j = sum_h A_h[cls, j] |v_hj| with per-head value norms, normalised to sum 1, its CDF in token
  order; K = int(N0 kr^s) steps (k + 1/2) / K, each picking the token whose CDF bin contains it;
  blocks 3/6/9, keep_rate or samples required. Deviations from that code: it takes K + 1 for K,
  builds its K steps (k + 1/2) / (K + 1) with torch.arange (float endpoint), maps each to the
  token of nearest CDF value (which can pick zero-significance tokens) and shifts the CDF of
  invalid tokens by 0.1; we take K midpoints of [0, 1] and the proper inverse CDF (bins, which
  never pick an empty one).

Static shapes, both forms (own design): the output has prefix + K slots, K fixed when the model
is built, which is the official code with DROP_TOKENS=False (its defaults.py); its
DROP_TOKENS=True (the DeiT-S config) trims each batch to its largest pick count, a dynamic shape.
Slots left over carry `valid=False` (official: zero tokens of policy 0) and every later attention
masks them as keys (the stage passes `state.valid` to the attention context). Without a cap the
slots stay all N tokens. Order: official, picks in ascending significance; haurum, token order.
`mode="mask"` keeps all N tokens and marks the unpicked ones invalid (full compute): the same
picks, except in the official form after a capped stage, whose padding the min-max normalisation
then sees as N - K zero slots instead of the gathered ones.
"""
import jax
import jax.numpy as jnp

from vitjax.tokens import registry
from vitjax.tokens.base import (DEFAULT_LOCATIONS, SCORE_NORMS, Layout, Plan, Reducer, at_blocks,
                                cumulative_counts, keep_prefix_and, normalize_row, score_norm_at,
                                selection_macs, take_state, take_tokens)

FORMS = ("official", "haurum")
MODES = ("gather", "mask")
OFFICIAL_FIRST_BLOCK = 3   # the official ATS_BLOCKS start (3..11 in a 12-block DeiT-S)
OFFICIAL_MIN_SLOTS = 7     # the official `if n_tokens < 8: n_tokens = 8`, [CLS] included


def significance(aux: dict, num_prefix: int, valid=None, score_norm: str = "none",
                 form: str = "official"):
  """[B, n] significance of the non-prefix tokens, normalised to sum 1 (0 for invalid ones)."""
  probs = normalize_row(aux["cls_probs_per_head"].astype(jnp.float32), score_norm)
  value_norm = aux["value_norm"].astype(jnp.float32)                 # [B, H, N]: |v_hj|
  if form == "official":
    score = probs.sum(axis=1) * jnp.sqrt((value_norm ** 2).sum(axis=1))
  else:
    score = (probs * value_norm).sum(axis=1)
  score = score[:, num_prefix:]
  if valid is not None:
    score = jnp.where(valid[:, num_prefix:], score, 0.0)
  return score / jnp.maximum(score.sum(-1, keepdims=True), 1e-30)


def sample(score, samples: int):
  """Benchmark form: inverse-transform sampling -> [B, n] bool, the tokens picked at least once.

  Quantile q picks the first token with CDF >= q, i.e. the token whose CDF bin contains q, so a
  token of zero significance (an empty bin, e.g. an invalid slot) is never picked.
  """
  cdf = jnp.cumsum(score, axis=-1)
  steps = (jnp.arange(samples, dtype=jnp.float32) + 0.5) / samples
  below = (cdf[:, None, :] < steps[None, :, None] * cdf[:, -1:, None]).sum(-1)  # [B, K]
  picked = jnp.minimum(below, score.shape[1] - 1)
  return jax.nn.one_hot(picked, score.shape[1], dtype=jnp.float32).max(axis=1) > 0


def official_picks(score, quantiles: int):
  """Official form: (token of each significance rank [B, n], ranks picked [B, n] bool)."""
  order = jnp.argsort(score, axis=-1, stable=True)                   # ascending significance
  cdf = jnp.cumsum(jnp.take_along_axis(score, order, axis=1), axis=-1)
  lo, hi = cdf[:, :1], cdf[:, -1:]
  cdf = (cdf - lo) / jnp.maximum(hi - lo, 1e-30)
  start = jnp.min(jnp.where(cdf == 0, 1e8, cdf), axis=-1, keepdims=True)
  # the official expression for `quantiles` steps from `start` to 1
  span = max(quantiles - 1, 1)
  steps = jnp.arange(quantiles, dtype=jnp.float32)
  ys = start + (jnp.linspace(0.0, 1.0, quantiles) * span - start * steps) / span
  rank = jnp.argmin(jnp.abs(ys[:, :, None] - cdf[:, None, :]), axis=-1)   # [B, quantiles]
  return order, jax.nn.one_hot(rank, score.shape[1], dtype=jnp.float32).max(axis=1) > 0


def first_picked(picked, slots: int):
  """The first `slots` positions with picked True (in order), then the unpicked ones:
  (positions [B, slots], whether each was picked [B, slots])."""
  n = picked.shape[1]
  idx = jnp.argsort(jnp.where(picked, 0, n) + jnp.arange(n), axis=-1)[:, :slots]
  return idx, jnp.take_along_axis(picked, idx, axis=1)


def ats_slots(score, samples: int, quantiles: int, form: str):
  """Slot tokens [B, K] (indices among the n scored ones) and their validity [B, K]."""
  if form == "haurum":
    return first_picked(sample(score, samples), samples)
  order, picked = official_picks(score, quantiles)
  ranks, valid = first_picked(picked, samples)
  return jnp.take_along_axis(order, ranks, axis=1), valid


@registry.register("ats", paper="ATS: Adaptive Token Sampling for Efficient Vision Transformers "
                                "(Fayyaz et al., ECCV 2022)",
                   official="https://github.com/adaptivetokensampling/ATS "
                            "(libs/models/transformers/ats_block.py)")
class ATS(Reducer):
  """Samples at most `samples` tokens by the inverse CDF of their significance."""
  samples: int = 1        # K: slots after the prefix
  quantiles: int = 0      # official form: the CDF values sampled (N0)
  form: str = "official"
  mode: str = "gather"
  score_norm: str = "none"

  needs = ("cls_probs_per_head", "value_norm")
  needs_cls = True
  # locations None: official 3..depth-1, haurum 3/6/9; no keep_rate / samples: official no cap
  options = {"form": "official", "keep_rate": None, "samples": None, "locations": None,
             "mode": "gather", "score_norm": None}
  choices = {"form": FORMS, "mode": MODES, "score_norm": (None,) + SCORE_NORMS}
  macs = classmethod(selection_macs)  # sampling by comparisons, O(N0 n)

  @classmethod
  def plan(cls, options, layout: Layout) -> Plan:
    opts = cls.parse(options, layout)
    official = opts["form"] == "official"
    locations = opts["locations"] or default_locations(official, layout.depth)
    caps = sample_counts(opts, locations, layout.num_patches, official)
    blocks, slots = {}, layout.num_patches
    for loc, k in zip(locations, caps):
      k = slots if k is None else min(max(k, OFFICIAL_MIN_SLOTS) if official else k, slots)
      blocks[loc] = dict(samples=k, quantiles=layout.num_patches, form=opts["form"],
                         mode=opts["mode"],
                         score_norm=score_norm_at(layout, loc, opts["score_norm"]))
      slots = k if opts["mode"] == "gather" else slots
    return Plan(at_blocks(layout.depth, blocks))

  def __call__(self, x, state, aux, *, deterministic=True):
    p, valid = self.num_prefix, state.valid
    score = significance(aux, p, valid, self.score_norm, self.form)
    idx, slot_valid = ats_slots(score, self.samples, self.quantiles, self.form)
    prefix_valid = jnp.ones((x.shape[0], p), bool) if valid is None else valid[:, :p]
    if self.mode == "mask":
      hit = jax.nn.one_hot(idx, score.shape[1], dtype=jnp.float32) * slot_valid[..., None]
      new_valid = jnp.concatenate([prefix_valid, hit.max(axis=1) > 0], axis=1)
      return x, state.replace(valid=new_valid)
    full = keep_prefix_and(idx, p)
    new_valid = jnp.concatenate([prefix_valid, slot_valid], axis=1)
    return take_tokens(x, full), take_state(state, full).replace(valid=new_valid)


def default_locations(official: bool, depth: int) -> tuple:
  if not official:
    return DEFAULT_LOCATIONS
  if depth <= OFFICIAL_FIRST_BLOCK:
    raise ValueError(f"token reducer 'ats' samples from block {OFFICIAL_FIRST_BLOCK} on by "
                     f"default, and this encoder has {depth} blocks; give locations")
  return tuple(range(OFFICIAL_FIRST_BLOCK, depth))


def sample_counts(opts: dict, locations: tuple, num_patches: int, official: bool) -> list:
  """K per location: given, int(N0 kr^s), or None (official form without a cap)."""
  if opts["keep_rate"] is not None and opts["samples"] is not None:
    raise ValueError("token reducer 'ats' takes keep_rate (K_s = int(kr**s * patches)) or "
                     "samples (one K per location), not both")
  if opts["samples"] is not None:
    counts = [int(k) for k in opts["samples"]]
    if len(counts) != len(locations) or min(counts) < 1:
      raise ValueError(f"token reducer 'ats': samples {counts} must give one K >= 1 for each "
                       f"of the {len(locations)} locations")
    return counts
  if opts["keep_rate"] is not None:
    return cumulative_counts("ats", opts["keep_rate"], locations, num_patches)[1]
  if not official:
    raise ValueError("token reducer 'ats' (form='haurum') needs keep_rate (K_s = int(kr**s * "
                     "patches)) or samples (one K per location)")
  return [None] * len(locations)
