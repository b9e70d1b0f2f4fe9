"""MViTv2: timm's parameter counts and MACs, a tiny model's forward / gradient / bf16, logits and
gradients equal to timm's (with `VITJAX_TORCH_PYTHON`), timm and official files in and out,
config errors, and a sharded train step on 8 CPU devices.

The parity model (embed dims (16, 32), depths (1, 2), heads (1, 2), 32x32 images) has an 8x8
grid in stage 0 with keys and values pooled to 2x2 (adaptive stride 4: rel-pos ratio 4) and a
4x4 grid in stage 1, whose first block pools the query with stride 2, widens 16 -> 32 through
`shortcut_proj_attn` and max-pools the shortcut; its second block pools the keys to 2x2.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm_reference

from vitjax import checkpoints, models
from vitjax.checkpoints import common, timm_mvitv2
from vitjax.models import mvitv2
from vitjax.tokens import macs as macs_lib
from vitjax.train import optim, recipe

ARCH = dict(embed_dims=(16, 32), depths=(1, 2), num_heads=(1, 2), q_strides=(1, 2))
TINY = dict(name="mvitv2", **ARCH)
SIZE = (32, 32)


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
    ("T", 24_173_320, 4.68), ("S", 34_870_216, 6.96), ("B", 51_472_744, 10.10)])
def test_variants_have_timms_parameter_counts(variant, count, gmacs):
  model = models.build({"name": "mvitv2", "variant": variant}, num_classes=1000, image_size=224)
  assert models.num_params(common.abstract_params(model)) == count
  assert round(macs_lib.model_macs(model) / 1e9, 2) == gmacs  # paper: 4.7 / 7.0 / 10.2 G
  assert model.stage_grids() == [(56, 56), (28, 28), (14, 14), (7, 7)]
  assert model.stage_kv_strides() == (4, 2, 1, 1)  # timm's stride_kv from stride_kv_adaptive


def test_tiny_forward_gradient_bf16():
  params = timm_reference.random_params(MODEL)
  x = images()
  cot = np.random.default_rng(1).normal(size=(2, 10)).astype(np.float32)
  logits, (grads, dx) = logits_and_grads(params, x, cot)
  assert logits.shape == (2, 10) and np.isfinite(dx).all() and np.abs(dx).max() > 0
  shapes = jax.eval_shape(lambda p, x: MODEL.apply({"params": p}, x)[1], params, x)
  assert [shapes[f"stage_{s}"].shape for s in range(2)] == [(2, 8, 8, 16), (2, 4, 4, 32)]
  assert set(params) == {"patch_embed", "stage_0", "pool_block_1", "stage_1", "norm", "head"}
  assert set(params["stage_1"]) == {"block_1"}
  block = params["pool_block_1"]
  assert set(block) == {"norm1", "shortcut_proj_attn", "attn", "norm2", "mlp"}
  attn = block["attn"]
  assert attn["pool_q"]["kernel"].shape == (3, 3, 1, 16) and attn["qkv"]["kernel"].shape == (16, 96)
  assert attn["rel_pos_h"].shape == (7, 16)  # q 4x4 over keys 2x2 (8x8 pooled with stride 4)
  assert params["stage_0"]["block_0"]["attn"]["rel_pos_w"].shape == (15, 16)
  flat = common.flatten(common.to_numpy(grads))
  assert all(np.isfinite(g).all() for g in flat.values())
  # norm_k's bias moves every logit of a row alike: its gradient is 0, as it is in timm
  zero = [k for k, g in flat.items() if not np.abs(g).any()]
  assert all(k.endswith("norm_k/bias") for k in zero), zero
  # bfloat16 compute, float32 parameters and logits
  half = tiny("bfloat16")
  low = jax.jit(lambda p, x: half.apply({"params": p}, x)[0])(params, x)
  assert low.dtype == jnp.float32 and np.isfinite(low).all()
  np.testing.assert_allclose(low, logits, atol=0.05 * float(np.abs(logits).max()))


def test_shortcut_pool_and_strides():
  """The shortcut's max pool (kernel 3, stride 2, padding 1: -inf padding) and the adaptive
  key/value strides."""
  x = np.arange(2 * 25, dtype=np.float32).reshape(1, 25, 2) * np.array([1.0, -1.0], np.float32)
  y = np.asarray(mvitv2.pooled_tokens(jnp.asarray(x), (5, 5), 2, 0)).reshape(3, 3, 2)
  g = x.reshape(5, 5, 2)
  want = np.array([[g[max(0, 2 * i - 1):2 * i + 2, max(0, 2 * j - 1):2 * j + 2].max((0, 1))
                    for j in range(3)] for i in range(3)])
  np.testing.assert_array_equal(y, want)
  assert mvitv2.kv_strides((1, 2, 2, 2)) == (4, 2, 1, 1)
  assert mvitv2.kv_strides((2, 1, 2), first=8) == (4, 4, 2)


@pytest.mark.parametrize("override,message", [
    (dict(tokens={"name": "evit", "keep_rate": 0.7}),
     "MViTv2 takes no token reducer (tokens='evit'): its query pooling changes the token count "
     "and its poolings need the full grid; valid: tokens=None or 'none'"),
    (dict(scan=True), "MViTv2 cannot scan its blocks"),
    (dict(variant="XL"), "unknown MViTv2 variant 'XL'; valid: T, S, B"),
    (dict(num_heads=(1, 2, 4)), "must name the same number"),
    (dict(q_strides=(1, 0)), "must be positive ints"),
    (dict(num_heads=(2, 3)), "stage 1 has width 32, not divisible by its num_heads 3"),
])
def test_config_errors(override, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    tiny(**override)


def test_layer_ids():
  model = models.build({**TINY, "embed_dims": (16, 32, 64), "depths": (2, 2, 1),
                        "num_heads": (1, 2, 2), "q_strides": (1, 2, 2)}, num_classes=10,
                       image_size=SIZE)
  shapes = common.abstract_params(model)
  ids = {k: model.layer_id(k) for k in common.flatten(shapes)}
  assert ids["patch_embed/kernel"] == ids["patch_embed/bias"] == 0
  assert ids["stage_0/block_0/attn/qkv/kernel"] == 1
  assert ids["stage_0/block_1/attn/rel_pos_h"] == 2
  assert ids["pool_block_1/shortcut_proj_attn/kernel"] == ids["pool_block_1/mlp/fc2/bias"] == 3
  assert ids["stage_1/block_1/norm1/scale"] == 4
  assert ids["pool_block_2/attn/pool_q/kernel"] == 5
  assert ids["norm/scale"] == ids["head/kernel"] == model.depth + 1 == 6
  scales = common.flatten(recipe.layer_scales(shapes, 0.5, model.depth, model.layer_id))
  assert float(scales["stage_0/block_0/attn/qkv/kernel"]) == 0.5 ** 5
  mask = common.flatten(optim.decay_mask(shapes))
  assert mask["stage_0/block_0/attn/qkv/kernel"] and mask["pool_block_1/attn/pool_q/kernel"]
  assert not mask["stage_0/block_0/attn/rel_pos_h"] and not mask["pool_block_1/attn/rel_pos_w"]
  assert not mask["stage_0/block_0/attn/norm_q/scale"]


def test_timm_file_round_trip_and_official_layout(tmp_path):
  model = MODEL
  params = timm_reference.random_params(model)
  path = str(tmp_path / "mvitv2.safetensors")
  checkpoints.save(path, params, model)
  loaded = checkpoints.load(path, model)
  for k, v in common.flatten(common.to_numpy(params)).items():
    np.testing.assert_array_equal(common.flatten(loaded)[k], v, err_msg=k)
  cfg = checkpoints.model_config(path)
  assert (cfg["name"], cfg["embed_dims"], cfg["depths"], cfg["num_heads"], cfg["q_strides"],
          cfg["mlp_ratio"], cfg["image_size"]) == ("mvitv2", (16, 32), (1, 2), (1, 2), (1, 2),
                                                   4.0, 32)
  rebuilt = checkpoints.build_model(path)
  assert isinstance(rebuilt, models.MViTv2) and rebuilt.image_size == SIZE
  # the official facebookresearch/mvit layout, inverting timm's checkpoint_filter_fn renames
  sd = timm_mvitv2.to_timm(params, model)
  flat_index = {(0, 0): 0, (1, 0): 1, (1, 1): 2}
  def official(k):
    if k.startswith("stages."):
      _, s, _, j, rest = k.split(".", 4)
      k = f"blocks.{flat_index[int(s), int(j)]}.{rest}"
    return k.replace("shortcut_proj_attn", "proj").replace("head.fc", "head.projection")
  raw = {"model_state": {official(k): v for k, v in sd.items()}}
  assert "blocks.1.proj.weight" in raw["model_state"]
  from_official = timm_mvitv2.from_timm(raw, model)
  for k, v in common.flatten(common.to_numpy(params)).items():
    np.testing.assert_array_equal(common.flatten(from_official)[k], v, err_msg=k)
  sd.pop("stages.1.blocks.0.attn.rel_pos_h")
  with pytest.raises(checkpoints.CheckpointMismatch, match="missing keys"):
    timm_mvitv2.from_timm(sd, model)
  with pytest.raises(ValueError, match="MViTv2 checkpoints are timm files"):
    checkpoints.save(str(tmp_path / "mvitv2.npz"), params, model)


# ------------------------------------------------------------------ parity with timm
TORCH_SCRIPT = """
    from timm.models.mvitv2 import MultiScaleVit, MultiScaleVitCfg
    arch, size, out = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
    def build():
        cfg = MultiScaleVitCfg(depths=tuple(arch["depths"]), embed_dim=tuple(arch["embed_dims"]),
                               num_heads=tuple(arch["num_heads"]),
                               stride_q=tuple((s, s) for s in arch["q_strides"]))
        return MultiScaleVit(cfg, img_size=tuple(size), num_classes=10).eval()
    torch.manual_seed(0)
    model = build()
    perturb(model)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{out}/timm.safetensors")
    x = torch.randn(2, 3, *size, requires_grad=True)
    logits = model(x)
    cot = torch.randn_like(logits)
    (logits * cot).sum().backward()
    save_file({k: p.grad.contiguous() for k, p in model.named_parameters()},
              f"{out}/grads.safetensors")
    ours = build()
    ours.load_state_dict(load_file(f"{out}/ours.safetensors"), strict=True)
    with torch.no_grad():
        ours_logits = ours(x)
    nhwc = lambda t: t.detach().permute(0, 2, 3, 1).numpy()
    np.savez(f"{out}/ref.npz", x=nhwc(x), logits=logits.detach().numpy(), cot=cot.numpy(),
             dx=nhwc(x.grad), ours_logits=ours_logits.numpy())
