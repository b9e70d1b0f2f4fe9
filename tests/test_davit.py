"""DaViT: timm's parameter counts and MACs, a tiny model's forward / gradient / bf16, logits and
gradients equal to timm's (with `VITJAX_TORCH_PYTHON`), timm and official files in and out,
config errors, and a sharded train step on 8 CPU devices.

The parity model (embed dims (16, 32), one dual unit per stage, heads (2, 4), window 4, 48x16
images) has grids 12x4, where the window divides, and 6x2, padded to 8x4: a grid side smaller
than the window is padded too (timm does not shrink the window), and the padded tokens are
attended, as in timm.
"""
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm_reference

from vitjax import attention, checkpoints, models
from vitjax.checkpoints import common, timm_davit
from vitjax.tokens import macs as macs_lib
from vitjax.train import optim, recipe

ARCH = dict(embed_dims=(16, 32), depths=(1, 1), num_heads=(2, 4), window_size=4)
TINY = dict(name="davit", **ARCH)
TIMM_KWARGS = dict(ARCH, num_classes=10)
SIZE = (48, 16)


def tiny(dtype="float32", **kw):
  return models.build({**TINY, **kw}, num_classes=10, image_size=SIZE, dtype=dtype)


def images(n=2, seed=7):
  return np.random.default_rng(seed).normal(size=(n, *SIZE, 3)).astype(np.float32)


MODEL = tiny()


@jax.jit
def logits_and_grads(params, x, cot):
  """MODEL's logits and the gradients of <logits, cot> for its parameters and the images (one
  compile that every test of MODEL shares)."""
  def weighted(p, x):
    logits = MODEL.apply({"params": p}, x)[0]
    return jnp.sum(logits * cot), logits
  (_, logits), grads = jax.value_and_grad(weighted, argnums=(0, 1), has_aux=True)(params, x)
  return logits, grads


@pytest.mark.parametrize("variant,count,gmacs", [
    ("T", 28_360_168, 4.52), ("S", 49_745_896, 8.77), ("B", 87_954_408, 15.47)])
def test_variants_have_timms_parameter_counts(variant, count, gmacs):
  model = models.build({"name": "davit", "variant": variant}, num_classes=1000, image_size=224)
  assert models.num_params(common.abstract_params(model)) == count
  assert round(macs_lib.model_macs(model) / 1e9, 2) == gmacs  # paper: 4.5 / 8.8 / 15.5 G


def test_tiny_forward_gradient_bf16():
  params = timm_reference.random_params(MODEL)
  x = images()
  cot = np.random.default_rng(1).normal(size=(2, 10)).astype(np.float32)
  logits, (grads, dx) = logits_and_grads(params, x, cot)
  assert logits.shape == (2, 10) and np.isfinite(dx).all() and np.abs(dx).max() > 0
  shapes = jax.eval_shape(lambda p, x: MODEL.apply({"params": p}, x)[1], params, x)
  assert [shapes[f"stage_{s}"].shape for s in range(2)] == [(2, 12, 4, 16), (2, 6, 2, 32)]
  block = params["stage_1"]["block_0"]
  assert set(block) == {"cpe1", "norm1", "attn", "cpe2", "norm2", "mlp"}
  assert block["cpe1"]["proj"]["kernel"].shape == (3, 3, 1, 32)
  flat = common.flatten(common.to_numpy(grads))
  assert all(np.isfinite(g).all() for g in flat.values())
  assert all(np.abs(g).max() > 0 for g in flat.values()), [k for k, g in flat.items()
                                                          if not np.abs(g).any()]
  # bfloat16 compute, float32 parameters and logits
  half = tiny("bfloat16")
  low = jax.jit(lambda p, x: half.apply({"params": p}, x)[0])(params, x)
  assert low.dtype == jnp.float32 and np.isfinite(low).all()
  np.testing.assert_allclose(low, logits, atol=0.05 * float(np.abs(logits).max()))


