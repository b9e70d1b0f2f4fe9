"""Attention zoo, spatial mechanisms (Tier S).

The reference of every windowed mechanism is global attention with an explicit allowed-pairs mask
built here from its definition (window ids on the unrolled grid), forward and gradients, fp32; then
the special cases of each card (a window as large as the grid is global attention, the roll round
trip is the identity, padding never receives weight), the fast path against the reference, jit,
bf16 and a tiny ViT.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitjax import attention as attn_lib
from vitjax.attention import spatial
from vitjax.attention.base import AttnContext

D, H = 32, 2


def close(a, b, atol=1e-5, rtol=1e-5):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=rtol)


def heads(t):
  return t.reshape(t.shape[0], t.shape[1], H, -1)


def tokens(grid, npre, batch=2, seed=0):
  return jax.random.normal(jax.random.key(seed), (batch, npre + grid[0] * grid[1], D))


def perturbed(p, scale=0.2, seed=5):
  """Random parameters everywhere (biases and tables too), so a dropped term shows."""
  leaves, tree = jax.tree.flatten(p)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [l + scale * jax.random.normal(k, l.shape)
                                   for l, k in zip(leaves, keys)])


def build(name, impl="reference", **kw):
  return attn_lib.build(dict(name=name, **kw), num_heads=H, dtype=jnp.float32, impl=impl)


def init(m, x, ctx):
  return jax.jit(lambda x_: m.init(jax.random.key(1), x_, ctx))(x)


def jitted(m):
  """m.apply compiled (op-by-op execution of the windowing is the slow part of these tests)."""
  return jax.jit(m.apply, static_argnames=("need",))


def coords(grid):
  r, c = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij")
  return r.ravel(), c.ravel()


def swin_allowed(grid, window, shift):
  """Pairs of patches in one (shifted) window, on the unrolled grid: Swin's roll by -s followed by
  its region mask puts tokens r and r' together iff floor((r - s) / ws) agrees on both axes."""
  r, c = coords(grid)
  gr, gc = (r - shift[0]) // window[0], (c - shift[1]) // window[1]
  return (gr[:, None] == gr[None]) & (gc[:, None] == gc[None])


def offset_bias(table, grid, window):
  """[H, P, P] bias table[(dy + wh - 1)(2 ww - 1) + dx + ww - 1] of every patch pair, 0 where
  the offset is outside the window's range."""
  r, c = coords(grid)
  dy, dx = r[:, None] - r[None], c[:, None] - c[None]
  inside = (np.abs(dy) < window[0]) & (np.abs(dx) < window[1])
  idx = np.where(inside, (dy + window[0] - 1) * (2 * window[1] - 1) + dx + window[1] - 1, 0)
  return jnp.where(jnp.asarray(inside)[None], table[idx].transpose(2, 0, 1), 0.0)


def naive_masked(p, x, allowed, pair_bias, valid=None):
  """Global softmax attention over all N tokens with an [N, N] allowed mask and [H, N, N] bias."""
  qkv = x @ p["qkv"]["kernel"] + p["qkv"]["bias"]
  q, k, v = (heads(t) for t in jnp.split(qkv, 3, axis=-1))
  s = jnp.einsum("bnhd,bmhd->bhnm", q, k) / math.sqrt(q.shape[-1]) + pair_bias
  mask = jnp.asarray(allowed)[None, None]
  if valid is not None:
    mask = mask & valid[:, None, None, :]
  s = jnp.where(mask, s, -jnp.inf)
  w = jax.nn.softmax(s, axis=-1)
  o = jnp.einsum("bhnm,bmhd->bnhd", w, v).reshape(x.shape)
  return o @ p["proj"]["kernel"] + p["proj"]["bias"], w


def naive_window(p, x, grid, npre, window, shift, valid=None):
  """Swin attention as masked global attention: prefix rows see everything, patch rows see the
  patches of their window only, with the offset-indexed bias."""
  n = npre + grid[0] * grid[1]
  allowed = np.zeros((n, n), bool)
  allowed[:npre] = True
  allowed[npre:, npre:] = swin_allowed(grid, window, shift)
  bias = jnp.zeros((H, n, n)).at[:, npre:, npre:].set(
      offset_bias(p["relative_position_bias_table"], grid, window))
  return naive_masked(p, x, allowed, bias, valid)


# (name, grid, prefix tokens, options, the window and shift Swin uses there)
CASES = [
    ("shifted_window", (8, 8), 1, dict(window_size=4), (4, 4), (2, 2)),
    ("window", (5, 6), 2, dict(window_size=(2, 3)), (2, 3), (0, 0)),                   # padding
    ("shifted_window", (6, 7), 0, dict(window_size=4, shift_size=1), (4, 4), (1, 1)),  # padding
]


def compare(m, ref, x, ctx, grads=True, grad_floor=1e-6):
  """The module on perturbed parameters against ref(params, x), forward and gradients (input and
  every parameter, relative to each gradient's scale, down to grad_floor); one compile for all."""
  @jax.jit
  def run(x):
    p = perturbed(m.init(jax.random.key(1), x, ctx))
    fast = lambda p_, x_: m.apply(p_, x_, ctx)[0]  # noqa: E731
    outs = [fast(p, x), ref(p["params"], x)]
    r = jax.random.normal(jax.random.key(7), outs[0].shape)  # x's shape unless tokens pool
    if grads:
      outs += [jax.grad(lambda p_, x_: (f(p_, x_) * r).sum(), argnums=(0, 1))(p, x)
               for f in (fast, lambda p_, x_: ref(p_["params"], x_))]
    return p, outs

  p, outs = run(x)
  close(outs[0], outs[1], atol=2e-5)
  if grads:
    for a, b in zip(jax.tree.leaves(outs[2]), jax.tree.leaves(outs[3])):
      close(a, b, atol=1e-5 * float(jnp.abs(b).max()) + grad_floor, rtol=1e-4)
  return p


@pytest.mark.parametrize("case,impl", [(0, "reference"), (1, "reference"), (1, "xla")])
def test_window_matches_masked_global_attention(case, impl):
  name, grid, npre, opts, window, shift = CASES[case]
  x = tokens(grid, npre)
  valid = jnp.ones(x.shape[:2], bool).at[0, npre + 3].set(False).at[1, npre + 9].set(False)
  ctx = AttnContext(grid=grid, num_prefix=npre, valid=valid)
  grads = (case, impl) in ((0, "reference"), (1, "xla"))  # one gradient compile per path
  p = compare(build(name, impl, **opts), lambda p_, x_: naive_window(
      p_, x_, grid, npre, window, shift, valid)[0], x, ctx, grads=grads)
  assert p["params"]["relative_position_bias_table"].shape == (spatial.table_size(window), H)


def test_window_cls_row_is_exact():
  grid, npre = (8, 8), 1
  x = tokens(grid, npre)
  ctx = AttnContext(grid=grid, num_prefix=npre)
  m = build("shifted_window", window_size=4)
  p = perturbed(init(m, x, ctx))
  _, aux = jitted(m)(p, x, ctx, need=("cls_probs", "cls_probs_per_head"))
  _, w = jax.jit(naive_window, static_argnums=(2, 3, 4, 5))(p["params"], x, grid, npre, (4, 4),
                                                            (2, 2))
  close(aux["cls_probs_per_head"], w[:, :, 0], atol=1e-6)
  close(aux["cls_probs"], w[:, :, 0].mean(1), atol=1e-6)
  with pytest.raises(ValueError, match="cannot give"):
    m.apply(p, x, ctx, need=("key_metric",))


def test_window_as_large_as_the_grid_is_global_attention():
  """ws = h = w, no shift: global attention plus the bias (patch queries do not see the [CLS]);
  without prefix tokens and with a zero table, mhsa itself."""
  grid, npre = (4, 4), 1
  x = tokens(grid, npre)
  n = x.shape[1]
  allowed = np.ones((n, n), bool)
  allowed[npre:, :npre] = False

  def ref(p, x_):
    bias = jnp.zeros((H, n, n)).at[:, npre:, npre:].set(
        offset_bias(p["relative_position_bias_table"], grid, (4, 4)))
    return naive_masked(p, x_, allowed, bias)[0]

  m = build("shifted_window", window_size=4)
  p = compare(m, ref, x, AttnContext(grid=grid, num_prefix=npre), grads=False)
  mhsa = attn_lib.build("mhsa", num_heads=H, dtype=jnp.float32)
  zero = {"params": dict(p["params"], relative_position_bias_table=jnp.zeros_like(
      p["params"]["relative_position_bias_table"]))}
  plain = {"params": {k: p["params"][k] for k in ("qkv", "proj")}}
  x0 = x[:, npre:]
  close(jitted(m)(zero, x0, AttnContext(grid=grid, num_prefix=0))[0], jitted(mhsa)(plain, x0)[0],
        atol=2e-5)


