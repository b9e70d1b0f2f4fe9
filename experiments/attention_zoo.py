r"""The attention zoo on the embedded digits: every registered mechanism in the same small ViT.

  python experiments/attention_zoo.py                        # all mechanisms of the registry
  python experiments/attention_zoo.py --mechanisms=mhsa,sigmoid,performer --steps=200
  python experiments/attention_zoo.py --mechanisms=normalized --merge   # add to the last table
  python experiments/attention_zoo.py --smoke --out_dir=/tmp/zoo   # tiny, for the tests
  python experiments/attention_zoo.py --task=digits16 --mechanisms=spatial   # the Tier S study

Model: the default digits ViT (configs/default.py: 8x8 images, 2x2 patches, 4 blocks of width 96,
3 heads; with a [CLS] token, as the recorded results), no token reduction, so grid (Tier S)
mechanisms see the full token grid. Training: the trainer's step function (AdamW, warm-up +
cosine, label smoothing, drop-path), `--seeds` seeds trained at once under `jax.vmap` (one compile
per mechanism); each seed has its own initialisation, dropout and data order. Data: the digits
train split in memory, augmented in numpy per batch as the recorded results were (zero-pad 1,
random 8x8 crop, values in [-1, 1]; the default config now pads 2).

Tier S (`--task=digits16`): on the 8x8 digits with 2x2 patches the grid is 4x4, where a 7x7
window, neighbourhood or partition covers the whole grid and every spatial mechanism is global
attention with extra tables. That task upsamples each digit to 16x16 (pixel repetition, so no
new information) for an 8x8 grid of 2x2 patches, and sets each spatial mechanism to a size that
is local on that grid (`SPATIAL_OPTIONS`: windows and partitions of 4, neighbourhoods of 3);
`--mechanisms=spatial` runs `mhsa` and every Tier S mechanism. Its outputs are
attention_zoo_digits16.{json,md,png}, apart from the 8x8 table.

Per mechanism: parameters; FLOPs per image, analytic from the registry (each entry's `macs`) and
XLA's cost analysis of the compiled forward where an entry has none (the table says which; where
both exist, their ratio is the cross-check); forward and train-step throughput
relative to `mhsa`, timed after training in one run, interleaved (mhsa, a group of mechanisms,
mhsa, ...; each against the mean of the two mhsa timings around it; median over rounds); top-1 on
the 360 test digits (mean and standard deviation over seeds). Outputs: attention_zoo.json, .md and
a plot (accuracy vs train-step throughput) in --out_dir.
"""
import argparse
import functools
import importlib.util
import json
import math
import os
import statistics
import sys
import time
import traceback

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from vitjax import attention, models  # noqa: E402

def attention_macs(name: str, n: int, model):
  """MACs of one attention layer on n tokens: the registry's analytic count (None without one)."""
  entry = attention.get(name)
  if entry.macs is None:
    return None
  return entry.macs(n, model.width, model.num_heads, num_prefix=model.num_prefix)


def model_macs(model, attn_macs: int, channels: int) -> int:
  """Patch embedding + blocks (attention + MLP) + head, one image, no reduction."""
  n = model.grid[0] * model.grid[1] + model.num_prefix
  embed = model.grid[0] * model.grid[1] * model.patch_size ** 2 * channels * model.width
  mlp = 2 * n * model.width * model.mlp_dim
  return embed + model.depth * (attn_macs + mlp) + model.width * model.num_classes


def xla_flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", float("nan")))


# ---------------------------------------------------------------------------- data
TASKS = {"digits": 1, "digits16": 2}  # task: upsampling factor of the 8x8 digits
# Tier S settings that are local on the 8x8 grid of digits16 (the registry defaults are sized
# for a 56x56 or 14x14 grid)
SPATIAL_OPTIONS = {
    "window": dict(window_size=4), "shifted_window": dict(window_size=4, shift_size=2),
    "twins_lsa": dict(window_size=4), "davit_window": dict(window_size=4),
    "neighborhood": dict(kernel_size=3), "dilated_neighborhood": dict(kernel_size=3, dilation=2),
    "maxvit_block": dict(partition_size=4), "maxvit_grid": dict(partition_size=4),
    "agent_grid": dict(num_agents=16),
}


