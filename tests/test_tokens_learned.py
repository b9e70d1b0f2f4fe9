"""Learned and clustering token reducers: DynamicViT, PatchMerger, TokenLearner (+TokenFuser),
K-Medoids, DPC-KNN, SiT, Sinkhorn. Each is checked against a naive reference written here."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.special import erf

from vitjax import models
from vitjax import tokens
from vitjax.attention.base import policy_key_bias
from vitjax.tokens import dynamicvit as dvit
from vitjax.tokens import sinkhorn
from vitjax.tokens.base import initial_state
from vitjax.tokens.base import BEFORE_ATTENTION, Layout

def plan_blocks(cls, options, **layout):
  """Per block: the reducer's kwargs or None, on an encoder of the given shape."""
  return list(cls.plan(options, Layout(**layout)).blocks)

B, P, GRID, D, H = 2, 1, (4, 4), 64, 4
N = GRID[0] * GRID[1]
CUMULATIVE = ["dynamicvit", "patchmerger", "sit", "sinkhorn", "kmedoids", "dpcknn"]
ALL = CUMULATIVE + ["tokenlearner", "tokenlearner_v1"]
# These tests are compile-bound on CPU: cheaper XLA compiles, same numerics to test tolerance.
fast_jit = functools.partial(jax.jit, compiler_options=dict(
    xla_backend_optimization_level=0, xla_llvm_disable_expensive_passes=True))


def rand(seed, shape, scale=1.0):
  return scale * jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)


def tokens_in(seed=0):
  return rand(seed, (B, P + N, D))


def state_in():
  return initial_state(B, P, GRID, track_source=True, with_pos=True)


def attn_in(seed=5):
  return {"attn": jax.nn.softmax(rand(seed, (B, H, P + N, P + N), 2.0), axis=-1)}


def build(name, count=None, **kw):
  """The reducer of `name` at its first planned location (count overridden when given)."""
  entry = tokens.get(name)
  opts = dict(keep_rate=0.5, locations=(1, 2)) if name in CUMULATIVE else dict(locations=(1,))
  opts.update(kw)
  plan = plan_blocks(entry.cls, opts, depth=4, num_patches=N, num_prefix=P)
  kwargs = next(k for k in plan if k is not None)
  if count is not None:
    kwargs = {**kwargs, "count": count}
  return entry.cls(num_prefix=P, **kwargs)


def japply(module, variables, *args):
  """module.apply, jitted (eager op-by-op dispatch costs more than one compile here)."""
  return fast_jit(module.apply)(variables, *args)


def layer_norm(x, scale, bias, eps):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / (var + eps) ** 0.5 * scale + bias


def gelu_erf(x):
  return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def gelu_tanh(x):
  return 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def softmax_np(x, axis):
  e = np.exp(x - x.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def np_params(params):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), params)


def close(a, b, tol=1e-5):
  np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=tol,
                             atol=tol)


def check_forward_and_grads(module, ref, x, state, aux=None, tol=1e-4):
  """Module vs reference `ref(params, x) -> tokens`: outputs, and gradients w.r.t. params and x."""
  aux = aux or {}
  params = fast_jit(module.init)(jax.random.PRNGKey(1), x, state, aux)["params"]
  run = lambda p, x: module.apply({"params": p}, x, state, aux)[0]
  cot = rand(9, jax.eval_shape(run, params, x).shape)

  @fast_jit
  def both(params, x):
    outs = [f(params, x) for f in (run, ref)]
    grads = [jax.grad(lambda p, x, f=f: (f(p, x) * cot).sum(), argnums=(0, 1))(params, x)
             for f in (run, ref)]
    return outs, grads

  (y, y_ref), (g, g_ref) = both(params, x)
  close(y, y_ref, tol)
  jax.tree.map(lambda a, b: close(a, b, tol), g, g_ref)
  assert all(float(jnp.abs(l).max()) > 0 for l in jax.tree.leaves(g[0])), "a parameter gets no grad"
  return params


def soft_weights(state):
  """The merge weights [B, M, N] over the image tokens, read from the tracked source map."""
  return np.asarray(state.source[:, P:, P:])


# ----- counts and configuration -----
@pytest.mark.parametrize("name", CUMULATIVE)
def test_cumulative_counts(name):
  for kr, counts in [(0.9, (176, 158, 142)), (0.7, (137, 96, 67)), (0.5, (98, 49, 24)),
                     (0.25, (49, 12, 3))]:
    plan = plan_blocks(tokens.get(name).cls, dict(keep_rate=kr), depth=12, num_patches=196, num_prefix=1)
    assert [i for i, kw in enumerate(plan) if kw is not None] == [3, 6, 9]
    assert tuple(plan[i]["count"] for i in (3, 6, 9)) == counts


@pytest.mark.parametrize("bad", [dict(keep_rate=0.0), dict(keep_rate=1.5), dict(),
                                 dict(keep_rate=0.5, locations=(3, 12)),
                                 dict(keep_rate=0.5, locations=(6, 3)),
                                 dict(keep_rate=0.5, bogus=1)])
