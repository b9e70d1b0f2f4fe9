"""Config helpers: typed `get_config(arg)` strings, early validation of whole configs, and the
pieces of recipe that several configs train with (DeiT's ImageNet-1k recipe, smoke-run overrides).
"""
import ast
from typing import Optional

import ml_collections
from ml_collections import config_dict

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


# ------------------------------------------------------------------ shared recipe pieces
# DeiT's ImageNet-1k pipelines (Touvron et al. 2021): crop + flip, then RandAugment
# rand-m9-mstd0.5-inc1 and random erasing 0.25 in pixel mode; evaluation at 224 px after 256.
DEIT_TRAIN_PP = ("decode|random_resized_crop(224)|flip_lr|randaugment(2, 9.0, 0.5)|normalize"
                 "|random_erasing(0.25, 'pixel')")
DEIT_EVAL_PP = "decode|resize_small(256)|central_crop(224)|normalize"


def imagenet(pp_train: str, **extra) -> dict:
  """`config.data` for ImageNet-1k from tfds (data_dir given on the command line)."""
  return dict(name="imagenet2012", data_dir=config_dict.placeholder(str), train_split="train",
              eval_split="validation", pp_train=pp_train, pp_eval=DEIT_EVAL_PP, worker_count=16,
              **extra)


def deit_optimizer(lr: float, min_lr: float, weight_decay: float) -> dict:
  """DeiT's AdamW (betas 0.9 / 0.999, eps 1e-8, no gradient clipping) on a cosine schedule."""
  return dict(name="adamw", lr=lr, min_lr=min_lr, weight_decay=weight_decay, schedule="cosine",
              b1=0.9, b2=0.999, eps=1e-8, clip_norm=None, grad_accum_steps=1)


def deit_regularisation(config) -> None:
  """DeiT's mixup 0.8 / cutmix 1.0 (switch 0.5), whose targets carry the label smoothing of 0.1,
  and EMA 0.99996 of the weights."""
  config.label_smoothing = 0.0  # folded into the mixup targets
  config.mixup = dict(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, prob=1.0,
                      label_smoothing=0.1)
  config.ema = dict(decay=0.99996)


def imagenet_bookkeeping(config, eval_every_epochs: int) -> None:
  """Data parallel over every device; logs every 100 steps, a checkpoint every epoch (3 kept)."""
  config.mesh = (("data", -1),)
  config.sharding = "dp"
  config.log_every_steps = 100
  config.eval_every_epochs = eval_every_epochs
  config.checkpoint_every_epochs = 1
  config.keep_checkpoints = 3


def steps_not_epochs(config, steps: int, warmup_steps: Optional[int] = None) -> None:
  """Smoke runs: `steps` steps, evaluated and checkpointed at the last, in place of epochs (and
  `warmup_steps` of warm-up in place of warm-up epochs, when given)."""
  config.total_epochs, config.total_steps = None, steps
  if warmup_steps is not None:
    config.warmup_epochs, config.warmup_steps = None, warmup_steps
  config.eval_every_epochs = config.checkpoint_every_epochs = None
  config.eval_every_steps = config.checkpoint_every_steps = steps


def evit_on_digits(config) -> None:
  """Smoke runs of the EViT recipes: the embedded 8x8 digits through the same augmentations and
  a tiny EViT (reducing after blocks 1, 2 and 3 of 4) in float32."""
  config.data.update(name="vitjax_digits", train_split="train", eval_split="test", worker_count=0,
                     pp_train="randaugment(2, 9.0, 0.5)|value_range(-1, 1)|random_erasing(0.25)",
                     pp_eval="value_range(-1, 1)")
  config.image_size = None
  config.model.update(variant="Ti/2", width=64, depth=4, num_heads=2, mlp_dim=128)
  config.model.tokens.locations = (1, 2, 3)
  config.dtype = "float32"
