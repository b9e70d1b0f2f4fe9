"""The DeiT recipe: augmentations (against naive formulas), mixup/cutmix, repeated augmentation,
EMA, distillation loss, layer-wise lr decay, the EViT configs, and a training run with all of it
followed by evaluation mode (our checkpoint, its EMA, and an imported file; the CLI)."""
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import evit_finetune, evit_scratch, offtheshelf, swin_imagenet
from vitjax import checkpoints, evaluate, models
from vitjax.data import augment, pp
from vitjax.train import recipe, trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def image(h=20, w=24, c=3, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8)


# ------------------------------------------------------------------ RandAugment
GEO = dict(resample=0, fill=(124, 116, 104))  # nearest: integer shifts are exact


@pytest.mark.parametrize("m", [0.0, 5.0, 9.0, 10.0])
def test_randaugment_point_ops_against_naive(m):
  x = image()
  rng = lambda: np.random.default_rng(0)
  run = lambda name: np.asarray(augment.apply_op(augment._to_pil(x), name, m, rng(), GEO))
  np.testing.assert_array_equal(run("Invert"), 255 - x)
  thresh = 256 - min(256, int(m / 10 * 256))
  np.testing.assert_array_equal(run("SolarizeIncreasing"), np.where(x < thresh, x, 255 - x))
  add = min(128, int(m / 10 * 110))
  np.testing.assert_array_equal(run("SolarizeAdd"),
                                np.where(x < 128, np.minimum(x.astype(int) + add, 255), x))
  bits = 4 - int(m / 10 * 4)
  np.testing.assert_array_equal(run("PosterizeIncreasing"),
                                x & np.uint8((0xFF << (8 - bits)) & 0xFF))
  if m == 0:  # the "increasing" enhancements are the identity at magnitude 0 (factor 1)
    for name in ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                 "SharpnessIncreasing", "ShearX", "Rotate", "TranslateXRel"):
      np.testing.assert_array_equal(run(name), x, err_msg=name)


def test_randaugment_translate_is_a_shift_with_fill():
  x = image(20, 20)
  out = np.asarray(augment.apply_op(augment._to_pil(x), "TranslateXRel", 10.0,
                                    np.random.default_rng(3), GEO))
  shift = 9  # 0.45 * 20 pixels, either direction
  left = np.concatenate([x[:, shift:], np.broadcast_to(GEO["fill"], (20, shift, 3))], axis=1)
  right = np.concatenate([np.broadcast_to(GEO["fill"], (20, shift, 3)), x[:, :-shift]], axis=1)
  assert np.array_equal(out, left) or np.array_equal(out, right)


@pytest.mark.parametrize("channels", [3, 1])
def test_randaugment_shapes_range_and_determinism(channels):
  op = pp.parse("randaugment(2, 9.0, 0.5)")
  x = image(c=channels)
  outs = [op({"image": x, "label": 0}, np.random.default_rng(s))["image"] for s in range(12)]
  for o in outs:
    assert o.shape == x.shape and o.dtype == np.uint8
  again = op({"image": x, "label": 0}, np.random.default_rng(5))["image"]
  np.testing.assert_array_equal(again, outs[5])
  assert sum(not np.array_equal(o, x) for o in outs) >= 6  # p=0.5 per op, 2 ops: ~3/4 change
  assert len({o.tobytes() for o in outs}) >= 6
  for name in augment.OP_NAMES:  # every op runs at every magnitude on RGB and grey images
    for m in (0.0, 10.0):
      out = augment.apply_op(augment._to_pil(x), name, m, np.random.default_rng(1),
                             dict(resample=3, fill=(124, 116, 104) if channels == 3 else 115))
      assert np.asarray(out).reshape(x.shape).dtype == np.uint8
  assert len(augment.OP_NAMES) == 15


