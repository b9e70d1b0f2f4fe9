"""EViT, Top-K, the keep-rate schedule, analytic MACs and the visualisation (spec T1, T2, §4, §6)."""
import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitjax import attention as attn_lib
from vitjax import models
from vitjax import tokens as tokens_lib
from vitjax.attention.mhsa import MHSA
from vitjax.tokens import macs, schedule, visualize
from vitjax.tokens.base import initial_state
from vitjax.tokens.evit import EViT, evit_counts, reorganize
from vitjax.tokens.mctf import mctf_counts
from vitjax.tokens.tome import merge_counts, parse_r
from vitjax.tokens.topk import TopK, topk_counts
from vitjax.tokens.base import AFTER_ATTENTION, BEFORE_ATTENTION, Layout, normalize_row

def plan_blocks(cls, options, **layout):
  """Per block: the reducer's kwargs or None, on an encoder of the given shape."""
  return list(cls.plan(options, Layout(**layout)).blocks)

B, N, D, P = 2, 17, 64, 1   # CLS + 4x4 patches


def rand(key, shape):
  return jax.random.normal(jax.random.key(key), shape, jnp.float32)


def scores_like(key, n=N - P):
  """Distinct positive scores with sum < 1, like a [CLS] row without its CLS entry."""
  a = jax.random.uniform(jax.random.key(key), (B, n), jnp.float32, 0.1, 1.0)
  return a / (a.sum(-1, keepdims=True) * 1.25)


# jitted once per static configuration: eager dispatch is the slow part of these tests on CPU
reorg = jax.jit(reorganize, static_argnums=(3,), static_argnames=("num_prefix", "fuse", "keep_order"))


def state_of(b=B, grid=(4, 4), source=True):
  return initial_state(b, P, grid, track_source=source, with_pos=True)


# ----- counts (§0.2) -----
COUNTS = {  # kr: (EViT fused, EViT no fusion, cumulative)
    0.9: ((178, 162, 147), (177, 160, 144), (176, 158, 142)),
    0.8: ((158, 128, 104), (157, 126, 101), (156, 125, 100)),
    0.7: ((139, 99, 71), (138, 97, 68), (137, 96, 67)),
    0.6: ((119, 73, 45), (118, 71, 43), (117, 70, 42)),
    0.5: ((99, 51, 27), (98, 49, 25), (98, 49, 24)),
}


@pytest.mark.parametrize("kr", sorted(COUNTS))
def test_count_tables(kr):
  fused, plain, cumulative = COUNTS[kr]
  assert tuple(evit_counts(kr)) == fused
  assert tuple(evit_counts(kr, fuse=False)) == plain
  assert tuple(topk_counts(kr)) == cumulative
  plan = plan_blocks(EViT, dict(keep_rate=kr), depth=12, num_patches=196, num_prefix=1)
  assert [i for i, kw in enumerate(plan) if kw] == [3, 6, 9]
  assert tuple(plan[i]["keep"] + 1 for i in (3, 6, 9)) == fused
  plan = plan_blocks(TopK, dict(keep_rate=kr), depth=12, num_patches=196, num_prefix=1)
  assert tuple(plan[i]["keep"] for i in (3, 6, 9)) == cumulative
  assert topk_counts(0.25) == [49, 12, 3]


def test_keep_rate_one_plans_nothing():
  assert plan_blocks(EViT, dict(keep_rate=1.0), depth=12, num_patches=196, num_prefix=1) == [None] * 12


# ----- MACs (§0.2) -----
def deit_s_macs(reductions, one_step_ahead=False, ahead="recompute"):
  hook = BEFORE_ATTENTION if one_step_ahead else AFTER_ATTENTION
  counts = macs.counts_from_stages(197, 12, reductions, hook, one_step_ahead)
  return macs.vit_macs(counts, width=384, mlp_dim=1536, num_patches=196, patch_size=16,
                       ahead=ahead) / 1e9


