"""Ahead-of-time compilation of the Pallas TPU kernels for TPU topologies, without a TPU.

Needs `jax[tpu]` (libtpu) installed: `.ci/tpu_compile.sh` builds that venv and runs this directory.
`get_topology_desc` gives TPU devices on a CPU host; the kernels are lowered through Mosaic and
compiled by libtpu exactly as on a TPU VM (nothing is executed). Pallas calls sit inside
`jax.shard_map` (a Mosaic custom call cannot be partitioned by XLA). Each compile prints its time
and `memory_analysis()`; set VITJAX_TPU_COMPILE_JSON=path to collect them as JSON.
"""
import json
import os
import time

import pytest

pytest.importorskip("libtpu", reason="TPU AOT compilation needs jax[tpu] (libtpu)")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from vitjax.kernels import flash_attention as fa  # noqa: E402
from vitjax.kernels import flash_sigmoid as fs  # noqa: E402

TOPOLOGIES = ("v5e:2x2", "v5p:2x2x1")
RESULTS = []


@pytest.fixture(scope="module", autouse=True)
def dump_results():
  yield
  path = os.environ.get("VITJAX_TPU_COMPILE_JSON")
  if path:
    with open(path, "w") as f:
      json.dump(RESULTS, f, indent=1)


def mesh_for(topology: str) -> Mesh:
  devices = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
  return Mesh(np.array(devices).reshape(-1), ("data",))


def compile_and_record(fn, args, **info):
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  seconds = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  row = dict(info, compile_s=round(seconds, 2),
             argument_bytes=mem.argument_size_in_bytes, output_bytes=mem.output_size_in_bytes,
             temp_bytes=mem.temp_size_in_bytes, code_bytes=mem.generated_code_size_in_bytes)
  RESULTS.append(row)
  print("TPU-COMPILE", json.dumps(row))
  return compiled


def sharded_attention(mesh, kernel, **kw):
  spec = P("data")
  return jax.shard_map(lambda q, k, v, b: kernel(q, k, v, b, **kw), mesh=mesh,
                       in_specs=(spec,) * 4, out_specs=spec, check_vma=False)


def vit_args(mesh, b, n, h, d, dtype=jnp.bfloat16):
  shard = NamedSharding(mesh, P("data"))
  tok = jax.ShapeDtypeStruct((b, n, h, d), dtype, sharding=shard)
  bias = jax.ShapeDtypeStruct((b, 1, 1, n), jnp.float32, sharding=shard)
  return tok, tok, tok, bias


KERNELS = {"softmax": fa.attention, "sigmoid": fs.sigmoid_attention}
SHAPES = [  # topology, kernel, global batch, N, heads, d, dtype
    ("v5e:2x2", "softmax", 32, 197, 6, 64, "bfloat16"),
    ("v5p:2x2x1", "softmax", 32, 197, 6, 64, "bfloat16"),
    ("v5e:2x2", "sigmoid", 32, 197, 6, 64, "bfloat16"),
    ("v5p:2x2x1", "sigmoid", 32, 197, 6, 64, "bfloat16"),
    ("v5e:2x2", "softmax", 32, 577, 12, 64, "bfloat16"),
    ("v5e:2x2", "softmax", 8, 4096, 12, 64, "bfloat16"),
    ("v5e:2x2", "softmax", 8, 197, 4, 128, "float32"),
    ("v5p:2x2x1", "softmax", 8, 49, 12, 32, "bfloat16"),  # a token count after reduction
]


@pytest.mark.parametrize("shape", SHAPES, ids=["-".join(map(str, s[:2] + s[3:4] + s[5:6]))
                                                for s in SHAPES])
def test_kernels_compile_forward_and_backward(shape):
  topology, name, b, n, h, d, dtype = shape
  mesh = mesh_for(topology)
  attn = sharded_attention(mesh, KERNELS[name], backend="tpu")
  args = vit_args(mesh, b, n, h, d, jnp.dtype(dtype))
  info = dict(topology=topology, kernel=name, batch=b, n=n, heads=h, d=d, dtype=dtype)
  compile_and_record(attn, args, what="forward", **info)

  def loss(q, k, v, bias):
    return attn(q, k, v, bias).astype(jnp.float32).sum()

  compiled = compile_and_record(jax.grad(loss, argnums=(0, 1, 2, 3)), args,
                                what="forward+backward", **info)
  assert "flash" in compiled.as_text()  # the Mosaic custom calls survived into the executable