# ------------------------------------------------------------------ random erasing
def test_random_erasing_box_area_aspect_and_noise():
  op = pp.parse("random_erasing(1.0, 'pixel')")
  for seed in range(20):
    x = np.zeros((64, 64, 3), np.float32)
    out = op({"image": x, "label": 0}, np.random.default_rng(seed))["image"]
    changed = np.any(out != 0, axis=-1)
    ys, xs = np.nonzero(changed)
    h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    assert changed.sum() == h * w  # one solid rectangle
    assert 0.02 * 0.8 <= h * w / 64 ** 2 <= 1 / 3 * 1.2
    assert 0.3 / 1.4 <= h / w <= 1.4 / 0.3
    vals = out[changed]
    if vals.size > 200:
      assert abs(vals.mean()) < 0.3 and 0.7 < vals.std() < 1.3
  x = np.ones((8, 8, 3), np.float32)
  same = pp.parse("random_erasing(0.0)")({"image": x, "label": 0}, np.random.default_rng(0))
  np.testing.assert_array_equal(same["image"], x)
  a = op({"image": x, "label": 0}, np.random.default_rng(4))["image"]
  np.testing.assert_array_equal(a, op({"image": x, "label": 0}, np.random.default_rng(4))["image"])
  with pytest.raises(ValueError, match="after normalize"):
    op({"image": np.zeros((8, 8, 3), np.uint8), "label": 0}, np.random.default_rng(0))


# ------------------------------------------------------------------ mixup / cutmix
def batch(n=8, h=16, w=16, seed=0):
  rng = np.random.default_rng(seed)
  return {"image": rng.normal(size=(n, h, w, 3)).astype(np.float32),
          "label": rng.permutation(10)[:n]}


def lam_from_labels(out, labels, smoothing, num_classes=10):
  off = smoothing / num_classes
  return (out["label"][0, labels[0]] - off) / (1 - smoothing)


def test_mixup_is_a_convex_combination_with_the_reversed_batch():
  b = batch()
  for seed in range(5):
    out = augment.mixup_cutmix(b, np.random.default_rng(seed), num_classes=10, cutmix_alpha=0.0)
    lam = lam_from_labels(out, b["label"], 0.1)
    np.testing.assert_allclose(out["image"], lam * b["image"] + (1 - lam) * b["image"][::-1],
                               atol=1e-5)
    np.testing.assert_allclose(out["label"].sum(-1), 1.0, atol=1e-6)
    assert out["label"].min() >= 0.1 / 10 - 1e-7 and out["label"].shape == (8, 10)


def test_cutmix_pastes_one_box_and_weights_labels_by_its_area():
  b = batch()
  for seed in range(8):
    out = augment.mixup_cutmix(b, np.random.default_rng(seed), num_classes=10, mixup_alpha=0.0,
                               label_smoothing=0.0)
    from_flip = np.all(out["image"] == b["image"][::-1], axis=(0, 3))
    from_self = np.all(out["image"] == b["image"], axis=(0, 3))
    assert np.all(from_flip | from_self)
    lam = lam_from_labels(out, b["label"], 0.0)
    np.testing.assert_allclose(from_flip.mean(), 1 - lam, atol=1e-6)
    np.testing.assert_allclose(out["label"].sum(-1), 1.0, atol=1e-6)


def test_mixup_cutmix_switch_determinism_and_errors():
  b = batch()
  kinds = set()
  for seed in range(20):
    out = augment.mixup_cutmix(b, np.random.default_rng(seed), num_classes=10)
    cut = np.all(np.all(out["image"] == b["image"][::-1], axis=-1)
                 | np.all(out["image"] == b["image"], axis=-1))
    kinds.add(bool(cut))
  assert kinds == {True, False}  # both branches with switch_prob 0.5
  a = augment.mixup_cutmix(b, np.random.default_rng(3), num_classes=10)
  c = augment.mixup_cutmix(b, np.random.default_rng(3), num_classes=10)
  np.testing.assert_array_equal(a["image"], c["image"])
  np.testing.assert_array_equal(a["label"], c["label"])
  none = augment.mixup_cutmix(b, np.random.default_rng(0), num_classes=10, prob=0.0)
  np.testing.assert_array_equal(none["image"], b["image"])
  np.testing.assert_allclose(none["label"][np.arange(8), b["label"]], 0.91, atol=1e-6)
  with pytest.raises(ValueError, match="even"):
    augment.mixup_cutmix(batch(n=7), np.random.default_rng(0), num_classes=10)
  with pytest.raises(ValueError, match="unknown option"):
    recipe.check_mixup(dict(alpha=1.0))


