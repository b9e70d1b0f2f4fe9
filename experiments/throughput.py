r"""Inference and training throughput (images/s) of a ViT, optionally beside timm on PyTorch.

  python experiments/throughput.py --variant=S/16 --batch=32 --dtype=float32
  python experiments/throughput.py --variant=S/16 --batch=32 --timm_python=/path/to/torch-venv/bin/python

Jit-compiled, warmed up, `block_until_ready`, median of several timed runs, device-resident random
inputs. With --timm_python, timm's model of the same shape is timed in that interpreter in the same
run (alternating with ours), and the table reports the ratio. Prints markdown and writes JSON.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from vitjax import models  # noqa: E402

TIMM_NAMES = {"Ti/16": "vit_tiny_patch16_224", "S/16": "vit_small_patch16_224",
              "B/16": "vit_base_patch16_224", "B/32": "vit_base_patch32_224",
              "L/16": "vit_large_patch16_224"}


def median_time(fn, runs: int, warmup: int = 2) -> float:
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(runs):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def vitjax_throughput(args) -> dict:
  depth = {"depth": args.depth} if getattr(args, "depth", None) else {}
  model = models.build(dict(variant=args.variant, attention=dict(name=args.attention),
                            impl=args.impl, **depth), num_classes=1000,
                       image_size=args.image_size, dtype=args.dtype)
  x = jax.random.normal(jax.random.PRNGKey(0), (args.batch, args.image_size, args.image_size, 3))
  params = jax.jit(lambda: model.init(jax.random.PRNGKey(1), x[:1])["params"])()
  forward = jax.jit(lambda p, x: model.apply({"params": p}, x)[0])
  out = {"infer_img_s": args.batch / median_time(lambda: forward(params, x), args.runs)}
  if args.train:
    tx = optax.adamw(1e-4)
    opt = tx.init(params)
    labels = jnp.zeros((args.batch,), jnp.int32)

    @jax.jit
    def step(p, o):
      def loss(p):
        logits = model.apply({"params": p}, x, train=True,
                             rngs={"dropout": jax.random.PRNGKey(0)})[0]
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      g = jax.grad(loss)(p)
      u, o = tx.update(g, o, p)
      return optax.apply_updates(p, u), o
    out["train_img_s"] = args.batch / median_time(lambda: step(params, opt), max(args.runs // 2, 3))
  return out


TIMM_SNIPPET = textwrap.dedent("""
    import json, statistics, sys, time, torch
    try:
        import timm
    except RuntimeError:  # torchvision's CUDA-only ops: define stand-ins so timm imports on CPU
        for m in [m for m in sys.modules if m.startswith("torchvision")]:
            del sys.modules[m]
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import timm
    name, batch, size, runs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    model = timm.create_model(name, pretrained=False, img_size=size).eval()
    x = torch.randn(batch, 3, size, size)
    with torch.inference_mode():
        for _ in range(2):
            model(x)
        times = []
        for _ in range(runs):
            t = time.perf_counter(); model(x); times.append(time.perf_counter() - t)
    print(json.dumps({"infer_img_s": batch / statistics.median(times),
                      "torch": torch.__version__, "timm": timm.__version__,
                      "threads": torch.get_num_threads()}))
""")


def timm_throughput(args) -> dict:
  name = TIMM_NAMES.get(args.variant)
  if name is None:
    raise ValueError(f"no timm model for {args.variant}; known: {sorted(TIMM_NAMES)}")
  res = subprocess.run([args.timm_python, "-c", TIMM_SNIPPET, name, str(args.batch),
                        str(args.image_size), str(args.runs)], capture_output=True, text=True,
                       check=True)
  return json.loads(res.stdout.strip().splitlines()[-1])


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--variant", default="S/16")
  p.add_argument("--depth", type=int, default=None, help="override the variant's depth")
  p.add_argument("--image_size", type=int, default=224)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--attention", default="mhsa")
  p.add_argument("--impl", default="reference")
  p.add_argument("--runs", type=int, default=10)
  p.add_argument("--rounds", type=int, default=3, help="alternating rounds (ours, timm)")
  p.add_argument("--train", action="store_true", help="also time a full training step")
  p.add_argument("--timm_python", default=None, help="python of an env with torch + timm")
  p.add_argument("--out", default="throughput.json")
  args = p.parse_args()

  ours, theirs, load_start = [], [], os.getloadavg()
  for _ in range(args.rounds):  # alternate so that machine noise hits both alike
    ours.append(vitjax_throughput(args))
    if args.timm_python:
      theirs.append(timm_throughput(args))
  result = {"config": vars(args), "backend": jax.default_backend(), "jax": jax.__version__,
            "cpus": os.cpu_count(), "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
            "vitjax_infer_img_s": statistics.median(r["infer_img_s"] for r in ours)}
  rows = [f"| vitjax {args.variant} ({args.impl}) | {args.batch} | {args.dtype} | "
          f"{result['vitjax_infer_img_s']:.1f} |"]
  if args.train:
    result["vitjax_train_img_s"] = statistics.median(r["train_img_s"] for r in ours)
    rows.append(f"| vitjax {args.variant} train step | {args.batch} | {args.dtype} | "
                f"{result['vitjax_train_img_s']:.1f} |")
  if theirs:
    result["timm_infer_img_s"] = statistics.median(r["infer_img_s"] for r in theirs)
    result["timm_versions"] = {k: theirs[0][k] for k in ("torch", "timm", "threads")}
    result["ratio_vitjax_over_timm"] = result["vitjax_infer_img_s"] / result["timm_infer_img_s"]
    rows.append(f"| timm {TIMM_NAMES[args.variant]} (torch {theirs[0]['torch']}) | {args.batch} "
                f"| float32 | {result['timm_infer_img_s']:.1f} |")
  print("| model | batch | dtype | images/s |\n|---|---|---|---|\n" + "\n".join(rows))
  if theirs:
    print(f"\nvitjax / timm inference: {result['ratio_vitjax_over_timm']:.2f}x")
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()
