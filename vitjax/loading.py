"""A model to run, from a training workdir or a timm / big_vision file: `vitjax.load(path)`.

  model, variables, config = vitjax.load("workdirs/default", config="configs/default.py")
  model, variables, config = vitjax.load("workdirs/default", config=..., step=500, ema=True)
  model, variables, _ = vitjax.load("deit_small_patch16_224.safetensors")
  logits, out = model.apply(variables, images, train=False)

`variables` is what `model.apply` takes: {"params": ...}, plus {"batch_stats": ...} for a run
whose attention keeps running statistics (dgqa's key norms, routing's centroids) or a file that
carries BatchNorm statistics (MaxViT's, CvT's). Arrays are numpy; jit puts them on the devices.
A training checkpoint holds weights but not the architecture, so a workdir needs the run's
config: the `config` argument, or the workdir's config.json where one was written
(`save_config`).
"""
import importlib.util
import json
import os
from typing import Optional

import jax
import ml_collections
import numpy as np

from vitjax import checkpoints, models
from vitjax.checkpoints import common, timm

CONFIG_FILE = "config.json"
FILE_SUFFIXES = (*timm.SUFFIXES, ".npz")
_WHAT = (f"a training workdir (a folder with checkpoints/) or a timm/big_vision file "
         f"({', '.join(FILE_SUFFIXES)})")


class LoadError(ValueError):
  """What was given cannot be loaded; the message says what would be right."""


def load(path, config=None, *, step: Optional[int] = None, ema: bool = False,
         **model_overrides):
  """(model, variables, config) of a training workdir or of a timm / big_vision file.

  path: a workdir (or its checkpoints/ folder, or one step's folder there), or a file.
  config: a workdir's config, a ConfigDict or "configs/x.py[:args]" (as main.py's --config);
    default: the workdir's config.json. From a file, the config returned is None.
  step: the checkpoint step (default the latest); ema: the EMA parameters (runs with config.ema).
  model_overrides: model fields over the stored ones, e.g. tokens=dict(name="evit",
    keep_rate=0.5); for a file also num_classes=, image_size=, dtype= (`checkpoints.build_model`).
  """
  path = os.fspath(path)
  if os.path.isfile(path):
    return _load_file(path, config, step, ema, model_overrides)
  workdir, step = locate(path, step)
  config = with_model_overrides(read_config(workdir, config), model_overrides)
  model = build_model(config, param_shapes(workdir, step))
  variables, _ = restore(workdir, model, step=step, ema=ema)
  return model, variables, config


def _load_file(path: str, config, step, ema: bool, overrides: dict):
  suffix = os.path.splitext(path)[1]
  if suffix not in FILE_SUFFIXES:
    what = f"the unknown suffix {suffix!r}" if suffix else "no suffix"
    raise LoadError(f"{path} has {what}; pass {_WHAT}")
  if config is not None or step is not None or ema:
    raise LoadError(f"{path} is a timm/big_vision file: config=, step= and ema= are for training "
                    "workdirs; pass model fields instead (num_classes=, tokens=, ...)")
  model = checkpoints.build_model(path, **overrides)
  return model, checkpoints.load_variables(path, model), None


# ------------------------------------------------------------------ workdirs
def saved_steps(workdir: str) -> list:
  """The finished checkpoint steps of a workdir, oldest first (interrupted saves left out)."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  return sorted(ocp.utils.checkpoint_steps(os.path.join(workdir, "checkpoints")))


def locate(path, step: Optional[int] = None) -> tuple:
  """(workdir, step) from a workdir, its checkpoints/ folder or a step's folder; the latest step
  unless one is given."""
  path = os.path.abspath(os.fspath(path).rstrip("/"))
  if not os.path.exists(path):
    raise LoadError(f"{path} does not exist; pass {_WHAT}")
  parent, name = os.path.split(path)
  if name.isdigit() and os.path.basename(parent) == "checkpoints":  # one step's folder
    path, step = os.path.dirname(parent), int(name) if step is None else step
  elif name == "checkpoints":
    path = parent
  directory = os.path.join(path, "checkpoints")
  if not os.path.isdir(directory):
    raise LoadError(f"{path} has no checkpoints/ folder; pass {_WHAT}")
  steps = saved_steps(path)
  if not steps:
    raise LoadError(f"{directory} holds no finished checkpoint; a run saves one every "
                    "checkpoint_every_steps and at its end: load it after that")
  if step is None:
    return path, steps[-1]
  if step not in steps:
    raise LoadError(f"{directory} has no step {step}; its steps: {', '.join(map(str, steps))}")
  return path, step


def save_config(workdir: str, config):
  """Writes `config` as the workdir's config.json, which `load(workdir)` reads without config=."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, CONFIG_FILE)
  with open(path + ".tmp", "w") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  os.replace(path + ".tmp", path)  # atomic: a reader never sees half a file


