"""timm GC ViT state dicts <-> vitjax `GCViT` parameters (both directions).

timm's `GlobalContextVit` (huggingface/pytorch-image-models, timm/models/gcvit.py). Names map one
to one:

  stem.conv1 / stem.down.{norm1, conv_block, reduction, norm2}   stem/conv1 / stem/down/...
  stages.{s}.downsample.*                                         downsample_{s}/*  (s > 0)
  stages.{s}.global_block.blocks.conv{i}.*                        global_{s}/conv{i}/*
  *.conv_block / conv{i}: conv_dw, se.fc1, se.fc2, conv_pw        conv_dw, se/fc1, se/fc2, conv_pw
  stages.{s}.blocks.{j}.attn.rel_pos.relative_position_bias_table
                                     stage_{s}/block_{first_s + j}/attn/relative_position_bias_table
  stages.{s}.blocks.{j}.{norm1, attn.qkv, attn.proj, norm2, mlp, ls1, ls2}
                                     stage_{s}/block_{first_s + j}/... (Linear .T)
  stages.{last}.norm, head.fc                                     norm, head
  .weight of a LayerNorm                                          /scale
  conv [O, I, kh, kw]                                             kernel [kh, kw, I, O]

(first_s: the blocks before stage s; our block names count over the whole model.) A state dict
stores the heads (the tables' columns) and square windows (their rows) but not the image size:
`model_config` gives 224 px and timm's window_ratio unless the tables tell other square windows.
The official NVlabs/GCVit layout is not read.
"""
import math
from typing import Iterable, Mapping

import numpy as np

from vitjax.checkpoints import common
from vitjax.checkpoints import timm as timm_vit
from vitjax.models.gcvit import GCViT

MODEL = GCViT
FMT = "timm GC ViT"
LEAVES = {"scale": "weight", "kernel": "weight"}
MARKER = "stages.0.global_block.blocks.conv1.conv_dw.weight"
TABLE = "attn.rel_pos.relative_position_bias_table"


def matches(sd: Mapping) -> bool:
  """True for a GC ViT state dict (timm's names)."""
  return any(k.endswith(MARKER) for k in sd)


# ------------------------------------------------------------------ names and layouts
def key_fn(model):
  """Our flat parameter name -> timm's state-dict key, for `model`'s stage depths."""
  firsts = np.cumsum([0, *model.depths])
  last = len(model.depths) - 1

  def key(path: str) -> str:
    parts = path.split("/")
    first = parts[0]
    if first == "norm":
      parts[0] = f"stages.{last}.norm"
    elif first == "head":
      parts[0] = "head.fc"
    elif first.startswith("downsample_"):
      parts[0] = f"stages.{first[len('downsample_'):]}.downsample"
    elif first.startswith("global_"):
      parts[0] = f"stages.{first[len('global_'):]}.global_block.blocks"
    elif first.startswith("stage_"):
      s = int(first[len("stage_"):])
      j = int(parts[1][len("block_"):]) - int(firsts[s])
      parts[:2] = [f"stages.{s}.blocks.{j}"]
      if parts[-1] == "relative_position_bias_table":
        parts[-2:] = [TABLE]
    parts[-1] = LEAVES.get(parts[-1], parts[-1])
    return ".".join(parts)
  return key


def to_torch_layout(path: str, x):
  if path.endswith("/kernel"):  # conv HWIO -> OIHW, Dense [in, out] -> Linear [out, in]
    return np.transpose(x, (3, 2, 0, 1)) if x.ndim == 4 else np.transpose(x)
  return x


def from_torch_layout(path: str, x):
  if path.endswith("/kernel"):
    return np.transpose(x, (2, 3, 1, 0)) if x.ndim == 4 else np.transpose(x)
  return x


# ------------------------------------------------------------------ architecture
def model_config(sd: Mapping, *, num_heads=None) -> dict:
  """The vitjax GC ViT fields (plus num_classes, image_size 224) of a timm state dict; the heads
  are the tables' (num_heads, if given, must agree)."""
  sd = timm_vit.clean_state_dict(sd)
  common.marker(sd, MARKER, "timm GC ViT state dict")
  stages = sorted({int(k.split(".")[1]) for k in sd if k.startswith("stages.")})
  depths = tuple(len({k.split(".")[3] for k in sd if k.startswith(f"stages.{s}.blocks.")})
                 for s in stages)
  tables = [sd[f"stages.{s}.blocks.0.{TABLE}"].shape for s in stages]
  sides = [(math.isqrt(int(t[0])) + 1) // 2 for t in tables]
  windows = {}
  # a square window w has (2w - 1)^2 rows; timm's own windows (window_ratio at 224 px) and
  # non-square ones (not told apart by their rows) are left to window_ratio
  if all((2 * w - 1) ** 2 == int(t[0]) for w, t in zip(sides, tables)) and \
      tuple(sides) != (7, 7, 14, 7)[:len(sides)]:
    windows = dict(window_size=tuple(sides))
  dim = int(sd["stem.conv1.weight"].shape[0])
  ls = "stages.0.blocks.0.ls1.gamma" in sd
  heads = tuple(int(t[1]) for t in tables)
  if num_heads is not None and tuple(np.broadcast_to(num_heads, len(heads))) != heads:
    raise ValueError(f"num_heads {num_heads} disagrees with the file's position tables, which "
                     f"have {heads} heads; leave num_heads out")
  return dict(name="gcvit", embed_dim=dim, depths=depths,
              num_heads=heads, **windows,
              mlp_ratio=float(sd["stages.0.blocks.0.mlp.fc1.weight"].shape[0]) / dim,
              layer_scale=1e-5 if ls else None,  # an initial value: not stored
              qkv_bias="stages.0.blocks.0.attn.qkv.bias" in sd,
              num_classes=int(sd["head.fc.weight"].shape[0]) if "head.fc.weight" in sd else 0,
              image_size=224)


# ------------------------------------------------------------------ conversion
def to_timm(params: Mapping, model) -> dict:
  """vitjax GC ViT parameters -> a timm state dict (numpy), loadable with strict=True."""
  key = key_fn(model)
  flat = common.flatten(common.to_numpy(params))
  return {key(p): to_torch_layout(p, np.asarray(x)) for p, x in flat.items()}


def from_timm(sd: Mapping, model, *, skip: Iterable[str] = ()) -> dict:
  """A timm GC ViT state dict -> parameters for `model` (nested dict of numpy arrays); skip and
  errors as `common.from_state_dict`."""
  return common.from_state_dict(timm_vit.clean_state_dict(sd), model, key=key_fn(model),
                                layout=from_torch_layout, fmt=FMT, model_config=model_config,
                                skip=skip)


def load(path: str, model, **kw) -> dict:
  return from_timm(timm_vit.read_state_dict(path), model, **kw)


def save(path: str, params: Mapping, model):
  timm_vit.write_state_dict(path, to_timm(params, model))
