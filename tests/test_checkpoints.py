"""Checkpoints: round trips through timm and big_vision files, clear errors, posemb resampling,
and logits parity with timm (random weights) when a PyTorch interpreter is given.

Parity needs `VITJAX_TORCH_PYTHON=/path/to/venv/bin/python` (torch + timm; `.ci/torch_env.sh`
builds one); it is skipped otherwise. Everything else runs without torch.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitjax import checkpoints, models
from vitjax.checkpoints import big_vision, common, timm

import timm_reference as timm_reference_lib

SIZE = 16


def build(size=SIZE, **cfg):
  """A tiny ViT (width 128, 2 heads: the head count a file's width implies)."""
  cfg = {"variant": "Ti/4", "depth": 2, "width": 128, "num_heads": 2, "mlp_dim": 256, **cfg}
  return models.build(cfg, num_classes=10, image_size=size)


def random_params(model, seed=0):
  """Initialised, then perturbed (numpy) so that every parameter, zero-initialised heads too,
  matters. Eager on purpose: its small per-operation compiles are shared by all tests."""
  size = model.image_size[0]
  params = model.init(jax.random.key(seed), jnp.zeros((1, size, size, 3)))["params"]
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda x: np.asarray(x) + rng.normal(0.0, 0.05, x.shape).astype(np.float32), params)


def logits(model, params, size=SIZE):
  x = np.random.default_rng(7).normal(size=(2, size, size, 3)).astype(np.float32)
  return np.asarray(model.apply({"params": params}, x)[0])


def assert_same_tree(a, b):
  fa, fb = common.flatten(common.to_numpy(a)), common.flatten(common.to_numpy(b))
  assert set(fa) == set(fb), set(fa) ^ set(fb)
  for k in fa:
    np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


TIMM_CASES = {
    "vit": dict(),
    "deit_distilled": dict(distill_token=True),
    "reg4_cls_no_embed_class": dict(num_registers=4, layerscale=1e-5, posemb_prefix=False),
    "reg4_gap": dict(num_registers=4, class_token=False, pool="gap", posemb_prefix=False),
    "gap_norm_first": dict(class_token=False, pool="gap", fc_norm=False),
    "qk_norm_scan": dict(qk_norm=True, scan=True),
    "sincos": dict(posemb="sincos2d"),
}
BV_CASES = {
    "tok": dict(posemb_prefix=False, gelu_approximate=True),
    "gap": dict(class_token=False, pool="gap", fc_norm=False, gelu_approximate=True),
    "map": dict(class_token=False, pool="map", gelu_approximate=True),
    "scan": dict(posemb_prefix=False, gelu_approximate=True, scan=True),
}


@pytest.mark.parametrize("case", sorted(TIMM_CASES))
def test_timm_round_trip(case, tmp_path):
  model = build(**TIMM_CASES[case])
  params = random_params(model)
  path = str(tmp_path / "model.safetensors")
  checkpoints.save(path, params, model)
  assert_same_tree(checkpoints.load(path, model), params)
  # the architecture read back from the file computes the same function
  rebuilt = checkpoints.build_model(path)
  np.testing.assert_allclose(logits(rebuilt, checkpoints.load(path, rebuilt)),
                             logits(model, params), atol=1e-5)


@pytest.mark.parametrize("case", sorted(BV_CASES))
def test_big_vision_round_trip(case, tmp_path):
  model = build(**BV_CASES[case])
  params = random_params(model)
  path = str(tmp_path / "model.npz")
  checkpoints.save(path, params, model)
  assert_same_tree(checkpoints.load(path, model), params)
  rebuilt = checkpoints.build_model(path)
  assert rebuilt.gelu_approximate and rebuilt.num_heads == model.num_heads
  np.testing.assert_allclose(logits(rebuilt, checkpoints.load(path, rebuilt)),
                             logits(model, params), atol=1e-5)


def test_prefix_posemb_is_folded_exactly_between_layouts():
  """timm's pos_embed over [CLS] loads into a posemb_prefix=False model (and big_vision) by
  folding it into the token: same logits."""
  model = build()
  params = random_params(model)
  sd = timm.to_timm(params, model)
  other = build(posemb_prefix=False, num_registers=0)
  folded = timm.from_timm(sd, other)
  np.testing.assert_allclose(logits(other, folded), logits(model, params), atol=1e-5)
  bv = big_vision.to_big_vision(params, model)  # big_vision has no [CLS] position: folded
  np.testing.assert_allclose(logits(model, big_vision.from_big_vision(bv, model)),
                             logits(model, params), atol=1e-5)


