"""Twins: parameter counts equal timm's, a tiny model's forward / gradient / bf16, timm parity of
logits and input gradients on a reduced Twins-SVT (LSA windows that tile the grid, GSA with sr 8,
4, 2 and 1) and of logits on a reduced Twins-PCPVT, export that timm loads strictly, config-time
errors, layer-wise lr decay groups and weight decay, an 8-device train step.

Parity needs `VITJAX_TORCH_PYTHON` (see tests/timm_reference.py); it is skipped otherwise.
"""
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vitjax import checkpoints, models
from vitjax.checkpoints import common, timm_twins
from vitjax.models.stage import Stage
from vitjax.tokens import macs
from vitjax.train import optim, recipe

import timm_reference as timm_reference_lib
from test_pvt_v2 import logits_and_grads, random_params

# sum(p.numel() for p in timm.create_model("twins_...").parameters()), timm 1.0.31
TIMM_PARAMS = {"svt_s": 24_060_776, "svt_b": 56_070_952, "svt_l": 99_271_400,
               "pcpvt_s": 24_106_216, "pcpvt_b": 43_828_456, "pcpvt_l": 60_989_672}
# the Twins paper (GFLOPs at 224 px)
PAPER_GFLOPS = {"svt_s": 2.9, "svt_b": 8.6, "svt_l": 15.1,
                "pcpvt_s": 3.8, "pcpvt_b": 6.7, "pcpvt_l": 9.8}
# a reduced Twins-SVT at 64 px: grids 16, 8, 4, 2 with windows 4, 4, 2, 2 (several windows per
# grid, then one) and GSA at sr 8, 4, 2 (conv + LN); the last stage has its LSA block only
TINY = dict(embed_dims=(8, 16, 24, 32), depths=(2, 2, 2, 1), num_heads=(1, 2, 3, 4),
            mlp_ratios=(2, 2, 2, 2), window_sizes=(4, 4, 2, 2), sr_ratios=(8, 4, 2, 1))
SIZE = 64
# a two-stage Twins-PCPVT (GSA only, sr 2 then none)
PCPVT = dict(embed_dims=(8, 16), depths=(1, 1), num_heads=(1, 2), mlp_ratios=(2, 2),
             window_sizes=(1, 1), sr_ratios=(2, 1))
# the smallest for 8x8 images: grids 2, 1; an LSA block (one window), then a GSA-only stage (timm's
# window 1)
DIGITS = dict(embed_dims=(8, 16), depths=(1, 1), num_heads=(1, 2), mlp_ratios=(2, 2),
              window_sizes=(2, 1), sr_ratios=(2, 1))


def tiny(dtype="float32", size=SIZE, **kw):
  return models.build({"name": "twins", "variant": "svt_s", **{**TINY, **kw}}, num_classes=10,
                      image_size=size, dtype=dtype)


def images(n=2, seed=7, size=SIZE):
  return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def tiny_params():
  return random_params(tiny())


@pytest.mark.parametrize("variant", list(TIMM_PARAMS))
def test_parameter_counts_equal_timm_and_macs_the_papers(variant):
  model = models.build({"name": "twins", "variant": variant}, num_classes=1000, image_size=224)
  assert models.num_params(common.abstract_params(model)) == TIMM_PARAMS[variant]
  assert round(macs.model_macs(model) / 1e9, 1) == PAPER_GFLOPS[variant]


def test_blocks_alternate_lsa_and_gsa_as_timm():
  svt = models.build({"name": "twins", "variant": "svt_s"}, num_classes=10, image_size=224)
  assert [svt.attention_spec(2, j)["name"] for j in range(3)] == [
      "twins_lsa", "twins_gsa", "twins_lsa"]
  assert svt.attention_spec(2, 1)["sr_ratio"] == 2 and svt.attention_spec(0, 0)["window_size"] == 7
  pcpvt = models.build({"name": "twins", "variant": "pcpvt_s"}, num_classes=10, image_size=224)
  assert {pcpvt.attention_spec(i, j)["name"] for i in range(4) for j in range(3)} == {"twins_gsa"}
  assert svt.grids == [(56, 56), (28, 28), (14, 14), (7, 7)]


