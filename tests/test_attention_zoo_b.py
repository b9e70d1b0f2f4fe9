"""Attention zoo, Tier G part B (G12-G22): each mechanism against a naive formula written here,
the spec's special cases, R2 (duplicate tokens), R3 (permutation), key masks, aux shapes, jit, bf16,
and a tiny ViT. Shapes: B=2, N=17 (CLS + 4x4 grid), D=64, H=4, fp32.
"""
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitjax import attention, models
from vitjax.attention import gqa as gqa_lib
from vitjax.attention.base import AttnContext
from vitjax.attention.causal_postcls import mask_ratio

B, N, D, H = 2, 17, 64, 4
DH = D // H
GRID = (4, 4)
ATOL = 2e-5

NAMES = ["gqa", "mqa", "kdgqa", "dgqa", "moh", "latte", "sra", "sra_tokenset", "selective",
         "neural", "gaam", "levit_bias", "causal_postcls", "rope1d", "rope2d_axial", "routing",
         "twins_gsa", "davit_channel"]
OPTIONS = {"gqa": dict(num_kv_heads=2), "kdgqa": dict(num_kv_heads=2), "latte": dict(num_latents=8),
           "sra_tokenset": dict(num_pooled=4), "levit_bias": dict(grid=GRID),
           "rope1d": dict(grid=GRID), "causal_postcls": dict(r=0.3), "selective": dict(grid=GRID)}
REFERENCE_CASES = {}  # name -> the test that checks the mechanism against its naive formula


def reference(*names):
  """Marks a test as the naive-formula reference of the mechanisms `names`."""
  def deco(fn):
    REFERENCE_CASES.update({n: fn for n in names})
    return fn
  return deco


# ----------------------------------------------------------------------------- helpers
def positions(b=B, grid=GRID, prefix=1):
  rows, cols = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij")
  pos = np.stack([rows.ravel(), cols.ravel()], -1).astype(np.float32)
  pos = np.concatenate([np.full((prefix, 2), np.nan, np.float32), pos])
  return jnp.asarray(np.broadcast_to(pos, (b,) + pos.shape))


def context(**kw):
  base = dict(pos=positions(), grid=GRID, num_prefix=1, cls_index=0)
  base.update(kw)
  return AttnContext(**base)


def tokens(seed=0, n=N, b=B):
  return jax.random.normal(jax.random.PRNGKey(seed), (b, n, D), jnp.float32)


def module(name, **kw):
  return attention.build(dict(name=name, **{**OPTIONS.get(name, {}), **kw}), num_heads=H,
                         dtype=jnp.float32)


def init(mod, x, ctx, perturb=0.1, seed=1):
  """Parameters, with zero-initialised pieces (gates, tables) moved off zero."""
  variables = flax.core.unfreeze(mod.init(jax.random.PRNGKey(seed), x, ctx))
  params = variables["params"]
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed + 7), len(leaves))
  leaves = [p + perturb * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)]
  variables["params"] = jax.tree_util.tree_unflatten(tree, leaves)
  return variables


def run(mod, variables, x, ctx, need=()):
  return mod.apply(variables, x, ctx, need=tuple(need))


def dense(p, x):
  return x @ p["kernel"] + (p["bias"] if "bias" in p else 0.0)


def split_heads(t):
  return t.reshape(*t.shape[:-1], -1, DH)


def qkv(p, x, kv_heads=H):
  t = dense(p["qkv"], x)
  q, k, v = jnp.split(t, [H * DH, (H + kv_heads) * DH], axis=-1)
  return split_heads(q), split_heads(k), split_heads(v)


def layer_norm(p, x, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / jnp.sqrt(var + eps) * p["scale"] + p["bias"]


def softmax(s, axis=-1):
  e = jnp.exp(s - s.max(axis, keepdims=True))
  return e / e.sum(axis, keepdims=True)


def head_attend(q, k, v, bias=None):
  """Per-head loop: q [B,N,H,d], k, v [B,M,H,d]; bias broadcastable to [B,H,N,M]."""
  outs = []
  for h in range(q.shape[2]):
    s = q[:, :, h] @ jnp.swapaxes(k[:, :, h], 1, 2) / math.sqrt(q.shape[-1])
    if bias is not None:
      s = s + jnp.broadcast_to(bias, (q.shape[0], q.shape[2]) + s.shape[1:])[:, h]
    outs.append(softmax(s) @ v[:, :, h])
  return jnp.stack(outs, axis=2)


def out_proj(p, y):
  return dense(p["proj"], y.reshape(*y.shape[:2], -1))


def mhsa_naive(p, x, bias=None):
  q, k, v = qkv(p, x)
  return out_proj(p, head_attend(q, k, v, bias))


def check_against(mod, variables, naive, x, ctx, atol=ATOL):
  """Forward and gradient (w.r.t. x and params) of the module equal those of `naive(params, x)`."""
  params = variables["params"]
  rest = {k: v for k, v in variables.items() if k != "params"}
  ct = jax.random.normal(jax.random.PRNGKey(5), x.shape)

  def forward_and_grad(fn):  # eager: primitives compile once per shape and are reused by tests
    y, vjp = jax.vjp(fn, params, x)
    return y, vjp(ct)
  ya, ga = forward_and_grad(lambda p, x: mod.apply({**rest, "params": p}, x, ctx)[0])
  yb, gb = forward_and_grad(naive)
  np.testing.assert_allclose(ya, yb, atol=atol, rtol=1e-4)
  for a, b in zip(jax.tree_util.tree_leaves(ga), jax.tree_util.tree_leaves(gb)):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-3)


