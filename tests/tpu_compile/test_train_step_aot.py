"""The real sharded train step compiles for a TPU slice ahead of time, without a TPU.

Needs `jax[tpu]` (libtpu): `.ci/tpu_compile.sh` builds that venv and runs this directory.
A tiny ViT on v5e:2x2 (4 chips), data parallel and FSDP, through `vitjax.train.aot`: the mesh,
shardings and step are those main.py would use on that slice; memory comes from XLA.
"""
import json
import os

import pytest

pytest.importorskip("libtpu", reason="TPU AOT compilation needs jax[tpu] (libtpu)")

from configs import default as default_config  # noqa: E402
from vitjax.train import aot  # noqa: E402

RESULTS = []


@pytest.fixture(scope="module", autouse=True)
def dump_results():
  yield
  path = os.environ.get("VITJAX_TPU_COMPILE_JSON")
  if path:  # next to the kernel results, not over them
    with open(path.replace(".json", "") + "_train_step.json", "w") as f:
      json.dump(RESULTS, f, indent=1)


def tiny_config(mesh, sharding):
  config = default_config.get_config("smoke=True")
  config.batch_size = 16
  config.mesh = mesh
  config.sharding = sharding
  config.fsdp_min_size = 1024  # shard the tiny model's MLP kernels
  config.dtype = "bfloat16"
  return config


MESHES = {"dp": (("data", -1),), "fsdp": (("data", 2), ("fsdp", 2))}


@pytest.fixture(scope="module")
def reports():
  out = {}
  for sharding, mesh in MESHES.items():
    out[sharding] = aot.compile_train_step(tiny_config(mesh, sharding), "v5e:2x2")
    RESULTS.append(out[sharding])
    print("TPU-COMPILE", json.dumps(out[sharding]))
  return out


@pytest.mark.parametrize("sharding", list(MESHES))
def test_train_step_compiles_for_v5e_2x2(reports, sharding):
  report = reports[sharding]
  assert report["chips"] == 4 and report["fits"]
  assert report["mesh"] == ({"data": 4} if sharding == "dp" else {"data": 2, "fsdp": 2})
  assert 0 < report["total_bytes"] < report["hbm_bytes"] == 16 * 2 ** 30
  assert report["params"] == reports["dp"]["params"] > 0


def test_fsdp_holds_less_per_chip_than_data_parallel(reports):
  assert reports["fsdp"]["argument_bytes"] < reports["dp"]["argument_bytes"]


def test_a_mesh_that_does_not_match_the_slice_is_refused():
  with pytest.raises(ValueError, match="does not fit 4 devices"):
    aot.compile_train_step(tiny_config((("data", 3),), "dp"), "v5e:2x2")


def test_unknown_generation_is_named():
  with pytest.raises(ValueError, match="unknown TPU generation"):
    aot.chip_hbm("v9x:2x2")