def test_roll_round_trip_is_the_identity():
  """Pad, roll, cut into windows and back (numpy arrays take the same code path, uncompiled)."""
  for grid, window, shift in [((8, 8), (4, 4), (2, 2)), ((6, 7), (4, 3), (1, 2)),
                              ((5, 5), (5, 5), (0, 0))]:
    x = np.random.default_rng(0).normal(size=(2, *grid, 3, 5)).astype(np.float32)
    w = spatial.to_windows(x, window, shift)
    hp, wp = spatial.padded(grid, window)
    assert w.shape == (2 * (hp // window[0]) * (wp // window[1]), window[0] * window[1], 3, 5)
    np.testing.assert_array_equal(spatial.from_windows(w, window, grid, shift), x)
    g = spatial.to_grid(x, window)
    np.testing.assert_array_equal(spatial.from_grid(g, window, grid), x)


def test_padding_never_receives_weight():
  """A 6x7 grid in shifted 4x4 windows is padded to 8x8; the padded keys (k = 0 after the
  projection, so logit 0, not small) get no weight: the output equals attention over the
  real tokens only (whose reference has no padding at all), and padded keys' weights are exactly 0."""
  test_window_matches_masked_global_attention(2, "reference")
  kb = spatial.to_windows(np.zeros((1, 6, 6)), (4, 4), (2, 2), fill=spatial.PAD_LOGIT)
  w = jax.nn.softmax(jax.random.normal(jax.random.key(3), (4, 16, 16)) + kb[:, None, :], axis=-1)
  assert float(jnp.where(kb[:, None, :] < -1, w, 0.0).max()) == 0.0


def test_swin_official_index_and_mask():
  """Pins the official buffers: relative_position_index as Swin builds it (coordinate differences
  shifted by ws - 1, rows times 2 ws - 1), and the shifted-window mask of a 8x8 grid, ws 4, s 2."""
  ws = 7
  c = np.stack(np.meshgrid(np.arange(ws), np.arange(ws), indexing="ij")).reshape(2, -1)
  rel = (c[:, :, None] - c[:, None, :]).transpose(1, 2, 0) + (ws - 1)
  official = rel[..., 0] * (2 * ws - 1) + rel[..., 1]
  np.testing.assert_array_equal(spatial.relative_position_index((ws, ws)), official)
  mask = spatial.shift_mask((8, 8), (4, 4), (2, 2))
  assert mask.shape == (4, 16, 16) and set(np.unique(mask)) == {0.0, -100.0}
  assert (mask[0] == 0).all()                                   # an interior window: one region
  assert len(np.unique(spatial.shift_regions((8, 8), (4, 4), (2, 2))[3])) == 4  # the corner: 4
  assert spatial.shift_mask((8, 8), (4, 4), (0, 0)) is None
  assert spatial.fit_window((7, 14), 7, 3) == ((7, 7), (0, 3))  # timm's per-axis rule


def test_window_errors_are_one_line():
  x = tokens((4, 4), 1)
  m = build("window", window_size=2)
  for ctx, match in [(None, "needs the patch grid"), (AttnContext(grid=(3, 3)), "expected 10"),
                     (AttnContext(grid=(4, 4)), None)]:
    if match is None:
      build("window", window_size=2, cls_mode="none")
      with pytest.raises(ValueError, match="cls_mode='none' takes no prefix tokens"):
        build("window", window_size=2, cls_mode="none").init(jax.random.key(0), x, ctx)
      continue
    with pytest.raises(ValueError, match=match) as err:
      m.init(jax.random.key(0), x, ctx)
    assert str(err.value).startswith("error: ") and "\n" not in str(err.value)
  with pytest.raises(ValueError, match="shift in"):
    build("shifted_window", window_size=2, shift_size=2).init(
        jax.random.key(0), x, AttnContext(grid=(4, 4)))


def test_jit_matches_eager():
  grid = (8, 8)
  x = tokens(grid, 1)
  ctx = AttnContext(grid=grid, num_prefix=1)
  m = build("shifted_window", window_size=4)
  p = init(m, x, ctx)
  y, aux = jitted(m)(p, x, ctx, need=("cls_probs",))
  y0, aux0 = m.apply(p, x, ctx, need=("cls_probs",))
  close(y, y0, atol=1e-5)
  close(aux["cls_probs"], aux0["cls_probs"], atol=1e-6)


@pytest.mark.parametrize("name,impl", [("shifted_window", "xla")])
def test_bf16(name, impl):
  grid = (6, 6)
  x = tokens(grid, 1)
  ctx = AttnContext(grid=grid, num_prefix=1)
  m = build(name, impl, window_size=4)
  p = init(m, x, ctx)
  y0 = jitted(m)(p, x, ctx)[0]
  mb = attn_lib.build(dict(name=name, window_size=4), num_heads=H, dtype=jnp.bfloat16, impl=impl)
  yb, auxb = jitted(mb)(p, x.astype(jnp.bfloat16), ctx, need=("cls_probs",))
  assert yb.dtype == jnp.bfloat16
  close(np.asarray(yb, np.float32), y0, atol=0.1, rtol=0.1)
  assert np.isfinite(np.asarray(auxb["cls_probs"])).all()


# ----- neighbourhood attention -----
def natten_start(i, length, k, d):
  """natten's window start of position i (its C++ rule, restated)."""
  ns = k // 2
  if d <= 1:
    return max(i - ns, 0) + (i + ns >= length) * (length - i - ns - 1)
  if i - ns * d < 0:
    return i % d
  if i + ns * d >= length:
    a = (length // d) * d
    b = length - a
    return length - b + i % d - 2 * ns * d if i % d < b else a + i % d - k * d
  return i - ns * d


def naive_neighborhood(p, x, grid, npre, k, d, valid=None):
  """NA as masked global attention: query (r, c) sees keys start + t d per axis, t < k, with the
  bias rpb[h, (key - query) / d + k - 1] per axis."""
  n = npre + grid[0] * grid[1]
  r, c = coords(grid)
  ok = lambda q_, key, length: (key - natten_start(q_, length, k, d)) % d == 0 and 0 <= (  # noqa
      key - natten_start(q_, length, k, d)) // d < k
  allowed = np.zeros((n, n), bool)
  allowed[:npre] = True
  for i in range(len(r)):
    for j in range(len(r)):
      allowed[npre + i, npre + j] = ok(r[i], r[j], grid[0]) and ok(c[i], c[j], grid[1])
  dy, dx = (r[None] - r[:, None]) // d + k - 1, (c[None] - c[:, None]) // d + k - 1
  inside = allowed[npre:, npre:]
  table = p["rpb"][:, np.where(inside, dy, 0), np.where(inside, dx, 0)]
  bias = jnp.zeros((H, n, n)).at[:, npre:, npre:].set(jnp.where(inside[None], table, 0.0))
  return naive_masked(p, x, allowed, bias, valid)


# (name, grid, prefix, options, k, dilation)
NA_CASES = [("neighborhood", (7, 6), 1, dict(kernel_size=3), 3, 1),
            ("dilated_neighborhood", (9, 8), 0, dict(kernel_size=3, dilation=2), 3, 2),
            ("dilated_neighborhood", (8, 8), 0, dict(kernel_size=3), 3, 2)]  # delta = 8 // 3


@pytest.mark.parametrize("case", range(len(NA_CASES)))
def test_neighborhood_matches_masked_global_attention(case):
  name, grid, npre, opts, k, d = NA_CASES[case]
  x = tokens(grid, npre)
  valid = jnp.ones(x.shape[:2], bool).at[0, npre + 4].set(False)
  ctx = AttnContext(grid=grid, num_prefix=npre, valid=valid)
  compare(build(name, **opts), lambda p, x_: naive_neighborhood(p, x_, grid, npre, k, d, valid)[0],
          x, ctx, grads=case == 1)


def test_neighborhood_special_cases():
  """k = grid is global attention (with the bias); a corner query's keys are the top-left k x k
  block (and the last query's the bottom-right one); border queries read shifted bias entries."""
  grid = (5, 5)
  x = tokens(grid, 0)
  compare(build("neighborhood", kernel_size=5), lambda p, x_: naive_neighborhood(
      p, x_, grid, 0, 5, 1)[0], x, AttnContext(grid=grid, num_prefix=0), grads=False)
  keys, valid, offset = spatial.neighborhood_2d((7, 7), (3, 3), (1, 1))
  assert valid.all()
  assert sorted(keys[0]) == [0, 1, 2, 7, 8, 9, 14, 15, 16]
  assert sorted(keys[48]) == [32, 33, 34, 39, 40, 41, 46, 47, 48]
  # query 0 sees offsets (0..2, 0..2): table rows and columns 2..4 of a 5 x 5 table
  assert sorted(offset[0]) == [r * 5 + c for r in (2, 3, 4) for c in (2, 3, 4)]
  assert sorted(offset[24]) == [r * 5 + c for r in (1, 2, 3) for c in (1, 2, 3)]  # interior
  # a dilation group shorter than k is attended whole
  keys, valid, _ = spatial.neighborhood(4, 7, 2)
  assert (valid.sum(1) == 2).all() and set(keys[1][valid[1]]) == {1, 3}


# ----- MaxViT block and grid attention -----
def naive_partition(p, x, grid, npre, size, kind):
  """Block / grid attention as masked global attention: block parts are the P x P windows; grid
  parts gather the tokens congruent modulo the spacing hp / G; bias at key - query in part units."""
  n = npre + grid[0] * grid[1]
  r, c = coords(grid)
  if kind == "block":
    part, local = (r // size[0], c // size[1]), (r, c)
  else:
    sh, sw = (math.ceil(g / s) for g, s in zip(grid, size))  # the spacing of a padded grid
    part, local = (r % sh, c % sw), (r // sh, c // sw)
  allowed = np.zeros((n, n), bool)
  allowed[:npre] = True
  allowed[npre:, npre:] = (part[0][:, None] == part[0][None]) & (part[1][:, None] == part[1][None])
  inside = allowed[npre:, npre:]
  dy = np.where(inside, local[0][None] - local[0][:, None] + size[0] - 1, 0)
  dx = np.where(inside, local[1][None] - local[1][:, None] + size[1] - 1, 0)
  table = p["relative_position_bias_table"][:, dy, dx]
  bias = jnp.zeros((H, n, n)).at[:, npre:, npre:].set(jnp.where(inside[None], table, 0.0))
  return naive_masked(p, x, allowed, bias)


# (name, grid, prefix, partition size, impl)
MAXVIT_CASES = [("maxvit_block", (6, 8), 1, (3, 4), "reference"),
                ("maxvit_grid", (6, 9), 0, (3, 3), "reference"),
                ("maxvit_grid", (7, 6), 1, (3, 2), "xla")]  # padding: 7 rows in 3 groups


@pytest.mark.parametrize("case", range(len(MAXVIT_CASES)))
def test_maxvit_matches_masked_global_attention(case):
  name, grid, npre, size, impl = MAXVIT_CASES[case]
  kind = name.split("_")[1]
  compare(build(name, impl, partition_size=size), lambda p, x_: naive_partition(
      p, x_, grid, npre, size, kind)[0], tokens(grid, npre),
      AttnContext(grid=grid, num_prefix=npre), grads=case == 1)


def test_maxvit_grid_is_block_attention_after_the_grid_permutation_and_dina():
  """grid attention == block attention on the grid-permuted tokens; P = G = h is global attention
  for both; DiNA with h = delta k equals grid attention with G = k (same table)."""
  grid, g = (6, 6), (3, 3)
  x = tokens(grid, 0)
  ctx = AttnContext(grid=grid, num_prefix=0)
  block, gridded = build("maxvit_block", partition_size=g), build("maxvit_grid", partition_size=g)
  p = perturbed(init(gridded, x, ctx))
  # the permutation that turns each grid group into a 3 x 3 window (groups in raster order)
  order = np.asarray(spatial.to_grid(np.arange(36).reshape(1, 6, 6), g)).reshape(-1)
  perm = np.asarray(spatial.from_windows(order.reshape(4, 9), g, grid)).reshape(-1)
  close(jitted(gridded)(p, x, ctx)[0][:, perm], jitted(block)(p, x[:, perm], ctx)[0], atol=2e-5)
  dina = build("dilated_neighborhood", kernel_size=3, dilation=2)
  close(jitted(dina)({"params": {"qkv": p["params"]["qkv"], "proj": p["params"]["proj"],
                                 "rpb": p["params"]["relative_position_bias_table"]}}, x, ctx)[0],
        jitted(gridded)(p, x, ctx)[0], atol=2e-5)
  big = build("maxvit_grid", partition_size=6)
  pb = perturbed(init(big, x, ctx))
  close(jitted(big)(pb, x, ctx)[0], jitted(build("maxvit_block", partition_size=6))(pb, x, ctx)[0],
        atol=2e-5)
  close(jitted(big)(pb, x, ctx)[0], naive_partition(pb["params"], x, grid, 0, (6, 6), "block")[0],
        atol=2e-5)


def window_reference_case():
  test_window_matches_masked_global_attention(1, "reference")


def neighborhood_reference_case():
  test_neighborhood_matches_masked_global_attention(0)


# ----------------------------------------------------------------------------- windows, no bias
@pytest.mark.parametrize("name", ["twins_lsa", "davit_window"])
def test_windows_without_bias_match_masked_global_attention(name):
  """Twins' LSA and DaViT's spatial windows: Swin's windows (no shift) and no position table."""
  grid, npre, window = (5, 6), 1, (2, 3)
  x = tokens(grid, npre)
  ctx = AttnContext(grid=grid, num_prefix=npre)
  n = x.shape[1]
  allowed = np.zeros((n, n), bool)
  allowed[:npre] = True
  allowed[npre:, npre:] = swin_allowed(grid, window, (0, 0))
  p = compare(build(name, window_size=window), lambda p_, x_: naive_masked(
      p_, x_, allowed, jnp.zeros((H, n, n)))[0], x, ctx, grads=name == "twins_lsa")
  assert set(p["params"]) == {"qkv", "proj"}


# ----------------------------------------------------------------------------- HiLo
def dense(p, x):
  return x @ p["kernel"] + p["bias"]


def masked_heads(q, k, v, allowed):
  """q [B,N,h,d], k and v [B,M,h,d], allowed [N, M] -> softmax attention [B,N,h*d]."""
  s = jnp.einsum("bnhd,bmhd->bhnm", q, k) / math.sqrt(q.shape[-1])
  w = jax.nn.softmax(jnp.where(jnp.asarray(allowed)[None, None], s, -jnp.inf), axis=-1)
  y = jnp.einsum("bhnm,bmhd->bnhd", w, v)
  return y.reshape(*y.shape[:2], -1)


def naive_hilo(p, x, grid, npre, s, hi, lo):
  """HiLo from its definition: Hi-Fi heads masked to their s x s window (prefix rows global),
  Lo-Fi heads over [prefix; the mean of each window], concatenated Hi-Fi first."""
  d = D // H
  n = x.shape[1]
  outs = []
  if hi:
    q, k, v = (t.reshape(*x.shape[:2], hi, d) for t in jnp.split(dense(p["h_qkv"], x), 3, -1))
    allowed = np.zeros((n, n), bool)
    allowed[:npre] = True
    allowed[npre:, npre:] = swin_allowed(grid, (s, s), (0, 0))
    outs.append(dense(p["h_proj"], masked_heads(q, k, v, allowed)))
  if lo:
    r, c = coords(grid)
    cell = (r // s) * (grid[1] // s) + c // s
    pool = np.stack([(cell == i) / s ** 2 for i in range(cell.max() + 1)]).astype(np.float32)
    keys = jnp.concatenate([x[:, :npre], jnp.einsum("mp,bpc->bmc", pool, x[:, npre:])], 1)
    q = dense(p["l_q"], x).reshape(*x.shape[:2], lo, d)
    k, v = (t.reshape(*keys.shape[:2], lo, d) for t in jnp.split(dense(p["l_kv"], keys), 2, -1))
    outs.append(dense(p["l_proj"], masked_heads(q, k, v, np.ones((n, keys.shape[1]), bool))))
  return jnp.concatenate(outs, axis=-1)


# (grid, prefix tokens, options, Hi-Fi heads, Lo-Fi heads)
HILO_CASES = [((4, 6), 1, dict(), 1, 1),                    # alpha 0.9 of 2 heads: one each
              ((4, 4), 0, dict(alpha=0.0), 2, 0),           # pure window attention
              ((3, 3), 1, dict(window_size=1), 0, 2)]       # s = 1: global attention


@pytest.mark.parametrize("case", range(len(HILO_CASES)))
def test_hilo_matches_its_definition(case):
  grid, npre, opts, hi, lo = HILO_CASES[case]
  x = tokens(grid, npre)
  ctx = AttnContext(grid=grid, num_prefix=npre)
  s = opts.get("window_size", 2)
  p = compare(build("hilo", **opts), lambda p_, x_: naive_hilo(p_, x_, grid, npre, s, hi, lo),
              x, ctx, grads=case == 0)
  assert ("h_qkv" in p["params"]) == bool(hi) and ("l_q" in p["params"]) == bool(lo)


def test_hilo_errors_are_one_line():
  x = tokens((3, 4), 1)
  m = build("hilo")
  with pytest.raises(ValueError, match=r"^error: hilo window_size 2 does not divide the 3x4 "):
    init(m, x, AttnContext(grid=(3, 4), num_prefix=1))
  with pytest.raises(ValueError, match=r"^error: hilo takes no key bias or mask"):
    init(m, tokens((4, 4), 1), AttnContext(grid=(4, 4), valid=jnp.ones((2, 17), bool)))
  assert attn_lib.get("hilo").caps.cls_probs == "none"
  for name in ("hilo", "gpsa"):
    with pytest.raises(ValueError, match=rf"^error: {name} has no qk_norm"):
      init(attn_lib.build(name, num_heads=H, dtype=jnp.float32, qk_norm=True), tokens((4, 4), 1),
           AttnContext(grid=(4, 4), num_prefix=1))


# ----------------------------------------------------------------------------- ConViT GPSA
def naive_gpsa(p, x, grid, npre):
  """GPSA from its definition, pair by pair: r_nm = (dx, dy, dx^2 + dy^2) of key m from query n,
  gate sigmoid(l_h) between the content and the positional softmax, rows renormalised; prefix
  queries are content-only and prefix keys get no positional weight."""
  d = D // H
  q, k = (t.reshape(*x.shape[:2], H, d) for t in jnp.split(dense(p["qk"], x), 2, -1))
  v = dense(p["v"], x).reshape(*x.shape[:2], H, d)
  content = jax.nn.softmax(jnp.einsum("bnhd,bmhd->bhnm", q, k) / math.sqrt(d), axis=-1)
  r, c = coords(grid)
  rel = np.array([[(c[m] - c[n], r[m] - r[n], (c[m] - c[n]) ** 2 + (r[m] - r[n]) ** 2)
                   for m in range(len(r))] for n in range(len(r))], np.float32)
  pos = jax.nn.softmax(dense(p["pos_proj"], jnp.asarray(rel)), axis=1).transpose(2, 0, 1)
  pos = jnp.pad(pos, ((0, 0), (npre, 0), (npre, 0)))
  g = jax.nn.sigmoid(p["gating_param"])[:, None, None] * (np.arange(x.shape[1]) >= npre)[:, None]
  mixed = (1 - g) * content + g * pos
  mixed = mixed / mixed.sum(-1, keepdims=True)
  y = jnp.einsum("bhnm,bmhd->bnhd", mixed, v).reshape(x.shape)
  return dense(p["proj"], y)


@pytest.mark.parametrize("grid,npre", [((4, 5), 1), ((3, 3), 0)])
def test_gpsa_matches_its_definition(grid, npre):
  x = tokens(grid, npre)
  # grad_floor: the positional bias's gradient is 0 (a softmax ignores a constant shift)
  compare(build("gpsa"), lambda p_, x_: naive_gpsa(p_, x_, grid, npre), x,
          AttnContext(grid=grid, num_prefix=npre), grads=npre == 1, grad_floor=1e-5)


def test_gpsa_locality_init_gates_and_rows():
  """The official local_init: v the identity, gates 1, head h1 + K h2 peaked at the offset
  (h2 - c, h1 - c); a closed gate is content attention; the rows sum to 1."""
  grid, heads, width = (7, 7), 9, 36
  m = attn_lib.build("gpsa", num_heads=heads, dtype=jnp.float32)
  x = jax.random.normal(jax.random.key(0), (1, 49, width))
  ctx = AttnContext(grid=grid, num_prefix=0)
  p = init(m, x, ctx)["params"]
  np.testing.assert_array_equal(p["v"]["kernel"], np.eye(width))
  np.testing.assert_array_equal(p["gating_param"], np.ones(heads))
  r, c = coords(grid)
  centre = 24  # the middle patch (3, 3)
  dx, dy = c - c[centre], r - r[centre]
  logits = np.stack([dx, dy, dx ** 2 + dy ** 2], -1) @ np.asarray(p["pos_proj"]["kernel"])
  for h1 in range(3):
    for h2 in range(3):
      peak = int(np.argmax(logits[:, h1 + 3 * h2]))
      assert (dx[peak], dy[peak]) == (h2 - 1, h1 - 1)
  closed = dict(p, gating_param=jnp.full((heads,), -60.0))
  _, aux = m.apply({"params": closed}, x, ctx, need=("attn",))
  d = width // heads
  q, k = (t.reshape(1, 49, heads, d) for t in jnp.split(dense(p["qk"], x), 2, -1))
  content = jax.nn.softmax(jnp.einsum("bnhd,bmhd->bhnm", q, k) / math.sqrt(d), axis=-1)
  close(aux["attn"], content, atol=1e-6)
  close(m.apply({"params": p}, x, ctx, need=("attn",))[1]["attn"].sum(-1), 1.0)


# ----------------------------------------------------------------------------- MViTv2 pooling
def naive_pool(w, t, grid, stride, npre):
  """The depthwise pooling conv written out: out[i, j] = sum_ab w[a, b] t[s i + a - p, s j + b - p]
  (zero outside the grid), per head and channel; prefix tokens pass through unpooled."""
  kh, kw = w.shape[:2]
  b, _, heads, d = t.shape
  g = t[:, npre:].reshape(b, *grid, heads, d)
  g = jnp.pad(g, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0), (0, 0)))
  oh, ow = ((n + 2 * (k // 2) - k) // stride + 1 for n, k in zip(grid, (kh, kw)))
  out = sum(w[a, c, 0] * g[:, a:a + stride * oh:stride, c:c + stride * ow:stride][:, :oh, :ow]
            for a in range(kh) for c in range(kw))
  return jnp.concatenate([t[:, :npre], out.reshape(b, oh * ow, heads, d)], 1), (oh, ow)


def layer_norm(p, t, eps=1e-6):
  mu = t.mean(-1, keepdims=True)
  var = ((t - mu) ** 2).mean(-1, keepdims=True)
  return (t - mu) / jnp.sqrt(var + eps) * p["scale"] + p["bias"]


def rel_pos_gather(table, qs, ks):
  """[qs, ks, d] entries table[int(i r_q - j r_k + (ks - 1) r_k)] of cal_rel_pos_spatial, pair
  by pair (r_q = max(ks / qs, 1), r_k = max(qs / ks, 1))."""
  rq, rk = max(ks / qs, 1.0), max(qs / ks, 1.0)
  idx = [[int(i * rq - j * rk + (ks - 1) * rk) for j in range(ks)] for i in range(qs)]
  return table[np.array(idx)]


def naive_mvit_pool(p, x, grid, npre, q_stride, kv_stride, rel_pos=True, residual=True,
                    kernel=3):
  """MViTv2's pooling attention from its definition: pooled and normed q, k, v, the
  decomposed rel-pos bias by index on the patch pairs, dense softmax, + q, projection."""
  out = p["qkv"]["kernel"].shape[1] // 3
  d = out // H
  q, k, v = (t.reshape(*x.shape[:2], H, d) for t in jnp.split(dense(p["qkv"], x), 3, -1))
  q_grid = k_grid = grid
  if kernel > 1 or q_stride > 1:
    q, q_grid = naive_pool(p["pool_q"]["kernel"], q, grid, q_stride, npre)
    q = layer_norm(p["norm_q"], q)
  if kernel > 1 or kv_stride > 1:
    k, k_grid = naive_pool(p["pool_k"]["kernel"], k, grid, kv_stride, npre)
    v, _ = naive_pool(p["pool_v"]["kernel"], v, grid, kv_stride, npre)
    k, v = layer_norm(p["norm_k"], k), layer_norm(p["norm_v"], v)
  s = jnp.einsum("bnhd,bmhd->bhnm", q, k) / math.sqrt(d)
  if rel_pos:
    rh = rel_pos_gather(p["rel_pos_h"], q_grid[0], k_grid[0])  # [qh, kh, d]
    rw = rel_pos_gather(p["rel_pos_w"], q_grid[1], k_grid[1])
    qi, qj = coords(q_grid)
    ki, kj = coords(k_grid)
    pair_r = rh[qi[:, None], ki[None]] + rw[qj[:, None], kj[None]]  # [Nq, Nk, d]
    bias = jnp.einsum("bnhd,nmd->bhnm", q[:, npre:], pair_r)
    s = s.at[:, :, npre:, npre:].add(bias)
  y = jnp.einsum("bhnm,bmhd->bnhd", jax.nn.softmax(s, axis=-1), v)
  if residual:
    y = y + q
  return dense(p["proj"], y.reshape(*y.shape[:2], out))


# (grid, prefix tokens, q stride, kv stride, dim_out)
MVIT_CASES = [((8, 8), 1, 2, 4, 48),   # q 4x4 over keys 2x2: table ratios 2; width grows
              ((6, 4), 0, 1, 2, None),  # non-square, keys pooled only
              ((5, 5), 1, 2, 1, None)]  # q 3x3 over keys 5x5: ratio 5/3


@pytest.mark.parametrize("case", range(len(MVIT_CASES)))
def test_mvit_pool_matches_its_definition(case):
  grid, npre, sq, skv, out = MVIT_CASES[case]
  x = tokens(grid, npre)
  p = compare(build("mvit_pool", q_stride=sq, kv_stride=skv, dim_out=out),
              lambda p_, x_: naive_mvit_pool(p_, x_, grid, npre, sq, skv), x,
              AttnContext(grid=grid, num_prefix=npre), grads=case == 0, grad_floor=1e-5)
  # (grad_floor: norm_k's bias moves every logit of a row alike, so its gradient is 0)
  assert p["params"]["pool_q"]["kernel"].shape == (3, 3, 1, (out or D) // H)


def test_mvit_pool_special_cases():
  """Kernel 1, strides 1, no rel-pos and no residual pooling: global attention (`mhsa` on the
  same weights); kernel 3 with a centred unit kernel: global attention of the normed q, k, v."""
  grid, npre = (4, 4), 1
  x = tokens(grid, npre)
  ctx = AttnContext(grid=grid, num_prefix=npre)
  plain = build("mvit_pool", kernel_size=1, rel_pos=False, residual_pooling=False)
  p = init(plain, x, ctx)
  assert set(p["params"]) == {"qkv", "proj"}
  mhsa = build("mhsa")
  close(jitted(plain)(p, x, ctx)[0], jitted(mhsa)(p, x, ctx)[0])
  normed = build("mvit_pool", rel_pos=False, residual_pooling=False)
  p = perturbed(init(normed, x, ctx))
  unit = jnp.zeros((3, 3, 1, D // H)).at[1, 1].set(1.0)
  p = {"params": {**p["params"], **{f"pool_{t}": {"kernel": unit} for t in "qkv"}}}
  y = jitted(normed)(p, x, ctx)[0]
  w = p["params"]
  q, k, v = (layer_norm(w[f"norm_{n}"], heads(t))
             for n, t in zip("qkv", jnp.split(dense(w["qkv"], x), 3, -1)))
  o = masked_heads(q, k, v, np.ones((x.shape[1],) * 2, bool))
  close(y, dense(w["proj"], o), atol=2e-5)
  # pooled sizes and the rel-pos index of the official code at 224 px (stage 2 -> 3: 14 -> 7)
  from vitjax.attention import mvit_pool  # pylint: disable=import-outside-toplevel
  assert mvit_pool.pooled_grid((14, 14), 3, 2) == (7, 7)
  assert mvit_pool.rel_pos_index(2, 4).tolist() == [[3, 2, 1, 0], [5, 4, 3, 2]]
  assert mvit_pool.rel_pos_index(4, 2).tolist() == [[2, 0], [3, 1], [4, 2], [5, 3]]


def test_mvit_pool_errors_are_one_line():
  x = tokens((4, 4), 1)
  with pytest.raises(ValueError, match=r"^error: mvit_pool takes no key bias or mask"):
    init(build("mvit_pool"), x, AttnContext(grid=(4, 4), valid=jnp.ones((2, 17), bool)))
  with pytest.raises(ValueError, match=r"^error: mvit_pool gives none of \['attn'\]"):
    build("mvit_pool").apply({}, x, AttnContext(grid=(4, 4)), need=("attn",))
  with pytest.raises(ValueError, match=r"^error: mvit_pool has no qk_norm"):
    init(attn_lib.build("mvit_pool", num_heads=H, dtype=jnp.float32, qk_norm=True), x,
         AttnContext(grid=(4, 4)))


# ----------------------------------------------------------------------------- GC ViT global query
def naive_gcvit(p, x, gq, grid, npre, window, valid=None):
  """GC ViT's global query attention as global attention with an explicit window mask: patch
  (r, c) has the query gq[(r mod wh) * ww + c mod ww] (the global query token of its place in the
  window, shared by every window) and sees the patches of its window with the offset bias; a
  prefix row has its own features as query and sees every token, without bias."""
  n = x.shape[1]
  r, c = coords(grid)
  q = jnp.concatenate([x[:, :npre], gq[:, (r % window[0]) * window[1] + c % window[1]]], 1)
  k, v = (heads(t) for t in jnp.split(dense(p["qkv"], x), 2, -1))
  allowed = np.zeros((n, n), bool)
  allowed[:npre] = True
  allowed[npre:, npre:] = swin_allowed(grid, window, (0, 0))
  bias = jnp.zeros((H, n, n)).at[:, npre:, npre:].set(
      offset_bias(p["relative_position_bias_table"], grid, window))
  s = jnp.einsum("bnhd,bmhd->bhnm", heads(q), k) / math.sqrt(D // H) + bias
  mask = jnp.asarray(allowed)[None, None]
  if valid is not None:
    mask = mask & valid[:, None, None, :]
  w = jax.nn.softmax(jnp.where(mask, s, -jnp.inf), axis=-1)
  return dense(p["proj"], jnp.einsum("bhnm,bmhd->bnhd", w, v).reshape(x.shape))


# (grid, prefix tokens, window, impl): the window divides the grid / pads it
GCVIT_CASES = [((8, 6), 1, (4, 3), "reference"), ((5, 6), 0, (2, 3), "reference"),
               ((5, 6), 2, (2, 3), "xla")]


@pytest.mark.parametrize("case", range(len(GCVIT_CASES)))
def test_gcvit_global_matches_masked_global_attention(case):
  """The global queries given in the context: forward and the gradients of the parameters, the
  tokens and the global queries, against `naive_gcvit`."""
  grid, npre, window, impl = GCVIT_CASES[case]
  x = tokens(grid, npre)
  gq = jax.random.normal(jax.random.key(3), (2, window[0] * window[1], D))
  valid = jnp.ones(x.shape[:2], bool).at[1, npre + 4].set(False)
  m = build("gcvit_global", impl, window_size=window)
  r = jax.random.normal(jax.random.key(7), x.shape)

  @jax.jit
  def run(x, gq):
    ctx = AttnContext(grid=grid, num_prefix=npre, valid=valid, global_query=gq)
    p = perturbed(m.init(jax.random.key(1), x, ctx))
    ours = lambda p_, x_, g_: m.apply(p_, x_, ctx.replace(global_query=g_))[0]  # noqa: E731
    ref = lambda p_, x_, g_: naive_gcvit(p_["params"], x_, g_, grid, npre, window,  # noqa: E731
                                         valid)
    grads = [jax.grad(lambda *a, f=f: (f(*a) * r).sum(), argnums=(0, 1, 2))(p, x, gq)
             for f in (ours, ref)]
    return p, ours(p, x, gq), ref(p, x, gq), grads

  p, y, want, (g, g_ref) = run(x, gq)
  assert set(p["params"]) == {"qkv", "proj", "relative_position_bias_table"}
  assert p["params"]["qkv"]["kernel"].shape == (D, 2 * D)  # keys and values only
  close(y, want, atol=2e-5)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    close(a, b, atol=1e-5 * float(jnp.abs(b).max()) + 1e-6, rtol=1e-4)


def gcvit_reference_case():
  test_gcvit_global_matches_masked_global_attention(0)


def test_gcvit_global_derives_its_queries_as_the_feature_block():
  """Without global queries in the context the layer makes them from its own patch tokens:
  zero-padded to multiples of the window (6x7 -> 8x8 for window 4), then the FeatExtract path
  with log2(8 / 4) = 1 level; the same as handing it that FeatureBlock's output."""
  from vitjax.attention import gcvit  # pylint: disable=import-outside-toplevel
  grid, npre = (6, 7), 1
  x = tokens(grid, npre)
  m = build("gcvit_global", window_size=4)
  ctx = AttnContext(grid=grid, num_prefix=npre)
  p = perturbed(init(m, x, ctx))
  assert set(p["params"]["global_block"]) == {"conv1"}  # one MbConv (and a max pool)
  img = jnp.pad(x[:, npre:].reshape(2, *grid, D), [(0, 0), (0, 2), (0, 1), (0, 0)])
  gq = gcvit.FeatureBlock(1).apply({"params": p["params"]["global_block"]}, img)
  assert gq.shape == (2, 4, 4, D)
  given = ctx.replace(global_query=gq.reshape(2, 16, D))
  close(jitted(m)(p, x, ctx)[0], jitted(m)(p, x, given)[0], atol=1e-5)
  # a window as large as the grid becomes the grid, and the path keeps its size (no pooling)
  small = build("gcvit_global", window_size=9)
  q = init(small, x, ctx)["params"]
  assert "pool" not in str(jax.tree.structure(q)) and q["relative_position_bias_table"].shape[0] \
      == spatial.table_size(grid)
  # SE width: timm's make_divisible(D / 4, 8), at least 8
  assert q["global_block"]["conv1"]["se"]["fc1"]["kernel"].shape == (1, 1, D, 8)
  assert [gcvit.make_divisible(c / 4) for c in (16, 64, 96, 100)] == [8, 16, 24, 24]


def test_gcvit_global_errors_are_one_line():
  grid = (6, 6)
  x = tokens(grid, 0)
  ctx = AttnContext(grid=grid, num_prefix=0)
  with pytest.raises(ValueError, match=r"6x6 grid padded to 6x6, which is not the 3x2 window "
                     r"times a power of 2 on both axes; give ctx.global_query"):
    build("gcvit_global", window_size=(3, 2)).init(jax.random.key(0), x, ctx)
  bad = ctx.replace(global_query=jnp.zeros((2, 9, D)))
  with pytest.raises(ValueError, match=r"global queries of shape \(2, 9, 32\); expected "
                     r"\(2, 16, 32\)"):
    build("gcvit_global", window_size=4).init(jax.random.key(0), x, bad)
  with pytest.raises(ValueError, match="no query projection"):
    attn_lib.build("gcvit_global", num_heads=H, dtype=jnp.float32, qk_norm=True).init(
        jax.random.key(0), x, ctx.replace(global_query=jnp.zeros((2, 36, D))))


# ----------------------------------------------------------------------------- CvT
def naive_dwconv(img, kernel, stride):
  """Depthwise k x k convolution (padding k // 2, no bias) by shifted sums, then the stride:
  img [B, h, w, C], kernel [k, k, 1, C] -> [B, ceil(h/s), ceil(w/s), C]."""
  k, (h, w) = kernel.shape[0], img.shape[1:3]
  pad = k // 2
  padded = jnp.pad(img, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  out = sum(padded[:, i:i + h, j:j + w] * kernel[i, j, 0] for i in range(k) for j in range(k))
  return out[:, ::stride, ::stride]


def naive_cvt(p, stats, x, grid, npre, stride, train=False):
  """CvT's convolutional projection from its definition: per q, k, v a depthwise conv, BatchNorm
  (y - mean) / sqrt(var + 1e-5) * scale + bias with the running statistics, or in training the
  batch's (biased variance), flattened after the unconvolved prefix, a Linear; softmax with the
  full width's scale D^-1/2. Returns (y, the batch statistics used in training)."""
  b, n, width = x.shape
  img = x[:, npre:].reshape(b, *grid, width)
  proj, used = {}, {}
  for kind, s in (("q", 1), ("k", stride), ("v", stride)):
    y = naive_dwconv(img, p[f"conv_proj_{kind}"]["conv"]["kernel"], s)
    bn, st = p[f"conv_proj_{kind}"]["bn"], stats[f"conv_proj_{kind}"]["bn"]
    mean, var = st["mean"], st["var"]
    if train:
      mean, var = y.mean(axis=(0, 1, 2)), y.var(axis=(0, 1, 2))
      used[kind] = (mean, var)
    y = (y - mean) / jnp.sqrt(var + 1e-5) * bn["scale"] + bn["bias"]
    t = jnp.concatenate([x[:, :npre], y.reshape(b, -1, width)], axis=1)
    proj[kind] = heads(dense(p[f"proj_{kind}"], t))
  s = jnp.einsum("bnhd,bmhd->bhnm", proj["q"], proj["k"]) / math.sqrt(width)
  y = jnp.einsum("bhnm,bmhd->bnhd", jax.nn.softmax(s, axis=-1), proj["v"]).reshape(x.shape)
  return dense(p["proj"], y), used


# (grid, prefix tokens, stride_kv): K/V counts 1 + 2 * 3, 4 * 4, 2 + 3 * 3
CVT_CASES = [((3, 5), 1, 2), ((8, 8), 0, 2), ((3, 3), 2, 1)]


@pytest.mark.parametrize("case", range(len(CVT_CASES)))
def test_cvt_conv_proj_matches_its_definition(case):
  """Evaluation (random running statistics) and training (batch statistics, running ones
  updated with momentum 0.1), forward and gradients against the naive formula."""
  grid, npre, stride = CVT_CASES[case]
  x = tokens(grid, npre)
  ctx = AttnContext(grid=grid, num_prefix=npre)
  m = build("cvt_conv_proj", stride_kv=stride)
  r = jax.random.normal(jax.random.key(7), x.shape)

  @jax.jit
  def run(x):
    v = perturbed(m.init(jax.random.key(1), x, ctx))
    p, stats = v["params"], v["batch_stats"]
    stats = jax.tree.map(jnp.abs, stats)  # variances stay positive
    out = {}
    for train in (False, True):
      def fast(p_, x_):
        y, new = m.apply({"params": p_, "batch_stats": stats}, x_, ctx, deterministic=not train,
                         mutable=["batch_stats"])
        return y[0], new["batch_stats"]
      ref = lambda p_, x_: naive_cvt(p_, stats, x_, grid, npre, stride, train)  # noqa: E731
      (yf, new), (yr, used) = fast(p, x), ref(p, x)
      grads = [jax.grad(lambda p_, x_: (f(p_, x_)[0] * r).sum(), argnums=(0, 1))(p, x)
               for f in (fast, ref)]
      out[train] = (yf, yr, grads, new, used)
    return stats, out

  stats, out = run(x)
  for train, (yf, yr, grads, new, used) in out.items():
    close(yf, yr, atol=2e-5)
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
      scale = float(jnp.abs(b).max())
      if scale < 1e-4:  # gradient 0 up to rounding: a softmax ignores a shift shared by all
        assert float(jnp.abs(a).max()) < 1e-4  # keys (proj_k's bias; the k BatchNorm's bias
        continue                                # without prefix tokens)
      close(a, b, atol=1e-5 * scale + 1e-6, rtol=1e-4)
    for kind in "qkv":
      bn, old = new[f"conv_proj_{kind}"]["bn"], stats[f"conv_proj_{kind}"]["bn"]
      if train:
        close(bn["mean"], 0.9 * old["mean"] + 0.1 * used[kind][0], atol=1e-6)
        close(bn["var"], 0.9 * old["var"] + 0.1 * used[kind][1], atol=1e-5)
      else:
        close(bn["mean"], old["mean"], atol=0)


def test_cvt_conv_proj_special_cases():
  """An identity conv (centre tap 1) with an identity BatchNorm and stride 1 is multi-head
  attention with the official scale D^-1/2: mhsa whose query weights carry H^-1/2; K/V count
  ceil(h/2) ceil(w/2) (+ prefix) with the default stride 2."""
  grid, npre = (5, 7), 1
  x = tokens(grid, npre)
  ctx = AttnContext(grid=grid, num_prefix=npre)
  m = build("cvt_conv_proj", stride_kv=1)
  v = perturbed(init(m, x, ctx))
  p, stats = dict(v["params"]), dict(v["batch_stats"])
  centre = jnp.zeros((3, 3, 1, D)).at[1, 1].set(1.0)
  for kind in "qkv":
    p[f"conv_proj_{kind}"] = {"conv": {"kernel": centre},
                              "bn": {"scale": jnp.ones(D), "bias": jnp.zeros(D)}}
    stats[f"conv_proj_{kind}"] = {"bn": {"mean": jnp.zeros(D), "var": jnp.full(D, 1 - 1e-5)}}
  y = jitted(m)({"params": p, "batch_stats": stats}, x, ctx)[0]
  mhsa = attn_lib.build("mhsa", num_heads=H, dtype=jnp.float32)
  wq = p["proj_q"]["kernel"] * H ** -0.5
  qkv = {"kernel": jnp.concatenate([wq, p["proj_k"]["kernel"], p["proj_v"]["kernel"]], -1),
         "bias": jnp.concatenate([p["proj_q"]["bias"] * H ** -0.5, p["proj_k"]["bias"],
                                  p["proj_v"]["bias"]])}
  close(y, jitted(mhsa)({"params": {"qkv": qkv, "proj": p["proj"]}}, x)[0], atol=2e-5)
  strided = build("cvt_conv_proj")
  _, inter = strided.apply(v, x, ctx, capture_intermediates=True, mutable=["intermediates"])
  keys = inter["intermediates"]["proj_k"]["__call__"][0]
  assert keys.shape == (2, npre + 3 * 4, D)
  assert inter["intermediates"]["proj_q"]["__call__"][0].shape == x.shape
  # the fused softmax path (impl="xla") computes the same
  close(jitted(build("cvt_conv_proj", "xla"))(v, x, ctx)[0], jitted(strided)(v, x, ctx)[0],
        atol=2e-5)


def test_cvt_conv_proj_errors_are_one_line():
  x = tokens((4, 4), 1)
  ctx = AttnContext(grid=(4, 4), num_prefix=1)
  for opts, match in [(dict(kernel_size=2), "kernel_size=2, stride_kv=2; the kernel is an odd"),
                      (dict(stride_kv=0), "stride_kv=0")]:
    with pytest.raises(ValueError, match=match) as err:
      init(build("cvt_conv_proj", **opts), x, ctx)
    assert str(err.value).startswith("error: ") and "\n" not in str(err.value)
  with pytest.raises(ValueError, match="^error: cvt_conv_proj takes no key bias or mask"):
    init(build("cvt_conv_proj"), x, AttnContext(grid=(4, 4), valid=jnp.ones((2, 17), bool)))
  with pytest.raises(ValueError, match="^error: cvt_conv_proj has no qk_norm"):
    init(attn_lib.build("cvt_conv_proj", num_heads=H, dtype=jnp.float32, qk_norm=True), x, ctx)
  with pytest.raises(ValueError, match="^error: cvt_conv_proj needs the patch grid"):
    init(build("cvt_conv_proj"), x, AttnContext())
  assert attn_lib.get("cvt_conv_proj").caps.cls_probs == "none"

# ----------------------------------------------------------------------------- RMT MaSA
def rmt_rotations(patches, d):
  """[P, d, d] RMT's theta_shift written out as block-diagonal rotations: the channel pair
  (2i, 2i + 1) of the patch with raster index l turned by l * 10000^(-i / (d/2 - 1))."""
  half = d // 2
  theta = 10000.0 ** -(np.arange(half) / max(half - 1, 1))
  rot = np.zeros((patches, d, d))
  for l in range(patches):
    for i in range(half):
      c, s = np.cos(l * theta[i]), np.sin(l * theta[i])
      rot[l, 2 * i:2 * i + 2, 2 * i:2 * i + 2] = [[c, -s], [s, c]]
  return jnp.asarray(rot, jnp.float32)


def rmt_log_decay(grid, initial, span, axis=None):
  """[H, P, P] log of the decay gamma_h^dist by index, gamma_h = 1 - 2^(-a - r h / H); dist the
  Manhattan distance of the two patches (axis None), or |dx| (axis 1) / |dy| (axis 0) within a
  row / column, -inf between patches of different rows / columns."""
  r, c = coords(grid)
  p = len(r)
  out = np.zeros((H, p, p))
  for h in range(H):
    log_gamma = np.log(1 - 2.0 ** (-initial - span * h / H))
    for n in range(p):
      for m in range(p):
        if axis is None:
          out[h, n, m] = (abs(r[n] - r[m]) + abs(c[n] - c[m])) * log_gamma
        elif axis == 1:
          out[h, n, m] = abs(c[n] - c[m]) * log_gamma if r[n] == r[m] else -np.inf
        else:
          out[h, n, m] = abs(r[n] - r[m]) * log_gamma if c[n] == c[m] else -np.inf
  return jnp.asarray(out, jnp.float32)


def naive_rmt(p, x, grid, npre, form="full", initial=2.0, span=None, rotate=True):
  """MaSA from its definition on the patches: q and k rotated by explicit matrices, a dense
  softmax of q k^T / sqrt(d) + log decay (the full Manhattan mask; or two explicit per-axis
  attentions over all patches, along the row first, then along the column on its result), plus
  the 5 x 5 depthwise conv of the values with its bias; prefix rows plain softmax over all."""
  span = {"full": 6.0, "decomposed": 4.0}[form] if span is None else span
  b, n, width = x.shape
  q, k, v = (heads(t) for t in jnp.split(dense(p["qkv"], x), 3, axis=-1))
  d = width // H
  qp, kp, vp = q[:, npre:], k[:, npre:], v[:, npre:]
  if rotate:
    rot = rmt_rotations(grid[0] * grid[1], d)
    qp, kp = (jnp.einsum("lde,blhe->blhd", rot, t) for t in (qp, kp))

  def softmax_attend(vals, log_decay):
    s = jnp.einsum("bnhd,bmhd->bhnm", qp, kp) / math.sqrt(d) + log_decay
    return jnp.einsum("bhnm,bmhd->bnhd", jax.nn.softmax(s, axis=-1), vals)

  if form == "full":
    y = softmax_attend(vp, rmt_log_decay(grid, initial, span))
  else:
    y = softmax_attend(vp, rmt_log_decay(grid, initial, span, axis=1))
    y = softmax_attend(y, rmt_log_decay(grid, initial, span, axis=0))
  lce = naive_dwconv(vp.reshape(b, *grid, width), p["lepe"]["kernel"], 1) + p["lepe"]["bias"]
  y = y.reshape(b, -1, width) + lce.reshape(b, -1, width)
  s = jnp.einsum("bnhd,bmhd->bhnm", q[:, :npre], k) / math.sqrt(d)
  pre = jnp.einsum("bhnm,bmhd->bnhd", jax.nn.softmax(s, axis=-1), v).reshape(b, npre, width)
  return dense(p["proj"], jnp.concatenate([pre, y], axis=1))


# (grid, prefix tokens, options)
RMT_CASES = [((3, 5), 1, dict(form="full")),
             ((4, 3), 2, dict(form="decomposed", initial_value=1.0, heads_range=3.0))]


@pytest.mark.parametrize("case", range(len(RMT_CASES)))
def test_rmt_decay_matches_its_definition(case):
  grid, npre, opts = RMT_CASES[case]
  x = tokens(grid, npre)
  ctx = AttnContext(grid=grid, num_prefix=npre, cls_index=0 if npre else None)
  m = build("rmt_decay", **opts)
  kw = dict(form=opts["form"], initial=opts.get("initial_value", 2.0),
            span=opts.get("heads_range"))
  p = compare(m, lambda p_, x_: naive_rmt(p_, x_, grid, npre, **kw), x, ctx)
  assert set(p["params"]) == {"qkv", "proj", "lepe"}
  assert p["params"]["lepe"]["kernel"].shape == (5, 5, 1, D)  # the official 5 x 5 LCE


def test_rmt_decay_special_cases():
  """The official per-head decay; symmetric masks with a zero log diagonal; gamma = 1 without
  rotation (full form) is mhsa plus the LCE; on a 1 x w grid the decomposed form is the full one;
  the [CLS] row is plain softmax over every token."""
  from vitjax.attention import rmt_decay  # pylint: disable=import-outside-toplevel
  gamma = np.exp(rmt_decay.log_decay(4, 2.0, 4.0))
  close(gamma, [1 - 2.0 ** -2, 1 - 2.0 ** -3, 1 - 2.0 ** -4, 1 - 2.0 ** -5], atol=1e-7)
  close(np.exp(rmt_decay.log_decay(3, np.inf, 6.0)), 1.0, atol=0)
  for mask in (rmt_decay.manhattan((3, 5)), rmt_decay.distance(6)):
    close(mask, mask.T, atol=0)
    close(np.diag(mask), 0.0, atol=0)
  close(rmt_decay.log_decay(H, 2.0, 6.0)[:, None, None] * rmt_decay.manhattan((3, 5)),
        rmt_log_decay((3, 5), 2.0, 6.0), atol=1e-6)

  grid = (4, 4)
  plain = build("rmt_decay", initial_value=float("inf"), rotate=False)
  mhsa = attn_lib.build("mhsa", num_heads=H, dtype=jnp.float32)
  for npre in (0, 1):  # patches do not see the prefix: all of y without one, its row with one
    x = tokens(grid, npre)
    ctx = AttnContext(grid=grid, num_prefix=npre, cls_index=0 if npre else None)
    need = ("cls_probs",) if npre else ()
    p = perturbed(init(plain, x, ctx))
    y, aux = jitted(plain)(p, x, ctx, need=need)
    pm = {"params": {"qkv": p["params"]["qkv"], "proj": p["params"]["proj"]}}
    ym, auxm = jitted(mhsa)(pm, x, ctx, need=need)
    if npre:
      close(y[:, 0], ym[:, 0], atol=2e-5)
      close(aux["cls_probs"], auxm["cls_probs"], atol=1e-6)
      continue
    v = dense(p["params"]["qkv"], x)[..., 2 * D:]
    lce = naive_dwconv(v.reshape(2, *grid, D), p["params"]["lepe"]["kernel"], 1)
    lce = (lce + p["params"]["lepe"]["bias"]).reshape(x.shape) @ p["params"]["proj"]["kernel"]
    close(y, ym + lce, atol=2e-5)

  grid = (1, 6)
  x = tokens(grid, 1)
  ctx = AttnContext(grid=grid, num_prefix=1)
  full, chunk = build("rmt_decay", heads_range=4.0), build("rmt_decay", form="decomposed")
  p = perturbed(init(full, x, ctx))
  close(jitted(full)(p, x, ctx)[0], jitted(chunk)(p, x, ctx)[0], atol=2e-5)


def test_rmt_decay_errors_are_one_line():
  x = tokens((4, 4), 1)
  ctx = AttnContext(grid=(4, 4), num_prefix=1)
  for opts, match in [(dict(form="chunk"), "form 'chunk'; valid: full, decomposed"),
                      (dict(initial_value=0.0), "needs a > 0"),
                      (dict(heads_range=-1.0), "needs a > 0 and r >= 0")]:
    with pytest.raises(ValueError, match=match) as err:
      init(build("rmt_decay", **opts), x, ctx)
    assert str(err.value).startswith("error: ") and "\n" not in str(err.value)
  with pytest.raises(ValueError, match="^error: rmt_decay takes no key bias or mask"):
    init(build("rmt_decay"), x, ctx.replace(valid=jnp.ones((2, 17), bool)))
  with pytest.raises(ValueError, match="^error: rmt_decay has no qk_norm"):
    init(attn_lib.build("rmt_decay", num_heads=H, dtype=jnp.float32, qk_norm=True), x, ctx)
  with pytest.raises(ValueError, match="^error: rmt_decay rotates channel pairs"):
    init(attn_lib.build("rmt_decay", num_heads=32, dtype=jnp.float32), x, ctx)
  init(attn_lib.build(dict(name="rmt_decay", rotate=False), num_heads=32, dtype=jnp.float32), x,
       ctx)
  with pytest.raises(ValueError, match="^error: RMTDecay needs the patch grid"):
    init(build("rmt_decay"), x, AttnContext())


# ----------------------------------------------------------------------------- BiFormer
def biformer_padded(x, grid, npre, n_win):
  """Tokens with the patch grid zero-padded at the bottom and right to multiples of n_win (the
  official auto_pad), and that padded grid; numpy in, numpy out."""
  xp = np if isinstance(x, np.ndarray) else jnp
  full = tuple(-(-g // n_win) * n_win for g in grid)
  img = x[:, npre:].reshape(x.shape[0], *grid, x.shape[-1])
  img = xp.pad(img, [(0, 0), (0, full[0] - grid[0]), (0, full[1] - grid[1]), (0, 0)])
  return xp.concatenate([x[:, :npre], img.reshape(x.shape[0], -1, x.shape[-1])], 1), full


def biformer_routes(p, x, grid, npre, n_win, topk, qk):
  """NumPy (float64) routing: the region of every padded patch [P] and the top-k regions of each
  region by the affinity of the region means of q and k [B, R, k]. Asserts that the k-th and
  (k+1)-th affinities are apart (no near-tie that float32 could flip)."""
  t, full = biformer_padded(np.asarray(x, np.float64), grid, npre, n_win)
  qkv = t[:, npre:] @ np.asarray(p["qkv"]["kernel"], np.float64) + np.asarray(p["qkv"]["bias"])
  r, c = coords(full)
  region = (r // (full[0] // n_win)) * n_win + c // (full[1] // n_win)
  mean = (region[None] == np.arange(n_win ** 2)[:, None]) / (region == 0).sum()   # [R, P]
  means = np.einsum("rp,bpc->brc", mean, qkv)
  affinity = np.einsum("brc,bsc->brs", means[..., :qk], means[..., qk:2 * qk])
  order = np.argsort(-affinity, axis=-1, kind="stable")
  if topk < n_win ** 2:
    ranked = np.take_along_axis(affinity, order, -1)
    assert np.abs(ranked[..., topk - 1] - ranked[..., topk]).min() > 1e-4
  return region, order[..., :topk]


def naive_biformer(p, x, grid, npre, n_win, routes, qk):
  """Bi-level routing attention from its definition, as global attention with an explicit
  allowed-pairs mask: padded patch p sees patch p' iff the region of p' is one of the routed
  regions of p's region; logits scaled by the full width qk^-1/2; + the LCE (a depthwise conv of
  v by shifted sums, + its bias); padding cut off; a prefix query sees every real token.
  Returns (y, the prefix rows' weights [B, H, prefix, N])."""
  b, n, width = x.shape
  region, top = routes
  t, full = biformer_padded(x, grid, npre, n_win)
  q, k, v = jnp.split(dense(p["qkv"], t), [qk, 2 * qk], -1)
  allowed = (region[None, None, :, None] == top[:, region][:, :, None, :]).any(-1)  # [B, P, P]
  hd = lambda a: a.reshape(b, a.shape[1], H, a.shape[-1] // H)  # noqa: E731
  s = jnp.einsum("bnhd,bmhd->bhnm", hd(q[:, npre:]), hd(k[:, npre:])) / math.sqrt(qk)
  w = jax.nn.softmax(jnp.where(jnp.asarray(allowed)[:, None], s, -jnp.inf), axis=-1)
  y = jnp.einsum("bhnm,bmhd->bnhd", w, hd(v[:, npre:])).reshape(b, *full, width)
  if "lepe" in p:
    y = y + naive_dwconv(v[:, npre:].reshape(b, *full, width), p["lepe"]["kernel"], 1)
    y = y + p["lepe"]["bias"]
  y = y[:, :grid[0], :grid[1]].reshape(b, -1, width)
  rows, cols = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij")
  keep = np.concatenate([np.arange(npre), npre + (rows * full[1] + cols).ravel()])
  s = jnp.einsum("bnhd,bmhd->bhnm", hd(q[:, :npre]), hd(k[:, keep])) / math.sqrt(qk)
  row = jax.nn.softmax(s, axis=-1)
  pre = jnp.einsum("bhnm,bmhd->bnhd", row, hd(v[:, keep])).reshape(b, npre, width)
  return dense(p["wo"], jnp.concatenate([pre, y], 1)), row


# (grid, prefix tokens, options, the regions per side, topk, qk_dim)
BIFORMER_CASES = [
    ((4, 4), 1, dict(), 7, 4, D),                              # defaults: 4x4 padded to 7x7
    ((6, 6), 0, dict(n_win=3, topk=2, side_dwconv=3), 3, 2, D),     # no padding
    ((5, 7), 2, dict(n_win=2, topk=3, qk_dim=16, side_dwconv=3), 2, 3, 16),  # padded to 6x8
]


def biformer_case(case, impl="reference"):
  """(module, context, tokens, perturbed variables, NumPy routes) of a case."""
  grid, npre, opts, n_win, topk, qk = BIFORMER_CASES[case]
  x = tokens(grid, npre, seed=case)
  ctx = AttnContext(grid=grid, num_prefix=npre)
  m = build("biformer", impl, **opts)
  v = perturbed(init(m, x, ctx))
  return m, ctx, x, v, biformer_routes(v["params"], x, grid, npre, n_win, topk, qk)


@pytest.mark.parametrize("case,impl", [(0, "reference"), (1, "xla"), (2, "reference")])
def test_biformer_matches_routed_global_attention(case, impl):
  """Forward, the [CLS] row and gradients (input and every parameter) against the masked global
  reference whose routing is a constant computed in NumPy: the gradients agree only if none flows
  through the routing. The routed regions equal NumPy's top-k as sets."""
  m, ctx, x, v, routes = biformer_case(case, impl)
  grid, npre, _, n_win, _, qk = BIFORMER_CASES[case]
  ref = lambda p_, x_: naive_biformer(p_["params"], x_, grid, npre, n_win, routes, qk)[0]  # noqa
  fast = lambda p_, x_: m.apply(p_, x_, ctx)[0]  # noqa: E731
  r = jax.random.normal(jax.random.key(7), x.shape)

  @jax.jit
  def run(v, x):
    (y, aux), inter = m.apply(v, x, ctx, need=("cls_probs",) if npre else (),
                              mutable=["intermediates"])
    grads = [jax.grad(lambda p_, x_: (f(p_, x_) * r).sum(), argnums=(0, 1))(v, x)
             for f in (fast, ref)]
    want = naive_biformer(v["params"], x, grid, npre, n_win, routes, qk)
    return y, aux, inter["intermediates"]["routing"][0], want, grads

  y, aux, idx, (want, row), grads = run(v, x)
  close(y, want, atol=2e-5)
  assert (np.sort(np.asarray(idx), -1) == np.sort(routes[1], -1)).all()
  if npre:
    close(aux["cls_probs"], row[:, :, 0].mean(1), atol=1e-6)
  for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
    close(a, b, atol=1e-5 * float(jnp.abs(b).max()) + 1e-6, rtol=1e-4)


def biformer_reference_case():
  test_biformer_matches_routed_global_attention(0, "reference")


def test_biformer_all_regions_is_global_attention_plus_lce():
  """topk = n_win^2 routes every region to every region: multi-head attention with the official
  scale qk_dim^-1/2 (mhsa whose query weights carry H^-1/2), plus W_o of the LCE."""
  grid = (6, 4)
  x = tokens(grid, 0)
  ctx = AttnContext(grid=grid, num_prefix=0)
  m = build("biformer", n_win=2, topk=4)
  v = perturbed(init(m, x, ctx))
  p = v["params"]
  y = jitted(m)(v, x, ctx)[0]
  no_lce = jax.tree.map(jnp.zeros_like, p["lepe"])
  y_plain = jitted(m)({"params": dict(p, lepe=no_lce)}, x, ctx)[0]
  mhsa = attn_lib.build("mhsa", num_heads=H, dtype=jnp.float32)
  wq = H ** -0.5
  qkv = {"kernel": p["qkv"]["kernel"].at[:, :D].multiply(wq),
         "bias": p["qkv"]["bias"].at[:D].multiply(wq)}
  close(y_plain, jitted(mhsa)({"params": {"qkv": qkv, "proj": p["wo"]}}, x)[0], atol=2e-5)
  vals = dense(p["qkv"], x)[..., 2 * D:].reshape(2, *grid, D)
  lce = naive_dwconv(vals, p["lepe"]["kernel"], 1) + p["lepe"]["bias"]
  close(y - y_plain, lce.reshape(2, -1, D) @ p["wo"]["kernel"], atol=2e-5)
  # side_dwconv=0 has no LCE at all, as the official module
  bare = build("biformer", n_win=2, topk=4, side_dwconv=0)
  q = dict(p)
  del q["lepe"]
  assert set(init(bare, x, ctx)["params"]) == {"qkv", "wo"}
  close(jitted(bare)({"params": q}, x, ctx)[0], y_plain, atol=1e-6)


def test_biformer_bf16():
  """bf16 activations: bf16 out, softmax and routing affinity in float32; every region routed to
  every region (topk = n_win^2), so no near-tie can flip a route between the two precisions."""
  grid = (4, 4)
  x = tokens(grid, 1)
  ctx = AttnContext(grid=grid, num_prefix=1)
  m = build("biformer", n_win=2, topk=4)
  p = init(m, x, ctx)
  y0 = jitted(m)(p, x, ctx)[0]
  mb = attn_lib.build(dict(name="biformer", n_win=2, topk=4), num_heads=H, dtype=jnp.bfloat16)
  yb, aux = jitted(mb)(p, x.astype(jnp.bfloat16), ctx, need=("cls_probs",))
  assert yb.dtype == jnp.bfloat16 and aux["cls_probs"].dtype == jnp.float32
  close(np.asarray(yb, np.float32), y0, atol=0.1, rtol=0.1)


def test_biformer_errors_are_one_line():
  x = tokens((4, 4), 1)
  ctx = AttnContext(grid=(4, 4), num_prefix=1)
  for opts, match in [(dict(topk=50), "n_win=7, topk=50; n_win is >= 1 and topk in"),
                      (dict(side_dwconv=4), "side_dwconv=4; the LCE kernel is odd"),
                      (dict(n_win=3, auto_pad=False), "n_win 3 does not divide the 4x4 grid; "
                       "use auto_pad=True"),
                      (dict(qk_dim=15), "qk_dim 15 and width 32 must both divide"),
                      (dict(qk_dim=16, impl="xla"), "impl 'xla' needs qk_dim equal to the width")]:
    with pytest.raises(ValueError, match=match) as err:
      init(build("biformer", **opts), x, ctx)
    assert str(err.value).startswith("error: ") and "\n" not in str(err.value)
  with pytest.raises(ValueError, match="^error: biformer takes no key bias or mask"):
    init(build("biformer"), x, ctx.replace(valid=jnp.ones((2, 17), bool)))
  with pytest.raises(ValueError, match="^error: biformer has no qk_norm"):
    init(attn_lib.build("biformer", num_heads=H, dtype=jnp.float32, qk_norm=True), x, ctx)
  with pytest.raises(ValueError, match="needs the patch grid"):
    init(build("biformer"), x, AttnContext())
  # a grid n_win divides takes no padding either way
  even = build("biformer", n_win=2, topk=2, auto_pad=False)
  v = init(even, x, ctx)
  close(jitted(even)(v, x, ctx)[0], jitted(build("biformer", n_win=2, topk=2))(v, x, ctx)[0],
        atol=0)


# ----------------------------------------------------------------------------- DAT deformable
def tent(pts, size):
  """[..., 2] pixel (row, col) -> [..., size_h * size_w] bilinear weights of every grid pixel:
  relu(1 - |y - r|) relu(1 - |x - c|), the four-corner formula; a corner off the grid has no pixel
  and so weighs nothing (zeros padding)."""
  r, c = coords(size)
  wy = jax.nn.relu(1 - jnp.abs(pts[..., 0:1] - r))
  wx = jax.nn.relu(1 - jnp.abs(pts[..., 1:2] - c))
  return wy * wx


def aligned(pos, size):
  """Normalised [-1, 1] -> pixels, align_corners=True (-1 and 1 the first and last centres)."""
  return (pos + 1) / 2 * jnp.asarray([size[0] - 1, size[1] - 1], jnp.float32)


def centres(size):
  """DAT's reference points (i + 1/2) / n * 2 - 1, [n_h * n_w, 2]."""
  r, c = np.meshgrid((np.arange(size[0]) + 0.5) / size[0] * 2 - 1,
                     (np.arange(size[1]) + 0.5) / size[1] * 2 - 1, indexing="ij")
  return jnp.asarray(np.stack([r.ravel(), c.ravel()], -1), jnp.float32)


def naive_offsets(p, q_img, ksize, stride):
  """The offset network written out: depthwise conv + bias, LayerNorm over the channels (eps
  1e-5), exact GELU, 1x1 conv to (rows, cols) without bias."""
  t = naive_dwconv(q_img, p["dwconv"]["kernel"], stride) + p["dwconv"]["bias"]
  mu, var = t.mean(-1, keepdims=True), t.var(-1, keepdims=True)
  t = (t - mu) / jnp.sqrt(var + 1e-5) * p["norm"]["scale"] + p["norm"]["bias"]
  t = 0.5 * t * (1 + jax.scipy.special.erf(t / math.sqrt(2)))
  return t @ p["proj"]["kernel"]


def naive_deformable(p, x, grid, npre, groups, stride=1, ksize=5, factor=2.0, pe="table",
                     zero_offsets=False):
  """DAT's deformable attention from its definition, per offset group; returns (y, the [CLS]
  row [B, H, N]). pe: "table" (the bias sampled at (q_centre - pos) / 2), "dwc", "fixed", None."""
  b, n, width = x.shape
  d, cg, hg = width // H, width // groups, H // groups
  q = dense(p["proj_q"], x)
  q_img, x_img = (t[:, npre:].reshape(b, *grid, width) for t in (q, x))
  keys, biases = [], []
  for g in range(groups):
    ch = slice(g * cg, (g + 1) * cg)
    if zero_offsets:
      size = tuple(-(-s // stride) for s in grid)
      pos = jnp.broadcast_to(centres(size), (b, size[0] * size[1], 2))
    else:
      theta = naive_offsets(p["conv_offset"], q_img[..., ch], ksize, stride)
      size = theta.shape[1:3]
      theta = theta.reshape(b, -1, 2)
      if factor > 0:
        theta = jnp.tanh(theta) * jnp.asarray([1 / size[0], 1 / size[1]]) * factor
      pos = theta + centres(size) if factor >= 0 else jnp.tanh(theta + centres(size))
    interp = tent(aligned(pos, grid), grid)                         # [B, Ns, hw]
    keys.append(jnp.einsum("bmp,bpc->bmc", interp, x_img[..., ch].reshape(b, -1, cg)))
    if pe == "table":
      disp = (centres(grid)[None, :, None] - pos[:, None]) / 2      # [B, hw, Ns, 2]
      tsize = (2 * grid[0] - 1, 2 * grid[1] - 1)
      table = p["rpe_table"][g * hg:(g + 1) * hg].reshape(hg, -1)
      biases.append(jnp.einsum("bqmt,ht->bhqm", tent(aligned(disp, tsize), tsize), table))
  sampled = jnp.concatenate(keys, -1)
  qh = heads(q)
  k, v = heads(dense(p["proj_k"], sampled)), heads(dense(p["proj_v"], sampled))
  s = jnp.einsum("bnhd,bmhd->bhnm", qh[:, npre:], k) / math.sqrt(d)
  if pe == "table":
    s = s + jnp.concatenate(biases, 1)
  if pe == "fixed":
    s = s + p["rpe_table"]
  y = jnp.einsum("bhnm,bmhd->bnhd", jax.nn.softmax(s, -1), v)
  if pe == "dwc":
    lepe = naive_dwconv(q_img, p["rpe_table"]["kernel"], 1) + p["rpe_table"]["bias"]
    y = y + heads(lepe.reshape(b, -1, width))
  ka, va = heads(dense(p["proj_k"], x)), heads(dense(p["proj_v"], x))
  w = jax.nn.softmax(jnp.einsum("bnhd,bmhd->bhnm", qh[:, :npre], ka) / math.sqrt(d), -1)
  y = jnp.concatenate([jnp.einsum("bhnm,bmhd->bnhd", w, va), y], 1).reshape(b, n, width)
  return dense(p["proj_out"], y), w


# (grid, prefix tokens, options, the naive's keyword arguments)
DAT_CASES = [
    ((4, 4), 1, dict(), dict(groups=1)),                                      # defaults
    ((5, 6), 0, dict(stride=2, ksize=3, n_groups=2), dict(groups=2, stride=2, ksize=3)),
    ((4, 4), 2, dict(dwc_pe=True, offset_range_factor=-1.0, ksize=3),
     dict(groups=1, ksize=3, factor=-1.0, pe="dwc")),
    ((4, 5), 1, dict(fixed_pe=True, stride=2, n_groups=2, offset_range_factor=0.0),
     dict(groups=2, stride=2, factor=0.0, pe="fixed")),
]


@pytest.mark.parametrize("case", range(len(DAT_CASES)))
def test_deformable_matches_its_definition(case):
  """Forward and gradients (the offset network's included) against the naive formula."""
  grid, npre, opts, naive = DAT_CASES[case]
  x = tokens(grid, npre)
  ctx = AttnContext(grid=grid, num_prefix=npre)
  m = build("deformable", **opts)
  ref = lambda p_, x_: naive_deformable(p_, x_, grid, npre, **naive)[0]  # noqa: E731
  # gradients in one case (they compile slowly): strided, two groups, off-grid samples
  p = compare(m, ref, x, ctx, grads=case == 1, grad_floor=1e-5)
  if case == 0:
    @jax.jit
    def run(p):
      # the offsets matter (so the gradients compared into the offset network are not all 0)
      moved = jax.tree.map(lambda t: t, p)
      moved["params"]["conv_offset"]["proj"]["kernel"] = 2 * p["params"]["conv_offset"]["proj"][
          "kernel"]
      y, aux = m.apply(p, x, ctx, need=("cls_probs_per_head",))
      row = naive_deformable(p["params"], x, grid, npre, 1)[1]
      return jnp.abs(m.apply(moved, x, ctx)[0] - y).max(), aux["cls_probs_per_head"], row

    change, row, naive_row = run(p)
    assert float(change) > 1e-3
    close(row, naive_row[:, :, 0], atol=1e-6)


def test_deformable_sampler_is_map_coordinates():
  """The gather sampler against jax.scipy.ndimage.map_coordinates(order=1, mode="constant"),
  values and gradients, with points off the grid; grid_sample's align_corners=True mapping."""
  from vitjax.attention import deformable
  img = jax.random.normal(jax.random.key(0), (2, 5, 6, 3))
  pts = jax.random.uniform(jax.random.key(1), (2, 40, 2), minval=-1.5, maxval=6.5)
  pos = jax.random.uniform(jax.random.key(3), (2, 7, 2), minval=-1.2, maxval=1.2)
  r = jax.random.normal(jax.random.key(2), (2, 40, 3))

  def mapped(img, pts):
    one = lambda im, pt: jax.scipy.ndimage.map_coordinates(im, [pt[:, 0], pt[:, 1]], order=1,
                                                          mode="constant", cval=0.0)  # noqa
    return jax.vmap(jax.vmap(one, (2, None), 1))(img, pts)

  @jax.jit
  def run():
    out = [(deformable.sample_bilinear(img, pts), mapped(img, pts))]
    for argnum in (0, 1):
      out.append(tuple(jax.grad(lambda i, t: (f(i, t) * r).sum(), argnums=argnum)(img, pts)
                       for f in (deformable.sample_bilinear, mapped)))
    out.append((deformable.grid_sample(img, pos), mapped(img, aligned(pos, (5, 6)))))
    corners = jnp.asarray([[[-1.0, -1.0], [1.0, 1.0]]] * 2)  # the corner pixels' centres
    out.append((deformable.grid_sample(img, corners), jnp.stack([img[:, 0, 0], img[:, -1, -1]], 1)))
    return out

  for ours, theirs in run():
    close(ours, theirs, atol=1e-5)
  ref = deformable.reference_points((4, 2))  # the centres (i + 1/2) / n * 2 - 1
  np.testing.assert_allclose(ref[:, 0, 0], [-0.75, -0.25, 0.25, 0.75], atol=1e-7)
  np.testing.assert_allclose(ref[0, :, 1], [-0.5, 0.5], atol=1e-7)


def test_deformable_zero_offsets():
  """A zero last offset conv makes the keys the bilinear samples at DAT's reference points:
  no_off's output, and (without the bias) attention over proj_k / proj_v of A x, where A
  interpolates at the pixels (i + 1/2)(h - 1)/h, not the grid itself (align_corners=True)."""
  grid, npre = (4, 4), 1
  x = tokens(grid, npre)
  ctx = AttnContext(grid=grid, num_prefix=npre)
  m, off = build("deformable", use_pe=False), build("deformable", use_pe=False, no_off=True)
  pix = (np.arange(4) + 0.5) * 3 / 4                   # 0.375, 1.125, 1.875, 2.625
  a1 = np.maximum(0, 1 - np.abs(pix[:, None] - np.arange(4)[None]))   # [4, 4] per axis
  interp = jnp.asarray(np.kron(a1, a1), jnp.float32)

  @jax.jit
  def run(x):
    p = perturbed(m.init(jax.random.key(1), x, ctx))
    p["params"]["conv_offset"]["proj"]["kernel"] = jnp.zeros((D, 2))
    pp = p["params"]
    y = m.apply(p, x, ctx)[0]
    y_off = off.apply({"params": {k: v for k, v in pp.items() if k != "conv_offset"}}, x, ctx)[0]
    sampled = jnp.einsum("mp,bpc->bmc", interp, x[:, npre:])
    k, v = heads(dense(pp["proj_k"], sampled)), heads(dense(pp["proj_v"], sampled))
    q = heads(dense(pp["proj_q"], x))
    s = jnp.einsum("bnhd,bmhd->bhnm", q[:, npre:], k) / math.sqrt(D // H)
    yp = jnp.einsum("bhnm,bmhd->bnhd", jax.nn.softmax(s, -1), v).reshape(2, -1, D)
    # the [CLS] row: every token, unsampled, no bias
    ka, va = heads(dense(pp["proj_k"], x)), heads(dense(pp["proj_v"], x))
    w = jax.nn.softmax(jnp.einsum("bhd,bmhd->bhm", q[:, 0], ka) / math.sqrt(D // H), -1)
    yc = jnp.einsum("bhm,bmhd->bhd", w, va).reshape(2, 1, D)
    return y, y_off, dense(pp["proj_out"], jnp.concatenate([yc, yp], 1))

  y, y_off, y_ref = run(x)
  close(y, y_off, atol=1e-6)
  close(y, y_ref, atol=1e-5)


def test_deformable_official_shapes():
  """Keys ceil(h/r) ceil(w/r), the offset field on that grid, the table [H, 2h - 1, 2w - 1];
  DAT-T's four heads per group (abstract shapes, nothing compiled)."""
  from vitjax.attention import deformable
  grid, npre = (6, 5), 1
  x = tokens(grid, npre)
  ctx = AttnContext(grid=grid, num_prefix=npre)
  m = build("deformable", stride=2, ksize=3)
  v = jax.eval_shape(lambda: m.init(jax.random.key(1), x, ctx))
  assert v["params"]["rpe_table"].shape == (H, 11, 9)
  _, inter = jax.eval_shape(lambda v_: m.apply(v_, x, ctx, capture_intermediates=True,
                                               mutable=["intermediates"]), v)
  keys = inter["intermediates"]["proj_k"]["__call__"]  # the samples, then every token ([CLS] row)
  assert keys[0].shape == (2, 3 * 3, D) and keys[1].shape == (2, npre + 6 * 5, D)
  assert inter["intermediates"]["conv_offset"]["__call__"][0].shape == (2, 3, 3, 2)
  assert deformable.default_groups(12, None) == 3 and deformable.default_groups(24, None) == 6
  assert deformable.default_groups(2, None) == 1 and deformable.default_groups(6, 2) == 2


def test_deformable_bf16():
  grid = (4, 4)
  x = tokens(grid, 1)
  ctx = AttnContext(grid=grid, num_prefix=1)
  m = build("deformable", stride=2)
  mb = attn_lib.build(dict(name="deformable", stride=2), num_heads=H, dtype=jnp.bfloat16)

  @jax.jit
  def run(x):
    p = perturbed(m.init(jax.random.key(1), x, ctx))
    return m.apply(p, x, ctx)[0], mb.apply(p, x.astype(jnp.bfloat16), ctx, need=("cls_probs",))

  y0, (yb, auxb) = run(x)
  assert yb.dtype == jnp.bfloat16
  close(np.asarray(yb, np.float32), y0, atol=0.1, rtol=0.1)
  assert np.isfinite(np.asarray(auxb["cls_probs"])).all()


def test_deformable_errors_are_one_line():
  x = tokens((4, 4), 1)
  ctx = AttnContext(grid=(4, 4), num_prefix=1)
  for opts, match in [(dict(ksize=4), "ksize=4, stride=1; the kernel is an odd"),
                      (dict(stride=0), "stride=0"), (dict(n_groups=3), "n_groups=3 with 2 heads")]:
    with pytest.raises(ValueError, match=match) as err:
      init(build("deformable", **opts), x, ctx)
    assert str(err.value).startswith("error: ") and "\n" not in str(err.value)
  with pytest.raises(ValueError, match="^error: deformable takes no key bias or mask"):
    init(build("deformable"), x, AttnContext(grid=(4, 4), valid=jnp.ones((2, 17), bool)))
  with pytest.raises(ValueError, match="^error: deformable has no qk_norm"):
    init(attn_lib.build("deformable", num_heads=H, dtype=jnp.float32, qk_norm=True), x, ctx)
  with pytest.raises(ValueError, match="needs the patch grid"):
    init(build("deformable"), x, AttnContext())


REFERENCE_CASES = {"window": window_reference_case, "shifted_window": window_reference_case,
                   "twins_lsa": test_windows_without_bias_match_masked_global_attention,
                   "davit_window": test_windows_without_bias_match_masked_global_attention,
                   "hilo": test_hilo_matches_its_definition,
                   "gpsa": test_gpsa_matches_its_definition,
                   "neighborhood": neighborhood_reference_case,
                   "dilated_neighborhood": test_neighborhood_matches_masked_global_attention,
                   "maxvit_block": test_maxvit_matches_masked_global_attention,
                   "maxvit_grid": test_maxvit_matches_masked_global_attention,
                   "mvit_pool": test_mvit_pool_matches_its_definition,
                   "gcvit_global": gcvit_reference_case,
                   "cvt_conv_proj": test_cvt_conv_proj_matches_its_definition,
                   "rmt_decay": test_rmt_decay_matches_its_definition,
                   "biformer": biformer_reference_case,
                   "deformable": test_deformable_matches_its_definition}