def test_bad_options_fail_at_config_time(bad):
  for name in CUMULATIVE:
    with pytest.raises(ValueError):
      plan_blocks(tokens.get(name).cls, bad, depth=12, num_patches=196, num_prefix=1)


def test_tokenlearner_plan():
  plan = plan_blocks(tokens.get("tokenlearner").cls, {}, depth=12, num_patches=196, num_prefix=1)
  assert [(i, kw["count"]) for i, kw in enumerate(plan) if kw] == [(9, 8)]
  plan = plan_blocks(tokens.get("tokenlearner").cls, dict(num_tokens=16, fuser=True, locations=(6,)),
                                             depth=12, num_patches=196, num_prefix=1)
  assert [i for i, kw in enumerate(plan) if kw] == list(range(6, 12))
  plan = plan_blocks(tokens.get("tokenlearner").cls, dict(keep_rate=0.5, locations=(3, 6)),
                                             depth=12, num_patches=196, num_prefix=1)
  assert [kw["count"] for kw in plan if kw] == [98, 49]
  with pytest.raises(ValueError):  # v1.0 needs the grid, which only its first location has
    plan_blocks(tokens.get("tokenlearner_v1").cls, dict(locations=(3, 6)), depth=12, num_patches=196,
                                           num_prefix=1)


def test_tokenlearner_dropout_follows_the_encoder():
  """scenic passes the encoder's dropout_rate to the v1.1 learner and the fuser."""
  tl = tokens.get("tokenlearner").cls
  for opts, want in [({}, 0.1), (dict(dropout=0.0), 0.0), (dict(fuser=True), 0.1)]:
    plan = tl.plan(opts, Layout(depth=12, num_patches=196, num_prefix=1, dropout=0.1)).blocks
    assert {kw["dropout"] for kw in plan if kw} == {want}
  model = tiny_vit("tokenlearner", keep_rate=None, num_tokens=4, dropout=None)
  assert model.stage().plan().blocks[1]["dropout"] == 0.0   # the tiny ViT has no dropout
  model = models.build(dict(variant="Ti/4", depth=4, dropout=0.2, tokens=dict(
      name="tokenlearner", num_tokens=4, locations=(1,))), num_classes=10, image_size=16)
  assert model.stage().plan().blocks[1]["dropout"] == 0.2


def test_registry_flags():
  flags = {n: tokens.get(n) for n in ALL}
  assert all(e.hook == BEFORE_ATTENTION for e in flags.values())
  assert flags["kmedoids"].needs == ("attn",)
  assert all(flags[n].needs == () for n in ALL if n != "kmedoids")
  assert {n for n in ALL if flags[n].soft} == {"patchmerger", "sit", "sinkhorn", "tokenlearner",
                                               "tokenlearner_v1"}
  assert {n for n in ALL if flags[n].needs_grid} == {"tokenlearner_v1"}


DEIT_S_PARAMS = {"dynamicvit": 723_750, "patchmerger": 117_504, "sit": 281_967,
                 "sinkhorn": 115_200, "kmedoids": 0, "dpcknn": 1_155}


def learn_and_fuse(module, x, state, aux):
  """Runs a reducer, and the fuser after it where it has one (so that its params exist)."""
  y, new = module(x, state, aux)
  return module.after_block(y, new, (x, state))


def count_params(name, options, width=384, heads=6):
  entry = tokens.get(name)
  plan = plan_blocks(entry.cls, options, depth=12, num_patches=196, num_prefix=1)
  total, n = 0, 197
  for kw in plan:
    if kw is None:
      continue
    m = entry.cls(num_prefix=1, **kw)
    x = jax.ShapeDtypeStruct((1, n, width), jnp.float32)
    aux = {"attn": jax.ShapeDtypeStruct((1, heads, n, n), jnp.float32)}
    state = initial_state(1, 1, (14, 14))
    if n != 197:
      state = state.replace(size=jnp.ones((1, n)))
    init = lambda x, a, m=m, s=state: m.init(jax.random.PRNGKey(0), x, s, a, method=learn_and_fuse)
    shapes = jax.eval_shape(init, x, aux)
    total += sum(math.prod(l.shape) for l in jax.tree.leaves(shapes.get("params", {})))
    n = 1 + kw["count"] if not kw.get("fuser") else n
  return total


@pytest.mark.parametrize("name", CUMULATIVE)
def test_param_counts_deit_s(name):
  assert count_params(name, dict(keep_rate=0.7)) == DEIT_S_PARAMS[name]


def test_tokenlearner_param_counts():
  assert count_params("tokenlearner", dict(num_tokens=16)) == 26_448
  # with the fuser, one learner + fuser per block from the location on (here only block 11)
  assert count_params("tokenlearner", dict(num_tokens=16, fuser=True, locations=(11,))) == (
      26_448 + 28_256)