def test_old_big_vision_names_and_cls_posemb():
  """The original ViT npz layout (MultiHeadDotProductAttention_1, MlpBlock_3, LayerNorm_2,
  Transformer/posembed_input with a [CLS] entry) loads like the current one."""
  model = build(posemb_prefix=False, gelu_approximate=True)
  params = random_params(model)
  new = big_vision.to_big_vision(params, model)
  old = {}
  for k, v in new.items():
    k = k.replace("MultiHeadDotProductAttention_0", "MultiHeadDotProductAttention_1")
    k = k.replace("LayerNorm_1", "LayerNorm_2").replace("MlpBlock_0", "MlpBlock_3")
    old[k] = v
  pe_cls = np.full((1, 1, model.width), 0.25, np.float32)
  old["Transformer/posembed_input/pos_embedding"] = np.concatenate(
      [pe_cls, old.pop("pos_embedding")], axis=1)
  old["cls"] = new["cls"] - pe_cls
  loaded = big_vision.from_big_vision(old, model)
  np.testing.assert_allclose(logits(model, loaded), logits(model, params), atol=1e-5)


def test_posemb_resampled_to_new_resolution():
  model = build()
  params = random_params(model)
  sd = timm.to_timm(params, model)
  big = build(size=2 * SIZE)
  loaded = timm.from_timm(sd, big)
  pe = np.asarray(params["pos_embedding"])
  np.testing.assert_array_equal(loaded["pos_embedding"][:, :1], pe[:, :1])  # [CLS] entry kept
  want = models.resample_posemb(pe, big.grid, num_prefix=1)
  np.testing.assert_allclose(loaded["pos_embedding"], want, atol=1e-6)
  assert loaded["pos_embedding"].shape == (1, 1 + 8 * 8, model.width)


def test_errors_name_missing_unexpected_and_bad_shapes(tmp_path):
  model = build()
  sd = timm.to_timm(random_params(model), model)
  broken = dict(sd)
  del broken["blocks.1.mlp.fc1.weight"]
  broken["blocks.1.extra.weight"] = np.zeros(3, np.float32)
  with pytest.raises(checkpoints.CheckpointMismatch) as e:
    timm.from_timm(broken, model)
  msg = str(e.value)
  assert "missing keys (1): blocks.1.mlp.fc1.weight" in msg
  assert "unexpected keys (1): blocks.1.extra.weight" in msg
  # a DeiT checkpoint into a model without a distillation token: both heads named
  deit = build(distill_token=True)
  with pytest.raises(checkpoints.CheckpointMismatch, match="dist_token.*head_dist"):
    timm.from_timm(timm.to_timm(random_params(deit), deit), model)
  wide = dict(sd, **{"blocks.0.mlp.fc1.weight": np.zeros((10, model.width), np.float32)})
  with pytest.raises(checkpoints.CheckpointMismatch,
                     match=rf"block_0/mlp/fc1/kernel.*\({model.width}, 10\)"):
    timm.from_timm(wide, model)
  # big_vision: wrong head count shows up as a shape error, unsupported parameters are named
  bv = big_vision.to_big_vision(random_params(build(num_heads=4)), build(num_heads=4))
  with pytest.raises(checkpoints.CheckpointMismatch, match="query/kernel"):
    big_vision.from_big_vision(bv, model)
  with pytest.raises(ValueError, match="ls1"):
    ls = build(layerscale=0.1)
    big_vision.to_big_vision(random_params(ls), ls)
  with pytest.raises(ValueError, match="suffix"):
    checkpoints.save(str(tmp_path / "m.ckpt"), {}, model)


