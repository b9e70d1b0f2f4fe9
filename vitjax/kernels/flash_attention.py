"""Flash attention (softmax) in Pallas: forward, backward (custom_vjp), log-sum-exp.

y_i = sum_j softmax_j(q_i.k_j / sqrt(d) + bias_j) v_j, computed block by block over keys with the
online softmax (running max m, running sum l, rescaled accumulator), never materialising the
[N, N] weights. Inputs are [B, N, H, d] (float32 or bfloat16; statistics and accumulators are
float32), any N (padded to the tile; padded keys are masked with -inf), head dims 32/64/128, and
an optional additive per-key bias [B, 1, 1, N] (ToMe's log-size; -inf masks a key).

Backward (FlashAttention-2 style): delta_i = sum_d dy_i o_i - dlse_i, then two kernels, one per
query tile (dQ, looping over keys) and one per key tile (dK, dV and the key-bias gradient, looping
over queries in transposed form so that the row statistics broadcast along lanes). The lse
cotangent enters only through delta: d lse_i / d s_ij = p_ij.

Backends and layouts: see `vitjax.kernels.common`.
"""
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from vitjax.kernels import common
from vitjax.kernels.common import NEG, NT


# ---------------------------------------------------------------- kernel bodies (one head)
def _logits(a, b, scale, bias):
  """a @ b.T * scale (+ bias), float32, clamped to NEG so masked entries stay finite."""
  s = lax.dot_general(a, b, NT, preferred_element_type=jnp.float32) * scale
  if bias is not None:
    s = s + bias
  return jnp.maximum(s, NEG)


def _fwd_head(q_ref, k_ref, v_ref, b_ref, o_ref, lse_ref, *, t, scale, to_row):
  q = q_ref[...]
  bq, bk = q.shape[0], t.block_k

  def step(j, carry):
    m, l, acc = carry
    start = pl.multiple_of(j * bk, bk)
    k, v = k_ref[pl.ds(start, bk), :], v_ref[pl.ds(start, bk), :]
    s = _logits(q, k, scale, None if b_ref is None else b_ref[:, pl.ds(start, bk)])
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
  lse_ref[...] = to_row(m + jnp.log(l))