# ----- DynamicViT -----
def ref_predictor(params, img, policy):
  p = np_params(params)["predictor"]
  img, policy = np.asarray(img, np.float64), np.asarray(policy, np.float64)
  h = layer_norm(img, p["norm"]["scale"], p["norm"]["bias"], 1e-5)
  h = gelu_erf(h @ p["in_proj"]["kernel"] + p["in_proj"]["bias"])
  d = h.shape[-1] // 2
  glob = (h[..., d:] * policy[..., None]).sum(1, keepdims=True) / policy.sum(1)[:, None, None]
  h = np.concatenate([h[..., :d], np.broadcast_to(glob, h[..., d:].shape)], -1)
  for name in ("out_fc1", "out_fc2"):
    h = gelu_erf(h @ p[name]["kernel"] + p[name]["bias"])
  logits = h @ p["out_fc3"]["kernel"] + p["out_fc3"]["bias"]
  return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


def test_dynamicvit_inference_keeps_top_scores():
  m, x, state = build("dynamicvit"), tokens_in(), state_in()
  params = fast_jit(m.init)(jax.random.PRNGKey(1), x, state, {})["params"]
  y, new = japply(m, {"params": params}, x, state, {})
  logp = ref_predictor(params, x[:, P:], np.ones((B, N)))
  keep = np.argsort(-logp[..., 0], axis=1, kind="stable")[:, :m.count] + P
  idx = np.concatenate([np.zeros((B, 1), int), keep], 1)
  close(y, np.take_along_axis(np.asarray(x), idx[..., None], 1), 1e-6)
  close(new.pos[:, P:], np.take_along_axis(np.asarray(state.pos), idx[..., None], 1)[:, P:])
  assert y.shape == (B, P + m.count, D)


def test_dynamicvit_training_policy_and_ratio_loss():
  m1, x, state = build("dynamicvit"), tokens_in(), state_in()
  m2 = dvit.DynamicViT(num_prefix=P, count=4, ratio=0.25, num_stages=2)
  rngs = {"dropout": jax.random.PRNGKey(3)}
  train = lambda m, v, s: m.apply(v, x, s, {}, deterministic=False, rngs=rngs, mutable=["losses"])
  v1 = fast_jit(m1.init)(jax.random.PRNGKey(1), x, state, {})
  (y, s1), sown = fast_jit(lambda v, s: train(m1, v, s))(v1, state)
  close(y, x, 0)  # training masks, it does not remove
  keep1 = np.asarray(s1.valid)
  assert set(np.unique(keep1)) <= {0.0, 1.0} and (keep1[:, :P] == 1).all()
  ratio = np.mean((keep1[:, P:].mean(1) - m1.ratio) ** 2) * 2.0 / m1.num_stages
  close(sown["losses"]["ratio"][0], ratio, 1e-6)
  # the policy is cumulative; the predictor pools its global feature over kept tokens only
  v2 = fast_jit(m2.init)(jax.random.PRNGKey(2), x, s1, {})
  (_, s2), _ = fast_jit(lambda v, s: train(m2, v, s))(v2, s1)
  assert (np.asarray(s2.valid) <= keep1).all()
  # the ratio loss is 0 at the target fraction
  exact = jnp.concatenate([jnp.ones((B, 8)), jnp.zeros((B, 8))], 1)
  assert float(m1.ratio_loss(exact)) == 0.0


def test_policy_key_bias_has_dynamicvit_gradient():
  """softmax(S + bias(G)) == exp(S) G / sum exp(S) G forward, and d/dG agree (G has zeros)."""
  s = rand(0, (B, H, P + N, P + N), 2.0)
  g = (jax.random.uniform(jax.random.PRNGKey(1), (B, P + N)) > 0.4).astype(jnp.float32)
  g = g.at[:, 0].set(1.0)
  r = rand(2, s.shape)

  def ours(g):
    return (jax.nn.softmax(s + policy_key_bias(g)[:, None, None, :], axis=-1) * r).sum()

  def multiplicative(g):
    e = jnp.exp(s - s.max(-1, keepdims=True)) * g[:, None, None, :]
    return (e / e.sum(-1, keepdims=True) * r).sum()

  both = jax.jit(lambda g: [jax.value_and_grad(f)(g) for f in (ours, multiplicative)])
  (val, grad), (val_ref, grad_ref) = both(g)
  close(val, val_ref, 1e-5)
  close(grad, grad_ref, 1e-4)
  assert float(jnp.abs(grad * (1 - g)).max()) > 0  # dropped keys get a gradient


def tiny_vit(name, **opts):
  spec = dict(name=name, keep_rate=0.5, locations=(1, 2))
  if name == "tokenlearner_v1" or opts.get("fuser"):
    spec["locations"] = (1,)  # v1.0 needs the grid; the fuser learns and fuses from one block on
  spec.update(opts)
  spec = {k: v for k, v in spec.items() if v is not None}
  return models.build(dict(variant="Ti/4", depth=4, tokens=spec), num_classes=10, image_size=16)


