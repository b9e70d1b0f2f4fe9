"""ConViT: parameter counts equal timm's, a tiny model's forward / gradient / bf16, config-time
errors, layer-wise lr decay groups and the weight-decay mask, timm file round trip (a ViT file is
not taken for one), timm parity of logits and input gradients on a reduced ConViT with perturbed
weights (gating parameters and position embedding included), export that timm loads strictly, an
8-device train step.

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

from vitjax import attention as attn_lib
from vitjax import checkpoints, models
from vitjax.checkpoints import common, timm, timm_convit
from vitjax.train import optim, recipe

import timm_reference as timm_reference_lib

# sum(p.numel() for p in timm.create_model("convit_X").parameters()), timm 1.0.31
TIMM_PARAMS = {"Ti": 5_710_512, "S": 27_777_322, "B": 86_540_040}
# a reduced ConViT: two GPSA blocks on a 6x6 grid, then [CLS] and two self-attention blocks
TINY = dict(width=32, num_heads=4, depth=4, mlp_dim=64, local_up_to_layer=2, patch_size=8)
SIZE = 48
# timm's arguments for the same model (its embed_dim is the width per head)
TIMM_KWARGS = dict(embed_dim=8, num_heads=4, depth=4, mlp_ratio=2.0, local_up_to_layer=2,
                   patch_size=8, img_size=SIZE, num_classes=10)


def tiny(dtype="float32", **kw):
  return models.build({"name": "convit", "variant": "Ti", **TINY, **kw}, num_classes=10,
                      image_size=SIZE, dtype=dtype)


def images(n=2, seed=7):
  return np.random.default_rng(seed).normal(size=(n, SIZE, SIZE, 3)).astype(np.float32)


def random_params(model, seed=0):
  """Random numpy parameters of the model's shapes (no compiled init): LayerNorm gains near 1,
  everything else (biases and gates included) small and non-zero, so that a dropped parameter
  shows."""
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
def test_parameter_counts_equal_timm(variant):
  model = models.build({"name": "convit", "variant": variant}, num_classes=1000, image_size=224)
  assert (model.width, model.depth, model.local_up_to_layer) == (
      48 * model.num_heads, 12, 10)
  assert models.num_params(common.abstract_params(model)) == TIMM_PARAMS[variant]


def test_tiny_forward_and_gradient(tiny_params):
  model = tiny()
  logits, (grads, _) = logits_and_grads(model, tiny_params, images())
  assert logits.shape == (2, 10) and np.isfinite(logits).all()
  flat = common.flatten(grads)
  assert all(np.isfinite(g).all() for g in flat.values())
  assert not [k for k, g in flat.items() if not np.abs(g).max() > 0]  # every parameter is used
  assert "block_0/attn/gating_param" in flat and "block_2/attn/qkv/kernel" in flat
  _, out = jax.eval_shape(model.apply, {"params": tiny_params}, images())
  # the [CLS] token joins before block local_up_to_layer
  assert [out[f"block_{i}"].shape[1] for i in range(4)] == [36, 36, 37, 37]


def test_bf16_follows_fp32(tiny_params):
  ref, _ = logits_and_grads(tiny(), tiny_params, images())
  low, _ = jax.jit(tiny(dtype="bfloat16").apply)({"params": tiny_params}, images())
  assert low.dtype == jnp.float32 and np.isfinite(low).all()
  np.testing.assert_allclose(low, ref, atol=0.05 * float(np.abs(ref).max()))


def test_initialisation_is_the_official_local_one():
  """GPSA's values start as the identity, its gates at 1, the positional kernel of head
  h1 + 2 h2 (2 x 2 heads) at strength * (2 (h2 - 1/2), 2 (h1 - 1/2), -1)."""
  model = tiny(locality_strength=2.0)
  spec = model.attention_spec(0)
  assert spec == {"name": "gpsa", "locality_strength": 2.0}
  gpsa = attn_lib.build(spec, num_heads=4, dtype=jnp.float32, qkv_bias=False)
  ctx = attn_lib.AttnContext(grid=model.grid, num_prefix=0, cls_index=None)
  tokens = jnp.zeros((1, 36, 32))
  attn = jax.jit(lambda: gpsa.init(jax.random.key(0), tokens, ctx))()["params"]
  np.testing.assert_array_equal(attn["v"]["kernel"], np.eye(32))
  np.testing.assert_array_equal(attn["gating_param"], np.ones(4))
  want = 2.0 * np.array([[-1, -1, 1, 1], [-1, 1, -1, 1], [-1, -1, -1, -1]], np.float32)
  np.testing.assert_array_equal(attn["pos_proj"]["kernel"], want)


@pytest.mark.parametrize("cfg, match", [
    (dict(variant="L"), "unknown ConViT variant 'L'; valid: Ti, S, B"),
    (dict(tokens={"name": "evit", "keep_rate": 0.7}), "valid: tokens=None or 'none'"),
    (dict(scan=True), "valid: scan=False"),
    (dict(local_up_to_layer=12), "must be in [0, 11]"),
    (dict(pool="map"), "unknown ConViT pool 'map'; valid: cls, gap"),
    (dict(num_heads=5), "width 192 is not divisible by num_heads 5"),
    (dict(local_attention={"name": "gpsa", "impl": "xla"}), "attention 'gpsa' supports impl"),
])
def test_config_errors_name_what_is_valid(cfg, match):
  escaped = match.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")
  with pytest.raises(ValueError, match=escaped):
    models.build({"name": "convit", "variant": "Ti", **cfg}, num_classes=10, image_size=224)


def test_layer_decay_groups_and_decay_mask_follow_timm():
  """timm's group_matcher: cls_token, pos_embed, patch_embed 0, blocks.i -> i + 1, norm and head
  last; no weight decay on pos_embed and cls_token (no_weight_decay) nor the 1-D gates."""
  model = tiny()
  abstract = common.abstract_params(model)
  ids = {k: recipe.layer_id(k, model.depth) for k in common.flatten(abstract)}
  assert ids["embedding_kernel"] == ids["cls"] == ids["pos_embedding"] == 0
  assert ids["block_0/attn/gating_param"] == 1 and ids["block_3/attn/qkv/kernel"] == 4
  assert ids["norm/scale"] == ids["head/kernel"] == 5
  mask = common.flatten(optim.decay_mask(abstract))
  assert not (mask["pos_embedding"] or mask["cls"] or mask["block_1/attn/gating_param"])
  assert mask["block_1/attn/qk/kernel"] and mask["block_1/attn/pos_proj/kernel"]


def test_timm_names_round_trip(tiny_params, tmp_path):
  model = tiny()
  sd = timm_convit.to_timm(tiny_params, model)
  assert sd["blocks.1.attn.pos_proj.weight"].shape == (4, 3)
  assert sd["pos_embed"].shape == (1, 36, 32) and sd["cls_token"].shape == (1, 1, 32)
  assert "blocks.2.attn.qkv.weight" in sd and "blocks.1.attn.qk.weight" in sd
  path = str(tmp_path / "convit.safetensors")
  checkpoints.save(path, tiny_params, model)
  back = checkpoints.load(path, model)
  for k, v in common.flatten(common.to_numpy(tiny_params)).items():
    np.testing.assert_array_equal(common.flatten(back)[k], v, err_msg=k)
  cfg = checkpoints.model_config(path)
  assert cfg == dict(name="convit", **TINY, qkv_bias=False, image_size=SIZE, num_classes=10)
  five = models.build({"name": "convit", "variant": "Ti", **TINY}, num_classes=5,
                      image_size=SIZE)
  merged = checkpoints.load_into(path, five, random_params(five), skip=("head",))
  assert merged["head"]["kernel"].shape == (32, 5)
  larger = models.build({"name": "convit", "variant": "Ti", **TINY}, num_classes=10,
                        image_size=64)
  assert checkpoints.load(path, larger)["pos_embedding"].shape == (1, 64, 32)  # resampled
  del sd["blocks.0.attn.gating_param"]
  with pytest.raises(checkpoints.CheckpointMismatch, match="blocks.0.attn.gating_param"):
    timm_convit.from_timm(sd, model)


def test_a_vit_file_is_not_taken_for_a_convit(tmp_path):
  vit = models.build({"name": "vit", "variant": "Ti/16", "depth": 1}, num_classes=10,
                     image_size=32)
  path = str(tmp_path / "vit.safetensors")
  timm.write_state_dict(path, timm.to_timm(
      common.zeros_like_abstract(common.abstract_params(vit)), vit))
  assert not timm_convit.matches(timm.read_state_dict(path))
  assert checkpoints.model_config(path)["name"] == "vit"


# ------------------------------------------------------------------ parity with timm
TORCH_SCRIPT = """
    kwargs, out = json.loads(sys.argv[1]), sys.argv[2]
    torch.manual_seed(0)
    model = timm.create_model("convit_tiny", pretrained=False, **kwargs).eval()
    perturb(model)  # gating_param, pos_embed and cls_token included
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{out}/timm.safetensors")
    x = torch.randn(2, 3, kwargs["img_size"], kwargs["img_size"], requires_grad=True)
    logits = model(x)
    weights = torch.linspace(-1, 1, logits.numel()).reshape(logits.shape)
    (logits * weights).sum().backward()
    theirs = timm.create_model("convit_tiny", pretrained=False, **kwargs).eval()
    theirs.load_state_dict(load_file(f"{out}/ours.safetensors"), strict=True)
    with torch.no_grad():
        exported = theirs(x)
    np.savez(f"{out}/ref.npz", x=x.detach().permute(0, 2, 3, 1).numpy(),
             logits=logits.detach().numpy(), grad=x.grad.permute(0, 2, 3, 1).numpy(),
             exported=exported.numpy())