# ------------------------------------------------------------------ repeated augmentation
def test_repeated_aug_sampler_repeats_across_hosts_and_epochs():
  n = 12
  s = augment.RepeatedAugSampler(n, repeats=3, seed=1)
  keys = [s[i].record_key for i in range(3 * n)]
  for e in range(3):
    epoch = keys[e * n:(e + 1) * n]
    groups = [epoch[i:i + 3] for i in range(0, n, 3)]
    assert all(len(set(g)) == 1 for g in groups)  # each image 3 times in a row
    assert len({g[0] for g in groups}) == n // 3  # n/3 distinct images per epoch
  assert keys[:n] != keys[n:2 * n]  # a new permutation each epoch
  host0, host1 = keys[0:n:2], keys[1:n:2]  # the loader's interleaving over 2 hosts
  assert host0[0] == host1[0] == keys[0]  # the repeats of one image go to both hosts
  draws = {float(s[i].rng.random()) for i in range(6)}
  assert len(draws) == 6  # every repeat gets its own augmentation


# ------------------------------------------------------------------ losses, EMA, layer decay
def test_cross_entropy_accepts_int_and_soft_labels():
  logits = jax.random.normal(jax.random.key(0), (4, 5))
  labels = jnp.array([0, 3, 1, 4])
  soft = optax.smooth_labels(jax.nn.one_hot(labels, 5), 0.1)
  np.testing.assert_allclose(recipe.cross_entropy(logits, labels, 5, 0.1),
                             recipe.cross_entropy(logits, soft, 5, 0.1), atol=1e-6)
  naive = -np.sum(np.asarray(soft) * np.asarray(jax.nn.log_softmax(logits)), -1)
  np.testing.assert_allclose(recipe.cross_entropy(logits, soft, 5), naive, atol=1e-6)
  np.testing.assert_array_equal(recipe.hard_labels(soft), labels)
  np.testing.assert_array_equal(recipe.hard_labels({"label": labels}), labels)


def log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_distillation_loss_against_naive():
  rng = np.random.default_rng(0)
  cls, dist, teacher = (rng.normal(size=(6, 7)).astype(np.float32) for _ in range(3))
  labels = rng.integers(0, 7, 6)
  onehot = np.eye(7)[labels] * 0.9 + 0.1 / 7
  base = -np.sum(onehot * log_softmax(cls), -1)
  hard = -log_softmax(dist)[np.arange(6), teacher.argmax(-1)]
  got = recipe.distillation_loss(cls, dist, labels, teacher, num_classes=7, smoothing=0.1)
  np.testing.assert_allclose(got, 0.5 * base + 0.5 * hard, rtol=1e-5)
  tau = 2.0
  log_p, log_q = log_softmax(dist / tau), log_softmax(teacher / tau)
  kl = np.sum(np.exp(log_q) * (log_q - log_p), -1) * tau ** 2 / 7
  got = recipe.distillation_loss(cls, dist, labels, teacher, num_classes=7, smoothing=0.1,
                                 alpha=0.3, kind="soft", tau=tau)
  np.testing.assert_allclose(got, 0.7 * base + 0.3 * kl, rtol=1e-5)
  config = evit_finetune.get_config("smoke=True")
  config.distill = dict(alpha=0.5, type="hard")
  via_trainer = recipe.train_loss(cls, {"dist_logits": dist},
                                  {"label": labels, "teacher_logits": teacher}, 7, 0.1, config)
  np.testing.assert_allclose(via_trainer, 0.5 * base + 0.5 * hard, rtol=1e-5)


def test_ema_matches_naive_recursion():
  params = {"w": jnp.arange(3.0), "b": {"c": jnp.ones((2, 2))}}
  tx = optax.chain(optax.sgd(0.1), recipe.ema(0.9))
  state = tx.init(params)
  p, e = params, params
  for t in range(4):
    grads = jax.tree_util.tree_map(lambda x, t=t: jnp.sin(x + t), p)
    updates, state = tx.update(grads, state, p)
    p = optax.apply_updates(p, updates)
    e = jax.tree_util.tree_map(lambda e_, p_: 0.9 * e_ + 0.1 * p_, e, p)
  got = recipe.ema_params(state)
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(e)):
    np.testing.assert_allclose(a, b, atol=1e-6)
  assert recipe.ema_params(optax.sgd(0.1).init(params)) is None


