r"""Post-training quantization study on the embedded digits ViT, and the int8 path's speed.

  python experiments/quantization.py                      # the recorded study (about 25 min)
  python experiments/quantization.py --smoke --out_dir=/tmp/q   # tiny, for the tests

Accuracy: the digits ViT of configs/default.py (width 96, depth 4, 3 heads, 2x2 patches, with a
[CLS] token so that EViT can rank patches, average pooling) is trained for --steps with each
attention (--attentions), then quantized after training by every quantizer at W8A8 / W6A6 /
W4A4 (calibration: the first --calib training digits; patch embedding and head in float),
alone and with a parameter-free reducer put in off the shelf after block 1 of 4 (EViT keep rate
0.5; ToMe merging the same number of tokens). Top-1 on the 360 test digits. A quantizer with a
post-softmax part on a non-softmax attention runs with attention_weights="uniform" (marked *:
its other parts kept).
Kept-set overlap (EViT): the share of the float model's kept patches the quantized model keeps.

Speed: forward images/s of float32, fake-quant and the int8 Dense path (minmax W8A8), the digits
ViT at batch 360 and a ViT-Ti/16 at 224 (random weights) at --speed_batch, compiled and warmed up,
the three timed alternately over rounds (median). Outputs in --out_dir: quantization.json, .md,
.png.
"""
import argparse
import importlib.util
import json
import os
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from vitjax import models, quant  # noqa: E402
from vitjax.quant import base as qbase  # noqa: E402

BITS = ("W8A8", "W6A6", "W4A4")
REDUCERS = ("none", "evit", "tome")


