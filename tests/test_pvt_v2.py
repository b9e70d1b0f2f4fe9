"""PVTv2: parameter counts equal timm's, a tiny model's forward / gradient / bf16 / jit, timm
parity of logits and input gradients on a reduced PVTv2 (stages with sr 8, 4, 2, 1) and of logits
on a reduced linear-SRA one, export that timm loads strictly, config-time errors, layer-wise lr
decay groups, an 8-device train step.

Parity needs `VITJAX_TORCH_PYTHON` (see tests/timm_reference.py); it is skipped otherwise.
"""
import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vitjax import checkpoints, models
from vitjax.checkpoints import common, timm_pvt_v2
from vitjax.tokens import macs
from vitjax.train import recipe

import timm_reference as timm_reference_lib

# sum(p.numel() for p in timm.create_model("pvt_v2_bX").parameters()), timm 1.0.31
TIMM_PARAMS = {"b0": 3_666_760, "b1": 14_009_000, "b2": 25_362_856, "b2_li": 22_553_512}
# the PVTv2 paper (multiply-adds at 224 px)
PAPER_GFLOPS = {"b0": 0.6, "b1": 2.1, "b2": 4.0, "b2_li": 3.9}
# a reduced PVTv2 with every code path of the real ones: sr 8, 4, 2 (conv + LN) and 1 (none)
TINY = dict(embed_dims=(16, 32, 40, 64), depths=(1, 1, 2, 1))
SIZE = 64
# two stages (sr 2, then none): the cheaper model of the tests that need only the code paths
TWO_STAGES = dict(embed_dims=(8, 16), depths=(1, 1), num_heads=(1, 2), sr_ratios=(2, 1),
                  mlp_ratios=(2, 2))


def tiny(dtype="float32", **kw):
  return models.build({"name": "pvt_v2", "variant": "b0", **TINY, **kw}, num_classes=10,
                      image_size=SIZE, dtype=dtype)


def images(n=2, seed=7):
  return np.random.default_rng(seed).normal(size=(n, SIZE, SIZE, 3)).astype(np.float32)