def test_tiny_forward_and_gradient(tiny_params):
  model = tiny()
  logits, (grads, _) = logits_and_grads(model, tiny_params, images())
  assert logits.shape == (2, 10) and np.isfinite(logits).all()
  flat = common.flatten(grads)
  assert all(np.isfinite(g).all() for g in flat.values())
  assert not [k for k, g in flat.items() if not np.abs(g).max() > 0]  # every parameter is used
  assert "stage_1/pos_block/proj/kernel" in flat and "stage_2/block_1/attn/sr/kernel" in flat
  _, out = jax.eval_shape(model.apply, {"params": tiny_params}, images())
  assert [out[f"stage_{i}"].shape for i in range(4)] == [
      (2, 16, 16, 8), (2, 8, 8, 16), (2, 4, 4, 24), (2, 2, 2, 32)]


def test_bf16_follows_fp32():
  model, x = tiny(size=8, **DIGITS), images(size=8)
  params = random_params(model)
  ref, _ = jax.jit(model.apply)({"params": params}, x)
  low, _ = jax.jit(tiny(dtype="bfloat16", size=8, **DIGITS).apply)({"params": params}, x)
  assert low.dtype == jnp.float32 and np.isfinite(low).all()
  np.testing.assert_allclose(low, ref, atol=0.1 * float(np.abs(ref).max()))


@pytest.mark.parametrize("cfg, size, match", [
    (dict(variant="svt_t"), 224, "unknown Twins variant 'svt_t'; valid: svt_s, svt_b"),
    (dict(tokens={"name": "evit", "keep_rate": 0.7}), 224, "valid: tokens=None or 'none'"),
    (dict(scan=True), 224, "valid: scan=False"),
    (dict(depths=(1, 1, 1)), 224, "give one per stage"),
    (dict(window_sizes=(7, 7)), 224, "window_sizes has 2 entries"),
    (dict(num_heads=(2, 3, 8, 16)), 224, "not divisible by 3 heads"),
    (dict(), 240, "not divisible by 32"),
    (dict(), 256, "64x64 grid (image (256, 256)) is not divisible by window 7"),
    (dict(window_sizes=(8, 8, 7, 7)), 224, "28x28 grid (image (224, 224)) is not divisible by "
     "window 8"),
    (dict(sr_ratios=(8, 4, 3, 1)), 224, "14x14 grid (image (224, 224)) is not divisible by sr "
     "ratio 3"),
    (dict(variant="pcpvt_s", sr_ratios=(8, 4, 2, 3)), 224, "not divisible by sr ratio 3"),
])
def test_config_errors_name_what_is_valid(cfg, size, match):
  cfg = {"variant": "svt_s", **cfg}
  with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)")):
    models.build({"name": "twins", **cfg}, num_classes=10, image_size=size)


def test_stage_refuses_to_scan_over_a_peg():
  block = dict(attention="mhsa", num_heads=1, mlp_dim=8)
  stage = Stage(blocks=[block, block], grid=(2, 2), num_prefix=0, class_token=False, scan=True,
                pos_conv_after=0)
  with pytest.raises(ValueError, match=r"cannot place a PEG between blocks \(pos_conv_after=0\)"):
    stage.check()


def test_layer_decay_groups_and_weight_decay_follow_timm():
  """timm's group_matcher: patch_embeds.0 first, blocks.i.j one group each, patch_embeds.i and
  pos_block.i with blocks.i.0, the final norm and head last; no weight decay on the PEG."""
  model = tiny()
  params = common.abstract_params(model)
  ids = {k: model.layer_id(k) for k in common.flatten(params)}
  assert ids["stage_0/patch_embed/proj/kernel"] == 0
  assert ids["stage_0/block_0/attn/qkv/kernel"] == 1 and ids["stage_0/pos_block/proj/kernel"] == 1
  assert ids["stage_1/patch_embed/proj/kernel"] == 3 and ids["stage_1/block_1/attn/sr/kernel"] == 4
  assert ids["norm/scale"] == ids["head/kernel"] == model.depth + 1 == 8
  scales = common.flatten(recipe.layer_scales(params, 0.5, model.depth, model.layer_id))
  assert float(scales["stage_0/patch_embed/proj/kernel"]) == 0.5 ** 8
  decayed = common.flatten(optim.decay_mask(params))
  assert not decayed["stage_2/pos_block/proj/kernel"] and decayed["stage_2/block_1/attn/sr/kernel"]


