"""CvT: the official models' parameter counts and MACs, a tiny model's forward / gradient / bf16,
config errors, layer ids, official files in and out with their BatchNorm statistics, logits and
gradients equal to the official code's, and a sharded train step on 8 CPU devices.

The official parity test runs microsoft/CvT's `lib/models/cls_cvt.py` in the torch interpreter
(`VITJAX_TORCH_PYTHON`, with einops) from the folder that `VITJAX_CVT_OFFICIAL` names; the file is
loaded as it is, with stand-ins for what it imports from outside PyTorch: `torch._six` (gone from
PyTorch 2), its package's `registry`, and scipy where it is absent (used only to resize position
embeddings, which CvT does not have). It skips without either.

The parity model (embed dims (16, 24, 32), one block per stage, heads (1, 2, 2), 48x32 images)
has grids 12x8, 6x4 and 3x2 with the [CLS] token: the last stage's keys and values are strided
from an odd side (ceil(3 / 2) x ceil(2 / 2) = 2 keys besides the [CLS]).
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm_reference

import vitjax
from vitjax import checkpoints, models
from vitjax.checkpoints import common, official_cvt
from vitjax.tokens import macs as macs_lib
from vitjax.train import optim, recipe

OFFICIAL_DIR = os.environ.get("VITJAX_CVT_OFFICIAL")
ARCH = dict(embed_dims=(16, 24, 32), depths=(1, 1, 1), num_heads=(1, 2, 2))
TINY = dict(name="cvt", **ARCH)
SIZE = (48, 32)


def tiny(dtype="float32", **kw):
  return models.build({**TINY, **kw}, num_classes=10, image_size=SIZE, dtype=dtype)


def random_variables(model, seed=0):
  """Random values in the model's shapes (no init compiled): norm gains near 1, q and k
  projections large enough for the attention to be far from uniform, everything else
  (zero-initialised head, biases) small; BatchNorm means small and variances near 1."""
  rng = np.random.default_rng(seed)
  def draw(path, leaf):
    names = [getattr(k, "key", "") for k in path]
    if names[-1] == "var":
      return (1.0 + 0.3 * rng.random(leaf.shape)).astype(np.float32)
    std = 0.3 if names[-2:] in (["proj_q", "kernel"], ["proj_k", "kernel"]) else 0.05
    noise = rng.normal(0.0, 0.1 if names[-1] == "mean" else std, leaf.shape).astype(np.float32)
    return noise + 1.0 if names[-1] == "scale" else noise
  images = jax.ShapeDtypeStruct((1, *model.image_size, 3), jnp.float32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(images.shape)))
  return jax.tree_util.tree_map_with_path(draw, dict(shapes))


def images(n=2, seed=7):
  return np.random.default_rng(seed).normal(size=(n, *SIZE, 3)).astype(np.float32)


MODEL = tiny()


@jax.jit
def logits_and_grads(variables, x, cot):
  """MODEL's logits (evaluation: running statistics) and the gradients of <logits, cot> for its
  parameters and the images (one compile that every test of MODEL shares)."""
  def weighted(p, x):
    logits = MODEL.apply({"params": p, "batch_stats": variables["batch_stats"]}, x)[0]
    return jnp.sum(logits * cot), logits
  (_, logits), grads = jax.value_and_grad(weighted, argnums=(0, 1), has_aux=True)(
      variables["params"], x)
  return logits, grads


@pytest.mark.parametrize("variant,size,count,gmacs", [
    ("13", 224, 19_997_480, 4.57), ("21", 224, 31_622_696, 7.18),
    ("W24", 384, 277_196_392, 194.22)])
def test_variants_have_the_official_parameter_counts(variant, size, count, gmacs):
  """Counts of the official ConvolutionalVisionTransformer built from each config at 1000
  classes; GMACs the paper's 4.5 / 7.1 / 193.2 G (the official count adds biases, BatchNorm's
  none and counts the strided grids as h / 2)."""
  model = models.build({"name": "cvt", "variant": variant}, num_classes=1000, image_size=size)
  assert models.num_params(common.abstract_params(model)) == count
  assert round(macs_lib.model_macs(model) / 1e9, 2) == gmacs
  assert model.stage_grids() == [(size // 4,) * 2, (size // 8,) * 2, (size // 16,) * 2]


def test_tiny_forward_gradient_bf16():
  variables = random_variables(MODEL)
  x = images()
  cot = np.random.default_rng(1).normal(size=(2, 10)).astype(np.float32)
  logits, (grads, dx) = logits_and_grads(variables, x, cot)
  assert logits.shape == (2, 10) and np.isfinite(dx).all() and np.abs(dx).max() > 0
  shapes = jax.eval_shape(lambda v, x: MODEL.apply(v, x)[1], variables, x)
  assert [shapes[f"stage_{s}"].shape for s in range(3)] == [(2, 12, 8, 16), (2, 6, 4, 24),
                                                           (2, 3, 2, 32)]
  attn = variables["params"]["stage_2"]["block_0"]["attn"]
  assert set(attn) == {"conv_proj_q", "conv_proj_k", "conv_proj_v", "proj_q", "proj_k", "proj_v",
                       "proj"}
  assert attn["conv_proj_k"]["conv"]["kernel"].shape == (3, 3, 1, 32)
  assert set(variables["batch_stats"]["stage_0"]["block_0"]["attn"]["conv_proj_v"]["bn"]) == {
      "mean", "var"}
  flat = common.flatten(common.to_numpy(grads))
  assert all(np.isfinite(g).all() for g in flat.values())
  # every parameter gets a gradient but those the official model gives none: proj_k's bias and,
  # without a prefix key, the k BatchNorm's bias (a shift shared by all keys leaves the softmax
  # unchanged), and the last block's q convolution (the head reads the [CLS] query alone, which
  # skips it)
  top = max(np.abs(g).max() for g in flat.values())
  zero = {k for k, g in flat.items() if np.abs(g).max() < 1e-7 * top}
  block = "stage_{}/block_0/attn/"
  assert zero == {*(block.format(s) + "proj_k/bias" for s in range(3)),
                  *(block.format(s) + "conv_proj_k/bn/bias" for s in range(2)),
                  *(block.format(2) + f"conv_proj_q/{k}" for k in ("conv/kernel", "bn/scale",
                                                                 "bn/bias"))}, zero
  # bfloat16 compute, float32 parameters and logits
  half = tiny("bfloat16")
  low = jax.jit(lambda v, x: half.apply(v, x)[0])(variables, x)
  assert low.dtype == jnp.float32 and np.isfinite(low).all()
  np.testing.assert_allclose(low, logits, atol=0.05 * float(np.abs(logits).max()))


@pytest.mark.parametrize("override,message", [
    (dict(tokens={"name": "evit", "keep_rate": 0.7}),
     "CvT takes no token reducer (tokens='evit'): its convolutional projections need the full "
     "grid; valid: tokens=None or 'none'"),
    (dict(scan=True), "CvT cannot scan its blocks"),
    (dict(variant="42"), "unknown CvT variant '42'; valid: 13, 21, W24"),
    (dict(num_heads=(1, 2)), "must name the same number"),
    (dict(num_heads=(1, 5, 2)), "stage 1 has width 24, not divisible by its num_heads 5"),
    (dict(drop_path=(0.1, 0.2)), "drop_path (0.1, 0.2); give one rate in [0, 1) or one per stage"),
    (dict(kernel_size=2), "error: cvt_conv_proj kernel_size=2"),
    (dict(activation="relu"), "unknown MLP activation 'relu'; valid: gelu, quick_gelu"),
    (dict(impl="nope"), "supports impl"),
])
def test_config_errors(override, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace(
      "[", r"\[")):
    model = tiny(**override)
    common.abstract_params(model)  # errors the attention raises when it is traced


def test_layer_ids_and_weight_decay():
  model = models.build({**TINY, "depths": (1, 2, 2)}, num_classes=10, image_size=SIZE)
  shapes = common.abstract_params(model)
  ids = {k: model.layer_id(k) for k in common.flatten(shapes)}
  assert ids["embed_0/proj/kernel"] == ids["embed_0/norm/scale"] == 0
  assert ids["stage_0/block_0/attn/conv_proj_q/conv/kernel"] == 1
  assert ids["embed_1/proj/bias"] == ids["stage_1/block_0/mlp/fc1/kernel"] == 2
  assert ids["stage_1/block_1/attn/proj_v/kernel"] == 3
  assert ids["embed_2/norm/bias"] == ids["cls"] == ids["stage_2/block_0/norm1/scale"] == 4
  assert ids["stage_2/block_1/attn/conv_proj_k/bn/scale"] == 5
  assert ids["norm/scale"] == ids["head/kernel"] == model.depth + 1 == 6
  scales = common.flatten(recipe.layer_scales(shapes, 0.5, model.depth, model.layer_id))
  assert float(scales["stage_0/block_0/attn/proj_q/kernel"]) == 0.5 ** 5
  mask = common.flatten(optim.decay_mask(shapes))
  # the official WITHOUT_WD_LIST (bn, bias, ln) and no_weight_decay (cls_token)
  assert not mask["cls"] and not mask["stage_0/block_0/attn/conv_proj_q/bn/scale"]
  assert not mask["embed_0/proj/bias"] and not mask["norm/scale"]
  assert mask["stage_0/block_0/attn/conv_proj_q/conv/kernel"] and mask["embed_1/proj/kernel"]


def test_official_file_round_trip_with_statistics(tmp_path):
  model = MODEL
  variables = random_variables(model)
  path = str(tmp_path / "cvt.safetensors")
  checkpoints.save(path, variables, model)
  sd = checkpoints.read(path)
  assert sd["stage2.cls_token"].shape == (1, 1, 32)
  assert sd["stage1.blocks.0.attn.conv_proj_k.conv.weight"].shape == (24, 1, 3, 3)
  assert sd["stage0.blocks.0.attn.conv_proj_v.bn.num_batches_tracked"].dtype == np.int64
  cfg = checkpoints.model_config(path)
  assert (cfg["name"], cfg["embed_dims"], cfg["depths"], cfg["num_heads"], cfg["kernel_size"],
          cfg["class_token"], cfg["qkv_bias"]) == ("cvt", (16, 24, 32), (1, 1, 1), (1, 1, 1), 3,
                                                   True, True)
  rebuilt = checkpoints.build_model(path, image_size=SIZE, num_heads=ARCH["num_heads"])
  assert isinstance(rebuilt, models.CvT) and rebuilt.num_heads == model.num_heads
  loaded = official_cvt.load_variables(path, rebuilt)
  params_only = checkpoints.load(path, rebuilt)
  for k, v in common.flatten(common.to_numpy(variables)).items():
    np.testing.assert_array_equal(common.flatten(loaded)[k], v, err_msg=k)
  assert set(common.flatten(params_only)) == set(common.flatten(variables["params"]))
  # vitjax.load: what apply takes, statistics included
  _, run_vars, _ = vitjax.load(path, image_size=SIZE, num_heads=ARCH["num_heads"])
  assert set(run_vars) == {"params", "batch_stats"}
  np.testing.assert_array_equal(
      run_vars["batch_stats"]["stage_1"]["block_0"]["attn"]["conv_proj_k"]["bn"]["var"],
      variables["batch_stats"]["stage_1"]["block_0"]["attn"]["conv_proj_k"]["bn"]["var"])
  sd.pop("stage1.blocks.0.attn.conv_proj_q.bn.running_var")
  with pytest.raises(checkpoints.CheckpointMismatch, match="missing keys"):
    official_cvt.batch_stats_from_official(sd, model)
  sd.pop("stage1.patch_embed.proj.weight")
  with pytest.raises(checkpoints.CheckpointMismatch, match="missing keys"):
    official_cvt.from_official(sd, model)


# ------------------------------------------------------------------ parity with the official code
TORCH_SCRIPT = """
    import collections.abc, importlib.util, types
    from functools import partial
    arch, official_dir, out = json.loads(sys.argv[1]), sys.argv[2], sys.argv[4]
    size = json.loads(sys.argv[3])
    # what cls_cvt.py imports from outside PyTorch and timm: torch._six (PyTorch 1), its package's
    # registry, scipy (for position embeddings only)
    six = types.ModuleType("torch._six")
    six.container_abcs = collections.abc
    sys.modules["torch._six"] = six
    if importlib.util.find_spec("scipy") is None:
        sys.modules["scipy"] = types.ModuleType("scipy")
    package = types.ModuleType("cvt_official")
    package.__path__ = [official_dir]
    registry = types.ModuleType("cvt_official.registry")
    registry.register_model = lambda fn: fn
    sys.modules.update({"cvt_official": package, "cvt_official.registry": registry})
    spec = importlib.util.spec_from_file_location("cvt_official.cls_cvt",
                                                  f"{official_dir}/cls_cvt.py")
    cvt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cvt)
    n = len(arch["depths"])
    config = dict(NUM_STAGES=n, PATCH_SIZE=[7, 3, 3], PATCH_STRIDE=[4, 2, 2],
                  PATCH_PADDING=[2, 1, 1], DIM_EMBED=arch["embed_dims"],
                  NUM_HEADS=arch["num_heads"], DEPTH=arch["depths"], MLP_RATIO=[4.0] * n,
                  ATTN_DROP_RATE=[0.0] * n, DROP_RATE=[0.0] * n, DROP_PATH_RATE=[0.0] * n,
                  QKV_BIAS=[True] * n, CLS_TOKEN=[False] * (n - 1) + [True],
                  POS_EMBED=[False] * n, QKV_PROJ_METHOD=["dw_bn"] * n, KERNEL_QKV=[3] * n,
                  PADDING_KV=[1] * n, STRIDE_KV=[2] * n, PADDING_Q=[1] * n, STRIDE_Q=[1] * n)
    def build():
        # get_cls_model's arguments
        return cvt.ConvolutionalVisionTransformer(
            in_chans=3, num_classes=10, act_layer=cvt.QuickGELU,
            norm_layer=partial(cvt.LayerNorm, eps=1e-5), init="trunc_norm", spec=config)
    torch.manual_seed(0)
    model = build()
    perturb(model)
    with torch.no_grad():
        for name, p in model.named_parameters():  # attention far from uniform
            if name.endswith(("proj_q.weight", "proj_k.weight")):
                p.copy_(0.3 * torch.randn_like(p))
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(0.1 * torch.randn_like(buf))
            elif name.endswith("running_var"):
                buf.copy_(1.0 + 0.3 * torch.rand_like(buf))
    model.eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              f"{out}/official.safetensors")
    x = torch.randn(2, 3, *size, requires_grad=True)
    logits = model(x)
    cot = torch.randn_like(logits)
    (logits * cot).sum().backward()
    save_file({k: p.grad.contiguous() for k, p in model.named_parameters()},
              f"{out}/grads.safetensors")
    model.train()  # batch statistics; the running means move by momentum 0.1
    with torch.no_grad():
        train_logits = model(x)
    means = {k: v.contiguous() for k, v in model.state_dict().items()
             if k.endswith("running_mean")}
    save_file(means, f"{out}/train_means.safetensors")
    ours = build().eval()
    ours.load_state_dict(load_file(f"{out}/ours.safetensors"), strict=True)
    with torch.no_grad():
        ours_logits = ours(x)
    nhwc = lambda t: t.detach().permute(0, 2, 3, 1).numpy()
    np.savez(f"{out}/ref.npz", x=nhwc(x), logits=logits.detach().numpy(), cot=cot.numpy(),
             dx=nhwc(x.grad), train_logits=train_logits.numpy(), ours_logits=ours_logits.numpy())
