r"""Token reduction study: speed on DeiT-S shapes, accuracy on the embedded digits.

  python experiments/token_reduction.py --mode=speed --batch=64,1 --methods=evit,topk,tome
  python experiments/token_reduction.py --mode=accuracy
  python experiments/token_reduction.py --smoke --out_dir=/tmp/tr     # tiny, for the tests

Speed: ViT-S/16 at 224 (DeiT-S shapes, random weights; fp32 on CPU, bf16 on accelerators, see
--dtype). Every configuration is compiled ahead of time and warmed up; then, per round, the
unreduced model and the methods are timed alternately (baseline, methods of one group, baseline,
...), each method against the mean of the two baseline timings around it. The speed ratio is the
median over rounds of those paired ratios, so that a machine whose load changes hits both alike.
GMACs are analytic (`vitjax.tokens.macs.model_macs`, head excluded as in the EViT table).

Accuracy ("Which Tokens to Use?" at small scale): the default digits ViT (configs/default.py,
with a [CLS] token and 1-pixel crop shifts, as the recorded results) is trained, then fine-tuned
with each method and keep rate for a fixed budget (new parameters start from their init) and
evaluated on the 360 test digits. The unreduced model fine-tuned for the same budget is the
control. Parameter-free methods are also evaluated off the shelf (no fine-tuning).

Keep rates follow the cumulative definition (tokens after stage s: floor(N0 kr^s)) at the quarter
blocks (3, 6, 9 of 12; 1, 2, 3 of 4), except EViT (its own relative definition, with the fused
token) and ToMe / MCTF on DeiT-S, which run at r = 8 / 13 / 16 per block in the rows of keep rate
0.9 / 0.7 / 0.5 (the ToMe README's DeiT-S settings). Outputs (in --out_dir): token_reduction.json
(merged with an earlier file, so speed and accuracy may run separately, and a rerun of some
methods replaces their rows of a study with the same budget), token_reduction.md, a Pareto plot
and the EViT stage visualisation.
"""
import argparse
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

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from vitjax import models, tokens  # noqa: E402
from vitjax.tokens import macs, visualize  # noqa: E402

TOME_R = {0.9: 8, 0.7: 13, 0.5: 16}   # ToMe README, DeiT-S; MCTF at the same r
TARGETS = {("evit", 0.7): 1.45, ("evit", 0.5): 1.85, ("tome", 0.7): 1.6}  # speed ratio, batch 64
PAPER = {("evit", 0.7): "1.50x (MACs 1.52x)", ("evit", 0.5): "1.85x (MACs 1.99x)",
         ("tome", 0.7): "1.67x (V100)", ("tome", 0.5): "MACs 2.01x", ("tome", 0.9): "MACs 1.35x",
         ("mctf", 0.5): "MACs 1.77x", ("dynamicvit", 0.7): "FLOPs 1.59x"}
SMOKE_MODEL = dict(variant="Ti/4", width=32, depth=4, num_heads=2, mlp_dim=64)
DEFAULT_K_NEIGHBORS = 5  # dpcknn


