r"""Depthwise convolution on CPU: XLA's grouped convolution, the same conv as shifted sums, and
torch's, beside a dense product of the same tokens.

  python experiments/depthwise.py --timm_python=/path/to/torch-venv/bin/python
  python experiments/depthwise.py --smoke --out=/tmp/dw.json        # tiny, for the tests

A k x k depthwise conv (stride 1, zero 'SAME' padding, one filter per channel) of [B, H, W, C]:
`lax.conv_general_dilated` with feature_group_count=C (what flax's nn.Conv runs), the k^2 shifted
multiply-adds of the zero-padded input (the same numbers, another XLA program), their gradients
with respect to input and kernel, and torch's Conv2d(groups=C) forward in the interpreter given
by --timm_python; a Dense C -> 4C of the same tokens is the yardstick. Median of --runs calls
after a warm-up, milliseconds. Prints markdown and writes JSON.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
from jax import lax


def median_ms(fn, *args, runs: int) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(runs):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return 1e3 * statistics.median(times)


def grouped(x, w):
  return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                  feature_group_count=x.shape[-1])


def shifted(x, w):
  k, (h, wd) = w.shape[0], x.shape[1:3]
  p = jnp.pad(x, ((0, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)))
  return sum(p[:, a:a + h, b:b + wd] * w[a, b, 0] for a in range(k) for b in range(k))


TORCH_SNIPPET = textwrap.dedent("""
    import json, statistics, sys, time, torch
    b, h, w, c, k, runs = map(int, sys.argv[1:7])
    conv = torch.nn.Conv2d(c, c, k, padding=k // 2, groups=c)
    lin = torch.nn.Linear(c, 4 * c)
    x, xl = torch.randn(b, c, h, w), torch.randn(b, h * w, c)
    def ms(f):
        with torch.inference_mode():
            f()
            t = []
            for _ in range(runs):
                s = time.perf_counter(); f(); t.append(time.perf_counter() - s)
        return 1e3 * statistics.median(t)
    print(json.dumps({"torch_depthwise_ms": ms(lambda: conv(x)),
                      "torch_dense_ms": ms(lambda: lin(xl)), "torch": torch.__version__,
                      "threads": torch.get_num_threads()}))
""")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--shape", default="8,56,56,256", help="B,H,W,C")
  p.add_argument("--kernel", type=int, default=3)
  p.add_argument("--runs", type=int, default=5)
  p.add_argument("--timm_python", default=None, help="python of an env with torch")
  p.add_argument("--smoke", action="store_true")
  p.add_argument("--out", default="depthwise.json")
  args = p.parse_args(argv)
  if args.smoke:
    args.shape, args.runs = "2,8,8,16", 1
  b, h, w, c = (int(v) for v in args.shape.split(","))
  kx, kw, kd = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(kx, (b, h, w, c))
  wt = jax.random.normal(kw, (args.kernel, args.kernel, 1, c))
  dense = jax.random.normal(kd, (c, 4 * c))
  loss = lambda f: jax.jit(jax.grad(lambda x, w: (f(x, w) ** 2).sum(), argnums=(0, 1)))  # noqa
  row = {"shape": [b, h, w, c], "kernel": args.kernel,
         "max_abs_diff": float(jnp.abs(grouped(x, wt) - shifted(x, wt)).max()),
         "grouped_ms": median_ms(jax.jit(grouped), x, wt, runs=args.runs),
         "shifted_ms": median_ms(jax.jit(shifted), x, wt, runs=args.runs),
         "grouped_grad_ms": median_ms(loss(grouped), x, wt, runs=args.runs),
         "shifted_grad_ms": median_ms(loss(shifted), x, wt, runs=args.runs),
         "dense_ms": median_ms(jax.jit(lambda x, d: x @ d), x, dense, runs=args.runs)}
  if args.timm_python:
    res = subprocess.run([args.timm_python, "-c", TORCH_SNIPPET, str(b), str(h), str(w), str(c),
                          str(args.kernel), str(args.runs)], capture_output=True, text=True,
                         check=True)
    row.update(json.loads(res.stdout.strip().splitlines()[-1]))
  fmt = lambda k: f"{row[k]:.2f}" if k in row else "-"  # noqa: E731
  print(f"| {args.kernel}x{args.kernel} depthwise of {args.shape} | ms |\n|---|---|\n"
        + "\n".join(f"| {name} | {fmt(key)} |" for name, key in [
            ("XLA grouped conv", "grouped_ms"), ("XLA shifted sums", "shifted_ms"),
            ("XLA grouped conv, gradient", "grouped_grad_ms"),
            ("XLA shifted sums, gradient", "shifted_grad_ms"),
            ("torch Conv2d(groups=C)", "torch_depthwise_ms"),
            (f"XLA dense {c} -> {4 * c}", "dense_ms"), (f"torch dense {c} -> {4 * c}",
                                                      "torch_dense_ms")]))
  result = {"backend": jax.default_backend(), "jax": jax.__version__, "cpus": os.cpu_count(),
            "loadavg": os.getloadavg(), "row": row}
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
