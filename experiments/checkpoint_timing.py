r"""Save and restore times of a full train state (ViT + AdamW) through the trainer's Checkpointer.

  python experiments/checkpoint_timing.py --variant=B/16 --repeats=3 --out=checkpoint_timing.json

The state is what main.py saves: params, AdamW's mu and nu, step and rng (ViT-B/16: 86.6M
parameters, ~1.04 GB in float32), filled with random values (zeros would compress away).
Reported, median over repeats:
  async_blocking_s  how long `save()` holds the training loop (device -> host copy, then orbax
                    writes in a background thread while training goes on)
  async_total_s     until that save is committed (files written and the step renamed)
  sync_s            a synchronous save
  restore_s         restoring into the state's shardings, arrays ready
Also the bytes on disk. Prints a markdown table and writes JSON.
"""
import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402

from vitjax import models  # noqa: E402
from vitjax.train import checkpoint as ckpt_lib  # noqa: E402
from vitjax.train import mesh as mesh_lib  # noqa: E402
from vitjax.train import optim, trainer  # noqa: E402


def make_state(variant: str, image_size: int):
  config = ml_collections.ConfigDict(dict(
      seed=0, sharding="dp", model=dict(name="vit", variant=variant),
      optimizer=dict(name="adamw", lr=1e-3, weight_decay=0.05)))
  model = models.build(config.model, num_classes=1000, image_size=image_size)
  tx, _ = optim.make_optimizer(config.optimizer, 1000, 10)
  mesh = mesh_lib.make_mesh((("data", -1),))
  abstract, _, init = trainer.state_spec(model, tx, config, mesh, (image_size, image_size, 3))
  state = init()
  # AdamW's mu and nu start at zero, which compresses to nothing: fill every float array with
  # random values, as after some training, so the bytes written are the real ones.
  leaves, treedef = jax.tree_util.tree_flatten(state)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  leaves = [jax.random.normal(k, x.shape, x.dtype) * 1e-3 if x.dtype == jnp.float32 else x
            for k, x in zip(keys, leaves)]
  return jax.block_until_ready(jax.tree_util.tree_unflatten(treedef, leaves)), abstract


def disk_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def timed(fn):
  t0 = time.perf_counter()
  out = fn()
  return time.perf_counter() - t0, out


def measure(state, abstract, root: str, repeats: int) -> dict:
  rows = {"async_blocking_s": [], "async_total_s": [], "sync_s": [], "restore_s": []}
  for r in range(repeats):
    workdir = os.path.join(root, f"run{r}")
    ckpt = ckpt_lib.Checkpointer(workdir, keep=2, async_save=True)
    t0 = time.perf_counter()
    ckpt.save(1, state, force=True)
    rows["async_blocking_s"].append(time.perf_counter() - t0)
    ckpt.wait()
    rows["async_total_s"].append(time.perf_counter() - t0)
    ckpt.close()
    sync = ckpt_lib.Checkpointer(workdir, keep=2, async_save=False)
    rows["sync_s"].append(timed(lambda c=sync: c.save(2, state, force=True))[0])
    seconds, _ = timed(lambda c=sync: jax.block_until_ready(c.restore(abstract, step=2)[0]))
    rows["restore_s"].append(seconds)
    size = disk_bytes(os.path.join(sync.directory, "2"))
    sync.close()
    shutil.rmtree(workdir)
  return {**{k: statistics.median(v) for k, v in rows.items()}, "disk_bytes": size,
          "runs": rows}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--variant", default="B/16")
  p.add_argument("--image_size", type=int, default=224)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
  p.add_argument("--out", default="checkpoint_timing.json")
  args = p.parse_args()
  state, abstract = make_state(args.variant, args.image_size)
  n_params = models.num_params(state.params)
  state_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(state))
  root = tempfile.mkdtemp(dir=args.dir)
  try:
    result = measure(state, abstract, root, args.repeats)
  finally:
    shutil.rmtree(root, ignore_errors=True)
  result.update(variant=args.variant, params=n_params, state_bytes=state_bytes,
                devices=f"{jax.device_count()} x {jax.devices()[0].platform}",
                jax=jax.__version__)
  gb = state_bytes / 1e9
  print(f"ViT-{args.variant} + AdamW train state: {n_params / 1e6:.1f}M params, {gb:.2f} GB "
        f"({result['disk_bytes'] / 1e9:.2f} GB on disk), {result['devices']}, median of "
        f"{args.repeats}")
  print("| save: loop blocked | save: committed (async) | save (sync) | restore |")
  print("|---|---|---|---|")
  print(f"| {result['async_blocking_s']:.2f} s | {result['async_total_s']:.2f} s "
        f"({gb / result['async_total_s']:.2f} GB/s) | {result['sync_s']:.2f} s | "
        f"{result['restore_s']:.2f} s ({gb / result['restore_s']:.2f} GB/s) |")
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
