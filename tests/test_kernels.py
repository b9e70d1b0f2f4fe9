"""Pallas kernels (vitjax/kernels) against plain-XLA formulas written here.

On CPU the kernels run in interpret mode: the TPU kernel through the generic interpreter (the
default backend), once through the TPU interpreter (`pltpu.force_tpu_interpret_mode`, which also
simulates VMEM and the grid), and the GPU (Triton) kernel body through the generic interpreter.
The GPU lowering itself is checked by lowering for CUDA (Triton IR), which needs no GPU.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from vitjax import attention, models
from vitjax.attention.base import AttnContext
from vitjax.kernels import flash_attention as fa
from vitjax.kernels import flash_sigmoid as fs


# ------------------------------------------------------------------ references (naive formulas)
def softmax_reference(q, k, v, bias=None):
  """Materialised softmax attention in float32: (y [B,N,H,d], lse [B,H,N], p [B,H,N,M])."""
  q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  s = jnp.einsum("bnhd,bmhd->bhnm", q, k) / np.sqrt(q.shape[-1])
  if bias is not None:
    s = s + bias
  lse = jax.nn.logsumexp(s, axis=-1)
  p = jnp.exp(s - lse[..., None])
  return jnp.einsum("bhnm,bmhd->bnhd", p, v), lse, p


def sigmoid_reference(q, k, v, bias=None, key_weight=None):
  """sum_j w_j sigma(s_ij + bias_j - log n) v_j, n = sum of weights of unmasked keys."""
  b, m = k.shape[:2]
  s = jnp.einsum("bnhd,bmhd->bhnm", q, k) / np.sqrt(q.shape[-1])
  w = jnp.ones((b, m)) if key_weight is None else key_weight
  valid = jnp.ones((b, m), bool) if bias is None else ~jnp.isneginf(bias[:, 0, 0])
  offset = -jnp.log(jnp.where(valid, w, 0.0).sum(-1))
  if bias is not None:
    s = s + bias
  p = jax.nn.sigmoid(s + offset[:, None, None, None]) * w[:, None, None, :]
  return jnp.einsum("bhnm,bmhd->bnhd", p, v)


def inputs(b, nq, nk, h, d, dtype=jnp.float32, seed=0, bias=True):
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = jax.random.normal(ks[0], (b, nq, h, d)).astype(dtype)
  k = jax.random.normal(ks[1], (b, nk, h, d)).astype(dtype)
  v = jax.random.normal(ks[2], (b, nk, h, d)).astype(dtype)
  bb = None
  if bias:  # ToMe-like log-sizes, one masked key per example
    bb = jnp.log(jax.random.uniform(ks[3], (b, 1, 1, nk), minval=1.0, maxval=4.0))
    bb = bb.at[0, :, :, 3].set(-jnp.inf).at[1, :, :, nk - 1].set(-jnp.inf)
  return q, k, v, bb


def cotangents(shape, n_lse, seed=1):
  ks = jax.random.split(jax.random.PRNGKey(seed), 2)
  return jax.random.normal(ks[0], shape), jax.random.normal(ks[1], n_lse)


def close(got, want, tol):
  """Max-abs error within tol, relative to max(1, |want|max) (bias grads sum over H and N)."""
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  scale = max(1.0, float(np.abs(want).max()))
  err = float(np.abs(got - want).max())
  assert err <= tol * scale, f"max abs error {err:.3g} > {tol:.1g} x {scale:.3g}"


# ------------------------------------------------------------------ softmax: values and gradients
CASES = [  # id, nq, nk, heads, d, dtype, bias, backend, blocks, heads per program
    ("n17_auto_nobias", 17, 17, 2, 64, jnp.float32, False, None, None, None),
    ("n50_tpu_4x4_tiles", 50, 50, 4, 64, jnp.float32, True, "tpu_interpret", (16, 16), 2),
    ("n50_gpu_tiles_d32", 50, 50, 2, 32, jnp.float32, True, "gpu_interpret", (16, 32), None),
    ("cross_17x50_gpu_d128", 17, 50, 2, 128, jnp.float32, True, "gpu_interpret", None, None),
    ("n50_bf16_tpu_tiles", 50, 50, 2, 64, jnp.bfloat16, True, "tpu_interpret", (16, 16), None),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_softmax_matches_reference(case):
  _, nq, nk, h, d, dtype, has_bias, backend, blocks, heads = case
  q, k, v, bias = inputs(2, nq, nk, h, d, dtype, bias=has_bias)
  dy, dlse = cotangents(q.shape, (2, h, nq))

  def run(fn, q, k, v, bias):
    (y, lse), vjp = jax.vjp(fn, q, k, v, bias)
    return y, lse, vjp((dy.astype(y.dtype), dlse))

  kernel = lambda *a: fa.attention_with_lse(*a, backend=backend, blocks=blocks, heads=heads)
  y, lse, grads = jax.jit(lambda *a: run(kernel, *a))(q, k, v, bias)
  ry, rlse, rgrads = run(lambda *a: softmax_reference(*a)[:2], q, k, v, bias)
  fwd_tol, grad_tol = (1e-5, 1e-4) if dtype == jnp.float32 else (2e-2, 5e-2)
  assert y.dtype == dtype and lse.dtype == jnp.float32
  close(y, ry, fwd_tol)
  close(lse, rlse, fwd_tol)
  for name, g, rg in zip(("dq", "dk", "dv", "dbias"), grads, rgrads):
    if rg is None:
      assert g is None, name
      continue
    assert g.shape == rg.shape, name
    close(g, rg, grad_tol)


def test_masked_key_equals_deleting_it():
  q, k, v, _ = inputs(2, 17, 17, 2, 64, bias=False)
  bias = jnp.zeros((2, 1, 1, 17)).at[:, :, :, 5].set(-jnp.inf)
  keep = np.r_[0:5, 6:17]

  def loss(q, k, v, bias):
    return (fa.attention(q, k, v, bias) ** 2).sum()

  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
  l_mask, (dq_m, dk_m, dv_m) = grad(q, k, v, bias)
  l_del, (dq_d, dk_d, dv_d) = grad(q, k[:, keep], v[:, keep], None)
  close(l_mask, l_del, 1e-5)
  close(dq_m, dq_d, 1e-4)
  close(dk_m[:, keep], dk_d, 1e-4)
  close(dv_m[:, keep], dv_d, 1e-4)
  assert float(jnp.abs(dk_m[:, 5]).max()) == 0.0 and float(jnp.abs(dv_m[:, 5]).max()) == 0.0


def test_lse_gives_exact_cls_probs():
  q, k, v, bias = inputs(2, 17, 17, 2, 64)
  _, lse = jax.jit(fa.attention_with_lse)(q, k, v, bias)
  probs = fa.cls_probs_from_lse(q[:, 0], k, bias, lse[:, :, 0])
  _, rlse, p = softmax_reference(q, k, v, bias)
  close(lse, rlse, 1e-5)
  close(probs, p[:, :, 0], 1e-6)
  close(probs.sum(-1), np.ones((2, 2)), 1e-6)


def test_tpu_launch_in_tpu_interpret_mode():
  """The Mosaic launch (default TPU tiling, all heads in one program, compiler params) under the
  TPU interpreter, which simulates VMEM, the grid and the (8, 128) layout rules' block shapes."""
  q, k, v, bias = inputs(2, 50, 50, 4, 64)
  dy, _ = cotangents(q.shape, (1,))

  def run(fn):
    y, vjp = jax.vjp(fn, q, k, v, bias)
    return y, vjp(dy)

  with pltpu.force_tpu_interpret_mode():
    y, grads = jax.jit(lambda: run(lambda *a: fa.attention(*a, backend="tpu")))()
  ry, rgrads = run(lambda *a: softmax_reference(*a)[0])
  close(y, ry, 1e-5)
  for g, rg in zip(grads, rgrads):
    close(g, rg, 1e-4)


