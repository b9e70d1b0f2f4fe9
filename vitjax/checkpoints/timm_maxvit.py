"""timm MaxViT state dicts <-> vitjax `MaxViT` parameters and BatchNorm statistics.

timm's `MaxxVit` in its `maxvit_*_tf` configs (huggingface/pytorch-image-models,
timm/models/maxxvit.py), which hold the official google-research/maxvit weights converted by timm.
Names map one to one:

  stem.conv1 / norm1 / conv2                          stem/conv1 / norm1 / conv2
  stages.{s}.blocks.{j}.conv.shortcut.expand          stage_{s}/block_{j}/conv/shortcut_expand
  stages.{s}.blocks.{j}.conv.{pre_norm, conv1_1x1, norm1, conv2_kxk, norm2, se.fc1, se.fc2,
                              conv3_1x1}              stage_{s}/block_{j}/conv/... (same names)
  stages.{s}.blocks.{j}.attn_{block,grid}.attn.rel_pos.relative_position_bias_table
                                                      .../attn_{block,grid}/attn/relative_...
  stages.{s}.blocks.{j}.attn_{block,grid}.{norm1, attn.qkv, attn.proj, norm2, mlp}
  head.norm, head.pre_logits.fc, head.fc              norm, pre_logits, head
  .weight of a norm / of a conv [O,I,kh,kw] / Linear  /scale, /kernel [kh,kw,I,O] / [in, out]
  BatchNorm running_mean / running_var                batch_stats .../mean / var

The parameters come from `from_timm` / `load` (as every family); the BatchNorm running
statistics, which the model needs in evaluation, from `batch_stats_from_timm`, or both at once
as flax variables from `variables_from_timm` / `load_variables` (`checkpoints.load_variables`,
which evaluation and `init_from` use). `to_timm` takes
parameters or variables ({"params", "batch_stats"}) and writes num_batches_tracked too, so that
the file loads into timm with strict=True (without statistics it writes flax's initial ones,
mean 0, var 1).
A state dict stores neither the head width nor the image size: `model_config` gives timm's head
width 32 and the image size 32 x the partition size (timm's partition_ratio: 224 px for 7).
"""
from typing import Iterable, Mapping

import numpy as np

from vitjax.checkpoints import common
from vitjax.checkpoints import timm as timm_vit
from vitjax.models.maxvit import MaxViT

MODEL = MaxViT
FMT = "timm MaxViT"
LEAVES = {"scale": "weight", "kernel": "weight", "mean": "running_mean", "var": "running_var"}
RENAMES = {"norm": "head.norm", "pre_logits": "head.pre_logits.fc", "head": "head.fc"}
STATS = ("running_mean", "running_var", "num_batches_tracked")
HEAD_DIM = 32  # timm's maxvit_* configs (dim_head)
PARTITION_RATIO = 32  # timm: window = grid = image size / 32
MARKER = "attn_grid.attn.rel_pos.relative_position_bias_table"
TABLE = "attn.rel_pos.relative_position_bias_table"


def matches(sd: Mapping) -> bool:
  """True for a MaxViT state dict (grid attention: no other family has it)."""
  return any(k.endswith(MARKER) for k in sd)


# ------------------------------------------------------------------ names and layouts
def timm_key(path: str) -> str:
  """Our flat parameter (or statistic) name -> timm's state-dict key."""
  parts = path.split("/")
  if parts[0] in RENAMES:
    parts[0] = RENAMES[parts[0]]
  elif parts[0].startswith("stage_"):
    parts[:2] = [f"stages.{parts[0][len('stage_'):]}.blocks.{parts[1][len('block_'):]}"]
  parts = [{"shortcut_expand": "shortcut.expand"}.get(p, p) for p in parts]
  if parts[-1] == "relative_position_bias_table":
    parts[-1] = "rel_pos.relative_position_bias_table"
  parts[-1] = LEAVES.get(parts[-1], parts[-1])
  return ".".join(parts)


def to_torch_layout(path: str, x):
  if path.endswith("/kernel"):  # conv HWIO -> OIHW, Dense [in, out] -> Linear [out, in]
    return np.transpose(x, (3, 2, 0, 1)) if x.ndim == 4 else np.transpose(x)
  return x


def from_torch_layout(path: str, x):
  if path.endswith("/kernel"):
    return np.transpose(x, (2, 3, 1, 0)) if x.ndim == 4 else np.transpose(x)
  return x


