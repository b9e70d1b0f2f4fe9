"""The DeiT recipe around the trainer: EMA, hard distillation, layer-wise lr decay, mixup/cutmix,
repeated augmentation and initialisation from a pretrained file. Each part is off unless its
config field is set, and the trainer calls in here at clearly marked points:

  config.ema = 0.99996 (or dict(decay=...))        EMA of the parameters, evaluated as eval_ema/*
  config.mixup = dict(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, prob=1.0,
                      label_smoothing=0.1)         host-side, per local batch: soft labels [B, C]
  config.distill = dict(teacher=dict(...model fields...), init_from="teacher.safetensors",
                        alpha=0.5, type="hard", tau=1.0)   DeiT distillation via the dist token
  config.optimizer.layer_decay = 0.65              layer-wise lr decay (fine-tuning, BEiT/timm)
  config.data.repeated_aug = 3                     DeiT's repeated augmentation
  config.init_from = "deit_small.safetensors"      a timm / big_vision file (config.init_skip:
                                                   parameter names that keep their init)
"""
from typing import Any, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

EMBEDDING = ("embedding_kernel", "embedding_bias", "cls", "dist", "registers", "pos_embedding",
             "patch_embed")
DISTILL_TYPES = ("hard", "soft")


# ------------------------------------------------------------------ losses
def soft_cross_entropy(logits, targets):
  """-sum(targets * log_softmax(logits)) per example (timm's SoftTargetCrossEntropy)."""
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets.astype(jnp.float32))


def cross_entropy(logits, labels, num_classes: int, smoothing: float = 0.0):
  """Integer labels [B] (smoothed here) or soft labels [B, C] (used as given: mixup already
  folded its label smoothing into them)."""
  if labels.ndim == logits.ndim:
    return soft_cross_entropy(logits, labels)
  onehot = jax.nn.one_hot(labels, num_classes)
  if smoothing:
    onehot = optax.smooth_labels(onehot, smoothing)
  return soft_cross_entropy(logits, onehot)


def hard_labels(labels):
  """The class of each example: integer labels as they are, soft ones by argmax."""
  labels = labels["label"] if isinstance(labels, Mapping) else labels
  return labels if labels.ndim == 1 else jnp.argmax(labels, axis=-1)


def distillation_loss(logits, dist_logits, labels, teacher_logits, *, num_classes: int,
                      smoothing: float = 0.0, alpha: float = 0.5, kind: str = "hard",
                      tau: float = 1.0):
  """DeiT's loss per example: (1 - alpha) CE(cls head, labels) + alpha * distillation term.

  hard: CE(dist head, argmax teacher); soft: tau^2 KL(teacher/tau || dist head/tau), summed over
  classes and divided by the number of classes (DeiT divides the batch sum by B*C).
  """
  if kind not in DISTILL_TYPES:
    raise ValueError(f"distill.type must be one of {DISTILL_TYPES}, got {kind!r}")
  base = cross_entropy(logits, labels, num_classes, smoothing)
  if kind == "hard":
    dist = optax.softmax_cross_entropy_with_integer_labels(
        dist_logits.astype(jnp.float32), jnp.argmax(teacher_logits, -1))
  else:
    log_p = jax.nn.log_softmax(dist_logits.astype(jnp.float32) / tau)
    log_q = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / tau)
    dist = jnp.sum(jnp.exp(log_q) * (log_q - log_p), -1) * tau * tau / logits.shape[-1]
  return (1.0 - alpha) * base + alpha * dist


def train_loss(logits, out, labels, num_classes: int, smoothing: float, config):
  """Per-example training loss: cross-entropy, or DeiT's distillation loss when `labels` carries
  the teacher's logits (see `targets`)."""
  if not isinstance(labels, Mapping):
    return cross_entropy(logits, labels, num_classes, smoothing)
  if "dist_logits" not in out:
    raise ValueError("distillation needs a student with a distillation token "
                     "(model.distill_token=True)")
  cfg = config.distill
  return distillation_loss(logits, out["dist_logits"], labels["label"], labels["teacher_logits"],
                           num_classes=num_classes, smoothing=smoothing,
                           alpha=cfg.get("alpha", 0.5), kind=cfg.get("type", "hard"),
                           tau=cfg.get("tau", 1.0))


def targets(batch: Mapping):
  """What the loss compares against: the labels, plus the teacher's logits when distilling."""
  if "teacher_logits" in batch:
    return {"label": batch["label"], "teacher_logits": batch["teacher_logits"]}
  return batch["label"]


# ------------------------------------------------------------------ EMA (inside the optimizer)
class EmaState(NamedTuple):
  ema: Any


def ema(decay: float) -> optax.GradientTransformation:
  """Tracks ema <- decay * ema + (1 - decay) * new params after each update (timm's ModelEmaV2,
  DeiT's 0.99996). Placed last in the chain, it sees the final updates; as optimizer state it is
  sharded, checkpointed and restored with the rest of the train state."""
  if not 0.0 <= decay < 1.0:
    raise ValueError(f"ema decay must be in [0, 1), got {decay}")

  def init(params):
    return EmaState(ema=jax.tree_util.tree_map(lambda p: jnp.asarray(p, jnp.float32), params))

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("ema needs the parameters: call tx.update(grads, state, params)")
    new = optax.apply_updates(params, updates)
    avg = jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema, new)
    return updates, EmaState(ema=avg)

  return optax.GradientTransformation(init, update)