def test_zero_padded_windows_match_their_definition():
  """davit_window padding="zeros" (timm's SpatialBlock): the input zero-padded to multiples of
  the window (a 3x5 grid, window 2 -> 4x6, the padded tokens projected and attended), softmax
  attention in each window, the grid cut back out; written here with numpy."""
  grid, window, heads, width = (3, 5), 2, 2, 8
  layer = attention.build({"name": "davit_window", "window_size": window, "padding": "zeros"},
                          num_heads=heads, dtype=jnp.float32)
  x = np.random.default_rng(0).normal(size=(1, 15, width)).astype(np.float32)
  ctx = attention.AttnContext(grid=grid, num_prefix=0)
  shapes = jax.eval_shape(layer.init, jax.random.PRNGKey(0), x, ctx)
  rng = np.random.default_rng(1)
  p = jax.tree_util.tree_map(lambda a: rng.normal(0, 0.3, a.shape).astype(np.float32), shapes)
  y, _ = jax.jit(layer.apply)(p, x, ctx)
  w = jax.tree_util.tree_map(np.asarray, p["params"])
  xp = np.zeros((4, 6, width), np.float32)
  xp[:3, :5] = x[0].reshape(3, 5, width)
  q, k, v = np.split(xp @ w["qkv"]["kernel"] + w["qkv"]["bias"], 3, axis=-1)
  out = np.zeros((4, 6, width), np.float32)
  d = width // heads
  for r in range(0, 4, window):
    for c in range(0, 6, window):
      cut = lambda t: t[r:r + window, c:c + window].reshape(window * window, heads, d)
      qw, kw, vw = cut(q), cut(k), cut(v)
      logits = np.einsum("nhd,mhd->hnm", qw, kw) / np.sqrt(d)
      probs = np.exp(logits - logits.max(-1, keepdims=True))
      probs /= probs.sum(-1, keepdims=True)
      out[r:r + window, c:c + window] = np.einsum("hnm,mhd->nhd", probs, vw).reshape(
          window, window, width)
  want = out[:3, :5].reshape(1, 15, width) @ w["proj"]["kernel"] + w["proj"]["bias"]
  np.testing.assert_allclose(np.asarray(y), want, atol=1e-5, rtol=1e-5)
  masked = attention.build({"name": "davit_window", "window_size": window}, num_heads=heads,
                           dtype=jnp.float32)
  assert np.abs(np.asarray(jax.jit(masked.apply)(p, x, ctx)[0]) - want).max() > 1e-3