def digits_config(args):
  spec = importlib.util.spec_from_file_location("vitjax_default_config",
                                                os.path.join(ROOT, "configs", "default.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("smoke=True" if args.smoke else None)
  # a [CLS] token for EViT to rank patches by, but average pooling as in configs/default.py: the
  # [CLS] token starts at zero, so its query and key are zero and ReLU attention (ReLU'(0) = 0)
  # passes no gradient through its row; with pool="cls" nothing upstream of the head trains
  config.model.class_token = True
  config.model.pool = "gap"
  return config


def reducer_spec(name: str, num_patches: int):
  if name == "none":
    return dict(name="none")
  if name == "evit":
    return dict(name="evit", keep_rate=0.5, locations=(1,))
  return dict(name="tome", keep_rate=0.5, locations=(1,))  # merges as many as EViT drops


def method_options(method: str, attention_kinds) -> tuple:
  if quant.get(method).needs_softmax and "softmax" not in attention_kinds:
    return dict(attention_weights="uniform"), "*"
  return {}, ""


def accuracy_study(args, on_update, between=None) -> dict:
  from vitjax import data  # pylint: disable=import-outside-toplevel
  from vitjax.train import optim, trainer  # pylint: disable=import-outside-toplevel
  config = digits_config(args)
  info = data.get_info(config.data)
  evals = list(data.make_eval_batches(config.data, global_batch_size=360))
  images = np.concatenate([np.asarray(b["image"])[np.asarray(b["mask"])] for b in evals])
  labels = np.concatenate([np.asarray(b["label"])[np.asarray(b["mask"])] for b in evals])
  calib = qbase.calibration_images(config.data, args.calib)
  res = dict(steps=args.steps, calib=args.calib, seed=args.seed, rows=[], fp={},
             model=dict(config.model.to_dict()))
  trained = {}
  for att in args.attentions:
    cfg = config.copy_and_resolve_references()
    cfg.model.attention = dict(name=att)
    cfg.total_steps = args.steps
    model = trainer.build_model(cfg, info)
    t = time.perf_counter()
    trained[att] = (cfg, train(model, cfg, info, data, optim, trainer, args),
                    time.perf_counter() - t, int(np.prod(model.grid)))
    print(f"trained {att} in {trained[att][2]:.0f} s", flush=True)
  # the rows without a reducer first, then the reducers on the first attention, then the rest
  order = ([("none", a) for a in args.attentions]
           + [(r, args.attentions[0]) for r in REDUCERS[1:]]
           + [(r, a) for r in REDUCERS[1:] for a in args.attentions[1:]])
  order = [o for o in order if o[0] in args.reducers]
  for i, (red, att) in enumerate(order):
    if i == len(args.attentions) + len(REDUCERS) - 1 and between is not None:
      between()
    cfg, params, train_s, n_patches = trained[att]
    kinds = qbase.weight_kinds(dict(name=att))
    rcfg = cfg.copy_and_resolve_references()
    rcfg.model.tokens = reducer_spec(red, n_patches)
    rmodel = trainer.build_model(rcfg, info)
    logits, out_fp = jax.jit(lambda p, x, m=rmodel: m.apply({"params": p}, x))(params, images)
    fp_top1 = top1(logits, labels)
    res["fp"][f"{att}|{red}"] = dict(top1=fp_top1, train_s=train_s)
    for method in quant.names():
      options, mark = method_options(method, kinds)
      for bits in BITS:
        t = time.perf_counter()
        qm, qp = quant.quantize(rmodel, params, calib, dict(method=method, bits=bits, **options))
        logits, out_q = qm.apply({"params": qp}, images)
        row = dict(attention=att, reducer=red, method=method + mark, bits=bits,
                   top1=top1(logits, labels), fp_top1=fp_top1,
                   overlap=qbase.kept_overlap(out_fp, out_q) if red == "evit" else None,
                   seconds=time.perf_counter() - t)
        res["rows"].append(row)
        print(json.dumps(row), flush=True)
      on_update(res)
  return res


def train(model, cfg, info, data, optim, trainer, args):
  tx, _ = optim.make_optimizer(cfg.optimizer, args.steps, cfg.warmup_steps)
  params = model.init(jax.random.PRNGKey(args.seed), jnp.zeros((1, *info.image_shape)))["params"]
  state = trainer.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                             opt_state=tx.init(params), rng=jax.random.PRNGKey(args.seed + 1))
  step = jax.jit(trainer.make_train_step(model, tx, cfg), donate_argnums=(0,))
  batches = iter(data.make_train_loader(cfg.data, global_batch_size=cfg.batch_size,
                                        seed=args.seed))
  for _ in range(args.steps):
    state, _ = step(state, next(batches))
  return state.params


def top1(logits, labels) -> float:
  return 100.0 * float(np.mean(np.argmax(np.asarray(logits), -1) == labels))


# ---------------------------------------------------------------------------- speed
def timed(fns: dict, args_: tuple, rounds: int) -> dict:
  for f in fns.values():
    jax.block_until_ready(f(*args_))
    jax.block_until_ready(f(*args_))
  times = {k: [] for k in fns}
  for _ in range(rounds):
    for k, f in fns.items():  # alternately, so that a change of load hits all alike
      t = time.perf_counter()
      jax.block_until_ready(f(*args_))
      times[k].append(time.perf_counter() - t)
  return {k: statistics.median(v) for k, v in times.items()}


def speed_case(model, batch: int, shape, rounds: int) -> dict:
  x = jax.random.normal(jax.random.key(0), (batch, *shape), jnp.float32)
  params = model.init(jax.random.key(1), x[:1])["params"]
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  params = jax.tree_util.tree_unflatten(
      tree, [p + 0.02 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
  fake, pf = quant.quantize(model, params, x[:32], dict(method="minmax", bits="W8A8"))
  integer, pi = quant.quantize(model, params, x[:32], dict(method="minmax", bits="W8A8",
                                                           integer=True))
  fns = {"float32": jax.jit(lambda p, v: model.apply({"params": p}, v)[0]),
         "fake-quant": jax.jit(lambda p, v: fake.apply({"params": p}, v)[0]),
         "int8": jax.jit(lambda p, v: integer.apply({"params": p}, v)[0])}
  secs = {"float32": None, "fake-quant": None, "int8": None}
  got = timed({"float32": lambda v: fns["float32"](params, v),
               "fake-quant": lambda v: fns["fake-quant"](pf, v),
               "int8": lambda v: fns["int8"](pi, v)}, (x,), rounds)
  secs.update(got)
  diff = float(jnp.abs(fns["int8"](pi, x) - fns["fake-quant"](pf, x)).max())
  agree = float(jnp.mean(jnp.argmax(fns["int8"](pi, x), -1) == jnp.argmax(fns["fake-quant"](pf, x),
                                                                         -1)))
  return dict(batch=batch, images_per_sec={k: batch / v for k, v in secs.items()},
              int8_vs_float32=secs["float32"] / secs["int8"],
              max_logit_diff_int8_vs_fake=diff, argmax_agreement_int8_vs_fake=agree,
              device=jax.devices()[0].device_kind)


def speed_study(args) -> dict:
  config = digits_config(args)
  digits = models.ViT(num_classes=10, image_size=(8, 8), patch_size=2,
                      **{k: config.model[k] for k in ("width", "depth", "num_heads", "mlp_dim")},
                      class_token=True, pool="cls", posemb="sincos2d")
  return {"digits": speed_case(digits, 360, (8, 8, 1), args.rounds)}


def large_speed_study(args) -> dict:
  ti = models.ViT(num_classes=1000, image_size=(224, 224), patch_size=16, width=192, depth=12,
                  num_heads=3, mlp_dim=768)
  return {"Ti/16@224": speed_case(ti, args.speed_batch, (224, 224, 3), args.rounds)}


# ---------------------------------------------------------------------------- outputs
def markdown(res: dict) -> str:
  acc = res["accuracy"]
  lines = [f"Digits ViT (width 96, depth 4, [CLS] token, average pooling), trained "
           f"{acc['steps']} steps at batch 128, lr 2e-3 (seed {acc['seed']}), quantized after "
           f"training; calibration on the first {acc['calib']} training digits; top-1 (%) on "
           "the 360 test digits; embedding and head in float. "
           "EViT keeps 50% after block 1 of 4, ToMe merges as many. * : the method's "
           "post-softmax quantizer replaced by the uniform one (no softmax to quantize). "
           "Overlap: share of the float model's EViT-kept patches kept after quantization.", "",
           "| attention | reducer | float | method | W8A8 | W6A6 | W4A4 | overlap W8 / W6 / W4 |",
           "|---|---|---|---|---|---|---|---|"]
  groups = {}
  for r in acc["rows"]:
    groups.setdefault((r["attention"], r["reducer"], r["method"]), {})[r["bits"]] = r
  for (att, red, method), by in groups.items():
    fp = acc["fp"][f"{att}|{red}"]["top1"]
    cells = [f"{by[b]['top1']:.1f}" if b in by else "-" for b in BITS]
    ov = " / ".join(f"{by[b]['overlap']:.2f}" for b in BITS
                    if b in by and by[b]["overlap"] is not None) or "-"
    lines.append(f"| {att} | {red} | {fp:.1f} | {method} | " + " | ".join(cells) + f" | {ov} |")
  if "speed" in res:
    lines += ["", "| model | batch | float32 (img/s) | fake-quant (img/s) | int8 path (img/s) | "
              "int8 / float32 | max logit diff int8 vs fake | argmax agreement |",
              "|---|---|---|---|---|---|---|---|"]
    for name, s in res["speed"].items():
      ips = s["images_per_sec"]
      lines.append(f"| {name} | {s['batch']} | {ips['float32']:.0f} | {ips['fake-quant']:.0f} | "
                   f"{ips['int8']:.0f} | {s['int8_vs_float32']:.2f}x | "
                   f"{s['max_logit_diff_int8_vs_fake']:.2g} | "
                   f"{100 * s['argmax_agreement_int8_vs_fake']:.1f}% |")
  return "\n".join(lines) + "\n"


def plot(res: dict, path: str):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  acc = res["accuracy"]
  atts = sorted({r["attention"] for r in acc["rows"]})
  fig, axes = plt.subplots(1, len(atts), figsize=(4 * len(atts), 3.5), squeeze=False)
  for ax, att in zip(axes[0], atts):
    for method in sorted({r["method"] for r in acc["rows"] if r["attention"] == att}):
      rows = [r for r in acc["rows"] if r["attention"] == att and r["method"] == method
              and r["reducer"] == "none"]
      ax.plot([r["bits"] for r in rows], [r["top1"] for r in rows], marker="o", label=method)
    ax.axhline(acc["fp"][f"{att}|none"]["top1"], color="k", ls="--", lw=0.8)
    ax.set_title(att)
    ax.set_ylabel("test top-1 (%)")
  axes[0][0].legend(fontsize=7)
  fig.suptitle("Post-training quantization of the digits ViT (no reducer; dashed: float)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--out_dir", default=os.path.join(ROOT, "experiments", "results"))
  p.add_argument("--attentions", default="mhsa,sigmoid,relu,linear_elu")
  p.add_argument("--steps", type=int, default=1000)
  p.add_argument("--calib", type=int, default=32)
  p.add_argument("--reducers", default=",".join(REDUCERS))
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--rounds", type=int, default=7)
  p.add_argument("--speed_batch", type=int, default=16)
  p.add_argument("--skip_speed", action="store_true")
  p.add_argument("--keep_speed", action="store_true",
                 help="keep the speed figures of an earlier quantization.json in --out_dir")
  p.add_argument("--smoke", action="store_true")
  args = p.parse_args()
  args.attentions = args.attentions.split(",")
  args.reducers = args.reducers.split(",")
  if args.smoke:
    args.steps, args.calib, args.rounds = 4, 8, 1
  os.makedirs(args.out_dir, exist_ok=True)
  res = {}
  earlier = os.path.join(args.out_dir, "quantization.json")
  if args.keep_speed and os.path.exists(earlier):
    with open(earlier) as f:
      res["speed"] = json.load(f).get("speed", {})

  def write(acc):
    res["accuracy"] = acc
    with open(os.path.join(args.out_dir, "quantization.json"), "w") as f:
      json.dump(res, f, indent=1)
    with open(os.path.join(args.out_dir, "quantization.md"), "w") as f:
      f.write(markdown(res))

  if not args.skip_speed:
    res["speed"] = speed_study(args)
    print(json.dumps(res["speed"], indent=1), flush=True)
  def large():
    if not args.skip_speed and not args.smoke:
      res["speed"].update(large_speed_study(args))
      print(json.dumps(res["speed"], indent=1), flush=True)
      write(res["accuracy"])

  write(accuracy_study(args, write, large))
  plot(res, os.path.join(args.out_dir, "quantization.png"))
  print(markdown(res))


if __name__ == "__main__":
  main()
