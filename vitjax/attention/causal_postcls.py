"""G21 `causal_postcls`: iLLaMA's causal attention with a post-sequence [CLS] and a soft mask.

iLLaMA (Wang et al. 2024, "Adapting LLaMA Decoder to Vision Transformer"; official code:
https://github.com/techmonsterwang/iLLaMA) orders tokens as [patches in raster order, CLS] so that
the CLS, last in a causal sequence, sees every patch. Official form (models/illama.py):
P = softmax(S) * M with the soft mask
  M = r * 1 + (1 - r) * tril(1),
applied after the softmax, rows not renormalised; r goes from 1 (bidirectional) to 0 (causal).
Token order here: the plain ViT puts the CLS first (ctx.cls_index = 0). This module keeps the data
where it is and gives every token a causal rank instead: the CLS at `ctx.cls_index` (0, -1, ...) gets
the last rank, every other token keeps its relative order. Query i may see key j iff
rank(j) <= rank(i). For cls_index = -1 this is exactly iLLaMA's tril; for cls_index = 0 it is
iLLaMA's order with the CLS rolled to the end (the outputs equal those of the rolled sequence, rolled
back). Other prefix tokens (distillation, registers) come first in the causal order; tokens made by
a reducer sit wherever the reducer put them (iLLaMA suggests just before the CLS). Without a CLS
(cls_index=None) the order is the sequence order.

The soft-mask ratio r: `r` if set (a constant), else iLLaMA's schedule (mask_scheduler.py) over the
training progress p = step / total steps (ctx.progress), with the soft phase the first `cutoff` of
training (iLLaMA-T: 50 of 300 epochs, the default; S and B use "linear" with 50 and 25 epochs):
  "constant": r = r0 for p < cutoff, then 0;
  "linear":   r = r0 (1 - p / cutoff) for p < cutoff, then 0 (the official np.linspace(r0, 0, E)
              over the E soft iterations reaches 0 one iteration earlier).
r is a traced scalar, so changing it never recompiles. In evaluation (no ctx.progress) r = 0, the
causal mask: the official model evaluates with the ratio it holds, which is 0 when it is built
and at the end of its schedule (its evaluations during the soft phase use the current ratio).
`causal_impl="pre_softmax_mask"` (own design) adds log M before the softmax instead, so rows sum to 1.
The CLS row equals the unmasked softmax row, so `cls_probs` is exact.
"""
from typing import Optional

import jax.numpy as jnp

from vitjax.attention import registry
from vitjax.attention.base import Attention, Capabilities, quadratic_macs, softmax_weights

CAUSAL_IMPLS = ("post_softmax_mult", "pre_softmax_mask")
SCHEDULES = ("constant", "linear")


def causal_rank(n: int, cls_index: Optional[int]):
  """Causal order of the tokens: the CLS last, the others in sequence order."""
  idx = jnp.arange(n)
  if cls_index is None:
    return idx
  c = cls_index % n
  return jnp.where(idx == c, n - 1, jnp.where(idx > c, idx - 1, idx))


def soft_mask(n: int, cls_index: Optional[int], r):
  """M = r + (1 - r) * [rank_j <= rank_i], [N, N] float32."""
  rank = causal_rank(n, cls_index)
  allowed = (rank[None, :] <= rank[:, None]).astype(jnp.float32)
  return r + (1.0 - r) * allowed


def mask_ratio(r: Optional[float], progress, schedule: str, cutoff: float, r0: float):
  """The soft-mask ratio: the constant r, else the schedule at the training progress (0 without)."""
  if r is not None:
    return jnp.asarray(r, jnp.float32)
  if schedule not in SCHEDULES:
    raise ValueError(f"unknown mask schedule {schedule!r}; valid: {SCHEDULES}")
  if progress is None:
    return jnp.asarray(0.0, jnp.float32)
  p = jnp.asarray(progress, jnp.float32)
  soft = r0 if schedule == "constant" else r0 * (1.0 - p / max(cutoff, 1e-12))
  return jnp.where(p < cutoff, soft, 0.0).astype(jnp.float32)


@registry.register("causal_postcls", caps=Capabilities(causal=True),
                   paper="iLLaMA: Adapting LLaMA Decoder to Vision Transformer (Wang et al. 2024)",
                   official="https://github.com/techmonsterwang/iLLaMA", complexity="O(N^2 D)",
                   macs=quadratic_macs)
class CausalPostCLS(Attention):
  """Softmax attention times iLLaMA's soft causal mask, with the CLS last in causal order."""
  r: Optional[float] = None
  schedule: str = "constant"
  cutoff: float = 50 / 300   # fraction of training in the soft phase
  r0: float = 1.0
  causal_impl: str = "post_softmax_mult"

  def mix(self, x, q, k, v, bias, ctx, *, need, deterministic):
    if self.causal_impl not in CAUSAL_IMPLS:
      raise ValueError(f"unknown causal_impl {self.causal_impl!r}; valid: {CAUSAL_IMPLS}")
    progress = None if ctx is None else ctx.progress
    ratio = mask_ratio(self.r, progress, self.schedule, self.cutoff, self.r0)
    mask = soft_mask(x.shape[1], 0 if ctx is None else ctx.cls_index, ratio)
    if self.causal_impl == "pre_softmax_mask":
      log_mask = jnp.where(mask > 0, jnp.log(jnp.where(mask > 0, mask, 1.0)), -jnp.inf)
      return self.attend(q, k, v, log_mask if bias is None else bias + log_mask, ctx, need=need,
                         deterministic=deterministic, weights=softmax_weights)
    return self.attend(q, k, v, bias, ctx, need=need, deterministic=deterministic,
                       weights=lambda q, k, b: softmax_weights(q, k, b) * mask)
