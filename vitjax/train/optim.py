"""Optimizer and learning-rate schedules (optax)."""
import re

import jax
import optax

SCHEDULES = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw", "sgd")
# Parameters that are not decayed: norms, biases, position embeddings, learned tokens, Swin's
# relative position tables and the PEG convs of Twins (timm's no_weight_decay), natten's `rpb`
# tables (NAT's) and MViTv2's decomposed tables `rel_pos_h`, `rel_pos_w`.
NO_DECAY = re.compile(
    r"(bias|scale|pos_embedding|cls|dist|registers|probe|gamma|relative_position_bias_table|rpb"
    r"|pos_block/proj/kernel|rel_pos_h|rel_pos_w)$")


def lr_schedule(cfg, total_steps: int, warmup_steps: int):
  """Linear warm-up to `cfg.lr`, then cosine / linear decay to `cfg.min_lr`, or constant."""
  name = cfg.get("schedule", "cosine")
  if name not in SCHEDULES:
    raise ValueError(f"unknown lr schedule {name!r}; valid: {SCHEDULES}")
  lr, min_lr = cfg.lr, cfg.get("min_lr", 0.0)
  decay_steps = max(total_steps - warmup_steps, 1)
  if name == "cosine":
    decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=min_lr / lr if lr else 0.0)
  elif name == "linear":
    decay = optax.linear_schedule(lr, min_lr, decay_steps)
  else:
    decay = optax.constant_schedule(lr)
  if warmup_steps == 0:
    return decay
  warmup = optax.linear_schedule(0.0, lr, warmup_steps)
  return optax.join_schedules([warmup, decay], [warmup_steps])


def decay_mask(params):
  def keep(path, leaf):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    return leaf.ndim > 1 and not NO_DECAY.search(name)
  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(cfg, total_steps: int, warmup_steps: int):
  """Returns (optax transformation, lr schedule fn)."""
  name = cfg.get("name", "adamw")
  if name not in OPTIMIZERS:
    raise ValueError(f"unknown optimizer {name!r}; valid: {OPTIMIZERS}")
  sched = lr_schedule(cfg, total_steps, warmup_steps)
  parts = []
  if cfg.get("clip_norm"):
    parts.append(optax.clip_by_global_norm(cfg.clip_norm))
  if name == "adamw":
    parts.append(optax.adamw(sched, b1=cfg.get("b1", 0.9), b2=cfg.get("b2", 0.999),
                             eps=cfg.get("eps", 1e-8), weight_decay=cfg.get("weight_decay", 0.0),
                             mask=decay_mask))
  else:
    parts.append(optax.add_decayed_weights(cfg.get("weight_decay", 0.0), mask=decay_mask))
    parts.append(optax.sgd(sched, momentum=cfg.get("momentum", 0.9)))
  return optax.chain(*parts), sched