"""


@pytest.fixture(scope="module")
def official(tmp_path_factory):
  """The official CvT's perturbed weights and statistics, logits and gradients on the tiny
  configuration; ours.safetensors is our random tiny CvT, exported."""
  if not timm_reference.available():
    pytest.skip(timm_reference.SKIP_REASON)
  if not OFFICIAL_DIR or not os.path.exists(os.path.join(OFFICIAL_DIR, "cls_cvt.py")):
    pytest.skip("set VITJAX_CVT_OFFICIAL to the official repository's lib/models/ folder")
  out = tmp_path_factory.mktemp("official_cvt")
  variables = random_variables(MODEL, seed=3)
  checkpoints.save(str(out / "ours.safetensors"), variables, MODEL)
  timm_reference.run(TORCH_SCRIPT, json.dumps(ARCH), OFFICIAL_DIR, json.dumps(SIZE), str(out))
  return str(out), variables


def test_logits_and_gradients_match_the_official_code(official):
  out, _ = official
  ref = np.load(os.path.join(out, "ref.npz"))
  path = os.path.join(out, "official.safetensors")
  model = checkpoints.build_model(path, image_size=SIZE, num_heads=ARCH["num_heads"])
  fields = ("embed_dims", "depths", "num_heads", "kernel_size", "mlp_ratio", "qkv_bias",
            "class_token", "patch_sizes")
  assert all(getattr(model, f) == getattr(MODEL, f) for f in fields)
  variables = official_cvt.load_variables(path, model)
  logits, (grads, dx) = logits_and_grads(variables, ref["x"], ref["cot"])
  np.testing.assert_allclose(np.asarray(logits), ref["logits"], atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(dx), ref["dx"], atol=1e-5, rtol=1e-3)
  theirs = timm_reference_grads(os.path.join(out, "grads.safetensors"))
  ours = {k: v for k, v in official_cvt.to_official(
      {"params": grads, "batch_stats": variables["batch_stats"]}, model).items()
          if k in theirs}
  assert set(ours) == set(theirs)
  for k, g in ours.items():
    np.testing.assert_allclose(g, theirs[k], atol=1e-4 * max(1.0, np.abs(theirs[k]).max()),
                               rtol=1e-3, err_msg=k)
  # training mode: batch statistics, and the running means moved as PyTorch's (the variances
  # differ by n / (n - 1): PyTorch keeps the unbiased one)
  train_logits, updated = jax.jit(lambda v, x: MODEL.apply(
      v, x, train=True, mutable=["batch_stats"]))(variables, ref["x"])
  np.testing.assert_allclose(np.asarray(train_logits[0]), ref["train_logits"], atol=1e-4, rtol=0)
  means = timm_reference_grads(os.path.join(out, "train_means.safetensors"))
  sd = official_cvt.to_official(dict(variables, batch_stats=updated["batch_stats"]), model)
  for k, m in means.items():
    np.testing.assert_allclose(sd[k], m, atol=1e-5, err_msg=k)


def timm_reference_grads(path):
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  return load_file(path)


def test_export_loads_strictly_into_the_official_model_with_the_same_logits(official):
  out, variables = official
  ref = np.load(os.path.join(out, "ref.npz"))
  logits, _ = logits_and_grads(variables, ref["x"], ref["cot"])
  np.testing.assert_allclose(np.asarray(logits), ref["ours_logits"], atol=1e-4, rtol=0)


# ------------------------------------------------------------------ training, sharded
def test_train_step_on_eight_devices(data_dir):
  """Two FSDP-sharded steps of a one-stage CvT (the [CLS] token, BatchNorm in training mode,
  drop path, layer-wise lr decay) on 8 CPU devices: finite, every parameter moves, some are
  sharded."""
  from sharded_steps import fsdp_steps  # pylint: disable=import-outside-toplevel
  assert jax.device_count() == 8
  # 8 px digits: a 2x2 grid after the 7x7 stride-4 embedding, one strided key besides the [CLS]
  losses, metrics, before, after, shardings = fsdp_steps(
      data_dir, dict(name="cvt", embed_dims=(16,), depths=(1,), num_heads=(1,), patch_sizes=(7,),
                     patch_strides=(4,), patch_paddings=(2,), drop_path=0.1))
  assert np.isfinite(losses).all() and float(metrics["train/nonfinite"]) == 0.0
  # proj_k's bias has no gradient (a shift shared by all keys), nor the last block's q
  # BatchNorm (the head reads the [CLS] query alone, which skips it; its conv kernel moves by
  # weight decay): Adam leaves them (up to rounding)
  still = [k for k, v in before.items() if np.array_equal(after[k], v)
           and not k.endswith(("attn/proj_k/bias", "conv_proj_q/bn/bias", "conv_proj_q/bn/scale"))]
  assert not still, still
  assert any("fsdp" in tuple(s.spec) for s in jax.tree_util.tree_leaves(shardings.params))