def test_macs_deit_s():
  assert round(deit_s_macs({}), 2) == 4.60
  for kr, want in zip((0.9, 0.8, 0.7, 0.6, 0.5), (4.02, 3.48, 3.03, 2.63, 2.31)):
    c = evit_counts(kr)
    assert round(deit_s_macs({3: c[0] + 1, 6: c[1] + 1, 9: c[2] + 1}), 2) == want
  for r, (left, want) in {8: (101, 3.42), 13: (41, 2.70), 16: (11, 2.29)}.items():
    rs = merge_counts(parse_r(12, r), 197, 1)
    after = list(197 - np.cumsum(rs))
    assert after[-1] == left
    assert round(deit_s_macs(dict(enumerate(after))), 2) == want
  rs = mctf_counts(16, range(1, 12), 12, 197, 1)
  after = {i: int(197 - sum(rs[:i + 1])) for i in range(1, 12)}
  assert after[11] == 21
  assert round(deit_s_macs(after, True, "reference"), 2) == 2.58


def test_block_counts_of_a_built_model():
  """The per-block counts read from a built (narrow, DeiT-S-shaped) model match the table."""
  model = models.build(dict(variant="S/16", width=64, num_heads=4, mlp_dim=256,
                            tokens=dict(name="evit", keep_rate=0.7)),
                       num_classes=10, image_size=224)
  counts = macs.block_counts(model)
  assert [c.n_attn for c in counts] == [197] * 4 + [140] * 3 + [100] * 3 + [72] * 2
  assert [c.n_mlp for c in counts][3::3] == [140, 100, 72]
  deit = dataclasses.replace(model, width=384, num_heads=6, mlp_dim=1536)
  assert round(macs.vit_macs(counts, width=384, mlp_dim=1536, num_patches=196,
                             patch_size=16) / 1e9, 2) == 3.03
  assert deit.stage().plan().blocks[3]["keep"] == 138


# ----- the reducer itself -----
def test_kept_set_and_order_match_numpy():
  x, a = rand(0, (B, N, D)), scores_like(1)
  out, st = reorg(x, state_of(), a, 7, num_prefix=P, fuse=True)
  order = np.argsort(-np.asarray(a), axis=1, kind="stable")[:, :7]
  np.testing.assert_array_equal(np.asarray(out[:, 0]), np.asarray(x[:, 0]))
  for b in range(B):
    np.testing.assert_array_equal(np.asarray(out[b, 1:8]), np.asarray(x[b, 1 + order[b]]))
    np.testing.assert_array_equal(np.asarray(st.size[b, 1:8]), np.ones(7))
  out, _ = reorg(x, state_of(), a, 7, num_prefix=P, fuse=False, keep_order=True)
  for b in range(B):
    np.testing.assert_array_equal(np.asarray(out[b, 1:]), np.asarray(x[b, 1 + np.sort(order[b])]))


def test_fused_token_is_the_raw_weighted_sum():
  x, a = rand(2, (B, N, D)), scores_like(3)
  out, st = reorg(x, state_of(), a, 5, num_prefix=P, fuse=True)
  xn, an = np.asarray(x, np.float64), np.asarray(a, np.float64)
  for b in range(B):
    drop = np.argsort(-an[b])[5:]
    want = (an[b, drop, None] * xn[b, 1 + drop]).sum(0)
    np.testing.assert_allclose(np.asarray(out[b, -1]), want, atol=1e-6)
    assert float(st.size[b, -1]) == len(drop)
    np.testing.assert_array_equal(np.asarray(st.source[b, -1, 1 + drop]), np.ones(len(drop)))
    pos = np.asarray(state_of().pos[b, 1 + drop], np.float64)
    np.testing.assert_allclose(np.asarray(st.pos[b, -1]), an[b, drop] @ pos / an[b, drop].sum(),
                               rtol=1e-5)
  assert out.shape == (B, P + 5 + 1, D)
  np.testing.assert_allclose(np.asarray(st.size.sum(1)), N)  # sizes cover every token


