"""Device mesh and sharding rules (data parallel, FSDP, explicit regex rules)."""
import math
import re
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")
STRATEGIES = ("dp", "fsdp")


def mesh_shape(axes: Sequence, num_devices: int) -> tuple:
  """[("data", -1), ("model", 2)] -> (names, sizes); -1 fills what the others leave."""
  names = tuple(str(a) for a, _ in axes)
  sizes = [int(s) for _, s in axes]
  if len(set(names)) != len(names):
    raise ValueError(f"mesh axis names repeat: {names}")
  if sum(s == -1 for s in sizes) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(names, sizes))}")
  fixed = math.prod(s for s in sizes if s != -1)
  if any(s == 0 or s < -1 for s in sizes) or num_devices % fixed:
    raise ValueError(f"mesh {dict(zip(names, sizes))} does not fit {num_devices} devices: the "
                     f"fixed axes multiply to {fixed}, which must divide {num_devices}")
  sizes = [num_devices // fixed if s == -1 else s for s in sizes]
  if math.prod(sizes) != num_devices:
    raise ValueError(f"mesh {dict(zip(names, sizes))} uses {math.prod(sizes)} devices but "
                     f"{num_devices} are available; use -1 on one axis to fill the rest")
  return names, tuple(sizes)


def make_mesh(axes: Sequence, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  names, sizes = mesh_shape(axes, len(devices))
  # Auto axes: flax linen logical constraints do not work on Explicit ones.
  types = (jax.sharding.AxisType.Auto,) * len(names)
  return Mesh(np.asarray(devices).reshape(sizes), names, axis_types=types)


def batch_axes(mesh: Mesh) -> tuple:
  return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dim split over the data-like axes; the rest replicated."""
  return NamedSharding(mesh, P(batch_axes(mesh)))


def num_batch_shards(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in batch_axes(mesh))


def _path_name(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _fsdp_spec(shape, fsdp: int, min_size: int) -> P:
  """Shards the largest dim divisible by the fsdp axis; small arrays stay replicated."""
  if fsdp == 1 or math.prod(shape) < min_size:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp == 0:
      spec = [None] * len(shape)
      spec[dim] = "fsdp"
      return P(*spec)
  return P()


def param_specs(params, mesh: Mesh, strategy: str = "dp", rules: Sequence = (),
                min_fsdp_size: int = 2 ** 14):
  """PartitionSpec per leaf: the first matching (regex, spec) rule, else the strategy's default."""
  if strategy not in STRATEGIES:
    raise ValueError(f"unknown sharding strategy {strategy!r}; valid: {STRATEGIES}")
  if strategy == "fsdp" and "fsdp" not in mesh.axis_names:
    raise ValueError("sharding='fsdp' needs an 'fsdp' mesh axis, e.g. mesh=(('data', 1), "
                     "('fsdp', -1))")
  fsdp = mesh.shape.get("fsdp", 1)
  compiled = [(re.compile(pattern), P(*spec)) for pattern, spec in rules]

  def spec_for(path, leaf):
    name = _path_name(path)
    for regex, spec in compiled:
      if regex.search(name):
        return spec
    if strategy == "fsdp":
      return _fsdp_spec(leaf.shape, fsdp, min_fsdp_size)
    return P()

  return jax.tree_util.tree_map_with_path(spec_for, params)


def shardings_like(tree, mesh: Mesh, strategy: str = "dp", rules: Sequence = (),
                   min_fsdp_size: int = 2 ** 14):
  specs = param_specs(tree, mesh, strategy, rules, min_fsdp_size)
  return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs,
                                is_leaf=lambda x: isinstance(x, P))