IMAGES = jax.random.normal(jax.random.PRNGKey(7), (B, 16, 16, 3))
LABELS = jnp.array([1, 7])


def vit_init(model, head_seed=None):
  v = fast_jit(model.init)(jax.random.PRNGKey(0), IMAGES)
  if head_seed is not None:  # a nonzero head (zero at init), so the loss depends on the tokens
    v = jax.tree.map(lambda a: a, v)
    v["params"]["head"]["kernel"] = rand(head_seed, v["params"]["head"]["kernel"].shape)
  return v


def vit_loss(model, params, train: bool, task_only=False):
  """Cross-entropy (+ everything sown in "losses" in train mode) and the model outputs."""
  if train:
    (logits, out), sown = model.apply({"params": params}, IMAGES, train=True, mutable=["losses"],
                                      rngs={"dropout": jax.random.PRNGKey(1)})
  else:
    (logits, out), sown = model.apply({"params": params}, IMAGES), {}
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, LABELS).mean()
  if not task_only:
    loss = loss + sum(jnp.sum(l) for l in jax.tree.leaves(sown.get("losses", {})))
  return loss, (logits, out)


def test_dynamicvit_masked_training_equals_pruned_inference():
  """With the decision fixed to the inference top-k, the masked training forward gives the pruned
  inference forward's CLS output."""
  model = tiny_vit("dynamicvit", train_decision="topk")
  v = vit_init(model, head_seed=4)
  run = fast_jit(lambda p: (vit_loss(model, p, False)[1], vit_loss(model, p, True)[1]))
  (eval_logits, eval_out), (train_logits, train_out) = run(v["params"])
  assert eval_out["token_state"].size.shape == (B, P + 4)
  assert train_out["token_state"].valid.sum(1).tolist() == [P + 4] * B
  close(train_logits, eval_logits, 1e-5)
  close(train_out["pre_logits"], eval_out["pre_logits"], 1e-5)


def test_dynamicvit_distill_loss():
  logits, t_logits = rand(0, (B, 10)), rand(1, (B, 10))
  toks, t_toks = rand(2, (B, N, D)), rand(3, (B, N, D))
  keep = (jax.random.uniform(jax.random.PRNGKey(4), (B, N)) > 0.5).astype(jnp.float32)
  lp = np.asarray(jax.nn.log_softmax(logits)); lt = np.asarray(jax.nn.log_softmax(t_logits))
  kl = (np.exp(lt) * (lt - lp)).sum() / B
  sel = np.asarray(keep).reshape(-1) > 0.5
  diff = np.asarray(toks).reshape(-1, D)[sel] - np.asarray(t_toks).reshape(-1, D)[sel]
  mse = (diff ** 2).mean()
  close(dvit.distill_loss(logits, toks, keep, t_logits, t_toks), 0.5 * kl + 0.5 * mse, 1e-5)
  close(dvit.distill_loss(logits, toks, keep * 0, t_logits, t_toks), 0.5 * kl, 1e-5)


# ----- soft merges -----
def test_patchmerger_matches_reference_and_is_convex():
  m, x, state = build("patchmerger"), tokens_in(), state_in()

  def ref(params, x):
    z = layer_norm(x[:, P:], params["norm"]["scale"], params["norm"]["bias"], 1e-5)
    out = []
    for q in params["queries"]:
      e = jnp.exp(z @ q - (z @ q).max(1, keepdims=True))
      a = e / e.sum(1, keepdims=True)
      out.append((a[..., None] * z).sum(1))
    return jnp.concatenate([x[:, :P], jnp.stack(out, 1)], 1)

  params = check_forward_and_grads(m, ref, x, state)
  y, new = japply(m, {"params": params}, x, state, {})
  w = soft_weights(new)
  assert (w >= 0).all()
  close(w.sum(-1), 1.0)
  z = layer_norm(np.asarray(x[:, P:]), *(np.asarray(params["norm"][k]) for k in ("scale", "bias")),
                 1e-5)
  close(y[:, P:], w @ z, 1e-4)
  close(new.size[:, P:], 1.0)  # assignment-weighted size of a convex combination of unit tokens
  # identical queries give identical outputs
  same = {**params, "queries": jnp.tile(params["queries"][:1], (m.count, 1))}
  y, _ = japply(m, {"params": same}, x, state, {})
  close(y[:, P:], jnp.broadcast_to(y[:, P:P + 1], y[:, P:].shape), 1e-6)


