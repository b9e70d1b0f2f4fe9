"""T2 `topk`: Top-K pruning by [CLS] attention (the Haurum et al. 2023 benchmark baseline).

EViT without fusion, with the benchmark's cumulative counts: after the s-th location (1-based)
k_s = int(kr**s * num_patches) non-prefix tokens remain (Haurum `models/topk.py`), kept in
descending score order. A per-location list gives the ratios kr_s of num_patches directly.
"""
from vitjax.tokens import registry
from vitjax.tokens.base import (DEFAULT_LOCATIONS, REQUIRED, SCORE_NORMS, Layout, Plan, Reducer,
                                at_blocks, cls_scores, cumulative_counts, keep_prefix_and,
                                score_norm_at, select, selection_macs, take_state,
                                take_tokens)


def topk_counts(keep_rate, num_patches: int = 196, locations=DEFAULT_LOCATIONS) -> list:
  """Non-prefix tokens after each location: floor(num_patches * kr**s) (cumulative definition)."""
  return cumulative_counts("topk", keep_rate, tuple(locations), num_patches)[1]


@registry.register("topk",
                   paper="Top-K baseline (Haurum et al., ICCVW 2023, token reduction benchmark)",
                   official="https://github.com/JoakimHaurum/TokenReduction (models/topk.py)")
class TopK(Reducer):
  """Keeps the `keep` most attended non-prefix tokens and drops the rest."""
  keep: int = 1
  keep_order: bool = False
  score_norm: str = "none"

  needs = ("cls_probs",)
  needs_cls = True
  options = {"keep_rate": REQUIRED, "locations": DEFAULT_LOCATIONS, "keep_order": False,
             "score_norm": None}
  choices = {"score_norm": (None,) + SCORE_NORMS}
  macs = classmethod(selection_macs)

  @classmethod
  def plan(cls, options, layout: Layout) -> Plan:
    opts = cls.parse(options, layout)
    counts = topk_counts(opts["keep_rate"], layout.num_patches, opts["locations"])
    blocks, n = {}, layout.num_patches
    for loc, keep in zip(opts["locations"], counts):
      if keep < n:  # the reference returns early when nothing would be dropped
        blocks[loc] = dict(keep=keep, keep_order=opts["keep_order"],
                           score_norm=score_norm_at(layout, loc, opts["score_norm"]))
        n = keep
    return Plan(at_blocks(layout.depth, blocks))

  def __call__(self, x, state, aux, *, deterministic=True):
    scores = cls_scores(aux, self.num_prefix, self.score_norm)
    full = keep_prefix_and(select(scores, self.keep, self.keep_order), self.num_prefix)
    return take_tokens(x, full), take_state(state, full)
