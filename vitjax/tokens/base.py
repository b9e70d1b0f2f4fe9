"""The token-reducer contract: (tokens, token state, attention aux) -> (fewer tokens, new state).

Output counts are Python ints fixed when the model is built (`Reducer.plan`), so shapes stay static
under jit. Token layout: [prefix (CLS, dist, registers) | image tokens | tokens made by reducers].
"""
import dataclasses
import functools
from typing import Any, Callable, ClassVar, Mapping, NamedTuple, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class TokenState:
  """Per-token bookkeeping that travels with the tokens through every reduction."""
  size: jax.Array                        # [B, N] float32: patches a token stands for
  source: Optional[jax.Array] = None     # [B, N, N0] float32: which input tokens it came from
  pos: Optional[jax.Array] = None        # [B, N, 2] (row, col) in patch units, NaN for prefix
  # [B, N] bool for mask-mode methods; DynamicViT training stores its {0, 1} float keep policy
  # here, whose straight-through gradient reaches attention (see attention.base.policy_key_bias)
  valid: Optional[jax.Array] = None
  # [B, N] int32: each token's position among the tokens that entered the stage, -1 for a token
  # made by merging, fusing or learning (what a reduction kept, in output order)
  index: Optional[jax.Array] = None

  @property
  def num_tokens(self) -> int:
    return self.size.shape[1]


def initial_state(batch: int, num_prefix: int, grid: tuple, *, track_source: bool = False,
                  with_pos: bool = False) -> TokenState:
  """State of the tokens as they leave the embedding: every token has size 1."""
  n = num_prefix + grid[0] * grid[1]
  size = jnp.ones((batch, n), jnp.float32)
  source = None
  if track_source:
    source = jnp.broadcast_to(jnp.eye(n, dtype=jnp.float32), (batch, n, n))
  pos = None
  if with_pos:
    rows, cols = jnp.meshgrid(jnp.arange(grid[0]), jnp.arange(grid[1]), indexing="ij")
    patch_pos = jnp.stack([rows.ravel(), cols.ravel()], -1).astype(jnp.float32)
    prefix = jnp.full((num_prefix, 2), jnp.nan, jnp.float32)
    pos = jnp.broadcast_to(jnp.concatenate([prefix, patch_pos]), (batch, n, 2))
  index = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (batch, n))
  return TokenState(size=size, source=source, pos=pos, index=index)


def take_tokens(t: Optional[jax.Array], idx: jax.Array) -> Optional[jax.Array]:
  """Gathers tokens along axis 1: t [B, N, ...], idx [B, K] -> [B, K, ...]."""
  if t is None:
    return None
  idx = idx.reshape(idx.shape + (1,) * (t.ndim - 2))
  return jnp.take_along_axis(t, idx, axis=1)


def take_state(state: TokenState, idx: jax.Array) -> TokenState:
  """Keeps the tokens at `idx` [B, K] in every field of the state."""
  return TokenState(size=take_tokens(state.size, idx), source=take_tokens(state.source, idx),
                    pos=take_tokens(state.pos, idx), valid=take_tokens(state.valid, idx),
                    index=take_tokens(state.index, idx))


# ----- the contract -----
# Where a reducer acts in a block  x = x + attn(norm(x)); [reduce]; x = x + mlp(norm(x)):
BEFORE_ATTENTION = "before_attention"  # on the block's input, before its attention
AFTER_ATTENTION = "after_attention"    # after the attention residual, before the MLP (EViT, ToMe)
HOOKS = (BEFORE_ATTENTION, AFTER_ATTENTION)
# Whose attention a before-attention reducer reads (after-attention ones read their own block's):
PREVIOUS_BLOCK = "previous_block"      # the attention of the block before (DynamicViT, K-Medoids)
OWN_BLOCK = "own_block"                # this block's attention on the unreduced tokens (MCTF's
                                       # one-step-ahead attention); the block then attends again
DEFAULT_LOCATIONS = (3, 6, 9)          # 0-indexed blocks (EViT, DynamicViT, Haurum et al.)


