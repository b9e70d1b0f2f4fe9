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

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from vitjax.kernels import common
from vitjax.kernels.common import NEG, NT


def _sigmoid(x):
  # 1 / (1 + e^-x): exact 0 at the clamped NEG (e^1e30 = inf), no logistic primitive needed
  return 1.0 / (1.0 + jnp.exp(-x))


def _weights(a, b, scale, bias):
  """sigma(a @ b.T * scale + bias) in float32."""
  s = lax.dot_general(a, b, NT, preferred_element_type=jnp.float32) * scale
  if bias is not None:
    s = s + bias
  return _sigmoid(jnp.maximum(s, NEG))


# ---------------------------------------------------------------- kernel bodies (one head)
def _fwd_head(q_ref, k_ref, v_ref, b_ref, o_ref, *, t, scale):
  q = q_ref[...]
  bk = t.block_k

  def step(j, acc):
    start = pl.multiple_of(j * bk, bk)
    k, v = k_ref[pl.ds(start, bk), :], v_ref[pl.ds(start, bk), :]
    w = _weights(q, k, scale, None if b_ref is None else b_ref[:, pl.ds(start, bk)])
    return acc + jnp.dot(w.astype(v.dtype), v, preferred_element_type=jnp.float32)

  acc = lax.fori_loop(0, t.num_k, step, jnp.zeros(q.shape, jnp.float32))
  o_ref[...] = acc.astype(o_ref.dtype)


def _dq_head(q_ref, k_ref, v_ref, b_ref, do_ref, dq_ref, *, t, scale):
  q, do = q_ref[...], do_ref[...]
  bk = t.block_k

  def step(j, dq):
    start = pl.multiple_of(j * bk, bk)
    k, v = k_ref[pl.ds(start, bk), :], v_ref[pl.ds(start, bk), :]
    w = _weights(q, k, scale, None if b_ref is None else b_ref[:, pl.ds(start, bk)])
    ds = lax.dot_general(do, v, NT, preferred_element_type=jnp.float32) * w * (1.0 - w)
    return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

  dq = lax.fori_loop(0, t.num_k, step, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkdv_head(q_ref, k_ref, v_ref, b_col, do_ref, dk_ref, dv_ref, *, t, scale):
  """dK, dV of one key tile in transposed form (keys x queries); returns the bias-grad column."""
  k, v = k_ref[...], v_ref[...]
  bq = t.block_q

  def step(i, carry):
    dk, dv, db = carry
    start = pl.multiple_of(i * bq, bq)
    q, do = q_ref[pl.ds(start, bq), :], do_ref[pl.ds(start, bq), :]
    wt = _weights(k, q, scale, b_col)
    dv = dv + jnp.dot(wt.astype(do.dtype), do, preferred_element_type=jnp.float32)
    dst = lax.dot_general(v, do, NT, preferred_element_type=jnp.float32) * wt * (1.0 - wt)
    dk = dk + jnp.dot(dst.astype(q.dtype), q, preferred_element_type=jnp.float32)
    return dk, dv, db + dst.sum(axis=1, keepdims=True)

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv, db = lax.fori_loop(0, t.num_q, step, (zeros, zeros, jnp.zeros((k.shape[0], 1),
                                                                         jnp.float32)))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)
  return db


# ---------------------------------------------------------------- kernels (a program's heads)
def _fwd_kernel(*refs, lay, has_bias, scale):
  q_ref, k_ref, v_ref, *rest = refs
  b_ref = rest.pop(0) if has_bias else None
  (o_ref,) = rest
  for h in range(lay.t.heads if lay.tpu else 1):
    v_ = functools.partial(lay.view, h=h)
    _fwd_head(v_(q_ref), v_(k_ref), v_(v_ref), b_ref, v_(o_ref), t=lay.t, scale=scale)


def _dq_kernel(*refs, lay, has_bias, scale):
  q_ref, k_ref, v_ref, *rest = refs
  b_ref = rest.pop(0) if has_bias else None
  do_ref, dq_ref = rest
  for h in range(lay.t.heads if lay.tpu else 1):
    v_ = functools.partial(lay.view, h=h)
    _dq_head(v_(q_ref), v_(k_ref), v_(v_ref), b_ref, v_(do_ref), v_(dq_ref), t=lay.t, scale=scale)


def _dkdv_kernel(*refs, lay, has_bias, scale):
  q_ref, k_ref, v_ref, *rest = refs
  b_ref = rest.pop(0) if has_bias else None
  do_ref, dk_ref, dv_ref, *db_ref = rest
  b_col = None if b_ref is None else lay.to_col(b_ref[...])
  db = 0.0
  for h in range(lay.t.heads if lay.tpu else 1):
    v_ = functools.partial(lay.view, h=h)
    db = db + _dkdv_head(v_(q_ref), v_(k_ref), v_(v_ref), b_col, v_(do_ref), v_(dk_ref),
                         v_(dv_ref), t=lay.t, scale=scale)
  if db_ref:
    db_ref[0][...] = lay.to_row(db)


# ---------------------------------------------------------------- launches
def _vmem(lay, q_tokens, k_tokens, dtype, n_q_arrays):
  t, d = lay.t, lay.head_dim
  return common.vmem_bytes(*[((t.heads, q_tokens, d), dtype)] * n_q_arrays,
                           *[((t.heads, k_tokens, d), dtype)] * 2,
                           ((q_tokens, k_tokens), jnp.float32))


