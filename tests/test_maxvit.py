"""MaxViT: timm's parameter counts and MACs, a tiny model's forward / gradient / bf16, the MBConv
and squeeze-excitation written out, logits and gradients equal to timm's in evaluation and
training mode (with `VITJAX_TORCH_PYTHON`), timm files in and out with the BatchNorm statistics,
config errors, and a sharded train step on 8 CPU devices.

The parity model (embed dims (32, 64), depths (1, 2), stem width 16, heads of width 16, window
2, grid 4, pre-logits width 48, 32x64 images) has stage grids 8x16 and 4x8, which the window and
the grid divide; window and grid differ so that a swapped partition is caught.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm_reference

import vitjax
from vitjax import checkpoints, evaluate, models
from vitjax.checkpoints import common, timm_maxvit
from vitjax.models import maxvit
from vitjax.tokens import macs as macs_lib
from vitjax.train import optim, recipe

ARCH = dict(embed_dims=(32, 64), depths=(1, 2), stem_width=16, head_dim=16, window_size=2,
            grid_size=4, head_hidden=48)
TINY = dict(name="maxvit", **ARCH)
TIMM_KWARGS = dict(embed_dim=(32, 64), depths=(1, 2), stem_width=16, head_hidden_size=48,
                   transformer_dim_head=16, transformer_window_size=2, transformer_grid_size=4,
                   num_classes=10)
SIZE = (32, 64)


def tiny(dtype="float32", **kw):
  return models.build({**TINY, **kw}, num_classes=10, image_size=SIZE, dtype=dtype)


def random_variables(model, seed=0):
  """Random values in the model's shapes (no init compiled): norm gains near 1, running
  variances in [0.5, 1.5], everything else small, so that every parameter matters."""
  rng = np.random.default_rng(seed)
  def draw(path, leaf):
    name = getattr(path[-1], "key", "")
    if name == "var":
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    noise = rng.normal(0.0, 0.05, leaf.shape).astype(np.float32)
    return noise + 1.0 if name == "scale" else noise
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *SIZE, 3))))
  return jax.tree_util.tree_map_with_path(draw, {k: dict(v) for k, v in shapes.items()})


def images(n=2, seed=7):
  return np.random.default_rng(seed).normal(size=(n, *SIZE, 3)).astype(np.float32)


MODEL = tiny()


@jax.jit
def logits_and_grads(params, stats, x, cot):
  """MODEL's evaluation logits and the gradients of <logits, cot> for its parameters and the
  images (one compile that every test of MODEL shares)."""
  def weighted(p, x):
    logits = MODEL.apply({"params": p, "batch_stats": stats}, x)[0]
    return jnp.sum(logits * cot), logits
  (_, logits), grads = jax.value_and_grad(weighted, argnums=(0, 1), has_aux=True)(params, x)
  return logits, grads


@pytest.mark.parametrize("variant,count,gmacs", [
    ("T", 30_916_528, 5.55), ("S", 68_927_956, 11.58), ("B", 119_467_708, 23.90)])
def test_variants_have_timms_parameter_counts(variant, count, gmacs):
  model = models.build({"name": "maxvit", "variant": variant}, num_classes=1000, image_size=224)
  assert models.num_params(common.abstract_params(model)) == count
  assert round(macs_lib.model_macs(model) / 1e9, 2) == gmacs  # paper: 5.6 / 11.7 / 23.4 G


def test_tiny_forward_gradient_bf16():
  variables = random_variables(MODEL)
  params, stats = variables["params"], variables["batch_stats"]
  x = images()
  cot = np.random.default_rng(1).normal(size=(2, 10)).astype(np.float32)
  logits, (grads, dx) = logits_and_grads(params, stats, x, cot)
  assert logits.shape == (2, 10) and np.isfinite(dx).all() and np.abs(dx).max() > 0
  shapes = jax.eval_shape(lambda v, x: MODEL.apply(v, x)[1], variables, x)
  assert [shapes[k].shape for k in ("stem", "stage_0", "stage_1")] == [
      (2, 16, 32, 16), (2, 8, 16, 32), (2, 4, 8, 64)]
  block = params["stage_1"]["block_0"]
  assert set(block) == {"conv", "attn_block", "attn_grid"}
  assert set(block["conv"]) == {"shortcut_expand", "pre_norm", "conv1_1x1", "norm1", "conv2_kxk",
                                "norm2", "se", "conv3_1x1"}
  assert block["conv"]["conv2_kxk"]["kernel"].shape == (3, 3, 1, 256)  # mid = 4 x 64
  assert block["conv"]["se"]["fc1"]["kernel"].shape == (1, 1, 256, 16)  # 0.25 x the output 64
  assert "shortcut_expand" not in params["stage_1"]["block_1"]["conv"]
  assert block["attn_grid"]["attn"]["relative_position_bias_table"].shape == (4, 7, 7)
  flat = common.flatten(common.to_numpy(grads))
  assert all(np.isfinite(g).all() for g in flat.values())
  assert all(np.abs(g).max() > 0 for g in flat.values()), [k for k, g in flat.items()
                                                          if not np.abs(g).any()]
  # bfloat16 compute, float32 parameters and logits
  half = tiny("bfloat16")
  low = jax.jit(lambda v, x: half.apply(v, x)[0])(variables, x)
  assert low.dtype == jnp.float32 and np.isfinite(low).all()
  np.testing.assert_allclose(low, logits, atol=0.05 * float(np.abs(logits).max()))


def test_mbconv_matches_its_definition():
  """A stride-2 MBConv on a 5x6 map (odd: the shortcut's pool pads a zero row that it counts),
  in evaluation, written out with numpy: BatchNorm with running statistics (eps 1e-3), 1x1
  expand, tanh GELU, 3x3 depthwise stride 2 with TF 'SAME' padding (bottom / right), SE from
  int(0.25 * out) channels, 1x1 project, plus the pooled and projected shortcut."""
  cin, cout = 4, 8
  block = maxvit.MBConv(cout, stride=2)
  x = np.random.default_rng(0).normal(size=(1, 5, 6, cin)).astype(np.float32)
  shapes = jax.eval_shape(block.init, jax.random.key(0), x)
  rng = np.random.default_rng(1)
  v = jax.tree_util.tree_map_with_path(
      lambda p, a: rng.uniform(0.5, 1.5, a.shape).astype(np.float32)
      if getattr(p[-1], "key", "") == "var" else rng.normal(0, 0.3, a.shape).astype(np.float32),
      shapes)
  y = np.asarray(jax.jit(block.apply)(v, x))
  p, s = jax.tree_util.tree_map(np.asarray, (v["params"], v["batch_stats"]))
  bn = lambda t, n: (t - s[n]["mean"]) / np.sqrt(s[n]["var"] + 1e-3) * p[n]["scale"] + p[n]["bias"]
  gelu = lambda t: 0.5 * t * (1 + np.tanh(np.sqrt(2 / np.pi) * (t + 0.044715 * t ** 3)))
  h = gelu(bn(bn(x[0], "pre_norm") @ p["conv1_1x1"]["kernel"][0, 0], "norm1"))
  hp = np.pad(h, [(1, 1), (0, 1), (0, 0)])  # 5 -> 3 rows: pad 2 split 1 / 1; 6 -> 3: pad 1 after
  k = p["conv2_kxk"]["kernel"][:, :, 0]
  d = np.stack([np.stack([(hp[2 * i:2 * i + 3, 2 * j:2 * j + 3] * k).sum((0, 1))
                          for j in range(3)]) for i in range(3)])
  d = gelu(bn(d, "norm2"))
  z = d.mean((0, 1)) @ p["se"]["fc1"]["kernel"][0, 0] + p["se"]["fc1"]["bias"]
  z = z / (1 + np.exp(-z))
  g = 1 / (1 + np.exp(-(z @ p["se"]["fc2"]["kernel"][0, 0] + p["se"]["fc2"]["bias"])))
  out = (d * g) @ p["conv3_1x1"]["kernel"][0, 0] + p["conv3_1x1"]["bias"]
  xp = np.pad(x[0], [(0, 1), (0, 0), (0, 0)])
  pooled = xp.reshape(3, 2, 3, 2, cin).mean((1, 3))
  short = pooled @ p["shortcut_expand"]["kernel"][0, 0] + p["shortcut_expand"]["bias"]
  np.testing.assert_allclose(y[0], out + short, atol=1e-5, rtol=1e-5)
  assert p["se"]["fc1"]["kernel"].shape[-1] == 2


@pytest.mark.parametrize("override,message", [
    (dict(tokens={"name": "evit", "keep_rate": 0.7}),
     "MaxViT takes no token reducer (tokens='evit'): its convolutions and partitions need the "
     "full grid; valid: tokens=None or 'none'"),
    (dict(scan=True), "MaxViT cannot scan its blocks"),
    (dict(variant="L"), "unknown MaxViT variant 'L'; valid: T, S, B"),
    (dict(depths=(1, 1, 1)), "must name the same number"),
    (dict(grid_size=0), "window_size 2 and grid_size 0; both are positive ints"),
    (dict(head_dim=24), "stage 0 has width 32, not divisible by head_dim 24"),
    (dict(se_ratio=0.01), "se_ratio 0.01 gives no squeeze-excitation channel for width 32"),
    (dict(impl="cudnn"), "supports impl"),
])
def test_config_errors(override, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    tiny(**override)


def test_layer_ids():
  shapes = common.abstract_params(MODEL)
  ids = {k: MODEL.layer_id(k) for k in common.flatten(shapes)}
  assert ids["stem/conv1/kernel"] == ids["stem/norm1/scale"] == 0
  assert ids["stage_0/block_0/conv/se/fc1/kernel"] == 1
  assert ids["stage_1/block_0/conv/shortcut_expand/bias"] == 2
  assert ids["stage_1/block_1/attn_grid/attn/qkv/kernel"] == 2
  assert ids["norm/scale"] == ids["pre_logits/kernel"] == ids["head/kernel"] == MODEL.depth + 1
  scales = common.flatten(recipe.layer_scales(shapes, 0.5, MODEL.depth, MODEL.layer_id))
  assert float(scales["stage_0/block_0/attn_block/attn/qkv/kernel"]) == 0.5 ** 2
  mask = common.flatten(optim.decay_mask(shapes))
  table = "stage_0/block_0/attn_block/attn/relative_position_bias_table"
  assert mask["stage_0/block_0/conv/conv2_kxk/kernel"] and not mask[table]
  assert not mask["stage_0/block_0/conv/norm1/scale"]


def test_timm_file_round_trip_with_statistics(tmp_path):
  variables = random_variables(MODEL)
  path = str(tmp_path / "maxvit.safetensors")
  checkpoints.save(path, variables, MODEL)
  sd = timm_maxvit.timm_vit.read_state_dict(path)
  assert sd["stem.norm1.num_batches_tracked"].dtype == np.int64
  assert "stages.1.blocks.0.conv.shortcut.expand.weight" in sd
  assert "stages.1.blocks.1.attn_grid.attn.rel_pos.relative_position_bias_table" in sd
  loaded = timm_maxvit.load_variables(path, MODEL)
  want = common.flatten(common.to_numpy(variables))
  got = common.flatten(loaded)
  assert set(got) == set(want)
  for k, v in want.items():
    np.testing.assert_array_equal(got[k], v, err_msg=k)
  assert set(common.flatten(checkpoints.load(path, MODEL))) == set(
      common.flatten(loaded["params"]))
  cfg = checkpoints.model_config(path)
  assert cfg == dict(name="maxvit", embed_dims=(32, 64), depths=(1, 2), stem_width=16,
                     head_dim=16, window_size=2, grid_size=4, mlp_ratio=4.0, expand_ratio=4.0,
                     se_ratio=0.25, head_hidden=48, qkv_bias=True, num_classes=10,
                     image_size=64)
  rebuilt = checkpoints.build_model(path, image_size=SIZE)
  assert isinstance(rebuilt, models.MaxViT) and rebuilt == MODEL
  # parameters alone: flax's initial statistics are written
  bare = timm_maxvit.to_timm(variables["params"], MODEL)
  assert set(bare) == set(sd) and not bare["stem.norm1.running_mean"].any()
  sd.pop("stages.0.blocks.0.conv.norm2.running_var")
  with pytest.raises(checkpoints.CheckpointMismatch, match="missing keys"):
    timm_maxvit.variables_from_timm(sd, MODEL)
  with pytest.raises(ValueError, match="MaxViT checkpoints are timm files"):
    checkpoints.save(str(tmp_path / "maxvit.npz"), variables, MODEL)


def test_file_statistics_reach_loading_and_evaluation(tmp_path):
  """vitjax.load and evaluation's load_params give a file's running statistics with its
  parameters (a model without them would evaluate on flax's 0 / 1)."""
  variables = random_variables(MODEL)
  path = str(tmp_path / "maxvit.safetensors")
  checkpoints.save(path, variables, MODEL)
  want = common.flatten(common.to_numpy(variables))
  model, loaded, _ = vitjax.load(path, image_size=SIZE)
  assert model == MODEL
  got = common.flatten(loaded)
  assert set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in want)
  _, _, stats = evaluate.load_params(None, model, None, path)
  assert common.flatten(stats).keys() == common.flatten(variables["batch_stats"]).keys()


# ------------------------------------------------------------------ parity with timm
TORCH_SCRIPT = """
    kwargs, size, out = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
    torch.manual_seed(0)
    model = timm.create_model("maxvit_tiny_tf_224", pretrained=False, img_size=size, **kwargs)
    perturb(model)
    with torch.no_grad():  # running statistics away from 0 / 1 too
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn_like(b))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand_like(b))
    model.eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{out}/timm.safetensors")
    x = torch.randn(2, 3, *size, requires_grad=True)
    logits = model(x)
    cot = torch.randn_like(logits)
    (logits * cot).sum().backward()
    save_file({k: p.grad.contiguous() for k, p in model.named_parameters()},
              f"{out}/grads.safetensors")
    model.train()  # batch statistics; the running means move by momentum 0.1
    with torch.no_grad():
        train_logits = model(x)
    means = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("running_mean")}
    save_file(means, f"{out}/train_means.safetensors")
    ours = timm.create_model("maxvit_tiny_tf_224", pretrained=False, img_size=size, **kwargs)
    ours.load_state_dict(load_file(f"{out}/ours.safetensors"), strict=True)
    ours.eval()
    with torch.no_grad():
        ours_logits = ours(x)
    nhwc = lambda t: t.detach().permute(0, 2, 3, 1).numpy()
    np.savez(f"{out}/ref.npz", x=nhwc(x), logits=logits.detach().numpy(), cot=cot.numpy(),
             dx=nhwc(x.grad), ours_logits=ours_logits.numpy(), train_logits=train_logits.numpy())
"""


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """timm's files and outputs; ours.safetensors is our random tiny MaxViT, exported."""
  if not timm_reference.available():
    pytest.skip(timm_reference.SKIP_REASON)
  out = tmp_path_factory.mktemp("timm_maxvit")
  variables = random_variables(MODEL, seed=3)
  checkpoints.save(str(out / "ours.safetensors"), variables, MODEL)
  timm_reference.run(TORCH_SCRIPT, json.dumps(TIMM_KWARGS), json.dumps(SIZE), str(out))
  return str(out), variables


def test_logits_and_gradients_match_timm(reference):
  out, _ = reference
  ref = np.load(os.path.join(out, "ref.npz"))
  path = os.path.join(out, "timm.safetensors")
  model = checkpoints.build_model(path, image_size=SIZE)
  assert model == MODEL
  variables = timm_maxvit.load_variables(path, model)
  logits, (grads, dx) = logits_and_grads(variables["params"], variables["batch_stats"],
                                         ref["x"], ref["cot"])
  np.testing.assert_allclose(np.asarray(logits), ref["logits"], atol=1e-5, rtol=0)
  # the perturbed weights give small input gradients (|dx| <= ~1e-4): compared relative to them
  np.testing.assert_allclose(np.asarray(dx), ref["dx"], atol=1e-4 * np.abs(ref["dx"]).max(),
                             rtol=0)
  theirs = timm_maxvit.timm_vit.read_state_dict(os.path.join(out, "grads.safetensors"))
  ours = timm_maxvit.to_timm(grads, model)
  ours = {k: v for k, v in ours.items() if not k.endswith(timm_maxvit.STATS)}
  assert set(ours) == set(theirs)
  for k, g in ours.items():
    np.testing.assert_allclose(g, theirs[k], atol=1e-3 * np.abs(theirs[k]).max(), rtol=0,
                               err_msg=k)
  # training mode: BatchNorm normalises with the batch's statistics and, with timm's momentum
  # (PyTorch's 0.1; the default is the official 0.99), moves its running means as timm does
  assert MODEL.bn_momentum == 0.99
  like_timm = tiny(bn_momentum=0.9)
  (train_logits, _), new = jax.jit(lambda v, x: like_timm.apply(
      v, x, train=True, mutable=["batch_stats"]))(variables, ref["x"])
  np.testing.assert_allclose(np.asarray(train_logits), ref["train_logits"], atol=1e-5, rtol=0)
  means = timm_maxvit.timm_vit.read_state_dict(os.path.join(out, "train_means.safetensors"))
  for k, v in timm_maxvit.to_timm({"params": variables["params"], **new}, model).items():
    if k in means:
      np.testing.assert_allclose(v, means[k], atol=1e-5, err_msg=k)


def test_export_loads_strictly_into_timm_with_the_same_logits(reference):
  out, variables = reference
  ref = np.load(os.path.join(out, "ref.npz"))
  logits, _ = logits_and_grads(variables["params"], variables["batch_stats"], ref["x"],
                               ref["cot"])
  np.testing.assert_allclose(np.asarray(logits), ref["ours_logits"], atol=1e-4, rtol=0)


# ------------------------------------------------------------------ training, sharded
def test_train_step_on_eight_devices(data_dir):
  """Two FSDP-sharded steps of the tiniest MaxViT (one stage of one block: MBConv, block and grid
  attention; drop path, layer-wise lr decay) on 8 CPU devices: finite, every parameter moves,
  some are sharded, and the BatchNorm running statistics move."""
  from sharded_steps import fsdp_steps  # pylint: disable=import-outside-toplevel
  assert jax.device_count() == 8
  states = []
  losses, metrics, before, after, shardings = fsdp_steps(
      data_dir, dict(name="maxvit", embed_dims=(16,), depths=(1,), stem_width=8, head_dim=8,
                     window_size=2, grid_size=2, drop_path=0.1), states=states)
  assert np.isfinite(losses).all() and float(metrics["train/nonfinite"]) == 0.0
  still = [k for k, v in before.items() if np.array_equal(after[k], v)]
  assert not still, still
  assert any("fsdp" in tuple(s.spec) for s in jax.tree_util.tree_leaves(shardings.params))
  stats = [common.flatten(s.batch_stats) for s in states]
  assert set(stats[0]) == {f"{m}/{v}" for m in ("stem/norm1", "stage_0/block_0/conv/pre_norm",
                                                "stage_0/block_0/conv/norm1",
                                                "stage_0/block_0/conv/norm2")
                           for v in ("mean", "var")}
  assert all(not np.array_equal(stats[0][k], stats[1][k]) for k in stats[0])
