"""Flash attention (softmax) in Pallas: forward, backward (custom_vjp), log-sum-exp.

y_i = sum_j softmax_j(q_i.k_j / sqrt(d) + bias_j) v_j, computed block by block over keys with the
online softmax (running max m, running sum l, rescaled accumulator), never materialising the
[N, N] weights. Inputs are [B, N, H, d] (float32 or bfloat16; statistics and accumulators are
float32), any N (padded to the tile; padded keys are masked with -inf), head dims 32/64/128, an
optional additive per-key bias [B, 1, 1, N] (ToMe's log-size; -inf masks a key), and an optional
full (pair) bias added to every score: s_ij = q_i.k_j / sqrt(d) + bias_j + pair_ij, of shape
[H, Nq, Nk] (the same for every example: a relative position bias) or [G, H, Nq, Nk] with G
dividing B, example b taking pair[b % G]. Window attention runs its windows as the batch
(images x nW, windows fastest) with pair = relative position bias + Swin's shift mask, [nW, H,
T, T]. The pair bias is read tile by tile with the scores, never expanded over the batch.

Backward (FlashAttention-2 style): delta_i = sum_d dy_i o_i - dlse_i, then two kernels, one per
query tile (dQ, looping over keys) and one per key tile (dK, dV and the key-bias gradient, looping
over queries in transposed form so that the row statistics broadcast along lanes). The lse
cotangent enters only through delta: d lse_i / d s_ij = p_ij. The pair-bias gradient is dS summed
over the examples sharing the bias, accumulated by the dQ kernel (see `vitjax.kernels.common`).

Backends, layouts, launches and the backward loops: see `vitjax.kernels.common`.
"""
import functools
from typing import Optional

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from vitjax.kernels import common
from vitjax.kernels.common import NEG


# ---------------------------------------------------------------- forward body (one head)
def _fwd_head(q_ref, k_ref, v_ref, bias, o_ref, lse_ref, *, lay, scale):
  q, t = q_ref[...], lay.t
  bq, bk = q.shape[0], t.block_k

  def step(j, carry):
    m, l, acc = carry
    start = pl.multiple_of(j * bk, bk)
    k, v = k_ref[pl.ds(start, bk), :], v_ref[pl.ds(start, bk), :]
    s = common.logits(q, k, scale, bias(start, bk))
    m_new = jnp.maximum(m, s.max(axis=1, keepdims=True))
    p = jnp.exp(s - m_new)
    alpha = jnp.exp(m - m_new)
    l = alpha * l + p.sum(axis=1, keepdims=True)
    acc = alpha * acc + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return m_new, l, acc

  init = (jnp.full((bq, 1), NEG, jnp.float32), jnp.zeros((bq, 1), jnp.float32),
          jnp.zeros((bq, q.shape[1]), jnp.float32))
  m, l, acc = lax.fori_loop(0, t.num_k, step, init)
  o_ref[...] = (acc / l).astype(o_ref.dtype)
  lse_ref[...] = lay.to_row(m + jnp.log(l))


# ---------------------------------------------------------------- backward math
# (the loops are `common.dq_head` / `common.dkdv_head`)
def _weights(s, lse, delta):
  del delta
  return jnp.exp(s - lse)


def _score_grad(p, dp, lse, delta):
  del lse
  return p * (dp - delta)


# ---------------------------------------------------------------- launches
def _forward(q, k, v, bias, pair, *, scale, **launch):
  p = common.problem(q, k, v, bias, pair, **launch)
  # a tuple: the (dy, dlse) cotangents that callers pass back have that structure
  return tuple(p.over_queries(functools.partial(_fwd_head, scale=scale), out_tokens=[q.dtype],
                              out_rows=1, name="flash_fwd"))


def _backward(q, k, v, bias, pair, out, cts, *, scale, **launch):
  (o, lse), (do, dlse) = out, cts
  # delta_i = dy_i . o_i - dlse_i (the lse cotangent folds in here), float32, [B, H, Nq]
  delta = jnp.einsum("bnhd,bnhd->bhn", do.astype(jnp.float32), o.astype(jnp.float32)) - dlse
  p = common.problem(q, k, v, bias, pair, backward=True, **launch)
  # padded queries get lse = +inf, so their weights exp(s - lse) are exactly 0 whatever the bias
  return p.gradients(do, [p.rows(lse, jnp.inf), p.rows(delta)], weights=_weights,
                     score_grad=_score_grad, scale=scale, name="flash")


_flash = common.differentiable(_forward, _backward, saves_outputs=True)


# ---------------------------------------------------------------- public API
def attention_with_lse(q, k, v, bias=None, *, pair_bias=None, scale: Optional[float] = None,
                       backend: Optional[str] = None, blocks=None, heads=None):
  """Softmax attention and its log-sum-exp.

  Args:
    q: [B, Nq, H, d]; k, v: [B, Nk, H, d]; float32 or bfloat16; d in {32, 64, 128}.
    bias: None or an additive per-key logit bias broadcastable to [B, 1, 1, Nk] (float32; -inf
      masks a key). Differentiable.
    pair_bias: None or an additive bias of every (query, key) pair, [H, Nq, Nk] for all examples
      or [G, H, Nq, Nk] with G dividing B, example b adding pair_bias[b % G] (float32; -inf
      masks a pair). Differentiable: its gradient sums dS over the examples that share it.
    scale: logit scale (static); None for 1/sqrt(d).
    backend: None (chosen when lowering: Mosaic on TPU, Triton on GPU, the TPU kernel interpreted
      elsewhere) or one of `common.BACKENDS`.
    blocks: (block_q, block_k) to override the tiling table; heads: heads per TPU program.
  Returns:
    y [B, Nq, H, d] in the input dtype and lse [B, H, Nq] float32, where
    lse_i = log sum_j exp(scale q_i.k_j + bias_j + pair_bias_ij).
  """
  bias = common.check_inputs(q, k, v, bias)
  pair = common.check_pair_bias(pair_bias, q, k)
  backend = common.resolve(backend)
  blocks = None if blocks is None else tuple(blocks)
  scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
  return _flash(backend, blocks, heads, scale, q, k, v, bias, pair)


def attention(q, k, v, bias=None, **kwargs):
  """Softmax attention [B, Nq, H, d]; see `attention_with_lse`."""
  return attention_with_lse(q, k, v, bias, **kwargs)[0]


def cls_probs_from_lse(q_cls, k, bias, lse_cls, scale: Optional[float] = None):
  """Exact softmax row of one query (the [CLS] token) from the kernel's lse, in O(N d H).

  q_cls [B, H, d], k [B, N, H, d], bias None or broadcastable to [B, 1, 1, N], lse_cls [B, H]
  (lse[:, :, cls_index] of `attention_with_lse`) -> probabilities [B, H, N] float32.
  """
  scale = q_cls.shape[-1] ** -0.5 if scale is None else scale
  logits = jnp.einsum("bhd,bnhd->bhn", q_cls, k, preferred_element_type=jnp.float32) * scale
  if bias is not None:
    b, n = k.shape[0], k.shape[1]
    logits = logits + jnp.broadcast_to(bias, (b, 1, 1, n)).reshape(b, 1, n).astype(jnp.float32)
  return jnp.exp(logits - lse_cls[..., None].astype(jnp.float32))