def test_sit_matches_reference_and_is_convex():
  m, x, state = build("sit"), tokens_in(), state_in()

  def ref(params, x):
    img = x[:, P:]
    h = layer_norm(img, params["norm"]["scale"], params["norm"]["bias"], 1e-5)
    h = h @ params["fc1"]["kernel"] + params["fc1"]["bias"]
    h = 0.5 * h * (1 + jax.scipy.special.erf(h / math.sqrt(2)))
    w = (h @ params["fc2"]["kernel"] + params["fc2"]["bias"]) * params["scale"][0]
    e = jnp.exp(w - w.max(1, keepdims=True))
    a = e / e.sum(1, keepdims=True)                      # over tokens, one column per output
    return jnp.concatenate([x[:, :P], jnp.einsum("bnm,bnd->bmd", a, img)], 1)

  params = check_forward_and_grads(m, ref, x, state)
  _, new = japply(m, {"params": params}, x, state, {})
  w = soft_weights(new)
  assert (w >= 0).all()
  close(w.sum(-1), 1.0)
  # kappa -> 0: every output is the token mean
  y, _ = japply(m, {"params": {**params, "scale": jnp.zeros(1)}}, x, state, {})
  close(y[:, P:], jnp.broadcast_to(x[:, P:].mean(1, keepdims=True), y[:, P:].shape), 1e-5)


def np_log_sinkhorn(scores, eps, iters):
  m, n = scores.shape
  norm = -np.log(m + n)
  z = scores / eps
  u, v = np.zeros(m), np.zeros(n)
  lse = lambda a, axis: np.log(np.exp(a).sum(axis))
  for _ in range(iters):
    u = norm - lse(z + v[None, :], 1)
    v = norm - lse(z + u[:, None], 0)
  return np.exp(z + u[:, None] + v[None, :] - norm)


def test_sinkhorn_matches_reference_and_columns_sum_to_one():
  m, x, state = build("sinkhorn"), tokens_in(), state_in()
  params = fast_jit(m.init)(jax.random.PRNGKey(1), x, state, {})["params"]
  c = np.asarray(params["centers"], np.float64)
  close(np.linalg.norm(c, axis=-1), 1.0)
  y, new = japply(m, {"params": params}, x, state, {})
  xn = np.asarray(x[:, P:], np.float64)
  xn = xn / np.linalg.norm(xn, axis=-1, keepdims=True)
  for b in range(B):
    pi = np_log_sinkhorn(c @ xn[b].T, 1.0, 3)
    close(y[b, P:], pi @ xn[b], 1e-5)
    close(soft_weights(new)[b], pi, 1e-5)
  close(soft_weights(new).sum(1), 1.0)              # every token's mass is split, all of it
  close(new.size.sum(1), P + N, 1e-4)               # so the sizes keep the patch count

  def ref(params, x):  # centres are unit norm at init, so the reference uses them as they are
    v = params["centers"]
    xh = x[:, P:] / jnp.sqrt((x[:, P:] ** 2).sum(-1, keepdims=True))
    z = jnp.einsum("md,bnd->bmn", v, xh)
    mm, nn_ = z.shape[1:]
    norm = -jnp.log(float(mm + nn_))
    u, w = jnp.zeros(z.shape[:2]), jnp.zeros((B, nn_))
    for _ in range(3):
      u = norm - jnp.log(jnp.exp(z + w[:, None, :]).sum(2))
      w = norm - jnp.log(jnp.exp(z + u[:, :, None]).sum(1))
    pi = jnp.exp(z + u[:, :, None] + w[:, None, :] - norm)
    return jnp.concatenate([x[:, :P], jnp.einsum("bmn,bnd->bmd", pi, xh)], 1)

  check_forward_and_grads(m, ref, x, state)
  # eps -> 0 with one iteration: u_m = -log(M+N) - max_j z_mj / eps, so a column's mass goes to
  # argmax_m (z_mj - max_k z_mk), split evenly where several centres share their best token.
  sharp = build("sinkhorn", sinkhorn_eps=1e-4, iters=1)
  _, new = japply(sharp, {"params": params}, x, state, {})
  for b in range(B):
    z = c @ xn[b].T
    gap = z - z.max(1, keepdims=True)
    best = (gap >= gap.max(0, keepdims=True) - 1e-7).astype(float)
    close(soft_weights(new)[b], best / best.sum(0, keepdims=True), 1e-3)


def test_sinkhorn_centres_step_like_the_benchmark_under_adamw():
  """The benchmark renormalises its centres in place before every forward and AdamW steps from
  that unit value; optax's adamw + keep_centers_normalized gives the same centres (the benchmark's
  step written out here with torch's AdamW formula); adamw alone drifts away from them."""
  m, x, state = build("sinkhorn"), tokens_in(), state_in()
  params = fast_jit(m.init)(jax.random.PRNGKey(1), x, state, {})["params"]
  cot = rand(9, (B, P + m.count, D))
  grad = fast_jit(jax.grad(lambda p: (m.apply({"params": p}, x, state, {})[0] * cot).sum()))
  lr, wd, b1, b2, eps, steps = 0.05, 0.1, 0.9, 0.999, 1e-8, 3

  def optax_centres(tx):
    p, opt = params, tx.init(params)
    for _ in range(steps):
      u, opt = tx.update(grad(p), opt, p)
      p = optax.apply_updates(p, u)
    return np.asarray(p["centers"], np.float64)

  v = np.asarray(params["centers"], np.float64)
  mom, sq = np.zeros_like(v), np.zeros_like(v)
  for t in range(1, steps + 1):
    v = v / np.linalg.norm(v, axis=-1, keepdims=True)           # in place, no gradient
    g = np.asarray(grad({"centers": jnp.asarray(v, jnp.float32)})["centers"], np.float64)
    v = v * (1 - lr * wd)                                        # torch AdamW: decay, then step
    mom, sq = b1 * mom + (1 - b1) * g, b2 * sq + (1 - b2) * g * g
    v = v - lr * (mom / (1 - b1 ** t)) / (np.sqrt(sq / (1 - b2 ** t)) + eps)
  want = v / np.linalg.norm(v, axis=-1, keepdims=True)
  adamw = optax.adamw(lr, b1, b2, eps, weight_decay=wd)
  kept = optax_centres(optax.chain(adamw, sinkhorn.keep_centers_normalized()))
  close(np.linalg.norm(kept, axis=-1), 1.0)
  close(kept, want, 1e-5)
  drifted = optax_centres(adamw)
  assert np.abs(drifted / np.linalg.norm(drifted, axis=-1, keepdims=True) - want).max() > 1e-4