def random_params(model, seed=0):
  """Random numpy parameters of the model's shapes (no compiled init): LayerNorm gains near 1,
  everything else (biases included) small and non-zero, so that a dropped parameter shows."""
  shapes = common.abstract_params(model)
  rng = np.random.default_rng(seed)
  def draw(path, s):
    gain = str(getattr(path[-1], "key", path[-1])) == "scale"
    return (float(gain) + rng.normal(0.0, 0.1 if gain else 0.05, s.shape)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(draw, shapes)


@functools.partial(jax.jit, static_argnums=0)
def logits_and_grads(model, params, x):
  """(logits, (d params, d images)) of sum(logits * a fixed ramp): one compile per config."""
  def loss(p, x):
    logits = model.apply({"params": p}, x)[0]
    return (logits * jnp.linspace(-1, 1, logits.size).reshape(logits.shape)).sum(), logits
  grads, logits = jax.grad(loss, argnums=(0, 1), has_aux=True)(params, x)
  return logits, grads


@pytest.fixture(scope="module")
def tiny_params():
  return random_params(tiny())


@pytest.mark.parametrize("variant", list(TIMM_PARAMS))
def test_parameter_counts_equal_timm_and_macs_the_papers(variant):
  model = models.build({"name": "pvt_v2", "variant": variant}, num_classes=1000, image_size=224)
  assert models.num_params(common.abstract_params(model)) == TIMM_PARAMS[variant]
  assert round(macs.model_macs(model) / 1e9, 1) == PAPER_GFLOPS[variant]


def test_tiny_forward_and_gradient(tiny_params):
  model = tiny()
  logits, (grads, _) = logits_and_grads(model, tiny_params, images())
  assert logits.shape == (2, 10) and np.isfinite(logits).all()
  flat = common.flatten(grads)
  assert all(np.isfinite(g).all() for g in flat.values())
  assert not [k for k, g in flat.items() if not np.abs(g).max() > 0]  # every parameter is used
  _, out = jax.eval_shape(model.apply, {"params": tiny_params}, images())
  assert [out[f"stage_{i}"].shape for i in range(4)] == [
      (2, 16, 16, 16), (2, 8, 8, 32), (2, 4, 4, 40), (2, 2, 2, 64)]


def test_bf16_follows_fp32():
  model = tiny(**TWO_STAGES)
  params = random_params(model)
  ref, _ = jax.jit(model.apply)({"params": params}, images())
  low, _ = jax.jit(tiny(dtype="bfloat16", **TWO_STAGES).apply)({"params": params}, images())
  assert low.dtype == jnp.float32 and np.isfinite(low).all()
  np.testing.assert_allclose(low, ref, atol=0.1 * float(np.abs(ref).max()))


def test_other_attention_with_drop_path_in_training():
  """The blocks take any registered mechanism; stochastic depth and dropout run in training."""
  model = tiny(attention="mhsa", drop_path=0.5, dropout=0.1, **TWO_STAGES)
  params, x = random_params(model), images()
  fwd = jax.jit(lambda p, r: model.apply({"params": p}, x, train=True, rngs={"dropout": r})[0])
  a, b = fwd(params, jax.random.key(1)), fwd(params, jax.random.key(2))
  assert np.isfinite(a).all() and not np.allclose(a, b)


@pytest.mark.parametrize("cfg, match", [
    (dict(variant="b3"), "unknown PVTv2 variant 'b3'; valid: b0, b1, b2"),
    (dict(tokens={"name": "evit", "keep_rate": 0.7}), "valid: tokens=None or 'none'"),
    (dict(scan=True), "valid: scan=False"),
    (dict(depths=(1, 1, 1)), "give one per stage"),
    (dict(num_heads=(1, 3, 5, 8)), "not divisible by 3 heads"),
])
def test_config_errors_name_what_is_valid(cfg, match):
  with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)")):
    models.build({"name": "pvt_v2", "variant": "b0", **cfg}, num_classes=10, image_size=224)


def test_image_size_must_fit_the_sr_ratios():
  with pytest.raises(ValueError, match="multiple of 32"):
    models.build({"name": "pvt_v2", "variant": "b0"}, num_classes=10, image_size=48)
  model = models.build({"name": "pvt_v2", "variant": "b0", "tokens": {"name": "none"}},
                       num_classes=10, image_size=96)  # the default configs' "no reducer"
  assert model.grids == [(24, 24), (12, 12), (6, 6), (3, 3)]


def test_layer_decay_groups_follow_timm():
  """timm's group_matcher for PVTv2: patch_embed 0, stages.i -> i + 1, head last."""
  model = tiny()
  ids = {k: recipe.layer_id(k, model.depth) for k in common.flatten(common.abstract_params(model))}
  assert ids["patch_embed/proj/kernel"] == 0
  assert ids["stage_0/block_0/attn/q/kernel"] == 1
  assert ids["stage_1/downsample/proj/kernel"] == 2
  assert ids["stage_3/norm/scale"] == 4 and ids["head/kernel"] == 5