def split_state_dict(sd: Mapping) -> tuple:
  """(parameters, BatchNorm buffers) of a cleaned state dict."""
  sd = timm_vit.clean_state_dict(sd)
  stats = {k: v for k, v in sd.items() if k.endswith(STATS)}
  return {k: v for k, v in sd.items() if k not in stats}, stats


# ------------------------------------------------------------------ architecture
def model_config(sd: Mapping) -> dict:
  """The vitjax MaxViT fields (plus num_classes, image_size) of a timm MaxViT state dict."""
  sd = timm_vit.clean_state_dict(sd)
  common.marker(sd, "stem.conv1.weight", "timm MaxViT state dict")
  stages = sorted({int(k.split(".")[1]) for k in sd if k.startswith("stages.")})
  first = lambda s, name: np.shape(sd[f"stages.{s}.blocks.0.{name}"])  # noqa: E731
  dims = tuple(int(first(s, "conv.conv3_1x1.weight")[0]) for s in stages)
  depths = tuple(len({k.split(".")[3] for k in sd if k.startswith(f"stages.{s}.blocks.")})
                 for s in stages)
  window = (first(0, f"attn_block.{TABLE}")[1] + 1) // 2
  grid = (first(0, f"attn_grid.{TABLE}")[1] + 1) // 2
  stem = (int(sd["stem.conv1.weight"].shape[0]), int(sd["stem.conv2.weight"].shape[0]))
  return dict(name="maxvit", embed_dims=dims, depths=depths,
              stem_width=stem[0] if stem[0] == stem[1] else stem,
              head_dim=dims[0] // int(first(0, f"attn_block.{TABLE}")[0]),
              window_size=int(window), grid_size=int(grid),
              mlp_ratio=float(first(0, "attn_block.mlp.fc1.weight")[0]) / dims[0],
              expand_ratio=float(first(0, "conv.conv1_1x1.weight")[0]) / dims[0],
              se_ratio=float(first(0, "conv.se.fc1.weight")[0]) / dims[0],
              head_hidden=int(sd["head.pre_logits.fc.weight"].shape[0]),
              qkv_bias="stages.0.blocks.0.attn_block.attn.qkv.bias" in sd,
              num_classes=int(sd["head.fc.weight"].shape[0]) if "head.fc.weight" in sd else 0,
              image_size=PARTITION_RATIO * int(window))


# ------------------------------------------------------------------ conversion
def to_timm(variables: Mapping, model) -> dict:
  """vitjax MaxViT parameters, or variables {"params", "batch_stats"}, -> a timm state dict
  (numpy), loadable with strict=True."""
  variables = common.to_numpy(variables)
  flat = common.flatten(variables.get("params", variables))
  sd = {timm_key(p): to_torch_layout(p, np.asarray(x)) for p, x in flat.items()}
  sd.update(common.batch_stats_to_state_dict(variables, model, timm_key))
  return sd


def from_timm(sd: Mapping, model, *, skip: Iterable[str] = ()) -> dict:
  """A timm MaxViT state dict -> parameters for `model` (nested dict of numpy arrays); skip and
  errors as `common.from_state_dict`."""
  params, _ = split_state_dict(sd)
  return common.from_state_dict(params, model, key=timm_key, layout=from_torch_layout, fmt=FMT,
                                model_config=model_config, skip=skip)


def batch_stats_from_timm(sd: Mapping, model) -> dict:
  """A timm MaxViT state dict's BatchNorm running statistics -> the model's `batch_stats`."""
  _, stats = split_state_dict(sd)
  return common.batch_stats_from_state_dict(stats, model, key=timm_key, fmt=FMT,
                                            hint=common.config_hint(model_config, sd))


def variables_from_timm(sd: Mapping, model, *, skip: Iterable[str] = ()) -> dict:
  """{"params", "batch_stats"} for `model` from a timm MaxViT state dict."""
  return {"params": from_timm(sd, model, skip=skip),
          "batch_stats": batch_stats_from_timm(sd, model)}


def load(path: str, model, **kw) -> dict:
  return from_timm(timm_vit.read_state_dict(path), model, **kw)


def load_variables(path: str, model, **kw) -> dict:
  return variables_from_timm(timm_vit.read_state_dict(path), model, **kw)


def save(path: str, variables: Mapping, model):
  timm_vit.write_state_dict(path, to_timm(variables, model))