# ----- clustering -----
def np_kmedoids(x, w, m, iters, rule="haurum", start=None):
  """Loop-for-loop transcription of the benchmark's k_medoids_fit for one image."""
  n = len(x)
  dist = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
  if w is None:
    idx = [start]
    for _ in range(1, m):
      inter = dist[:, idx].copy()
      inter[idx] = 0
      idx.append(int(np.argmax(inter.max(-1))))
    idx, w = np.array(idx), np.ones(n)
  else:
    idx = np.argsort(-w, kind="stable")[:m]
  for _ in range(iters):
    labels = np.argmin(dist[:, idx], -1)
    for k in range(m):
      if rule == "haurum":
        wd = dist * w[:, None]
        wd[labels != k] = 1e6
        idx[k] = np.argmin(wd.sum(-1))
      else:
        members = np.flatnonzero(labels == k)
        cost = [(w[members] * dist[i, members]).sum() for i in members]
        idx[k] = members[int(np.argmin(cost))]
  return idx, np.argmin(dist[:, idx], -1)


@pytest.mark.parametrize("opts", [{}, {"medoid_update": "textbook"}, {"equal_weight": True}])
def test_kmedoids_matches_reference_and_copies_tokens(opts):
  m, x, state, aux = build("kmedoids", **opts), tokens_in(), state_in(), attn_in()
  y, new = japply(m, {}, x, state, aux)
  xs = np.asarray(x[:, P:], np.float64)
  w = np.asarray(aux["attn"], np.float64).sum((1, 2))[:, P:]
  for b in range(B):
    idx, labels = np_kmedoids(xs[b], None if opts.get("equal_weight") else w[b], m.count, 3,
                              opts.get("medoid_update", "haurum"), start=0)
    np.testing.assert_array_equal(np.asarray(y[b, P:]), np.asarray(x[b, P:])[idx])  # exact copies
    np.testing.assert_array_equal(np.asarray(new.size[b, P:]),
                                  np.bincount(labels, minlength=m.count))
    close(new.pos[b, P:], np.asarray(state.pos[b, P:])[idx])
  np.testing.assert_array_equal(np.asarray(y[:, :P]), np.asarray(x[:, :P]))
  close(new.size.sum(1), P + N)
  # gradients flow into the copied tokens only
  gx = np.asarray(fast_jit(jax.grad(lambda x: m.apply({}, x, state, aux)[0].sum()))(x))
  assert float(gx.sum()) == B * (P + m.count) * D and (gx >= 0).all()


def np_dpcknn(x, m, k):
  """The benchmark's cluster_dpc_knn for one image, with ties broken by index instead of noise."""
  n, c = x.shape
  dist = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1)) / np.sqrt(c)
  density = np.exp(-(np.sort(dist, axis=1)[:, :k] ** 2).mean(1))
  delta = np.empty(n)
  for i in range(n):
    denser = [j for j in range(n)
              if density[j] > density[i] or (density[j] == density[i] and j < i)]
    delta[i] = dist[i, denser].min() if denser else dist.max()
  centers = np.argsort(-(delta * density), kind="stable")[:m]
  labels = np.argmin(dist[centers], axis=0)
  labels[centers] = np.arange(m)
  return labels, centers