class _Required:
  def __repr__(self):
    return "REQUIRED"


REQUIRED = _Required()                 # an option without a default


@dataclasses.dataclass(frozen=True)
class Layout:
  """What a reducer may know of the encoder it is planned into (all static)."""
  depth: int
  num_patches: int
  num_prefix: int
  class_token: bool = True
  attention: tuple = ()  # per block: the attention mechanism's Capabilities
  dropout: float = 0.0   # the encoder's dropout rate


@dataclasses.dataclass(frozen=True)
class Plan:
  """A reducer's static plan: per block None (no reduction there) or that block's module kwargs."""
  blocks: tuple
  prop_attn: bool = False  # after the first reduction, attention adds log(size) to its logits


class Reducer(nn.Module):
  """Base of every token reducer; the class variables are its declared contract.

  A reducer maps (tokens, token state, attention aux) -> (fewer tokens, new state) at its `hook`;
  `after_block` runs once the block is done (identity unless a method maps its tokens back).
  `options` is the option schema {name: default} (REQUIRED: no default), `choices` the allowed
  values of enumerated options; `plan` turns options into per-block kwargs through `parse`.
  """
  num_prefix: int = 1
  dtype: Any = jnp.float32

  name_in_registry: ClassVar[str] = ""
  needs: ClassVar[tuple] = ()      # aux signals read from the attention (attention.base.AUX_FIELDS)
  hook: ClassVar[str] = AFTER_ATTENTION
  reads: ClassVar[str] = PREVIOUS_BLOCK  # before-attention reducers: whose attention they read
  needs_cls: ClassVar[bool] = False      # reads the [CLS] token's attention row
  needs_grid: ClassVar[bool] = False     # needs raster-ordered tokens at its location
  soft: ClassVar[bool] = False           # soft merge: token sizes become assignment weights
  options: ClassVar[dict] = {"keep_rate": REQUIRED, "locations": DEFAULT_LOCATIONS}
  choices: ClassVar[dict] = {}

  @classmethod
  def parse(cls, options: Mapping, layout: Layout) -> dict:
    """Checks names, fills defaults and checks choices, locations and keep rates."""
    return parse_options(cls.name_in_registry, options, cls.options, cls.choices, layout.depth)

  @classmethod
  def plan(cls, options: Mapping, layout: Layout) -> Plan:
    """Default: cumulative keep rates at `locations`, count_s = int(N0 * kr^s) (Haurum et al.)."""
    opts = cls.parse(options, layout)
    locs = opts.pop("locations")
    _, counts = cumulative_counts(cls.name_in_registry, opts.pop("keep_rate"), locs,
                                  layout.num_patches)
    return Plan(at_blocks(layout.depth, {l: dict(count=c, **opts) for l, c in zip(locs, counts)}))

  @classmethod
  def warmup(cls, options: Mapping, layout: Layout, *, steps_per_epoch: int):
    """A training-time schedule of options (see tokens.schedule.Warmup), or None."""
    del options, layout, steps_per_epoch
    return None

  @classmethod
  def after_update(cls):
    """An optax transformation chained after the optimizer that keeps a constraint of the
    method on its parameters (Sinkhorn's unit centres), or None."""
    return None

  def __call__(self, x, state: TokenState, aux: dict, *, deterministic: bool = True):
    raise NotImplementedError

  def after_block(self, x, state: TokenState, before: tuple, *, deterministic: bool = True):
    """x, state after the block's MLP; before = (x, state) as the block received them."""
    del before, deterministic
    return x, state