def ema_params(opt_state):
  """The EMA parameters inside an optimizer state, or None without EMA."""
  is_ema = lambda x: isinstance(x, EmaState)
  found = [x for x in jax.tree_util.tree_leaves(opt_state, is_leaf=is_ema) if is_ema(x)]
  return found[0].ema if found else None


def ema_decay(config) -> Optional[float]:
  cfg = config.get("ema")
  if cfg is None or cfg is False:
    return None
  return float(cfg.get("decay", 0.99996)) if hasattr(cfg, "get") else float(cfg)


# ------------------------------------------------------------------ layer-wise lr decay
def layer_id(path: str, depth: int) -> int:
  """0 for the embedding and prefix tokens, i + 1 for block i (and its reducer), depth + 1 for
  the final norm and heads (timm's param_groups_layer_decay for ViT); i + 1 for stage i of a
  backbone that groups by stage (PVTv2, whose `depth` is its number of stages, as timm)."""
  first = path.split("/")[0]
  if first in EMBEDDING:
    return 0
  for prefix in ("block_", "reduce_", "stage_"):  # stage_i: a hierarchical backbone's stage
    if first.startswith(prefix) and first[len(prefix):].isdigit():
      return int(first[len(prefix):]) + 1
  return depth + 1


def layer_scales(params, decay: float, depth: int, layer_of=None):
  """Per parameter: decay ** (depth + 1 - layer id); scanned blocks (encoder/block, stacked over
  depth) get one scale per layer, broadcast over the parameter. `layer_of(name)` is the model's
  own layer id (a hierarchical backbone's `layer_id`), else `layer_id`'s ViT layout."""
  layer_of = layer_of or (lambda name: layer_id(name, depth))

  def scale(path, leaf):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    if name.startswith("encoder/block/"):
      per_layer = decay ** (depth - np.arange(depth, dtype=np.float32))
      return jnp.asarray(per_layer.reshape((depth,) + (1,) * (leaf.ndim - 1)), jnp.float32)
    return jnp.asarray(decay ** (depth + 1 - layer_of(name)), jnp.float32)
  return jax.tree_util.tree_map_with_path(scale, params)


def scale_by_layer(decay: float, depth: int, layer_of=None) -> optax.GradientTransformation:
  """Multiplies each update by its layer's scale: the same as scaling that layer's learning rate
  (weight decay included, as timm's parameter groups do)."""
  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None):
    del params
    scales = layer_scales(updates, decay, depth, layer_of)
    return jax.tree_util.tree_map(lambda u, s: u * s.astype(u.dtype), updates, scales), state

  return optax.GradientTransformation(init, update)


def wrap_optimizer(tx, config, model):
  """tx, then layer-wise lr decay (config.optimizer.layer_decay), then the model's constraint on
  its parameters (a reducer's, e.g. Sinkhorn's unit centres), then EMA (config.ema)."""
  parts = [tx]
  decay = config.optimizer.get("layer_decay")
  if decay is not None:
    if not 0.0 < decay <= 1.0:
      raise ValueError(f"optimizer.layer_decay must be in (0, 1], got {decay}")
    parts.append(scale_by_layer(float(decay), model.depth, getattr(model, "layer_id", None)))
  if model.after_update() is not None:
    parts.append(model.after_update())
  if ema_decay(config) is not None:
    parts.append(ema(ema_decay(config)))
  return tx if len(parts) == 1 else optax.chain(*parts)


# ------------------------------------------------------------------ arrays onto a mesh
def put_global(tree, shardings):
  """Host numpy values (the same on every host) -> global arrays with `shardings`."""
  return jax.tree_util.tree_map(
      lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda idx: np.asarray(x)[idx]),
      tree, shardings)


MIXUP_KEYS = ("mixup_alpha", "cutmix_alpha", "switch_prob", "prob", "label_smoothing",
              "correct_lam")


def check_mixup(cfg):
  """Config-time check of config.mixup (the keyword arguments of augment.mixup_cutmix)."""
  bad = set(dict(cfg)) - set(MIXUP_KEYS)
  if bad:
    raise ValueError(f"config.mixup has unknown option(s) {sorted(bad)}; valid: {MIXUP_KEYS}")
  for key in ("prob", "switch_prob"):
    if not 0.0 <= cfg.get(key, 0.5) <= 1.0:
      raise ValueError(f"config.mixup.{key} must be in [0, 1], got {cfg.get(key)}")


