"""Attention zoo, part A (Tier G, G2-G11).

Every mechanism is checked against a naive formula written here (forward and gradients w.r.t. the
input and the parameters, fp32), against its special cases from the spec, and against the contract:
R2 (a token of size s acts like s copies), R3 (permutation equivariance), key masking equals
deleting the key, aux shapes and the exact [CLS] row, jit, bf16, and a tiny ViT forward + grad.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitjax import attention as attn_lib
from vitjax import models
from vitjax.attention.base import AttnContext
from vitjax.attention.flatten import focused_feature
from vitjax.attention.performer import random_projection

B, N, D, H = 2, 17, 64, 4
HD = D // H
LINEAR = ["linear_elu", "performer", "flatten", "agent"]
X = jax.random.normal(jax.random.key(0), (B, N, D))


def make(name, **kw):
  return attn_lib.get(name).cls(num_heads=H, **kw)


def init(module, x=X, ctx=None):
  return module.init(jax.random.key(1), x, ctx)


def run(module, p, x=X, ctx=None, need=()):
  """Eager apply: the mechanisms share most primitives, so op-by-op beats one compile per call."""
  return module.apply(p, x, ctx, need=tuple(need))


def close(a, b, atol=1e-5, rtol=1e-5):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=rtol)


# ----- naive formulas -----
def heads(t):
  return t.reshape(t.shape[0], t.shape[1], H, -1)


def naive_qkv(p, x):
  qkv = x @ p["qkv"]["kernel"] + p["qkv"]["bias"]
  return [heads(t) for t in jnp.split(qkv, 3, axis=-1)]


def naive_logits(q, k):
  return jnp.einsum("bnhd,bmhd->bhnm", q, k) / math.sqrt(q.shape[-1])


def naive_softmax(s):
  e = jnp.exp(s - s.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def elu1(t):
  return jnp.where(t > 0, t + 1.0, jnp.exp(t))


def favor(t, omega, query):
  t = t * t.shape[-1] ** -0.25
  proj = jnp.einsum("bnhd,md->bnhm", t, omega)
  c = proj.max(axis=-1, keepdims=True) if query else proj.max(axis=(1, 3), keepdims=True)
  sq = 0.5 * (t * t).sum(axis=-1, keepdims=True)
  return (jnp.exp(proj - sq - jax.lax.stop_gradient(c)) + 1e-6) / math.sqrt(omega.shape[0])


def focus(t, theta):
  flat = t.reshape(t.shape[0], t.shape[1], -1)
  u = (jnp.maximum(flat, 0.0) + 1e-6) / jnp.log1p(jnp.exp(theta))
  u3 = u ** 3
  norm = lambda a: jnp.sqrt((a * a).sum(axis=-1, keepdims=True))  # noqa: E731
  return heads(u3 * norm(u) / norm(u3))


def unit(t):
  return t / jnp.sqrt((t * t).sum(axis=-1, keepdims=True))


def naive_performer(p, q, k):
  omega = make("performer").bind(p).projection(HD)
  a = jnp.einsum("bnhr,bmhr->bhnm", favor(q, omega, True), favor(k, omega, False))
  return a / a.sum(axis=-1, keepdims=True)


def naive_flatten(p, q, k):
  fq, fk = focus(q, p["params"]["scale"]), focus(k, p["params"]["scale"])
  z = 1.0 / (jnp.einsum("bnhr,bhr->bhn", fq, fk.mean(axis=1)) + 1e-6)
  return jnp.einsum("bnhr,bmhr->bhnm", fq, fk) / k.shape[1] * z[..., None]


def naive_agent(p, q, k):
  a = p["params"]["agents"]
  pq = naive_softmax(jnp.einsum("bnhd,ahd->bhna", q, a) / math.sqrt(HD))
  pa = naive_softmax(jnp.einsum("ahd,bmhd->bham", a, k) / math.sqrt(HD))
  return jnp.einsum("bhna,bham->bhnm", pq, pa)


def naive_cosine(p, q, k):
  tau = jnp.exp(jnp.minimum(p["params"]["logit_scale"], math.log(100.0)))
  cos = jnp.einsum("bnhd,bmhd->bhnm", unit(q), unit(k))
  return naive_softmax(tau[None, :, None, None] * cos)


def naive_linear_elu(p, q, k):
  del p
  a = jnp.einsum("bnhr,bmhr->bhnm", elu1(q), elu1(k))
  return a / (a.sum(axis=-1, keepdims=True) + 1e-6)


def naive_cog(p, q, k):
  del p
  s = naive_logits(q, k)
  return jnp.sign(s) * naive_softmax(jnp.abs(s))


# The naive weights(params, q, k) of every mechanism of this part: the reference cases, by name.
REFERENCE_CASES = {
    "mhsa": lambda p, q, k: naive_softmax(naive_logits(q, k)),
    "sigmoid": lambda p, q, k: 1.0 / (1.0 + jnp.exp(-(naive_logits(q, k) - jnp.log(k.shape[1])))),
    "relu": lambda p, q, k: jnp.maximum(naive_logits(q, k), 0.0) / k.shape[1],
    "linear_elu": naive_linear_elu,
    "performer": naive_performer,
    "flatten": naive_flatten,
    "agent": naive_agent,
    "cosine": naive_cosine,
    "clipped_softmax": lambda p, q, k: jnp.clip(1.025 * naive_softmax(naive_logits(q, k)) - 0.025,
                                                0.0, 1.0),
    "gated": lambda p, q, k: naive_softmax(naive_logits(q, k)),
    "cog": naive_cog,
}
NAMES = [n for n in REFERENCE_CASES if n != "mhsa"]


def naive_forward(name, p, x):
  q, k, v = naive_qkv(p["params"], x)
  o = jnp.einsum("bhnm,bmhd->bnhd", REFERENCE_CASES[name](p, q, k), v)
  if name == "gated":
    g = p["params"]["gate"]
    o = o / (1.0 + jnp.exp(-(jnp.einsum("bnhd,hd->bnh", heads(x), g["kernel"]) + g["bias"])))[..., None]
  pp = p["params"]["proj"]
  return o.reshape(x.shape) @ pp["kernel"] + pp["bias"]


def loss_and_grads(fn, p, x):
  r = jax.random.normal(jax.random.key(7), x.shape)
  return jax.value_and_grad(lambda p_, x_: (fn(p_, x_) * r).sum(), argnums=(0, 1))(p, x)


# ----- the naive formulas, forward and backward -----
@pytest.mark.parametrize("name", list(REFERENCE_CASES))
def test_matches_naive_formula(name):
  m = make(name)
  p = init(m)
  y, _ = run(m, p, X)
  close(y, naive_forward(name, p, X))

  (l1, g1), (l2, g2) = (loss_and_grads(lambda a, b: m.apply(a, b)[0], p, X),
                        loss_and_grads(lambda a, b: naive_forward(name, a, b), p, X))
  close(l1, l2, atol=1e-4)
  jax.tree.map(lambda a, b: close(a, b, atol=1e-4, rtol=1e-4), g1, g2)


@pytest.mark.parametrize("name", LINEAR)
def test_linear_paths_agree(name):
  """The O(N) path equals the materialised weights, forward and backward."""
  fast, dense = make(name), make(name, materialise=True)
  p = init(fast)
  close(run(fast, p, X)[0], run(dense, p, X)[0])
  _, g1 = loss_and_grads(lambda a, b: fast.apply(a, b)[0], p, X)
  _, g2 = loss_and_grads(lambda a, b: dense.apply(a, b)[0], p, X)
  jax.tree.map(lambda a, b: close(a, b, atol=1e-4, rtol=1e-4), g1, g2)


# ----- special cases from the spec -----
def with_zero_queries(p):
  qkv = dict(p["params"]["qkv"])
  qkv["kernel"] = qkv["kernel"].at[:, :D].set(0.0)
  qkv["bias"] = qkv["bias"].at[:D].set(0.0)
  return {"params": {**p["params"], "qkv": qkv}}


def test_sigmoid_rows_at_zero_logits():
  m = make("sigmoid")
  p = with_zero_queries(init(m))
  _, aux = run(m, p, X, need=("attn",))
  close(aux["attn"].sum(-1), np.full((B, H, N), N / (N + 1)), atol=1e-6)


def test_relu_zero_for_negative_logits():
  m = make("relu")
  p = init(m)
  _, aux = run(m, p, X, need=("attn",))
  q, k, _ = naive_qkv(p["params"], X)
  s = naive_logits(q, k)
  assert np.all(np.asarray(aux["attn"])[np.asarray(s) < 0] == 0.0)
  assert np.all(np.asarray(aux["attn"])[np.asarray(s) > 1e-6] > 0.0)


def test_gated_gate_extremes():
  """Gate forced to 1 is softmax attention (mhsa); gate forced to 0 leaves only the output bias."""
  m, mhsa = make("gated"), make("mhsa")
  p = init(m)
  gate = p["params"]["gate"]
  for b, ref in ((1e4, run(mhsa, {"params": {k: v for k, v in p["params"].items() if k != "gate"}},
                                  X)[0]),
                 (-1e4, jnp.broadcast_to(p["params"]["proj"]["bias"], X.shape))):
    pb = {"params": {**p["params"], "gate": {**gate, "bias": jnp.full_like(gate["bias"], b)}}}
    close(run(m, pb, X)[0], ref)


def test_gated_mlp_gate_runs():
  m = make("gated", gate_type="mlp")
  p = init(m)
  assert p["params"]["gate"]["kernel1"].shape == (H, HD, HD // 4)
  assert np.isfinite(np.asarray(run(m, p, X)[0])).all()


def test_clipped_softmax_reduces_to_softmax():
  m = make("clipped_softmax", gamma=0.0, zeta=1.0)
  p = init(m)
  close(run(m, p, X)[0], run(make("mhsa"), p, X)[0])


def test_clipped_softmax_range_and_zero_gradient():
  m = make("clipped_softmax", gamma=-0.1)
  p = init(m)
  _, aux = run(m, p, X, need=("attn",))
  w = np.asarray(aux["attn"])
  assert w.min() >= 0.0 and w.max() <= 1.0 and (w == 0.0).any()
  # alpha / T form: T is the key count, so alpha = 0.1 * N gives the same gamma
  close(run(make("clipped_softmax", alpha=0.1 * N), p, X)[0], run(m, p, X)[0], atol=1e-6)


def test_cosine_fixed_tau_scale_invariance_and_clamp():
  p = init(make("cosine"))
  fixed = make("cosine", learn_tau=False, tau_init=7.0)
  pf = {"params": {k: v for k, v in p["params"].items() if k != "logit_scale"}}
  pn = {"params": {**p["params"], "logit_scale": jnp.full((H,), math.log(7.0))}}
  close(run(fixed, pf, X)[0], naive_forward("cosine", pn, X))
  qkv = dict(pf["params"]["qkv"])  # rescaling q by a positive scalar changes nothing
  qkv["kernel"] = qkv["kernel"].at[:, :D].multiply(3.0)
  qkv["bias"] = qkv["bias"].at[:D].multiply(3.0)
  close(run(fixed, {"params": {**pf["params"], "qkv": qkv}}, X)[0], run(fixed, pf, X)[0])
  big = {"params": {**p["params"], "logit_scale": jnp.full((H,), 10.0)}}  # tau clamps at 100
  close(run(make("cosine"), big, X)[0],
        run(make("cosine", learn_tau=False, tau_init=100.0), pf, X)[0], atol=1e-5)


def test_cosine_gradient_is_finite_at_a_zero_token():
  # a zero-initialised [CLS] after LayerNorm is an exact zero vector: q = k = 0 with zero biases
  m = make("cosine")
  p = init(m)
  p = {"params": {**p["params"], "qkv": {**p["params"]["qkv"], "bias": jnp.zeros(3 * D)}}}
  x = X.at[:, 0].set(0.0)
  g = jax.grad(lambda x, p: run(m, p, x)[0].sum(), argnums=(0, 1))(x, p)
  assert all(np.isfinite(np.asarray(t)).all() for t in jax.tree.leaves(g))


def test_cog_signs_and_softmax_case():
  m = make("cog")
  p = init(m)
  _, aux = run(m, p, X, need=("attn",))
  q, k, _ = naive_qkv(p["params"], X)
  w = np.asarray(aux["attn"])
  np.testing.assert_array_equal(np.sign(w), np.sign(np.asarray(naive_logits(q, k))))
  close(np.abs(w).sum(-1), np.ones((B, H, N)), atol=1e-6)
  # all logits positive (positive x, positive q/k weights) -> exactly softmax attention
  qkv = dict(p["params"]["qkv"])
  qkv["kernel"] = qkv["kernel"].at[:, :2 * D].set(jnp.abs(qkv["kernel"][:, :2 * D]))
  qkv["bias"] = qkv["bias"].at[:2 * D].set(0.0)
  pp = {"params": {**p["params"], "qkv": qkv}}
  close(run(m, pp, jnp.abs(X))[0], run(make("mhsa"), pp, jnp.abs(X))[0])


def test_linear_rows_sum_to_one():
  for name in LINEAR:
    m = make(name)
    _, aux = run(m, init(m), X, need=("attn",))
    close(aux["attn"].sum(-1), np.ones((B, H, N)), atol=1e-4)


def test_agent_single_agent_gives_one_output():
  m = make("agent", num_agents=1)
  p = init(m)
  y, _ = run(m, p, X)
  close(y, jnp.broadcast_to(y[:, :1], y.shape), atol=1e-6)


def test_flatten_focus_preserves_norm():
  x = jax.random.normal(jax.random.key(3), (B, N, D))
  theta = jax.random.normal(jax.random.key(4), (D,))
  u = (jax.nn.relu(x) + 1e-6) / jax.nn.softplus(theta)
  close(jnp.linalg.norm(focused_feature(x, theta, 3), axis=-1), jnp.linalg.norm(u, axis=-1),
        rtol=1e-5)


def performer_error(m_features, seeds=2):
  x = 0.5 * X  # small-norm inputs: the softmax kernel estimate is tight
  p = init(make("mhsa"), x)
  ref = run(make("mhsa"), p, x)[0]
  errs = [float(jnp.abs(run(make("performer", num_features=m_features, feature_seed=s), p, x)[0]
                        - ref).mean()) for s in range(seeds)]
  return float(np.mean(errs))


def test_performer_approaches_softmax():
  e16, e1024 = performer_error(16), performer_error(1024)
  assert e1024 < e16 / 3, (e16, e1024)


def test_performer_features_orthogonal():
  w = random_projection(jax.random.key(0), 2 * HD, HD)
  for blk in (w[:HD], w[HD:]):
    gram = np.asarray(blk @ blk.T)
    close(gram - np.diag(np.diag(gram)), np.zeros_like(gram), atol=1e-4)


def test_performer_official_defaults_redraw_in_training_fixed_in_evaluation():
  """256 features (the official nb_features); new ones on every training call, drawn from the
  dropout stream the trainer passes; one fixed draw in evaluation."""
  m = make("performer")
  p = init(m)
  assert m.num_features == 256 and make("performer").bind(p).projection(HD).shape == (256, HD)
  train = lambda seed: m.apply(p, X, deterministic=False,  # noqa: E731
                               rngs={"dropout": jax.random.key(seed)})[0]
  assert float(jnp.abs(train(1) - train(2)).max()) > 1e-4
  close(train(1), train(1), atol=0)
  y0 = run(m, p, X)[0]
  close(run(m, p, X)[0], y0, atol=0)
  close(m.apply(p, X, AttnContext(step=jnp.asarray(5000)))[0], y0, atol=0)
  fixed = make("performer", redraw=False)
  close(fixed.apply(p, X, deterministic=False, rngs={"dropout": jax.random.key(1)})[0], y0,
        atol=0)


def test_performer_exact_softmax_cls_row():
  m = make("performer", cls_probs_mode="exact_softmax")
  p = init(m)
  _, aux = run(m, p, X, need=("cls_probs",))
  _, ref = run(make("mhsa"), p, X, need=("attn",))
  close(aux["cls_probs"], ref["attn"][:, :, 0].mean(1), atol=1e-6)


def test_grid_variants_need_their_names():
  ctx = AttnContext(grid=(4, 4))
  for name, kw in (("flatten", dict(dwc=True)), ("agent", dict(agent_source="pool_grid"))):
    with pytest.raises(ValueError, match="_grid"):
      init(make(name, **kw), X, ctx)
  for name in ("flatten_grid", "agent_grid"):
    assert attn_lib.get(name).caps.needs_grid
    with pytest.raises(ValueError, match="grid"):
      init(make(name))


def test_agent_grid_pools_queries():
  """Zero biases, no DWC: the official form is two softmaxes over pooled-query agents."""
  ctx = AttnContext(grid=(4, 4))
  m = make("agent_grid", num_agents=4, biases=False, dwc=False)
  p = init(m, X, ctx)
  y, _ = run(m, p, X, ctx)
  q, k, v = naive_qkv(p["params"], X)
  a = q[:, 1:].reshape(B, 2, 2, 2, 2, H, HD).mean(axis=(2, 4)).reshape(B, 4, H, HD)
  pq = naive_softmax(jnp.einsum("bnhd,bahd->bhna", q, a) / math.sqrt(HD))
  pa = naive_softmax(jnp.einsum("bahd,bmhd->bham", a, k) / math.sqrt(HD))
  o = jnp.einsum("bhna,bham,bmhd->bnhd", pq, pa, v).reshape(X.shape)
  close(y, o @ p["params"]["proj"]["kernel"] + p["params"]["proj"]["bias"])


def naive_depthwise(img, conv):
  """'SAME' depthwise convolution of img [B,h,w,C] (kernel [k,k,1,C], bias [C]) as shifted sums."""
  k, (h, w) = conv["kernel"].shape[0], img.shape[1:3]
  padded = jnp.pad(img, ((0, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)))
  taps = [padded[:, a:a + h, b:b + w] * conv["kernel"][a, b, 0] for a in range(k) for b in range(k)]
  return sum(taps) + conv["bias"]


def perturbed(p, scale=0.3, seed=5):
  """Zero-initialised tables and convolutions moved off zero, so every term enters the check."""
  leaves, tree = jax.tree_util.tree_flatten(p)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree_util.tree_unflatten(
      tree, [t + scale * jax.random.normal(key, t.shape) for t, key in zip(leaves, keys)])


def test_agent_grid_naive():
  """The official DeiT form: pooled-query agents, position biases (bilinear tables plus row and
  column terms, separate prefix terms), two softmaxes and the 3x3 depthwise conv on V."""
  ctx, side = AttnContext(grid=(4, 4)), 2
  m = make("agent_grid", num_agents=side * side)
  p = perturbed(init(m, X, ctx))
  pp, pb = p["params"], p["params"]["pos_bias"]
  q, k, v = naive_qkv(pp, X)
  a = q[:, 1:].reshape(B, 2, 2, 2, 2, H, HD).mean(axis=(2, 4)).reshape(B, 4, H, HD)

  def table(name):  # [H, agents, 16]: resized table + row term + column term
    t = jax.image.resize(pb[f"{name}_bias"], (H, 4, 4, 4), method="bilinear", antialias=False)
    return (t + pb[f"{name}_row"] + pb[f"{name}_col"]).reshape(H, 4, 16)
  b1 = jnp.concatenate([jnp.broadcast_to(pb["ac_bias"], (H, 4, 1)), table("an")], -1)
  b2 = jnp.concatenate([jnp.broadcast_to(pb["ca_bias"], (H, 1, 4)),
                        table("na").transpose(0, 2, 1)], 1)
  pa = naive_softmax(jnp.einsum("bahd,bmhd->bham", a, k) / math.sqrt(HD) + b1)
  pq = naive_softmax(jnp.einsum("bnhd,bahd->bhna", q, a) / math.sqrt(HD) + b2)
  o = jnp.einsum("bhna,bham,bmhd->bnhd", pq, pa, v)
  dwc = naive_depthwise(v[:, 1:].reshape(B, 4, 4, D), pp["dwc"]).reshape(B, 16, H, HD)
  o = o.at[:, 1:].add(dwc).reshape(X.shape)
  close(run(m, p, X, ctx)[0], o @ pp["proj"]["kernel"] + pp["proj"]["bias"], atol=2e-5)


def test_flatten_grid_naive():
  """The original FLatten: K position embedding before the focusing, and the 5x5 depthwise conv
  of d channels shared by the heads on V, added to the patch tokens."""
  ctx = AttnContext(grid=(4, 4))
  m = make("flatten_grid")
  p = perturbed(init(m, X, ctx))
  pp = p["params"]
  q, k, v = naive_qkv(pp, X)
  fq, fk = focus(q, pp["scale"]), focus(k + heads(pp["k_pos"]), pp["scale"])
  z = 1.0 / (jnp.einsum("bnhr,bhr->bhn", fq, fk.mean(axis=1)) + 1e-6)
  w = jnp.einsum("bnhr,bmhr->bhnm", fq, fk) / N * z[..., None]
  o = jnp.einsum("bhnm,bmhd->bnhd", w, v)
  img = v[:, 1:].transpose(0, 2, 1, 3).reshape(B * H, 4, 4, HD)
  dwc = naive_depthwise(img, pp["dwc"]["conv"]).reshape(B, H, 16, HD).transpose(0, 2, 1, 3)
  o = o.at[:, 1:].add(dwc).reshape(X.shape)
  close(run(m, p, X, ctx)[0], o @ pp["proj"]["kernel"] + pp["proj"]["bias"], atol=2e-5)


GRID_REFERENCE_CASES = {"agent_grid": test_agent_grid_naive, "flatten_grid": test_flatten_grid_naive}


# ----- the contract -----
def sizes_ctx(j, s):
  return AttnContext(key_bias=jnp.zeros((B, N)).at[:, j].set(math.log(s)))


@pytest.mark.parametrize("name", NAMES)
def test_size_duplicate_oracle(name):
  """R2: token j with size 3 acts like three copies of token j."""
  assert attn_lib.get(name).caps.size_semantics
  m = make(name)
  p = init(m)
  j = 5
  x_dup = jnp.concatenate([X, X[:, [j, j]]], axis=1)
  close(run(m, p, x_dup)[0][:, :N], run(m, p, X, sizes_ctx(j, 3))[0], atol=2e-5)


def test_clipped_softmax_size_oracle_with_alpha():
  m = make("clipped_softmax", alpha=2.0)
  p = init(m)
  x_dup = jnp.concatenate([X, X[:, [5, 5]]], axis=1)
  close(run(m, p, x_dup)[0][:, :N], run(m, p, X, sizes_ctx(5, 3))[0], atol=2e-5)


@pytest.mark.parametrize("name", NAMES)
def test_permutation_equivariance(name):
  m = make(name)
  p = init(m)
  perm = np.random.default_rng(0).permutation(N)
  close(run(m, p, X[:, perm])[0], run(m, p, X)[0][:, perm], atol=2e-5)


@pytest.mark.parametrize("name", NAMES)
def test_key_mask_equals_deleting_the_key(name):
  """Masking keys (valid=False) equals deleting them; the shapes of the R2 test are reused."""
  assert attn_lib.get(name).caps.key_bias
  m = make(name)
  p = init(m)
  x_more = jnp.concatenate([X, jax.random.normal(jax.random.key(9), (B, 2, D))], axis=1)
  valid = jnp.ones((B, N + 2), bool).at[:, N:].set(False)
  close(run(m, p, x_more, AttnContext(valid=valid))[0][:, :N], run(m, p, X)[0], atol=2e-5)


@pytest.mark.parametrize("name", NAMES)
def test_aux_shapes_and_cls_row(name):
  m = make(name)
  p = init(m)
  need = ("cls_probs", "cls_probs_per_head", "key_metric", "value_norm", "attn")
  y, aux = run(m, p, X, need=need)
  assert y.shape == (B, N, D)
  shapes = {k: v.shape for k, v in aux.items()}
  assert shapes == {"cls_probs": (B, N), "cls_probs_per_head": (B, H, N),
                    "key_metric": (B, N, HD), "value_norm": (B, H, N), "attn": (B, H, N, N)}
  assert all(v.dtype == jnp.float32 for v in aux.values())
  _, row = run(m, p, X, need=("cls_probs",))  # fast paths recompute only the row (R1)
  close(row["cls_probs"], aux["attn"][:, :, 0].mean(1), atol=1e-6)
  _, kq = run(m, p, X, need=("key_metric",))
  q, k, _ = naive_qkv(p["params"], X)
  if name != "cosine":  # cosine hands out its normalised keys
    close(kq["key_metric"], k.mean(axis=2), atol=1e-5)


def check_jit_matches_eager(m, p, atol=1e-6):
  fn = jax.jit(lambda p_, x_: m.apply(p_, x_, need=("cls_probs",)))
  y, aux = fn(p, X)
  y0, aux0 = m.apply(p, X, need=("cls_probs",))
  close(y, y0, atol=1e-5)
  close(aux["cls_probs"], aux0["cls_probs"], atol=atol)


def check_bf16(m):
  y, aux = run(m, init(m), X.astype(jnp.bfloat16), need=("cls_probs",))
  assert y.dtype == jnp.bfloat16
  assert np.isfinite(np.asarray(y, np.float32)).all()
  assert np.isfinite(np.asarray(aux["cls_probs"])).all()


@pytest.mark.parametrize("name", NAMES)
def test_jit_matches_eager(name):
  m = make(name)
  check_jit_matches_eager(m, init(m))


@pytest.mark.parametrize("name", NAMES)
def test_bf16_smoke(name):
  check_bf16(make(name, dtype=jnp.bfloat16))


def test_capabilities():
  caps = {n: attn_lib.get(n).caps for n in NAMES}
  assert caps["performer"].cls_probs == "approx"
  assert all(caps[n].cls_probs == "exact" for n in NAMES if n != "performer")
  assert {n for n in NAMES if caps[n].cls_score_norm == "row"} == {"sigmoid", "relu"}
  assert caps["cog"].cls_score_norm == "abs_row"
  assert not any(caps[n].needs_grid for n in NAMES)
  assert all(caps[n].key_metric and caps[n].full_attn for n in NAMES)


def check_tiny_vit(name):
  """Forward and gradient of a tiny ViT with this attention are finite."""
  model = models.build(dict(variant="Ti/4", depth=2, attention=dict(name=name)), num_classes=10,
                       image_size=16)
  images = jax.random.normal(jax.random.key(2), (2, 16, 16, 3))
  params = model.init(jax.random.key(3), images)["params"]

  def loss(p):
    logits, _ = model.apply({"params": p}, images)
    return jnp.mean(jax.nn.log_softmax(logits)[:, 0])

  value, grads = jax.value_and_grad(loss)(params)
  assert np.isfinite(float(value))
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("name", NAMES + ["flatten_grid", "agent_grid"])
def test_inside_tiny_vit(name):
  check_tiny_vit(name)