# ---------------------------------------------------------------------------- method settings
def stage_locations(depth: int) -> tuple:
  """The quarter blocks: (3, 6, 9) for 12 blocks (DynamicViT, EViT, Haurum), (1, 2, 3) for 4."""
  return tuple(sorted({max(1, depth * s // 4) for s in (1, 2, 3)}))


def method_spec(name: str, kr: float, *, depth: int, num_patches: int, per_block_r: bool):
  """(tokens spec, label) of `name` at keep rate `kr`: the method's sensible default setting."""
  locs = stage_locations(depth)
  if name in ("tome", "mctf") and per_block_r and kr in TOME_R:
    return dict(name=name, r=TOME_R[kr]), f"r={TOME_R[kr]}"
  if name == "tome":
    return dict(name=name, keep_rate=kr, locations=locs), f"kr={kr}"
  if name == "mctf":
    # remove about as many tokens as the cumulative keep rate's first stage, at every location
    r = max(1, round(num_patches * (1.0 - kr) / len(locs)))
    return dict(name=name, r=r, locations=locs), f"r={r}"
  if name == "tokenlearner_v1":  # needs the token grid: one location only
    return dict(name=name, keep_rate=kr, locations=locs[:1]), f"kr={kr}"
  spec = dict(name=name, keep_rate=kr, locations=locs)
  if name == "dpcknn":
    # k nearest neighbours must not exceed the tokens entering the last stage (small models)
    counts = [int(num_patches * kr ** (s + 1)) for s in range(len(locs))]
    spec["k_neighbors"] = min(DEFAULT_K_NEIGHBORS, num_patches, *counts[:-1])
  return spec, f"kr={kr}"


def stage_tokens(counts) -> str:
  """Tokens (prefix included) after each change of count, e.g. '197>140>100>72'."""
  seq = [counts[0].n_in]
  for c in counts:
    if c.n_mlp != seq[-1]:
      seq.append(c.n_mlp)
  if len(seq) > 6:
    return f"{seq[0]}>{seq[1]}>{seq[2]}>...>{seq[-1]} ({len(seq) - 1} steps)"
  return ">".join(str(n) for n in seq)


def param_count(model, image_shape) -> int:
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *image_shape))))
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes["params"]))


def method_list(arg: str) -> list:
  names = [n for n in tokens.names() if n != "none"] if arg == "all" else arg.split(",")
  unknown = sorted(set(names) - set(tokens.names()))
  if unknown:
    raise ValueError(f"unknown token reducer(s) {unknown}; registered: {tokens.names()}")
  return names


# ---------------------------------------------------------------------------- speed
def timed(fn, reps: int) -> float:
  """Seconds per call of `fn`, `reps` calls back to back."""
  t = time.perf_counter()
  for _ in range(reps):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - t) / reps


def build_speed_model(args, spec, dtype):
  cfg = dict(SMOKE_MODEL) if args.smoke else dict(variant=args.variant)
  return models.build(dict(cfg, tokens=spec), num_classes=1000, image_size=args.image_size,
                      dtype=dtype)


def compile_forward(model, x, base_params, base_struct):
  """(compiled forward, params, seconds to compile): parameter-free methods reuse the baseline's."""
  init = lambda: model.init(jax.random.PRNGKey(1), x[:1])["params"]
  struct = jax.tree_util.tree_structure(jax.eval_shape(init))
  params = base_params if struct == base_struct else jax.jit(init)()
  t = time.perf_counter()
  fwd = jax.jit(lambda p, x: model.apply({"params": p}, x)[0]).lower(params, x).compile()
  return fwd, params, time.perf_counter() - t


