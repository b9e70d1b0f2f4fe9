"""Post-training quantization: each quantizer against a hand-written formula, RepQ-ViT's exact
reparameterisation, the int8 path against fake-quant, deterministic calibration, save/restore,
the quantizer x attention check and the EViT kept-set overlap; I-ViT's integer operators by hand.
One tiny model and one batch for the whole file; each method compiles its calibration and apply
once (the bit widths are traced), shared through the module-scoped `quantized` cache."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitjax import models, quant
from vitjax.quant import base, fq_vit, i_vit, ptq4vit, repq_vit

RNG = np.random.default_rng(0)


def naive_uniform(x, scale, zero, bits):
  q = np.clip(np.round(x / scale) + zero, 0, 2 ** bits - 1)
  return (q - zero) * scale


def tiny_vit(**kw):
  kw = dict(dict(num_classes=10, image_size=(8, 8), patch_size=4, width=16, depth=1,
                 num_heads=2, mlp_dim=32, class_token=True, pool="cls"), **kw)
  return models.ViT(**kw)


@pytest.fixture(scope="module")
def trained_like():
  """A tiny ViT with perturbed (non-trivial) weights and a batch of images."""
  model = tiny_vit()
  x = jax.random.normal(jax.random.key(0), (8, 8, 8, 1))
  params = init(model, x)
  rng = np.random.default_rng(2)  # numpy noise: no per-shape compile
  params = jax.tree_util.tree_map(
      lambda p: p + jnp.asarray(0.1 * rng.normal(size=p.shape), p.dtype), params)
  return model, params, x


def init(model, x):
  return jax.jit(model.init)(jax.random.key(0), x)["params"]


def forward(model, params, x):
  """The float logits, compiled (eager op-by-op dispatch is slower than one compile)."""
  return jax.jit(lambda p: model.apply({"params": p}, x)[0])(params)


@pytest.fixture(scope="module")
def quantized(trained_like):
  """(method, bits, integer) -> (QuantizedModel, params), each calibrated once."""
  model, params, x = trained_like
  cache = {}

  def get(method, bits="W8A8", integer=False):
    if (method, bits, integer) not in cache:
      cache[method, bits, integer] = quant.quantize(
          model, params, x, dict(method=method, bits=bits, integer=integer))
    return cache[method, bits, integer]
  return get


# ----------------------------------------------------------------------------- the formulas
@pytest.mark.parametrize("bits", [4, 8])
def test_minmax_matches_hand_formula(bits):
  x = RNG.normal(size=(64, 8)).astype(np.float32)
  q = quant.get("minmax").make()
  p = q.calibrate("linear", jnp.asarray(x), bits)
  scale = (x.max() - x.min()) / (2 ** bits - 1)
  zero = np.round(-x.min() / scale)
  np.testing.assert_allclose(p["scale"], scale, rtol=1e-6)
  np.testing.assert_allclose(q.quantize("linear", jnp.asarray(x), p, bits),
                             naive_uniform(x, scale, zero, bits), atol=1e-5)
  w = RNG.normal(size=(8, 5)).astype(np.float32)
  pw = q.calibrate_weight(jnp.asarray(w), bits)
  for c in range(5):  # per output channel
    s = (w[:, c].max() - w[:, c].min()) / (2 ** bits - 1)
    np.testing.assert_allclose(pw["scale"][c], s, rtol=1e-6)
    np.testing.assert_allclose(pw["zero"][c], np.round(-w[:, c].min() / s))


def test_percentile_clips_at_quantiles():
  x = RNG.standard_t(2, size=(4000,)).astype(np.float32)
  q = quant.get("percentile").make(dict(p=0.99))
  p = q.calibrate("linear", jnp.asarray(x), 8)
  lo, hi = np.quantile(x, 0.01), np.quantile(x, 0.99)
  np.testing.assert_allclose(p["scale"], (hi - lo) / 255, rtol=1e-4)
  y = np.asarray(q.quantize("linear", jnp.asarray(x), p, 8))
  assert y.max() <= hi + p["scale"] and y.min() >= lo - p["scale"]  # zero point rounded


def test_ptq4vit_twin_uniform_by_hand():
  bits, qmax = 4, 8
  x = np.concatenate([RNG.uniform(0, 0.05, 50), RNG.uniform(0, 1, 50)]).astype(np.float32)
  split = 2.0 ** -3
  want = []
  for v in x:  # two ranges, k-1 bits each
    if v < split:
      want.append(min(max(round(v / (split / qmax)), 0), qmax - 1) * split / qmax)
    else:
      want.append(min(max(round(v * (qmax - 1)), 0), qmax - 1) / (qmax - 1))
  np.testing.assert_allclose(ptq4vit.twin_softmax(jnp.asarray(x), split, bits), want, atol=1e-6)
  g = np.asarray(jax.nn.gelu(jnp.linspace(-4, 4, 101), approximate=False))
  step = 0.3
  neg = ptq4vit.GELU_MIN / qmax
  want = [(min(max(round(v / neg), -qmax), 0) * neg if v < 0
           else min(max(round(v / step), 0), qmax - 1) * step) for v in g]
  np.testing.assert_allclose(ptq4vit.twin_gelu(jnp.asarray(g), step, bits), want, atol=1e-6)
  # the calibrated split is the power of two with the least squared error
  q = quant.get("ptq4vit").make()
  p = q.calibrate("softmax", jnp.asarray(x), bits)
  errs = [np.mean((x - np.asarray(ptq4vit.twin_softmax(jnp.asarray(x), 2.0 ** -m, bits))) ** 2)
          for m in range(20)]
  assert float(p["split"]) == 2.0 ** -int(np.argmin(errs))


def test_repq_log_sqrt2_by_hand():
  bits, delta = 4, 0.9
  x = np.concatenate([RNG.uniform(0, 1, 200), [0.0, 1e-9, 0.9]]).astype(np.float32)
  want = []
  for v in x:
    r = round(-2 * math.log2(max(v / delta, 1e-30)))
    want.append(0.0 if r >= 2 ** bits else delta * 2 ** (-min(max(r, 0), 2 ** bits - 1) / 2))
  np.testing.assert_allclose(repq_vit.log_sqrt2(jnp.asarray(x), delta, bits), want, rtol=1e-5,
                             atol=1e-7)


def test_repq_uniform_search_by_hand():
  x = RNG.standard_t(3, size=(3000,)).astype(np.float32)
  q = quant.get("repq_vit").make()
  p = q.calibrate("linear", jnp.asarray(x), 4)
  best = None
  for pct in (0.999, 0.9999, 0.99999):
    lo, hi = np.quantile(x, 1 - pct), np.quantile(x, pct)
    s = (hi - lo) / 15
    err = np.mean((x - naive_uniform(x, s, np.round(-lo / s), 4)) ** 2)
    if best is None or err < best[0]:
      best = (err, s)
  np.testing.assert_allclose(p["scale"], best[1], rtol=1e-4)


def test_fq_vit_log2_and_ptf_by_hand():
  x = np.array([1.0, 0.5, 0.3, 0.01, 1e-6, 0.0], np.float32)
  want = []
  for v in x:
    r = round(-math.log2(max(v, 1e-30)))
    want.append(0.0 if r >= 16 else 2.0 ** -min(max(r, 0), 15))
  np.testing.assert_allclose(fq_vit.log2_quant(jnp.asarray(x), 4), want, rtol=1e-6)
  a = RNG.normal(size=(50, 4)).astype(np.float32) * np.array([0.1, 1.0, 5.0, 20.0], np.float32)
  p = fq_vit.ptf_params(jnp.asarray(a), 8, 3)
  s8 = (a.max() - a.min()) / 255
  zero = np.round(-a.min() / s8)
  for c in range(4):
    errs = [np.mean((a[:, c] - naive_uniform(a[:, c], s8 / 8 * 2 ** k, zero, 8)) ** 2)
            for k in range(4)]
    np.testing.assert_allclose(p["scale"][c], s8 / 8 * 2 ** int(np.argmin(errs)), rtol=1e-5)


# ----------------------------------------------------------------------------- the machinery
def test_repq_reparameterisation_is_exact(trained_like):
  model, params, x = trained_like
  ref = forward(model, params, x)
  state = {"weights": {}, "acts": {}}
  for parent, dense in (("attn", "qkv"), ("mlp", "fc1")):
    state["acts"][base.site_key(("block_0", parent, dense), "post_ln")] = {
        "scale": jnp.asarray(RNG.uniform(0.01, 0.2, 16), jnp.float32),
        "zero": jnp.asarray(np.round(RNG.uniform(0, 15, 16)), jnp.float32)}
  cfg = base.QuantConfig(method="repq_vit", w_bits=4, a_bits=4)
  new, state = quant.get("repq_vit").make().reparameterise(model, params, state, x, cfg)
  np.testing.assert_allclose(forward(model, new, x), ref, atol=1e-5)
  assert not np.allclose(new["block_0"]["norm1"]["scale"], params["block_0"]["norm1"]["scale"])
  assert state["acts"]["block_0/attn/qkv:post_ln"]["scale"].shape == ()


def test_integer_dense_equals_fake_quant():
  import flax.linen as nn
  dense = nn.Dense(6)
  x = jnp.asarray(RNG.normal(size=(3, 5, 16)), jnp.float32)
  params = dense.init(jax.random.key(0), x)["params"]
  cfg = base.QuantConfig(method="repq_vit", w_bits=8, a_bits=8, integer=True)
  q = quant.get("repq_vit").make()
  wp = q.calibrate_weight(params["kernel"], 8)  # asymmetric: the weight zero point is used
  ap = q.calibrate("linear", x, 8)
  xq = q.quantize("linear", x, ap, 8)
  wq = base.uniform(params["kernel"], wp["scale"], wp["zero"], 8)
  fake = xq @ wq + params["bias"]
  state = {"weights": {"d/kernel": wp}, "acts": {"k": ap}}
  got = dense.apply({"params": dict(params, kernel=wq)}, xq,
                    method=lambda m, v: base.integer_dense(m, v, state, "k", ("d",), cfg))
  np.testing.assert_allclose(got, fake, rtol=1e-5, atol=1e-4)


def test_integer_model_agrees_with_fake_quant(trained_like, quantized):
  _, _, x = trained_like
  qi, pi = quantized("minmax", integer=True)
  qf, pf = quantized("minmax")
  yi, yf = qi.apply({"params": pi}, x)[0], qf.apply({"params": pf}, x)[0]
  # equal up to float rounding, which may flip a code near a rounding boundary downstream
  assert float(jnp.abs(yi - yf).max()) < 0.05 * float(jnp.abs(yf).max())
  assert float(jnp.mean(jnp.argmax(yi, -1) == jnp.argmax(yf, -1))) >= 0.9


@pytest.mark.parametrize("method", quant.names())
def test_every_quantizer_runs_and_is_deterministic(trained_like, quantized, method):
  model, params, x = trained_like
  ref = forward(model, params, x)
  q1, p1 = quantized(method)
  q2, _ = quant.quantize(model, params, x, dict(method=method, bits="W8A8"))  # compiled: cached
  assert jax.tree_util.tree_structure(q1.state) == jax.tree_util.tree_structure(q2.state)
  for a, b in zip(jax.tree_util.tree_leaves(q1.state), jax.tree_util.tree_leaves(q2.state)):
    np.testing.assert_array_equal(a, b)  # calibration is deterministic
  y8 = q1.apply({"params": p1}, x)[0]
  q4, p4 = quantized(method, "W4A4")
  y4 = q4.apply({"params": p4}, x)[0]
  e8, e4 = float(jnp.abs(y8 - ref).mean()), float(jnp.abs(y4 - ref).mean())
  assert 0 < e8 < e4  # quantized, and 4 bits lose more than 8


def test_save_and_restore(trained_like, quantized, tmp_path):
  model, _, x = trained_like
  qm, qp = quantized("repq_vit", "W6A6")
  path = str(tmp_path / "q.npz")
  quant.save(path, qm, qp)
  qm2, qp2 = quant.restore(path, model)
  assert qm2.cfg == qm.cfg
  np.testing.assert_allclose(qm2.apply({"params": qp2}, x)[0], qm.apply({"params": qp}, x)[0],
                             atol=1e-6)


# ----------------------------------------------------------------------------- the checks
def test_softmax_quantizers_name_the_valid_pairs(trained_like):
  _, _, x = trained_like
  model = tiny_vit(attention=dict(name="relu"))
  params = init(model, x)
  for method in ("repq_vit", "i_vit"):
    with pytest.raises(quant.QuantError, match=f"valid pairs: {method} with .*mhsa"):
      quant.quantize(model, params, x, dict(method=method, bits="W8A8"))
  qm, qp = quant.quantize(model, params, x, dict(method="repq_vit", bits="W8A8",
                                                 attention_weights="uniform"))
  assert "block_0/attn:weights" in qm.state["acts"]
  assert ("minmax", "relu") in quant.registry.valid_pairs(["relu"])
  assert ("repq_vit", "relu") not in quant.registry.valid_pairs(["relu"])
  assert ("i_vit", "relu") not in quant.registry.valid_pairs(["relu"])


@pytest.mark.parametrize("spec,match", [
    (dict(method="nope"), "unknown quantizer 'nope'; valid names: fq_vit"),
    (dict(method="minmax", bits="8"), "bits must look like 'W8A8'"),
    (dict(method="minmax", bits="W9A8"), "w_bits=9 is outside 2..8"),
    (dict(method="percentile", q=3), r"no option\(s\) \['q'\]; valid options: \['p'\]"),
    (dict(method="ptq4vit", integer=True), "methods with an integer path: fq_vit, i_vit, minmax"),
    (dict(method="minmax", full_precision=("norm",)), "valid: \\('embedding', 'head'\\)"),
])
def test_bad_choices_say_what_would_work(spec, match):
  with pytest.raises(quant.QuantError, match=match):
    quant.make_config(spec)


def test_linear_attention_factors_and_evit_overlap(trained_like):
  _, _, x = trained_like
  model = tiny_vit(attention=dict(name="linear_elu"))
  params = init(model, x)
  qm, _ = quant.quantize(model, params, x, dict(method="minmax", bits="W4A4"))
  assert {"block_0/attn:left", "block_0/attn:right"} <= set(qm.state["acts"])
  model = tiny_vit(depth=2, patch_size=2, tokens=dict(name="evit", keep_rate=0.5, locations=(1,)))
  params = init(model, x)
  _, out_fp = jax.jit(lambda p: model.apply({"params": p}, x))(params)
  assert base.kept_overlap(out_fp, out_fp) == 1.0
  qm, qp = quant.quantize(model, params, x, dict(method="minmax", bits="W4A4"))
  _, out_q = qm.apply({"params": qp}, x)
  share = base.kept_overlap(out_fp, out_q)
  assert 0.0 <= share <= 1.0


def test_evaluate_takes_a_quantization_choice(tmp_path):
  """python -m vitjax.evaluate with configs/quant_imagenet.py (the digits smoke variant) on an
  exported big_vision file: the row names the quantization."""
  import importlib.util
  import os
  from vitjax import checkpoints, evaluate
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location("quant_cfg",
                                                os.path.join(root, "configs", "quant_imagenet.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("smoke=True,method=minmax,bits=W8A8,calib=8")
  model = tiny_vit(patch_size=2)
  params = init(model, jnp.zeros((1, 8, 8, 1)))
  path = str(tmp_path / "tiny.npz")
  checkpoints.save(path, params, model)
  rows = evaluate.run(config, path, runs=1, throughput_batch=8)
  assert rows[0]["model"].endswith("[minmax W8A8]") and 0 <= rows[0]["top1"] <= 100


# ----------------------------------------------------------------------------- I-ViT's operators
def naive_exp_shift(v, s, n):
  """The official int_exp_shift on one integer code, in Python floats."""
  v = v + math.floor(v / 2) - math.floor(v / 16)
  x0 = math.floor(-1 / s)
  v = max(v, n * x0)
  q = math.floor(v / x0)
  r = v - x0 * q
  return max(math.floor((r / 2 - x0) * 2 ** (n - q)), 0)


def float32_factor(total):
  """floor((2^31 - 1) / total) as the official code computes it, in float32 (2^31 - 1 rounds
  to 2^31 there). The product exp x factor, near 2^31, is rounded to float32 too, so the codes
  below are compared within one code of exact arithmetic after that division."""
  return math.floor(np.float32(2 ** 31 - 1) / np.float32(min(total, 2 ** 31 - 1)))


def test_i_vit_shiftmax_by_hand_and_against_softmax():
  s = 0.05
  x = np.round(np.random.default_rng(5).normal(scale=40, size=(3, 7)))
  got = np.asarray(i_vit.shiftmax(jnp.asarray(x, jnp.float32), s))
  for row, out in zip(x, got):
    e = [naive_exp_shift(v - row.max(), s, 15) for v in row]
    factor = float32_factor(sum(e))
    np.testing.assert_allclose(out, [math.floor(v * factor / 2 ** 16) for v in e], atol=1)
  # against the float softmax: the shift exponent is within a few percent of e^x
  ref = np.asarray(jax.nn.softmax(jnp.asarray(x * s), -1))
  np.testing.assert_allclose(got / 2 ** 15, ref, atol=0.03)


def test_i_vit_shift_gelu_by_hand_and_against_gelu():
  s = 0.02
  x = np.round(np.random.default_rng(6).normal(scale=60, size=(2, 9)))
  got, out_scale = i_vit.shift_gelu(jnp.asarray(x, jnp.float32), s)
  assert float(out_scale) == pytest.approx(s / 2 ** 7)
  for row, out in zip(x, np.asarray(got)):
    m = row.max()
    for v, o in zip(row, out):
      e, e_max = naive_exp_shift(v - m, s * 1.702, 23), naive_exp_shift(-m, s * 1.702, 23)
      factor = float32_factor(e + e_max)
      assert abs(o - v * math.floor(e * factor / 2 ** 24)) <= abs(v), (v, o)
  # against the float x sigmoid(1.702 x) it approximates: the shift exponent's linear 2^r is off
  # by up to ~6%, the 8-bit sigmoid by 1/128
  ref = x * s / (1 + np.exp(-1.702 * x * s))
  np.testing.assert_allclose(np.asarray(got) * float(out_scale), ref, rtol=0.1, atol=0.02)


def test_i_vit_layernorm_integer_sqrt_and_against_layernorm():
  for v in (2 ** 20, 123456789, 2 ** 31 + 5):  # the 16-bit residual regime the iteration is for
    assert int(i_vit.int_sqrt(jnp.float32(v))) == math.isqrt(int(np.float32(v)))
  assert int(i_vit.int_sqrt(jnp.float32(100))) == 64  # ten halvings from 2^16: official, too
  x = np.round(RNG.normal(scale=3000, size=(4, 16)))
  gamma = RNG.uniform(0.5, 1.5, 16).astype(np.float32)
  beta = RNG.normal(scale=0.1, size=16).astype(np.float32)
  got = np.asarray(i_vit.i_layernorm(jnp.asarray(x, jnp.float32), gamma, beta))
  scale = math.sqrt(16) / 2 ** 30
  for row, out in zip(x, got):
    y = row - round(row.mean())
    std = math.isqrt(int(np.sum(y * y)))
    codes = np.floor(y * ((2 ** 31 - 1) // std) / 2) + np.floor(beta / gamma / scale)
    np.testing.assert_allclose(out, codes * scale * gamma, rtol=1e-4, atol=1e-5)
  ref = (x - x.mean(-1, keepdims=True)) / x.std(-1, keepdims=True) * gamma + beta
  np.testing.assert_allclose(got, ref, atol=2e-3)


def test_i_vit_dyadic_requantization_by_hand():
  s_in, s_out = 0.0123, 0.0871
  z = np.arange(-300, 301, 7)
  got = np.asarray(i_vit.dyadic_requant(jnp.asarray(z), s_in, s_out, 8))
  mant, exp = math.frexp(np.float32(s_in / s_out))
  m, e = math.floor(mant * 2 ** 15 + 0.5), 15 - exp
  np.testing.assert_array_equal(got, [min(max((v * m + 2 ** (e - 1)) >> e, -128), 127) for v in z])
  assert np.abs(got - np.clip(np.round(z * s_in / s_out), -128, 127)).max() <= 1
