"""G21 `causal_postcls`: iLLaMA's causal attention with a post-sequence [CLS] and a soft mask.

iLLaMA (Wang et al. 2024, "Adapting LLaMA Decoder to Vision Transformer") orders tokens as
[patches in raster order, CLS] so that the CLS, last in a causal sequence, sees every patch.
Official form (techmonsterwang/iLLaMA): P = softmax(S) * M with the soft mask
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
The soft-mask ratio r: `r` if set (a constant), else from ctx.step with `schedule`:
  "constant": r = 1 for step < cutoff_steps, then 0 (iLLaMA-T: 50 of 300 epochs);
  "linear":   r = r0 * max(0, 1 - step / cutoff_steps).
r is a traced scalar, so changing it never recompiles. Without a step (evaluation, or a model that
does not pass one) r = 0: the trained model is causal.
`causal_impl="pre_softmax_mask"` (own design) adds log M before the softmax instead, so rows sum to 1.
The CLS row equals the unmasked softmax row, so `cls_probs` is exact.
"""
from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from vitjax.attention import registry
from vitjax.attention.base import (Attention, AttnContext, Capabilities, additive_key_bias,
                                   collect_aux, weighted_values)
from vitjax.attention.mhsa import softmax_weights

IMPLS = ("post_softmax_mult", "pre_softmax_mask")
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


def mask_ratio(r: Optional[float], step, schedule: str, cutoff: int, r0: float):
  if r is not None:
    return jnp.asarray(r, jnp.float32)
  if step is None:
    return jnp.asarray(0.0, jnp.float32)
  step = jnp.asarray(step, jnp.float32)
  if schedule == "constant":
    return jnp.where(step < cutoff, 1.0, 0.0)
  if schedule == "linear":
    return r0 * jnp.clip(1.0 - step / max(cutoff, 1), 0.0, 1.0)
  raise ValueError(f"unknown mask schedule {schedule!r}; valid: {SCHEDULES}")


@registry.register(
    "causal_postcls", caps=Capabilities(causal=True),
    paper="iLLaMA: Adapting LLaMA Decoder to Vision Transformer (Wang et al. 2024)",
    complexity="O(N^2 D)")
class CausalPostCLS(Attention):
  """Softmax attention times iLLaMA's soft causal mask, with the CLS last in causal order."""
  r: Optional[float] = None
  schedule: str = "constant"
  cutoff_steps: int = 0
  r0: float = 1.0
  causal_impl: str = "post_softmax_mult"

  @nn.compact
  def __call__(self, x, ctx: Optional[AttnContext] = None, *, need=(), deterministic=True):
    if self.impl != "reference":
      raise ValueError(f"causal_postcls has only impl='reference', got {self.impl!r}")
    if self.causal_impl not in IMPLS:
      raise ValueError(f"unknown causal_impl {self.causal_impl!r}; valid: {IMPLS}")
    n = x.shape[1]
    cls_index = 0 if ctx is None else ctx.cls_index
    ratio = mask_ratio(self.r, None if ctx is None else ctx.step, self.schedule,
                       self.cutoff_steps, self.r0)
    mask = soft_mask(n, cls_index, ratio)
    q, k, v = self.project_qkv(x)
    bias = additive_key_bias(ctx, n)
    if self.causal_impl == "pre_softmax_mask":
      log_mask = jnp.where(mask > 0, jnp.log(jnp.where(mask > 0, mask, 1.0)), -jnp.inf)
      probs = softmax_weights(q, k, log_mask if bias is None else bias + log_mask)
    else:
      probs = softmax_weights(q, k, bias) * mask
    w = self.dropout_weights(probs, deterministic)
    y = weighted_values(w.astype(v.dtype), v)
    aux = collect_aux(need, probs=probs, q=q, k=k, v=v, ctx=ctx)
    return self.project_out(y, x.shape[-1], deterministic), aux