def test_fused_token_gradient_wrt_scores():
  x, a = rand(4, (B, N, D)), scores_like(5)
  jac = jax.jacobian(lambda s: reorg(x, state_of(), s, 6, num_prefix=P, fuse=True)[0][0, -1])(a)
  kept = np.argsort(-np.asarray(a[0]))[:6]
  want = np.asarray(x[0, 1:]).T.copy()  # d x_f[d] / d a_j = x_j[d]
  want[:, kept] = 0.0
  np.testing.assert_allclose(np.asarray(jac[:, 0]), want, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(jac[:, 1]), 0.0)  # other images


def test_no_gradient_through_indices():
  x, a = rand(6, (B, N, D)), scores_like(7)
  g = jax.grad(lambda s: reorg(x, state_of(), s, 6, num_prefix=P, fuse=False)[0].sum())(a)
  np.testing.assert_array_equal(np.asarray(g), 0.0)


def test_identity_keeps_every_token():
  x, st = rand(13, (B, N, D)), state_of()
  assert plan_blocks(tokens_lib.get("none").cls, {}, depth=4, num_patches=16, num_prefix=1) == [
      None] * 4
  y, out = tokens_lib.get("none").cls().apply({}, x, st, {})
  np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
  chex.assert_trees_all_equal(out, st)


def test_topk_matches_numpy():
  """Top-K keeps the k best [CLS] scores in descending order (Haurum models/topk.py)."""
  x, st, a = rand(14, (B, N, D)), state_of(), scores_like(15)
  aux = {"cls_probs": jnp.concatenate([jnp.full((B, 1), 0.2), a], 1)}
  y, out = TopK(keep=6).apply({}, x, st, aux)
  order = np.argsort(-np.asarray(a), axis=1, kind="stable")[:, :6]
  for b in range(B):
    np.testing.assert_array_equal(np.asarray(y[b]), np.asarray(x[b, np.r_[0, 1 + order[b]]]))
    np.testing.assert_array_equal(np.asarray(out.index[b]), np.r_[0, 1 + order[b]])


def test_topk_equals_evit_without_fusion():
  x, st = rand(8, (B, N, D)), state_of()
  aux = {"cls_probs": jnp.concatenate([jnp.full((B, 1), 0.2), scores_like(9)], 1)}
  y1, s1 = TopK(keep=9).apply({}, x, st, aux)
  y2, s2 = EViT(keep=9, fuse=False).apply({}, x, st, aux)
  np.testing.assert_array_equal(np.asarray(y1), np.asarray(y2))
  np.testing.assert_array_equal(np.asarray(s1.source), np.asarray(s2.source))


def test_scores_sum_and_attention_gradient():
  """sum_j a_j = 1 - mean_h P_h[cls, cls]; fusion sends gradients into the attention weights."""
  h = rand(10, (B, N, D))
  mhsa = MHSA(num_heads=4)
  params = mhsa.init(jax.random.key(0), h)
  _, aux = jax.jit(lambda p: mhsa.apply(p, h, need=("cls_probs", "attn")))(params)
  cls_cls = aux["attn"][:, :, 0, 0].mean(1)
  np.testing.assert_allclose(np.asarray(aux["cls_probs"][:, 1:].sum(1)),
                             np.asarray(1 - cls_cls), atol=1e-6)
  x = rand(11, (B, N, D))  # tokens independent of the attention: the only path is a_j

  def loss(p):
    _, aux = mhsa.apply(p, h, need=("cls_probs",))
    y, _ = EViT(keep=8).apply({}, x, state_of(), aux)
    return y[:, -1].sum()
  g = jax.jit(jax.grad(loss))(params)
  assert float(jnp.abs(g["params"]["qkv"]["kernel"]).sum()) > 0