@pytest.mark.parametrize("override,message", [
    (dict(tokens={"name": "evit", "keep_rate": 0.7}),
     "DaViT takes no token reducer (tokens='evit'): its windows and convolutions need the full "
     "grid; valid: tokens=None or 'none'"),
    (dict(scan=True), "DaViT cannot scan its blocks"),
    (dict(variant="XL"), "unknown DaViT variant 'XL'; valid: T, S, B"),
    (dict(num_heads=(1, 2, 4)), "must name the same number"),
    (dict(num_heads=(2, 3)), "stage 1 has width 32, not divisible by its num_heads 3"),
    (dict(padding="reflect"), "DaViT padding 'reflect'; valid: zeros, masked"),
    (dict(impl="cudnn"), "supports impl"),
])
def test_config_errors(override, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    tiny(**override)


def test_layer_ids():
  model = models.build({**TINY, "embed_dims": (16, 32, 64), "depths": (1, 2, 1),
                        "num_heads": (2, 2, 4)}, num_classes=10, image_size=SIZE)
  shapes = common.abstract_params(model)
  ids = {k: model.layer_id(k) for k in common.flatten(shapes)}
  assert ids["stem/conv/kernel"] == ids["stem/norm/scale"] == 0
  assert ids["stage_0/block_0/cpe1/proj/kernel"] == ids["stage_0/block_1/attn/qkv/kernel"] == 1
  assert ids["downsample_1/conv/kernel"] == ids["stage_1/block_1/mlp/fc2/bias"] == 2
  assert ids["stage_1/block_2/norm1/scale"] == ids["stage_1/block_3/cpe2/proj/bias"] == 3
  assert ids["downsample_2/norm/bias"] == ids["stage_2/block_1/norm2/scale"] == 4
  assert ids["norm/scale"] == ids["head/kernel"] == model.depth + 1 == 5
  scales = common.flatten(recipe.layer_scales(shapes, 0.5, model.depth, model.layer_id))
  assert float(scales["stage_0/block_0/attn/qkv/kernel"]) == 0.5 ** 4
  mask = common.flatten(optim.decay_mask(shapes))
  assert mask["stage_0/block_0/cpe1/proj/kernel"] and not mask["stage_0/block_0/cpe1/proj/bias"]


def test_timm_file_round_trip_and_official_layout(tmp_path):
  model = MODEL
  params = timm_reference.random_params(model)
  path = str(tmp_path / "davit.safetensors")
  checkpoints.save(path, params, model)
  loaded = checkpoints.load(path, model)
  for k, v in common.flatten(common.to_numpy(params)).items():
    np.testing.assert_array_equal(common.flatten(loaded)[k], v, err_msg=k)
  cfg = checkpoints.model_config(path)
  assert (cfg["name"], cfg["embed_dims"], cfg["depths"], cfg["num_heads"], cfg["mlp_ratio"]) == (
      "davit", (16, 32), (1, 1), (1, 1), 4.0)  # heads: width / 32 unless told
  rebuilt = checkpoints.build_model(path, image_size=SIZE, num_heads=(2, 4), window_size=4)
  assert isinstance(rebuilt, models.DaViT) and rebuilt.num_heads == model.num_heads
  # the official dingmyu/davit layout, inverting timm's checkpoint_filter_fn renames
  sd = timm_davit.to_timm(params, model)
  def official(k):
    k = k.replace("head.fc.", "head.").replace("head.norm.", "norms.")
    k = k.replace("stem.conv.", "stem.proj.").replace("stem.", "patch_embeds.0.")
    k = re.sub(r"stages\.(\d+)\.downsample\.conv\.", r"patch_embeds.\1.proj.", k)
    k = re.sub(r"stages\.(\d+)\.downsample\.", r"patch_embeds.\1.", k)
    k = re.sub(r"stages\.(\d+)\.blocks\.", r"main_blocks.\1.", k)
    return k.replace("cpe1", "cpe.0").replace("cpe2", "cpe.1")
  raw = {"state_dict": {official(k): v for k, v in sd.items()}}
  assert "patch_embeds.1.proj.weight" in raw["state_dict"]
  assert "main_blocks.1.0.1.cpe.1.proj.weight" in raw["state_dict"]
  from_official = timm_davit.from_timm(raw, model)
  for k, v in common.flatten(common.to_numpy(params)).items():
    np.testing.assert_array_equal(common.flatten(from_official)[k], v, err_msg=k)
  sd.pop("stages.1.downsample.conv.weight")
  with pytest.raises(checkpoints.CheckpointMismatch, match="missing keys"):
    timm_davit.from_timm(sd, model)
  with pytest.raises(ValueError, match="DaViT checkpoints are timm files"):
    checkpoints.save(str(tmp_path / "davit.npz"), params, model)


# ------------------------------------------------------------------ parity with timm
TORCH_SCRIPT = """
    kwargs, size, out = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
    torch.manual_seed(0)
    model = timm.create_model("davit_tiny", pretrained=False, **kwargs).eval()
    perturb(model)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{out}/timm.safetensors")
    x = torch.randn(2, 3, *size, requires_grad=True)
    logits = model(x)
    cot = torch.randn_like(logits)
    (logits * cot).sum().backward()
    save_file({k: p.grad.contiguous() for k, p in model.named_parameters()},
              f"{out}/grads.safetensors")
    ours = timm.create_model("davit_tiny", pretrained=False, **kwargs).eval()
    ours.load_state_dict(load_file(f"{out}/ours.safetensors"), strict=True)
    with torch.no_grad():
        ours_logits = ours(x)
    nhwc = lambda t: t.detach().permute(0, 2, 3, 1).numpy()
    np.savez(f"{out}/ref.npz", x=nhwc(x), logits=logits.detach().numpy(), cot=cot.numpy(),
             dx=nhwc(x.grad), ours_logits=ours_logits.numpy())
"""


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """timm's files and outputs; ours.safetensors is our random tiny DaViT, exported."""
  if not timm_reference.available():
    pytest.skip(timm_reference.SKIP_REASON)
  out = tmp_path_factory.mktemp("timm_davit")
  params = timm_reference.random_params(MODEL, seed=3)
  checkpoints.save(str(out / "ours.safetensors"), params, MODEL)
  timm_reference.run(TORCH_SCRIPT, json.dumps(TIMM_KWARGS), json.dumps(SIZE), str(out))
  return str(out), params


def test_logits_and_gradients_match_timm(reference):
  out, _ = reference
  ref = np.load(os.path.join(out, "ref.npz"))
  path = os.path.join(out, "timm.safetensors")
  model = checkpoints.build_model(path, image_size=SIZE, num_heads=ARCH["num_heads"],
                                  window_size=ARCH["window_size"])
  fields = ("embed_dims", "depths", "num_heads", "window_size", "mlp_ratio", "qkv_bias")
  assert all(getattr(model, f) == getattr(MODEL, f) for f in fields)
  params = checkpoints.load(path, model)
  logits, (grads, dx) = logits_and_grads(params, ref["x"], ref["cot"])
  np.testing.assert_allclose(np.asarray(logits), ref["logits"], atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(dx), ref["dx"], atol=1e-5, rtol=1e-3)
  theirs = timm_davit.timm_vit.read_state_dict(os.path.join(out, "grads.safetensors"))
  ours = timm_davit.to_timm(grads, model)
  assert set(ours) == set(theirs)
  for k, g in ours.items():
    np.testing.assert_allclose(g, theirs[k], atol=1e-4 * max(1.0, np.abs(theirs[k]).max()),
                               rtol=1e-3, err_msg=k)


def test_export_loads_strictly_into_timm_with_the_same_logits(reference):
  out, params = reference
  ref = np.load(os.path.join(out, "ref.npz"))
  logits, _ = logits_and_grads(params, ref["x"], ref["cot"])
  np.testing.assert_allclose(np.asarray(logits), ref["ours_logits"], atol=1e-4, rtol=0)


# ------------------------------------------------------------------ training, sharded
def test_train_step_on_eight_devices(data_dir):
  """Two FSDP-sharded steps of the tiniest DaViT (one stage: a spatial and a channel block,
  drop path, layer-wise lr decay) on 8 CPU devices: finite, every parameter moves, some are
  sharded."""
  from sharded_steps import fsdp_steps  # pylint: disable=import-outside-toplevel
  assert jax.device_count() == 8
  losses, metrics, before, after, shardings = fsdp_steps(
      data_dir, dict(name="davit", embed_dims=(16,), depths=(1,), num_heads=(1,), window_size=2,
                     drop_path=0.1))
  assert np.isfinite(losses).all() and float(metrics["train/nonfinite"]) == 0.0
  still = [k for k, v in before.items() if np.array_equal(after[k], v)]
  assert not still, still
  assert any("fsdp" in tuple(s.spec) for s in jax.tree_util.tree_leaves(shardings.params))
