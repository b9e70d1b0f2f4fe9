r"""Will this config fit that TPU slice? Compiles the real sharded train step for a TPU topology
ahead of time, on a machine without a TPU, and reports per-chip memory against the chip's HBM.

  pip install "jax[tpu]==0.10.2"   # libtpu: compiles for TPUs, runs on a CPU host
  python -m vitjax.train.aot --config=configs/deit_imagenet.py:variant=H/14 \
      --topology=v5p:4x4x4 --mesh="(('data', 1), ('fsdp', -1))" --sharding=fsdp
  python -m vitjax.train.aot --config=configs/deit_imagenet.py:variant=B/16,batch=4096 \
      --topology=v5e:16x16

`jax.experimental.topologies.get_topology_desc` gives the devices of the slice; the mesh, the
state's shardings, the batch sharding and the step are those `main.py` would use there, lowered
on abstract values (nothing is allocated) and compiled by libtpu. Memory is XLA's own account
(`compiled.memory_analysis()`): arguments + outputs - donated aliases + temporaries + code.
Nothing reads the dataset: the input shape and class count come from the config (`image_size`,
`num_classes`) or the table of known datasets below, or --image_shape / --num_classes.
"""
import ast
import json
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp

from vitjax.train import mesh as mesh_lib
from vitjax.train import optim, recipe, trainer

GIB = 2 ** 30
HBM_BYTES = {"v4": 32 * GIB, "v5e": 16 * GIB, "v5litepod": 16 * GIB, "v5p": 95 * GIB,
             "v6e": 32 * GIB}
# name -> (image shape after preprocessing at the config's image_size, classes, train examples)
DATASETS = {"imagenet2012": (3, 1000, 1_281_167), "imagenet21k": (3, 21843, 13_151_276),
            "cifar10": (3, 10, 50_000), "cifar100": (3, 100, 50_000),
            "vitjax_digits": (1, 10, 1_437)}


class Info(NamedTuple):  # the fields of vitjax.data.DataInfo that the step needs
  num_classes: int
  image_shape: tuple


def chip_hbm(topology: str) -> int:
  kind = topology.split(":")[0].lower()
  if kind not in HBM_BYTES:
    raise ValueError(f"unknown TPU generation {kind!r} in topology {topology!r}; known: "
                     f"{', '.join(HBM_BYTES)} (e.g. 'v5e:2x2', 'v5p:4x4x4')")
  return HBM_BYTES[kind]


def tpu_devices(topology: str):
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  try:
    return topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
  except Exception as e:  # pylint: disable=broad-except
    raise RuntimeError(f"cannot describe TPU topology {topology!r} ({e}); it needs jax[tpu] "
                       "(libtpu) installed and a name such as 'v5e:2x2' or 'v5p:4x4x4'") from e


def data_info(config, image_shape=None, num_classes=None) -> tuple:
  """(Info, train examples) from flags, the config, or the table of known datasets."""
  name = config.data.get("name", "")
  channels, classes, examples = DATASETS.get(name.split(":")[0], (3, None, 1))
  size = config.get("image_size") or (8 if name == "vitjax_digits" else None)
  if image_shape is None:
    if size is None:
      raise ValueError("set config.image_size or pass --image_shape=H,W,C")
    hw = (size, size) if isinstance(size, int) else tuple(size)
    image_shape = (*hw, channels)
  num_classes = num_classes or config.get("num_classes") or classes
  if num_classes is None:
    raise ValueError(f"unknown class count for dataset {name!r}: pass --num_classes")
  return Info(num_classes, tuple(image_shape)), examples


def abstract_batch(config, info, sharding) -> dict:
  """The global batch the step sees: mixup makes soft labels, distillation adds teacher logits."""
  b, classes = config.batch_size, info.num_classes
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  batch = {"image": spec((b, *info.image_shape), jnp.float32),
           "label": spec((b, classes), jnp.float32) if config.get("mixup")
                    else spec((b,), jnp.int32)}
  if config.get("distill"):
    batch["teacher_logits"] = spec((b, classes), jnp.float32)
  return batch