def mhsa_with(params_src, x, ctx):
  """G1 MHSA run with the qkv/proj weights of another mechanism."""
  mhsa = attention.build("mhsa", num_heads=H, dtype=jnp.float32)
  p = {"qkv": params_src["qkv"], "proj": params_src["proj"]}
  return mhsa.apply({"params": p}, x, ctx)[0]


# ----------------------------------------------------------------------------- G12/G13 gqa family
@reference("gqa")
def test_gqa_naive():
  mod, x, ctx = module("gqa", num_kv_heads=2), tokens(), context()
  variables = init(mod, x, ctx)

  def naive(p, x):
    q, k, v = qkv(p, x, kv_heads=2)
    g = [h * 2 // H for h in range(H)]
    return out_proj(p, head_attend(q, k[:, :, g], v[:, :, g]))
  check_against(mod, variables, naive, x, ctx)


def test_gqa_full_groups_is_mhsa_and_mqa_is_one_group():
  x, ctx = tokens(), context()
  mod = module("gqa", num_kv_heads=H)
  variables = init(mod, x, ctx)
  np.testing.assert_allclose(run(mod, variables, x, ctx)[0], mhsa_with(variables["params"], x, ctx),
                             atol=ATOL)
  mqa, one = module("mqa"), module("gqa", num_kv_heads=1)
  variables = init(mqa, x, ctx)
  np.testing.assert_allclose(run(mqa, variables, x, ctx)[0], run(one, variables, x, ctx)[0],
                             atol=1e-6)
  assert variables["params"]["qkv"]["kernel"].shape == (D, (H + 2) * DH)


def test_key_norm_allocation():
  # min-max scaled norms [0, .5, 1] -> shares [0, 4/3, 8/3] of 4 heads -> counts [0, 1, 3]
  groups = gqa_lib.allocate_queries(jnp.asarray([1.0, 2.0, 3.0]), 4)
  np.testing.assert_array_equal(groups, [1, 2, 2, 2])
  np.testing.assert_array_equal(gqa_lib.allocate_queries(jnp.ones(2), 4), [0, 0, 1, 1])
  np.testing.assert_array_equal(gqa_lib.allocate_queries(jnp.asarray([5.0, 1.0]), 3), [0, 0, 0])


@reference("kdgqa")
def test_kdgqa_naive():
  mod, x, ctx = module("kdgqa", num_kv_heads=2), tokens(), context()
  variables = init(mod, x, ctx)

  groups = []  # the allocation is under stop-gradient: compute it once from concrete keys
  for kb in np.asarray(qkv(variables["params"], x, kv_heads=2)[1]):
    norms = np.sqrt((kb.astype(np.float64) ** 2).sum((0, 2)))
    share = (norms - norms.min()) / (norms.max() - norms.min())
    share = share / share.sum() * H
    counts = np.floor(share).astype(int)
    for i in np.argsort(-(share - counts), kind="stable")[:H - counts.sum()]:
      counts[i] += 1
    groups.append(np.repeat(np.arange(2), counts))

  def naive(p, x):
    q, k, v = qkv(p, x, kv_heads=2)
    outs = [head_attend(q[b:b + 1], k[b:b + 1][:, :, g], v[b:b + 1][:, :, g])
            for b, g in enumerate(groups)]
    return out_proj(p, jnp.concatenate(outs))
  check_against(mod, variables, naive, x, ctx)


@reference("mqa", "dgqa")
def test_mqa_and_fresh_dgqa_naive():
  """mqa: one K/V head for all queries; dgqa with its initial EMA (equal norms): uniform groups."""
  x, ctx = tokens(), context()
  for name, kv in (("mqa", 1), ("dgqa", 2)):
    mod = module(name, num_kv_heads=kv)

    def naive(p, x, kv=kv):
      q, k, v = qkv(p, x, kv_heads=kv)
      g = [h * kv // H for h in range(H)]
      return out_proj(p, head_attend(q, k[:, :, g], v[:, :, g]))
    check_against(mod, init(mod, x, ctx), naive, x, ctx)


def test_dgqa_ema_updates_only_when_mutable():
  mod, x, ctx = module("dgqa", num_kv_heads=2), tokens(), context()
  variables = init(mod, x, ctx)
  np.testing.assert_allclose(variables["batch_stats"]["key_norm_ema"], jnp.ones(2))
  y0 = run(mod, variables, x, ctx)[0]  # equal norms: uniform groups = gqa
  np.testing.assert_allclose(y0, run(module("gqa", num_kv_heads=2), variables, x, ctx)[0],
                             atol=1e-6)
  _, new = mod.apply(variables, x, ctx, deterministic=False, mutable=["batch_stats"])
  ema = new["batch_stats"]["key_norm_ema"]
  k = qkv(variables["params"], x, 2)[1]
  norms = jnp.sqrt((k ** 2).sum((1, 3))).mean(0)
  np.testing.assert_allclose(ema, 0.99 + 0.01 * norms, rtol=1e-5)
  y_params_only = mod.apply({"params": variables["params"]}, x, ctx)[0]
  np.testing.assert_allclose(y_params_only, y0, atol=1e-6)


@pytest.mark.parametrize("name", ["kdgqa", "rope2d_axial"])
def test_xla_path_equals_reference(name):
  x, ctx = tokens(), context(key_bias=jnp.log(jnp.arange(1.0, N + 1.0))[None].repeat(B, 0))
  ref, fast = module(name), module(name, impl="xla")
  variables = init(ref, x, ctx)
  need = ("cls_probs", "key_metric")
  (ya, aa), (yb, ab) = run(ref, variables, x, ctx, need), run(fast, variables, x, ctx, need)
  np.testing.assert_allclose(yb, ya, atol=1e-5)
  np.testing.assert_allclose(ab["cls_probs"], aa["cls_probs"], atol=1e-6)  # R1 recompute
  np.testing.assert_allclose(ab["key_metric"], aa["key_metric"], atol=1e-6)


# ----------------------------------------------------------------------------- G14 moh
def moh_gates(p, x, s, k):
  r = H - s
  shared = jnp.ones(x.shape[:2] + (s,))
  if s > 1:
    shared = softmax(dense(p["router_shared"], x)) * s
  probs = softmax(dense(p["router_routed"], x))
  order = jnp.argsort(-probs, axis=-1)
  mask = (jnp.argsort(order, axis=-1) < k).astype(jnp.float32)
  routed = probs * mask / (probs * mask).sum(-1, keepdims=True) * k
  mix = softmax(dense(p["router_mix"], x)) * 2
  return jnp.concatenate([shared * mix[..., :1], routed * mix[..., 1:]], -1), r


@reference("moh")
def test_moh_naive():
  mod, x, ctx = module("moh", num_shared=2, num_active=3), tokens(), context()
  variables = init(mod, x, ctx, perturb=0.3)

  def naive(p, x):
    q, k, v = qkv(p, x)
    gates, _ = moh_gates(p, x, 2, 1)
    return out_proj(p, head_attend(q, k, v) * gates[..., None])
  check_against(mod, variables, naive, x, ctx)
  gates, _ = moh_gates(variables["params"], x, 2, 1)
  assert int((gates > 0).sum(-1).min()) == int((gates > 0).sum(-1).max()) == 3


def test_moh_all_heads_zero_router_is_mhsa_and_balance_loss():
  x, ctx = tokens(), context()
  mod = module("moh", num_shared=1, num_active=H)
  variables = init(mod, x, ctx)
  params = dict(variables["params"])
  for name in ("router_routed", "router_mix"):
    params[name] = jax.tree_util.tree_map(jnp.zeros_like, params[name])
  y = mod.apply({"params": params}, x, ctx)[0]
  np.testing.assert_allclose(y, mhsa_with(params, x, ctx), atol=ATOL)
  _, state = mod.apply({"params": params}, x, ctx, deterministic=False, mutable=["losses"])
  # uniform routing, top-K of R kept: R * sum_h (1/R) * (K/R) = K, its minimum (here K = R = 3)
  np.testing.assert_allclose(state["losses"]["moh_balance"][0], 3.0, rtol=1e-6)


# ----------------------------------------------------------------------------- G15 latte
def latte_naive(p, x, lat=8):
  qt = dense(p["q_latent"], x).reshape(B, -1, H, lat)
  kt = dense(p["k_latent"], x).reshape(B, -1, H, lat)
  v = split_heads(dense(p["v"], x))
  outs = []
  for h in range(H):
    a = softmax(qt[:, :, h], axis=-1)          # p(l|i) [B,N,L]
    c = softmax(kt[:, :, h], axis=1)           # p(j|l) over tokens [B,N,L]
    outs.append((a @ jnp.swapaxes(c, 1, 2)) @ v[:, :, h])
  return out_proj(p, jnp.stack(outs, 2))


@reference("latte")
def test_latte_naive_and_row_stochastic():
  mod, x, ctx = module("latte"), tokens(), context()
  variables = init(mod, x, ctx)
  check_against(mod, variables, latte_naive, x, ctx)
  attn = run(mod, variables, x, ctx, need=("attn",))[1]["attn"]
  np.testing.assert_allclose(attn.sum(-1), 1.0, atol=1e-5)


def test_latte_single_latent_same_output_everywhere():
  mod, x, ctx = module("latte", num_latents=1), tokens(), context()
  y = run(mod, init(mod, x, ctx), x, ctx)[0]
  np.testing.assert_allclose(y, jnp.broadcast_to(y[:, :1], y.shape), atol=1e-5)


# ----------------------------------------------------------------------------- G16 sra
def sra_keys_naive(p, x, r):
  grid = x[:, 1:].reshape(B, GRID[0] // r, r, GRID[1] // r, r, D)
  cells = jnp.einsum("bhpwqc,pqcd->bhwd", grid, p["sr"]["kernel"]) + p["sr"]["bias"]
  red = layer_norm(p["norm"], cells.reshape(B, -1, D), eps=1e-5)
  return jnp.concatenate([x[:, :1], red], axis=1)


@reference("sra", "twins_gsa")
@pytest.mark.parametrize("name", ["sra", "twins_gsa"])
def test_sra_naive_and_recomputed_cls_row(name):
  mod, x, ctx = module(name, sr_ratio=2), tokens(), context()
  variables = init(mod, x, ctx)

  def naive(p, x):
    q = split_heads(dense(p["q"], x))
    k, v = jnp.split(dense(p["kv"], sra_keys_naive(p, x, 2)), 2, axis=-1)
    return out_proj(p, head_attend(q, split_heads(k), split_heads(v)))
  check_against(mod, variables, naive, x, ctx)
  aux = run(mod, variables, x, ctx, need=("cls_probs", "cls_probs_per_head", "key_metric"))[1]
  p = variables["params"]
  q = split_heads(dense(p["q"], x))
  k_full = split_heads(jnp.split(dense(p["kv"], x), 2, axis=-1)[0])
  row = softmax(jnp.einsum("bhd,bmhd->bhm", q[:, 0], k_full) / math.sqrt(DH))
  np.testing.assert_allclose(aux["cls_probs_per_head"], row, atol=1e-6)
  np.testing.assert_allclose(aux["cls_probs"], row.mean(1), atol=1e-6)
  np.testing.assert_allclose(aux["key_metric"], k_full.mean(2), atol=1e-6)


@reference("davit_channel")
def test_davit_channel_naive():
  """DaViT's channel attention by its formula, head by head: A = softmax(K^T V / sqrt(d)) over
  the value channels, y_n = A q_n; with a masked token left out of the K^T V sum."""
  mod, x = module("davit_channel"), tokens()
  valid = jnp.ones((B, N), bool).at[0, 3].set(False)
  ctx = context(valid=valid)
  variables = init(mod, x, ctx)

  def naive(p, x):
    q, k, v = qkv(p, x)
    w = valid.astype(jnp.float32)[:, :, None]
    outs = []
    for h in range(H):
      amap = softmax(jnp.einsum("bni,bnj->bij", k[:, :, h] * w, v[:, :, h]) / math.sqrt(DH))
      outs.append(jnp.einsum("bij,bnj->bni", amap, q[:, :, h]))
    return out_proj(p, jnp.stack(outs, axis=2))
  check_against(mod, variables, naive, x, ctx)
  with pytest.raises(ValueError, match="davit_channel gives none of"):
    run(mod, variables, x, ctx, need=("cls_probs",))


def test_sra_ratio_one_is_plain_attention_and_linear_form_runs():
  mod, x, ctx = module("sra", sr_ratio=1), tokens(), context()
  variables = init(mod, x, ctx)
  assert "sr" not in variables["params"]

  def naive(p, x):
    q = split_heads(dense(p["q"], x))
    k, v = jnp.split(dense(p["kv"], x), 2, axis=-1)
    return out_proj(p, head_attend(q, split_heads(k), split_heads(v)))
  check_against(mod, variables, naive, x, ctx)
  lin = module("sra", linear=True, pool_size=2)
  y = run(lin, init(lin, x, ctx), x, ctx)[0]
  assert y.shape == x.shape and bool(jnp.isfinite(y).all())
  with pytest.raises(ValueError, match="grid"):
    run(mod, variables, x, context(grid=None))


@reference("sra_tokenset")
def test_sra_tokenset_naive():
  mod, x, ctx = module("sra_tokenset"), tokens(), context()
  variables = init(mod, x, ctx)

  def naive(p, x):
    pre, patches = x[:, :1], x[:, 1:]
    w = softmax(layer_norm(p["pool_norm"], patches) @ p["pool"]["kernel"], axis=1)  # [B,n,M]
    pooled = layer_norm(p["norm"], jnp.swapaxes(w, 1, 2) @ patches)
    k, v = jnp.split(dense(p["kv"], jnp.concatenate([pre, pooled], 1)), 2, axis=-1)
    q = split_heads(dense(p["q"], x))
    return out_proj(p, head_attend(q, split_heads(k), split_heads(v)))
  check_against(mod, variables, naive, x, ctx)


# ----------------------------------------------------------------------------- G17 selective
def selective_official(p, x):
  """The official position temperature: logits of query i (1-based) times 1 + e^{-e^beta} log i."""
  q, k, v = qkv(p, x)
  i = np.arange(1, x.shape[1] + 1, dtype=np.float32)
  tau = 1.0 + jnp.exp(-jnp.exp(p["beta"])) * np.log(i)
  return out_proj(p, head_attend(q * tau[None, :, None, None], k, v))


@reference("selective")
def test_selective_official_position_temperature():
  mod, x, ctx = module("selective"), tokens(), context()
  variables = init(mod, x, ctx, perturb=0.0)
  assert float(variables["params"]["beta"]) == 2.0  # the official initialisation
  variables["params"]["beta"] = jnp.asarray(-1.0)   # a strong temperature, so the check has teeth
  check_against(mod, variables, selective_official, x, ctx)
  plain = mhsa_with(variables["params"], x, ctx)
  assert float(jnp.abs(run(mod, variables, x, ctx)[0] - plain).max()) > 1e-2
  # without ctx.pos the position is the sequence index: the same for the plain ViT layout
  np.testing.assert_allclose(run(mod, variables, x, AttnContext())[0],
                             run(mod, variables, x, ctx)[0], atol=1e-6)


def test_selective_tanh_gate_naive_and_unit_temperatures_is_mhsa():
  mod, x, ctx = module("selective", form="tanh_gate"), tokens(), context()
  variables = init(mod, x, ctx, perturb=0.0)
  np.testing.assert_allclose(run(mod, variables, x, ctx)[0],
                             mhsa_with(variables["params"], x, ctx), atol=ATOL)
  variables = init(mod, x, ctx, perturb=0.2)

  def naive(p, x):
    q, k, v = qkv(p, x)
    tq = 1 + jnp.tanh(dense(p["tau_q"], x))
    tv = 1 + jnp.tanh(dense(p["tau_v"], x))
    return out_proj(p, head_attend(q * tq[..., None], k, v * tv[..., None]))
  check_against(mod, variables, naive, x, ctx)


def test_selective_tanh_gate_length_term():
  mod = module("selective", form="tanh_gate", ref_tokens=8)
  x, ctx = tokens(), context(size=jnp.ones((B, N)))
  variables = init(mod, x, ctx, perturb=0.2)

  def naive(p, x):
    q, k, v = qkv(p, x)
    scale = 1 + jax.nn.softplus(p["beta"]) * math.log(N / 8)
    tq = (1 + jnp.tanh(dense(p["tau_q"], x))) * scale
    tv = 1 + jnp.tanh(dense(p["tau_v"], x))
    return out_proj(p, head_attend(q * tq[..., None], k, v * tv[..., None]))
  check_against(mod, variables, naive, x, ctx)


# ----------------------------------------------------------------------------- G18 neural
def neural_naive(p, x, act=jax.nn.relu):
  q, k, v = qkv(p, x)
  qp, kp = dense(p["q_proj"], q), dense(p["k_proj"], k)            # [B,N,H,p]
  n = x.shape[1]
  cat = jnp.concatenate([jnp.broadcast_to(qp[:, :, None], (B, n, n) + qp.shape[2:]),
                         jnp.broadcast_to(kp[:, None, :], (B, n, n) + kp.shape[2:])], -1)
  s = act(cat @ p["score"]["fc1_kernel"] + p["score"]["fc1_bias"])
  s = act(dense(p["score"]["fc2"], s))
  s = dense(p["score"]["fc3"], s)[..., 0].transpose(0, 3, 1, 2)  # [B,H,N,N]
  return out_proj(p, jnp.einsum("bhnm,bmhd->bnhd", softmax(s), v))


@reference("neural")
def test_neural_naive_concat_form():
  mod, x, ctx = module("neural", projection_dim=4), tokens(), context()
  check_against(mod, init(mod, x, ctx), neural_naive, x, ctx)


def test_neural_identity_activation_gives_identical_rows():
  mod, x, ctx = module("neural", activation="identity"), tokens(), context()
  attn = run(mod, init(mod, x, ctx), x, ctx, need=("attn",))[1]["attn"]
  np.testing.assert_allclose(attn, jnp.broadcast_to(attn[:, :, :1], attn.shape), atol=1e-6)


# ----------------------------------------------------------------------------- G19 gaam
def gaam_naive(x, offsets, scales, heads):
  x = np.asarray(x, np.float64)
  out, mixture = np.zeros_like(x), np.zeros_like(x)
  step = x.shape[-1] // heads
  for h in range(heads):
    for c in range(h * step, (h + 1) * step):
      col = x[:, :, c:c + 1]
      mu, var = col.mean(1, keepdims=True), col.var(1, ddof=1, keepdims=True) + 1e-8
      mix = 1.0
      for g in range(offsets.shape[1]):
        y = (col - mu - offsets[h, g]) / np.sqrt(var)
        c2 = scales[h, g] ** 2
        mix = mix * np.exp(-y ** 2 / (2 * c2)) / np.sqrt(2 * np.pi * c2)
      mixture[:, :, c:c + 1] = mix / np.maximum(mix.sum(1, keepdims=True), 1e-8)
  return x * mixture, mixture


@reference("gaam")
def test_gaam_gate_naive_and_mixture_sums_to_one():
  mod, x, ctx = module("gaam"), tokens(), AttnContext()
  variables = init(mod, x, ctx, perturb=0.0)
  p = variables["params"]
  offsets, scales = p["gaam"]["mean_offsets"] + 0.3, jnp.abs(p["gaam"]["c"]) + 1.0
  variables["params"]["gaam"] = {"mean_offsets": offsets, "c": scales}
  out, mix = gaam_naive(x, np.asarray(offsets), np.asarray(scales), H)
  y_ref = mhsa_naive(p, jnp.asarray(np.asarray(x) + out, jnp.float32))
  np.testing.assert_allclose(run(mod, variables, x, ctx)[0], y_ref, atol=1e-4)
  np.testing.assert_allclose(mix.sum(1), 1.0, atol=1e-6)


def test_gaam_mixer_and_token_heads():
  x, ctx = tokens(), AttnContext()
  mixer = module("gaam", mode="mixer")
  variables = init(mixer, x, ctx, perturb=0.0)
  g = variables["params"]["gaam"]
  ref, _ = gaam_naive(x, np.asarray(g["mean_offsets"]), np.asarray(g["c"]), H)
  np.testing.assert_allclose(run(mixer, variables, x, ctx)[0],
                             dense(variables["params"]["proj"], jnp.asarray(ref, jnp.float32)),
                             atol=1e-4)
  tok = module("gaam", head_axis="tokens", mode="mixer")
  y = run(tok, init(tok, x, ctx), x, ctx)[0]
  assert y.shape == x.shape and bool(jnp.isfinite(y).all())
  with pytest.raises(ValueError, match="no reducer signals"):
    run(mixer, variables, x, ctx, need=("cls_probs",))


# ----------------------------------------------------------------------------- G20 levit_bias
def levit_index(pos, grid):
  n = pos.shape[0]
  idx = np.zeros((n, n), np.int64)
  known = ~np.isnan(pos).any(-1)
  for i in range(n):
    for j in range(n):
      if known[i] and known[j]:
        idx[i, j] = abs(pos[i, 0] - pos[j, 0]) * grid[1] + abs(pos[i, 1] - pos[j, 1])
      else:
        idx[i, j] = -1
  return idx


@reference("levit_bias")
def test_levit_bias_naive_zero_table_and_shift():
  mod, x, ctx = module("levit_bias"), tokens(), context()
  variables = init(mod, x, ctx, perturb=0.0)
  np.testing.assert_allclose(run(mod, variables, x, ctx)[0],
                             mhsa_with(variables["params"], x, ctx), atol=ATOL)
  variables = init(mod, x, ctx, perturb=0.5)
  idx = levit_index(np.asarray(ctx.pos[0]), GRID)

  def naive(p, x):
    table = p["attention_biases"]
    bias = jnp.where(idx >= 0, table[:, np.maximum(idx, 0)], 0.0)[None]  # [1,H,N,N]
    return mhsa_naive(p, x, bias)
  check_against(mod, variables, naive, x, ctx)
  shifted = context(pos=ctx.pos + jnp.asarray([2.0, -1.0]))
  np.testing.assert_allclose(run(mod, variables, x, shifted)[0], run(mod, variables, x, ctx)[0],
                             atol=1e-6)


# ----------------------------------------------------------------------------- G21 causal_postcls
def illama_naive(p, x_last, r):
  """Official layout [patches, CLS]: softmax(S) * (r + (1 - r) tril), rows not renormalised."""
  q, k, v = qkv(p, x_last)
  n = x_last.shape[1]
  mask = r + (1 - r) * np.tril(np.ones((n, n)))
  outs = []
  for h in range(H):
    s = q[:, :, h] @ jnp.swapaxes(k[:, :, h], 1, 2) / math.sqrt(DH)
    outs.append((softmax(s) * mask) @ v[:, :, h])
  return out_proj(p, jnp.stack(outs, 2))


@reference("causal_postcls")
def test_causal_postcls_cls_first_equals_official_cls_last():
  mod, x, ctx = module("causal_postcls", r=0.3), tokens(), context()
  variables = init(mod, x, ctx)
  roll = lambda t: jnp.concatenate([t[:, 1:], t[:, :1]], 1)
  unroll = lambda t: jnp.concatenate([t[:, -1:], t[:, :-1]], 1)
  check_against(mod, variables, lambda p, x: unroll(illama_naive(p, roll(x), 0.3)), x, ctx)
  last = context(cls_index=-1)
  np.testing.assert_allclose(run(mod, variables, roll(x), last)[0],
                             illama_naive(variables["params"], roll(x), 0.3), atol=ATOL)


def test_causal_postcls_special_cases():
  x, ctx = tokens(), context()
  full = module("causal_postcls", r=1.0)
  variables = init(full, x, ctx)
  np.testing.assert_allclose(run(full, variables, x, ctx)[0],
                             mhsa_with(variables["params"], x, ctx), atol=ATOL)
  causal = module("causal_postcls", r=None)  # no step: r = 0
  attn = run(causal, variables, x, context(cls_index=-1), need=("attn", "cls_probs"))[1]
  upper = np.triu(np.ones((N, N)), 1).astype(bool)
  assert float(jnp.abs(attn["attn"][:, :, upper]).max()) == 0.0
  probs = run(full, variables, x, context(cls_index=-1), need=("attn",))[1]["attn"]
  np.testing.assert_allclose(attn["attn"][:, :, -1], probs[:, :, -1], atol=1e-6)
  np.testing.assert_allclose(attn["cls_probs"], probs[:, :, -1].mean(1), atol=1e-6)
  pre = module("causal_postcls", causal_impl="pre_softmax_mask", r=0.2)
  rows = run(pre, variables, x, ctx, need=("attn",))[1]["attn"].sum(-1)
  np.testing.assert_allclose(rows, 1.0, atol=1e-5)
  sched = module("causal_postcls", r=None)  # the soft phase: the first 50/300 of training
  y_early = run(sched, variables, x, context(progress=jnp.float32(0.1)))[0]
  np.testing.assert_allclose(y_early, run(full, variables, x, ctx)[0], atol=1e-6)
  y_late = run(sched, variables, x, context(progress=jnp.float32(0.5)))[0]
  np.testing.assert_allclose(y_late, run(sched, variables, x, ctx)[0], atol=1e-6)  # = evaluation


def official_mask_schedule(r0, epochs, iters_per_epoch, cutoff_epoch, schedule):
  """iLLaMA's mask_scheduler in soft mode, written here: the ratio at every training iteration."""
  early = cutoff_epoch * iters_per_epoch
  soft = np.full(early, r0) if schedule == "constant" else np.linspace(r0, 0, early)
  return np.concatenate([soft, np.zeros((epochs - cutoff_epoch) * iters_per_epoch)])


@pytest.mark.parametrize("schedule,cutoff_epoch", [("constant", 50), ("linear", 240)])
def test_causal_postcls_mask_ratio_follows_the_official_schedule(schedule, cutoff_epoch):
  """Start, middle and end of a 300-epoch run. The official linspace reaches 0 on the last soft
  iteration, the progress form one iteration later: they differ by at most one decrement."""
  epochs, per_epoch, r0 = 300, 10, 0.8
  total = epochs * per_epoch
  official = official_mask_schedule(r0, epochs, per_epoch, cutoff_epoch, schedule)
  one_step = r0 / (cutoff_epoch * per_epoch - 1) if schedule == "linear" else 0.0
  for it in (0, total // 2, total - 1):
    ours = mask_ratio(None, jnp.float32(it / total), schedule, cutoff_epoch / epochs, r0)
    np.testing.assert_allclose(float(ours), official[it], atol=one_step + 1e-7)
  assert float(mask_ratio(None, None, schedule, cutoff_epoch / epochs, r0)) == 0.0  # evaluation


# ----------------------------------------------------------------------------- G22 rope
def rotate_complex(t, angles):
  """Adjacent pairs as complex numbers times exp(i angle); t [B,N,H,c], angles [B,N,c/2]."""
  z = (t[..., 0::2] + 1j * t[..., 1::2]) * np.exp(1j * angles)[:, :, None]
  out = np.empty(t.shape)
  out[..., 0::2], out[..., 1::2] = z.real, z.imag
  return out


def rope_angles(name, pos):
  pos = np.asarray(pos, np.float64)
  known = ~np.isnan(pos).any(-1)
  if name == "rope1d":
    p = np.where(known, pos[..., 0] * GRID[1] + pos[..., 1], GRID[0] * GRID[1])
    return None, p[..., None] * 10000.0 ** (-np.arange(0, DH, 2) / DH)
  pos = np.where(known[..., None], pos, 0.0)
  freq = 10000.0 ** (-np.arange(0, DH // 2, 2) / (DH // 2))
  return pos[..., :1] * freq, pos[..., 1:] * freq


def rope_naive_np(name, p, x, pos):
  q, k, v = (np.asarray(t, np.float64) for t in qkv(p, x))
  a, b = rope_angles(name, pos)
  if name == "rope1d":
    q, k = rotate_complex(q, b), rotate_complex(k, b)
  else:
    half = DH // 2
    q = np.concatenate([rotate_complex(q[..., :half], a), rotate_complex(q[..., half:], b)], -1)
    k = np.concatenate([rotate_complex(k[..., :half], a), rotate_complex(k[..., half:], b)], -1)
  y = head_attend(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32), v.astype(np.float32))
  return out_proj(p, y)


@reference("rope1d", "rope2d_axial")
@pytest.mark.parametrize("name", ["rope1d", "rope2d_axial"])
def test_rope_naive_zero_positions_and_shift(name):
  mod, x, ctx = module(name), tokens(), context()
  variables = init(mod, x, ctx)
  y = run(mod, variables, x, ctx)[0]
  np.testing.assert_allclose(y, rope_naive_np(name, variables["params"], x, ctx.pos), atol=ATOL)
  zero = context(pos=jnp.zeros((B, N, 2)))
  np.testing.assert_allclose(run(mod, variables, x, zero)[0],
                             mhsa_with(variables["params"], x, zero), atol=ATOL)
  if name == "rope2d_axial":  # relative: shifting every position leaves the scores unchanged
    placed = context(pos=jnp.nan_to_num(ctx.pos, nan=1.5))  # the CLS placed too, else it stays at 0
    moved = context(pos=placed.pos + 3.0)
    np.testing.assert_allclose(run(mod, variables, x, moved)[0], run(mod, variables, x, placed)[0],
                               atol=1e-4)
  key_metric = run(mod, variables, x, ctx, need=("key_metric",))[1]["key_metric"]
  np.testing.assert_allclose(key_metric, qkv(variables["params"], x)[1].mean(2), atol=1e-6)


def test_rope_gradient_matches_plain_jax_rotation():
  mod, x, ctx = module("rope2d_axial"), tokens(), context()
  variables = init(mod, x, ctx)
  pos = jnp.where(jnp.isnan(ctx.pos), 0.0, ctx.pos)
  freq = 10000.0 ** (-jnp.arange(0, DH // 2, 2) / (DH // 2))

  def rot(t, ang):
    z = jax.lax.complex(t[..., 0::2], t[..., 1::2]) * jnp.exp(1j * ang)[:, :, None]
    return jnp.stack([z.real, z.imag], -1).reshape(t.shape)

  def naive(p, x):
    q, k, v = qkv(p, x)
    half = DH // 2
    a, b = pos[..., :1] * freq, pos[..., 1:] * freq
    q = jnp.concatenate([rot(q[..., :half], a), rot(q[..., half:], b)], -1)
    k = jnp.concatenate([rot(k[..., :half], a), rot(k[..., half:], b)], -1)
    return out_proj(p, head_attend(q, k, v))
  check_against(mod, variables, naive, x, ctx, atol=1e-4)


# ----------------------------------------------------------------------------- G23 routing
@reference("routing")
def test_routing_naive_one_cluster_and_kmeans_update():
  mod, x, ctx = module("routing"), tokens(), context()
  variables = init(mod, x, ctx)
  mu = np.asarray(variables["batch_stats"]["centroids"])  # [H, C, d], C = ceil(sqrt(17)) = 5
  assert mu.shape == (H, 5, DH)
  unit = lambda t: t / np.linalg.norm(t, axis=-1, keepdims=True)
  q, k, _ = (np.asarray(t) for t in qkv(variables["params"], x))
  cq = np.einsum("bnhd,hcd->bnhc", unit(q), mu).argmax(-1)
  ck = np.einsum("bnhd,hcd->bnhc", unit(k), mu).argmax(-1)
  allowed = (cq.transpose(0, 2, 1)[..., :, None] == ck.transpose(0, 2, 1)[..., None, :])
  allowed |= np.eye(N, dtype=bool)
  assert 0 < allowed.mean() < 1
  check_against(mod, variables, lambda p, x: mhsa_naive(p, x, np.where(allowed, 0.0, -np.inf)),
                x, ctx)
  one = module("routing", num_clusters=1)
  v1 = init(one, x, ctx)
  np.testing.assert_allclose(run(one, v1, x, ctx)[0], mhsa_with(v1["params"], x, ctx), atol=ATOL)
  _, new = mod.apply(variables, x, ctx, deterministic=False, mutable=["batch_stats"])
  points = np.concatenate([unit(q), unit(k)], 1)
  assign = np.concatenate([cq, ck], 1)
  expected = mu.copy()
  for h in range(H):
    for c in range(mu.shape[1]):
      sel = points[:, :, h][assign[:, :, h] == c]
      if len(sel):
        expected[h, c] = unit(0.999 * mu[h, c] + 0.001 * sel.mean(0))
  np.testing.assert_allclose(new["batch_stats"]["centroids"], expected, atol=1e-5)


# ----------------------------------------------------------------------------- rules for all
SIZE_NAMES = [n for n in NAMES if attention.get(n).caps.size_semantics]
MASK_NAMES = [n for n in NAMES if attention.get(n).caps.key_bias]
PERM_NAMES = [n for n in NAMES if n not in ("sra", "twins_gsa", "causal_postcls")]


def test_capabilities_are_declared():
  caps = {n: attention.get(n).caps for n in NAMES}
  assert caps["sra"].cls_probs == "recompute" and caps["sra"].needs_grid
  assert caps["twins_gsa"] == caps["sra"]
  assert caps["davit_channel"].cls_probs == "none" and not caps["davit_channel"].full_attn
  assert caps["gaam"].cls_probs == "none" and not caps["gaam"].key_metric
  assert not caps["latte"].key_metric and caps["latte"].full_attn
  assert all(caps[n].needs_pos for n in ("levit_bias", "rope1d", "rope2d_axial"))
  assert caps["causal_postcls"].causal
  assert caps["routing"].cls_probs == "approx"
  assert set(SIZE_NAMES) == set(NAMES) - {"sra", "twins_gsa", "gaam"}


@pytest.mark.parametrize("name", PERM_NAMES)
def test_permutation_equivariance(name):
  mod, x, ctx = module(name), tokens(), context()
  variables = init(mod, x, ctx)
  perm = np.concatenate([[0], 1 + np.random.RandomState(0).permutation(N - 1)])
  y = run(mod, variables, x, ctx)[0]
  y_perm = run(mod, variables, x[:, perm], context(pos=ctx.pos[:, perm], grid=None))[0]
  np.testing.assert_allclose(y_perm, y[:, perm], atol=1e-5)


def duplicate(t, j, s):
  """Inserts s-1 extra copies of token j right after it (axis 1)."""
  return jnp.concatenate([t[:, :j + 1]] + [t[:, j:j + 1]] * (s - 1) + [t[:, j + 1:]], axis=1)


@pytest.mark.parametrize("name", SIZE_NAMES)
def test_size_semantics_duplicate_oracle(name):
  mod, x, j, s = module(name), tokens(), 5, 3
  size = jnp.ones((B, N)).at[:, j].set(s)
  ctx1 = context(key_bias=jnp.log(size), size=size)
  variables = init(mod, x, ctx1)
  y1 = run(mod, variables, x, ctx1)[0]
  xd, posd = duplicate(x, j, s), duplicate(ctx1.pos, j, s)
  ctxd = context(pos=posd, size=jnp.ones((B, N + s - 1)), grid=GRID)
  yd = run(mod, variables, xd, ctxd)[0]
  keep = [i for i in range(N + s - 1) if not j <= i < j + s]
  others = [i for i in range(N) if i != j]
  np.testing.assert_allclose(yd[:, keep], y1[:, others], atol=2e-5)


@pytest.mark.parametrize("name", MASK_NAMES)
def test_key_mask_equals_deleting_the_key(name):
  mod, x, ctx, j = module(name), tokens(), context(), 6
  variables = init(mod, x, ctx)
  valid = jnp.ones((B, N), bool).at[:, j].set(False)
  y_mask = run(mod, variables, x, context(valid=valid))[0]
  keep = [i for i in range(N) if i != j]
  y_del = run(mod, variables, x[:, keep], context(pos=ctx.pos[:, keep]))[0]
  np.testing.assert_allclose(y_mask[:, keep], y_del, atol=2e-5)


AUX_SHAPES = {"cls_probs": (B, N), "cls_probs_per_head": (B, H, N), "key_metric": (B, N, DH),
              "value_norm": (B, H, N), "attn": (B, H, N, N)}


@pytest.mark.parametrize("name", [n for n in NAMES if attention.get(n).caps.cls_probs != "none"])
def test_aux_shapes_and_cls_row(name):
  mod, x, ctx = module(name), tokens(), context()
  variables = init(mod, x, ctx)
  need = attention.get(name).caps.provides()
  aux = run(mod, variables, x, ctx, need=need)[1]
  assert set(aux) == set(need)
  for field in need:
    assert aux[field].shape == AUX_SHAPES[field] and aux[field].dtype == jnp.float32, field
  if "attn" in aux:  # the [CLS] row is the materialised row (R1)
    np.testing.assert_allclose(aux["cls_probs_per_head"], aux["attn"][:, :, 0], atol=1e-6)
  np.testing.assert_allclose(aux["cls_probs"].sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_jit_and_bf16(name):
  x, ctx = tokens(), context()
  mod = module(name)
  variables = init(mod, x, ctx)
  traces = []

  def fwd(v, x):
    traces.append(1)
    return mod.apply(v, x, ctx)[0]
  jitted = jax.jit(fwd)
  y = jitted(variables, x)
  jitted(variables, x + 1.0)
  assert len(traces) == 1
  np.testing.assert_allclose(y, run(mod, variables, x, ctx)[0], atol=1e-5)
  half = attention.build(dict(name=name, **OPTIONS.get(name, {})), num_heads=H,
                         dtype=jnp.bfloat16)
  yb = half.apply(variables, x.astype(jnp.bfloat16), ctx)[0]
  assert yb.dtype == jnp.bfloat16 and bool(jnp.isfinite(yb.astype(jnp.float32)).all())


@pytest.mark.parametrize("name", NAMES)
def test_inside_tiny_vit(name):
  model = models.build(dict(variant="Ti/4", depth=2, attention=dict(name=name)), num_classes=10,
                       image_size=16)
  images = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
  variables = model.init(jax.random.PRNGKey(1), images)
  labels = jnp.asarray([1, 2])

  def loss(p):  # eager: per-primitive compiles are shared across the parametrised cases
    logits, _ = model.apply({**variables, "params": p}, images)
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1).mean()
  value, grads = jax.value_and_grad(loss)(variables["params"])
  assert bool(jnp.isfinite(value))
  assert all(bool(jnp.isfinite(g).all()) for g in jax.tree_util.tree_leaves(grads))