def test_default_platform_dispatch_picks_mosaic():
  """backend=None resolves at lowering time: lowering for a TPU takes the Mosaic branch."""
  mesh = mesh_for("v5e:2x2")
  attn = sharded_attention(mesh, fa.attention)
  compile_and_record(attn, vit_args(mesh, 8, 197, 6, 64), what="forward (auto backend)",
                     topology="v5e:2x2", kernel="softmax", n=197)


def test_vit_with_pallas_attention_compiles_on_one_chip():
  """A ViT-Ti/16 (1 block, 112 px: N=50) parameter gradient with impl="pallas" on one v5e chip."""
  from vitjax import models  # pylint: disable=import-outside-toplevel
  device = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices[0]
  model = models.build(dict(variant="Ti/16", depth=1, attention=dict(name="mhsa", impl="pallas")),
                       num_classes=1000, image_size=112, dtype="bfloat16")
  sharding = jax.sharding.SingleDeviceSharding(device)
  x = jax.ShapeDtypeStruct((8, 112, 112, 3), jnp.float32, sharding=sharding)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct(x.shape, x.dtype))
  params = jax.tree_util.tree_map(
      lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=sharding), params)

  def grad(params, x):
    return jax.grad(lambda p: model.apply(p, x)[0].astype(jnp.float32).mean())(params)

  compile_and_record(grad, (params, x), what="ViT-Ti/16 depth 1 grad", topology="v5e (1 chip)",
                     kernel="softmax", batch=8, n=50)


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_block_shape_breaking_the_8_128_rule_is_rejected(topology):
  """blocks=(64, 64) makes the lse output block (1, 64): its lane dim is neither a multiple of 128
  nor the full padded length (256), which Mosaic cannot tile; compilation must refuse it."""
  mesh = mesh_for(topology)
  attn = sharded_attention(mesh, fa.attention, backend="tpu", blocks=(64, 64))
  with pytest.raises(Exception, match="divisible by 8 and 128"):
    jax.jit(attn).lower(*vit_args(mesh, 8, 197, 6, 64)).compile()


PAIR_SHAPES = [  # topology, images, windows per image (G), T, heads, d, dtype
    ("v5e:2x2", 8, 64, 49, 3, 32, "bfloat16"),   # Swin-T stage 1 SW-MSA: [nW, H, T, T] bias
    ("v5p:2x2x1", 8, 1, 49, 3, 32, "bfloat16"),  # W-MSA: one [H, T, T] bias for every window
    ("v5e:2x2", 4, 4, 144, 4, 64, "float32"),    # 12x12 windows: two 128-token tiles per axis
]


@pytest.mark.parametrize("shape", PAIR_SHAPES,
                         ids=["-".join(map(str, (s[0], s[2], s[3], s[6]))) for s in PAIR_SHAPES])
def test_pair_bias_kernel_compiles_forward_and_backward(shape):
  """Window attention's path: windows as the batch (images x nW), a full [G, H, T, T] bias read by
  b % G, its gradient (the relative position table's) summed over the batch in the dQ kernel."""
  topology, images, groups, t, h, d, dtype = shape
  mesh = mesh_for(topology)
  shard, whole = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  b = images * groups * 4   # every device holds whole images: its b % G is the global one
  tok = jax.ShapeDtypeStruct((b, t, h, d), jnp.dtype(dtype), sharding=shard)
  pair = jax.ShapeDtypeStruct((groups, h, t, t), jnp.float32, sharding=whole)
  attn = jax.shard_map(
      lambda q, k, v, p: fa.attention(q, k, v, pair_bias=p, backend="tpu"), mesh=mesh,
      in_specs=(P("data"),) * 3 + (P(),), out_specs=P("data"), check_vma=False)
  info = dict(topology=topology, kernel="softmax+pair_bias", batch=b, groups=groups, n=t,
              heads=h, d=d, dtype=dtype)
  args = (tok, tok, tok, pair)
  compile_and_record(attn, args, what="forward", **info)

  def loss(q, k, v, p):
    return attn(q, k, v, p).astype(jnp.float32).sum()

  compiled = compile_and_record(jax.grad(loss, argnums=(0, 1, 2, 3)), args,
                                what="forward+backward", **info)
  assert "flash" in compiled.as_text()
