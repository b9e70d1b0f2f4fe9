r"""The backbones side by side: parameters, MACs and CPU throughput, each beside timm's model.

  python experiments/backbones.py --timm_python=/path/to/torch-venv/bin/python
  python experiments/backbones.py --backbones=swin_t,pvt_v2_b2 --batch=8 --train
  python experiments/backbones.py --smoke --out_dir=/tmp/bb        # tiny, for the tests

Per backbone at 224 px (1000 classes): parameters (ours, and timm's model counted in the same
run); analytic MACs (`vitjax.tokens.macs.model_macs`), XLA's count of the compiled forward
(its flops / 2: XLA counts a multiply-add as two) and the paper's GFLOPs, which are
multiply-adds too; forward (and with --train, AdamW train-step) images/s of ours and of timm's
model in PyTorch, timed in the same run, alternating (ours, timm) over --rounds rounds so that
machine noise hits both alike, median of --runs timed calls each, and the ratio ours / timm.
Where ours is slower, the two GMACs columns say whether XLA runs more arithmetic than the
model needs (masked windows, padding, materialised gathers: XLA above analytic) or the same
arithmetic more slowly (equal counts, lower images/s).

Outputs in --out_dir: backbones.json, backbones.md and backbones.png (forward ratio per backbone).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from vitjax import models  # noqa: E402
from vitjax.tokens import macs as macs_lib  # noqa: E402

# label: (model config, timm model name or None, the paper's GFLOPs (multiply-adds) at 224 px)
BACKBONES = {
    "vit_s16": (dict(name="vit", variant="S/16"), "vit_small_patch16_224", 4.6),
    "swin_t": (dict(name="swin", variant="T"), "swin_tiny_patch4_window7_224", 4.5),
    "pvt_v2_b0": (dict(name="pvt_v2", variant="b0"), "pvt_v2_b0", 0.6),
    "pvt_v2_b2": (dict(name="pvt_v2", variant="b2"), "pvt_v2_b2", 4.0),
    "twins_svt_s": (dict(name="twins", variant="svt_s"), "twins_svt_small", 2.9),
    "davit_t": (dict(name="davit", variant="T"), "davit_tiny", 4.5),
    "nat_t": (dict(name="nat", variant="T"), None, 4.3),
    "dinat_t": (dict(name="dinat", variant="T"), None, 4.3),
    "convit_ti": (dict(name="convit", variant="Ti"), "convit_tiny", 1.0),
    "mvitv2_t": (dict(name="mvitv2", variant="T"), "mvitv2_tiny", 4.7),
    "maxvit_t": (dict(name="maxvit", variant="T"), "maxvit_tiny_tf_224", 5.6),
    "gcvit_t": (dict(name="gcvit", variant="T"), "gcvit_tiny", 4.7),
    "cvt_13": (dict(name="cvt", variant="13"), None, 4.5),
}
# --smoke: one tiny backbone, a small image, no timm
SMOKE = {"swin_tiny": (dict(name="swin", embed_dim=16, depths=(1, 1), num_heads=(1, 2),
                            window_size=4), None, None)}


def median_time(fn, runs: int, warmup: int = 1) -> float:
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(runs):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def build(cfg, image_size):
  return models.build(cfg, num_classes=1000, image_size=image_size)


def init(model, image_size):
  x = jnp.zeros((1, image_size, image_size, 3))
  return jax.jit(lambda: model.init(jax.random.PRNGKey(0), x))()


def xla_macs(model, variables, image_size) -> float:
  """XLA's flop count of the compiled one-image forward, halved to multiply-adds."""
  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  compiled = jax.jit(lambda v, x: model.apply(v, x)[0]).lower(variables, x).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", float("nan"))) / 2


def static_row(label, cfg, image_size) -> dict:
  model = build(cfg, image_size)
  variables = init(model, image_size)
  return {"params": models.num_params(variables["params"]),
          "analytic_gmacs": macs_lib.model_macs(model) / 1e9,
          "xla_gmacs": xla_macs(model, variables, image_size) / 1e9}


