"""The token-reducer contract: (tokens, token state, attention aux) -> (fewer tokens, new state).

Output counts are Python ints fixed when the model is built (`Reducer.plan`), so shapes stay static
under jit. Token layout: [prefix (CLS, dist, registers) | image tokens | tokens made by reducers].
"""
from typing import Any, ClassVar, Mapping, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class TokenState:
  """Per-token bookkeeping that travels with the tokens through every reduction."""
  size: jax.Array                        # [B, N] float32: patches a token stands for
  source: Optional[jax.Array] = None     # [B, N, N0] float32: which input tokens it came from
  pos: Optional[jax.Array] = None        # [B, N, 2] (row, col) in patch units, NaN for prefix
  # [B, N] bool for mask-mode methods; DynamicViT training stores its {0, 1} float keep policy
  # here, whose straight-through gradient reaches attention (see attention.base.policy_key_bias)
  valid: Optional[jax.Array] = None

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
  return TokenState(size=size, source=source, pos=pos)


def take_tokens(t: Optional[jax.Array], idx: jax.Array) -> Optional[jax.Array]:
  """Gathers tokens along axis 1: t [B, N, ...], idx [B, K] -> [B, K, ...]."""
  if t is None:
    return None
  idx = idx.reshape(idx.shape + (1,) * (t.ndim - 2))
  return jnp.take_along_axis(t, idx, axis=1)


def take_state(state: TokenState, idx: jax.Array) -> TokenState:
  """Keeps the tokens at `idx` [B, K] in every field of the state."""
  return TokenState(size=take_tokens(state.size, idx), source=take_tokens(state.source, idx),
                    pos=take_tokens(state.pos, idx), valid=take_tokens(state.valid, idx))


class Reducer(nn.Module):
  """Base of every token reducer. Subclasses set the class variables and implement __call__."""
  num_prefix: int = 1
  dtype: Any = jnp.float32

  # aux signals read from the attention layer (see vitjax.attention.base.AUX_FIELDS)
  needs: ClassVar[tuple] = ()
  # "mid": after the attention residual, before the MLP; "pre": before the block's attention
  slot: ClassVar[str] = "mid"

  @classmethod
  def plan(cls, options: dict, *, depth: int, num_patches: int, num_prefix: int) -> list:
    """Per block: None (no reduction there) or the static kwargs of that block's reducer."""
    raise NotImplementedError

  def __call__(self, x, state: TokenState, aux: dict, *, deterministic: bool = True):
    raise NotImplementedError


# ----- helpers shared by the methods that reduce at a few locations to a cumulative count -----
DEFAULT_LOCATIONS = (3, 6, 9)  # 0-indexed blocks (DynamicViT, Haurum et al. benchmark)


def cumulative_schedule(name: str, options: dict, *, depth: int, num_patches: int,
                        own: Mapping = ()) -> tuple:
  """Parses `keep_rate` / `locations` and the method's own options.

  Counts follow the cumulative keep-rate definition, n_s = floor(N0 * kr^s) for s = 1, 2, ...,
  with exactly the reference expression `int(N0 * kr ** s)` (float64 on the host). A sequence
  `keep_rate` gives the cumulative ratio of each location directly (DynamicViT's `token_ratio`).
  own: {option: default} of the method. Returns (locations, ratios, counts, own options).
  """
  opts = dict(options)
  valid = {"keep_rate", "locations", *own}
  unknown = sorted(set(opts) - valid)
  if unknown:
    raise ValueError(f"token reducer {name!r} has no option(s) {unknown}; valid: {sorted(valid)}")
  if "keep_rate" not in opts:
    raise ValueError(f"token reducer {name!r} needs keep_rate, a float in (0, 1]")
  locs = tuple(int(l) for l in opts.pop("locations", DEFAULT_LOCATIONS))
  if not locs or any(not 0 <= l < depth for l in locs) or list(locs) != sorted(set(locs)):
    raise ValueError(f"token reducer {name!r}: locations {locs} must be increasing block indices "
                     f"in 0..{depth - 1}")
  kr = opts.pop("keep_rate")
  if isinstance(kr, (int, float)):
    ratios = [float(kr) ** (s + 1) for s in range(len(locs))]
    rates = [float(kr)]
  else:
    ratios = rates = [float(r) for r in kr]
    if len(ratios) != len(locs):
      raise ValueError(f"token reducer {name!r}: {len(ratios)} keep rates for {len(locs)} "
                       "locations")
  if any(not 0.0 < r <= 1.0 for r in rates):
    raise ValueError(f"token reducer {name!r}: keep_rate {kr} must lie in (0, 1]")
  counts = [int(num_patches * r) for r in ratios]
  if min(counts) < 1:
    raise ValueError(f"token reducer {name!r}: keep_rate {kr} leaves no token at a location "
                     f"(counts {counts} of {num_patches} patches)")
  return locs, ratios, counts, {**dict(own), **opts}


def merge_state(state: TokenState, weights: jax.Array, num_prefix: int) -> TokenState:
  """State of new tokens y_m = sum_j weights[b, m, j] * x_j made from the image tokens.

  weights [B, M, N - num_prefix]: a one-hot assignment (hard merges) adds sizes and sources; soft
  weights give assignment-weighted sizes and sources. pos is the (weights * size)-weighted mean.
  The prefix passes through unchanged; new tokens are valid.
  """
  p = num_prefix
  w = weights.astype(jnp.float32)
  size = jnp.einsum("bmn,bn->bm", w, state.size[:, p:])
  out = {"size": jnp.concatenate([state.size[:, :p], size], axis=1)}
  if state.source is not None:
    src = jnp.einsum("bmn,bnk->bmk", w, state.source[:, p:])
    out["source"] = jnp.concatenate([state.source[:, :p], src], axis=1)
  if state.pos is not None:
    ws = w * state.size[:, None, p:]
    pos = jnp.einsum("bmn,bnc->bmc", ws, state.pos[:, p:])
    pos = pos / jnp.maximum(ws.sum(-1, keepdims=True), 1e-12)
    out["pos"] = jnp.concatenate([state.pos[:, :p], pos], axis=1)
  if state.valid is not None:
    ones = jnp.ones(w.shape[:2], state.valid.dtype)
    out["valid"] = jnp.concatenate([state.valid[:, :p], ones], axis=1)
  return TokenState(**out)
