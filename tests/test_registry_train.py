"""Every registered attention mechanism and token reducer trains: a tiny ViT on the digits.

Parametrised over the registries, so a new mechanism is covered the moment it registers.
"""
import jax
import numpy as np
import pytest

from configs import default as default_config
from vitjax import attention, data, tokens
from vitjax.train import mesh as mesh_lib
from vitjax.train import optim, trainer

STEPS = 12


@pytest.fixture(scope="module")
def batches(data_dir):
  config = default_config.get_config("smoke=True")
  config.data.data_dir = data_dir
  loader = iter(data.make_train_loader(config.data, global_batch_size=64, seed=0))
  return [next(loader) for _ in range(2)]


def train_losses(model_overrides, batches, data_dir):
  config = default_config.get_config("smoke=True")
  config.data.data_dir = data_dir
  config.batch_size = 64
  config.model.update(model_overrides)
  config.optimizer.lr = 2e-3
  mesh = mesh_lib.make_mesh((("data", -1),), jax.devices()[:1])
  model = trainer.build_model(config, data.get_info(config.data))
  tx, _ = optim.make_optimizer(config.optimizer, STEPS, 0)
  state, _ = trainer.create_state(model, tx, config, mesh, (8, 8, 1))
  step = jax.jit(trainer.make_train_step(model, tx, config))
  losses = []
  for i in range(STEPS):
    state, m = step(state, batches[i % 2])
    losses.append(float(m["train/loss"]))
  return np.array(losses)


def assert_learns(losses):
  assert np.isfinite(losses).all(), losses
  assert losses[-2:].mean() < losses[:2].mean() - 0.02, losses


@pytest.mark.parametrize("name", attention.names())
def test_every_attention_trains(name, batches, data_dir):
  assert_learns(train_losses(dict(attention=dict(name=name)), batches, data_dir))


@pytest.mark.parametrize("name", tokens.names())
def test_every_reducer_trains(name, batches, data_dir):
  opts = {} if name == "none" else dict(keep_rate=0.5, locations=(1,))
  entry = tokens.get(name)
  attn = "mhsa"
  overrides = dict(depth=3, tokens=dict(name=name, **opts), attention=dict(name=attn),
                   class_token=entry.needs_cls)
  if entry.name in ("tome", "mctf"):  # merging methods take r tokens per block
    overrides["tokens"] = dict(name=name, r=4)
  assert_learns(train_losses(overrides, batches, data_dir))


@pytest.mark.parametrize("name", ["routing", "dgqa", "cvt_conv_proj"])
def test_running_statistics_live_in_the_train_state(name, batches, data_dir):
  """Routing's k-means centroids, dgqa's key-norm EMA and CvT's BatchNorm statistics are updated
  by the train step and read by evaluation (a params-only apply would fall back to their initial
  values, or fail)."""
  config = default_config.get_config("smoke=True")
  config.data.data_dir = data_dir
  config.model.update(dict(attention=dict(name=name)))
  mesh = mesh_lib.make_mesh((("data", -1),), jax.devices()[:1])
  model = trainer.build_model(config, data.get_info(config.data))
  tx, _ = optim.make_optimizer(config.optimizer, 4, 0)
  state, _ = trainer.create_state(model, tx, config, mesh, (8, 8, 1))
  before = state.batch_stats
  assert jax.tree_util.tree_leaves(before)
  step = jax.jit(trainer.make_train_step(model, tx, config))
  state, _ = step(state, batches[0])
  moved = jax.tree_util.tree_map(lambda a, b: float(np.abs(a - b).max()), before,
                                 state.batch_stats)
  assert max(jax.tree_util.tree_leaves(moved)) > 0
  eval_step = jax.jit(trainer.make_eval_step(model))
  batch = dict(batches[0], mask=np.ones(len(batches[0]["label"]), bool))
  with_stats = eval_step(state.params, batch, state.batch_stats)
  assert np.isfinite(float(with_stats["loss"]))
