"""Two FSDP-sharded training steps of a backbone on the digits, over the 8 CPU devices the tests
run on: the shared body of the backbones' sharded-training tests."""
import jax

from configs import default as default_config
from vitjax import data
from vitjax.checkpoints import common
from vitjax.train import mesh as mesh_lib
from vitjax.train import optim, recipe, trainer


def fsdp_steps(data_dir, model_cfg: dict, pp: str = None, steps: int = 2, states: list = None):
  """-> (losses, last metrics, flat params before, flat params after, shardings); the train
  states before and after are appended to `states` when given (BatchNorm statistics).

  Mesh data 2 x fsdp 4, layer-wise lr decay 0.75, batch 16. No warm-up: the zero-initialised
  head moves in step 1, so step 2 reaches every parameter."""
  config = default_config.get_config("smoke=True")
  config.data.data_dir = data_dir
  if pp:
    config.data.pp_train = config.data.pp_eval = pp
  config.batch_size = 16
  config.model = dict(model_cfg, tokens=None)
  config.optimizer.layer_decay = 0.75
  config.sharding, config.fsdp_min_size = "fsdp", 256
  info = data.get_info(config.data)
  batch = next(iter(data.make_train_loader(config.data, global_batch_size=16, seed=0)))
  model = trainer.build_model(config, info)
  tx, _ = optim.make_optimizer(config.optimizer, 10, 0)
  tx = recipe.wrap_optimizer(tx, config, model)
  mesh = mesh_lib.make_mesh((("data", 2), ("fsdp", 4)), jax.devices())
  state, shardings = trainer.create_state(model, tx, config, mesh, info.image_shape)
  before = common.flatten(jax.device_get(state.params))
  step = jax.jit(trainer.make_train_step(model, tx, config),
                 in_shardings=(shardings, mesh_lib.batch_sharding(mesh)),
                 out_shardings=(shardings, None))
  if states is not None:
    states.append(jax.device_get(state))
  losses = []
  for _ in range(steps):
    state, metrics = step(state, trainer.global_batch(batch, mesh_lib.batch_sharding(mesh)))
    losses.append(float(metrics["train/loss"]))
  if states is not None:
    states.append(jax.device_get(state))
  return losses, metrics, before, common.flatten(jax.device_get(state.params)), shardings