def _forward(q, k, v, bias, *, kind, interpret, blocks, heads, scale):
  b, nq, h, d = q.shape
  nk = k.shape[1]
  lay = common.layout(kind, nq, nk, h, d, interpret=interpret, blocks=blocks, heads=heads)
  t = lay.t
  kb = common.key_bias(bias, b, nk, t.nk_pad)
  args = [lay.prepare(q, t.nq_pad), lay.prepare(k, t.nk_pad), lay.prepare(v, t.nk_pad)]
  in_specs = [lay.tokens(t.block_q, True), lay.tokens(t.nk_pad, False),
              lay.tokens(t.nk_pad, False)]
  if kb is not None:
    args.append(kb)
    in_specs.append(lay.bias(t.nk_pad, False))
  kernel = functools.partial(_fwd_kernel, lay=lay, has_bias=kb is not None, scale=scale)
  o = lay.call(kernel, tiles=t.num_q, b=b, in_specs=in_specs,
               out_specs=lay.tokens(t.block_q, True),
               out_shape=jax.ShapeDtypeStruct(args[0].shape, q.dtype),
               vmem=_vmem(lay, t.block_q, t.nk_pad, q.dtype, 2), name="flash_sigmoid_fwd")(*args)
  return lay.finish(o, nq)


def _backward(q, k, v, bias, do, *, kind, interpret, blocks, heads, scale):
  b, nq, h, d = q.shape
  nk = k.shape[1]
  lay = common.layout(kind, nq, nk, h, d, interpret=interpret, blocks=blocks, heads=heads,
                      backward=True)
  t = lay.t
  kb = common.key_bias(bias, b, nk, t.nk_pad)
  qx, dox = lay.prepare(q, t.nq_pad), lay.prepare(do, t.nq_pad)
  kx, vx = lay.prepare(k, t.nk_pad), lay.prepare(v, t.nk_pad)
  has_bias = kb is not None
  extra = [kb] if has_bias else []

  dq_specs = [lay.tokens(t.block_q, True), lay.tokens(t.nk_pad, False),
              lay.tokens(t.nk_pad, False)] + ([lay.bias(t.nk_pad, False)] if has_bias else [])
  dq = lay.call(functools.partial(_dq_kernel, lay=lay, has_bias=has_bias, scale=scale),
                tiles=t.num_q, b=b, in_specs=dq_specs + [lay.tokens(t.block_q, True)],
                out_specs=lay.tokens(t.block_q, True),
                out_shape=jax.ShapeDtypeStruct(qx.shape, q.dtype),
                vmem=_vmem(lay, t.block_q, t.nk_pad, q.dtype, 3), name="flash_sigmoid_dq")(
                    qx, kx, vx, *extra, dox)

  want_db = bias is not None
  dkv_specs = [lay.tokens(t.nq_pad, False), lay.tokens(t.block_k, True),
               lay.tokens(t.block_k, True)] + ([lay.bias(t.block_k, True)] if has_bias else [])
  out_specs = [lay.tokens(t.block_k, True), lay.tokens(t.block_k, True)]
  out_shape = [jax.ShapeDtypeStruct(kx.shape, k.dtype), jax.ShapeDtypeStruct(vx.shape, v.dtype)]
  if want_db:
    out_specs.append(lay.group_rows(t.block_k))
    out_shape.append(jax.ShapeDtypeStruct((b, h // t.heads, 1, t.nk_pad), jnp.float32))
  outs = lay.call(functools.partial(_dkdv_kernel, lay=lay, has_bias=has_bias, scale=scale),
                  tiles=t.num_k, b=b, in_specs=dkv_specs + [lay.tokens(t.nq_pad, False)],
                  out_specs=out_specs, out_shape=out_shape,
                  vmem=_vmem(lay, t.nq_pad, t.block_k, q.dtype, 2),
                  name="flash_sigmoid_dkdv")(qx, kx, vx, *extra, dox)
  dbias = outs[2].sum(axis=(1, 2))[:, :nk] if want_db else None
  return lay.finish(dq, nq), lay.finish(outs[0], nk), lay.finish(outs[1], nk), dbias


# ---------------------------------------------------------------- differentiable core
def _run(backend, blocks, heads, scale, fn, *args):
  def tpu(*a, interpret):
    return fn(*a, kind="tpu", interpret=interpret, blocks=blocks, heads=heads, scale=scale)

  def gpu(*a, interpret):
    return fn(*a, kind="gpu", interpret=interpret, blocks=blocks, heads=heads, scale=scale)

  return common.dispatch(backend, tpu, gpu, *args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _flash_sigmoid(backend, blocks, heads, scale, q, k, v, bias):
  return _run(backend, blocks, heads, scale, _forward, q, k, v, bias)


def _fwd_rule(backend, blocks, heads, scale, q, k, v, bias):
  return _run(backend, blocks, heads, scale, _forward, q, k, v, bias), (q, k, v, bias)


def _bwd_rule(backend, blocks, heads, scale, res, do):
  return _run(backend, blocks, heads, scale, _backward, *res, do)


_flash_sigmoid.defvjp(_fwd_rule, _bwd_rule)


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
  return _flash_sigmoid(common.resolve(backend), blocks, heads, scale, q, k, v, bias)