def tiny(**kw):
  return models.build(dict(variant="Ti/4", depth=2, width=32, num_heads=2, mlp_dim=64, **kw),
                      num_classes=3, image_size=8)


def test_layer_decay_scales_and_updates():
  model = tiny(distill_token=True)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]
  params = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, np.float32), shapes)
  scales = recipe.layer_scales(shapes, 0.5, depth=2)
  assert float(scales["embedding_kernel"]) == float(scales["pos_embedding"]) == 0.125
  assert float(scales["cls"]) == float(scales["dist"]) == 0.125
  assert float(scales["block_0"]["attn"]["qkv"]["kernel"]) == 0.25
  assert float(scales["block_1"]["mlp"]["fc2"]["bias"]) == 0.5
  assert float(scales["norm"]["scale"]) == float(scales["head"]["kernel"]) == 1.0
  assert float(scales["head_dist"]["bias"]) == 1.0
  scan = tiny(scan=True)
  p_scan = jax.eval_shape(scan.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]
  s_scan = recipe.layer_scales(p_scan, 0.5, depth=2)["encoder"]["block"]["attn"]["qkv"]["kernel"]
  np.testing.assert_allclose(np.asarray(s_scan).reshape(-1), [0.25, 0.5])
  config = evit_finetune.get_config("smoke=True")
  config.optimizer.layer_decay = 0.5
  config.ema = None
  tx = recipe.wrap_optimizer(optax.sgd(1.0), config, model)
  grads = jax.tree_util.tree_map(np.ones_like, params)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)  # one compile, not one per op
  assert float(updates["block_0"]["norm1"]["scale"][0]) == -0.25
  assert float(updates["embedding_bias"][0]) == -0.125
  assert float(updates["head"]["bias"][0]) == -1.0


# ------------------------------------------------------------------ configs
def test_evit_configs_carry_the_recipes():
  ft = evit_finetune.get_config("init_from=/x/deit_s.safetensors")
  assert ft.optimizer.lr == pytest.approx(2e-5 * 2048 / 512) and ft.optimizer.min_lr == 2e-6
  assert ft.optimizer.weight_decay == 1e-6 and ft.warmup_epochs == 0
  assert ft.model.drop_path == 0.0 and "warmup" not in ft.model.tokens
  assert ft.total_epochs == 30 and ft.init_from == "/x/deit_s.safetensors"
  sc = evit_scratch.get_config("keep_rate=0.5")
  assert sc.model.tokens.warmup.to_dict() == dict(start_epoch=10, ramp_epochs=100,
                                                  max_buckets=16)
  assert sc.total_epochs == 300 and sc.ema.decay == 0.99996 and sc.data.repeated_aug == 3
  assert sc.model.tokens.keep_rate == 0.5 and sc.mixup.cutmix_alpha == 1.0
  for cfg in (ft, sc):
    pp.parse(cfg.data.pp_train)  # the DeiT ops are registered and parse
    model = models.build(cfg.model, num_classes=1000, image_size=224)
    assert model.width == 384 and model.stage().plan().blocks[3] is not None
  for mod in (evit_finetune, evit_scratch):
    smoke = mod.get_config("smoke=True")
    models.build(smoke.model, num_classes=10, image_size=8).validate()
  off = offtheshelf.get_config("reducer=tome,r=13")
  assert off.model.tokens.to_dict() == dict(name="tome", prop_attn=True, r=13)
  assert offtheshelf.get_config("smoke=True").model.from_checkpoint



def test_swin_config_carries_the_official_recipe():
  cfg = swin_imagenet.get_config("variant=B")
  assert cfg.optimizer.lr == pytest.approx(1e-3) and cfg.optimizer.min_lr == pytest.approx(1e-5)
  assert cfg.optimizer.clip_norm == 5.0 and cfg.warmup_epochs == 20 and cfg.total_epochs == 300
  assert cfg.model.drop_path == 0.5 and "ema" not in cfg and cfg.mixup.label_smoothing == 0.1
  pp.parse(cfg.data.pp_train)
  model = models.build(cfg.model, num_classes=1000, image_size=224)
  assert model.embed_dim == 128 and tuple(model.depths) == (2, 2, 18, 2)
  smoke = swin_imagenet.get_config("smoke=True")
  models.build(smoke.model, num_classes=10, image_size=8).validate()
  with pytest.raises(ValueError, match="valid: T, S, B"):
    swin_imagenet.get_config("variant=L")