def test_timm_names_round_trip(tiny_params, tmp_path):
  model = tiny()
  sd = timm_twins.to_timm(tiny_params, model)
  assert sd["patch_embeds.1.proj.weight"].shape == (16, 8, 2, 2)
  assert sd["pos_block.0.proj.0.weight"].shape == (8, 1, 3, 3)
  assert sd["blocks.2.0.attn.qkv.weight"].shape == (72, 24)
  assert sd["blocks.2.1.attn.sr.weight"].shape == (24, 24, 2, 2)
  path = str(tmp_path / "twins.safetensors")
  checkpoints.save(path, tiny_params, model)
  back = checkpoints.load(path, model)
  for k, v in common.flatten(common.to_numpy(tiny_params)).items():
    np.testing.assert_array_equal(common.flatten(back)[k], v, err_msg=k)
  cfg = checkpoints.model_config(path)
  assert cfg["embed_dims"] == TINY["embed_dims"] and cfg["depths"] == TINY["depths"]
  assert cfg["sr_ratios"] == (8, 4, 2, 1) and cfg["mlp_ratios"] == (2, 2, 2, 2)
  assert cfg["window_sizes"] == (7, 7, 7, 7)  # not stored: timm's 7
  five = models.build({"name": "twins", "variant": "svt_s", **TINY}, num_classes=5,
                      image_size=SIZE)
  merged = checkpoints.load_into(path, five, random_params(five), skip=("head",))
  assert merged["head"]["kernel"].shape == (32, 5)
  np.testing.assert_array_equal(merged["norm"]["scale"], back["norm"]["scale"])
  del sd["pos_block.3.proj.0.bias"]
  with pytest.raises(checkpoints.CheckpointMismatch, match="pos_block.3.proj.0.bias"):
    timm_twins.from_timm(sd, model)
  with pytest.raises(ValueError, match="timm files"):
    checkpoints.save(str(tmp_path / "twins.npz"), tiny_params, model)


# ------------------------------------------------------------------ parity with timm
TORCH_SCRIPT = """
    cases, out = json.loads(sys.argv[1]), sys.argv[2]
    torch.manual_seed(0)
    tuples = lambda kw: {k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()}
    svt_kwargs, pcpvt_kwargs = tuples(cases["svt"]), tuples(cases["pcpvt"])
    model = timm.create_model("twins_svt_small", pretrained=False, **svt_kwargs).eval()
    perturb(model)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{out}/timm.safetensors")
    x = torch.randn(2, 3, cases["size"], cases["size"], requires_grad=True)
    logits = model(x)
    weights = torch.linspace(-1, 1, logits.numel()).reshape(logits.shape)
    (logits * weights).sum().backward()
    theirs = timm.create_model("twins_svt_small", pretrained=False, **svt_kwargs).eval()
    theirs.load_state_dict(load_file(f"{out}/ours.safetensors"), strict=True)
    with torch.no_grad():
        exported = theirs(x)
    pcpvt = timm.create_model("twins_pcpvt_small", pretrained=False, **pcpvt_kwargs).eval()
    perturb(pcpvt)
    save_file({k: v.contiguous() for k, v in pcpvt.state_dict().items()},
              f"{out}/timm_pcpvt.safetensors")
    with torch.no_grad():
        pcpvt_logits = pcpvt(x)
    np.savez(f"{out}/ref.npz", x=x.detach().permute(0, 2, 3, 1).numpy(),
             logits=logits.detach().numpy(), grad=x.grad.permute(0, 2, 3, 1).numpy(),
             exported=exported.numpy(), pcpvt=pcpvt_logits.numpy())
"""