def test_dpcknn_matches_reference_and_is_convex():
  m, x, state = build("dpcknn"), tokens_in(), state_in()
  labels = [np_dpcknn(np.asarray(x[b, P:], np.float64), m.count, 5)[0] for b in range(B)]
  onehot = jnp.asarray(np.stack([np.eye(m.count)[l].T for l in labels]))   # [B, M, N]

  def ref(params, x):
    img = x[:, P:]
    w = jnp.exp(img @ params["score"]["kernel"][:, 0] + params["score"]["bias"][0])
    num = jnp.einsum("bmn,bn,bnd->bmd", onehot, w, img)
    den = jnp.einsum("bmn,bn->bm", onehot, w) + 1e-6
    return jnp.concatenate([x[:, :P], num / den[..., None]], 1)

  params = check_forward_and_grads(m, ref, x, state)
  _, new = japply(m, {"params": params}, x, state, {})
  close(soft_weights(new), onehot, 0)           # hard clusters: sources add
  close(new.size.sum(1), P + N)
  for b in range(B):
    _, centers = np_dpcknn(np.asarray(x[b, P:], np.float64), m.count, 5)
    assert (labels[b][centers] == np.arange(m.count)).all()   # every centre in its own cluster
  # equal weights: cluster means
  y, _ = japply(build("dpcknn", equal_weight=True), {}, x, state, {})
  means = np.einsum("bmn,bnd->bmd", onehot, np.asarray(x[:, P:]))
  means = means / (onehot.sum(-1)[..., None] + 1e-6)
  close(y[:, P:], means, 1e-5)


# ----- TokenLearner and TokenFuser -----
def test_tokenlearner_v11_matches_reference_and_is_convex():
  m, x, state = build("tokenlearner"), tokens_in(), state_in()

  def ref(params, x):
    p = params["learner"]
    img = x[:, P:]
    h = layer_norm(img, p["norm"]["scale"], p["norm"]["bias"], 1e-6)
    mlp = p["token_masking"]
    h = gelu_tanh(h @ mlp["Dense_0"]["kernel"] + mlp["Dense_0"]["bias"])
    h = h @ mlp["Dense_1"]["kernel"] + mlp["Dense_1"]["bias"]               # [B, N, S]
    e = jnp.exp(h - h.max(1, keepdims=True))
    alpha = e / e.sum(1, keepdims=True)
    return jnp.concatenate([x[:, :P], jnp.einsum("bns,bnd->bsd", alpha, img)], 1)

  params = check_forward_and_grads(m, ref, x, state)
  _, new = japply(m, {"params": params}, x, state, {})
  assert (soft_weights(new) >= 0).all()
  close(soft_weights(new).sum(-1), 1.0)


def np_conv3x3_same(h, k):
  """h [H, W, Cin], k [3, 3, Cin, Cout] -> [H, W, Cout], zero padding."""
  hp = np.pad(h, ((1, 1), (1, 1), (0, 0)))
  out = np.zeros(h.shape[:2] + (k.shape[-1],))
  for i in range(3):
    for j in range(3):
      out += hp[i:i + h.shape[0], j:j + h.shape[1]] @ k[i, j]
  return out


def test_tokenlearner_v10_sum_pooling_matches_reference():
  m, x, state = build("tokenlearner_v1"), tokens_in(), state_in()
  params = fast_jit(m.init)(jax.random.PRNGKey(1), x, state, {})["params"]
  y, new = japply(m, {"params": params}, x, state, {})
  p = np_params(params)["learner"]
  for b in range(B):
    img = np.asarray(x[b, P:], np.float64)
    h = layer_norm(img, p["norm"]["scale"], p["norm"]["bias"], 1e-6).reshape(*GRID, D)
    for i in range(4):
      h = np_conv3x3_same(h, p[f"conv_{i}"]["kernel"])
      h = np.asarray(gelu_tanh(h)) if i < 3 else h
    maps = 1 / (1 + np.exp(-h.reshape(N, -1).T))                            # [S, N]
    close(y[b, P:], maps @ img, 1e-4)
    close(new.size[b, P:], maps.sum(1), 1e-4)


def test_tokenfuser_identity_at_init_and_reference():
  from vitjax.tokens.tokenlearner import TokenFuser
  learned, original = rand(0, (B, 8, D)), rand(1, (B, N, D))
  fuser = TokenFuser()
  params = fast_jit(fuser.init, static_argnums=3)(jax.random.PRNGKey(2), learned, original, True)
  params = params["params"]
  close(fast_jit(fuser.apply, static_argnums=3)({"params": params}, learned, original, True),
        0.0, 0)   # the update is zero at init: out = update + x is the identity
  params = {**params, "mix": {"kernel": rand(3, (8, 8)), "bias": rand(4, (8,))}}

  def ref(params, learned, original):
    t = layer_norm(learned, params["mix_norm1"]["scale"], params["mix_norm1"]["bias"], 1e-6)
    t = jnp.einsum("bsd,st->btd", t, params["mix"]["kernel"]) + params["mix"]["bias"][None, :, None]
    t = layer_norm(t, params["mix_norm2"]["scale"], params["mix_norm2"]["bias"], 1e-6)
    o = layer_norm(original, params["norm"]["scale"], params["norm"]["bias"], 1e-6)
    mlp = params["token_masking"]
    beta = gelu_tanh(o @ mlp["Dense_0"]["kernel"] + mlp["Dense_0"]["bias"])
    beta = jax.nn.sigmoid(beta @ mlp["Dense_1"]["kernel"] + mlp["Dense_1"]["bias"])  # [B, N, S]
    return jnp.einsum("bns,bsd->bnd", beta, t)

  run = lambda p: fuser.apply({"params": p}, learned, original, True)
  # a random cotangent: a plain sum of LayerNorm outputs cancels to ~0 and defeats rtol
  w = rand(5, (B, N, D))
  both = fast_jit(lambda p: [(f(p), jax.grad(lambda p, f=f: (f(p) * w).sum())(p))
                             for f in (run, lambda p: ref(p, learned, original))])
  (out, g), (out_ref, g_ref) = both(params)
  close(out, out_ref, 1e-4)
  jax.tree.map(lambda a, b: close(a, b, 1e-4), g, g_ref)