# ------------------------------------------------------------------ training + evaluation
def save_tiny(path, distill_token, seed):
  model = models.build(dict(variant="Ti/2", width=64, depth=4, num_heads=2, mlp_dim=128,
                            distill_token=distill_token), num_classes=10, image_size=8)
  params = model.init(jax.random.key(seed), jnp.zeros((1, 8, 8, 1)))["params"]
  checkpoints.save(path, params, model)
  return params


def test_recipe_training_then_evaluation_mode(data_dir, tmp_path):
  """EViT fine-tuning smoke run from a pretrained file with the whole recipe (RandAugment,
  random erasing, mixup/cutmix, repeated augmentation, EMA, layer decay, hard distillation),
  then evaluation of its checkpoint (and EMA) and of an imported file, in-process and by CLI."""
  init_path = str(tmp_path / "student.safetensors")
  init = save_tiny(init_path, distill_token=True, seed=1)
  teacher_path = str(tmp_path / "teacher.npz")
  teacher = models.build(dict(variant="Ti/2", width=64, depth=2, num_heads=2, mlp_dim=128,
                              posemb_prefix=False, gelu_approximate=True),
                         num_classes=10, image_size=8)
  checkpoints.save(teacher_path, teacher.init(jax.random.key(2), jnp.zeros((1, 8, 8, 1)))["params"],
                   teacher)
  config = evit_finetune.get_config(f"smoke=True,init_from={init_path}")
  config.data.data_dir = data_dir
  config.model.distill_token = True
  config.distill = dict(init_from=teacher_path, alpha=0.5, type="hard")
  config.optimizer.layer_decay = 0.75
  config.ema.decay = 0.5
  workdir = str(tmp_path / "work")
  summary = trainer.train_and_evaluate(config, workdir)
  assert summary["final_step"] == 4 and math.isfinite(summary["eval_loss"])
  assert "eval_ema_top1" in summary

  out = str(tmp_path / "eval.json")
  rows = evaluate.run(config, workdir, ema=True, runs=2, output=out)
  assert rows[0]["top1"] == pytest.approx(100 * summary["eval_ema_top1"], abs=1e-3)
  params, _, _ = evaluate.restore_params(config, trainer.build_model(config, info_of(config)),
                                      info_of(config), workdir)
  # lr 2e-5 * 32/512 for 4 steps: the fine-tuned weights are still the pretrained ones
  np.testing.assert_allclose(params["block_2"]["mlp"]["fc1"]["kernel"],
                             init["block_2"]["mlp"]["fc1"]["kernel"], atol=1e-4)
  with open(out) as f:
    saved = json.load(f)
  for key in ("top1", "top5", "images_per_sec", "gmacs", "params_m", "keep_rate"):
    assert key in saved[0]

  off = offtheshelf.get_config("smoke=True")
  off.data.data_dir = data_dir
  rows = evaluate.run(off, init_path, keep_rates=[1.0, 0.5], runs=2)
  assert rows[0]["params_m"] == rows[1]["params_m"] and rows[1]["gmacs"] < rows[0]["gmacs"]
  assert "| evit | 0.5" in evaluate.table(rows).replace("0.50", "0.5")

  cli = subprocess.run(
      [sys.executable, "-m", "vitjax.evaluate", "--config=configs/offtheshelf.py:smoke=True",
       f"--config.data.data_dir={data_dir}", f"--checkpoint={init_path}", "--keep_rates=0.7",
       "--runs=1", f"--output={tmp_path / 'cli.json'}"],
      cwd=ROOT, capture_output=True, text=True, check=False, timeout=300,
      env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1"))
  assert cli.returncode == 0, cli.stderr[-2000:]
  assert "| student.safetensors | evit | 0.70 |" in cli.stdout.replace("0.7 |", "0.70 |")
  assert json.load(open(tmp_path / "cli.json"))[0]["keep_rate"] == 0.7


def info_of(config):
  from vitjax import data  # pylint: disable=import-outside-toplevel
  return data.get_info(config.data)
