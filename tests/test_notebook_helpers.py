"""The library pieces the notebooks draw with: per-head [CLS] attention maps, reduction-stage
figures, pretrained files from the hub or a local path, and the scikit-image photographs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitjax import checkpoints, models
from vitjax.checkpoints import hub
from vitjax.data import photos
from vitjax.models import attention_maps
from vitjax.tokens import visualize

IMAGES = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))


def tiny(**kw):
  cfg = dict(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=4, **kw)
  return models.build(cfg, num_classes=10, image_size=16)


def naive_cls_row(p, x, heads):
  """softmax(q_cls k^T / sqrt(d)) per head from the block's raw parameters."""
  mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  h = (x - mu) / np.sqrt(var + 1e-6) * p["norm1"]["scale"] + p["norm1"]["bias"]
  qkv = h @ p["attn"]["qkv"]["kernel"] + p["attn"]["qkv"]["bias"]
  b, n, _ = x.shape
  q, k, _ = np.split(qkv.reshape(b, n, 3, heads, -1), 3, axis=2)
  q, k = q[:, :, 0], k[:, :, 0]                                 # [B, N, H, d]
  s = np.einsum("bhd,bkhd->bhk", q[:, 0], k) / np.sqrt(q.shape[-1])
  s = np.exp(s - s.max(-1, keepdims=True))
  return s / s.sum(-1, keepdims=True)                           # [B, H, N]


def test_cls_attention_matches_the_naive_softmax_row():
  model = tiny()
  variables = model.init(jax.random.key(1), IMAGES)
  maps = attention_maps.cls_attention(model, variables, IMAGES, block=-1)
  assert maps.shape == (2, 2, 4, 4)
  _, out = model.apply(variables, IMAGES, train=False)
  p = jax.tree_util.tree_map(np.asarray, variables["params"]["block_1"])
  want = naive_cls_row(p, np.asarray(out["block_0"], np.float64), 2)
  np.testing.assert_allclose(maps.reshape(2, 2, -1), want[..., 1:], rtol=2e-4, atol=1e-6)
  first = attention_maps.cls_attention(model, variables, IMAGES, block=0)
  p0 = jax.tree_util.tree_map(np.asarray, variables["params"]["block_0"])
  want0 = naive_cls_row(p0, np.asarray(out["stem"], np.float64), 2)
  np.testing.assert_allclose(first.reshape(2, 2, -1), want0[..., 1:], rtol=2e-4, atol=1e-6)


def test_cls_attention_refuses_what_it_cannot_draw():
  with pytest.raises(ValueError, match="no \\[CLS\\] token"):
    model = tiny(class_token=False, pool="gap")
    attention_maps.cls_attention(model, model.init(jax.random.key(0), IMAGES), IMAGES)
  model = tiny(tokens=dict(name="evit", keep_rate=0.5, locations=(0,)))
  variables = model.init(jax.random.key(0), IMAGES)
  with pytest.raises(ValueError, match="reduced tokens"):
    attention_maps.cls_attention(model, variables, IMAGES, block=1)
  with pytest.raises(ValueError, match="outside the model's 2 blocks"):
    attention_maps.cls_attention(model, variables, IMAGES, block=2)


def test_stage_figure_has_one_panel_per_stage():
  model = tiny(tokens=dict(name="tome", r=4), track_source=True)
  variables = model.init(jax.random.key(0), IMAGES)
  _, out = model.apply(variables, IMAGES, train=False)
  stages = visualize.stage_sources(out, 0)
  image = np.asarray(jax.random.uniform(jax.random.key(1), (16, 16, 3)))
  fig = visualize.figure(image, stages, 4, title="ToMe")
  assert len(fig.axes) == len(stages) + 1 == 3
  statuses = [visualize.patch_status(s, 1)[0] for _, s in stages]
  assert (statuses[-1] == visualize.MERGED).sum() > 0


def test_fetch_prefers_a_local_file_and_loads_it(tmp_path):
  model = tiny()
  params = model.init(jax.random.key(2), IMAGES)["params"]
  path = str(tmp_path / "vit.safetensors")
  checkpoints.save(path, params, model)
  got, origin = hub.fetch(hub.DEIT_SMALL, local=path)
  assert got == path and "local file" in origin
  loaded_model, loaded = checkpoints.load_model(got)
  logits = model.apply({"params": params}, IMAGES)[0]
  np.testing.assert_allclose(loaded_model.apply({"params": loaded}, IMAGES)[0], logits, atol=1e-5)
  with pytest.raises(FileNotFoundError, match="no file at"):
    hub.fetch(hub.DEIT_SMALL, local=str(tmp_path / "missing.safetensors"))


def test_fetch_offline_says_why(monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  got, origin = hub.fetch("timm/no-such-model-here")
  assert got is None and "could not give" in origin


def test_photo_crops_are_labelled_and_seeded():
  images, labels = photos.crops(32, per_photo=2, seed=0)
  assert images.shape == (12, 32, 32, 3) and images.dtype == np.uint8
  np.testing.assert_array_equal(labels, np.repeat(np.arange(6), 2))
  again, _ = photos.crops(32, per_photo=2, seed=0)
  other, _ = photos.crops(32, per_photo=2, seed=1)
  np.testing.assert_array_equal(images, again)
  assert not np.array_equal(images, other)
  assert photos.load(48).shape == (6, 48, 48, 3)
  with pytest.raises(ValueError, match="unknown photograph"):
    photos.photo("mona_lisa")
