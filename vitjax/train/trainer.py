"""The jit-sharded training loop, readable top to bottom: `train_and_evaluate(config, workdir)`."""
import os
import signal
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vitjax import config_lib, models
from vitjax.train import guard
from vitjax.train import mesh as mesh_lib
from vitjax.train import optim
from vitjax.train import recipe  # DeiT recipe: EMA, mixup, distillation, layer decay, init_from
# checkpoint (orbax, grain) and metrics (tensorboard) are imported where used: the ahead-of-time
# compile tool (`vitjax.train.aot`) builds the train step in an environment without them.


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  # Non-trained running statistics of some mechanisms (dgqa's key-norm EMA, routing's k-means
  # centroids): updated by every train step, read by evaluation; {} for most models.
  batch_stats: Any = flax.struct.field(default_factory=dict)


def say(msg: str):
  """A line on the console of process 0 (absl logging stays quiet: orbax is chatty)."""
  if jax.process_index() == 0:
    print(msg, flush=True)


# ------------------------------------------------------------------ losses and steps
def cross_entropy(logits, labels, num_classes: int, smoothing: float = 0.0):
  onehot = jax.nn.one_hot(labels, num_classes)
  if smoothing:
    onehot = optax.smooth_labels(onehot, smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), onehot)


def make_train_step(model, tx, config, total_steps=None):
  """One optimizer update on a global batch, optionally accumulated over micro-batches.

  The model sees the step and, given `total_steps`, the training progress step / total_steps (for
  mechanisms with a schedule inside, such as a soft causal mask).

  Metrics include `train/nonfinite` (1.0 when the loss or a gradient is not finite). With
  `skip_nonfinite_steps=True` such an update is dropped inside the step (the state keeps its old
  values except the step counter, so the data and dropout streams move on); otherwise the loop
  stops at that step before anything of it is saved.
  """
  accum = config.optimizer.get("grad_accum_steps", 1)
  smoothing = config.get("label_smoothing", 0.0)
  skip_nonfinite = config.get("skip_nonfinite_steps", False)

  def loss_fn(params, batch_stats, images, labels, rng, step):
    progress = None if total_steps is None else step.astype(jnp.float32) / total_steps
    (logits, out), extra = model.apply(variables(params, batch_stats), images, train=True,
                                       step=step, progress=progress, rngs={"dropout": rng},
                                       mutable=["losses", "batch_stats"])
    # labels: int [B], soft [B, C] (mixup) or with the teacher's logits (distillation)
    loss = recipe.train_loss(logits, out, labels, model.num_classes, smoothing, config)
    loss = loss.mean()
    # Reducers such as DynamicViT sow their own (already weighted) losses.
    aux_loss = sum(jnp.sum(v) for v in jax.tree_util.tree_leaves(extra.get("losses", {})))
    return loss + aux_loss, (loss, logits, extra.get("batch_stats", batch_stats))

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step_fn(state: TrainState, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    images, labels = batch["image"], recipe.targets(batch)
    if accum == 1:
      (_, (loss, logits, stats)), grads = grad_fn(state.params, state.batch_stats, images, labels,
                                                  rng, state.step)
      correct = jnp.mean(jnp.argmax(logits, -1) == recipe.hard_labels(labels))
    else:
      micro = lambda x: x.reshape(accum, -1, *x.shape[1:])
      zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)

      def body(carry, xs):
        g_sum, l_sum, c_sum, stats = carry
        i, im, lb = xs
        (_, (l, lg, stats)), g = grad_fn(state.params, stats, im, lb, jax.random.fold_in(rng, i),
                                         state.step)
        g_sum = jax.tree_util.tree_map(jnp.add, g_sum, g)
        hits = jnp.argmax(lg, -1) == recipe.hard_labels(lb)
        return (g_sum, l_sum + l, c_sum + jnp.mean(hits), stats), None

      (grads, loss, correct, stats), _ = jax.lax.scan(
          body, (zeros, 0.0, 0.0, state.batch_stats),
          (jnp.arange(accum), micro(images), jax.tree_util.tree_map(micro, labels)))
      grads = jax.tree_util.tree_map(lambda g: g / accum, grads)
      loss, correct = loss / accum, correct / accum
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(params=params, opt_state=opt_state, batch_stats=stats)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if skip_nonfinite:  # every field but the counter keeps its old value on a bad step
      new_state = jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old),
                                         new_state, state)
    new_state = new_state.replace(step=state.step + 1)
    metrics = {"train/loss": loss, "train/accuracy": correct, "train/grad_norm": grad_norm,
               "train/nonfinite": 1.0 - finite.astype(jnp.float32)}
    return new_state, metrics

  return step_fn