"""


@pytest.fixture(scope="module")
def timm_reference(tmp_path_factory, tiny_params):
  """timm's logits and input gradient for its own perturbed weights, and its logits for our
  (exported) parameters."""
  if not timm_reference_lib.available():
    pytest.skip(timm_reference_lib.SKIP_REASON)
  out = tmp_path_factory.mktemp("timm_convit")
  checkpoints.save(str(out / "ours.safetensors"), tiny_params, tiny())
  timm_reference_lib.run(TORCH_SCRIPT, json.dumps(TIMM_KWARGS), str(out))
  return str(out), dict(np.load(out / "ref.npz"))


def test_logits_and_gradient_match_timm(timm_reference):
  out, ref = timm_reference
  path = os.path.join(out, "timm.safetensors")
  model = checkpoints.build_model(path)
  assert model == tiny()
  params = checkpoints.load(path, model)
  ours, (_, grad) = logits_and_grads(model, params, jnp.asarray(ref["x"]))
  np.testing.assert_allclose(np.asarray(ours), ref["logits"], atol=1e-4, rtol=0)
  scale = float(np.abs(ref["grad"]).max())
  np.testing.assert_allclose(np.asarray(grad), ref["grad"], atol=1e-4 * scale, rtol=0)


def test_exported_parameters_load_strictly_into_timm(timm_reference, tiny_params):
  _, ref = timm_reference
  ours, _ = logits_and_grads(tiny(), tiny_params, jnp.asarray(ref["x"]))
  np.testing.assert_allclose(np.asarray(ours), ref["exported"], atol=1e-4, rtol=0)


# ------------------------------------------------------------------ training
def test_train_step_on_eight_devices(data_dir):
  """The tiniest ConViT (one GPSA block on the 2x2 grid of the 8x8 digits, one self-attention
  block) data-parallel over 8 CPU devices: finite loss and parameters, the model's names."""
  from test_train import run_steps, smoke_config  # pylint: disable=import-outside-toplevel
  from vitjax import data  # pylint: disable=import-outside-toplevel
  assert jax.device_count() == 8
  config = smoke_config(data_dir, batch_size=16)
  config.model = ml_collections.ConfigDict(dict(
      name="convit", variant="Ti", width=16, num_heads=4, depth=2, mlp_dim=32,
      local_up_to_layer=1, patch_size=4))
  loader = iter(data.make_train_loader(config.data, global_batch_size=16, seed=0))
  params, losses, _ = run_steps(config, jax.devices(), (("data", -1),), "dp", [next(loader)])
  assert np.isfinite(losses).all()
  model = models.build(config.model, num_classes=10, image_size=8)
  flat = common.flatten(params)
  assert set(flat) == set(common.flatten(common.abstract_params(model)))
  assert all(np.isfinite(np.asarray(v)).all() for v in flat.values())