def test_tokenfuser_in_vit_identity_at_init_and_grads():
  model = tiny_vit("tokenlearner", num_tokens=4, fuser=True, locations=(2,), keep_rate=None)
  v = vit_init(model, head_seed=4)
  step = fast_jit(jax.value_and_grad(lambda p: vit_loss(model, p, True), has_aux=True))
  (val, (_, out)), g = step(v["params"])
  assert out["block_3"].shape == (B, P + N, 192)
  for i in (2, 3):  # each fused block hands its input image tokens back unchanged at init
    close(out[f"block_{i}"][:, P:], out[f"block_{i - 1}"][:, P:], 0)
  assert not np.allclose(out["block_3"][:, 0], out["block_1"][:, 0])  # CLS was processed
  assert np.isfinite(float(val)) and all(np.isfinite(l).all() for l in jax.tree.leaves(g))
  # the zero-initialised mixing gets a gradient (block 2; block 3 image tokens feed no output)
  assert float(jnp.abs(g["reduce_2"]["token_fuser"]["mix"]["kernel"]).max()) > 0


# ----- jit and the full model -----
@pytest.mark.parametrize("name", ALL)
def test_jit_static_shapes_one_trace(name):
  m, state = build(name), state_in()
  aux = attn_in()
  params = fast_jit(m.init)(jax.random.PRNGKey(1), tokens_in(), state, aux)
  traces = []

  def f(x):
    traces.append(1)
    return m.apply(params, x, state, aux)

  jf = jax.jit(f)
  for seed in (0, 1):
    y, new = jf(tokens_in(seed))
    assert y.shape == (B, P + m.count, D) and new.size.shape == (B, P + m.count)
  assert len(traces) == 1


@pytest.mark.parametrize("name", ALL)
def test_in_tiny_vit_forward_and_grad_finite(name):
  """Forward and gradient in train mode (dropout rng) and eval mode. Only DynamicViT computes
  differently in the two modes; for the others the two forwards must agree, so the train-mode
  gradient covers both (one compile less per method)."""
  model = tiny_vit(name)
  dyn = name == "dynamicvit"
  v = vit_init(model, head_seed=4 if dyn else None)

  @fast_jit
  def run(params):
    # DynamicViT: the task loss alone, to see its gradient reach the predictors through attention
    loss = lambda p: vit_loss(model, p, True, task_only=dyn)
    if dyn:  # the only method whose eval path differs: differentiate that one too
      eval_loss, eval_g = jax.value_and_grad(lambda p: vit_loss(model, p, False)[0])(params)
      assert_finite = [eval_loss] + jax.tree.leaves(eval_g)
    else:
      assert_finite = []
    return (jax.value_and_grad(loss, has_aux=True)(params), vit_loss(model, params, False),
            assert_finite)

  ((val, (logits, out)), g), (eval_loss, (eval_logits, eval_out)), extra = run(v["params"])
  assert all(np.isfinite(np.asarray(l)).all() for l in extra)
  final = P + 8 if name == "tokenlearner_v1" else P + 4
  assert np.isfinite(float(val)) and np.isfinite(float(eval_loss))
  assert all(np.isfinite(np.asarray(l)).all() for l in jax.tree.leaves(g))
  assert eval_out["token_state"].size.shape == (B, final)
  if dyn:  # masked, not removed; its pruned eval path is checked against it further above
    assert out["token_state"].size.shape == (B, P + N)
    for stage in ("reduce_1", "reduce_2"):
      assert float(jnp.abs(g[stage]["predictor"]["out_fc3"]["kernel"]).max()) > 0
  else:
    close(logits, eval_logits, 1e-6)


# reducer -> its test against a reference written here; tests/test_tokens_registry.py fails
# for a registered reducer that no test file lists
REFERENCE_CASES = {
    "dynamicvit": test_dynamicvit_inference_keeps_top_scores,
    "patchmerger": test_patchmerger_matches_reference_and_is_convex,
    "sit": test_sit_matches_reference_and_is_convex,
    "sinkhorn": test_sinkhorn_matches_reference_and_columns_sum_to_one,
    "kmedoids": test_kmedoids_matches_reference_and_copies_tokens,
    "dpcknn": test_dpcknn_matches_reference_and_is_convex,
    "tokenlearner": test_tokenlearner_v11_matches_reference_and_is_convex,
    "tokenlearner_v1": test_tokenlearner_v10_sum_pooling_matches_reference,
}