def speed_table(args, batch: int, methods: list, rates: list, dtype: str) -> dict:
  """Compiles the baseline and every (method, rate), then times them interleaved in rounds."""
  print(f"\n== speed, batch {batch}, {dtype}: compiling", flush=True)
  load_start = os.getloadavg()
  x = jax.random.normal(jax.random.PRNGKey(0), (batch, args.image_size, args.image_size, 3))
  base = build_speed_model(args, dict(name="none"), dtype)
  base_params = jax.jit(lambda: base.init(jax.random.PRNGKey(1), x[:1])["params"])()
  base_struct = jax.tree_util.tree_structure(base_params)
  base_fwd, _, base_compile = compile_forward(base, x, base_params, base_struct)
  base_macs = macs.model_macs(base)
  configs = []
  for name in methods:
    for kr in rates:
      spec, label = method_spec(name, kr, depth=base.depth, num_patches=base.grid[0] * base.grid[1],
                                per_block_r=not args.smoke)
      model = build_speed_model(args, spec, dtype)
      fwd, params, secs = compile_forward(model, x, base_params, base_struct)
      counts = macs.block_counts(model)
      configs.append(dict(method=name, keep_rate=kr, setting=label, spec=spec, fn=fwd,
                          params=params, compile_s=secs, macs=macs.model_macs(model),
                          tokens=stage_tokens(counts), times=[], pairs=[]))
      print(f"  {name} {label}: compiled in {secs:.1f}s, tokens {configs[-1]['tokens']}",
            flush=True)
  base_call = lambda: base_fwd(base_params, x)
  warm = timed(base_call, 1)  # warm-up, and the length of one call
  reps = max(1, math.ceil(args.min_time / warm))
  for c in configs:
    timed(lambda c=c: c["fn"](c["params"], x), reps)
  base_times = []
  groups = [configs[i:i + args.group] for i in range(0, len(configs), args.group)]
  for r in range(args.runs):
    prev = timed(base_call, reps)
    base_times.append(prev)
    for group in groups:
      measured = [(c, timed(lambda c=c: c["fn"](c["params"], x), reps)) for c in group]
      after = timed(base_call, reps)
      base_times.append(after)
      for c, t in measured:  # each method against the two baseline timings around its group
        c["times"].append(t)
        c["pairs"].append(0.5 * (prev + after) / t)
      prev = after
    print(f"  round {r + 1}/{args.runs}: baseline {batch / base_times[-1]:.1f} img/s, load "
          f"{os.getloadavg()[0]:.1f}", flush=True)
  base_img_s = batch / statistics.median(base_times)
  run = dict(started=time.strftime("%Y-%m-%d %H:%M:%S"), loadavg_start=load_start,
             loadavg_end=os.getloadavg(), baseline_img_s=base_img_s)
  rows = []
  for c in configs:
    key = (c["method"], c["keep_rate"])
    ratio = statistics.median(c["pairs"])
    target = TARGETS.get(key) if (batch == 64 and not args.smoke) else None
    rows.append(dict(
        method=c["method"], keep_rate=c["keep_rate"], setting=c["setting"], spec=c["spec"],
        tokens=c["tokens"], gmacs=c["macs"] / 1e9, mac_ratio=base_macs / c["macs"],
        img_s=batch / statistics.median(c["times"]), speed_ratio=ratio,
        ratio_min=min(c["pairs"]), ratio_max=max(c["pairs"]), compile_s=c["compile_s"],
        target=target, meets_target=None if target is None else bool(ratio >= target),
        paper=PAPER.get(key, ""), run=run))
  return dict(batch=batch, dtype=dtype, runs=args.runs, reps_per_timing=reps, group=args.group,
              baseline=dict(gmacs=base_macs / 1e9, img_s=base_img_s, compile_s=base_compile,
                            tokens=stage_tokens(macs.block_counts(base))),
              rows=rows, loadavg_start=load_start, loadavg_end=os.getloadavg())