def digits_config(args):
  path = os.path.join(ROOT, "configs", "default.py")
  spec = importlib.util.spec_from_file_location("vitjax_default_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("smoke=True" if args.smoke else None)
  config.data.data_dir = args.data_dir
  config.model.class_token = True  # the model of the recorded results
  config.batch_size = args.batch
  if args.lr is not None:
    config.optimizer.lr = args.lr
  return config


def load_split(config, split: str, factor: int = 1):
  """All images of a split as float32 in [-1, 1] (the config's value_range) and int32 labels;
  `factor` > 1 repeats each pixel factor x factor times."""
  from vitjax import data  # pylint: disable=import-outside-toplevel
  src = data.data_source(config.data, split)
  rows = [src[i] for i in range(len(src))]
  images = np.stack([np.asarray(r["image"]) for r in rows]).astype(np.float32) / 127.5 - 1.0
  images = images.repeat(factor, axis=1).repeat(factor, axis=2)
  return images, np.asarray([int(r["label"]) for r in rows], np.int32)


class Batches:
  """Per-seed shuffled epochs; zero-pad + random crop (pp `random_crop(8, pad=1)` at 8x8, the pad
  scaled with the upsampling) in numpy."""

  def __init__(self, images, labels, batch: int, seeds: int, pad: int = 1):
    self.images, self.labels, self.batch, self.pad = images, labels, batch, pad
    self.rngs = [np.random.default_rng(1000 + s) for s in range(seeds)]
    self.queues = [np.zeros((0,), np.int64) for _ in range(seeds)]

  def indices(self, s: int):
    while self.queues[s].size < self.batch:
      self.queues[s] = np.concatenate([self.queues[s],
                                       self.rngs[s].permutation(len(self.labels))])
    idx, self.queues[s] = self.queues[s][:self.batch], self.queues[s][self.batch:]
    return idx

  def crop(self, rng, images, pad: int = 1):
    b, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=-1.0)
    top, left = rng.integers(0, 2 * pad + 1, b), rng.integers(0, 2 * pad + 1, b)
    rows = (top[:, None] + np.arange(h))[:, :, None]
    cols = (left[:, None] + np.arange(w))[:, None, :]
    return padded[np.arange(b)[:, None, None], rows, cols]

  def __next__(self):
    imgs, labels = [], []
    for s, rng in enumerate(self.rngs):
      idx = self.indices(s)
      imgs.append(self.crop(rng, self.images[idx], self.pad))
      labels.append(self.labels[idx])
    return {"image": np.stack(imgs), "label": np.stack(labels)}


# ---------------------------------------------------------------------------- one mechanism
def timed(fn, reps: int) -> float:
  """Seconds per call of `fn`: `reps` calls dispatched back to back, the last one awaited."""
  start = time.perf_counter()
  jax.block_until_ready(functools.reduce(lambda _, __: fn(), range(reps), None))
  return (time.perf_counter() - start) / reps


def run_mechanism(name: str, args, config, train, test) -> dict:
  """Builds, trains `--seeds` copies under vmap, evaluates; keeps the compiled functions."""
  from vitjax.train import optim, trainer  # pylint: disable=import-outside-toplevel
  entry = attention.get(name)
  cfg = config.copy_and_resolve_references()
  cfg.model.attention = dict(name=name, **(SPATIAL_OPTIONS.get(name, {})
                                            if args.task != "digits" else {}))
  model = models.build(cfg.model, num_classes=10, image_size=test[0].shape[1:3])
  tx, _ = optim.make_optimizer(cfg.optimizer, args.steps, args.warmup)

  def init(key):
    p_key, d_key, s_key = jax.random.split(key, 3)
    variables = model.init({"params": p_key, "dropout": d_key}, jnp.zeros((1, *test[0].shape[1:])))
    params = variables["params"]
    return trainer.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                              opt_state=tx.init(params), rng=s_key,
                              batch_stats=variables.get("batch_stats", {}))

  keys = jax.random.split(jax.random.PRNGKey(args.seed), args.seeds)
  state = jax.jit(jax.vmap(init))(keys)
  batches = Batches(*train, args.batch, args.seeds, pad=TASKS[args.task])
  first = next(batches)
  t = time.perf_counter()
  step = jax.jit(jax.vmap(trainer.make_train_step(model, tx, cfg)),
                 donate_argnums=(0,)).lower(state, first).compile()
  x_test = jnp.asarray(test[0])
  forward = jax.jit(jax.vmap(lambda p, s: model.apply(trainer.variables(p, s), x_test)[0])).lower(
      state.params, state.batch_stats).compile()
  compile_s = time.perf_counter() - t
  t = time.perf_counter()
  batch = first
  for _ in range(args.steps):
    state, metrics = step(state, batch)
    batch = next(batches)
  loss = np.asarray(metrics["train/loss"])
  train_s = time.perf_counter() - t
  logits = np.asarray(forward(state.params, state.batch_stats))
  top1 = (logits.argmax(-1) == test[1][None]).mean(-1)
  params = jax.tree_util.tree_map(lambda a: a[0], state.params)
  n_params = sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(params))
  n = model.grid[0] * model.grid[1] + model.num_prefix
  attn = attention_macs(name, n, model)
  xla = xla_flops(forward) / (args.seeds * x_test.shape[0])
  channels = test[0].shape[-1]
  analytic = None if attn is None else 2 * model_macs(model, attn, channels)
  row = dict(mechanism=name, tier=entry.tier, paper=entry.paper, complexity=entry.complexity,
             params=n_params, mflops_analytic=None if analytic is None else analytic / 1e6,
             mflops_xla=xla / 1e6, flops_source="analytic" if analytic else "xla",
             xla_over_analytic=None if analytic is None else xla / analytic,
             top1=[float(a) for a in top1], top1_mean=float(top1.mean()),
             top1_std=float(top1.std(ddof=1)) if top1.size > 1 else 0.0,
             final_loss=[float(v) for v in loss], compile_s=compile_s, train_s=train_s,
             step_s=train_s / args.steps)
  fns = dict(forward=lambda: forward(state.params, state.batch_stats), batch=batch, step=step,
             state=state, images=args.seeds * x_test.shape[0], train_images=args.seeds * args.batch)
  return row, fns