def test_skip_head_and_merge_over_init(tmp_path):
  model = build()
  params = random_params(model)
  path = str(tmp_path / "m.safetensors")
  checkpoints.save(path, params, model)
  other = models.build(dict(variant="Ti/4", depth=2, width=128, num_heads=2, mlp_dim=256),
                        num_classes=3, image_size=SIZE)
  init = random_params(other, seed=3)
  with pytest.raises(checkpoints.CheckpointMismatch, match="head"):
    checkpoints.load(path, other)
  merged = checkpoints.load_into(path, other, init, skip=("head",))
  np.testing.assert_array_equal(merged["head"]["kernel"], init["head"]["kernel"])
  np.testing.assert_array_equal(merged["block_1"]["attn"]["qkv"]["kernel"],
                                params["block_1"]["attn"]["qkv"]["kernel"])


def test_pth_without_torch_says_what_to_do(tmp_path):
  try:
    import torch  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    pytest.skip("torch is installed here")
  except ImportError:
    pass
  path = tmp_path / "m.pth"
  path.write_bytes(b"")
  with pytest.raises(ImportError, match="safetensors"):
    checkpoints.read(str(path))


# ------------------------------------------------------------------ parity with timm
# name -> (timm model, timm kwargs, vitjax overrides at load time, image size of the reference)
PARITY = {
    "vit_tiny_patch16_224": ("vit_tiny_patch16_224", dict(img_size=64, depth=4), {}, 64),
    "deit_tiny_distilled_patch16_224": (
        "deit_tiny_distilled_patch16_224", dict(img_size=64, depth=4), {}, 64),
    "vit_small_patch14_reg4_dinov2": (
        "vit_small_patch14_reg4_dinov2", dict(img_size=56, depth=4, num_classes=10), {}, 56),
    "vit_medium_patch16_reg4_gap_256": (
        "vit_medium_patch16_reg4_gap_256", dict(img_size=64, depth=4, num_classes=10), {}, 64),
    "vit_base_patch16_gap_224": (  # average pooling after the final norm (fc_norm=False)
        "vit_base_patch16_gap_224", dict(img_size=64, depth=3, num_classes=10),
        dict(num_heads=16), 64),
    "vit_tiny_patch16_224@96px": ("vit_tiny_patch16_224", dict(img_size=64, depth=4), {}, 96),
}

TORCH_SCRIPT = """
    from timm.layers import resample_abs_pos_embed

    cases, out = json.loads(sys.argv[1]), sys.argv[2]
    torch.manual_seed(0)
    for key, (name, kwargs, _, size) in cases.items():
        model = timm.create_model(name, pretrained=False, **kwargs).eval()
        perturb(model)
        sd = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(sd, f"{out}/{key}.safetensors")
        if size != kwargs["img_size"]:  # the same weights at another resolution (bilinear)
            model = timm.create_model(name, pretrained=False, **dict(kwargs, img_size=size)).eval()
            old, new = kwargs["img_size"] // 16, size // 16
            sd["pos_embed"] = resample_abs_pos_embed(
                sd["pos_embed"], (new, new), (old, old), num_prefix_tokens=model.num_prefix_tokens,
                interpolation="bilinear", antialias=False)
            model.load_state_dict(sd)
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            logits = model(x)
        np.savez(f"{out}/{key}.npz", x=x.permute(0, 2, 3, 1).numpy(), logits=logits.numpy())
    print(json.dumps({"torch": torch.__version__, "timm": timm.__version__}))
"""


@pytest.fixture(scope="module")
def timm_reference(tmp_path_factory):
  if not timm_reference_lib.available():
    pytest.skip(timm_reference_lib.SKIP_REASON)
  out = tmp_path_factory.mktemp("timm")
  timm_reference_lib.run(TORCH_SCRIPT, json.dumps(PARITY), str(out))
  return str(out)


@pytest.mark.parametrize("case", list(PARITY))
def test_logits_match_timm(case, timm_reference):
  _, kwargs, overrides, size = PARITY[case]
  path = os.path.join(timm_reference, f"{case}.safetensors")
  ref = np.load(os.path.join(timm_reference, f"{case}.npz"))
  model = checkpoints.build_model(path, image_size=size, **overrides)
  assert model.depth == kwargs["depth"]
  params = checkpoints.load(path, model)
  ours = model.apply({"params": params}, jnp.asarray(ref["x"]))[0]
  np.testing.assert_allclose(np.asarray(ours), ref["logits"], atol=1e-4, rtol=0)