def test_score_norm_rows():
  row = jnp.array([[0.5, -1.0, 2.0, 0.5]])
  np.testing.assert_allclose(np.asarray(normalize_row(row, "row")), [[0.25, -0.5, 1.0, 0.25]])
  np.testing.assert_allclose(np.asarray(normalize_row(row, "abs_row")), [[0.125, 0.25, 0.5, 0.125]])
  model = models.build(dict(variant="Ti/4", depth=4, tokens=dict(name="evit", keep_rate=0.5,
                                                                 locations=(1, 2))),
                       num_classes=10, image_size=16)
  assert model.stage().plan().blocks[1]["score_norm"] == "none"  # read from mhsa's capabilities


def test_one_trace_per_shape():
  x, st = rand(12, (B, N, D)), state_of()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def run(x, a):
    return reorganize(x, st, a, 6, num_prefix=P, fuse=True)[0]
  for seed in range(3):
    run(x * seed, scores_like(seed))


# ----- inside a ViT -----
def tiny(tokens, **kw):
  return models.build(dict(variant="Ti/4", depth=4, tokens=tokens, **kw), num_classes=10,
                      image_size=16)


IMAGES = jax.random.normal(jax.random.key(3), (B, 16, 16, 3))


def forward_and_grad(model, variables):
  def loss(p):
    logits, out = model.apply({"params": p}, IMAGES)
    return logits.sum() + out["block_3"].sum(), (logits, out)
  return jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])


def test_evit_in_a_tiny_vit_and_r1_recompute():
  """Forward + grad finite; impl='xla' (CLS-row recompute) == impl='reference' (R1)."""
  spec = dict(name="evit", keep_rate=0.5, locations=(1, 2))
  ref = tiny(spec, attention=dict(name="mhsa", impl="reference"))
  variables = ref.init(jax.random.key(0), IMAGES)
  (_, (logits, out)), grads = forward_and_grad(ref, variables)
  assert [out[f"block_{i}"].shape[1] for i in range(4)] == [17, 1 + 8 + 1, 1 + 5 + 1, 7]
  assert np.isfinite(np.asarray(logits)).all()
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree_util.tree_leaves(grads))
  assert float(out["token_state"].size.sum(1)[0]) == 17
  xla = tiny(spec, attention=dict(name="mhsa", impl="xla"))
  (_, (logits2, out2)), grads2 = forward_and_grad(xla, variables)
  np.testing.assert_allclose(np.asarray(logits2), np.asarray(logits), atol=1e-5)
  np.testing.assert_allclose(np.asarray(out2["block_3"]), np.asarray(out["block_3"]), atol=1e-5)
  for g1, g2 in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads2)):
    scale = float(jnp.abs(g1).max()) + 1e-6  # fp32 sums of large terms: compare relative to scale
    np.testing.assert_allclose(np.asarray(g2) / scale, np.asarray(g1) / scale, atol=1e-5)


def test_keep_rate_one_is_the_identity_model():
  plain = tiny(None)
  variables = plain.init(jax.random.key(1), IMAGES)
  same = tiny(dict(name="evit", keep_rate=1.0, locations=(1, 2)))
  np.testing.assert_array_equal(np.asarray(same.apply(variables, IMAGES)[0]),
                                np.asarray(plain.apply(variables, IMAGES)[0]))


@pytest.fixture
def limited_attentions(monkeypatch):
  """Two mechanisms that cannot give what ToMe / EViT read, registered for one test only."""
  monkeypatch.setattr(attn_lib.registry, "_REGISTRY", dict(attn_lib.registry._REGISTRY))
  attn_lib.registry.register("test_no_keys", caps=attn_lib.Capabilities(key_metric=False))(
      type("NoKeys", (MHSA,), {}))
  attn_lib.registry.register("test_no_cls", caps=attn_lib.Capabilities(cls_probs="none"))(
      type("NoCls", (MHSA,), {}))


