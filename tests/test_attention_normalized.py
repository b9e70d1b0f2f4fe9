"""G24 `normalized` (NAP, Richter & Wattenhofer 2020) against a naive formula written here.

Forward and gradients (input and every parameter) in fp32, the row property (mean b, std g), the
per-query shift invariance that pins the normalisation to the key axis, R2 (a token of size s acts
like s copies), key masks equal deletion, R3, aux, jit, bf16, a zero query, a tiny ViT, and
gradients against float64 at a zero token and in a GAP ViT on near-identical tokens.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_attention_zoo_a import (B, D, H, HD, N, X, check_bf16, check_jit_matches_eager,
                                  check_tiny_vit, close, loss_and_grads, naive_qkv, run)
from vitjax import attention as attn_lib
from vitjax import models
from vitjax.attention.base import AttnContext

EPS = 1e-3  # the official code's epsilon, added to the std


def make(**kw):
  return attn_lib.get("normalized").cls(num_heads=H, **kw)


def init(module, x=X, ctx=None):
  """Parameters with a random gain and shift per head, so that both enter every check."""
  p = module.init(jax.random.key(1), x, ctx)["params"]
  g = 1.0 + 0.5 * jax.random.normal(jax.random.key(11), (H,))
  b = 0.3 * jax.random.normal(jax.random.key(12), (H,))
  return {"params": {**p, "gain": g, "shift": b}}


# ----- the naive formula -----
def naive_weights(p, q, k):
  """g (S - mean_keys S) / (std_keys S + eps) + b with S = Q K^T (unscaled), per head."""
  s = jnp.einsum("bnhd,bmhd->bhnm", q, k)
  z = (s - s.mean(axis=-1, keepdims=True)) / (s.std(axis=-1, keepdims=True) + EPS)
  return p["gain"][:, None, None] * z + p["shift"][:, None, None]


def naive_gelu(t):
  return 0.5 * t * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (t + 0.044715 * t ** 3)))


def naive_layernorm(t, scale, bias):
  mu = t.mean(axis=-1, keepdims=True)
  var = ((t - mu) ** 2).mean(axis=-1, keepdims=True)
  return (t - mu) / jnp.sqrt(var + 1e-3) * scale + bias


def naive_forward(p, x, hidden=True):
  p = p["params"]
  q, k, v = naive_qkv(p, x)
  o = jnp.einsum("bhnm,bmhd->bnhd", naive_weights(p, q, k), v).reshape(x.shape)
  if hidden:
    o = naive_gelu(naive_layernorm(o, p["hidden_norm"]["scale"], p["hidden_norm"]["bias"]))
  return o @ p["proj"]["kernel"] + p["proj"]["bias"]


@pytest.mark.parametrize("hidden", [True, False])
def test_matches_naive_formula(hidden):
  m = make(hidden_norm=hidden, hidden_gelu=hidden)
  p = init(m)
  close(run(m, p)[0], naive_forward(p, X, hidden), atol=2e-5)
  (l1, g1), (l2, g2) = (loss_and_grads(lambda a, b: m.apply(a, b)[0], p, X),
                        loss_and_grads(lambda a, b: naive_forward(a, b, hidden), p, X))
  close(l1, l2, atol=1e-3, rtol=1e-4)
  assert set(g1[0]["params"]) == set(g2[0]["params"])
  jax.tree.map(lambda a, b: close(a, b, atol=1e-4, rtol=1e-4), g1, g2)


REFERENCE_CASES = {"normalized": test_matches_naive_formula}


def test_default_parameters():
  """Gain 1 and shift 0 per head at initialisation (official initialisers)."""
  p = make().init(jax.random.key(1), X)["params"]
  close(p["gain"], np.ones(H), atol=0)
  close(p["shift"], np.zeros(H), atol=0)
  assert set(p) == {"qkv", "gain", "shift", "hidden_norm", "proj"}
  assert "hidden_norm" not in make(hidden_norm=False).init(jax.random.key(1), X)["params"]


# ----- the normalisation's properties -----
def test_rows_have_mean_shift_and_std_gain():
  m = make()
  p = init(m)
  _, aux = run(m, p, need=("attn",))
  w = np.asarray(aux["attn"], np.float64)
  q, k, _ = naive_qkv(p["params"], X)
  sigma = np.asarray(jnp.einsum("bnhd,bmhd->bhnm", q, k).std(axis=-1), np.float64)
  g, b = (np.asarray(p["params"][n])[None, :, None] for n in ("gain", "shift"))
  close(w.mean(-1), np.broadcast_to(b, w.shape[:-1]), atol=1e-5)
  close(w.std(-1), np.abs(g) * sigma / (sigma + EPS), rtol=1e-5)
  close(w.std(-1), np.broadcast_to(np.abs(g), w.shape[:-1]), rtol=1e-3)  # eps << sigma
  assert (w < b[..., None]).any() and (w > b[..., None]).any()  # signed, off the simplex


def test_invariant_to_a_per_query_logit_shift():
  """Adding c to every key adds q_i.c to the whole row i: normalised over keys, nothing moves.
  Normalising over queries (the wrong axis) would not be invariant."""
  m = make()
  p = init(m)
  qkv = dict(p["params"]["qkv"])
  c = 3.0 * jax.random.normal(jax.random.key(5), (D,))
  qkv["bias"] = qkv["bias"].at[D:2 * D].add(c)
  shifted = {"params": {**p["params"], "qkv": qkv}}
  close(run(m, shifted)[0], run(m, p)[0], atol=2e-5)


def test_no_logit_scaling():
  """NAP drops 1/sqrt(d): with a shift-free, gain-free row the weights are the raw z-scores."""
  m = make()
  p = init(m)
  p1 = {"params": {**p["params"], "gain": jnp.ones(H), "shift": jnp.zeros(H)}}
  _, aux = run(m, p1, need=("attn",))
  q, k, _ = naive_qkv(p1["params"], X)
  s = jnp.einsum("bnhd,bmhd->bhnm", q, k)
  close(aux["attn"], (s - s.mean(-1, keepdims=True)) / (s.std(-1, keepdims=True) + EPS),
        atol=1e-5)


def test_zero_query_gives_the_shift_and_a_finite_gradient():
  """A zero token with zero qkv biases has q = 0: a constant row, std 0; the weights are b."""
  m = make()
  p = init(m)
  p = {"params": {**p["params"], "qkv": {**p["params"]["qkv"], "bias": jnp.zeros(3 * D)}}}
  x = X.at[:, 0].set(0.0)
  _, aux = run(m, p, x, need=("attn",))
  close(aux["attn"][:, :, 0], jnp.broadcast_to(p["params"]["shift"][None, :, None], (B, H, N)),
        atol=1e-6)
  g = jax.grad(lambda x_, p_: run(m, p_, x_)[0].sum(), argnums=(0, 1))(x, p)
  assert all(np.isfinite(np.asarray(t)).all() for t in jax.tree.leaves(g))
  # also with sizes (the weighted statistics)
  ctx = AttnContext(key_bias=jnp.zeros((B, N)).at[:, 3].set(math.log(2.0)))
  g = jax.grad(lambda x_, p_: run(m, p_, x_, ctx)[0].sum(), argnums=(0, 1))(x, p)
  assert all(np.isfinite(np.asarray(t)).all() for t in jax.tree.leaves(g))


# ----- the contract -----
def test_size_duplicate_oracle():
  """R2: token j with size 3 acts like three copies of token j (weighted mean and std)."""
  assert attn_lib.get("normalized").caps.size_semantics
  m = make()
  p = init(m)
  j = 5
  x_dup = jnp.concatenate([X, X[:, [j, j]]], axis=1)
  ctx = AttnContext(key_bias=jnp.zeros((B, N)).at[:, j].set(math.log(3.0)))
  close(run(m, p, x_dup)[0][:, :N], run(m, p, X, ctx)[0], atol=2e-5)


@pytest.mark.parametrize("how", ["valid", "bias"])
def test_key_mask_equals_deleting_the_key(how):
  assert attn_lib.get("normalized").caps.key_bias
  m = make()
  p = init(m)
  x_more = jnp.concatenate([X, 5.0 * jax.random.normal(jax.random.key(9), (B, 2, D))], axis=1)
  if how == "valid":
    ctx = AttnContext(valid=jnp.ones((B, N + 2), bool).at[:, N:].set(False))
  else:
    ctx = AttnContext(key_bias=jnp.zeros((B, N + 2)).at[:, N:].set(-jnp.inf))
  close(run(m, p, x_more, ctx)[0][:, :N], run(m, p)[0], atol=2e-5)
  _, aux = run(m, p, x_more, ctx, need=("attn",))
  assert np.all(np.asarray(aux["attn"])[..., N:] == 0.0)
  g = jax.grad(lambda x_: run(m, p, x_, ctx)[0][:, :N].sum())(x_more)
  assert np.isfinite(np.asarray(g)).all()


def test_permutation_equivariance():
  m = make()
  p = init(m)
  perm = np.random.default_rng(0).permutation(N)
  close(run(m, p, X[:, perm])[0], run(m, p)[0][:, perm], atol=2e-5)


def test_aux_shapes_and_cls_row():
  m = make()
  p = init(m)
  need = ("cls_probs", "cls_probs_per_head", "key_metric", "value_norm", "attn")
  y, aux = run(m, p, need=need)
  assert y.shape == (B, N, D)
  assert {k: v.shape for k, v in aux.items()} == {
      "cls_probs": (B, N), "cls_probs_per_head": (B, H, N), "key_metric": (B, N, HD),
      "value_norm": (B, H, N), "attn": (B, H, N, N)}
  assert all(v.dtype == jnp.float32 for v in aux.values())
  q, k, _ = naive_qkv(p["params"], X)
  close(aux["attn"], naive_weights(p["params"], q, k), atol=1e-5)
  close(aux["cls_probs"], aux["attn"][:, :, 0].mean(1), atol=1e-6)  # raw, signed
  close(aux["key_metric"], k.mean(axis=2), atol=1e-5)


def test_capabilities():
  caps = attn_lib.get("normalized").caps
  assert caps.cls_probs == "exact" and caps.cls_score_norm == "abs_row"
  assert caps.key_metric and caps.full_attn and caps.size_semantics and caps.key_bias
  assert not caps.needs_grid


def test_impls_and_bad_impl():
  p = init(make())
  close(run(make(impl="xla"), p)[0], run(make(), p)[0], atol=0)
  with pytest.raises(ValueError, match="supports impl"):
    attn_lib.build("normalized", num_heads=H, dtype=jnp.float32, impl="cudnn")


def test_jit_matches_eager():
  m = make()
  check_jit_matches_eager(m, init(m), atol=1e-5)


def test_attention_dropout_runs():
  m = make(attn_drop=0.5)
  p = init(m)
  y, _ = m.apply(p, X, deterministic=False, rngs={"dropout": jax.random.key(4)})
  assert np.isfinite(np.asarray(y)).all()
  assert float(jnp.abs(y - run(m, p)[0]).max()) > 1e-3


def test_bf16_smoke():
  check_bf16(make(dtype=jnp.bfloat16))


def test_inside_tiny_vit():
  check_tiny_vit("normalized")


# ----- a zero token: the fixed point, and gradients against float64 -----
def naive_forward_f64(p, x):
  """The naive formula in float64, with the std as sqrt(var + 1e-300): its derivative at a
  constant row is the exact one (the sigma term is multiplied by S - mu = 0 there)."""
  def weights(p_, q, k):
    s = jnp.einsum("bnhd,bmhd->bhnm", q, k)
    c = s - s.mean(axis=-1, keepdims=True)
    z = c / (jnp.sqrt(jnp.square(c).mean(axis=-1, keepdims=True) + 1e-300) + EPS)
    return p_["gain"][:, None, None] * z + p_["shift"][:, None, None]
  pp = p["params"]
  q, k, v = naive_qkv(pp, x)
  o = jnp.einsum("bhnm,bmhd->bnhd", weights(pp, q, k), v).reshape(x.shape)
  o = naive_gelu(naive_layernorm(o, pp["hidden_norm"]["scale"], pp["hidden_norm"]["bias"]))
  return o @ pp["proj"]["kernel"] + pp["proj"]["bias"]


def test_zero_token_stays_zero_and_its_steep_gradient_is_exact():
  """At the official initialisation (shift 0, zero biases) a zero token has q = 0, a constant row,
  weights b = 0, and leaves the layer exactly zero: a zero-initialised [CLS] without a position
  embedding stays zero through every block. There the layer is as steep as the official formula
  is (slope 1/eps of the row, 1/sqrt(1e-3) of the hidden LayerNorm): the float32 gradient is
  large, finite, and equals the float64 one, i.e. it is the true derivative, not rounding."""
  m = make()
  p = m.init(jax.random.key(1), X)["params"]
  p = {"params": {**p, "gain": 1.0 + 0.5 * jax.random.normal(jax.random.key(11), (H,))}}
  x = X.at[:, 0].set(0.0)
  y = run(m, p, x)[0]
  assert np.all(np.asarray(y[:, 0]) == 0.0)
  r = jax.random.normal(jax.random.key(7), x.shape)
  g32 = jax.jit(jax.grad(lambda x_: (run(m, p, x_)[0] * r).sum()))(x)
  with jax.enable_x64(True):
    p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), p)
    g64 = jax.jit(jax.grad(lambda x_: (naive_forward_f64(p64, x_) * r).sum()))(
        jnp.asarray(x, jnp.float64))
    g64 = np.asarray(g64)
  close(g32, g64, atol=1e-3, rtol=1e-4)
  zero_row, others = np.abs(g64[:, 0]).max(), np.abs(g64[:, 1:]).max()
  assert zero_row > 100 * others  # the steep point: why a model must not park a token there


def test_tiny_gap_vit_on_near_identical_tokens_matches_float64():
  """The default digits layout without [CLS] (GAP, sin-cos position embeddings) on an image of
  near-constant background: moderate, finite gradients that equal the float64 ones."""
  model = models.build(dict(variant="Ti/2", width=32, num_heads=2, mlp_dim=64, depth=2, pool="gap",
                            class_token=False, posemb="sincos2d",
                            attention=dict(name="normalized")),
                       num_classes=10, image_size=8)
  images = -1.0 + 1e-3 * jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  images = images.at[:, 2:4, 2:6].set(0.5)
  params = model.init(jax.random.key(1), images)["params"]
  kernel = params["head"]["kernel"]  # random head: the gradient reaches the blocks
  params["head"]["kernel"] = 0.01 * jax.random.normal(jax.random.key(2), kernel.shape)

  def loss(m):
    return lambda p, x: jnp.mean(jax.nn.log_softmax(m.apply({"params": p}, x)[0])[:, 3])

  g32 = jax.jit(jax.grad(loss(model)))(params, images)
  with jax.enable_x64(True):
    p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
    g64 = jax.jit(jax.grad(loss(model.clone(dtype=jnp.float64))))(
        p64, jnp.asarray(images, jnp.float64))
    g64 = jax.tree.map(np.asarray, g64)
  for a, b in zip(jax.tree.leaves(g32), jax.tree.leaves(g64)):
    a = np.asarray(a)
    assert np.isfinite(a).all() and np.abs(a).max() < 10.0
    close(a, b, atol=1e-6 + 1e-4 * np.abs(b).max(), rtol=1e-4)
