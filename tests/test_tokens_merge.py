"""ToMe, MCTF and ATS (spec T3, T13, T5): matching and merging against naive NumPy references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitjax import models
from vitjax.tokens import macs
from vitjax.tokens.ats import ATS, sample
from vitjax.tokens.base import initial_state
from vitjax.tokens.mctf import MCTF, mctf_counts
from vitjax.tokens.tome import ToMe, merge_counts, parse_r
from vitjax.tokens.base import BEFORE_ATTENTION, Layout

def plan_blocks(cls, options, **layout):
  """Per block: the reducer's kwargs or None, on an encoder of the given shape."""
  return list(cls.plan(options, Layout(**layout)).blocks)

B, N, D, H = 2, 17, 64, 4


def rand(key, shape):
  return jax.random.normal(jax.random.key(key), shape, jnp.float32)


def state_of(num_prefix=1, grid=(4, 4)):
  return initial_state(B, num_prefix, grid, track_source=True, with_pos=True)


def grow(state, key):
  """A state whose tokens already stand for several patches (sizes 1..3)."""
  size = jax.random.randint(jax.random.key(key), state.size.shape, 1, 4).astype(jnp.float32)
  return state.replace(size=size)


def apply(module, x, state, aux):
  return jax.jit(lambda x, s, a: module.apply({}, x, s, a))(x, state, aux)


# ----- ToMe -----
def tome_groups(metric, r, num_prefix):
  """Naive bipartite soft matching: output token -> list of input indices (prefix first)."""
  m = metric / np.linalg.norm(metric, axis=-1, keepdims=True)
  a_ids, b_ids = list(range(0, len(m), 2)), list(range(1, len(m), 2))
  scores = m[a_ids] @ m[b_ids].T
  for i, t in enumerate(a_ids):
    if t < num_prefix:
      scores[i, :] = -np.inf
  for j, t in enumerate(b_ids):
    if t < num_prefix:
      scores[:, j] = -np.inf
  best = scores.max(1)
  order = sorted(range(len(a_ids)), key=lambda i: (-best[i], i))
  # official merge.py: the unmerged A tokens are sorted only with a class token
  src, unm = order[:r], (sorted(order[r:]) if num_prefix else order[r:])
  b_groups = {j: [b_ids[j]] for j in range(len(b_ids))}
  for i in src:
    b_groups[int(scores[i].argmax())].append(a_ids[i])
  groups = [[a_ids[i]] for i in unm] + [b_groups[j] for j in range(len(b_ids))]
  prefix = [g for g in groups if g[0] < num_prefix]
  return sorted(prefix, key=lambda g: g[0]) + [g for g in groups if g[0] >= num_prefix]


def check_groups(y, out, groups, x, st, b):
  """Output tokens and state of image b against the reference groups (lists of input indices)."""
  xn, sn = np.asarray(x[b], np.float64), np.asarray(st.size[b], np.float64)
  for k, g in enumerate(groups):
    want = (sn[g, None] * xn[g]).sum(0) / sn[g].sum()
    np.testing.assert_allclose(np.asarray(y[b, k]), want, atol=1e-5)
    assert float(out.size[b, k]) == sn[g].sum()
    np.testing.assert_array_equal(np.flatnonzero(np.asarray(out.source[b, k])), sorted(g))
    pos = np.asarray(st.pos[b, g], np.float64)  # NaN for a prefix token, which stays alone
    np.testing.assert_allclose(np.asarray(out.pos[b, k]), sn[g] @ pos / sn[g].sum(), atol=1e-5)
  index = [g[0] if len(g) == 1 else -1 for g in groups]  # a merged token is a new one
  np.testing.assert_array_equal(np.asarray(out.index[b]), index)