# ---------------------------------------------------------------------------- accuracy
def digits_config(args):
  path = os.path.join(ROOT, "configs", "default.py")
  spec = importlib.util.spec_from_file_location("vitjax_default_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.data.data_dir = args.data_dir
  config.model.class_token = True  # the [CLS] row ranks patches for EViT, Top-K, ATS, ...
  config.data.pp_train = "random_crop(8, pad=1)|value_range(-1, 1)"  # as the recorded results
  if args.smoke:  # depth 4 stays (three reduction stages); narrower
    config.model.update(width=32, num_heads=2, mlp_dim=64)
  return config


def graft(fresh, trained):
  """`fresh` params with every leaf that `trained` has (same path and shape) copied over.
  Returns (params, number of parameters that start from their init)."""
  flat_f = flax.traverse_util.flatten_dict(flax.core.unfreeze(fresh))
  flat_t = flax.traverse_util.flatten_dict(flax.core.unfreeze(trained))
  out, new = {}, 0
  for k, v in flat_f.items():
    if k in flat_t and flat_t[k].shape == v.shape:
      out[k] = flat_t[k]
    else:
      out[k], new = v, new + int(np.prod(v.shape))
  return flax.traverse_util.unflatten_dict(out), new


class Digits:
  """Training and evaluation of digits ViTs with the trainer's step functions."""

  def __init__(self, config):
    from vitjax import data  # pylint: disable=import-outside-toplevel  (tfds/grain are heavy)
    from vitjax.train import optim, trainer  # pylint: disable=import-outside-toplevel
    self.data, self.optim, self.trainer, self.config = data, optim, trainer, config
    self.info = data.get_info(config.data)
    self.eval_batches = list(data.make_eval_batches(config.data,
                                                    global_batch_size=config.batch_size))
    self.eval_steps = {}

  def model(self, spec, track_source=False):
    cfg = self.config.copy_and_resolve_references()
    cfg.model.tokens = spec
    cfg.model.track_source = track_source
    return self.trainer.build_model(cfg, self.info)

  def train(self, model, init_params=None, *, steps: int, lr: float, warmup: int, seed: int = 0):
    """-> (params, new parameter count, seconds). init_params: grafted onto a fresh init."""
    opt = self.config.optimizer.copy_and_resolve_references()
    opt.lr = lr
    tx, _ = self.optim.make_optimizer(opt, steps, warmup)
    params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, *self.info.image_shape)))["params"]
    new = param_count_tree(params)
    if init_params is not None:
      params, new = graft(params, init_params)
      params = jax.tree_util.tree_map(jnp.array, params)  # a copy: the step donates its state
    state = self.trainer.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                    opt_state=tx.init(params), rng=jax.random.PRNGKey(seed + 1))
    step = jax.jit(self.trainer.make_train_step(model, tx, self.config), donate_argnums=(0,))
    batches = iter(self.data.make_train_loader(self.config.data,
                                               global_batch_size=self.config.batch_size, seed=seed))
    t = time.perf_counter()
    for _ in range(steps):
      state, metrics = step(state, next(batches))
    loss = float(metrics["train/loss"])
    if not math.isfinite(loss):
      raise FloatingPointError(f"non-finite training loss {loss}")
    return state.params, new, time.perf_counter() - t

  def top1(self, model, params) -> float:
    key = repr(model)  # one compiled evaluation per model
    if key not in self.eval_steps:
      self.eval_steps[key] = jax.jit(self.trainer.make_eval_step(model))
    step = self.eval_steps[key]
    correct = count = 0.0
    for b in self.eval_batches:
      out = jax.device_get(step(params, b))
      correct, count = correct + float(out["top1"]), count + float(out["count"])
    return correct / count


def param_count_tree(params) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))


def accuracy_study(args, methods: list, rates: list, on_update) -> dict:
  config = digits_config(args)
  d = Digits(config)
  base_model = d.model(dict(name="none"))
  channels = d.info.image_shape[-1]
  base_macs = macs.model_macs(base_model, channels)
  print(f"\n== accuracy: baseline, {args.baseline_steps} steps", flush=True)
  base_params, _, secs = d.train(base_model, steps=args.baseline_steps, lr=config.optimizer.lr,
                                 warmup=config.warmup_steps)
  res = dict(config=dict(model=config.model.to_dict(), batch_size=config.batch_size,
                         baseline_steps=args.baseline_steps, finetune_steps=args.finetune_steps,
                         finetune_lr=args.lr, finetune_warmup=args.warmup,
                         locations=list(stage_locations(base_model.depth))),
             baseline=dict(top1=d.top1(base_model, base_params), train_s=secs,
                           params=param_count_tree(base_params), gmacs=base_macs / 1e9,
                           tokens=stage_tokens(macs.block_counts(base_model, channels))),
             rows=[], loadavg_start=os.getloadavg())
  print(f"  baseline top-1 {res['baseline']['top1']:.4f} ({secs:.0f}s)", flush=True)
  ft = dict(steps=args.finetune_steps, lr=args.lr, warmup=args.warmup)
  control, _, secs = d.train(base_model, base_params, **ft)
  res["control"] = dict(top1=d.top1(base_model, control), train_s=secs)
  print(f"  control (unreduced, fine-tuned) top-1 {res['control']['top1']:.4f}", flush=True)
  on_update(res)
  kept = {}
  for name in methods:
    for kr in rates:
      spec, label = method_spec(name, kr, depth=base_model.depth,
                                num_patches=base_model.grid[0] * base_model.grid[1],
                                per_block_r=False)
      if name == "dynamicvit":
        # With 16 patches, Gumbel sampling drops every token of some images (the predictor's
        # global mean is then 0/0 = NaN); the top-k decision as a training mask never does.
        spec["train_decision"] = "topk"
      try:
        row = finetune_row(d, res, spec, label, name, kr, base_params, base_macs, kept, ft)
      except Exception as e:  # pylint: disable=broad-except  (one broken method, not the study)
        traceback.print_exc()
        row = dict(method=name, keep_rate=kr, setting=label, spec=spec,
                   error=f"{type(e).__name__}: {e}")
        res["rows"].append(row)
        on_update(res)
        continue
      res["rows"].append(row)
      ots = row["off_the_shelf"]
      print(f"  {name} {label}: tokens {row['tokens']}, off-the-shelf "
            f"{'-' if ots is None else f'{ots:.4f}'}, fine-tuned {row['finetuned']:.4f}",
            flush=True)
      on_update(res)
  res["loadavg_end"] = os.getloadavg()
  res["visualisation"] = evit_figure(args, d, base_model, kept, rates)
  on_update(res)
  return res


