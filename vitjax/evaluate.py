r"""Evaluation mode: top-1, top-5, throughput, analytic GMACs and parameters (the columns of the
EViT and ToMe tables), printed as a markdown table and written as JSON.

  python -m vitjax.evaluate --config=configs/default.py --checkpoint=workdirs/default
  python -m vitjax.evaluate --config=configs/offtheshelf.py:reducer=evit \
      --checkpoint=deit_small_patch16_224.safetensors --keep_rates=1.0,0.9,0.7,0.5

--checkpoint: one of our training workdirs (or its checkpoints/ folder; the latest step or --step,
--ema for the EMA parameters; read by `vitjax.loading.restore`), or a timm (.safetensors/.pth) /
big_vision (.npz) file. Without it the config's init_from is used. The rows go to --output, by
default `evaluation.json` in the training workdir evaluated (beside a timm/big_vision file:
`<file>.evaluation.json`); the last line printed says where. A config with a `quant` field
(method, bits, calib_images, ...; see `vitjax.quant`) evaluates the post-training quantized model
instead (configs/quant_imagenet.py). --keep_rates evaluates the
same weights at several keep rates (one row each). Throughput: jit-compiled forward, warmed up,
median of --runs timed runs on device-resident random inputs of --throughput_batch images (the
input pipeline is not timed).
"""
import json
import os
import statistics
import sys
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vitjax import checkpoints, loading, models, quant
from vitjax import tokens as tokens_lib
from vitjax.train import mesh as mesh_lib
from vitjax.train import trainer

COLUMNS = (("model", "model"), ("tokens", "reducer"), ("keep_rate", "keep rate / r"),
           ("top1", "top-1 (%)"), ("top5", "top-5 (%)"), ("images_per_sec", "throughput (img/s)"),
           ("gmacs", "GMACs"), ("params_m", "params (M)"))


# ------------------------------------------------------------------ parameters
def restore_params(config, model, info, workdir: str, *, ema: bool = False, step=None):
  """(parameters or their EMA, step, running statistics) of a training workdir's checkpoint (the
  latest unless `step` is given) for `model`, after checking its files against their checksums."""
  from vitjax.train import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  del config, info  # the checkpoint and the model are all a restore needs
  where, step = loading.locate(workdir, step)
  try:
    ckpt_lib.verify(os.path.join(where, "checkpoints", str(step)))
  except ckpt_lib.CorruptStepError as e:
    raise loading.LoadError(f"the checkpoint in {where} at step {step} is damaged ({e}); "
                            "evaluate another step (--step; saved: "
                            f"{', '.join(map(str, loading.saved_steps(where)))})") from None
  variables, step = loading.restore(workdir, model, step=step, ema=ema)
  return variables["params"], step, variables.get("batch_stats", {})


def load_params(config, model, info, checkpoint: str, *, ema: bool = False, step=None):
  """(params, description of where they came from, running statistics or {})."""
  if checkpoints.is_pretrained_file(checkpoint):
    if ema or step is not None:
      raise loading.LoadError(f"{checkpoint} is a timm/big_vision file: --ema and --step are for "
                              "training workdirs; pass the file alone")
    variables = checkpoints.load_variables(checkpoint, model)
    return variables["params"], os.path.basename(checkpoint), variables.get("batch_stats", {})
  params, step, stats = restore_params(config, model, info, checkpoint, ema=ema, step=step)
  name = f"{os.path.basename(loading.locate(checkpoint, step)[0])}@{step}"
  return params, name + (" (EMA)" if ema else ""), stats


# ------------------------------------------------------------------ measurements
def accuracy(config, model, params, batch_stats=None) -> dict:
  """Top-1 / top-5 over the config's eval split with the trainer's evaluation step."""
  mesh = mesh_lib.make_mesh(config.mesh)
  sharding = mesh_lib.batch_sharding(mesh)
  # on the devices once, not copied from the host with every batch
  params, batch_stats = jax.device_put((params, batch_stats or {}), NamedSharding(mesh, P()))
  eval_step = jax.jit(trainer.make_eval_step(model))
  return trainer.evaluate(eval_step, params, config, sharding, batch_stats)


def throughput(model, params, image_shape, batch: int, runs: int = 5, warmup: int = 2,
               batch_stats=None) -> float:
  """Images per second of the jit-compiled forward pass (median of `runs`)."""
  forward = jax.jit(lambda p, x: model.apply(trainer.variables(p, batch_stats), x,
                                             train=False)[0])
  x = jax.random.normal(jax.random.key(0), (batch, *image_shape), jnp.float32)
  params = jax.device_put(params)
  for _ in range(warmup):
    jax.block_until_ready(forward(params, x))
  times = []
  for _ in range(runs):
    t = time.perf_counter()
    jax.block_until_ready(forward(params, x))
    times.append(time.perf_counter() - t)
  return batch / statistics.median(times)


def describe(model) -> tuple:
  """(reducer name, its keep rate or "r=..." for ToMe's per-block merges)."""
  name, options = tokens_lib.registry.split_spec(model.tokens)
  if "r" in options:
    return name, f"r={options['r']}"
  return name, options.get("keep_rate")