def make_timers(cfg, args):
  """(forward, train step) closures of one built, initialised backbone on random inputs."""
  model = build(cfg, args.image_size)
  variables = init(model, args.image_size)
  params, stats = variables["params"], variables.get("batch_stats")
  x = jax.random.normal(jax.random.PRNGKey(1), (args.batch, args.image_size, args.image_size, 3))
  labels = jnp.zeros((args.batch,), jnp.int32)
  forward = jax.jit(lambda v, x: model.apply(v, x)[0])
  tx = optax.adamw(1e-4)
  opt = tx.init(params)

  @jax.jit
  def step(p, o):
    def loss(p):
      v = {"params": p, **({"batch_stats": stats} if stats else {})}
      logits = model.apply(v, x, train=True, rngs={"dropout": jax.random.PRNGKey(0)},
                           mutable=["losses", "batch_stats"])[0][0]
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    u, o = tx.update(jax.grad(loss)(p), o, p)
    return optax.apply_updates(p, u), o

  return lambda: forward(variables, x), lambda: step(params, opt)


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
    name, batch, size, runs, train = sys.argv[1], *map(int, sys.argv[2:6])
    model = timm.create_model(name, pretrained=False, num_classes=1000)
    x, y = torch.randn(batch, 3, size, size), torch.zeros(batch, dtype=torch.long)
    def median(fn, runs):
        fn()
        times = []
        for _ in range(runs):
            t = time.perf_counter(); fn(); times.append(time.perf_counter() - t)
        return statistics.median(times)
    out = {"params": sum(p.numel() for p in model.parameters()), "torch": torch.__version__,
           "timm": timm.__version__, "threads": torch.get_num_threads()}
    model.eval()
    with torch.inference_mode():
        out["infer_img_s"] = batch / median(lambda: model(x), runs)
    if train:
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        def step():
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        out["train_img_s"] = batch / median(step, max(runs // 2, 2))
    print(json.dumps(out))
""")


def timm_timing(name, args) -> dict:
  res = subprocess.run([args.timm_python, "-c", TIMM_SNIPPET, name, str(args.batch),
                        str(args.image_size), str(args.runs), str(int(args.train))],
                       capture_output=True, text=True, check=False)
  if res.returncode:
    raise RuntimeError(f"timm {name} failed: {res.stderr.strip().splitlines()[-1:]}")
  return json.loads(res.stdout.strip().splitlines()[-1])


def ours_timing(forward, step, args) -> dict:
  out = {"infer_img_s": args.batch / median_time(forward, args.runs)}
  if args.train:
    out["train_img_s"] = args.batch / median_time(step, max(args.runs // 2, 2))
  return out


def measure(label, cfg, timm_name, published, args) -> dict:
  print(f"== {label}", flush=True)
  row = {"label": label, "config": cfg, "timm": timm_name, "paper_gmacs": published,
         **static_row(label, cfg, args.image_size)}
  forward, step = make_timers(cfg, args)
  ours, theirs = [], []
  for _ in range(args.rounds):
    ours.append(ours_timing(forward, step, args))
    if timm_name and args.timm_python:
      theirs.append(timm_timing(timm_name, args))
  for key in ("infer_img_s", "train_img_s"):
    if key in ours[0]:
      row[key] = statistics.median(r[key] for r in ours)
      if theirs:
        row[f"timm_{key}"] = statistics.median(r[key] for r in theirs)
        row[f"ratio_{key}"] = row[key] / row[f"timm_{key}"]
  if theirs:
    row["timm_params"] = theirs[0]["params"]
    row["timm_versions"] = {k: theirs[0][k] for k in ("torch", "timm", "threads")}
  return row


def fmt(v, spec=".1f"):
  return "-" if v is None else format(v, spec)


def markdown(rows, args) -> str:
  lines = [f"Backbones at {args.image_size} px, batch {args.batch}, float32, "
           f"{jax.default_backend()} ({os.cpu_count()} cores), rounds {args.rounds} x runs "
           f"{args.runs}; ratios are ours / timm in the same run.", "",
           "| backbone | params | timm params | analytic GMACs | XLA GMACs | paper GFLOPs "
           "| fwd img/s | timm fwd | fwd ratio | train img/s | timm train | train ratio |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(
        f"| {r['label']} | {r['params']:,} | {fmt(r.get('timm_params'), ',')} | "
        f"{r['analytic_gmacs']:.2f} | {r['xla_gmacs']:.2f} | {fmt(r['paper_gmacs'])} | "
        f"{fmt(r.get('infer_img_s'))} | {fmt(r.get('timm_infer_img_s'))} | "
        f"{fmt(r.get('ratio_infer_img_s'), '.2f')} | {fmt(r.get('train_img_s'))} | "
        f"{fmt(r.get('timm_train_img_s'))} | {fmt(r.get('ratio_train_img_s'), '.2f')} |")
  return "\n".join(lines) + "\n"


def plot(rows, path):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  rows = [r for r in rows if r.get("ratio_infer_img_s")]
  fig, ax = plt.subplots(figsize=(7, 3.5))
  labels = [r["label"] for r in rows]
  ax.bar(range(len(rows)), [r["ratio_infer_img_s"] for r in rows], label="forward")
  if rows and "ratio_train_img_s" in rows[0]:
    ax.plot(range(len(rows)), [r["ratio_train_img_s"] for r in rows], "ko", label="train step")
  ax.axhline(1.0, color="grey", lw=0.8)
  ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right")
  ax.set_ylabel("vitjax / timm images/s")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--backbones", default=",".join(BACKBONES))
  p.add_argument("--image_size", type=int, default=224)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--runs", type=int, default=5)
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--train", action="store_true", help="also time an AdamW train step")
  p.add_argument("--timm_python", default=None, help="python of an env with torch + timm")
  p.add_argument("--smoke", action="store_true")
  p.add_argument("--out_dir", default=os.path.join(ROOT, "experiments", "results"))
  args = p.parse_args(argv)
  table = SMOKE if args.smoke else BACKBONES
  if args.smoke:
    args.image_size, args.batch, args.runs, args.rounds, args.backbones = 32, 2, 1, 1, "swin_tiny"
  unknown = [b for b in args.backbones.split(",") if b not in table]
  if unknown:
    raise SystemExit(f"error: unknown backbone(s) {unknown}; valid: {', '.join(table)}")
  load_start = os.getloadavg()
  rows = [measure(b, *table[b], args) for b in args.backbones.split(",")]
  md = markdown(rows, args)
  print(md)
  os.makedirs(args.out_dir, exist_ok=True)
  with open(os.path.join(args.out_dir, "backbones.json"), "w") as f:
    json.dump({"config": vars(args), "jax": jax.__version__, "cpus": os.cpu_count(),
               "loadavg_start": load_start, "loadavg_end": os.getloadavg(), "rows": rows},
              f, indent=2)
  with open(os.path.join(args.out_dir, "backbones.md"), "w") as f:
    f.write(md)
  plot(rows, os.path.join(args.out_dir, "backbones.png"))
  return 0


if __name__ == "__main__":
  sys.exit(main())
