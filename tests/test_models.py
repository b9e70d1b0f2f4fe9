"""ViT family: variants, heads, parameter counts, position embeddings, bad options."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitjax import models


def n_params(model, size, channels=3):
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                             jnp.zeros((1, size, size, channels))))
  return models.num_params(shapes["params"])


@pytest.mark.parametrize("variant,expected", [
    ("Ti/16", 5_717_416), ("S/16", 22_050_664), ("B/16", 86_567_656), ("B/32", 88_224_232),
    ("L/16", 304_326_632)])
def test_parameter_counts_match_timm(variant, expected):
  model = models.build(dict(variant=variant), num_classes=1000, image_size=224)
  assert n_params(model, 224) == expected


def test_deit_distilled_and_registers_counts():
  # deit_small_distilled_patch16_224: 22,436,432 parameters in timm.
  m = models.build(dict(variant="S/16", distill_token=True), num_classes=1000, image_size=224)
  assert n_params(m, 224) == 22_436_432
  m = models.build(dict(variant="S/16", num_registers=4, posemb_prefix=False), num_classes=1000,
                   image_size=224)
  assert n_params(m, 224) == 22_050_664 - 384 + 4 * 384


TINY = dict(variant="Ti/4", depth=2)


@pytest.mark.parametrize("opts", [
    dict(pool="cls"), dict(pool="gap", class_token=False), dict(pool="gap"), dict(pool="map"),
    dict(num_registers=4), dict(distill_token=True), dict(posemb="sincos2d"),
    dict(layerscale=1e-5), dict(qk_norm=True), dict(drop_path=0.2, dropout=0.1),
    dict(scan=True), dict(scan=True, remat=True), dict(remat=True),
    dict(posemb_prefix=False, num_registers=2)])
def test_heads_and_options_forward_and_grad(opts):
  model = models.build({**TINY, **opts}, num_classes=10, image_size=16)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
  variables = model.init(jax.random.PRNGKey(0), x)
  logits, out = model.apply(variables, x)
  assert logits.shape == (2, 10)
  assert out["pre_logits"].shape == (2, 192)

  def loss(p):
    y, _ = model.apply({"params": p}, x, train=True, rngs={"dropout": jax.random.PRNGKey(2)})
    return jnp.sum(y ** 2) + jnp.sum(y)
  grads = jax.grad(loss)(variables["params"])
  assert all(np.isfinite(g).all() for g in jax.tree_util.tree_leaves(grads))


def test_scan_equals_unrolled():
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
  plain = models.build(TINY, num_classes=10, image_size=16)
  scanned = models.build({**TINY, "scan": True}, num_classes=10, image_size=16)
  p = plain.init(jax.random.PRNGKey(0), x)["params"]
  stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), p["block_0"], p["block_1"])
  ps = {k: v for k, v in p.items() if not k.startswith("block_")}
  ps["encoder"] = {"block": stacked}
  np.testing.assert_allclose(plain.apply({"params": p}, x)[0],
                             scanned.apply({"params": ps}, x)[0], atol=1e-5)


def test_intermediates_and_distill_average():
  model = models.build({**TINY, "distill_token": True}, num_classes=10, image_size=16)
  x = jnp.ones((1, 16, 16, 3))
  v = model.init(jax.random.PRNGKey(0), x)
  v = jax.tree_util.tree_map(lambda a: a + 0.01, v)
  _, out = model.apply(v, x, train=True)
  logits, _ = model.apply(v, x, train=False)
  np.testing.assert_allclose(logits, (out["logits"] + out["dist_logits"]) / 2, atol=1e-6)
  assert {"stem", "block_0", "block_1", "pre_logits", "token_state"} <= set(out)


def test_sincos_and_resample():
  pe = models.sincos2d((4, 4), 64)
  assert pe.shape == (1, 16, 64)
  np.testing.assert_allclose(pe[0, 0, :16], 0.0, atol=1e-7)  # sin(0) at the origin
  learned = np.random.RandomState(0).randn(1, 1 + 16, 8).astype(np.float32)
  same = models.resample_posemb(learned, (4, 4), num_prefix=1)
  np.testing.assert_array_equal(same, learned)
  big = models.resample_posemb(learned, (8, 8), num_prefix=1)
  assert big.shape == (1, 65, 8)
  np.testing.assert_array_equal(big[:, 0], learned[:, 0])


@pytest.mark.parametrize("opts,size,msg", [
    (dict(variant="Q/16"), 224, "unknown ViT variant"),
    (dict(variant="S16"), 224, "must look like"),
    (dict(variant="S/16"), 100, "not divisible by the patch"),
    (dict(variant="S/16", pool="max"), 224, "unknown pool"),
    (dict(variant="S/16", pool="cls", class_token=False), 224, "class_token"),
    (dict(variant="S/16", num_heads=5), 224, "not divisible by num_heads"),
    (dict(variant="S/16", attention="nope"), 224, "unknown attention"),
    (dict(variant="S/16", attention=dict(name="mhsa", foo=1)), 224, "has no option"),
    (dict(variant="S/16", tokens=dict(name="nope")), 224, "unknown token reducer"),
    (dict(variant="S/16", widht=3), 224, "unknown model option"),
])
def test_bad_model_configs(opts, size, msg):
  with pytest.raises(ValueError, match=msg):
    models.build(opts, num_classes=10, image_size=size)