def evaluate_model(config, model, params, info, *, label: str, throughput_batch: int,
                   runs: int, batch_stats=None) -> dict:
  from vitjax.tokens import macs  # pylint: disable=import-outside-toplevel
  scores = accuracy(config, model, params, batch_stats)
  reducer, rate = describe(model)
  return {"model": label, "tokens": reducer, "keep_rate": rate,
          "top1": 100 * float(scores["eval/top1"]), "top5": 100 * float(scores["eval/top5"]),
          "eval_loss": float(scores["eval/loss"]), "count": int(scores["eval/count"]),
          "images_per_sec": throughput(model, params, info.image_shape, throughput_batch, runs,
                                       batch_stats=batch_stats),
          "gmacs": macs.model_macs(model, channels=info.image_shape[-1]) / 1e9,
          "params_m": models.num_params(params) / 1e6,
          "throughput_batch": throughput_batch, "device": jax.devices()[0].device_kind}


def with_keep_rate(config, keep_rate: Optional[float]):
  if keep_rate is None:
    return config
  config = config.copy_and_resolve_references()
  config.model.tokens.keep_rate = keep_rate
  return config


def build(config, info, checkpoint: str):
  """The config's model; with model.from_checkpoint=True, the architecture stored in the file
  (its other model fields, e.g. tokens, override the file's)."""
  model_cfg = config.model.to_dict()
  if not model_cfg.pop("from_checkpoint", False):
    return trainer.build_model(config, info)
  if not checkpoints.is_pretrained_file(checkpoint):
    raise loading.LoadError("model.from_checkpoint=True needs a timm/big_vision file as "
                            "--checkpoint, not a training workdir")
  model_cfg.pop("name", None)
  return checkpoints.build_model(checkpoint, num_classes=info.num_classes,
                                 image_size=config.get("image_size") or info.image_shape[:2],
                                 dtype=config.get("dtype", "float32"), **model_cfg)


def run(config, checkpoint: Optional[str] = None, *, keep_rates: Sequence = (None,),
        ema: bool = False, step: Optional[int] = None, throughput_batch: Optional[int] = None,
        runs: int = 5, output: Optional[str] = None) -> list:
  """Evaluates `checkpoint` (or config.init_from) under `config`; one row per keep rate."""
  from vitjax import data  # pylint: disable=import-outside-toplevel
  checkpoint = checkpoint or config.get("init_from")
  if not checkpoint:
    raise loading.LoadError("nothing to evaluate: pass --checkpoint or set config.init_from")
  info = data.get_info(config.data)
  rows, params = [], None
  for kr in keep_rates or (None,):
    cfg = with_keep_rate(config, kr)
    model = build(cfg, info, checkpoint)
    if params is None:  # reducers here have no parameters: one load serves every keep rate
      params, label, stats = load_params(cfg, model, info, checkpoint, ema=ema, step=step)
    qmodel, qparams, qlabel = quant.from_config(cfg, model, params, label)  # config.quant
    rows.append(evaluate_model(cfg, qmodel, qparams, info, label=qlabel,
                               throughput_batch=throughput_batch or config.batch_size, runs=runs,
                               batch_stats=stats))
  if output:
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
      json.dump(rows, f, indent=2)
  return rows


FORMATS = {"top1": "{:.2f}", "top5": "{:.2f}", "images_per_sec": "{:.1f}", "gmacs": "{:.3g}",
           "params_m": "{:.3g}"}


def table(rows) -> str:
  def fmt(key, v):
    if v is None:
      return "-"
    return FORMATS.get(key, "{}").format(v)
  lines = ["| " + " | ".join(h for _, h in COLUMNS) + " |",
           "|" + "---|" * len(COLUMNS)]
  lines += ["| " + " | ".join(fmt(k, r[k]) for k, _ in COLUMNS) + " |" for r in rows]
  return "\n".join(lines)


def default_output(checkpoint: Optional[str]) -> str:
  """Where the user looks: the training workdir evaluated, or beside a timm/big_vision file."""
  if checkpoint and checkpoints.is_pretrained_file(checkpoint):
    return f"{checkpoint}.evaluation.json"
  try:
    return os.path.join(loading.locate(checkpoint)[0], "evaluation.json")
  except (loading.LoadError, TypeError):  # not a workdir: the error comes with the evaluation
    return "evaluation.json"


def main(argv):
  del argv
  from absl import flags, logging  # pylint: disable=import-outside-toplevel
  logging.set_verbosity(logging.WARNING)  # orbax is chatty at INFO (restore timings, metadata)
  f = flags.FLAGS
  rates = [None if r in ("", "none") else float(r) for r in f.keep_rates] or [None]
  output = f.output or default_output(f.checkpoint or f.config.get("init_from"))
  try:
    rows = run(f.config, f.checkpoint, keep_rates=rates, ema=f.ema, step=f.step,
               throughput_batch=f.throughput_batch, runs=f.runs, output=output)
  except (loading.LoadError, checkpoints.CheckpointMismatch, quant.QuantError) as e:
    # Errors about what was given, not the code: the message is the whole story.
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)
  print(table(rows))
  print(f"written to {os.path.abspath(output)}")


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=ungrouped-imports
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "Config file (path[:args]).", lock_config=False)
  flags.DEFINE_string("checkpoint", None, "A training workdir, or a timm/big_vision file.")
  flags.DEFINE_list("keep_rates", [], "Keep rates to evaluate (one row each).")
  flags.DEFINE_bool("ema", False, "Evaluate the EMA parameters of a training checkpoint.")
  flags.DEFINE_integer("step", None, "The training checkpoint's step (default the latest).")
  flags.DEFINE_integer("throughput_batch", None, "Batch for the throughput (default batch_size).")
  flags.DEFINE_integer("runs", 5, "Timed runs for the throughput (median).")
  flags.DEFINE_string("output", None, "Where the JSON rows go (default: evaluation.json in the "
                      "workdir evaluated, or <file>.evaluation.json beside a timm/big_vision "
                      "file).")
  flags.mark_flags_as_required(["config"])
  app.run(main)