# ----- the one option parser -----
def parse_options(name: str, options: Mapping, schema: Mapping, choices: Mapping,
                  depth: int) -> dict:
  """{**schema defaults, **options}, checked: known names, required ones given, choices,
  `locations` (increasing block indices) and `keep_rate` (in (0, 1], once or per location)."""
  opts = dict(options)
  unknown = sorted(set(opts) - set(schema))
  if unknown:
    raise ValueError(f"token reducer {name!r} has no option(s) {unknown}; valid options: "
                     f"{sorted(schema)}")
  missing = sorted(k for k, v in schema.items() if v is REQUIRED and k not in opts)
  if missing:
    raise ValueError(f"token reducer {name!r} needs {', '.join(missing)}"
                     + (", a float in (0, 1]" if missing == ["keep_rate"] else ""))
  opts = {**{k: v for k, v in schema.items() if v is not REQUIRED}, **opts}
  for key, valid in choices.items():
    if opts.get(key) not in valid:
      raise ValueError(f"token reducer {name!r}: {key}={opts.get(key)!r}; valid: {valid}")
  if opts.get("locations") is not None:
    opts["locations"] = check_locations(name, opts["locations"], depth)
    if opts.get("keep_rate") is not None:
      per_location(name, opts["keep_rate"], opts["locations"])
  return opts


def check_locations(name: str, locations, depth: int) -> tuple:
  locations = tuple(int(i) for i in locations)
  if not locations or list(locations) != sorted(set(locations)):
    raise ValueError(f"token reducer {name!r}: locations {locations} must be increasing, "
                     f"distinct block indices in 0..{depth - 1}")
  for i in locations:
    if not 0 <= i < depth:
      raise ValueError(f"token reducer {name!r}: locations has block {i}; blocks are "
                       f"0..{depth - 1}")
  return locations


def per_location(name: str, value, locations: tuple) -> list:
  """A keep rate given once, or once per location -> one float per location, each in (0, 1]."""
  rates = list(value) if isinstance(value, (list, tuple)) else [value] * len(locations)
  if len(rates) != len(locations):
    raise ValueError(f"token reducer {name!r}: {len(rates)} keep rates for {len(locations)} "
                     "locations")
  for kr in rates:
    if not isinstance(kr, (int, float)) or not 0.0 < float(kr) <= 1.0:
      raise ValueError(f"token reducer {name!r}: keep_rate must be in (0, 1], got {kr!r}")
  return [float(kr) for kr in rates]


def cumulative_counts(name: str, keep_rate, locations: tuple, num_patches: int) -> tuple:
  """(ratios, counts) of the cumulative definition n_s = int(N0 * kr^s), s = 1, 2, ...

  Exactly the reference expression `int(N0 * kr ** s)` (float64 on the host). A sequence gives
  the cumulative ratio of each location directly (DynamicViT's `token_ratio`).
  """
  rates = per_location(name, keep_rate, locations)
  if isinstance(keep_rate, (list, tuple)):
    ratios = rates
  else:
    ratios = [rates[0] ** (s + 1) for s in range(len(locations))]
  counts = [int(num_patches * r) for r in ratios]
  if min(counts) < 1:
    raise ValueError(f"token reducer {name!r}: keep_rate {keep_rate} leaves no token at a "
                     f"location (counts {counts} of {num_patches} patches)")
  return ratios, counts


def at_blocks(depth: int, by_block: Mapping) -> tuple:
  """{block: kwargs} -> one entry per block (None where nothing happens)."""
  return tuple(by_block.get(i) for i in range(depth))


def score_norm_at(layout: Layout, block: int, given: Optional[str]) -> str:
  """How a [CLS]-score reducer reads the row of the attention at `block` (zoo R4): as given,
  else as that attention declares (a non-softmax row is renormalised)."""
  if given is not None:
    return given
  return layout.attention[block].cls_score_norm if layout.attention else "none"


# ----- selection by [CLS] score (EViT, Top-K, ATS) -----
SCORE_NORMS = ("none", "row", "abs_row")


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


def keep_prefix_and(idx, num_prefix: int):
  """[B, k] image-token indices -> [B, p + k] token indices with the prefix first."""
  prefix = jnp.broadcast_to(jnp.arange(num_prefix), (idx.shape[0], num_prefix))
  return jnp.concatenate([prefix, idx + num_prefix], axis=1)


