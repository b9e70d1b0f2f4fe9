"""EViT's keep-rate warm-up, quantised into a bounded number of static shapes (spec §4).

EViT (helpers.adjust_keep_rate) trains with keep rate 1 until `start_epoch`, then lowers it per
iteration along a half cosine to the target over `ramp_epochs`, then holds it. Under jit every
distinct token-count tuple is one compile, so the trainer rounds the keep rate to a grid:

  kr = quantize(keep_rate_at(step, steps_per_epoch=..., target=0.7), grid=0.02, target=0.7)

and runs one static model (and step function) per distinct token-count tuple. `count_buckets`
predicts the number of distinct count tuples (= compiles) of a run; `choose_grid` picks the finest
grid that stays within `max_buckets`; `Warmup` is the whole schedule of a run, computed once.
"""
import bisect
import dataclasses
import math
from typing import Callable, Optional, Sequence

from vitjax.tokens.base import DEFAULT_LOCATIONS
from vitjax.tokens.evit import evit_counts

GRIDS = (0.01, 0.02, 0.025, 0.05, 0.1)  # candidate grids for choose_grid, finest first


def keep_rate_at(step: int, *, steps_per_epoch: int, target: float, start_epoch: int = 10,
                 ramp_epochs: int = 100) -> float:
  """The exact EViT keep rate at optimizer step `step` (0-based, per iteration)."""
  if not 0.0 < target <= 1.0:
    raise ValueError(f"target keep rate must be in (0, 1], got {target}")
  if steps_per_epoch <= 0:
    raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
  epoch = step // steps_per_epoch
  if epoch < start_epoch:
    return 1.0
  if epoch >= start_epoch + ramp_epochs:
    return float(target)
  t = (step - steps_per_epoch * start_epoch) / (steps_per_epoch * ramp_epochs)
  return target + (1.0 - target) * (math.cos(t * math.pi) + 1.0) * 0.5


def quantize(kr: float, grid: Optional[float], *, target: Optional[float] = None) -> float:
  """Rounds kr to the nearest multiple of `grid` (None or 0: unchanged), in [target, 1].

  The result is rounded to 10 decimals so that e.g. 0.7 stays 0.7 and ceil(kr * n) is the count
  the exact value would give. With `target`, values below it (an off-grid target) are lifted to it.
  """
  if grid:
    kr = round(round(kr / grid) * grid, 10)
  if target is not None:
    kr = max(kr, float(target))
  return min(kr, 1.0)


def keep_rates(*, steps_per_epoch: int, target: float, grid: Optional[float],
               start_epoch: int = 10, ramp_epochs: int = 100) -> list:
  """The distinct (quantised) keep rates a run visits, in order of first use."""
  seen = {}
  first = steps_per_epoch * start_epoch
  for step in range(first, first + steps_per_epoch * ramp_epochs + 1):
    kr = keep_rate_at(step, steps_per_epoch=steps_per_epoch, target=target,
                      start_epoch=start_epoch, ramp_epochs=ramp_epochs)
    seen.setdefault(quantize(kr, grid, target=target), None)
  if start_epoch > 0:
    seen = {1.0: None, **seen}
  return list(seen)


def count_buckets(*, target: float, grid: Optional[float], steps_per_epoch: int,
                  start_epoch: int = 10, ramp_epochs: int = 100,
                  counts_fn: Optional[Callable] = None, num_patches: int = 196,
                  locations: Sequence[int] = DEFAULT_LOCATIONS, fuse: bool = True) -> int:
  """Number of distinct token-count tuples (= step-function compiles) over a run.

  counts_fn(kr) -> hashable count tuple; by default EViT's counts for the given patches,
  locations and fusion.
  """
  if counts_fn is None:
    def counts_fn(kr):
      return tuple(evit_counts(kr, num_patches, locations, fuse))
  rates = keep_rates(steps_per_epoch=steps_per_epoch, target=target, grid=grid,
                     start_epoch=start_epoch, ramp_epochs=ramp_epochs)
  return len({counts_fn(kr) for kr in rates})


def choose_grid(*, target: float, steps_per_epoch: int, max_buckets: int = 16,
                grids: Sequence[float] = GRIDS, **kwargs) -> float:
  """The finest grid of `grids` whose run compiles at most `max_buckets` shapes."""
  for grid in grids:
    if count_buckets(target=target, grid=grid, steps_per_epoch=steps_per_epoch, **kwargs) \
        <= max_buckets:
      return grid
  raise ValueError(f"no grid in {tuple(grids)} keeps keep rate {target} within {max_buckets} "
                   "shapes; raise max_buckets or pass coarser grids")


WARMUP_DEFAULTS = {"start_epoch": 10, "ramp_epochs": 100, "max_buckets": 16, "grid": None}


@dataclasses.dataclass(frozen=True)
class Warmup:
  """A run's keep-rate warm-up as pieces of constant token counts, computed once.

  Piece i covers the steps from starts[i] on and trains the model whose reducer options are
  updated with overrides[i] (its keep rate); the model of the last piece is the target one.
  """
  starts: tuple
  overrides: tuple
  grid: float

  @property
  def num_pieces(self) -> int:
    return len(self.starts)

  def piece(self, step: int) -> int:
    return bisect.bisect_right(self.starts, step) - 1

  @classmethod
  def build(cls, reducer, options: dict, layout, *, steps_per_epoch: int) -> "Warmup":
    """options: the parsed options of `reducer` (keep_rate: the target; warmup: the schedule)."""
    cfg = dict(options["warmup"])
    unknown = sorted(set(cfg) - set(WARMUP_DEFAULTS))
    if unknown:
      raise ValueError(f"tokens.warmup has no option(s) {unknown}; valid: {sorted(WARMUP_DEFAULTS)}")
    cfg = {**WARMUP_DEFAULTS, **cfg}
    target = options["keep_rate"]
    if not isinstance(target, (int, float)):
      raise ValueError(f"tokens.warmup needs one target keep_rate, got {target!r}")
    plans = {}

    def counts(kr):  # the static shapes at keep rate kr: one compile each
      if kr not in plans:
        plans[kr] = repr(reducer.plan({**options, "keep_rate": kr}, layout).blocks)
      return plans[kr]
    kw = dict(steps_per_epoch=steps_per_epoch, start_epoch=cfg["start_epoch"],
              ramp_epochs=cfg["ramp_epochs"])
    grid = cfg["grid"] or choose_grid(target=target, max_buckets=cfg["max_buckets"],
                                      counts_fn=counts, **kw)
    starts, overrides, last = [], [], None
    for step in range(steps_per_epoch * (cfg["start_epoch"] + cfg["ramp_epochs"]) + 1):
      kr = quantize(keep_rate_at(step, target=target, **kw), grid, target=target)
      if counts(kr) != last:
        starts.append(step)
        overrides.append({"keep_rate": kr})
        last = counts(kr)
    return cls(tuple(starts), tuple(overrides), grid)
