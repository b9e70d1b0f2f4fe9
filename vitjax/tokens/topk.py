"""T2 `topk`: Top-K pruning by [CLS] attention (the Haurum et al. 2023 benchmark baseline).

EViT without fusion, with the benchmark's cumulative counts: after the s-th location (1-based)
k_s = int(kr**s * num_patches) non-prefix tokens remain (Haurum `models/topk.py`), kept in
descending score order. A per-location list gives the ratios kr_s of num_patches directly.
"""
from typing import ClassVar

from vitjax.tokens import registry
from vitjax.tokens.base import Reducer
from vitjax.tokens.evit import (DEFAULT_LOCATIONS, SCORE_NORMS, check_locations, check_options,
                                cls_scores, per_location, reorganize)


def topk_counts(keep_rate, num_patches: int = 196, locations=DEFAULT_LOCATIONS) -> list:
  """Non-prefix tokens after each location: floor(num_patches * kr**s) (cumulative definition)."""
  locations = tuple(locations)
  if isinstance(keep_rate, (list, tuple)):
    ratios = per_location("topk", keep_rate, locations)
  else:
    kr = per_location("topk", keep_rate, locations)[0] if locations else 1.0
    ratios = [kr ** (s + 1) for s in range(len(locations))]
  return [int(r * num_patches) for r in ratios]


@registry.register("topk", needs=("cls_probs",), slot="mid", needs_cls=True,
                   paper="Top-K baseline (Haurum et al., ICCVW 2023, token reduction benchmark)")
class TopK(Reducer):
  """Keeps the `keep` most attended non-prefix tokens and drops the rest."""
  keep: int = 1
  keep_order: bool = False
  score_norm: str = "none"

  reads_cls_score_norm: ClassVar[bool] = True
  options: ClassVar[tuple] = ("keep_rate", "locations", "keep_order", "score_norm")

  @classmethod
  def plan(cls, options, *, depth, num_patches, num_prefix):
    check_options("topk", options, cls.options)
    if "keep_rate" not in options:
      raise ValueError("topk needs keep_rate (in (0, 1]), e.g. tokens=dict(name='topk', "
                       "keep_rate=0.7)")
    locations = check_locations("topk", options.get("locations", DEFAULT_LOCATIONS), depth)
    counts = topk_counts(options["keep_rate"], num_patches, locations)
    extra = {k: options[k] for k in ("keep_order", "score_norm") if k in options}
    if extra.get("score_norm", "none") not in SCORE_NORMS:
      raise ValueError(f"topk.score_norm must be one of {SCORE_NORMS}")
    plan, n = [None] * depth, num_patches
    for loc, keep in zip(locations, counts):
      if keep < 1:
        raise ValueError(f"topk keeps {keep} tokens at block {loc}; raise keep_rate")
      if keep < n:  # the reference returns early when nothing would be dropped
        plan[loc] = dict(keep=keep, **extra)
        n = keep
    return plan

  def __call__(self, x, state, aux, *, deterministic=True):
    scores = cls_scores(aux, self.num_prefix, self.score_norm)
    return reorganize(x, state, scores, self.keep, num_prefix=self.num_prefix, fuse=False,
                      keep_order=self.keep_order)