# ----- merging: hard groups (ToMe, MCTF) and weighted merges, one state rule -----
class Groups(NamedTuple):
  """A hard merge of all N tokens (prefix included) into M groups, a one-hot assignment: output m
  starts from input `rep[:, m]`, input `extra[:, k]` is added into output `into[:, k]`; every
  input is in exactly one of the two (N = M + r)."""
  rep: jax.Array    # [B, M] int32
  extra: jax.Array  # [B, r] int32
  into: jax.Array   # [B, r] int32, in 0..M-1


def bipartite_groups(num_tokens: int, unm, src, dst) -> Groups:
  """One bipartite step on A = even, B = odd positions: outputs [A[unm] ; B], with A[src[:, k]]
  added into B[dst[:, k]] (unm, src index A; dst indexes B)."""
  nb = num_tokens // 2
  b_tokens = jnp.broadcast_to(2 * jnp.arange(nb, dtype=jnp.int32) + 1, (unm.shape[0], nb))
  rep = jnp.concatenate([2 * unm.astype(jnp.int32), b_tokens], axis=1)
  return Groups(rep, 2 * src.astype(jnp.int32), (unm.shape[1] + dst).astype(jnp.int32))


def reorder(groups: Groups, order) -> Groups:
  """The same groups with the outputs permuted by the static `order` (new m = old order[m])."""
  inverse = jnp.asarray(np.argsort(order), jnp.int32)
  return Groups(groups.rep[:, order], groups.extra, inverse[groups.into])


def then(first: Groups, second: Groups) -> Groups:
  """`first`, then `second` on first's outputs, as one merge of first's inputs."""
  m1 = first.rep.shape[1]

  def slot(rep, extra, into):  # second's output of each of first's outputs
    own = jnp.zeros(m1, jnp.int32).at[rep].set(jnp.arange(rep.shape[0], dtype=jnp.int32))
    return own.at[extra].set(into)
  slots = jax.vmap(slot)(second.rep, second.extra, second.into)
  return Groups(jnp.take_along_axis(first.rep, second.rep, axis=1),
                jnp.concatenate([first.extra,
                                 jnp.take_along_axis(first.rep, second.extra, axis=1)], axis=1),
                jnp.concatenate([jnp.take_along_axis(slots, first.into, axis=1), second.into],
                                axis=1))


def group_sum(t, groups: Groups):
  """Each group's sum of its members: [B, N, ...] -> [B, M, ...].

  A one-hot contraction over the r moved tokens: deterministic, where a scatter-add is not.
  """
  base = take_tokens(t, groups.rep)
  if groups.extra.shape[1] == 0:
    return base
  moved = take_tokens(t, groups.extra)
  onehot = jax.nn.one_hot(groups.into, base.shape[1], dtype=moved.dtype)  # [B, r, M]
  flat = moved.reshape(*moved.shape[:2], -1)
  return base + jnp.einsum("brm,brf->bmf", onehot, flat).reshape(base.shape)


def singletons(groups: Groups):
  """[B, M] bool: groups that are one input token, unchanged."""
  hits = jax.nn.one_hot(groups.into, groups.rep.shape[1], dtype=jnp.int32).sum(axis=1)
  return hits == 0


def group_mean(t, weight, groups: Groups):
  """sum(w t) / sum(w) per group in float32, weight [B, N]; a group of one passes its token
  through bit-exactly (no w t / w round trip)."""
  w = weight.reshape(weight.shape + (1,) * (t.ndim - 2)).astype(jnp.float32)
  mean = group_sum(w * t.astype(jnp.float32), groups) / group_sum(w, groups)
  alone = singletons(groups).reshape(groups.rep.shape + (1,) * (t.ndim - 2))
  return jnp.where(alone, take_tokens(t, groups.rep), mean.astype(t.dtype))


@dataclasses.dataclass(frozen=True)
class _Pool:
  """A merge as a linear map: `total(t)` sums each output's (weighted) members; an output where
  `alone` is the input `rep` unchanged."""
  total: Callable
  rep: jax.Array
  alone: jax.Array