# ------------------------------------------------------------------ softmax with a full (pair) bias
def pair_inputs(b, n, h, groups, seed=3):
  """A [G, H, N, N] bias (G = 0: [H, N, N]) with a Swin-like -100 block and -inf pairs that differ
  per group, every row keeping finite keys."""
  g = max(groups, 1)
  pair = jax.random.normal(jax.random.PRNGKey(seed), (g, h, n, n))
  pair = pair.at[:, :, : n // 2, n // 2:].add(-100.0)  # a shift-mask-like region
  for i in range(g):
    pair = pair.at[i, :, i + 1, (3 * i) % n].set(-jnp.inf).at[i, 0, :, n - 1 - i].set(-jnp.inf)
  return pair if groups else pair[0]


def pair_reference(q, k, v, bias, pair):
  """softmax_reference with pair [H, N, N] or [G, H, N, N] added to example b as pair[b % G]."""
  full = pair if pair.ndim == 4 else pair[None]
  full = jnp.tile(full, (q.shape[0] // full.shape[0], 1, 1, 1))
  return softmax_reference(q, k, v, full if bias is None else full + bias)[:2]


PAIR_CASES = [  # id, n, heads, d, dtype, groups (0: [H, N, N]), key bias, backend, blocks
    ("n16_tpu_tiles_groups2_keybias", 16, 2, 32, jnp.float32, 2, True, "tpu_interpret", (8, 8)),
    ("n20_gpu_shared_bias", 20, 2, 32, jnp.float32, 0, False, "gpu_interpret", (16, 16)),
    ("n20_bf16_auto_groups4", 20, 2, 64, jnp.bfloat16, 4, True, None, None),
]


@pytest.mark.parametrize("case", PAIR_CASES, ids=[c[0] for c in PAIR_CASES])
def test_pair_bias_matches_reference(case):
  """Values, lse and the gradients of q, k, v, the key bias and the pair bias (summed over the
  examples that share it) against the materialised softmax; B = 4 examples."""
  _, n, h, d, dtype, groups, has_bias, backend, blocks = case
  q, k, v, bias = inputs(4, n, n, h, d, dtype, bias=has_bias)
  pair = pair_inputs(4, n, h, groups)
  dy, dlse = cotangents(q.shape, (4, h, n))

  def run(fn, *args):
    (y, lse), vjp = jax.vjp(fn, *args)
    return y, lse, vjp((dy.astype(y.dtype), dlse))

  kernel = lambda q, k, v, b, p: fa.attention_with_lse(q, k, v, b, pair_bias=p, backend=backend,
                                                        blocks=blocks)
  y, lse, grads = jax.jit(lambda *a: run(kernel, *a))(q, k, v, bias, pair)
  ry, rlse, rgrads = run(pair_reference, q, k, v, bias, pair)
  fwd_tol, grad_tol = (1e-5, 1e-4) if dtype == jnp.float32 else (2e-2, 5e-2)
  close(y, ry, fwd_tol)
  close(lse, rlse, fwd_tol)
  for name, g, rg in zip(("dq", "dk", "dv", "dbias", "dpair"), grads, rgrads):
    if rg is None:
      assert g is None, name
      continue
    assert g.shape == rg.shape, name
    close(g, rg, grad_tol)
  assert float(jnp.abs(grads[4]).min()) == 0.0  # the -inf pairs get no gradient


def test_pair_bias_tpu_launch_in_tpu_interpret_mode():
  """The Mosaic launch with a [G, H, N, N] bias (default tiling: both heads in one program, the
  dQ grid reducing over the examples of a group) under the TPU interpreter."""
  q, k, v, _ = inputs(4, 20, 20, 2, 32, bias=False)
  pair = pair_inputs(4, 20, 2, 2)
  dy, _ = cotangents(q.shape, (1,))

  def run(fn):
    y, vjp = jax.vjp(fn, q, k, v, pair)
    return y, vjp(dy)

  with pltpu.force_tpu_interpret_mode():
    y, grads = jax.jit(lambda: run(lambda q, k, v, p: fa.attention(q, k, v, pair_bias=p,
                                                                    backend="tpu")))()
  ry, rgrads = run(lambda q, k, v, p: pair_reference(q, k, v, None, p)[0])
  close(y, ry, 1e-5)
  for g, rg in zip(grads, rgrads):
    close(g, rg, 1e-4)


def test_pair_bias_shape_is_checked():
  q, k, v, _ = inputs(4, 20, 20, 2, 32, bias=False)
  for bad in (jnp.zeros((3, 2, 20, 20)), jnp.zeros((2, 20, 19)), jnp.zeros((20, 20))):
    with pytest.raises(ValueError, match="pair_bias must be"):
      fa.attention(q, k, v, pair_bias=bad)


# ------------------------------------------------------------------ sigmoid
SIGMOID_CASES = [  # id, nq, nk, h, d, backend, blocks
    ("n50_tpu_tiles", 50, 50, 2, 64, "tpu_interpret", (16, 16)),
    ("cross_17x50_gpu", 17, 50, 2, 32, "gpu_interpret", None),
]


@pytest.mark.parametrize("case", SIGMOID_CASES, ids=[c[0] for c in SIGMOID_CASES])
def test_sigmoid_matches_reference(case):
  _, nq, nk, h, d, backend, blocks = case
  q, k, v, bias = inputs(2, nq, nk, h, d)
  weight = jax.random.uniform(jax.random.PRNGKey(7), (2, nk), minval=1.0, maxval=3.0)
  dy, _ = cotangents(q.shape, (1,))

  def run(fn):
    y, vjp = jax.vjp(fn, q, k, v, bias, weight)
    return y, vjp(dy)

  kernel = lambda q, k, v, b, w: fs.sigmoid_attention(q, k, v, b, key_weight=w, backend=backend,
                                                      blocks=blocks)
  y, grads = jax.jit(lambda: run(kernel))()
  ry, rgrads = run(sigmoid_reference)
  close(y, ry, 1e-5)
  for g, rg in zip(grads, rgrads):  # dq, dk, dv, dbias, dweight
    close(g, rg, 1e-4)


def test_sigmoid_row_mass_and_duplicates():
  """At S = 0 a row sums to n sigma(-log n) = n / (n + 1) over the n unmasked keys, and a key of
  weight 3 acts like three copies of it (zoo R2)."""
  b, n, h, d = 2, 17, 2, 32
  q, k, v, _ = inputs(b, n, n, h, d, bias=False)
  mask = jnp.zeros((b, 1, 1, n)).at[:, :, :, 4].set(-jnp.inf)
  run = jax.jit(lambda q, k, v, bias, w: fs.sigmoid_attention(q, k, v, bias, key_weight=w))
  rows = run(jnp.zeros_like(q), k, jnp.ones_like(v), mask, None)
  close(rows, np.full(rows.shape, (n - 1) / n), 1e-6)
  weight = jnp.ones((b, n)).at[:, 2].set(3.0)
  y_weighted = run(q, k, v, None, weight)
  copies = np.r_[0:n, 2, 2]
  y_copies = run(q, k[:, copies], v[:, copies], None, None)
  close(y_weighted, y_copies, 1e-5)


# ------------------------------------------------------------------ GPU lowering (no GPU needed)
@pytest.mark.parametrize("fn", ["softmax", "sigmoid", "softmax_pair"])
def test_gpu_kernels_lower_to_triton(fn):
  """Lowers forward + backward for CUDA: the kernel bodies must translate to Triton IR (block
  shapes, dots, reductions). PTX compilation and execution need a GPU and are not checked.
  softmax_pair: Swin windows (T = 49) with a [nW, H, T, T] full bias."""
  q = jax.ShapeDtypeStruct((2, 197, 6, 64), jnp.bfloat16)
  bias = jax.ShapeDtypeStruct((2, 1, 1, 197), jnp.float32)
  attn = fa.attention if fn == "softmax" else fs.sigmoid_attention
  if fn == "softmax_pair":
    q = jax.ShapeDtypeStruct((2 * 4, 49, 3, 32), jnp.bfloat16)
    bias = jax.ShapeDtypeStruct((4, 3, 49, 49), jnp.float32)
    attn = lambda q, k, v, b: fa.attention(q, k, v, pair_bias=b)  # noqa: E731
  loss = lambda q, k, v, b: attn(q, k, v, b).astype(jnp.float32).sum()
  lowered = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3))).trace(q, q, q, bias).lower(
      lowering_platforms=("cuda",))
  assert lowered.as_text().count("__gpu$xla.gpu.triton") == 3  # forward, dQ, dK/dV