def test_timm_names_round_trip_and_official_names(tiny_params, tmp_path):
  model = tiny()
  sd = timm_pvt_v2.to_timm(tiny_params, model)
  assert "stages.1.downsample.proj.weight" in sd and sd["patch_embed.proj.weight"].shape == (
      16, 3, 7, 7)
  assert sd["stages.0.blocks.0.mlp.dwconv.weight"].shape == (128, 1, 3, 3)
  path = str(tmp_path / "pvt.safetensors")
  checkpoints.save(path, tiny_params, model)
  back = checkpoints.load(path, model)
  for k, v in common.flatten(common.to_numpy(tiny_params)).items():
    np.testing.assert_array_equal(common.flatten(back)[k], v, err_msg=k)
  official = {official_key(k): v for k, v in sd.items()}
  assert "block1.0.mlp.dwconv.dwconv.weight" in official and "norm4.weight" in official
  again = timm_pvt_v2.from_timm(official, model)
  np.testing.assert_array_equal(again["stage_2"]["block_1"]["attn"]["kv"]["kernel"],
                                back["stage_2"]["block_1"]["attn"]["kv"]["kernel"])
  five = models.build({"name": "pvt_v2", "variant": "b0", **TINY}, num_classes=5, image_size=SIZE)
  merged = checkpoints.load_into(path, five, random_params(five), skip=("head",))
  assert merged["head"]["kernel"].shape == (64, 5)
  np.testing.assert_array_equal(merged["stage_3"]["norm"]["scale"],
                                back["stage_3"]["norm"]["scale"])
  cfg = checkpoints.model_config(path)
  assert cfg["embed_dims"] == TINY["embed_dims"] and cfg["depths"] == TINY["depths"]
  assert cfg["sr_ratios"] == (8, 4, 2, 1) and cfg["mlp_ratios"] == (8, 8, 4, 4)
  del sd["stages.2.blocks.1.attn.sr.bias"]
  with pytest.raises(checkpoints.CheckpointMismatch, match="stages.2.blocks.1.attn.sr.bias"):
    timm_pvt_v2.from_timm(sd, model)
  with pytest.raises(ValueError, match="timm files"):
    checkpoints.save(str(tmp_path / "pvt.npz"), tiny_params, model)


def official_key(key: str) -> str:
  """timm's name -> whai362/PVT's (the inverse of timm's checkpoint_filter_fn)."""
  parts = key.split(".")
  if parts[0] == "patch_embed":
    return "patch_embed1." + ".".join(parts[1:])
  if parts[0] != "stages":
    return key
  i, rest = int(parts[1]), parts[2:]
  if rest[0] == "downsample":
    return f"patch_embed{i + 1}." + ".".join(rest[1:])
  if rest[0] == "norm":
    return f"norm{i + 1}." + ".".join(rest[1:])
  key = f"block{i + 1}." + ".".join(rest[1:])
  return key.replace("mlp.dwconv.", "mlp.dwconv.dwconv.")


# ------------------------------------------------------------------ parity with timm
TORCH_SCRIPT = """
    cases, out = json.loads(sys.argv[1]), sys.argv[2]
    torch.manual_seed(0)
    kwargs = dict(cases["kwargs"], embed_dims=tuple(cases["kwargs"]["embed_dims"]),
                  depths=tuple(cases["kwargs"]["depths"]))
    model = timm.create_model("pvt_v2_b0", pretrained=False, **kwargs).eval()
    perturb(model)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{out}/timm.safetensors")
    x = torch.randn(2, 3, cases["size"], cases["size"], requires_grad=True)
    logits = model(x)
    weights = torch.linspace(-1, 1, logits.numel()).reshape(logits.shape)
    (logits * weights).sum().backward()
    theirs = timm.create_model("pvt_v2_b0", pretrained=False, **kwargs).eval()
    from safetensors.torch import load_file
    theirs.load_state_dict(load_file(f"{out}/ours.safetensors"), strict=True)
    with torch.no_grad():
        exported = theirs(x)
    linear = timm.create_model("pvt_v2_b0", pretrained=False, linear=True,
                               **cases["linear"]).eval()
    perturb(linear)
    save_file({k: v.contiguous() for k, v in linear.state_dict().items()},
              f"{out}/timm_li.safetensors")
    with torch.no_grad():
        linear_logits = linear(x)
    np.savez(f"{out}/ref.npz", x=x.detach().permute(0, 2, 3, 1).numpy(),
             logits=logits.detach().numpy(), grad=x.grad.permute(0, 2, 3, 1).numpy(),
             exported=exported.numpy(), linear=linear_logits.numpy())
"""