def time_all(args, results: list, fns: dict):
  """Forward and train-step throughput of every mechanism relative to mhsa, one interleaved run."""
  names = [r["mechanism"] for r in results if r["mechanism"] in fns and r["mechanism"] != "mhsa"]
  if "mhsa" not in fns:
    return None
  holder = {k: dict(state=v["state"]) for k, v in fns.items()}

  def train_call(name):
    f = fns[name]
    def call():
      holder[name]["state"], m = f["step"](holder[name]["state"], f["batch"])
      return m["train/loss"]
    return call

  out = {}
  for kind in ("forward", "train"):
    call = (lambda k: fns[k]["forward"]) if kind == "forward" else train_call
    reps = max(1, math.ceil(args.min_time / timed(call("mhsa"), 1)))
    for name in names:
      timed(call(name), 1)
    base, pairs, times = [], {n: [] for n in names}, {n: [] for n in names}
    groups = [names[i:i + args.group] for i in range(0, len(names), args.group)]
    for _ in range(args.runs):
      prev = timed(call("mhsa"), reps)
      base.append(prev)
      for group in groups:
        measured = [(n, timed(call(n), reps)) for n in group]
        after = timed(call("mhsa"), reps)
        base.append(after)
        for n, t in measured:
          times[n].append(t)
          pairs[n].append(0.5 * (prev + after) / t)
        prev = after
    key = "images" if kind == "forward" else "train_images"
    out[kind] = dict(mhsa_img_s=fns["mhsa"][key] / statistics.median(base), reps=reps,
                     ratio={n: statistics.median(p) for n, p in pairs.items()},
                     ratio_range={n: (min(p), max(p)) for n, p in pairs.items()},
                     img_s={n: fns[n][key] / statistics.median(times[n]) for n in names})
    print(f"  timed {kind}: mhsa {out[kind]['mhsa_img_s']:.0f} img/s", flush=True)
  for r in results:
    n = r["mechanism"]
    for kind in ("forward", "train"):
      if n == "mhsa":
        r[f"{kind}_ratio"], r[f"{kind}_img_s"] = 1.0, out[kind]["mhsa_img_s"]
      elif n in out[kind]["ratio"]:
        r[f"{kind}_ratio"] = out[kind]["ratio"][n]
        r[f"{kind}_ratio_range"] = out[kind]["ratio_range"][n]
        r[f"{kind}_img_s"] = out[kind]["img_s"][n]
  return {k: dict(mhsa_img_s=v["mhsa_img_s"], reps=v["reps"]) for k, v in out.items()}


# ---------------------------------------------------------------------------- outputs
def fmt(v, spec=".2f"):
  return "-" if v is None else format(v, spec)


