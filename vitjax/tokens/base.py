"""The token-reducer contract: (tokens, token state, attention aux) -> (fewer tokens, new state).

Output counts are Python ints fixed when the model is built (`Reducer.plan`), so shapes stay static
under jit. Token layout: [prefix (CLS, dist, registers) | image tokens | tokens made by reducers].
"""
from typing import Any, ClassVar, Optional

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
  valid: Optional[jax.Array] = None      # [B, N] bool, for mask-mode methods

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