def timm_kwargs(cfg: dict) -> dict:
  kw = {k: v for k, v in cfg.items() if k != "window_sizes"}
  if max(cfg["window_sizes"]) > 1:  # PCPVT is timm's wss=None
    kw["wss"] = cfg["window_sizes"]
  return dict(kw, num_classes=10, img_size=SIZE)


@pytest.fixture(scope="module")
def timm_reference(tmp_path_factory, tiny_params):
  """timm's logits and input gradient for its own perturbed weights, and its logits for our
  (exported) parameters."""
  if not timm_reference_lib.available():
    pytest.skip(timm_reference_lib.SKIP_REASON)
  out = tmp_path_factory.mktemp("timm_twins")
  checkpoints.save(str(out / "ours.safetensors"), tiny_params, tiny())
  cases = {"svt": timm_kwargs(TINY), "pcpvt": timm_kwargs(PCPVT), "size": SIZE}
  timm_reference_lib.run(TORCH_SCRIPT, json.dumps(cases), str(out))
  return str(out), dict(np.load(out / "ref.npz"))


def test_logits_and_gradient_match_timm(timm_reference):
  out, ref = timm_reference
  path = os.path.join(out, "timm.safetensors")
  model = checkpoints.build_model(path, image_size=SIZE, num_heads=TINY["num_heads"],
                                  window_sizes=TINY["window_sizes"])
  assert (model.embed_dims, model.depths, model.sr_ratios) == (
      TINY["embed_dims"], TINY["depths"], (8, 4, 2, 1))
  params = checkpoints.load(path, model)
  ours, (_, grad) = logits_and_grads(model, params, jnp.asarray(ref["x"]))
  np.testing.assert_allclose(np.asarray(ours), ref["logits"], atol=1e-4, rtol=0)
  scale = float(np.abs(ref["grad"]).max())
  np.testing.assert_allclose(np.asarray(grad), ref["grad"], atol=1e-4 * scale, rtol=0)


def test_pcpvt_logits_match_timm(timm_reference):
  out, ref = timm_reference
  path = os.path.join(out, "timm_pcpvt.safetensors")
  model = checkpoints.build_model(path, image_size=SIZE, num_heads=PCPVT["num_heads"])
  assert model.window_sizes == (1, 1) and model.depths == PCPVT["depths"]
  params = checkpoints.load(path, model)
  ours = jax.jit(model.apply)({"params": params}, jnp.asarray(ref["x"]))[0]
  np.testing.assert_allclose(np.asarray(ours), ref["pcpvt"], atol=1e-4, rtol=0)


def test_exported_parameters_load_strictly_into_timm(timm_reference, tiny_params):
  _, ref = timm_reference
  ours, _ = logits_and_grads(tiny(), tiny_params, jnp.asarray(ref["x"]))
  np.testing.assert_allclose(np.asarray(ours), ref["exported"], atol=1e-4, rtol=0)


# ------------------------------------------------------------------ training
def test_train_step_on_eight_devices(data_dir):
  """A two-stage Twins-SVT on the 8x8 digits (grids 2, 1), data-parallel over 8 CPU devices with
  layer-wise lr decay, stochastic depth and dropout (blocks and embeddings): finite losses and
  parameters, the model's names."""
  from test_train import run_steps, smoke_config  # pylint: disable=import-outside-toplevel
  from vitjax import data  # pylint: disable=import-outside-toplevel
  assert jax.device_count() == 8
  config = smoke_config(data_dir, batch_size=16)
  config.model = ml_collections.ConfigDict(dict(name="twins", variant="svt_s", drop_path=0.1,
                                                dropout=0.1, pos_dropout=0.1, **DIGITS))
  config.optimizer.layer_decay = 0.75
  loader = iter(data.make_train_loader(config.data, global_batch_size=16, seed=0))
  params, losses, _ = run_steps(config, jax.devices(), (("data", -1),), "dp", [next(loader)])
  assert np.isfinite(losses).all()
  model = models.build(config.model, num_classes=10, image_size=8)
  flat = common.flatten(params)
  assert set(flat) == set(common.flatten(common.abstract_params(model)))
  assert all(np.isfinite(np.asarray(v)).all() for v in flat.values())
