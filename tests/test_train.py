"""The trainer: sharding equivalence (1 vs 8 devices, DP and FSDP), end-to-end train + resume."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default as default_config
from vitjax import data
from vitjax.train import mesh as mesh_lib
from vitjax.train import optim, trainer


def smoke_config(data_dir, **overrides):
  config = default_config.get_config("smoke=True")
  config.data.data_dir = data_dir
  config.update(overrides)
  return config


def run_steps(config, devices, mesh_axes, strategy, batches):
  mesh = mesh_lib.make_mesh(mesh_axes, devices)
  info = data.get_info(config.data)
  model = trainer.build_model(config, info)
  tx, _ = optim.make_optimizer(config.optimizer, 10, 2)
  config.sharding = strategy
  state, shardings = trainer.create_state(model, tx, config, mesh, info.image_shape)
  step = jax.jit(trainer.make_train_step(model, tx, config),
                 in_shardings=(shardings, mesh_lib.batch_sharding(mesh)),
                 out_shardings=(shardings, None))
  losses = []
  for b in batches:
    state, m = step(state, trainer.global_batch(b, mesh_lib.batch_sharding(mesh)))
    losses.append(float(m["train/loss"]))
  return jax.device_get(state.params), losses, shardings


def test_one_device_equals_eight_devices_dp_and_fsdp(data_dir):
  assert jax.device_count() == 8
  config = smoke_config(data_dir, batch_size=32, fsdp_min_size=1024)
  loader = iter(data.make_train_loader(config.data, global_batch_size=32, seed=0))
  batches = [next(loader) for _ in range(3)]
  devs = jax.devices()
  p1, l1, _ = run_steps(config, devs[:1], (("data", -1),), "dp", batches)
  p8, l8, _ = run_steps(config, devs, (("data", -1),), "dp", batches)
  pf, lf, sh = run_steps(config, devs, (("data", 2), ("fsdp", 4)), "fsdp", batches)
  np.testing.assert_allclose(l1, l8, rtol=1e-5)
  np.testing.assert_allclose(l1, lf, rtol=1e-5)
  for a, b, c in zip(*(jax.tree_util.tree_leaves(p) for p in (p1, p8, pf))):
    np.testing.assert_allclose(a, b, atol=2e-5)
    np.testing.assert_allclose(a, c, atol=2e-5)
  # FSDP really shards something: the MLP kernels are split over the fsdp axis.
  specs = [s.spec for s in jax.tree_util.tree_leaves(sh.params)]
  assert any("fsdp" in tuple(s) for s in specs)


def test_grad_accumulation_matches_full_batch(data_dir):
  config = smoke_config(data_dir, batch_size=32)
  config.model.drop_path = 0.0  # stochastic depth draws differ per micro-batch
  loader = iter(data.make_train_loader(config.data, global_batch_size=32, seed=0))
  batches = [next(loader) for _ in range(2)]
  devs = jax.devices()[:1]
  p1, l1, _ = run_steps(config, devs, (("data", -1),), "dp", batches)
  config.optimizer.grad_accum_steps = 4
  p4, l4, _ = run_steps(config, devs, (("data", -1),), "dp", batches)
  np.testing.assert_allclose(l1, l4, rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p4)):
    np.testing.assert_allclose(a, b, atol=1e-5)


def read_losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


@pytest.mark.slow
def test_end_to_end_train_and_resume(data_dir, tmp_path):
  config = smoke_config(data_dir, log_every_steps=1)
  full = trainer.train_and_evaluate(config, str(tmp_path / "full"))
  assert full["final_step"] == 6 and full["eval_count"] == 360
  assert os.path.exists(tmp_path / "full" / "summary.json")
  assert os.listdir(tmp_path / "full" / "tensorboard")

  interrupted = smoke_config(data_dir, log_every_steps=1, stop_at_step=4)
  part = trainer.train_and_evaluate(interrupted, str(tmp_path / "resumed"))
  assert part["final_step"] == 4
  resumed = trainer.train_and_evaluate(config, str(tmp_path / "resumed"))  # same command again
  assert resumed["final_step"] == 6
  np.testing.assert_allclose(resumed["eval_loss"], full["eval_loss"], rtol=1e-6)
  a, b = read_losses(tmp_path / "full"), read_losses(tmp_path / "resumed")
  assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
  np.testing.assert_allclose([a[k] for k in sorted(a)], [b[k] for k in sorted(b)], rtol=1e-6)


def test_loss_falls_on_digits(data_dir, tmp_path):
  config = smoke_config(data_dir, total_steps=30, log_every_steps=10, eval_every_steps=30,
                        checkpoint_every_steps=30)
  config.optimizer.lr = 3e-3
  trainer.train_and_evaluate(config, str(tmp_path))
  losses = read_losses(tmp_path)
  assert losses[30] < losses[10] < 2.4


def test_keep_rate_schedule_compiles_a_bounded_number_of_steps(data_dir, tmp_path):
  config = smoke_config(data_dir, total_steps=12, log_every_steps=4, eval_every_steps=12,
                        checkpoint_every_steps=12, batch_size=64)
  config.model.depth = 3
  config.model.update(class_token=True, tokens=dict(
      name="evit", keep_rate=0.5, locations=(1,),
      warmup=dict(start_epoch=0, ramp_epochs=1, max_buckets=8)))
  summary = trainer.train_and_evaluate(config, str(tmp_path))
  assert 2 <= summary["num_step_compiles"] <= 8
  assert summary["final_step"] == 12
