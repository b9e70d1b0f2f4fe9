"""Analytic multiply-accumulates of a (possibly token-reduced) ViT (spec §0.2).

Per block with n tokens (prefix included) and width D: attention 4 n D^2 (qkv + output projection)
+ 2 n^2 D (QK^T and PV); MLP 2 n D mlp_dim (8 n D^2 for mlp_dim = 4D). In a `mid`-slot block the
attention runs at the count before the reduction and the MLP at the count after it; in a `pre`
block both run after it; an `ahead` block (MCTF) also computes its pre-merge Q, K and QK^T.
Patch embedding: num_patches * patch^2 * channels * D. The classifier head is left out, as in
the EViT table (DeiT-S: 4.60 G unreduced; EViT 4.02/3.48/3.03/2.63/2.31 G at kr 0.9..0.5).
"""
import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class BlockCounts:
  """Tokens (prefix included) seen by one block's parts."""
  n_in: int      # entering the block
  n_attn: int    # the attention runs on
  n_mlp: int     # the MLP runs on
  slot: str = "" # the reducer slot at this block ("" without a reducer)


def attention_macs(n: int, width: int) -> int:
  return 4 * n * width * width + 2 * n * n * width


def mlp_macs(n: int, width: int, mlp_dim: int) -> int:
  return 2 * n * width * mlp_dim


AHEAD_MODES = ("recompute", "reference")


def block_macs(c: BlockCounts, width: int, mlp_dim: int, ahead: str = "recompute") -> int:
  """One block. ahead="recompute": our MCTF path (pre-merge Q, K, QK^T, then a full attention on
  the merged tokens); "reference": MCTF's default, which reuses the merged map (V, PV and the
  output projection at the merged count; 2.58 G for DeiT-S r=16 vs the README's 2.60)."""
  if ahead not in AHEAD_MODES:
    raise ValueError(f"ahead must be one of {AHEAD_MODES}, got {ahead!r}")
  total = attention_macs(c.n_attn, width) + mlp_macs(c.n_mlp, width, mlp_dim)
  if c.slot == "ahead":
    pre = 2 * c.n_in * width * width + c.n_in * c.n_in * width
    if ahead == "reference":
      total -= 2 * c.n_attn * width * width + c.n_attn * c.n_attn * width
    total += pre
  return total


def vit_macs(counts: Sequence[BlockCounts], *, width: int, mlp_dim: int, num_patches: int,
             patch_size: int, channels: int = 3, ahead: str = "recompute") -> int:
  """Total MACs of the encoder and patch embedding for the given per-block counts."""
  embed = num_patches * patch_size * patch_size * channels * width
  return embed + sum(block_macs(c, width, mlp_dim, ahead) for c in counts)


def counts_from_stages(num_tokens: int, depth: int, reductions: dict, slot: str = "mid") -> list:
  """Per-block counts from {block: tokens after its reduction} (prefix included)."""
  out, n = [], num_tokens
  for i in range(depth):
    if i in reductions:
      m = reductions[i]
      attn = n if slot == "mid" else m
      out.append(BlockCounts(n, attn, m, slot))
      n = m
    else:
      out.append(BlockCounts(n, n, n))
  return out


def block_counts(model, channels: int = 3) -> list:
  """Per-block token counts of a built ViT, read from shapes only (no compile, no FLOPs).

  Works for every reducer: it traces `model.init` abstractly and reads out["block_i"].
  """
  plan = model.reduction_plan()
  images = jax.ShapeDtypeStruct((1, *model.image_size, channels), jnp.float32)
  init = functools.partial(model.init_with_output, train=False)
  (_, out), _ = jax.eval_shape(init, jax.random.key(0), images)
  n, counts = out["stem"].shape[1], []
  for i in range(model.depth):
    m = out[f"block_{i}"].shape[1]
    slot = "" if plan[i] is None else plan[i][0].slot
    counts.append(BlockCounts(n, n if slot == "mid" else m, m, slot))
    n = m
  return counts


def model_macs(model, channels: int = 3, ahead: str = "recompute") -> int:
  """Analytic MACs of a built ViT (one image)."""
  grid = model.grid
  return vit_macs(block_counts(model, channels), width=model.width, mlp_dim=model.mlp_dim,
                  num_patches=grid[0] * grid[1], patch_size=model.patch_size, channels=channels,
                  ahead=ahead)
