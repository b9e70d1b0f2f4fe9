"""GC ViT: timm's parameter counts and MACs, a tiny model's forward / gradient / bf16, logits and
gradients equal to timm's (with `VITJAX_TORCH_PYTHON`), timm files in and out, config errors,
and a sharded train step on 8 CPU devices.

The parity model (embed dim 16, two stages of a local and a global block, heads (2, 4), window
ratio 16 on 64x32 images: 4x2 windows) has grids 16x8 and 8x4, so that its global query
generators pool twice and once, and the windows, grids and queries are not square (a transposed
reshape shows).
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm_reference

from vitjax import checkpoints, models
from vitjax.checkpoints import common, timm_gcvit
from vitjax.tokens import macs as macs_lib
from vitjax.train import optim, recipe

ARCH = dict(embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_ratio=(16, 16))
TINY = dict(name="gcvit", **ARCH)
TIMM_KWARGS = dict(ARCH, num_classes=10)
SIZE = (64, 32)


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
    ("XXT", 11_995_428, 2.12), ("XT", 19_981_294, 2.91), ("T", 28_221_974, 4.76),
    ("S", 51_092_173, 8.53), ("B", 90_320_836, 14.82)])
def test_variants_have_timms_parameter_counts(variant, count, gmacs):
  """timm's gcvit_{xxtiny,xtiny,tiny,small,base}; paper GFLOPs 2.1 / 2.6 / 4.7 / 8.5 / 14.8 (XT's
  2.6 is below what its depths (3, 4, 6, 5) count, between XXT's and T's)."""
  model = models.build({"name": "gcvit", "variant": variant}, num_classes=1000, image_size=224)
  assert models.num_params(common.abstract_params(model)) == count
  assert round(macs_lib.model_macs(model) / 1e9, 2) == gmacs
  assert model.windows() == [(7, 7), (7, 7), (14, 14), (7, 7)]
  assert [model.feature_levels(s) for s in range(4)] == [3, 2, 0, 0]  # the official GlobalQueryGen


def test_tiny_forward_gradient_bf16():
  params = timm_reference.random_params(MODEL)
  x = images()
  cot = np.random.default_rng(1).normal(size=(2, 10)).astype(np.float32)
  logits, (grads, dx) = logits_and_grads(params, x, cot)
  assert logits.shape == (2, 10) and np.isfinite(dx).all() and np.abs(dx).max() > 0
  shapes = jax.eval_shape(lambda p, x: MODEL.apply({"params": p}, x)[1], params, x)
  assert [shapes[f"stage_{s}"].shape for s in range(2)] == [(2, 16, 8, 16), (2, 8, 4, 32)]
  assert [shapes[f"global_query_{s}"].shape for s in range(2)] == [(2, 4, 2, 16), (2, 4, 2, 32)]
  assert set(params["global_0"]) == {"conv1", "conv2"} and set(params["global_1"]) == {"conv1"}
  local, glob = params["stage_1"]["block_2"]["attn"], params["stage_1"]["block_3"]["attn"]
  assert local["qkv"]["kernel"].shape == (32, 96) and glob["qkv"]["kernel"].shape == (32, 64)
  assert "global_block" not in glob  # the stage's global queries reached it
  flat = common.flatten(common.to_numpy(grads))
  assert all(np.isfinite(g).all() for g in flat.values())
  assert all(np.abs(g).max() > 0 for g in flat.values()), [k for k, g in flat.items()
                                                          if not np.abs(g).any()]
  # bfloat16 compute, float32 parameters and logits
  half = tiny("bfloat16")
  low = jax.jit(lambda p, x: half.apply({"params": p}, x)[0])(params, x)
  assert low.dtype == jnp.float32 and np.isfinite(low).all()
  np.testing.assert_allclose(low, logits, atol=0.05 * float(np.abs(logits).max()))
  # layer scale (S and B): gamma of both residual branches, as timm's ls1 / ls2
  scaled = common.abstract_params(tiny(layer_scale=1e-5))
  assert scaled["stage_0"]["block_1"]["ls2"]["gamma"].shape == (16,)


@pytest.mark.parametrize("override,message", [
    (dict(tokens={"name": "evit", "keep_rate": 0.7}),
     "GC ViT takes no token reducer (tokens='evit'): its windows, convolutions and global "
     "queries need the full grid; valid: tokens=None or 'none'"),
    (dict(scan=True), "GC ViT cannot scan its blocks"),
    (dict(variant="L"), "unknown GC ViT variant 'L'; valid: XXT, XT, T, S, B"),
    (dict(num_heads=(1, 2, 4)), "must name the same number"),
    (dict(num_heads=(2, 3)), "stage 1 has width 32, not divisible by its num_heads 3"),
    (dict(window_ratio=(16,)), "window_ratio (16,) names fewer than the 2 stages"),
    (dict(window_size=3), "stage 0 has a 16x8 grid and a 3x3 window; GC ViT needs the grid to "
     "be the window times a power of 2 on both axes"),
    (dict(window_ratio=(16, 12)), "stage 1 has a 8x4 grid and a 5x2 window"),
    (dict(window_ratio=(16, 64)), "stage 1 has a 8x4 grid and a 1x0 window"),
    (dict(impl="cudnn"), "supports impl"),
])
def test_config_errors(override, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    tiny(**override)


def test_layer_ids():
  model = models.build({**TINY, "depths": (2, 3)}, num_classes=10, image_size=SIZE)
  shapes = common.abstract_params(model)
  ids = {k: model.layer_id(k) for k in common.flatten(shapes)}
  assert ids["stem/conv1/kernel"] == ids["stem/down/conv_block/se/fc1/kernel"] == 0
  assert ids["global_0/conv2/conv_pw/kernel"] == ids["stage_0/block_0/attn/qkv/kernel"] == 1
  assert ids["stage_0/block_1/mlp/fc2/bias"] == 2
  assert ids["downsample_1/reduction/kernel"] == ids["global_1/conv1/conv_dw/kernel"] == 3
  assert ids["stage_1/block_2/norm1/scale"] == 3 and ids["stage_1/block_4/norm2/bias"] == 5
  assert ids["norm/scale"] == ids["head/kernel"] == model.depth + 1 == 6
  scales = common.flatten(recipe.layer_scales(shapes, 0.5, model.depth, model.layer_id))
  assert float(scales["stage_0/block_0/attn/qkv/kernel"]) == 0.5 ** 5
  mask = common.flatten(optim.decay_mask(shapes))
  assert mask["stage_0/block_1/attn/qkv/kernel"] and mask["global_0/conv1/conv_dw/kernel"]
  assert not mask["stage_0/block_1/attn/relative_position_bias_table"]
  assert not mask["stem/down/norm1/bias"]


def test_timm_file_round_trip(tmp_path):
  model = MODEL
  params = timm_reference.random_params(model)
  path = str(tmp_path / "gcvit.safetensors")
  checkpoints.save(path, params, model)
  loaded = checkpoints.load(path, model)
  for k, v in common.flatten(common.to_numpy(params)).items():
    np.testing.assert_array_equal(common.flatten(loaded)[k], v, err_msg=k)
  cfg = checkpoints.model_config(path)
  assert (cfg["name"], cfg["embed_dim"], cfg["depths"], cfg["num_heads"], cfg["mlp_ratio"],
          cfg["layer_scale"]) == ("gcvit", 16, (2, 2), (2, 4), 3.0, None)
  assert "window_size" not in cfg  # 4x2 windows: not square, so not told by the tables
  rebuilt = checkpoints.build_model(path, image_size=SIZE, window_ratio=(16, 16))
  assert isinstance(rebuilt, models.GCViT) and rebuilt.windows() == model.windows()
  sd = timm_gcvit.to_timm(params, model)
  assert sd["stages.1.blocks.1.attn.rel_pos.relative_position_bias_table"].shape == (21, 4)
  assert sd["stages.0.global_block.blocks.conv2.se.fc1.weight"].shape == (8, 16, 1, 1)
  sd.pop("stages.1.global_block.blocks.conv1.conv_pw.weight")
  with pytest.raises(checkpoints.CheckpointMismatch, match="missing keys"):
    timm_gcvit.from_timm(sd, model)
  with pytest.raises(ValueError, match="GCViT checkpoints are timm files"):
    checkpoints.save(str(tmp_path / "gcvit.npz"), params, model)


def test_square_windows_are_read_from_the_file(tmp_path):
  model = models.build({**TINY, "window_size": 4}, num_classes=10, image_size=32)
  path = str(tmp_path / "square.safetensors")
  checkpoints.save(path, timm_reference.random_params(model), model)
  assert checkpoints.model_config(path)["window_size"] == (4, 4)
  assert checkpoints.build_model(path, image_size=32).windows() == [(4, 4), (4, 4)]


# ------------------------------------------------------------------ parity with timm
TORCH_SCRIPT = """
    from timm.models.gcvit import GlobalContextVit
    kwargs, size, out = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
    torch.manual_seed(0)
    model = GlobalContextVit(img_size=size, **kwargs).eval()
    perturb(model)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{out}/timm.safetensors")
    x = torch.randn(2, 3, *size, requires_grad=True)
    logits = model(x)
    cot = torch.randn_like(logits)
    (logits * cot).sum().backward()
    save_file({k: p.grad.contiguous() for k, p in model.named_parameters()},
              f"{out}/grads.safetensors")
    ours = GlobalContextVit(img_size=size, **kwargs).eval()
    ours.load_state_dict(load_file(f"{out}/ours.safetensors"), strict=True)
    with torch.no_grad():
        ours_logits = ours(x)
    nhwc = lambda t: t.detach().permute(0, 2, 3, 1).numpy()
    np.savez(f"{out}/ref.npz", x=nhwc(x), logits=logits.detach().numpy(), cot=cot.numpy(),
             dx=nhwc(x.grad), ours_logits=ours_logits.numpy())
