"""Analytic multiply-accumulates of a (possibly token-reduced) ViT (spec §0.2).

Per block with n tokens (prefix included) and width D: the attention's own count from its registry
entry (`macs(n, width, heads, **options)`; MHSA: 4 n D^2 for qkv and output projections + 2 n^2 D
for QK^T and PV) and the MLP's 2 n D mlp_dim (8 n D^2 for mlp_dim = 4D). After an after-attention
reduction the attention runs at the count before it and the MLP at the count after it; after a
before-attention one both run after it; a one-step-ahead block (MCTF) also computes its pre-merge
Q, K and QK^T. Patch embedding: num_patches * patch^2 * channels * D. The classifier head is left
out, as in the EViT table (DeiT-S: 4.60 G unreduced; EViT 4.02/3.48/3.03/2.63/2.31 G at kr 0.9..0.5).
"""
import dataclasses
import functools
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp

from vitjax import attention as attn_lib
from vitjax.tokens import base


@dataclasses.dataclass(frozen=True)
class BlockCounts:
  """Tokens (prefix included) seen by one block's parts."""
  n_in: int      # entering the block
  n_attn: int    # the attention runs on
  n_mlp: int     # the MLP runs on
  ahead: bool = False  # the block also scored the n_in unreduced tokens with its attention (MCTF)


def attention_macs(n: int, width: int) -> int:
  """MHSA: qkv and output projections + QK^T and PV."""
  return 4 * n * width * width + 2 * n * n * width


def mlp_macs(n: int, width: int, mlp_dim: int) -> int:
  return 2 * n * width * mlp_dim


AHEAD_MODES = ("recompute", "reference")


def block_macs(c: BlockCounts, width: int, mlp_dim: int, ahead: str = "recompute",
               attn_macs: Optional[Callable[[int], int]] = None) -> int:
  """One block; attn_macs(n): the attention's MACs on n tokens (MHSA's without it).

  ahead="recompute": our MCTF path (pre-merge Q, K, QK^T, then a full attention on the merged
  tokens); "reference": MCTF's default, which reuses the merged map (V, PV and the output
  projection at the merged count; 2.58 G for DeiT-S r=16 vs the README's 2.60).
  """
  if ahead not in AHEAD_MODES:
    raise ValueError(f"ahead must be one of {AHEAD_MODES}, got {ahead!r}")
  attn = attn_macs or (lambda n: attention_macs(n, width))
  total = attn(c.n_attn) + mlp_macs(c.n_mlp, width, mlp_dim)
  if c.ahead:
    pre = 2 * c.n_in * width * width + c.n_in * c.n_in * width
    if ahead == "reference":
      total -= 2 * c.n_attn * width * width + c.n_attn * c.n_attn * width
    total += pre
  return total


def vit_macs(counts: Sequence[BlockCounts], *, width: int, mlp_dim: int, num_patches: int,
             patch_size: int, channels: int = 3, ahead: str = "recompute",
             attn_macs: Optional[Sequence[Callable[[int], int]]] = None) -> int:
  """Total MACs of the encoder and patch embedding for the given per-block counts."""
  embed = num_patches * patch_size * patch_size * channels * width
  fns = attn_macs or [None] * len(counts)
  return embed + sum(block_macs(c, width, mlp_dim, ahead, fn) for c, fn in zip(counts, fns))


def counts_from_stages(num_tokens: int, depth: int, reductions: dict,
                       hook: str = base.AFTER_ATTENTION, ahead: bool = False) -> list:
  """Per-block counts from {block: tokens after its reduction} (prefix included)."""
  out, n = [], num_tokens
  for i in range(depth):
    if i in reductions:
      m = reductions[i]
      out.append(BlockCounts(n, n if hook == base.AFTER_ATTENTION else m, m, ahead))
      n = m
    else:
      out.append(BlockCounts(n, n, n))
  return out


def block_counts(model, channels: int = 3) -> list:
  """Per-block token counts of a built ViT, read from shapes only (no compile, no FLOPs).

  Works for every reducer: it traces `model.init` abstractly and reads out["block_i"].
  """
  stage = model.stage()
  reducer, _ = stage.reducer()
  plans = stage.block_plans()
  images = jax.ShapeDtypeStruct((1, *model.image_size, channels), jnp.float32)
  init = functools.partial(model.init_with_output, train=False)
  (_, out), _ = jax.eval_shape(init, jax.random.key(0), images)
  n, counts = out["stem"].shape[1], []
  for i, bp in enumerate(plans):
    m = out[f"block_{i}"].shape[1]
    after = bp.reducer is not None and reducer.hook == base.AFTER_ATTENTION
    ahead = bp.reducer is not None and reducer.reads == base.OWN_BLOCK
    counts.append(BlockCounts(n, n if after else m, m, ahead))
    n = m
  return counts


def attention_macs_fns(model) -> list:
  """Per block: n -> the MACs of that block's attention mechanism (its registry entry)."""
  fns = []
  for spec in model.attention_specs():
    entry, options = attn_lib.registry.check(spec)
    fns.append(functools.partial(entry.macs, width=model.width, num_heads=model.num_heads,
                                 **options))
  return fns


def reducer_macs(model, channels: int = 3) -> int:
  """The reducer's own work in a built ViT (one image): each planned reduction's registered
  `macs(n, width, ...)`, n the tokens it receives. `model_macs` leaves it out, as the papers'
  tables do (EViT's fusion, for one, is under 0.1% of a DeiT-S forward)."""
  stage = model.stage()
  reducer, _ = stage.reducer()
  total = 0
  for c, bp in zip(block_counts(model, channels), stage.block_plans()):
    if bp.reducer is not None:
      total += reducer.macs(c.n_in, model.width, num_heads=model.num_heads,
                            num_prefix=stage.num_prefix, **bp.reducer)
  return total


def model_macs(model, channels: int = 3, ahead: str = "recompute") -> int:
  """Analytic MACs of a built ViT (one image), each block's attention counted as registered; the
  reducer's own work is `reducer_macs`. A backbone with its own count (Swin, PVTv2) gives it."""
  if hasattr(model, "macs"):
    return model.macs(channels)
  grid = model.grid
  return vit_macs(block_counts(model, channels), width=model.width, mlp_dim=model.mlp_dim,
                  num_patches=grid[0] * grid[1], patch_size=model.patch_size, channels=channels,
                  ahead=ahead, attn_macs=attention_macs_fns(model))
