"""Swin Transformer: timm's parameter counts and MACs, a tiny model's forward / gradient / bf16,
logits and gradients equal to timm's (with `VITJAX_TORCH_PYTHON`), timm files in and out, config
errors, and a sharded train step on 8 CPU devices.

The parity model (embed 32, depths (2, 2, 1), heads (1, 2, 4), window 4, 32 px) has grids 8, 4
and 2: shifted windows in stage 0, a window equal to the grid (so not shifted) in stage 1 and a
window shrunk to the 2x2 grid (a 3x3 table) in stage 2.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm_reference

from vitjax import checkpoints, models
from vitjax.checkpoints import common, timm_swin
from vitjax.tokens import macs as macs_lib
from vitjax.train import optim, recipe

TINY = dict(name="swin", embed_dim=32, depths=(2, 2, 1), num_heads=(1, 2, 4), window_size=4)
TIMM_KWARGS = dict(img_size=32, embed_dim=32, depths=(2, 2, 1), num_heads=(1, 2, 4),
                   window_size=4, num_classes=10)
SIZE = 32


def tiny(dtype="float32", **kw):
  return models.build({**TINY, **kw}, num_classes=10, image_size=SIZE, dtype=dtype)


def images(n=2, seed=7):
  return np.random.default_rng(seed).normal(size=(n, SIZE, SIZE, 3)).astype(np.float32)


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
    ("T", 28_288_354, 4.49), ("S", 49_606_258, 8.74), ("B", 87_768_224, 15.43)])
def test_variants_have_timms_parameter_counts(variant, count, gmacs):
  model = models.build({"name": "swin", "variant": variant}, num_classes=1000, image_size=224)
  shapes = common.abstract_params(model)
  assert models.num_params(shapes) == count
  assert round(macs_lib.model_macs(model) / 1e9, 2) == gmacs  # paper: 4.5 / 8.7 / 15.4 G


def test_tiny_forward_gradient_bf16():
  params = timm_reference.random_params(MODEL)
  x = images()
  cot = np.random.default_rng(1).normal(size=(2, 10)).astype(np.float32)
  logits, (grads, dx) = logits_and_grads(params, x, cot)
  assert logits.shape == (2, 10) and np.isfinite(dx).all() and np.abs(dx).max() > 0
  shapes = jax.eval_shape(lambda p, x: MODEL.apply({"params": p}, x)[1], params, x)
  assert [shapes[f"stage_{s}"].shape for s in range(3)] == [(2, 8, 8, 32), (2, 4, 4, 64),
                                                            (2, 2, 2, 128)]
  # window 4 on the 2x2 grid of stage 2 shrinks to it: a 3x3 table
  assert params["stage_0"]["block_1"]["attn"]["relative_position_bias_table"].shape == (49, 1)
  assert params["stage_2"]["block_0"]["attn"]["relative_position_bias_table"].shape == (9, 4)
  flat = common.flatten(common.to_numpy(grads))
  assert all(np.isfinite(g).all() for g in flat.values())
  assert all(np.abs(g).max() > 0 for g in flat.values()), [k for k, g in flat.items()
                                                          if not np.abs(g).any()]
  # bfloat16 compute, float32 parameters and logits
  half = tiny("bfloat16")
  low = jax.jit(lambda p, x: half.apply({"params": p}, x)[0])(params, x)
  assert low.dtype == jnp.float32 and np.isfinite(low).all()
  np.testing.assert_allclose(low, logits, atol=0.05 * float(np.abs(logits).max()))


@pytest.mark.parametrize("override,message", [
    (dict(tokens={"name": "evit", "keep_rate": 0.7}),
     "Swin takes no token reducer (tokens='evit'): its window attention needs the full grid; "
     "valid: tokens=None or 'none'"),
    (dict(scan=True), "Swin cannot scan its blocks"),
    (dict(variant="XL"), "unknown Swin variant 'XL'; valid: T, S, B, L"),
    (dict(num_heads=(1, 2)), "must name the same number"),
    (dict(num_heads=(1, 3, 4)), "stage 1 has width 64, not divisible by its num_heads 3"),
])
def test_config_errors(override, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    tiny(**override)


def test_layer_ids_and_no_decay_on_tables():
  model = tiny()
  shapes = common.abstract_params(model)
  ids = {k: model.layer_id(k) for k in common.flatten(shapes)}
  assert ids["embedding_kernel"] == ids["embedding_norm/scale"] == 0
  assert ids["stage_0/block_0/attn/qkv/kernel"] == 1
  assert ids["merge_1/reduction/kernel"] == ids["stage_1/block_0/norm1/scale"] == 3
  assert ids["merge_2/norm/bias"] == ids["stage_2/block_0/mlp/fc2/kernel"] == 5
  assert ids["norm/scale"] == ids["head/kernel"] == model.depth + 1 == 6
  scales = common.flatten(recipe.layer_scales(shapes, 0.5, model.depth, model.layer_id))
  assert float(scales["stage_0/block_0/attn/qkv/kernel"]) == 0.5 ** 5
  mask = common.flatten(optim.decay_mask(shapes))
  assert not mask["stage_0/block_1/attn/relative_position_bias_table"]
  assert mask["stage_0/block_1/attn/qkv/kernel"] and mask["merge_1/reduction/kernel"]


def test_timm_file_round_trip_and_official_layout(tmp_path):
  model = tiny()
  params = timm_reference.random_params(model)
  path = str(tmp_path / "swin.safetensors")
  checkpoints.save(path, params, model)
  loaded = checkpoints.load(path, model)
  for k, v in common.flatten(common.to_numpy(params)).items():
    np.testing.assert_array_equal(common.flatten(loaded)[k], v, err_msg=k)
  cfg = checkpoints.model_config(path)
  assert (cfg["depths"], cfg["num_heads"], cfg["window_size"], cfg["embed_dim"]) == (
      (2, 2, 1), (1, 2, 4), 4, 32)
  rebuilt = checkpoints.build_model(path, image_size=SIZE)
  assert (rebuilt.depths, rebuilt.num_heads) == (model.depths, model.num_heads)
  # the official layout: merging at the end of the previous stage, head.weight, buffers
  sd = timm_swin.to_timm(params, model)
  official = {k.replace("head.fc.", "head."): v for k, v in sd.items()}
  for s in (1, 2):
    for k in [k for k in official if k.startswith(f"layers.{s}.downsample")]:
      official[k.replace(f"layers.{s}.", f"layers.{s - 1}.")] = official.pop(k)
  official["layers.0.blocks.1.attn_mask"] = np.zeros((4, 16, 16), np.float32)
  from_official = timm_swin.from_timm({"model": official}, model)
  for k, v in common.flatten(common.to_numpy(params)).items():
    np.testing.assert_array_equal(common.flatten(from_official)[k], v, err_msg=k)
  sd.pop("layers.1.downsample.reduction.weight")
  with pytest.raises(checkpoints.CheckpointMismatch, match="missing keys"):
    timm_swin.from_timm(sd, model)
  with pytest.raises(ValueError, match="Swin checkpoints are timm files"):
    checkpoints.save(str(tmp_path / "swin.npz"), params, model)


# ------------------------------------------------------------------ parity with timm
TORCH_SCRIPT = """
    kwargs, out = json.loads(sys.argv[1]), sys.argv[2]
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, **kwargs).eval()
    perturb(model)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{out}/timm.safetensors")
    x = torch.randn(2, 3, kwargs["img_size"], kwargs["img_size"], requires_grad=True)
    logits = model(x)
    cot = torch.randn_like(logits)
    (logits * cot).sum().backward()
    save_file({k: p.grad.contiguous() for k, p in model.named_parameters()},
              f"{out}/grads.safetensors")
    ours = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, **kwargs).eval()
    ours.load_state_dict(load_file(f"{out}/ours.safetensors"), strict=True)
    with torch.no_grad():
        ours_logits = ours(x)
    nhwc = lambda t: t.detach().permute(0, 2, 3, 1).numpy()
    np.savez(f"{out}/ref.npz", x=nhwc(x), logits=logits.detach().numpy(), cot=cot.numpy(),
             dx=nhwc(x.grad), ours_logits=ours_logits.numpy())