@pytest.mark.parametrize("num_prefix", [0, 1, 2])
def test_tome_matches_numpy_and_conserves(num_prefix):
  n = N + num_prefix - 1
  x, metric = rand(0, (B, n, D)), rand(1, (B, n, 16))
  st = grow(initial_state(B, num_prefix, (4, 4), track_source=True, with_pos=True), 2)
  y, out = apply(ToMe(r=5, num_prefix=num_prefix), x, st, {"key_metric": metric})
  assert y.shape == (B, n - 5, D)
  firsts = []
  for b in range(B):
    groups = tome_groups(np.asarray(metric[b], np.float64), 5, num_prefix)
    check_groups(y, out, groups, x, st, b)
    firsts.append([g[0] for g in groups])
  if num_prefix == 0:  # the official order: not sorted back into token order
    assert any(f != sorted(f) for f in firsts)
  np.testing.assert_array_equal(np.asarray(y[:, :num_prefix]), np.asarray(x[:, :num_prefix]))
  np.testing.assert_allclose(np.asarray((out.size[..., None] * y).sum(1)),
                             np.asarray((st.size[..., None] * x).sum(1)), rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(np.asarray(out.size.sum(1)), np.asarray(st.size.sum(1)))


def test_tome_identical_tokens_and_metric_x():
  x = jnp.broadcast_to(rand(3, (B, 1, D)), (B, N, D))
  y, _ = apply(ToMe(r=4, metric="x"), x, state_of(), {})
  np.testing.assert_allclose(np.asarray(y), np.asarray(x[:, :N - 4]), atol=1e-6)


def test_tome_schedules_and_counts():
  assert parse_r(12, 8) == [8] * 12
  assert parse_r(4, [3, 2]) == [3, 2, 0, 0]
  dec = parse_r(12, 8, inflect=-1)
  assert dec[0] == 16 and dec[-1] == 0
  for r, left in {8: 101, 13: 41, 16: 11}.items():
    assert 197 - sum(merge_counts(parse_r(12, r), 197, 1)) == left
  plan = plan_blocks(ToMe, dict(r=100), depth=3, num_patches=16, num_prefix=1)
  assert [kw["r"] for kw in plan] == [8, 4, 2]  # clipped to half the non-prefix tokens
  plan = plan_blocks(ToMe, dict(keep_rate=0.25), depth=12, num_patches=196, num_prefix=1)
  assert [plan[i]["r"] for i in (3, 6, 9)] == [98, 37, 9]  # Haurum variant: capped at stage 1
  assert plan_blocks(ToMe, dict(r=0), depth=4, num_patches=16, num_prefix=1) == [None] * 4


# ----- MCTF -----
def mctf_reference(x, attn, size, r, tau=(1.0, 20.0, 40.0), pooling="attn"):
  """Naive one-image MCTF (bidirectional) from the method card: output groups and tokens."""
  m = x / np.linalg.norm(x, axis=-1, keepdims=True)
  a_ids, b_ids = list(range(0, len(x), 2)), list(range(1, len(x), 2))
  scores = ((m[a_ids] @ m[b_ids].T + 1) / 2) ** (1 / tau[0])
  info = 1 / attn.mean((0, 1))
  info = info / info.max()
  sz = (1 / size) / (1 / size).max()
  scores = scores * np.outer(info[a_ids], info[b_ids]) ** (1 / tau[1])
  scores = scores * np.outer(sz[a_ids], sz[b_ids]) ** (1 / tau[2])
  scores[0, :] = -np.inf
  r1, r2 = r // 2, r - r // 2
  best = scores.max(1)
  order = sorted(range(len(a_ids)), key=lambda i: (-best[i], i))
  src, unm = order[:r1], sorted(order[r1:])
  b_groups = [[b_ids[j]] for j in range(len(b_ids))]
  for i in src:
    b_groups[int(scores[i].argmax())].append(a_ids[i])
  back = scores[unm].T                                  # B rows over unmerged A
  best2 = back.max(1)
  order2 = sorted(range(len(b_ids)), key=lambda j: (-best2[j], j))
  a_groups = [[a_ids[i]] for i in unm]
  for j in order2[:r2]:
    a_groups[int(back[j].argmax())] += b_groups[j]
  groups = a_groups + [b_groups[j] for j in order2[r2:]]
  w = attn.mean((0, 1)) * size / size.max() if pooling == "attn" else size
  tokens = [(w[g, None] * x[g]).sum(0) / w[g].sum() for g in groups]
  return groups, np.stack(tokens)


def test_mctf_matches_naive_reference():
  x = rand(4, (B, N, D))
  attn = jax.nn.softmax(rand(5, (B, H, N, N)), -1)
  st = grow(state_of(), 6)
  y, out = apply(MCTF(r=5), x, st, {"attn": attn})
  assert y.shape == (B, N - 5, D)
  for b in range(B):
    groups, want = mctf_reference(np.asarray(x[b], np.float64), np.asarray(attn[b], np.float64),
                                  np.asarray(st.size[b], np.float64), 5)
    np.testing.assert_allclose(np.asarray(y[b]), want, atol=1e-5)
    for k, g in enumerate(groups):
      np.testing.assert_array_equal(np.flatnonzero(np.asarray(out.source[b, k])), sorted(g))
    np.testing.assert_array_equal(np.asarray(out.index[b]),
                                  [g[0] if len(g) == 1 else -1 for g in groups])
  np.testing.assert_allclose(np.asarray(out.size.sum(1)), np.asarray(st.size.sum(1)))
  np.testing.assert_array_equal(np.asarray(y[:, 0]), np.asarray(x[:, 0]))


def test_mctf_neutral_equals_tome_on_x():
  x, st = rand(7, (B, N, D)), grow(state_of(), 8)
  neutral = MCTF(r=6, tau_sim=1.0, tau_info=0.0, tau_size=0.0, bidirection=False, pooling="size")
  y1, s1 = apply(neutral, x, st, {"attn": jnp.ones((B, H, N, N)) / N})
  y2, s2 = apply(ToMe(r=6, metric="x"), x, st, {})
  np.testing.assert_allclose(np.asarray(y1), np.asarray(y2), atol=1e-6)
  np.testing.assert_array_equal(np.asarray(s1.size), np.asarray(s2.size))
  np.testing.assert_array_equal(np.asarray(s1.source), np.asarray(s2.source))


def test_mctf_counts_and_macs():
  rs = mctf_counts(16, range(1, 12), 12, 197, 1)
  assert rs[0] == 0 and list(197 - np.cumsum(rs))[1:] == list(range(181, 20, -16))
  assert mctf_counts(16, [1, 2], 3, 17, 1)[1:] == [7, 0]  # t - r < 10: r = t - 10
  counts = macs.counts_from_stages(197, 12, {i: 197 - sum(rs[:i + 1]) for i in range(1, 12)},
                                   BEFORE_ATTENTION, ahead=True)
  gmacs = macs.vit_macs(counts, width=192, mlp_dim=768, num_patches=196, patch_size=16,
                        ahead="reference") / 1e9
  assert round(gmacs, 2) == 0.70  # DeiT-T, README 0.71


# ----- ATS -----
def ats_aux(score):
  """aux whose significance is `score` [B, n] (one head, unit value norms)."""
  row = jnp.concatenate([jnp.zeros((B, 1)), score], 1)[:, None]
  return {"cls_probs_per_head": row, "value_norm": jnp.ones_like(row)}


def test_ats_sampling_oracles():
  """The benchmark form (form="haurum"): K midpoints of the CDF, each in its token's bin."""
  picked = sample(jnp.full((B, 16), 1 / 16), 4)
  np.testing.assert_array_equal(np.flatnonzero(np.asarray(picked[0])), [1, 5, 9, 13])
  onehot = jnp.zeros((B, 16)).at[:, 6].set(1.0)
  ats = ATS(samples=5, form="haurum")
  y, st = apply(ats, rand(9, (B, N, D)), state_of(), ats_aux(onehot))
  assert y.shape == (B, 1 + 5, D)
  np.testing.assert_array_equal(np.asarray(st.valid), [[True, True] + [False] * 4] * B)
  np.testing.assert_array_equal(np.asarray(st.source[:, 1, 1 + 6]), [1, 1])
  rnd = jax.random.dirichlet(jax.random.key(10), jnp.ones(16), (B,))
  y, st = apply(ATS(samples=8, form="haurum"), rand(11, (B, N, D)), state_of(), ats_aux(rnd))
  assert y.shape == (B, 9, D) and bool(st.valid[:, 0].all())
  assert int(st.valid.sum(1).max()) <= 9


def official_ats(attn, v, n_tokens, n_ref_tokens):
  """The official ATS sampling of one image, op for op (adaptivetokensampling/ATS,
  ats_block.py): attn [H, N, N] and v [H, N, dh] with v = 0 for invalid tokens (policy 0), the
  [CLS] at 0 -> (picked token of each of the n_tokens - 1 slots, -1 for an empty slot)."""
  h, n = attn.shape[:2]
  if n_tokens > n:  # forward(): the clamps of the sample count
    n_tokens = n
  if n_tokens < 8:
    n_tokens = 8
  n_tokens = min(round(n_tokens), n)
  v_norm = np.linalg.norm(v.transpose(1, 0, 2).reshape(n, -1), axis=1)   # score_assignment_step
  score = (attn[:, 0].sum(0) * v_norm)[1:]
  score = score / score.sum()
  sorted_idx = np.argsort(score, kind="stable")
  cdf = np.cumsum(score[sorted_idx])
  cdf = (cdf - cdf.min()) / (cdf.max() - cdf.min())
  q = n_ref_tokens - 1                                                     # create_ys
  ys_start = (cdf + (cdf == 0) * 1e8).min()
  ys = ys_start + (np.linspace(0, 1, q) * (q - 1) - ys_start * np.arange(q)) / (q - 1)
  diff = q - (n - 1)
  padded = np.concatenate([np.zeros(diff), cdf])
  picks = np.abs(ys[:, None] - padded[None]).argmin(1) - diff
  picks = np.sort(picks)                                                   # get_unique_indices
  shift_left = np.concatenate([picks[1:], [1]])
  unique = np.sort(np.where(shift_left - picks == 0, n - 1, picks))[:n - 1][:n_tokens - 1]
  return np.where(unique == n - 1, -1, sorted_idx[np.minimum(unique, n - 2)])


def ats_inputs(seed, grid=(6, 6), heads=4, invalid=0):
  """Random attention and values (and a policy with `invalid` dropped patches) of B images."""
  n = 1 + grid[0] * grid[1]
  logits = 3.0 * rand(seed, (B, heads, n, n))
  valid = jnp.ones((B, n), bool).at[:, n - invalid:].set(False) if invalid else None
  if valid is not None:
    logits = jnp.where(valid[:, None, None, :], logits, -jnp.inf)
  attn = jax.nn.softmax(logits, axis=-1)
  v = rand(seed + 1, (B, heads, n, 8))
  if valid is not None:
    v = v * valid[:, None, :, None]
  aux = {"cls_probs_per_head": attn[:, :, 0], "value_norm": jnp.linalg.norm(v, axis=-1)}
  return attn, v, valid, aux


@pytest.mark.parametrize("samples, invalid", [(36, 0), (12, 0), (36, 9), (3, 0)])
def test_ats_official_matches_the_official_code(samples, invalid):
  """Default form: N0 CDF values from the smallest non-zero one to 1 over the ascending scores,
  (sum_h A_h) * ||v|| over all channels, a cap of K slots (at least 7), picks in ascending
  significance; invalid slots (a later stage) score 0, as the official zeroed values."""
  grid = (6, 6)
  attn, v, valid, aux = ats_inputs(samples + invalid, grid, invalid=invalid)
  n0 = grid[0] * grid[1]
  st = initial_state(B, 1, grid, track_source=True)
  st = st if valid is None else st.replace(valid=valid)
  kwargs = next(k for k in ATS.plan(dict(samples=(samples,), locations=(1,)), Layout(
      depth=2, num_patches=n0, num_prefix=1)).blocks if k)
  assert kwargs["form"] == "official" and kwargs["quantiles"] == n0
  assert kwargs["samples"] == max(samples, 7)
  x = rand(samples, (B, 1 + n0, D))
  y, out = apply(ATS(**kwargs), x, st, aux)
  for b in range(B):
    want = official_ats(np.asarray(attn[b], np.float64), np.asarray(v[b], np.float64),
                        kwargs["samples"] + 1, 1 + n0)
    got = np.where(np.asarray(out.valid[b, 1:]), np.asarray(out.index[b, 1:]) - 1, -1)
    np.testing.assert_array_equal(got, want)
    kept = np.flatnonzero(want >= 0)
    np.testing.assert_array_equal(np.asarray(y[b, 1 + kept]), np.asarray(x[b, 1 + want[kept]]))


def test_ats_official_defaults():
  plan = ATS.plan({}, Layout(depth=12, num_patches=196, num_prefix=1)).blocks
  assert [i for i, kw in enumerate(plan) if kw] == list(range(3, 12))   # ATS_BLOCKS 3..11
  assert {(kw["samples"], kw["quantiles"], kw["form"]) for kw in plan if kw} == {
      (196, 196, "official")}                                            # NUM_TOKENS 197: no cap
  plan = ATS.plan(dict(samples=(5, 100), locations=(3, 6)), Layout(
      depth=12, num_patches=196, num_prefix=1)).blocks
  assert (plan[3]["samples"], plan[6]["samples"]) == (7, 7)             # floor 8 with [CLS]
  plan = ATS.plan(dict(form="haurum", keep_rate=0.5), Layout(
      depth=12, num_patches=196, num_prefix=1)).blocks
  assert [(i, kw["samples"]) for i, kw in enumerate(plan) if kw] == [(3, 98), (6, 49), (9, 24)]
  with pytest.raises(ValueError, match="needs keep_rate"):
    ATS.plan(dict(form="haurum"), Layout(depth=12, num_patches=196, num_prefix=1))


@pytest.mark.parametrize("tokens, slots", [
    (dict(form="haurum", samples=(10, 6), locations=(1, 2)), 6),
    (dict(locations=(1, 2)), N - 1),               # official, no cap: every slot kept
    (dict(samples=(10,), locations=(1,)), 10)])    # official, one capped stage
def test_ats_mask_mode_equals_gather_in_a_vit(tokens, slots):
  imgs = jax.random.normal(jax.random.key(3), (B, 16, 16, 3))

  def build(mode):
    return models.build(dict(variant="Ti/4", depth=4, tokens=dict(name="ats", mode=mode, **tokens)),
                        num_classes=10, image_size=16)
  gather, mask = build("gather"), build("mask")
  variables = gather.init(jax.random.key(0), imgs)
  (l1, o1) = jax.jit(gather.apply)(variables, imgs)
  (l2, o2) = jax.jit(mask.apply)(variables, imgs)
  assert o1["block_3"].shape[1] == 1 + slots and o2["block_3"].shape[1] == N
  np.testing.assert_allclose(np.asarray(l1), np.asarray(l2), atol=1e-5)
  assert int(o1["token_state"].valid.sum()) == int(o2["token_state"].valid.sum())


# ----- inside a ViT -----
@pytest.mark.parametrize("spec", [dict(name="tome", r=3, prop_attn=True),
                                  dict(name="mctf", r=3, prop_attn=True)])
def test_merging_in_a_tiny_vit(spec):
  model = models.build(dict(variant="Ti/4", depth=4, tokens=spec), num_classes=10, image_size=16)
  imgs = jax.random.normal(jax.random.key(3), (B, 16, 16, 3))
  variables = model.init(jax.random.key(0), imgs)

  def loss(p):
    logits, out = model.apply({"params": p}, imgs)
    return logits.sum() + out["block_3"].sum(), out
  (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree_util.tree_leaves(grads))
  np.testing.assert_allclose(np.asarray(out["token_state"].size.sum(1)), [N, N])
  want = [14, 11, 8, 5] if spec["name"] == "tome" else [17, 14, 11, 10]
  assert [out[f"block_{i}"].shape[1] for i in range(4)] == want


# reducer -> its test against a reference written here; tests/test_tokens_registry.py fails
# for a registered reducer that no test file lists
REFERENCE_CASES = {
    "tome": test_tome_matches_numpy_and_conserves,
    "mctf": test_mctf_matches_naive_reference,
    "ats": test_ats_official_matches_the_official_code,
}