"""


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """timm's files and outputs; ours.safetensors is our random tiny MViTv2, exported."""
  if not timm_reference.available():
    pytest.skip(timm_reference.SKIP_REASON)
  out = tmp_path_factory.mktemp("timm_mvitv2")
  params = timm_reference.random_params(MODEL, seed=3)
  checkpoints.save(str(out / "ours.safetensors"), params, MODEL)
  timm_reference.run(TORCH_SCRIPT, json.dumps(ARCH), json.dumps(SIZE), str(out))
  return str(out), params


def test_logits_and_gradients_match_timm(reference):
  out, _ = reference
  ref = np.load(os.path.join(out, "ref.npz"))
  path = os.path.join(out, "timm.safetensors")
  model = checkpoints.build_model(path)
  fields = ("embed_dims", "depths", "num_heads", "q_strides", "kv_stride", "mlp_ratio",
            "qkv_bias", "image_size")
  assert all(getattr(model, f) == getattr(MODEL, f) for f in fields)
  params = checkpoints.load(path, model)
  logits, (grads, dx) = logits_and_grads(params, ref["x"], ref["cot"])
  np.testing.assert_allclose(np.asarray(logits), ref["logits"], atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(dx), ref["dx"], atol=1e-5, rtol=1e-3)
  theirs = timm_mvitv2.timm_vit.read_state_dict(os.path.join(out, "grads.safetensors"))
  ours = timm_mvitv2.to_timm(grads, model)
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
  """Two FSDP-sharded steps of a tiny MViTv2 (two stages, the second pooling its query and
  widening, drop path, layer-wise lr decay) on 8 CPU devices, the digits resized to 32 px (more
  than one pooled key): finite, every parameter moves (but norm_k's bias, whose gradient is 0),
  some are sharded."""
  from sharded_steps import fsdp_steps  # pylint: disable=import-outside-toplevel
  assert jax.device_count() == 8
  losses, metrics, before, after, shardings = fsdp_steps(
      data_dir, dict(name="mvitv2", embed_dims=(16, 32), depths=(1, 1), num_heads=(1, 2),
                     q_strides=(1, 2), drop_path=0.1), pp="resize(32)|value_range(-1, 1)")
  assert np.isfinite(losses).all() and float(metrics["train/nonfinite"]) == 0.0
  still = [k for k, v in before.items() if np.array_equal(after[k], v)]
  assert all(k.endswith("norm_k/bias") for k in still), still
  assert any("fsdp" in tuple(s.spec) for s in jax.tree_util.tree_leaves(shardings.params))