def markdown(res: dict) -> str:
  c, m = res["config"], res["meta"]
  task = c.get("task", "digits")
  lines = [f"# Attention zoo on the {task}", "",
           f"Model: digits ViT ({c['model']}), {c['steps']} steps at batch {c['batch']}, "
           f"{c['seeds']} seeds (mean +- std), lr {c['lr']}. jax {m['jax']} on {m['backend']}, "
           f"{m['cpus']} CPUs; load average {m['loadavg_start'][0]:.1f} at the start, "
           f"{m['loadavg_end'][0]:.1f} at the end; wall time {m['wall_s'] / 60:.1f} min.",
           "Throughput: relative to `mhsa` in the same run (forward: the test set through "
           f"{c['seeds']} vmapped models; train: one vmapped step of {c['seeds']} models). FLOPs per "
           "image: analytic (2 x MACs) where a formula exists, else XLA cost analysis; "
           "`XLA/analytic` is the cross-check.", ""]
  if task != "digits":
    lines += [f"Task {task}: each 8x8 digit upsampled x{TASKS[task]} by pixel repetition; Tier S "
              "settings: " + ", ".join(f"`{k}` {v}" for k, v in c["options"].items()
                                        if k in c["mechanisms"]) + ".", ""]
  if "merged" in res:
    mm = res["merged"]["meta"]
    lines += [f"This run trained {', '.join(c['mechanisms'])}; the other rows come from an earlier "
              f"run with the same budget (load average {mm['loadavg_start'][0]:.1f} at its start, "
              f"wall time {mm['wall_s'] / 60:.1f} min). Each throughput ratio is against the mhsa "
              "of its own run.", ""]
  lines += ["| mechanism | tier | params | MFLOPs | source | XLA MFLOPs | XLA/analytic | "
            "fwd ratio | train ratio | top-1 (%) |", "|---|---|---|---|---|---|---|---|---|---|"]
  for r in res["rows"]:
    if "error" in r:
      lines.append(f"| `{r['mechanism']}` | {r.get('tier', '')} | error: {r['error'][:80]} "
                   "| | | | | | | |")
      continue
    flops = r["mflops_analytic"] if r["mflops_analytic"] else r["mflops_xla"]
    lines.append(
        f"| `{r['mechanism']}` | {r['tier']} | {r['params']:,} | {flops:.2f} | "
        f"{r['flops_source']} | {r['mflops_xla']:.2f} | {fmt(r['xla_over_analytic'])} | "
        f"{fmt(r.get('forward_ratio'))}x | {fmt(r.get('train_ratio'))}x | "
        f"{r['top1_mean'] * 100:.1f} +- {r['top1_std'] * 100:.1f} |")
  return "\n".join(lines)


def plot(res: dict, path: str):
  rows = [r for r in res["rows"] if "error" not in r and r.get("train_ratio")]
  if not rows:
    return None
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(7.5, 5))
  for r in rows:
    colour = "tab:red" if r["mechanism"] == "mhsa" else (
        "tab:green" if r["tier"] == "S" else "tab:blue")
    ax.errorbar(r["train_ratio"], r["top1_mean"] * 100, yerr=r["top1_std"] * 100, fmt="o",
                color=colour, ms=4, capsize=2)
    ax.annotate(r["mechanism"], (r["train_ratio"], r["top1_mean"] * 100), fontsize=6,
                xytext=(3, 2), textcoords="offset points")
  ax.set_xlabel("train-step throughput relative to mhsa (same run)")
  ax.set_ylabel("test top-1 (%), mean +- std over seeds")
  ax.set_title("Attention zoo on the digits (blue: Tier G, green: Tier S, red: mhsa)", fontsize=9)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)
  return os.path.basename(path)


def stem(args) -> str:
  """Output file stem: the 8x8 task keeps the recorded names."""
  return "attention_zoo" if args.task == "digits" else f"attention_zoo_{args.task}"


def save(args, res: dict):
  res["plot"] = plot(res, os.path.join(args.out_dir, f"{stem(args)}.png"))
  with open(os.path.join(args.out_dir, f"{stem(args)}.json"), "w") as f:
    json.dump(res, f, indent=1, default=float)
  text = markdown(res)
  with open(os.path.join(args.out_dir, f"{stem(args)}.md"), "w") as f:
    f.write(text + "\n")
  return text


