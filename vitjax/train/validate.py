"""Early checks of the trainer's own config fields: types and ranges, with what would be valid.

Model, attention, reducer and data fields are checked where they are built (their registries
name the valid choices); this covers what the loop, checkpoints and optimizer read.
"""
import numbers

from vitjax.train import mesh as mesh_lib
from vitjax.train import optim

POSITIVE_INTS = ("batch_size", "keep_checkpoints")
OPTIONAL_POSITIVE_INTS = ("total_steps", "warmup_steps", "log_every_steps", "eval_every_steps",
                          "checkpoint_every_steps", "keep_checkpoint_every_steps", "stop_at_step")
OPTIONAL_POSITIVE_NUMBERS = ("total_epochs", "warmup_epochs", "log_every_epochs",
                             "eval_every_epochs", "checkpoint_every_epochs")
BOOLS = ("skip_nonfinite_steps", "async_checkpoints")
ZERO_OK = ("warmup_steps", "warmup_epochs")


def _is_int(v) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool)


def train_config(config) -> None:
  """Raises ValueError / TypeError naming the field, what it got and what would be right."""
  for key in POSITIVE_INTS + OPTIONAL_POSITIVE_INTS:
    value = config.get(key)
    if value is None and key in OPTIONAL_POSITIVE_INTS:
      continue
    low = 0 if key in ZERO_OK else 1
    if not _is_int(value) or value < low:
      raise ValueError(f"{key} must be an int >= {low}"
                       + (" or None" if key in OPTIONAL_POSITIVE_INTS else "")
                       + f", got {value!r} ({type(value).__name__})")
  for key in OPTIONAL_POSITIVE_NUMBERS:
    value = config.get(key)
    if value is not None and (not _is_number(value) or value < 0
                              or (value == 0 and key not in ZERO_OK)):
      raise ValueError(f"{key} must be a positive number or None, got {value!r}")
  if config.get("total_steps") is not None and config.get("total_epochs") is not None:
    raise ValueError(f"set one of total_steps ({config.total_steps}) and total_epochs "
                     f"({config.total_epochs}), not both: set the other to None")
  for key in BOOLS:
    value = config.get(key)
    if value is not None and not isinstance(value, bool):
      raise TypeError(f"{key} must be True or False, got {value!r}")
  if not _is_int(config.get("seed")):
    raise TypeError(f"seed must be an int, got {config.get('seed')!r}")
  _optimizer(config.get("optimizer"))
  _mesh(config.get("mesh"), config.get("sharding", "dp"))
  _model(config.get("model"))
  size = config.get("image_size")
  if size is not None and not (
      (_is_int(size) and size > 0)
      or (isinstance(size, (tuple, list)) and len(size) == 2
          and all(_is_int(s) and s > 0 for s in size))):
    raise ValueError(f"image_size must be a positive int or an (H, W) pair, got {size!r}")


def _optimizer(opt) -> None:
  if opt is None:
    raise ValueError("config.optimizer is missing; e.g. dict(name='adamw', lr=1e-3)")
  if opt.get("name", "adamw") not in optim.OPTIMIZERS:
    raise ValueError(f"unknown optimizer {opt.get('name')!r}; valid: {optim.OPTIMIZERS}")
  if opt.get("schedule", "cosine") not in optim.SCHEDULES:
    raise ValueError(f"unknown lr schedule {opt.get('schedule')!r}; valid: {optim.SCHEDULES}")
  for key in ("lr", "min_lr", "weight_decay", "b1", "b2", "eps", "momentum", "clip_norm"):
    value = opt.get(key)
    if value is not None and not _is_number(value):
      raise TypeError(f"optimizer.{key} must be a number, got {value!r} "
                      f"({type(value).__name__})")
  if not _is_number(opt.get("lr")) or not 0 < opt.lr < float("inf"):
    raise ValueError(f"optimizer.lr must be a positive finite number, got {opt.get('lr')!r}")


def _mesh(axes, strategy) -> None:
  example = "e.g. (('data', -1),) or (('data', 2), ('fsdp', -1))"
  try:
    pairs = [(name, size) for name, size in axes]
  except (TypeError, ValueError):
    raise ValueError(f"mesh must be a sequence of (axis name, size) pairs, {example}; "
                     f"got {axes!r}") from None
  if not pairs:
    raise ValueError(f"mesh has no axes; {example}")
  for name, size in pairs:
    if not isinstance(name, str) or not _is_int(size):
      raise ValueError(f"mesh axis ({name!r}, {size!r}) must be (str, int); {example}")
  if not any(name in mesh_lib.BATCH_AXES for name, _ in pairs):
    raise ValueError(f"mesh {tuple(pairs)} has no batch axis ({' or '.join(mesh_lib.BATCH_AXES)}): "
                     "every device would compute the whole batch; add one, e.g. "
                     "(('data', -1), ('model', 2)), or (('data', 1), ('model', -1)) to replicate "
                     "the batch on purpose")
  if strategy not in mesh_lib.STRATEGIES:
    raise ValueError(f"unknown sharding strategy {strategy!r}; valid: {mesh_lib.STRATEGIES}")


MODEL_POSITIVE_INTS = ("depth", "width", "num_heads", "mlp_dim", "patch_size")
MODEL_RATES = ("drop_path", "dropout")  # a probability of dropping: 1.0 would drop everything


def _model(model) -> None:
  """Ranges of the ViT fields the config may override (the variant string gives the rest)."""
  if model is None:
    return
  for key in MODEL_POSITIVE_INTS:
    value = model.get(key)
    if isinstance(value, (tuple, list)) and value:  # one per stage (Swin's, PVTv2's num_heads)
      if any(not _is_int(v) or v < 1 for v in value):
        raise ValueError(f"model.{key} must be positive ints (one per stage), got {value!r}")
    elif value is not None and (not _is_int(value) or value < 1):
      raise ValueError(f"model.{key} must be a positive int, got {value!r}")
  for key in MODEL_RATES:
    value = model.get(key)
    if value is not None and (not _is_number(value) or not 0 <= value < 1):
      raise ValueError(f"model.{key} must be in [0, 1) (a drop probability), got {value!r}")


def schedule(steps: dict) -> None:
  """The step counts once epochs are converted (`trainer.durations`)."""
  if steps["warmup"] > steps["total"]:
    raise ValueError(f"the lr warm-up ({steps['warmup']} steps) is longer than the run "
                     f"({steps['total']} steps): the lr would never reach optimizer.lr; set "
                     f"warmup_steps (or warmup_epochs) to at most {steps['total']} steps")