@pytest.fixture(scope="module")
def timm_reference(tmp_path_factory, tiny_params):
  """timm's logits and input gradient for its own perturbed weights, and its logits for our
  (exported) parameters."""
  if not timm_reference_lib.available():
    pytest.skip(timm_reference_lib.SKIP_REASON)
  out = tmp_path_factory.mktemp("timm_pvt")
  checkpoints.save(str(out / "ours.safetensors"), tiny_params, tiny())
  cases = {"kwargs": dict(TINY, num_classes=10), "size": SIZE,
           "linear": dict(TWO_STAGES, num_classes=10)}
  timm_reference_lib.run(TORCH_SCRIPT, json.dumps(cases), str(out))
  return str(out), dict(np.load(out / "ref.npz"))


def test_logits_and_gradient_match_timm(timm_reference):
  out, ref = timm_reference
  path = os.path.join(out, "timm.safetensors")
  model = checkpoints.build_model(path, image_size=SIZE)
  assert (model.embed_dims, model.depths, model.sr_ratios) == (
      TINY["embed_dims"], TINY["depths"], (8, 4, 2, 1))
  params = checkpoints.load(path, model)
  ours, (_, grad) = logits_and_grads(model, params, jnp.asarray(ref["x"]))
  np.testing.assert_allclose(np.asarray(ours), ref["logits"], atol=1e-4, rtol=0)
  scale = float(np.abs(ref["grad"]).max())
  np.testing.assert_allclose(np.asarray(grad), ref["grad"], atol=1e-4 * scale, rtol=0)


def test_linear_sra_logits_match_timm(timm_reference):
  """pvt_v2_*_li: keys and values from a 7x7 average pool (here of 16x16 and 8x8 grids), a ReLU
  before the MLP's depthwise conv; told apart by its 1x1 attn.sr."""
  out, ref = timm_reference
  path = os.path.join(out, "timm_li.safetensors")
  model = checkpoints.build_model(path, image_size=SIZE, num_heads=TWO_STAGES["num_heads"])
  assert model.linear and model.depths == TWO_STAGES["depths"]
  params = checkpoints.load(path, model)
  ours = jax.jit(model.apply)({"params": params}, jnp.asarray(ref["x"]))[0]
  np.testing.assert_allclose(np.asarray(ours), ref["linear"], atol=1e-4, rtol=0)


def test_exported_parameters_load_strictly_into_timm(timm_reference, tiny_params):
  _, ref = timm_reference
  ours, _ = logits_and_grads(tiny(), tiny_params, jnp.asarray(ref["x"]))
  np.testing.assert_allclose(np.asarray(ours), ref["exported"], atol=1e-4, rtol=0)


# ------------------------------------------------------------------ training
def test_train_step_on_eight_devices(data_dir):
  """A two-stage PVTv2 on the 8x8 digits (grids 2, 1), data-parallel over 8 CPU devices with
  layer-wise lr decay and stochastic depth: finite losses and parameters, the model's names."""
  from test_train import run_steps, smoke_config  # pylint: disable=import-outside-toplevel
  from vitjax import data  # pylint: disable=import-outside-toplevel
  assert jax.device_count() == 8
  config = smoke_config(data_dir, batch_size=16)
  config.model = ml_collections.ConfigDict(dict(
      name="pvt_v2", variant="b0", drop_path=0.1, **TWO_STAGES))
  config.optimizer.layer_decay = 0.75
  loader = iter(data.make_train_loader(config.data, global_batch_size=16, seed=0))
  batches = [next(loader) for _ in range(2)]
  params, losses, _ = run_steps(config, jax.devices(), (("data", -1),), "dp", batches)
  assert np.isfinite(losses).all()
  model = models.build(config.model, num_classes=10, image_size=8)
  flat = common.flatten(params)
  assert set(flat) == set(common.flatten(common.abstract_params(model)))
  assert all(np.isfinite(np.asarray(v)).all() for v in flat.values())
