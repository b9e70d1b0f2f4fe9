"""Attention kernel benchmark: our Pallas flash kernels vs cuDNN vs XLA, forward and forward+backward.

  python experiments/kernels.py                    # accelerator: ViT shapes + N=4096, bf16
  python experiments/kernels.py --smoke            # CPU: tiny shapes, Pallas in interpret mode
  python experiments/kernels.py --out=/tmp/k.json  # where the JSON goes

Methods (all [B, N, H, d] in, same output):
  xla             jax.nn.dot_product_attention(implementation="xla") (materialises the weights)
  cudnn           jax.nn.dot_product_attention(implementation="cudnn") (GPU only)
  pallas          vitjax.kernels.flash_attention.attention (softmax)
  pallas_sigmoid  vitjax.kernels.flash_sigmoid.sigmoid_attention (compared with `pallas`)
TFLOP/s are analytic: forward 4 B H N^2 d (QK^T and PV), forward+backward 3.5x that; the XLA
path's count is cross-checked against XLA's cost analysis (`xla_cost_flops` in the JSON).
Timing: jit, warm-up, block_until_ready, median of --runs runs; device-resident random inputs.
Compare within one run (ratios), not across machines.
"""
import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from vitjax.kernels import flash_attention, flash_sigmoid  # noqa: E402  pylint: disable=wrong-import-position

# (B, N, H, d): ViT-S/B at 224 px (N=197) and 384 px (N=577), and a long sequence
SHAPES = [(256, 197, 6, 64), (256, 197, 12, 64), (256, 577, 6, 64), (256, 577, 12, 64),
          (8, 4096, 12, 64)]
SMOKE_SHAPES = [(2, 17, 2, 64), (2, 50, 4, 64)]
PASSES = ("forward", "forward+backward")


def methods(platform: str) -> dict:
  out = {"xla": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla")}
  if platform == "gpu":
    out["cudnn"] = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
  out["pallas"] = flash_attention.attention
  out["pallas_sigmoid"] = flash_sigmoid.sigmoid_attention
  return out


def analytic_flops(b, n, h, d, kind) -> float:
  fwd = 4.0 * b * h * n * n * d
  return fwd if kind == "forward" else 3.5 * fwd


def make_fn(attn, kind):
  if kind == "forward":
    return jax.jit(lambda q, k, v, dy: attn(q, k, v))
  # forward + backward: the vjp needs the forward's residuals, then runs the backward
  return jax.jit(lambda q, k, v, dy: jax.vjp(attn, q, k, v)[1](dy))


def time_fn(fn, args, runs: int, warmup: int):
  compiled = fn.lower(*args).compile()
  for _ in range(warmup):
    jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times), compiled


def xla_cost_flops(compiled):
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan")))
  except Exception:  # pylint: disable=broad-except
    return float("nan")


def bench_shape(shape, dtype, runs, warmup, platform):
  b, n, h, d = shape
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  q, k, v, dy = (jax.random.normal(kk, (b, n, h, d), jnp.float32).astype(dtype) for kk in keys)
  rows = []
  for kind in PASSES:
    flops = analytic_flops(b, n, h, d, kind)
    for name, attn in methods(platform).items():
      row = dict(B=b, N=n, H=h, d=d, dtype=jnp.dtype(dtype).name, pass_=kind, method=name,
                 analytic_flops=flops)
      try:
        sec, compiled = time_fn(make_fn(attn, kind), (q, k, v, dy), runs, warmup)
        row.update(ms=sec * 1e3, tflops=flops / sec / 1e12)
        if name == "xla":
          row["xla_cost_flops"] = xla_cost_flops(compiled)
      except Exception as e:  # pylint: disable=broad-except
        row.update(ms=float("nan"), tflops=float("nan"), error=f"{type(e).__name__}: {e}"[:300])
      rows.append(row)
      print(f"  {shape} {kind:16s} {name:15s} {row['ms']:9.3f} ms", file=sys.stderr, flush=True)
  return rows


def add_ratios(rows):
  """speedup of each method over xla and cudnn, and sigmoid vs softmax, within a (shape, pass)."""
  groups = {}
  for r in rows:
    groups.setdefault((r["B"], r["N"], r["H"], r["d"], r["pass_"]), {})[r["method"]] = r
  for g in groups.values():
    for r in g.values():
      for base in ("xla", "cudnn"):
        if base in g:
          r[f"speedup_vs_{base}"] = g[base]["ms"] / r["ms"]
      if r["method"] == "pallas_sigmoid" and "pallas" in g:
        r["speedup_vs_pallas_softmax"] = g["pallas"]["ms"] / r["ms"]


def table(rows, platform) -> str:
  cols = ["B", "N", "H", "d", "pass", "method", "ms", "TFLOP/s", "vs XLA", "vs cuDNN",
          "sigmoid vs softmax"]
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  fmt = lambda x, p=2: "" if x is None or x != x else f"{x:.{p}f}"  # noqa: E731
  for r in rows:
    lines.append("| " + " | ".join([
        str(r["B"]), str(r["N"]), str(r["H"]), str(r["d"]), r["pass_"], r["method"],
        fmt(r["ms"], 3), fmt(r["tflops"]), fmt(r.get("speedup_vs_xla")),
        fmt(r.get("speedup_vs_cudnn")), fmt(r.get("speedup_vs_pallas_softmax")),
    ]) + " |")
  if platform != "gpu":
    lines.append(f"\ncuDNN is unavailable on {platform}; only XLA and the Pallas kernels ran"
                 + (" (interpret mode: timings measure the interpreter, not the kernel)."
                    if platform == "cpu" else "."))
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU, interpret mode)")
  parser.add_argument("--runs", type=int, default=None, help="timed runs (median)")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--dtype", default=None, help="bfloat16 (default) or float32")
  parser.add_argument("--out", default="workdirs/kernels/kernels.json")
  args = parser.parse_args(argv)

  platform = jax.default_backend()
  shapes = SMOKE_SHAPES if args.smoke else SHAPES
  runs = args.runs or (3 if args.smoke else 20)
  dtype = jnp.dtype(args.dtype or ("float32" if args.smoke else "bfloat16"))
  device = jax.devices()[0]
  print(f"# attention kernels on {device.device_kind} ({platform}), jax {jax.__version__}, "
        f"{dtype.name}, median of {runs}", flush=True)
  if platform == "cpu" and not args.smoke:
    print("no accelerator: use --smoke (full shapes would take hours in interpret mode)")
    return 1

  rows = []
  for shape in shapes:
    rows += bench_shape(shape, dtype, runs, args.warmup, platform)
  add_ratios(rows)
  print(table(rows, platform))
  meta = dict(device=device.device_kind, platform=platform, jax=jax.__version__, dtype=dtype.name,
              runs=runs, warmup=args.warmup, smoke=args.smoke,
              cudnn="available" if platform == "gpu" else f"unavailable on {platform}")
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(dict(meta=meta, rows=rows), f, indent=1)
  print(f"\nwrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