# ------------------------------------------------------------------ the trainer's hooks
class Recipe:
  """What the trainer asks of the recipe; every method is a no-op for a plain config."""

  def __init__(self, config, model, data_info, batch_sharding):
    self.config, self.model, self.info = config, model, data_info
    self.batch_sharding = batch_sharding
    self.mixup = config.get("mixup")
    self.distill = config.get("distill")
    self.teacher_fn = None
    if self.distill:
      if not model.distill_token:
        raise ValueError("config.distill needs a student with a distillation token: set "
                         "config.model.distill_token=True")
      if self.distill.get("type", "hard") not in DISTILL_TYPES:
        raise ValueError(f"distill.type must be one of {DISTILL_TYPES}")
    if self.mixup:
      check_mixup(self.mixup)
    self._ema_eval_step = None

  # data
  def train_loader(self, data_lib):
    cfg, repeats = self.config, self.config.data.get("repeated_aug")
    if repeats and repeats > 1:
      from vitjax.data import augment  # pylint: disable=import-outside-toplevel
      return augment.make_train_loader(cfg.data, global_batch_size=cfg.batch_size,
                                       seed=cfg.seed, repeats=int(repeats))
    return data_lib.make_train_loader(cfg.data, global_batch_size=cfg.batch_size, seed=cfg.seed)

  def batch(self, local: dict, step: int, to_global) -> dict:
    """Host batch -> global batch: mixup/cutmix first (per host), then the teacher's logits."""
    if self.mixup:
      from vitjax.data import augment  # pylint: disable=import-outside-toplevel
      rng = np.random.default_rng([self.config.seed, step, jax.process_index()])
      local = augment.mixup_cutmix(local, rng, num_classes=self.info.num_classes,
                                   **dict(self.mixup))
    batch = to_global(local, self.batch_sharding)
    if self.distill:
      batch["teacher_logits"] = self.teacher_logits(batch["image"])
    return batch

  # distillation
  def teacher_logits(self, images):
    if self.teacher_fn is None:
      self.teacher_fn = make_teacher(self.config, self.info, images.shape[1:],
                                     self.batch_sharding.mesh)
    return self.teacher_fn(images)

  # parameters
  def init_params(self, state, tx, state_shardings):
    """A fresh state with config.init_from's parameters (the optimizer state, EMA included,
    re-initialised from them). Unchanged without init_from."""
    path = self.config.get("init_from")
    if not path:
      return state
    from vitjax import checkpoints  # pylint: disable=import-outside-toplevel
    from vitjax.checkpoints import common  # pylint: disable=import-outside-toplevel
    variables = checkpoints.load_variables(
        path, self.model, skip=tuple(self.config.get("init_skip", ()) or ()))
    loaded = common.flatten(variables["params"])
    shardings = common.flatten(state_shardings.params)
    # skipped parameters keep their (possibly not fully addressable) initial arrays
    params = common.unflatten({
        k: put_global(loaded[k], shardings[k]) if k in loaded else v
        for k, v in common.flatten(state.params).items()})
    if jax.process_index() == 0:
      kept = sorted(set(shardings) - set(loaded))
      print(f"initialised from {path}" + (f"; kept the initial {kept}" if kept else ""), flush=True)
    opt_state = jax.jit(tx.init, out_shardings=state_shardings.opt_state)(params)
    stats = common.flatten(variables.get("batch_stats", {}))
    if stats:  # the file's running statistics (BatchNorm) too
      stat_shardings = common.flatten(state_shardings.batch_stats)
      state = state.replace(batch_stats=common.unflatten({
          k: put_global(stats[k], stat_shardings[k]) if k in stats else v
          for k, v in common.flatten(state.batch_stats).items()}))
    return state.replace(params=params, opt_state=opt_state)

  def evaluate_ema(self, state, evaluate, make_eval_step) -> dict:
    """`evaluate` on the EMA parameters as eval_ema/*; {} without EMA."""
    params = ema_params(state.opt_state)
    if params is None:
      return {}
    if self._ema_eval_step is None:
      self._ema_eval_step = jax.jit(make_eval_step(self.model))
    out = evaluate(self._ema_eval_step, params, self.config, self.batch_sharding,
                   state.batch_stats)
    return {k.replace("eval/", "eval_ema/"): v for k, v in out.items() if k != "eval/count"}


def make_teacher(config, data_info, image_shape, mesh):
  """The distillation teacher: a vitjax model with parameters from a pretrained file, run in
  inference mode, replicated. DeiT's teacher is a RegNetY-16GF convnet; here any model the
  checkpoint importers read (e.g. a larger ViT from timm) can teach."""
  from vitjax import checkpoints, models  # pylint: disable=import-outside-toplevel
  cfg = config.distill
  path = cfg.get("init_from")
  if not path:
    raise ValueError("config.distill.init_from must name the teacher's checkpoint file")
  teacher_cfg = cfg.get("teacher")
  size = tuple(image_shape[:2])
  if teacher_cfg:
    teacher = models.build(teacher_cfg, num_classes=data_info.num_classes, image_size=size)
  else:  # the architecture stored in the file
    teacher = checkpoints.build_model(path, num_classes=data_info.num_classes, image_size=size)
  variables = checkpoints.load_variables(path, teacher)  # + running statistics (BatchNorm)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  variables = put_global(variables, jax.tree_util.tree_map(lambda _: replicated, variables))
  forward = jax.jit(lambda v, x: teacher.apply(v, x, train=False)[0])
  return lambda images: forward(variables, images)
