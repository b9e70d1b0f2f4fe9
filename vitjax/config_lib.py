"""Config helpers: typed `get_config(arg)` strings and early validation of whole configs."""
import ast

import ml_collections

REQUIRED = ("seed", "data", "model", "optimizer", "batch_size", "mesh")


def parse_arg(arg, **defaults) -> ml_collections.ConfigDict:
  """"variant=S/16,dataset=cifar10,smoke=True" -> ConfigDict, typed like `defaults`.

  Every key must be one of `defaults`; values are converted to the default's type.
  """
  out = ml_collections.ConfigDict(defaults)
  if not arg:
    return out
  for item in arg.split(","):
    if "=" not in item:
      raise ValueError(f"config arg {item!r} must look like key=value; valid keys: "
                       f"{', '.join(defaults)}")
    key, value = item.split("=", 1)
    if key not in defaults:
      raise ValueError(f"unknown config arg {key!r}; valid keys: {', '.join(defaults)}")
    out[key] = _convert(value, defaults[key], key)
  return out


def _convert(value: str, default, key: str):
  if isinstance(default, bool):
    if value.lower() not in ("true", "false", "1", "0"):
      raise ValueError(f"config arg {key}={value!r} must be True or False")
    return value.lower() in ("true", "1")
  if isinstance(default, (int, float)) and not isinstance(default, bool):
    try:
      return type(default)(ast.literal_eval(value))
    except (ValueError, SyntaxError) as e:
      raise ValueError(f"config arg {key}={value!r} must be a {type(default).__name__}") from e
  return value


def validate(config) -> None:
  """Fails early, naming what would be valid. Deeper checks run when the model is built."""
  missing = [k for k in REQUIRED if k not in config]
  if missing:
    raise ValueError(f"config is missing {missing}")
  if not isinstance(config.batch_size, int) or config.batch_size <= 0:
    raise ValueError(f"batch_size must be a positive int, got {config.batch_size!r}")
  has_steps = config.get("total_steps") is not None
  has_epochs = config.get("total_epochs") is not None
  if has_steps == has_epochs:
    raise ValueError("set exactly one of total_steps and total_epochs")
  accum = config.optimizer.get("grad_accum_steps", 1)
  if not isinstance(accum, int) or accum < 1 or config.batch_size % accum:
    raise ValueError(f"optimizer.grad_accum_steps={accum!r} must be a positive int dividing "
                     f"batch_size={config.batch_size}")
  ls = config.get("label_smoothing", 0.0)
  if not 0.0 <= ls < 1.0:
    raise ValueError(f"label_smoothing must be in [0, 1), got {ls}")
  if config.optimizer.get("lr", 0) <= 0:
    raise ValueError(f"optimizer.lr must be positive, got {config.optimizer.get('lr')}")
