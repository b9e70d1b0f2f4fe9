"""Attention kernel benchmark: our Pallas flash kernels vs cuDNN vs XLA, forward and forward+backward.

  python experiments/kernels.py                    # accelerator: ViT shapes + N=4096, bf16
  python experiments/kernels.py --smoke            # CPU: tiny shapes, Pallas in interpret mode
  python experiments/kernels.py --out=/tmp/k.json  # where the JSON goes
  python experiments/kernels.py --e2e_batch=0      # attention kernels only, no ViT-B/16 training

Methods (all [B, N, H, d] in, same output):
  xla             jax.nn.dot_product_attention(implementation="xla") (materialises the weights)
  cudnn           jax.nn.dot_product_attention(implementation="cudnn") (GPU only)
  pallas          vitjax.kernels.flash_attention.attention (softmax)
  pallas_sigmoid  vitjax.kernels.flash_sigmoid.sigmoid_attention (compared with `pallas`)
TFLOP/s are analytic: forward 4 B H N^2 d (QK^T and PV), forward+backward 3.5x that; the XLA
path's count is cross-checked against XLA's cost analysis (`xla_cost_flops` in the JSON).
Timing: jit, warm-up, block_until_ready, median of --runs runs; device-resident random inputs.
Compare within one run (ratios), not across machines.

End to end: ViT-B/16 at 224 px, bf16, one training step (forward, backward, AdamW) with each
attention backend (`impl`: reference, xla, cudnn on GPU, pallas): images/s, model TFLOP/s
(6 x the analytic MACs per image: forward 2 x MACs, backward twice the forward; the 0.8 M MACs
of the head are left out) and MFU against the chip's dense bf16 peak (`PEAK_TFLOPS`).

Where a reduced ViT spends its time: the forward of ViT-S/16 with EViT (keep rate 0.7) and ToMe
(r = 13), and each reduction step (ranking/matching, gather, fuse/merge) timed alone on random
tokens of the shape it sees in the model; the share says what a fused kernel could save at most.
"""
import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, ".."), HERE]  # vitjax, and throughput.py beside this file
from vitjax import models, tokens  # noqa: E402  pylint: disable=wrong-import-position
from vitjax.kernels import flash_attention, flash_sigmoid  # noqa: E402  pylint: disable=wrong-import-position
from vitjax.tokens import macs  # noqa: E402  pylint: disable=wrong-import-position
import throughput  # noqa: E402  pylint: disable=wrong-import-position  (experiments/throughput.py)

# (B, N, H, d): ViT-S/B at 224 px (N=197) and 384 px (N=577), and a long sequence
SHAPES = [(256, 197, 6, 64), (256, 197, 12, 64), (256, 577, 6, 64), (256, 577, 12, 64),
          (8, 4096, 12, 64)]
SMOKE_SHAPES = [(2, 17, 2, 64)]
SMOKE_DEPTH = 2  # --smoke: Ti/16 cut to two blocks (interpret-mode kernels compile per block)
PASSES = ("forward", "forward+backward")
# Dense bf16 peak TFLOP/s per chip (vendor data sheets), matched against device_kind in order.
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0),
               ("v6 lite", 918.0), ("v6e", 918.0), ("v5p", 459.0), ("v5 lite", 197.0),
               ("v5e", 197.0), ("v4", 275.0))


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


def fmt(x, p: int = 2) -> str:
  """A table cell: x with p decimals, empty for a missing or NaN value."""
  return "" if x is None or x != x else f"{x:.{p}f}"


def peak_tflops(device_kind: str):
  for key, tflops in PEAK_TFLOPS:
    if key.lower() in device_kind.lower():
      return tflops
  return None


def e2e_rows(args, platform: str, device_kind: str) -> list:
  """ViT training step throughput and MFU with each attention backend."""
  variant, size, batch = ("Ti/16", 32, 2) if args.smoke else ("B/16", 224, args.e2e_batch)
  dtype = "float32" if args.smoke else "bfloat16"
  impls = ["reference", "xla"] + (["cudnn"] if platform == "gpu" else []) + ["pallas"]
  depth = SMOKE_DEPTH if args.smoke else None
  model = models.build(dict(variant=variant, depth=depth), num_classes=1000, image_size=size)
  flops = 6.0 * macs.model_macs(model, 3)  # per image and training step
  peak = peak_tflops(device_kind)
  rows = []
  for impl in impls:
    row = dict(variant=variant, depth=model.depth, image_size=size, batch=batch, dtype=dtype,
               impl=impl, train_flops_per_image=flops, peak_tflops=peak)
    ns = argparse.Namespace(variant=variant, depth=depth, attention="mhsa", impl=impl,
                            image_size=size, batch=batch, dtype=dtype, runs=args.runs or 10,
                            train=True)
    try:
      row.update(throughput.vitjax_throughput(ns))
      row["train_tflops"] = row["train_img_s"] * flops / 1e12
      row["mfu"] = row["train_tflops"] / peak if peak else None
    except Exception as e:  # pylint: disable=broad-except  (e.g. out of memory at this batch)
      row["error"] = f"{type(e).__name__}: {e}"[:300]
    rows.append(row)
    print(f"  {variant} train {impl:10s} {row.get('train_img_s', float('nan')):9.1f} img/s",
          file=sys.stderr, flush=True)
  return rows


REDUCTIONS = (dict(name="evit", keep_rate=0.7), dict(name="tome", r=13))