def read_config(workdir: str, config=None):
  """`config` itself, the config of a config-file string, or the workdir's config.json."""
  if isinstance(config, (str, os.PathLike)):
    return config_from_file(os.fspath(config))
  if config is not None:
    return config
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isfile(path):
    raise LoadError(f"{workdir} holds no {CONFIG_FILE} to rebuild the model from; pass config=, "
                    "the config the run trained with (a ConfigDict or 'configs/x.py:args')")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def config_from_file(spec: str):
  """The config of "path/to/config.py[:args]", read as main.py's --config reads it."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise LoadError(f"config file {path} does not exist; pass an existing config file (e.g. "
                    "'configs/default.py', args after a colon) or a ConfigDict")
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def with_model_overrides(config, overrides: dict):
  """A copy of `config` whose model fields are replaced by `overrides` (the config unchanged
  without any), so that the config returned describes the model returned."""
  if not overrides:
    return config
  config = config.copy_and_resolve_references()
  with config.unlocked():
    for key, value in overrides.items():
      config.model[key] = value
  return config


def _state_dir(workdir: str, step: int) -> str:
  return os.path.join(workdir, "checkpoints", str(step), "state")


def _unreadable(error: Exception, workdir: str, step: int) -> LoadError:
  first = str(error).splitlines()[0][:200] if str(error) else ""
  return LoadError(f"the checkpoint in {workdir} at step {step} cannot be read "
                   f"({type(error).__name__}: {first}); load another step (step=; saved: "
                   f"{', '.join(map(str, saved_steps(workdir)))})")


def _saved_tree(workdir: str, step: int):
  """The saved train state's tree of array metadata (shapes and dtypes, no data)."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  from etils import epath  # pylint: disable=import-outside-toplevel
  try:
    meta = ocp.PyTreeCheckpointHandler().metadata(epath.Path(_state_dir(workdir, step)))
  except Exception as e:  # pylint: disable=broad-except  (orbax/tensorstore raise many types)
    raise _unreadable(e, workdir, step) from None
  return getattr(meta, "tree", meta)


def _shapes(tree) -> dict:
  """"block_0/attn/qkv/kernel" -> shape."""
  return {k: tuple(v.shape) for k, v in common.flatten(tree).items()}


def param_shapes(workdir: str, step: int) -> dict:
  """The shapes of the parameters saved at `step`, by their "a/b/c" names."""
  return _shapes(_saved_tree(workdir, step)["params"])


def build_model(config, shapes: dict):
  """The run's model: config.model, with the classes and input channels its checkpoint holds
  (the data is read only for the image size, where the config does not give one)."""
  image_size = config.get("image_size")
  if not image_size:
    from vitjax import data  # pylint: disable=import-outside-toplevel  (tfds is heavy)
    image_size = data.get_info(config.data).image_shape[:2]
  head = shapes.get("head/bias")
  return models.build(config.model, num_classes=head[0] if head else 0, image_size=image_size,
                      dtype=config.get("dtype", "float32"))


def check_fits(shapes: dict, model, channels: int, where: str):
  """Raises a LoadError, with an example of each kind of difference, where the saved parameters
  do not fit `model`."""
  want = _shapes(common.abstract_params(model, channels))
  missing, extra = sorted(want.keys() - shapes.keys()), sorted(shapes.keys() - want.keys())
  other = [f"{k} saved {shapes[k]}, model {want[k]}" for k in sorted(want.keys() & shapes.keys())
           if shapes[k] != want[k]]
  found = [f"{len(v)} {what} (e.g. {v[0]})" for what, v in
           (("missing", missing), ("unexpected", extra), ("of another shape", other)) if v]
  if found:
    raise LoadError(f"the checkpoint in {where} does not fit the model of the config: parameters "
                    f"{'; '.join(found)}; pass the config that trained it")


def _find_ema(tree):
  """The EMA parameters in an optimizer state: the EMA transformation keeps them under "ema"."""
  if isinstance(tree, dict):
    if isinstance(tree.get("ema"), dict):
      return tree["ema"]
    children = list(tree.values())
  elif isinstance(tree, (list, tuple)):
    children = tree
  else:
    return None
  return next((found for found in map(_find_ema, children) if found is not None), None)


def restore(workdir, model, *, step: Optional[int] = None, ema: bool = False) -> tuple:
  """(variables of `model` saved at `step` of a training workdir, as numpy; that step).

  Only the parameters (or their EMA) and the running statistics are read, not the optimizer
  state, and without the run's devices or shardings.
  """
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  from vitjax.train import trainer  # pylint: disable=import-outside-toplevel
  workdir, step = locate(workdir, step)
  where = f"{workdir} at step {step}"
  saved = _saved_tree(workdir, step)
  shapes = _shapes(saved["params"])
  check_fits(shapes, model, shapes["embedding_kernel"][2], where)
  if ema and _find_ema(saved.get("opt_state")) is None:
    raise LoadError(f"the checkpoint in {where} has no EMA parameters (its run had no config.ema); "
                    "load it without ema=True")

  def wanted(path) -> bool:
    keys = [getattr(k, "key", None) for k in path]
    return keys[0] in ("params", "batch_stats") or (ema and "ema" in keys)

  item = jax.tree_util.tree_map_with_path(
      lambda p, x: jax.ShapeDtypeStruct(x.shape, x.dtype) if wanted(p) else ocp.PLACEHOLDER, saved)
  args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
  try:
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckpt:
      state = ckpt.restore(_state_dir(workdir, step),
                           args=ocp.args.PyTreeRestore(item=item, restore_args=args))
  except Exception as e:  # pylint: disable=broad-except
    raise _unreadable(e, workdir, step) from None
  params = _find_ema(state["opt_state"]) if ema else state["params"]
  return trainer.variables(params, state.get("batch_stats")), step