# ------------------------------------------------------------------ on a GPU (skipped elsewhere)
ON_GPU = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
GPU_CASES = [  # id, n, heads, d, dtype: ViT-S at 224 px, ViT-B at 384 px, a reduced count
    ("n197_h6_d64_bf16", 197, 6, 64, jnp.bfloat16), ("n577_h12_d64_bf16", 577, 12, 64, jnp.bfloat16),
    ("n72_h6_d32_f32", 72, 6, 32, jnp.float32), ("n197_h4_d128_f32", 197, 4, 128, jnp.float32),
]


@ON_GPU
@pytest.mark.parametrize("case", GPU_CASES, ids=[c[0] for c in GPU_CASES])
def test_compiled_gpu_kernels_match_reference(case):
  """The Triton-compiled kernels (not the interpreter), forward and gradients, softmax and sigmoid."""
  _, n, h, d, dtype = case
  q, k, v, bias = inputs(4, n, n, h, d, dtype)
  fwd_tol, grad_tol = (1e-4, 1e-3) if dtype == jnp.float32 else (2e-2, 5e-2)
  for kernel, ref in ((lambda *a: fa.attention(*a, backend="gpu"),
                       lambda *a: softmax_reference(*a)[0]),
                      (lambda *a: fs.sigmoid_attention(*a, backend="gpu"), sigmoid_reference)):
    loss = lambda f, *a: (f(*a).astype(jnp.float32) ** 2).sum()
    y, grads = jax.jit(lambda *a, f=kernel: (f(*a), jax.grad(lambda *b: loss(f, *b),
                                                              argnums=(0, 1, 2))(*a)))(q, k, v, bias)
    q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))  # references in float32
    close(y, ref(q32, k32, v32, bias), fwd_tol)
    ref_grads = jax.grad(lambda *b: loss(ref, *b), argnums=(0, 1, 2))(q32, k32, v32, bias)
    for g, rg in zip(grads, ref_grads):
      close(g, rg, grad_tol)