def compile_train_step(config, topology: str, *, image_shape=None, num_classes=None) -> dict:
  """Compiles `config`'s train step for `topology`; returns the memory report (bytes per chip)."""
  devices = tpu_devices(topology)
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  trainer.check_batch(config, mesh)
  info, examples = data_info(config, image_shape, num_classes)
  model = trainer.build_model(config, info)
  steps = trainer.durations(config, examples)
  tx, _ = optim.make_optimizer(config.optimizer, steps["total"] or 1, steps["warmup"])
  tx = recipe.wrap_optimizer(tx, config, model)  # layer-wise lr decay, EMA, as main.py does
  abstract, shardings, _ = trainer.state_spec(model, tx, config, mesh, info.image_shape)
  batch_sharding = mesh_lib.batch_sharding(mesh)
  batch = abstract_batch(config, info, batch_sharding)
  step = jax.jit(trainer.make_train_step(model, tx, config),
                 in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None),
                 donate_argnums=(0,))
  t0 = time.perf_counter()
  compiled = step.lower(abstract, batch).compile()
  seconds = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  total = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
           + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
  hbm = chip_hbm(topology)
  return dict(
      topology=topology, chips=len(devices), mesh=dict(mesh.shape),
      sharding=config.get("sharding", "dp"), variant=config.model.get("variant"),
      dtype=config.get("dtype", "float32"), global_batch=config.batch_size,
      params=int(sum(x.size for x in jax.tree_util.tree_leaves(abstract.params))),
      compile_s=round(seconds, 2), argument_bytes=mem.argument_size_in_bytes,
      output_bytes=mem.output_size_in_bytes, alias_bytes=mem.alias_size_in_bytes,
      temp_bytes=mem.temp_size_in_bytes, code_bytes=mem.generated_code_size_in_bytes,
      total_bytes=total, hbm_bytes=hbm, hbm_fraction=round(total / hbm, 4), fits=total <= hbm)


def describe(r: dict) -> str:
  return (f"{r['variant']} {r['sharding']} on {r['topology']} ({r['chips']} chips, mesh "
          f"{r['mesh']}), batch {r['global_batch']}, {r['dtype']}: "
          f"{r['total_bytes'] / GIB:.2f} GiB per chip of {r['hbm_bytes'] / GIB:.0f} GiB HBM "
          f"({100 * r['hbm_fraction']:.0f}%; args {r['argument_bytes'] / GIB:.2f}, temp "
          f"{r['temp_bytes'] / GIB:.2f} GiB) -> {'fits' if r['fits'] else 'DOES NOT FIT'}; "
          f"compiled in {r['compile_s']} s")


def main(argv):
  del argv
  from absl import flags  # pylint: disable=import-outside-toplevel
  config = _CONFIG.value
  with config.unlocked():
    if flags.FLAGS.mesh:
      config.mesh = ast.literal_eval(flags.FLAGS.mesh)
    if flags.FLAGS.sharding:
      config.sharding = flags.FLAGS.sharding
  shape = tuple(int(x) for x in flags.FLAGS.image_shape.split(",")) if flags.FLAGS.image_shape \
      else None
  report = compile_train_step(config, flags.FLAGS.topology, image_shape=shape,
                              num_classes=flags.FLAGS.num_classes)
  print(describe(report))
  if flags.FLAGS.json:
    with open(flags.FLAGS.json, "w") as f:
      json.dump(report, f, indent=1)


if __name__ == "__main__":
  from absl import app, flags as absl_flags  # pylint: disable=ungrouped-imports
  from ml_collections import config_flags
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:args]).",
                                            lock_config=True)
  absl_flags.DEFINE_string("topology", None, "TPU slice, e.g. v5e:2x2, v5p:4x4x4, v6e:8x8.")
  absl_flags.DEFINE_string("mesh", None, "Overrides config.mesh, e.g. \"(('data', -1),)\".")
  absl_flags.DEFINE_string("sharding", None, "Overrides config.sharding (dp or fsdp).")
  absl_flags.DEFINE_string("image_shape", None, "H,W,C of one input (default from the config).")
  absl_flags.DEFINE_integer("num_classes", None, "Classes (default from the config/dataset).")
  absl_flags.DEFINE_string("json", None, "Also write the report here as JSON.")
  absl_flags.mark_flags_as_required(["config", "topology"])
  app.run(main)