def finetune_row(d, res, spec, label, name, kr, base_params, base_macs, kept, ft) -> dict:
  """Off-the-shelf (parameter-free methods) and fine-tuned top-1 of one method and keep rate."""
  channels = d.info.image_shape[-1]
  model = d.model(spec)
  counts = macs.block_counts(model, channels)
  row = dict(method=name, keep_rate=kr, setting=label, spec=spec, tokens=stage_tokens(counts),
             mac_ratio=base_macs / macs.model_macs(model, channels))
  if all(p is None for p in model.stage().plan().blocks):
    # e.g. EViT at 0.9 on 16 patches: ceil(0.9 n) + 1 = n at every stage, nothing changes
    row.update(noop=True, off_the_shelf=res["baseline"]["top1"],
               finetuned=res["control"]["top1"], new_params=0)
  else:
    fresh = param_count(model, d.info.image_shape) - res["baseline"]["params"]
    row["off_the_shelf"] = d.top1(model, base_params) if fresh == 0 else None
    params, new, secs = d.train(model, base_params, **ft)
    row.update(noop=False, finetuned=d.top1(model, params), new_params=new, train_s=secs)
    kept[(name, kr)] = params
  row["delta_vs_control"] = row["finetuned"] - res["control"]["top1"]
  return row


def evit_figure(args, d, base_model, kept: dict, rates: list):
  """Which patches EViT kept / fused at each stage, on a few test digits (fine-tuned weights)."""
  avail = [kr for kr in sorted(rates) if ("evit", kr) in kept]
  if not avail:
    return None
  kr = avail[0]
  grid = base_model.grid
  spec, _ = method_spec("evit", kr, depth=base_model.depth, num_patches=grid[0] * grid[1],
                        per_block_r=False)
  model = d.model(spec, track_source=True)
  batch = d.eval_batches[0]
  _, out = jax.jit(lambda p, x: model.apply({"params": p}, x))(kept[("evit", kr)],
                                                               batch["image"][:args.num_vis])
  raw = np.round((np.asarray(batch["image"][:args.num_vis]) + 1.0) * 127.5)  # back to 0..255
  path = os.path.join(args.out_dir, "token_reduction_evit_stages.png")
  draw_stages(out, raw, model, path, f"EViT kr={kr} on the test digits (fine-tuned)")
  return dict(path=os.path.basename(path), keep_rate=kr, images=int(raw.shape[0]))