"""


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """timm's files and outputs; ours.safetensors is our random tiny GC ViT, exported."""
  if not timm_reference.available():
    pytest.skip(timm_reference.SKIP_REASON)
  out = tmp_path_factory.mktemp("timm_gcvit")
  params = timm_reference.random_params(MODEL, seed=3)
  checkpoints.save(str(out / "ours.safetensors"), params, MODEL)
  timm_reference.run(TORCH_SCRIPT, json.dumps(TIMM_KWARGS), json.dumps(SIZE), str(out))
  return str(out), params


def test_logits_and_gradients_match_timm(reference):
  out, _ = reference
  ref = np.load(os.path.join(out, "ref.npz"))
  path = os.path.join(out, "timm.safetensors")
  model = checkpoints.build_model(path, image_size=SIZE, window_ratio=ARCH["window_ratio"])
  fields = ("embed_dim", "depths", "num_heads", "mlp_ratio", "qkv_bias", "layer_scale")
  assert all(getattr(model, f) == getattr(MODEL, f) for f in fields)
  assert model.windows() == MODEL.windows()
  params = checkpoints.load(path, model)
  logits, (grads, dx) = logits_and_grads(params, ref["x"], ref["cot"])
  np.testing.assert_allclose(np.asarray(logits), ref["logits"], atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(dx), ref["dx"], atol=1e-4, rtol=1e-3)
  theirs = timm_gcvit.timm_vit.read_state_dict(os.path.join(out, "grads.safetensors"))
  ours = timm_gcvit.to_timm(grads, model)
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
  """Two FSDP-sharded steps of the tiniest GC ViT (one stage: a local and a global block, drop
  path, layer-wise lr decay) on 8 CPU devices: finite, every parameter moves, some are
  sharded."""
  from sharded_steps import fsdp_steps  # pylint: disable=import-outside-toplevel
  assert jax.device_count() == 8
  losses, metrics, before, after, shardings = fsdp_steps(
      data_dir, dict(name="gcvit", embed_dim=16, depths=(2,), num_heads=(1,), window_size=2,
                     drop_path=0.1))
  assert np.isfinite(losses).all() and float(metrics["train/nonfinite"]) == 0.0
  still = [k for k, v in before.items() if np.array_equal(after[k], v)]
  assert not still, still
  assert any("fsdp" in tuple(s.spec) for s in jax.tree_util.tree_leaves(shardings.params))