def _dq_head(q_ref, k_ref, v_ref, b_ref, do_ref, lse_ref, delta_ref, dq_ref, *, t, scale, to_col):
  q, do = q_ref[...], do_ref[...]
  lse, delta = to_col(lse_ref[...]), to_col(delta_ref[...])
  bk = t.block_k

  def step(j, dq):
    start = pl.multiple_of(j * bk, bk)
    k, v = k_ref[pl.ds(start, bk), :], v_ref[pl.ds(start, bk), :]
    p = jnp.exp(_logits(q, k, scale, None if b_ref is None else b_ref[:, pl.ds(start, bk)]) - lse)
    dp = lax.dot_general(do, v, NT, preferred_element_type=jnp.float32)
    ds = p * (dp - delta)
    return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

  dq = lax.fori_loop(0, t.num_k, step, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkdv_head(q_ref, k_ref, v_ref, b_col, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, t,
               scale):
  """dK, dV of one key tile; returns the key-bias gradient column (bk, 1).

  Works on transposed scores s^T (keys x queries): lse and delta are rows there, so they
  broadcast along lanes with no per-step relayout, and every matmul is a @ b or a @ b.T.
  """
  k, v = k_ref[...], v_ref[...]
  bq = t.block_q

  def step(i, carry):
    dk, dv, db = carry
    start = pl.multiple_of(i * bq, bq)
    q, do = q_ref[pl.ds(start, bq), :], do_ref[pl.ds(start, bq), :]
    lse, delta = lse_ref[:, pl.ds(start, bq)], delta_ref[:, pl.ds(start, bq)]
    pt = jnp.exp(_logits(k, q, scale, b_col) - lse)
    dv = dv + jnp.dot(pt.astype(do.dtype), do, preferred_element_type=jnp.float32)
    dpt = lax.dot_general(v, do, NT, preferred_element_type=jnp.float32)
    dst = pt * (dpt - delta)
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
  o_ref, lse_ref = rest
  for h in range(lay.t.heads if lay.tpu else 1):
    v_ = functools.partial(lay.view, h=h)
    _fwd_head(v_(q_ref), v_(k_ref), v_(v_ref), b_ref, v_(o_ref), v_(lse_ref), t=lay.t, scale=scale,
              to_row=lay.to_row)


def _dq_kernel(*refs, lay, has_bias, scale):
  q_ref, k_ref, v_ref, *rest = refs
  b_ref = rest.pop(0) if has_bias else None
  do_ref, lse_ref, delta_ref, dq_ref = rest
  for h in range(lay.t.heads if lay.tpu else 1):
    v_ = functools.partial(lay.view, h=h)
    _dq_head(v_(q_ref), v_(k_ref), v_(v_ref), b_ref, v_(do_ref), v_(lse_ref), v_(delta_ref),
             v_(dq_ref), t=lay.t, scale=scale, to_col=lay.to_col)


def _dkdv_kernel(*refs, lay, has_bias, scale):
  q_ref, k_ref, v_ref, *rest = refs
  b_ref = rest.pop(0) if has_bias else None
  do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *db_ref = rest
  b_col = None if b_ref is None else lay.to_col(b_ref[...])
  db = 0.0
  for h in range(lay.t.heads if lay.tpu else 1):
    v_ = functools.partial(lay.view, h=h)
    db = db + _dkdv_head(v_(q_ref), v_(k_ref), v_(v_ref), b_col, v_(do_ref), v_(lse_ref),
                         v_(delta_ref), v_(dk_ref), v_(dv_ref), t=lay.t, scale=scale)
  if db_ref:
    db_ref[0][...] = lay.to_row(db)


# ---------------------------------------------------------------- launches
def _vmem(lay, q_tokens, k_tokens, dtype, n_tok_arrays):
  t, d = lay.t, lay.head_dim
  return common.vmem_bytes(*[((t.heads, q_tokens, d), dtype)] * n_tok_arrays,
                           ((t.heads, k_tokens, d), dtype), ((t.heads, k_tokens, d), dtype),
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
  o_shape = jax.ShapeDtypeStruct(args[0].shape, q.dtype)
  lse_shape = jax.ShapeDtypeStruct((b, h, 1, t.nq_pad), jnp.float32)
  kernel = functools.partial(_fwd_kernel, lay=lay, has_bias=kb is not None, scale=scale)
  o, lse = lay.call(kernel, tiles=t.num_q, b=b, in_specs=in_specs,
                    out_specs=[lay.tokens(t.block_q, True), lay.rows(t.block_q, True)],
                    out_shape=[o_shape, lse_shape],
                    vmem=_vmem(lay, t.block_q, t.nk_pad, q.dtype, 2), name="flash_fwd")(*args)
  return lay.finish(o, nq), lse[:, :, 0, :nq]


def _backward(q, k, v, bias, o, lse, do, dlse, *, kind, interpret, blocks, heads, scale):
  b, nq, h, d = q.shape
  nk = k.shape[1]
  # delta_i = dy_i . o_i - dlse_i (the lse cotangent folds in here), float32, [B, H, Nq]
  delta = jnp.einsum("bnhd,bnhd->bhn", do.astype(jnp.float32), o.astype(jnp.float32)) - dlse
  lay = common.layout(kind, nq, nk, h, d, interpret=interpret, blocks=blocks, heads=heads,
                      backward=True)
  t = lay.t
  kb = common.key_bias(bias, b, nk, t.nk_pad)
  qx, dox = lay.prepare(q, t.nq_pad), lay.prepare(do, t.nq_pad)
  kx, vx = lay.prepare(k, t.nk_pad), lay.prepare(v, t.nk_pad)
  # padded queries get lse = +inf, so their weights exp(s - lse) are exactly 0 whatever the bias
  lse_r = common.stat_rows(lse, t.nq_pad, jnp.inf)
  delta_r = common.stat_rows(delta, t.nq_pad)
  has_bias = kb is not None
  extra = [kb] if has_bias else []

  # dQ: a program per query tile, keys looped inside
  dq_specs = [lay.tokens(t.block_q, True), lay.tokens(t.nk_pad, False),
              lay.tokens(t.nk_pad, False)] + ([lay.bias(t.nk_pad, False)] if has_bias else [])
  dq_specs += [lay.tokens(t.block_q, True), lay.rows(t.block_q, True), lay.rows(t.block_q, True)]
  dq = lay.call(functools.partial(_dq_kernel, lay=lay, has_bias=has_bias, scale=scale),
                tiles=t.num_q, b=b, in_specs=dq_specs, out_specs=lay.tokens(t.block_q, True),
                out_shape=jax.ShapeDtypeStruct(qx.shape, q.dtype),
                vmem=_vmem(lay, t.block_q, t.nk_pad, q.dtype, 3), name="flash_dq")(
                    qx, kx, vx, *extra, dox, lse_r, delta_r)

  # dK, dV (and the key-bias gradient): a program per key tile, queries looped inside
  want_db = bias is not None
  dkv_specs = [lay.tokens(t.nq_pad, False), lay.tokens(t.block_k, True),
               lay.tokens(t.block_k, True)] + ([lay.bias(t.block_k, True)] if has_bias else [])
  dkv_specs += [lay.tokens(t.nq_pad, False), lay.rows(t.nq_pad, False),
                lay.rows(t.nq_pad, False)]
  out_specs = [lay.tokens(t.block_k, True), lay.tokens(t.block_k, True)]
  out_shape = [jax.ShapeDtypeStruct(kx.shape, k.dtype), jax.ShapeDtypeStruct(vx.shape, v.dtype)]
  if want_db:
    out_specs.append(lay.group_rows(t.block_k))
    out_shape.append(jax.ShapeDtypeStruct((b, h // t.heads, 1, t.nk_pad), jnp.float32))
  outs = lay.call(functools.partial(_dkdv_kernel, lay=lay, has_bias=has_bias, scale=scale),
                  tiles=t.num_k, b=b, in_specs=dkv_specs, out_specs=out_specs,
                  out_shape=out_shape, vmem=_vmem(lay, t.nq_pad, t.block_k, q.dtype, 2),
                  name="flash_dkdv")(qx, kx, vx, *extra, dox, lse_r, delta_r)
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
def _flash(backend, blocks, heads, scale, q, k, v, bias):
  return _run(backend, blocks, heads, scale, _forward, q, k, v, bias)


def _flash_fwd(backend, blocks, heads, scale, q, k, v, bias):
  o, lse = _run(backend, blocks, heads, scale, _forward, q, k, v, bias)
  return (o, lse), (q, k, v, bias, o, lse)


def _flash_bwd(backend, blocks, heads, scale, res, cts):
  do, dlse = cts
  return _run(backend, blocks, heads, scale, _backward, *res, do, dlse)


_flash.defvjp(_flash_fwd, _flash_bwd)


# ---------------------------------------------------------------- public API
def attention_with_lse(q, k, v, bias=None, *, scale: Optional[float] = None,
                       backend: Optional[str] = None, blocks=None, heads=None):
  """Softmax attention and its log-sum-exp.

  Args:
    q: [B, Nq, H, d]; k, v: [B, Nk, H, d]; float32 or bfloat16; d in {32, 64, 128}.
    bias: None or an additive per-key logit bias broadcastable to [B, 1, 1, Nk] (float32; -inf
      masks a key). Differentiable.
    scale: logit scale (static); None for 1/sqrt(d).
    backend: None (chosen when lowering: Mosaic on TPU, Triton on GPU, the TPU kernel interpreted
      elsewhere) or one of `common.BACKENDS`.
    blocks: (block_q, block_k) to override the tiling table; heads: heads per TPU program.
  Returns:
    y [B, Nq, H, d] in the input dtype and lse [B, H, Nq] float32, where
    lse_i = log sum_j exp(scale q_i.k_j + bias_j).
  """
  bias = common.check_inputs(q, k, v, bias)
  backend = common.resolve(backend)
  blocks = None if blocks is None else tuple(blocks)
  scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
  return _flash(backend, blocks, heads, scale, q, k, v, bias)


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