def draw_stages(out, images, model, path: str, title: str):
  """One row per image: the input, then each reduction stage (vitjax.tokens.visualize)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  n = images.shape[0]
  stages0 = visualize.stage_sources(out, 0)
  fig, axes = plt.subplots(n, len(stages0) + 1, figsize=(1.5 * (len(stages0) + 1), 1.5 * n + 0.4),
                           squeeze=False)
  for i in range(n):
    rgb = np.repeat(images[i], 3, axis=-1) if images.shape[-1] == 1 else images[i]
    axes[i, 0].imshow(rgb / 255.0, interpolation="nearest")
    for j, (block, source) in enumerate(visualize.stage_sources(out, i), start=1):
      status, holder = visualize.patch_status(source, model.num_prefix, fused_index=-1)
      axes[i, j].imshow(visualize.render(rgb, status, holder, model.patch_size, model.grid),
                        interpolation="nearest")
      if i == 0:
        kept = int((status == visualize.KEPT).sum())
        axes[i, j].set_title(f"block {block + 1}: {kept} kept", fontsize=7)
  for ax in axes.ravel():
    ax.axis("off")
  fig.suptitle(title + "\nred: fused into the EViT token; other tints: held by an earlier fused "
               "token; untinted: kept", fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=70)
  plt.close(fig)


# ---------------------------------------------------------------------------- outputs
def merge_results(path: str, new: dict) -> dict:
  """Speed tables are replaced per (batch, method, keep rate); accuracy as a whole."""
  old = {}
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
  out = dict(old)
  out["meta"] = new["meta"]
  speed = dict(old.get("speed", {}))
  for batch, table in new.get("speed", {}).items():
    prev = speed.get(batch)
    if prev and prev.get("dtype") == table["dtype"]:
      fresh = {(r["method"], r["keep_rate"]) for r in table["rows"]}
      table = dict(table, rows=[r for r in prev["rows"] if (r["method"], r["keep_rate"]) not in fresh]
                   + table["rows"])
    speed[batch] = table
  if speed:
    out["speed"] = speed
  if "accuracy" in new:
    out["accuracy"] = merge_accuracy(old.get("accuracy"), new["accuracy"])
  return out


def merge_accuracy(old, new: dict) -> dict:
  """A rerun of some methods replaces their rows in an earlier study of the same budget; every
  row keeps the baseline top-1 of the run that produced it."""
  for row in new["rows"]:
    row.setdefault("baseline_top1", new["baseline"]["top1"])
  if not old or old.get("config") != new["config"]:
    return new
  fresh = {(r["method"], r["keep_rate"]) for r in new["rows"]}
  kept = [dict(r, baseline_top1=r.get("baseline_top1", old["baseline"]["top1"]))
          for r in old["rows"] if (r["method"], r["keep_rate"]) not in fresh]
  return dict(new, rows=kept + new["rows"])


def fmt(v, spec=".2f", none="-"):
  return none if v is None else format(v, spec)


def speed_markdown(table: dict) -> str:
  b = table["baseline"]
  runs = sorted({(r["run"]["started"], r["run"]["loadavg_start"][0], r["run"]["loadavg_end"][0],
                  r["run"]["baseline_img_s"]) for r in table["rows"]})
  runs = "; ".join(f"{s}: load {a:.1f} -> {e:.1f}, baseline {v:.2f} img/s" for s, a, e, v in runs)
  lines = [f"### Speed, batch {table['batch']} ({table['dtype']}; {table['runs']} rounds x "
           f"{table['reps_per_timing']} call(s), groups of {table['group']})", "",
           f"Unreduced: {b['gmacs']:.3g} GMACs. Each ratio is against the baseline timed in its own "
           f"run ({runs}).", "",
           "| method | setting | tokens | GMACs | MAC ratio | img/s | speed ratio | "
           "ratio range | target | paper |", "|---|---|---|---|---|---|---|---|---|---|"]
  for r in sorted(table["rows"], key=lambda r: (r["method"], -r["keep_rate"])):
    target = "" if r["target"] is None else (
        f">= {r['target']:.2f} {'met' if r['meets_target'] else 'MISSED'}")
    lines.append(f"| `{r['method']}` | {r['setting']} | {r['tokens']} | {r['gmacs']:.3g} | "
                 f"{r['mac_ratio']:.2f}x | {r['img_s']:.2f} | **{r['speed_ratio']:.2f}x** | "
                 f"{r['ratio_min']:.2f}-{r['ratio_max']:.2f} | {target} | {r['paper']} |")
  return "\n".join(lines)


def accuracy_markdown(acc: dict) -> str:
  c = acc["config"]
  lines = [f"### Accuracy on the digits (360 test images; baseline {c['baseline_steps']} steps, "
           f"fine-tune {c['finetune_steps']} steps at lr {c['finetune_lr']}, locations "
           f"{tuple(c['locations'])})", "",
           f"Baseline top-1 {acc['baseline']['top1']:.4f}; control (unreduced, fine-tuned for the "
           f"same budget) {acc.get('control', {}).get('top1', float('nan')):.4f}. Tokens include "
           "[CLS] (and EViT's fused token).", "",
           "| method | setting | tokens | MAC ratio (digits) | new params | off-the-shelf | "
           "fine-tuned | vs control |", "|---|---|---|---|---|---|---|---|"]
  for r in acc["rows"]:
    if "error" in r:
      lines.append(f"| `{r['method']}` | {r['setting']} | error: {r['error'][:90]} | | | | | |")
      continue
    note = " (no-op)" if r.get("noop") else ""
    if r.get("baseline_top1", acc["baseline"]["top1"]) != acc["baseline"]["top1"]:
      note += f" (its run's baseline {r['baseline_top1']:.4f})"
    lines.append(f"| `{r['method']}` | {r['setting']}{note} | {r['tokens']} | "
                 f"{r['mac_ratio']:.2f}x | {r['new_params']:,} | {fmt(r['off_the_shelf'], '.4f')} | "
                 f"{r['finetuned']:.4f} | {r['delta_vs_control'] * 100:+.1f} pt |")
  return "\n".join(lines)


def write_markdown(results: dict, path: str) -> str:
  m = results["meta"]
  parts = ["# Token reduction study", "",
           f"jax {m['jax']} on {m['backend']} ({m['device']}), {m['cpus']} CPUs; load average "
           f"at the last write: {m['loadavg'][0]:.2f} / {m['loadavg'][1]:.2f} / "
           f"{m['loadavg'][2]:.2f}. Speed: {m['speed_model']}. Ratios are within one run.", ""]
  for batch in sorted(results.get("speed", {}), key=lambda b: -int(b)):
    parts += [speed_markdown(results["speed"][batch]), ""]
  if "accuracy" in results:
    parts += [accuracy_markdown(results["accuracy"]), ""]
  text = "\n".join(parts)
  with open(path, "w") as f:
    f.write(text)
  return text


def pareto_plot(results: dict, path: str):
  """Digits top-1 (fine-tuned) against the DeiT-S speed ratio (batch 64) and MAC ratio."""
  acc = results.get("accuracy")
  if not acc or not acc["rows"]:
    return None
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  speed = results.get("speed", {})
  table = speed.get("64") or (speed[max(speed, key=int)] if speed else None)
  measured = {(r["method"], r["keep_rate"]): r for r in (table["rows"] if table else [])}
  fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
  names = sorted({r["method"] for r in acc["rows"]})
  cmap = plt.get_cmap("tab20")
  base = acc.get("control", acc["baseline"])["top1"] * 100
  for ax, key, label in ((axes[0], "speed_ratio", "measured speed ratio, DeiT-S"),
                         (axes[1], "mac_ratio", "MAC ratio, DeiT-S")):
    ax.scatter([1.0], [base], c="k", marker="*", s=80, label="unreduced (control)")
    for i, name in enumerate(names):
      pts = [(measured[(name, r["keep_rate"])][key], r["finetuned"] * 100) for r in acc["rows"]
             if r["method"] == name and (name, r["keep_rate"]) in measured and "error" not in r]
      if pts:
        pts.sort()
        ax.plot(*zip(*pts), "o-", color=cmap(i), label=name, ms=4)
    ax.set_xlabel(f"{label} (batch {table['batch'] if table else '-'})")
    ax.set_ylabel("digits top-1 (%), fine-tuned")
    ax.grid(alpha=0.3)
  axes[1].legend(fontsize=6, ncol=2)
  fig.suptitle("Token reduction: accuracy (digits ViT) vs speed (DeiT-S shapes), keep rates "
               "0.9/0.7/0.5", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=70)
  plt.close(fig)
  return os.path.basename(path)


def save(args, part: dict) -> dict:
  meta = dict(jax=jax.__version__, backend=jax.default_backend(),
              device=str(jax.devices()[0].device_kind), cpus=os.cpu_count(),
              loadavg=os.getloadavg(), smoke=args.smoke,
              speed_model=("tiny smoke ViT" if args.smoke else
                           f"ViT-{args.variant} at {args.image_size}, random weights"))
  path = os.path.join(args.out_dir, "token_reduction.json")
  results = merge_results(path, dict(part, meta=meta))
  results["pareto_plot"] = pareto_plot(results, os.path.join(args.out_dir,
                                                             "token_reduction_pareto.png"))
  with open(path, "w") as f:
    json.dump(results, f, indent=1, default=float)
  write_markdown(results, os.path.join(args.out_dir, "token_reduction.md"))
  return results


# ---------------------------------------------------------------------------- main
def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  p.add_argument("--mode", default="all", choices=("all", "speed", "accuracy"))
  p.add_argument("--methods", default="all", help="comma-separated reducers, or 'all'")
  p.add_argument("--accuracy_methods", default=None, help="default: --methods")
  p.add_argument("--rates", default="0.9,0.7,0.5")
  p.add_argument("--batch", default="64,1", help="comma-separated batch sizes for the speed table")
  p.add_argument("--runs", type=int, default=3, help="timed rounds")
  p.add_argument("--group", type=int, default=3, help="methods timed between two baselines")
  p.add_argument("--min_time", type=float, default=0.5,
                 help="seconds per timing at least (short calls are repeated)")
  p.add_argument("--image_size", type=int, default=224)
  p.add_argument("--variant", default="S/16")
  p.add_argument("--dtype", default="auto", help="auto: float32 on CPU, bfloat16 on accelerators")
  p.add_argument("--baseline_steps", type=int, default=1500)
  p.add_argument("--finetune_steps", type=int, default=200)
  p.add_argument("--lr", type=float, default=2e-4)
  p.add_argument("--warmup", type=int, default=20)
  p.add_argument("--num_vis", type=int, default=4, help="digits in the EViT figure")
  p.add_argument("--data_dir", default=None, help="tfds data dir (the digits build there)")
  p.add_argument("--out_dir", default=os.path.join(ROOT, "experiments", "results"))
  p.add_argument("--cache_dir", default=os.path.join("/tmp", "vitjax_jax_cache"),
                 help="persistent compilation cache ('' for none)")
  p.add_argument("--smoke", action="store_true", help="tiny models and budgets (tests)")
  args = p.parse_args(argv)
  if args.smoke:
    args.image_size, args.runs, args.min_time = 32, min(args.runs, 2), 0.0
    args.baseline_steps, args.finetune_steps, args.warmup = 3, 2, 1
    args.num_vis = 2
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  os.makedirs(args.out_dir, exist_ok=True)
  if args.cache_dir:
    jax.config.update("jax_compilation_cache_dir", args.cache_dir)
  rates = [float(r) for r in args.rates.split(",")]
  methods = method_list(args.methods)
  dtype = args.dtype
  if dtype == "auto":
    dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
  results = {}
  if args.mode in ("all", "speed"):
    speed = {}
    for batch in [int(b) for b in args.batch.split(",")]:
      speed[str(batch)] = speed_table(args, batch, methods, rates, dtype)
      results = save(args, dict(speed=speed))
      print(speed_markdown(results["speed"][str(batch)]), flush=True)
  if args.mode in ("all", "accuracy"):
    acc_methods = method_list(args.accuracy_methods or args.methods)
    acc = accuracy_study(args, acc_methods, rates, lambda acc: save(args, dict(accuracy=acc)))
    results = save(args, dict(accuracy=acc))
    print(accuracy_markdown(results["accuracy"]), flush=True)
  return results


if __name__ == "__main__":
  main()
