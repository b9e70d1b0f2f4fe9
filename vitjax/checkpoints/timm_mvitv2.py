"""timm MViTv2 state dicts <-> vitjax `MViTv2` parameters (both directions).

timm's `MultiScaleVit` (huggingface/pytorch-image-models, timm/models/mvitv2.py) and the official
facebookresearch/mvit files (`model_state`, flat `blocks.{i}`, the shortcut `proj`,
`head.projection`: renamed to timm's names on reading, as timm's checkpoint_filter_fn does).
Names map one to one:

  patch_embed.proj.weight [D,C,7,7]           patch_embed/kernel [7,7,C,D]
  stages.{s}.blocks.0.{...}                   pool_block_{s}/{...}   (s whose first block pools)
  stages.{s}.blocks.{j}.{...}                 stage_{s}/block_{j}/{...}
    .attn.qkv / .attn.proj (Linear)             attn/qkv / proj (.T)
    .attn.pool_q.weight [d,1,3,3]               attn/pool_q/kernel [3,3,1,d]  (and k, v)
    .attn.norm_q / .norm1 / .norm2              attn/norm_q / norm1 / norm2 (weight -> scale)
    .attn.rel_pos_h / rel_pos_w [L, d]          attn/rel_pos_h / rel_pos_w
    .shortcut_proj_attn / .mlp.fc1 / .mlp.fc2   shortcut_proj_attn / mlp/fc1 / mlp/fc2
  norm, head.fc                               norm, head

A state dict stores neither the strides nor the image size: `model_config` gives timm's query
strides (1, 2, 2, 2) and adaptive key/value stride 4, reads the heads from the rel-pos tables
(width / their head width) and the image size from stage 0's table (2 h - 1 entries, h = the
patch grid = image / 4). timm's *_cls variants ([CLS] token) and mvitv2_large (width grown in
the MLP, expand_attn=False) are refused.
"""
import re
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np

from vitjax.checkpoints import common
from vitjax.checkpoints import timm as timm_vit
from vitjax.models.mvitv2 import PATCH_STRIDE, MViTv2

MODEL = MViTv2
FMT = "timm MViTv2"
LEAVES = {"scale": "weight", "kernel": "weight"}
RENAMES = {"head": "head.fc", "patch_embed": "patch_embed.proj"}
MARKER = "attn.pool_q.weight"


def matches(sd: Mapping) -> bool:
  """True for an MViTv2 state dict (timm's names or the official ones): a pooled query."""
  sd = sd.get("model_state", sd) if isinstance(sd.get("model_state"), Mapping) else sd
  return any(k.endswith(MARKER) for k in sd)


# ------------------------------------------------------------------ names and layouts
def timm_key(path: str) -> str:
  """Our flat parameter name -> timm's state-dict key."""
  parts = path.split("/")
  first = parts[0]
  if first in RENAMES:
    parts[0] = RENAMES[first]
  elif first.startswith("pool_block_"):
    parts[0] = f"stages.{first[len('pool_block_'):]}.blocks.0"
  elif first.startswith("stage_"):
    parts[:2] = [f"stages.{first[len('stage_'):]}.blocks.{parts[1][len('block_'):]}"]
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


def from_official(sd: Mapping) -> dict:
  """An official facebookresearch/mvit state dict -> timm's keys: blocks.{i} split into stages
  where the width grows (a block with the shortcut `proj` begins a stage), `proj` ->
  `shortcut_proj_attn`, head.projection -> head.fc (timm's checkpoint_filter_fn)."""
  blocks = sorted({int(k.split(".")[1]) for k in sd if k.startswith("blocks.")})
  stage, index, where = -1, 0, {}
  for i in blocks:
    if i == 0 or f"blocks.{i}.proj.weight" in sd:
      stage, index = stage + 1, 0
    where[i] = (stage, index)
    index += 1
  out = {}
  for k, v in sd.items():
    k = re.sub(r"^blocks\.(\d+)\.proj\.", r"blocks.\1.shortcut_proj_attn.", k)
    k = re.sub(r"^blocks\.(\d+)", lambda m: "stages.{}.blocks.{}".format(*where[int(m[1])]), k)
    out[k.replace("head.projection", "head.fc")] = v
  return out


def clean_state_dict(sd: Mapping) -> dict:
  """timm's keys: wrappers removed, the official layout renamed."""
  if isinstance(sd.get("model_state"), Mapping):
    sd = sd["model_state"]
  sd = timm_vit.clean_state_dict(sd)
  if any(k.startswith("blocks.") for k in sd):
    return from_official(sd)
  return dict(sd)


# ------------------------------------------------------------------ architecture
def model_config(sd: Mapping, *, num_heads: Optional[Sequence[int]] = None) -> dict:
  """The vitjax MViTv2 fields (plus num_classes, image_size) of a timm MViTv2 state dict;
  num_heads, where given, overrides the heads read from the tables."""
  sd = clean_state_dict(sd)
  common.marker(sd, "stages.0.blocks.0." + MARKER, "timm MViTv2 state dict")
  if "cls_token" in sd or any("shortcut_proj_mlp" in k for k in sd):
    raise ValueError("MViTv2 here has no [CLS] token and widens in the attention (timm's "
                     "mvitv2_tiny/small/base); this file is a *_cls or mvitv2_large model")
  stages = sorted({int(k.split(".")[1]) for k in sd if k.startswith("stages.")})
  dims = tuple(int(sd[f"stages.{s}.blocks.0.norm2.weight"].shape[0]) for s in stages)
  depths = tuple(len({k.split(".")[3] for k in sd if k.startswith(f"stages.{s}.blocks.")})
                 for s in stages)
  head_dims = [int(sd[f"stages.{s}.blocks.0.attn.rel_pos_h"].shape[1]) for s in stages]
  table = int(sd["stages.0.blocks.0.attn.rel_pos_h"].shape[0])
  if num_heads is not None:
    num_heads = (num_heads,) * len(stages) if isinstance(num_heads, int) else tuple(num_heads)
  return dict(name="mvitv2", embed_dims=dims, depths=depths,
              num_heads=num_heads or tuple(d // h for d, h in zip(dims, head_dims)),
              q_strides=(1,) + (2,) * (len(stages) - 1),
              mlp_ratio=float(sd["stages.0.blocks.0.mlp.fc1.weight"].shape[0]) / dims[0],
              qkv_bias="stages.0.blocks.0.attn.qkv.bias" in sd,
              num_classes=int(sd["head.fc.weight"].shape[0]) if "head.fc.weight" in sd else 0,
              image_size=(table + 1) // 2 * PATCH_STRIDE)


# ------------------------------------------------------------------ conversion
def to_timm(params: Mapping, model) -> dict:
  """vitjax MViTv2 parameters -> a timm state dict (numpy), loadable with strict=True."""
  del model
  flat = common.flatten(common.to_numpy(params))
  return {timm_key(p): to_torch_layout(p, np.asarray(x)) for p, x in flat.items()}


def from_timm(sd: Mapping, model, *, skip: Iterable[str] = ()) -> dict:
  """A timm (or official) MViTv2 state dict -> parameters for `model` (nested dict of numpy
  arrays); skip and errors as `common.from_state_dict`."""
  return common.from_state_dict(clean_state_dict(sd), model, key=timm_key,
                                layout=from_torch_layout, fmt=FMT, model_config=model_config,
                                skip=skip)


def load(path: str, model, **kw) -> dict:
  return from_timm(timm_vit.read_state_dict(path), model, **kw)


def save(path: str, params: Mapping, model):
  timm_vit.write_state_dict(path, to_timm(params, model))