def variables(params, batch_stats=None) -> dict:
  """The model's variables: params, plus running statistics where the model keeps some."""
  return {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}


def make_eval_step(model):
  def eval_step(params, batch, batch_stats=None):
    logits, _ = model.apply(variables(params, batch_stats), batch["image"], train=False)
    mask = batch["mask"].astype(jnp.float32)
    labels = batch["label"]
    loss = cross_entropy(logits, labels, model.num_classes)
    top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
    return {"loss": jnp.sum(loss * mask),
            "top1": jnp.sum((jnp.argmax(logits, -1) == labels) * mask),
            "top5": jnp.sum(jnp.any(top5 == labels[:, None], axis=-1) * mask),
            "count": jnp.sum(mask)}
  return eval_step


# ------------------------------------------------------------------ setup helpers
def durations(config, train_examples: int) -> dict:
  """Converts epochs to steps; returns total, warm-up, log, eval and checkpoint intervals."""
  steps_per_epoch = max(train_examples // config.batch_size, 1)

  def steps(name, default=None):
    if config.get(f"{name}_steps") is not None:
      return int(config.get(f"{name}_steps"))
    if config.get(f"{name}_epochs") is not None:
      return int(round(config.get(f"{name}_epochs") * steps_per_epoch))
    return default

  total = steps("total")
  return dict(steps_per_epoch=steps_per_epoch, total=total, warmup=steps("warmup", 0),
              log=steps("log_every", 50), eval=steps("eval_every", total),
              checkpoint=steps("checkpoint_every", total))


def check_batch(config, mesh):
  shards = mesh_lib.num_batch_shards(mesh)
  micro = config.batch_size // config.optimizer.get("grad_accum_steps", 1)
  if micro % shards:
    raise ValueError(f"batch_size {config.batch_size} (micro-batch {micro}) is not divisible by "
                     f"the {shards} batch shards of the mesh {dict(mesh.shape)}")
  if config.batch_size % jax.process_count():
    raise ValueError(f"batch_size {config.batch_size} is not divisible by the "
                     f"{jax.process_count()} processes")


def build_model(config, data_info):
  """The model of `config`, for the data set described by `data_info`."""
  image_size = config.get("image_size") or data_info.image_shape[:2]
  return models.build(config.model, num_classes=data_info.num_classes, image_size=image_size,
                      dtype=config.get("dtype", "float32"))


def state_spec(model, tx, config, mesh, image_shape):
  """(abstract state: ShapeDtypeStructs with shardings, the shardings, a fn creating the state).

  Nothing is allocated: a resumed run restores into the abstract state without initialising, and
  the ahead-of-time compile tool lowers the step on it.
  """
  def init(rng):
    p_rng, d_rng, s_rng = jax.random.split(rng, 3)
    dummy = jnp.zeros((1, *image_shape), jnp.float32)
    init_vars = model.init({"params": p_rng, "dropout": d_rng}, dummy)
    params = init_vars["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=s_rng, batch_stats=init_vars.get("batch_stats", {}))

  rng = jax.random.PRNGKey(config.seed)
  abstract = jax.eval_shape(init, rng)
  rules = [tuple(r) for r in config.get("sharding_rules", ())]
  shardings = mesh_lib.shardings_like(abstract, mesh, config.get("sharding", "dp"), rules,
                                      config.get("fsdp_min_size", 2 ** 14))
  abstract = jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
  return abstract, shardings, lambda: jax.jit(init, out_shardings=shardings)(rng)


def create_state(model, tx, config, mesh, image_shape):
  """Creates the train state directly into its shardings (no full copy on one device)."""
  _, shardings, init = state_spec(model, tx, config, mesh, image_shape)
  return init(), shardings


def global_batch(local: dict, sharding) -> dict:
  """Per-host numpy shards -> one global jax.Array per field."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local.items()}


def evaluate(eval_step, params, config, batch_sharding, batch_stats=None) -> dict:
  from vitjax import data  # pylint: disable=import-outside-toplevel
  totals = None
  for local in data.make_eval_batches(config.data, global_batch_size=config.batch_size):
    out = eval_step(params, global_batch(local, batch_sharding), batch_stats or {})
    totals = out if totals is None else jax.tree_util.tree_map(jnp.add, totals, out)
  totals = jax.device_get(totals)
  n = max(float(totals["count"]), 1.0)
  return {"eval/loss": totals["loss"] / n, "eval/top1": totals["top1"] / n,
          "eval/top5": totals["top5"] / n, "eval/count": totals["count"]}


# ------------------------------------------------------------------ the loop
def train_and_evaluate(config, workdir: str, *, start_over: bool = False,
                       allow_model_change: bool = False) -> dict:
  """Trains `config` in `workdir`; rerunning the same command resumes from the last checkpoint.

  A workdir whose every checkpoint is damaged stops the run unless `start_over` (the damaged steps
  are then moved aside and training starts at step 0). A checkpoint of another model config stops
  it unless `allow_model_change` (fine-tuning; the parameter shapes must still fit).
  """
  # pylint: disable=import-outside-toplevel  (tfds, grain, orbax, tensorboard are heavy)
  from vitjax import data, loading
  from vitjax.train import checkpoint as ckpt_lib
  from vitjax.train import metrics as metrics_lib
  from vitjax.train import validate
  validate.train_config(config)
  config_lib.validate(config)
  ckpt_lib.check_writable(workdir)
  mesh = mesh_lib.make_mesh(config.mesh)
  check_batch(config, mesh)
  info = data.get_info(config.data)
  model = build_model(config, info)
  steps = durations(config, info.num_examples[config.data.train_split])
  validate.schedule(steps)
  tx, lr_fn = optim.make_optimizer(config.optimizer, steps["total"], steps["warmup"])
  tx = recipe.wrap_optimizer(tx, config, model)  # + layer-wise lr decay, EMA (when configured)

  abstract, state_shardings, init_state = state_spec(model, tx, config, mesh, info.image_shape)
  n_params = models.num_params(abstract.params)
  batch_sharding = mesh_lib.batch_sharding(mesh)
  extras = recipe.Recipe(config, model, info, batch_sharding)
  # A reducer with a training-time schedule (EViT's keep-rate warm-up) declares it as pieces of
  # constant token counts: one model, and one step function compiled on first use, per piece.
  warmup = model.token_warmup(steps["steps_per_epoch"])
  step_fns = {}

  def train_step(state, batch, step: int):
    piece = 0 if warmup is None else warmup.piece(step)  # the host's step counter: no device sync
    if piece not in step_fns:
      m = model if warmup is None else model.with_tokens(warmup.overrides[piece])
      step_fns[piece] = jax.jit(make_train_step(m, tx, config, steps["total"]),
                                in_shardings=(state_shardings, batch_sharding),
                                out_shardings=(state_shardings, None), donate_argnums=(0,))
      if warmup is not None:
        say(f"tokens {warmup.overrides[piece]}: step function {piece + 1} of "
            f"{warmup.num_pieces} (grid {warmup.grid})")
    return step_fns[piece](state, batch)
  eval_step = jax.jit(make_eval_step(model), in_shardings=(
      state_shardings.params, batch_sharding, state_shardings.batch_stats))

  data_iter = iter(extras.train_loader(data))  # repeated augmentation when configured
  ckpt = ckpt_lib.Checkpointer(workdir, keep=config.get("keep_checkpoints", 3),
                               keep_every=config.get("keep_checkpoint_every_steps"),
                               async_save=config.get("async_checkpoints", True),
                               run=ckpt_lib.run_fields(config),
                               allow_model_change=allow_model_change)
  state, start = ckpt.restore_latest(abstract, data_iter, start_over=start_over)
  # Written once the workdir's checkpoints are known to fit this config, so that a failed resume
  # with another model never replaces the config `vitjax.load(workdir)` rebuilds the run from.
  if jax.process_index() == 0 and "://" not in workdir:
    loading.save_config(workdir, config)
  if state is None:
    state = extras.init_params(init_state(), tx, state_shardings)  # config.init_from
  writer = metrics_lib.MetricWriter(workdir, resume_step=start)
  say(f"{type(model).__name__}: {n_params:,} parameters; {steps['total']} steps "
      f"({steps['steps_per_epoch']} per epoch) on mesh {dict(mesh.shape)}"
      + (f"; resumed at step {start}" if start else ""))

  finite = guard.FiniteCheck(config.get("skip_nonfinite_steps", False), ckpt.latest_step)
  bar = metrics_lib.progress_bar(steps["total"], start)
  t_start, images_seen, train_time, pending = time.time(), 0, 0.0, []
  t_last = time.perf_counter()
  eval_metrics, stopped_by = {}, 0
  try:
    with guard.StopRequests() as stop_requests:
      for step in range(start, steps["total"]):
        batch = extras.batch(next(data_iter), step, global_batch)  # + mixup, teacher logits
        state, m = train_step(state, batch, step)
        pending.append(m)
        finite.add(step + 1, m)
        done = step + 1
        finite.check(upto=done - guard.LAG)  # reads flags of finished steps: no device sync
        ckpt.poll()  # a failed background save stops the run here, not at the end
        stopped_by = stop_requests.poll(done)
        last = done == steps["total"]
        if done % steps["log"] == 0 or last or stopped_by:
          finite.check(upto=done)
          m = jax.device_get(pending)  # one host sync per log interval, not per step
          now = time.perf_counter()
          dt, n_img = now - t_last, len(pending) * config.batch_size
          if step >= start + len(pending):  # skip the interval that includes compilation
            train_time, images_seen = train_time + dt, images_seen + n_img
          scalars = {k: float(np.mean([x[k] for x in m])) for k in m[0]}
          scalars.update({"train/lr": float(lr_fn(done)), "train/images_per_sec": n_img / dt,
                          "train/skipped_steps": finite.skipped})
          writer.write(done, scalars)
          bar.set_postfix(loss=f"{scalars['train/loss']:.3f}", img_s=f"{n_img / dt:.0f}")
          pending, t_last = [], time.perf_counter()
        if (done % steps["eval"] == 0 or last) and not stopped_by:
          finite.check(upto=done)
          eval_metrics = evaluate(eval_step, state.params, config, batch_sharding, state.batch_stats)
          eval_metrics.update(extras.evaluate_ema(state, evaluate, make_eval_step))
          writer.write(done, eval_metrics)
          if jax.process_index() == 0:
            bar.write(f"step {done}: eval top-1 {eval_metrics['eval/top1']:.4f} "
                      f"loss {eval_metrics['eval/loss']:.4f}")
          t_last = time.perf_counter()  # evaluation time is not training time
        planned = done == config.get("stop_at_step")  # a planned interruption (tests, limits)
        if done % steps["checkpoint"] == 0 or last or planned or stopped_by:
          finite.check(upto=done)  # never save the state of a non-finite step
          ckpt.save(done, state, data_iter, force=True)
        bar.update(1)
        if planned or stopped_by:
          break
    finite.flush()
    if stopped_by:
      ckpt.wait()
      bar.close()
      say(f"stopped by {signal.Signals(stopped_by).name} after step {done}: checkpoint saved in "
          f"{ckpt.directory}; run the same command again to resume")
    elif not eval_metrics:  # e.g. resumed after the last step: report the final model anyway
      eval_metrics = evaluate(eval_step, state.params, config, batch_sharding, state.batch_stats)
  finally:
    bar.close()
    ckpt.close()  # waits for an asynchronous save in flight: that state was checked
    writer.close()

  summary = {"final_step": int(state.step), "num_params": n_params,
             "num_step_compiles": len(step_fns), "skipped_steps": finite.skipped,
             "wall_time_s": time.time() - t_start,
             "train_images_per_sec": images_seen / train_time if train_time else None,
             **{k.replace("/", "_"): float(v) for k, v in eval_metrics.items()}}
  if stopped_by:  # an unfinished run: no summary.json (it marks a finished one), no stale eval
    summary = {k: v for k, v in summary.items() if not k.startswith("eval_")}
    return {**summary, "stopped_by": signal.Signals(stopped_by).name}
  metrics_lib.write_json(os.path.join(workdir, "summary.json"), summary)
  return summary