# ------------------------------------------------------------------ inside the model
def test_vit_pallas_matches_reference():
  def build(impl):
    return models.build(dict(variant="Ti/4", depth=1, attention=dict(name="mhsa", impl=impl)),
                        num_classes=10, image_size=16)

  x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
  ref_model, pallas_model = build("reference"), build("pallas")
  params = ref_model.init(jax.random.PRNGKey(1), x)

  def loss(model):
    def f(params):
      logits, _ = model.apply(params, x)
      return (logits ** 2).sum(), logits
    return jax.jit(jax.value_and_grad(f, has_aux=True))(params)

  (l_ref, logits_ref), g_ref = loss(ref_model)
  (l_pal, logits_pal), g_pal = loss(pallas_model)
  close(logits_pal, logits_ref, 1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(g_pal), jax.tree_util.tree_leaves(g_ref)):
    close(a, b, 1e-4)


def test_sigmoid_attention_pallas_impl_matches_reference_in_a_vit():
  """`sigmoid` with impl="pallas" (FlashSigmoid) equals the reference, EViT's [CLS] row included."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
  outs = {}
  for impl in ("reference", "pallas"):
    m = models.build(dict(variant="Ti/4", depth=2, width=64, num_heads=2, mlp_dim=64,
                          attention=dict(name="sigmoid", impl=impl),
                          tokens=dict(name="evit", keep_rate=0.5, locations=(0,))),
                     num_classes=10, image_size=16)
    params = m.init(jax.random.PRNGKey(1), x)["params"]
    loss = lambda p: jnp.sum(m.apply({"params": p}, x)[0] ** 2)
    outs[impl] = (m.apply({"params": params}, x)[0], jax.grad(loss)(params))
  np.testing.assert_allclose(outs["pallas"][0], outs["reference"][0], atol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(outs["pallas"][1]),
                  jax.tree_util.tree_leaves(outs["reference"][1])):
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_shifted_window_pallas_matches_reference():
  """Swin's SW-MSA (8x8 grid, window 4, shift 2, a [CLS] token) with impl="pallas": windows as the
  kernel's batch, relative position bias + shift mask as its [nW, H, T, T] full bias; forward and
  the gradients of the input and every parameter, the relative position table's included."""
  grid, npre = (8, 8), 1
  x = jax.random.normal(jax.random.PRNGKey(0), (2, npre + 64, 64))
  ctx = AttnContext(grid=grid, num_prefix=npre)
  build = lambda impl: attention.build(dict(name="shifted_window", window_size=4), num_heads=2,
                                       dtype=jnp.float32, impl=impl)
  ref, pal = build("reference"), build("pallas")
  params = ref.init(jax.random.PRNGKey(1), x, ctx)
  leaves, tree = jax.tree.flatten(params)  # random tables and biases, so a dropped term shows
  keys = jax.random.split(jax.random.PRNGKey(5), len(leaves))
  params = jax.tree.unflatten(tree, [l + 0.2 * jax.random.normal(k, l.shape)
                                     for l, k in zip(leaves, keys)])
  r = jax.random.normal(jax.random.PRNGKey(7), x.shape)

  @jax.jit
  def run(params, x):
    def f(m):
      return lambda p, x: (m.apply(p, x, ctx)[0] * r).sum()
    return [(m.apply(params, x, ctx)[0], jax.grad(f(m), argnums=(0, 1))(params, x))
            for m in (pal, ref)]

  (y, grads), (ry, rgrads) = run(params, x)
  close(y, ry, 1e-5)
  table = "relative_position_bias_table"
  assert float(jnp.abs(rgrads[0]["params"][table]).max()) > 0
  for g, rg in zip(jax.tree.leaves(grads), jax.tree.leaves(rgrads)):
    close(g, rg, 1e-4)