def load_earlier(args, res: dict) -> dict:
  """The attention_zoo.json of an earlier run in --out_dir; its budget must be this run's."""
  path = os.path.join(args.out_dir, f"{stem(args)}.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"--merge: no earlier {path} to add this run to")
  with open(path) as f:
    old = json.load(f)
  keys = ("steps", "batch", "seeds", "lr", "warmup")
  if any(old["config"][k] != res["config"][k] for k in keys):
    raise ValueError(f"--merge: {path} has another budget "
                     f"{ {k: old['config'][k] for k in keys} }; this run has "
                     f"{ {k: res['config'][k] for k in keys} }")
  return old


def merged(res: dict, earlier) -> dict:
  """This run's rows plus the earlier run's rows of the mechanisms not run now (if any); each
  row's throughput ratio stays against the mhsa of its own run."""
  if earlier is None:
    return res
  now = {r["mechanism"] for r in res["rows"]}
  kept = [r for r in earlier["rows"] if r["mechanism"] not in now]
  rows = sorted(res["rows"] + kept, key=lambda r: (r["mechanism"] != "mhsa", r["mechanism"]))
  return dict(res, rows=rows, merged=dict(mechanisms=[r["mechanism"] for r in kept],
                                          meta=earlier["meta"], timing=earlier.get("timing")))


# ---------------------------------------------------------------------------- main
def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  p.add_argument("--mechanisms", default="all",
                 help="comma-separated names, 'all', or 'spatial' (mhsa and every Tier S one)")
  p.add_argument("--task", default="digits", choices=sorted(TASKS),
                 help="digits: 8x8; digits16: upsampled to 16x16 for the Tier S study")
  p.add_argument("--steps", type=int, default=200)
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--seeds", type=int, default=3)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--warmup", type=int, default=None, help="default: steps // 10")
  p.add_argument("--lr", type=float, default=None, help="default: the digits config's (1e-3)")
  p.add_argument("--runs", type=int, default=5, help="timed rounds")
  p.add_argument("--group", type=int, default=3, help="mechanisms timed between two mhsa timings")
  p.add_argument("--min_time", type=float, default=0.3, help="seconds per timing at least")
  p.add_argument("--data_dir", default=None)
  p.add_argument("--out_dir", default=os.path.join(ROOT, "experiments", "results"))
  p.add_argument("--cache_dir", default=os.path.join("/tmp", "vitjax_jax_cache"),
                 help="persistent compilation cache ('' for none)")
  p.add_argument("--smoke", action="store_true", help="tiny model and budget (tests)")
  p.add_argument("--merge", action="store_true",
                 help="keep the other mechanisms' rows of the attention_zoo.json in --out_dir")
  args = p.parse_args(argv)
  if args.smoke:
    args.steps, args.batch, args.seeds = min(args.steps, 3), min(args.batch, 16), 2
    args.runs, args.min_time = min(args.runs, 2), 0.0
  if args.warmup is None:
    args.warmup = args.steps // 10
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  if args.cache_dir:
    jax.config.update("jax_compilation_cache_dir", args.cache_dir)
  os.makedirs(args.out_dir, exist_ok=True)
  if args.mechanisms in ("all", "spatial"):
    names = [n for n in attention.names()
             if args.mechanisms == "all" or attention.get(n).tier == "S"]
  else:
    names = args.mechanisms.split(",")
  unknown = sorted(set(names) - set(attention.names()))
  if unknown:
    raise ValueError(f"unknown attention(s) {unknown}; registered: {attention.names()}")
  names = ["mhsa"] + [n for n in names if n != "mhsa"]  # the reference first
  t0 = time.time()
  config = digits_config(args)
  factor = TASKS[args.task]
  train, test = load_split(config, "train", factor), load_split(config, "test", factor)
  res = dict(config=dict(model=f"depth {config.model.depth}, width {config.model.width}, "
                               f"{config.model.num_heads} heads, {config.model.variant}",
                         task=args.task, options=SPATIAL_OPTIONS if factor > 1 else {},
                         steps=args.steps, batch=args.batch, seeds=args.seeds,
                         lr=config.optimizer.lr, warmup=args.warmup, mechanisms=names),
             meta=dict(jax=jax.__version__, backend=jax.default_backend(), cpus=os.cpu_count(),
                       loadavg_start=os.getloadavg(), loadavg_end=os.getloadavg(), wall_s=0.0),
             rows=[])
  earlier = load_earlier(args, res) if args.merge else None
  fns = {}
  for name in names:
    try:
      row, fns[name] = run_mechanism(name, args, config, train, test)
    except Exception as e:  # pylint: disable=broad-except  (one broken mechanism, not the study)
      traceback.print_exc()
      row = dict(mechanism=name, tier=attention.get(name).tier, error=f"{type(e).__name__}: {e}")
    res["rows"].append(row)
    if "error" not in row:
      print(f"  {name}: top-1 {row['top1_mean']:.4f} +- {row['top1_std']:.4f}, "
            f"{row['params']:,} params, {row['step_s']:.2f} s/step, compile {row['compile_s']:.0f}s",
            flush=True)
    res["meta"].update(loadavg_end=os.getloadavg(), wall_s=time.time() - t0)
    save(args, merged(res, earlier))
  print("timing (interleaved with mhsa)", flush=True)
  res["timing"] = time_all(args, res["rows"], fns)
  res["meta"].update(loadavg_end=os.getloadavg(), wall_s=time.time() - t0)
  print(save(args, merged(res, earlier)), flush=True)
  return res


if __name__ == "__main__":
  main()
