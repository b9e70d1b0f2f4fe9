"""The README's "Adding a method" examples, run as written: each file registers, builds into a
model by name and matches an independent computation."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitjax import attention, models, tokens

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def snippet(name: str) -> str:
  text = open(os.path.join(ROOT, "README.md")).read()
  assert f"<!-- snippet: {name} -->" in text, f"the README lost its {name!r} snippet"
  block = text.split(f"<!-- snippet: {name} -->", 1)[1].split("<!-- end snippet -->", 1)[0]
  return block.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.fixture
def examples(monkeypatch):
  """The two example files, registered for this test only; returns their namespaces."""
  monkeypatch.setattr(attention.registry, "_REGISTRY", dict(attention.registry._REGISTRY))
  monkeypatch.setattr(tokens.registry, "_REGISTRY", dict(tokens.registry._REGISTRY))
  spaces = {}
  for name in ("new attention", "new reducer"):
    spaces[name] = {"__name__": name.replace(" ", "_")}
    exec(compile(snippet(name), f"README:{name}", "exec"), spaces[name])  # pylint: disable=exec-used
  return spaces


def test_example_attention_matches_its_formula(examples):
  del examples
  layer = attention.build("relu2", num_heads=2, dtype=jnp.float32)
  x = jax.random.normal(jax.random.key(0), (2, 5, 8))
  params = layer.init(jax.random.key(1), x)
  y, aux = layer.apply(params, x, need=("cls_probs",))
  p = params["params"]
  qkv = x @ p["qkv"]["kernel"] + p["qkv"]["bias"]
  q, k, v = (t.reshape(2, 5, 2, 4) for t in jnp.split(qkv, 3, axis=-1))
  w = jnp.maximum(jnp.einsum("bnhd,bmhd->bhnm", q, k) / 2.0, 0) ** 2 / 5
  o = jnp.einsum("bhnm,bmhd->bnhd", w, v).reshape(2, 5, 8)
  np.testing.assert_allclose(y, o @ p["proj"]["kernel"] + p["proj"]["bias"], atol=1e-5)
  np.testing.assert_allclose(aux["cls_probs"], w[:, :, 0].mean(1), atol=1e-6)
  assert attention.get("relu2").macs(5, 8, 2) == 4 * 5 * 8 * 8 + 2 * 5 * 5 * 8


def test_example_reducer_keeps_the_largest_norms(examples):
  del examples
  model = models.build(dict(variant="Ti/4", width=32, depth=4, num_heads=2, mlp_dim=64,
                            attention="relu2", tokens=dict(name="norm_topk", keep_rate=0.5,
                                                           locations=(2,))),
                       num_classes=10, image_size=16)
  images = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3))
  logits, out = model.apply(model.init(jax.random.key(1), images), images)
  assert logits.shape == (2, 10) and out["block_2"].shape[1] == 1 + 8
  norms = np.linalg.norm(np.asarray(out["block_1"])[:, 1:], axis=-1)
  want = np.sort(np.argsort(-norms, axis=1)[:, :8], axis=1) + 1
  np.testing.assert_array_equal(np.asarray(out["reductions"]["block_2"]["index"])[:, 1:], want)