def test_incompatible_choices_fail_at_build(limited_attentions):  # pylint: disable=unused-argument
  with pytest.raises(ValueError, match="key_metric"):
    tiny(dict(name="tome", r=2), attention="test_no_keys")
  tiny(dict(name="tome", r=2), attention="mhsa")
  with pytest.raises(ValueError, match="cls_probs"):
    tiny(dict(name="evit", keep_rate=0.5, locations=(1, 2)), attention="test_no_cls")
  with pytest.raises(ValueError, match="CLS"):
    tiny(dict(name="evit", keep_rate=0.5, locations=(1, 2)), class_token=False, pool="gap")
  with pytest.raises(ValueError, match="keep_rate"):
    tiny(dict(name="evit", keep_rate=1.5, locations=(1, 2)))
  with pytest.raises(ValueError, match="valid options"):
    tiny(dict(name="evit", keep_rate=0.5, drop_loc=(1, 2)))
  with pytest.raises(ValueError, match="blocks are"):
    tiny(dict(name="evit", keep_rate=0.5))  # default locations 3, 6, 9 in a 4-block model


# ----- schedule (§4) -----
def test_keep_rate_schedule():
  kw = dict(steps_per_epoch=10, target=0.7, start_epoch=10, ramp_epochs=100)
  assert schedule.keep_rate_at(0, **kw) == 1.0
  assert schedule.keep_rate_at(99, **kw) == 1.0
  assert schedule.keep_rate_at(100, **kw) == pytest.approx(1.0)
  assert schedule.keep_rate_at(100 + 500, **kw) == pytest.approx(0.85)
  assert schedule.keep_rate_at(1100, **kw) == 0.7
  assert schedule.quantize(0.7013, 0.02) == 0.7
  assert schedule.quantize(0.7399, 0.05, target=0.75) == 0.75
  assert schedule.quantize(0.75, 0.05) == 0.75 and math.ceil(0.75 * 196) == 147


def test_quantized_schedule_bucket_counts():
  kw = dict(steps_per_epoch=625, start_epoch=10, ramp_epochs=100)
  assert schedule.count_buckets(target=0.7, grid=0.02, **kw) == 16
  assert schedule.count_buckets(target=0.7, grid=0.05, **kw) == 7
  assert schedule.count_buckets(target=0.9, grid=0.02, **kw) == 6
  assert schedule.count_buckets(target=0.5, grid=0.02, **kw) == 26
  assert schedule.count_buckets(target=0.7, grid=None, **kw) == 146  # spec recount, fused
  assert schedule.choose_grid(target=0.5, **kw) == 0.05
  rates = schedule.keep_rates(target=0.7, grid=0.02, **kw)
  assert len(rates) == 16 and rates[0] == 1.0 and rates[-1] == 0.7


# ----- visualisation -----
def test_visualize_evit_stages(tmp_path):
  model = tiny(dict(name="evit", keep_rate=0.5, locations=(1, 2)), track_source=True)
  variables = model.init(jax.random.key(0), IMAGES)
  _, out = model.apply(variables, IMAGES)
  stages = visualize.stage_sources(out, 0)
  assert [b for b, _ in stages] == [1, 2]
  status, _ = visualize.patch_status(stages[0][1], 1, fused_index=-1)
  assert (status == visualize.KEPT).sum() == 8 and (status == visualize.FUSED).sum() == 8
  status, holder = visualize.patch_status(stages[1][1], 1, fused_index=-1)
  # 5 kept tokens (one may be the earlier fused token, shown as merged) + the new fused token
  assert len(set(holder.tolist())) == 6 and (status == visualize.PRUNED).sum() == 0
  image = np.asarray(jax.random.uniform(jax.random.key(1), (16, 16, 3)))
  path = visualize.plot_stages(image, stages, 4, str(tmp_path / "evit.png"), fused_index=-1)
  assert (tmp_path / "evit.png").stat().st_size > 0 and path.endswith(".png")


# reducer -> its test against a reference written here; tests/test_tokens_registry.py fails
# for a registered reducer that no test file lists
REFERENCE_CASES = {
    "evit": test_kept_set_and_order_match_numpy,
    "topk": test_topk_matches_numpy,
    "none": test_identity_keeps_every_token,
}