def _pool(weights, num_prefix: int) -> _Pool:
  if isinstance(weights, Groups):
    return _Pool(functools.partial(group_sum, groups=weights), weights.rep, singletons(weights))
  p, (b, m) = num_prefix, weights.shape[:2]
  w = weights.astype(jnp.float32)

  def total(t):
    new = jnp.einsum("bmn,bn...->bm...", w.astype(t.dtype), t[:, p:])
    return jnp.concatenate([t[:, :p], new], axis=1)
  rep = jnp.broadcast_to(jnp.concatenate([jnp.arange(p), jnp.zeros(m, int)]).astype(jnp.int32),
                         (b, p + m))
  return _Pool(total, rep, jnp.broadcast_to(jnp.arange(p + m) < p, (b, p + m)))


def merge_state(state: TokenState, weights, num_prefix: int) -> TokenState:
  """The state of merged tokens, for every merging reducer.

  weights: `Groups` (a hard merge of all tokens that leaves the prefix alone and first), or
  [B, M, N - p] weights of M new tokens y_m = sum_j weights[b, m, j] x_j made from the image
  tokens, the prefix passing in front (one-hot rows: hard clusters; soft rows: sizes and sources
  weighted by the assignment). Sizes and sources add up with the weights; pos is the
  (weights * size)-weighted mean; a token is valid if one of its members is. A token that is one
  input token unchanged keeps all of its state; a made one has index -1.
  """
  pool = _pool(weights, num_prefix)

  def alone_or(t, made):
    keep = pool.alone.reshape(pool.alone.shape + (1,) * (t.ndim - 2))
    return jnp.where(keep, take_tokens(t, pool.rep), made.astype(t.dtype))
  size = pool.total(state.size)
  out = {"size": size, "source": None if state.source is None else pool.total(state.source)}
  if state.pos is not None:
    weighted = pool.total(jnp.nan_to_num(state.pos) * state.size[..., None])
    out["pos"] = alone_or(state.pos, weighted / jnp.maximum(size, 1e-12)[..., None])
  if state.valid is not None:
    out["valid"] = alone_or(state.valid, pool.total(state.valid.astype(jnp.float32)) > 0)
  if state.index is not None:
    out["index"] = alone_or(state.index, jnp.full(size.shape, -1, state.index.dtype))
  return TokenState(**out)


# ----- similarity and matching (ToMe, MCTF, K-Medoids, DPC-KNN) -----
def bipartite_similarity(metric):
  """Cosine similarity [B, nA, nB] of the A (even) to the B (odd) tokens, without gradient."""
  m = jax.lax.stop_gradient(metric.astype(jnp.float32))
  m = m / jnp.linalg.norm(m, axis=-1, keepdims=True)
  return jnp.einsum("bid,bjd->bij", m[:, ::2], m[:, 1::2])


def greedy_match(scores, r: int):
  """Bipartite soft matching's greedy step on scores [B, n, m]: rows ranked by their best score
  (ties by row) -> (the r best rows [B, r], the other rows [B, n - r] in rank order, the best
  column of each of the r rows [B, r])."""
  node_max, node_idx = scores.max(-1), scores.argmax(-1)
  order = jnp.argsort(-node_max, axis=-1, stable=True)
  src = order[:, :r]
  return src, order[:, r:], jnp.take_along_axis(node_idx, src, axis=1)


def pairwise_dist(x):
  """Euclidean distances [B, N, N] through the Gram matrix (torch.cdist's default for N > 25)."""
  sq = (x * x).sum(-1)
  d2 = sq[:, :, None] + sq[:, None, :] - 2.0 * jnp.einsum("bnd,bmd->bnm", x, x)
  return jnp.sqrt(jnp.maximum(d2, 0.0))


# ----- MACs of a reducer's own work (`Reducer.macs(n, width, **plan kwargs)`) -----
def selection_macs(cls, n: int, width: int, **kwargs) -> int:
  """A pure selection's count, for `macs = classmethod(selection_macs)`: comparisons, sorts and
  gathers are no multiply-accumulates."""
  del cls, n, width, kwargs
  return 0
