"""Flash sigmoid attention in Pallas (Sigmoid Self-Attention, Ramapuram et al.; FlashSigmoid).

y_i = sum_j sigma(q_i.k_j / sqrt(d) + bias_j + b) v_j with b = -log n (the attention_zoo `sigmoid`
card, G2). The weights are elementwise, so the kernel keeps no row max or sum and stores no
statistics: the forward is a blocked P.V, and the backward needs only
d s_ij = (dy_i . v_j) sigma_ij (1 - sigma_ij)   (no softmax delta term).
Same tiling, padding, layouts and backends as `flash_attention` (see `vitjax.kernels.common`).

Token sizes (zoo R2: a token of size s_j acts like s_j copies) multiply key j's weight; that is
folded into V (sum_j s_j sigma_ij v_j = sum_j sigma_ij (s_j v_j)) outside the kernel, and the
default b becomes -log sum_j s_j over the unmasked keys.
"""
import functools
from typing import Optional

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from vitjax.kernels import common


def _sigmoid(x):
  # 1 / (1 + e^-x): exact 0 at the clamped common.NEG (e^1e30 = inf), no logistic primitive needed
  return 1.0 / (1.0 + jnp.exp(-x))


# ---------------------------------------------------------------- forward body (one head)
def _fwd_head(q_ref, k_ref, v_ref, bias, o_ref, *, lay, scale):
  q, t = q_ref[...], lay.t
  bk = t.block_k

  def step(j, acc):
    start = pl.multiple_of(j * bk, bk)
    k, v = k_ref[pl.ds(start, bk), :], v_ref[pl.ds(start, bk), :]
    w = _sigmoid(common.logits(q, k, scale, bias(start, bk)))
    return acc + jnp.dot(w.astype(v.dtype), v, preferred_element_type=jnp.float32)

  acc = lax.fori_loop(0, t.num_k, step, jnp.zeros(q.shape, jnp.float32))
  o_ref[...] = acc.astype(o_ref.dtype)


# ---------------------------------------------------------------- backward math
# (weights are `_sigmoid`; the loops are `common.dq_head` / `common.dkdv_head`)
def _score_grad(w, dw):
  return dw * w * (1.0 - w)


# ---------------------------------------------------------------- launches
def _forward(q, k, v, bias, pair, *, scale, **launch):
  p = common.problem(q, k, v, bias, pair, **launch)
  (o,) = p.over_queries(functools.partial(_fwd_head, scale=scale), out_tokens=[q.dtype],
                        name="flash_sigmoid_fwd")
  return o


def _backward(q, k, v, bias, pair, do, *, scale, **launch):
  p = common.problem(q, k, v, bias, pair, backward=True, **launch)
  return p.gradients(do, [], weights=_sigmoid, score_grad=_score_grad, scale=scale,
                     name="flash_sigmoid")


_flash_sigmoid = common.differentiable(_forward, _backward, saves_outputs=False)


# ---------------------------------------------------------------- public API
def default_offset(bias, key_weight, b: int, nk: int):
  """b = -log n, n = sum of key weights (1 each without sizes) over keys whose bias is not -inf.

  bias: None or [B, Nk] float32; key_weight: None or [B, Nk]. Returns [B] float32.
  """
  w = jnp.ones((b, nk), jnp.float32) if key_weight is None else key_weight.astype(jnp.float32)
  if bias is not None:
    w = jnp.where(jnp.isneginf(bias), 0.0, w)
  return -jnp.log(w.sum(axis=-1))


def sigmoid_attention(q, k, v, bias=None, *, key_weight=None, offset=None,
                      scale: Optional[float] = None, backend: Optional[str] = None, blocks=None,
                      heads=None):
  """Sigmoid attention y_i = sum_j w_j sigma(scale q_i.k_j + bias_j + offset) v_j.

  Args:
    q: [B, Nq, H, d]; k, v: [B, Nk, H, d]; float32 or bfloat16; d in {32, 64, 128}.
    bias: None or an additive per-key bias broadcastable to [B, 1, 1, Nk]; -inf masks a key.
    key_weight: None or [B, Nk] multiplicative key weights (token sizes, zoo R2).
    offset: the sigmoid bias b: None for -log n (see `default_offset`), a float, or [B].
    scale: logit scale (static); None for 1/sqrt(d) (the official `attn_temp` t gives
      exp(t)/sqrt(d)).
    backend, blocks, heads: as in `flash_attention.attention_with_lse`.
  Returns: [B, Nq, H, d] in the input dtype. Differentiable in q, k, v, bias, key_weight, offset.
  """
  bias = common.check_inputs(q, k, v, bias)
  b, nk = k.shape[0], k.shape[1]
  if key_weight is not None:
    key_weight = jnp.broadcast_to(key_weight, (b, nk))
    v = (v * key_weight[:, :, None, None].astype(v.dtype)).astype(v.dtype)
  if offset is None:
    offset = default_offset(bias, key_weight, b, nk)
  offset = jnp.broadcast_to(jnp.asarray(offset, jnp.float32), (b,))
  bias = offset[:, None] if bias is None else bias + offset[:, None]
  bias = jnp.broadcast_to(bias, (b, nk))
  blocks = None if blocks is None else tuple(blocks)
  scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
  return _flash_sigmoid(common.resolve(backend), blocks, heads, scale, q, k, v, bias, None)