def reduction_rows(args, platform: str) -> list:
  """Time of the reduction steps alone as a share of the reduced ViT's forward."""
  variant, size, batch = ("Ti/16", 32, 2) if args.smoke else ("S/16", 224, args.reduce_batch)
  dtype = jnp.float32 if args.smoke or platform == "cpu" else jnp.bfloat16
  x_img = jax.random.normal(jax.random.PRNGKey(0), (batch, size, size, 3))
  rows = []
  for spec in REDUCTIONS:
    if args.smoke:  # 4 patches: one token per step
      spec = dict(spec, r=1) if spec["name"] == "tome" else dict(spec, locations=(1,))
    depth = SMOKE_DEPTH if args.smoke else None
    model = models.build(dict(variant=variant, depth=depth, tokens=spec), num_classes=1000,
                         image_size=size, dtype=jnp.dtype(dtype).name)
    params = jax.jit(lambda: model.init(jax.random.PRNGKey(1), x_img[:1])["params"])()
    forward = jax.jit(lambda p, x: model.apply({"params": p}, x)[0])
    full, _ = time_fn(forward, (params, x_img), args.runs or 10, args.warmup)
    counts = macs.block_counts(model, 3)
    steps = 0.0
    reducer_cls, _ = model.stage().reducer()
    for i, kw in enumerate(model.stage().plan().blocks):
      if kw is None:
        continue
      n, width = counts[i].n_attn, model.width  # an after-attention reducer sees its output
      reducer = reducer_cls(num_prefix=model.num_prefix, dtype=dtype, **kw)
      keys = jax.random.split(jax.random.PRNGKey(i), 3)
      x = jax.random.normal(keys[0], (batch, n, width), dtype)
      aux = dict(cls_probs=jax.nn.softmax(jax.random.normal(keys[1], (batch, n))),
                 key_metric=jax.random.normal(keys[2], (batch, n, width // model.num_heads)))
      state = tokens.TokenState(size=jnp.ones((batch, n), jnp.float32))
      step = jax.jit(lambda x, st, a, r=reducer: r.apply({}, x, st, a)[0])
      sec, _ = time_fn(step, (x, state, aux), args.runs or 10, args.warmup)
      steps += sec
    rows.append(dict(variant=variant, batch=batch, dtype=jnp.dtype(dtype).name, tokens=spec,
                     forward_ms=full * 1e3, reduction_ms=steps * 1e3, share=steps / full))
    print(f"  {spec['name']}: reduction steps {steps * 1e3:.2f} ms of a {full * 1e3:.1f} ms "
          f"forward ({100 * steps / full:.1f}%)", file=sys.stderr, flush=True)
  return rows


def e2e_table(rows) -> str:
  lines = ["| variant | batch | dtype | impl | infer img/s | train img/s | train TFLOP/s | MFU |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    mfu = r.get("mfu")
    lines.append(f"| {r['variant']} | {r['batch']} | {r['dtype']} | {r['impl']} | "
                 f"{fmt(r.get('infer_img_s'), 1)} | {fmt(r.get('train_img_s'), 1)} | "
                 f"{fmt(r.get('train_tflops'))} | "
                 f"{'' if mfu is None else f'{100 * mfu:.1f}%'} |")
  return "\n".join(lines)


def table(rows, platform) -> str:
  cols = ["B", "N", "H", "d", "pass", "method", "ms", "TFLOP/s", "vs XLA", "vs cuDNN",
          "sigmoid vs softmax"]
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
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
  parser.add_argument("--reduce_batch", type=int, default=64,
                      help="ViT-S/16 batch for the reduction-share rows; 0 skips them")
  parser.add_argument("--e2e_batch", type=int, default=256,
                      help="ViT-B/16 training batch for the end-to-end rows; 0 skips them")
  args = parser.parse_args(argv)

  platform = jax.default_backend()
  shapes = SMOKE_SHAPES if args.smoke else SHAPES
  runs = args.runs or (3 if args.smoke else 20)
  dtype = jnp.dtype(args.dtype or ("float32" if args.smoke else "bfloat16"))
  device = jax.devices()[0]
  print(f"# attention kernels on {device.device_kind} ({platform}), jax {jax.__version__}, "
        f"{dtype.name}, median of {runs}", flush=True)
  rows, e2e = [], []
  if platform == "cpu" and not args.smoke:  # the kernels would run in interpret mode for hours
    print("no accelerator: kernel and end-to-end rows skipped (--smoke runs them at tiny shapes)")
  else:
    for shape in shapes:
      rows += bench_shape(shape, dtype, runs, args.warmup, platform)
    add_ratios(rows)
    print(table(rows, platform))
    e2e = e2e_rows(args, platform, device.device_kind) if args.e2e_batch else []
    if e2e:
      print("\n" + e2e_table(e2e))
  share = reduction_rows(args, platform) if args.reduce_batch else []
  for r in share:
    print(f"{r['tokens']['name']}: the reduction steps take {100 * r['share']:.1f}% of the "
          f"reduced forward ({r['reduction_ms']:.2f} of {r['forward_ms']:.1f} ms)")
  meta = dict(device=device.device_kind, platform=platform, jax=jax.__version__, dtype=dtype.name,
              runs=runs, warmup=args.warmup, smoke=args.smoke,
              cudnn="available" if platform == "gpu" else f"unavailable on {platform}")
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(dict(meta=meta, rows=rows, e2e=e2e, reduction_share=share), f, indent=1)
  print(f"\nwrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