"""


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """timm's files and outputs; ours.safetensors is our random tiny Swin, exported."""
  if not timm_reference.available():
    pytest.skip(timm_reference.SKIP_REASON)
  out = tmp_path_factory.mktemp("timm_swin")
  params = timm_reference.random_params(MODEL, seed=3)
  checkpoints.save(str(out / "ours.safetensors"), params, MODEL)
  timm_reference.run(TORCH_SCRIPT, json.dumps(TIMM_KWARGS), str(out))
  return str(out), MODEL, params


def test_logits_and_gradients_match_timm(reference):
  out, _, _ = reference
  ref = np.load(os.path.join(out, "ref.npz"))
  path = os.path.join(out, "timm.safetensors")
  model = checkpoints.build_model(path, image_size=SIZE)
  fields = ("embed_dim", "depths", "num_heads", "window_size", "mlp_ratio", "patch_size")
  assert all(getattr(model, f) == getattr(MODEL, f) for f in fields)
  params = checkpoints.load(path, model)
  logits, (grads, dx) = logits_and_grads(params, ref["x"], ref["cot"])
  np.testing.assert_allclose(np.asarray(logits), ref["logits"], atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(dx), ref["dx"], atol=1e-5, rtol=1e-3)
  theirs = timm_swin.timm_vit.read_state_dict(os.path.join(out, "grads.safetensors"))
  ours = timm_swin.to_timm(grads, model)
  assert set(ours) == set(theirs)
  for k, g in ours.items():
    np.testing.assert_allclose(g, theirs[k], atol=1e-4 * max(1.0, np.abs(theirs[k]).max()),
                               rtol=1e-3, err_msg=k)


def test_export_loads_strictly_into_timm_with_the_same_logits(reference):
  out, _, params = reference
  ref = np.load(os.path.join(out, "ref.npz"))
  logits, _ = logits_and_grads(params, ref["x"], ref["cot"])
  np.testing.assert_allclose(np.asarray(logits), ref["ours_logits"], atol=1e-4, rtol=0)


# ------------------------------------------------------------------ training, sharded
def test_train_step_on_eight_devices(data_dir):
  """Two FSDP-sharded steps of a tiny Swin (drop path, layer-wise lr decay) on 8 CPU
  devices: finite, every parameter moves, some are sharded."""
  from sharded_steps import fsdp_steps  # pylint: disable=import-outside-toplevel
  assert jax.device_count() == 8
  # one stage (each stage's shapes compile anew): a window and a shifted-window block
  losses, metrics, before, after, shardings = fsdp_steps(
      data_dir, dict(name="swin", patch_size=2, embed_dim=16, depths=(2,), num_heads=(1,),
                     window_size=2, drop_path=0.1))
  assert np.isfinite(losses).all() and float(metrics["train/nonfinite"]) == 0.0
  still = [k for k, v in before.items() if np.array_equal(after[k], v)]
  assert not still, still
  assert any("fsdp" in tuple(s.spec) for s in jax.tree_util.tree_leaves(shardings.params))
