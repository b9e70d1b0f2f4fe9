"""timm Swin Transformer state dicts <-> vitjax `Swin` parameters (both directions).

timm's `SwinTransformer` (huggingface/pytorch-image-models, timm/models/swin_transformer.py;
its `checkpoint_filter_fn` also reads the official microsoft/Swin-Transformer files). Names map
one to one:

  patch_embed.proj.weight [D,C,p,p]              embedding_kernel [p,p,C,D]
  patch_embed.norm.weight / .bias                embedding_norm/scale / bias
  layers.{s}.downsample.norm / .reduction        merge_{s}/norm / reduction  (s > 0)
  layers.{s}.blocks.{j}.attn.qkv.weight [3D,D]   stage_{s}/block_{j}/attn/qkv/kernel [D,3D]
  layers.{s}.blocks.{j}.attn.relative_position_bias_table   .../attn/relative_position_bias_table
  norm, head.fc                                  norm, head

The official layout (patch merging at the end of stage s - 1, `head.weight`) is renamed on
reading as timm does; the non-persistent buffers (relative_position_index, attn_mask) are dropped.
A state dict does not store the image size: `model_config` takes the size at which the last
stage's grid equals the window (224 px for window 7, 384 px for window 12: timm's pretrained
models). Relative position tables of another window size are not resampled (a shape mismatch).
"""
import re
from typing import Iterable, Mapping, Optional

import numpy as np

from vitjax.checkpoints import common
from vitjax.checkpoints import timm as timm_vit
from vitjax.models.swin import Swin

MARKER = "layers.0.blocks.0.attn.relative_position_bias_table"
BUFFERS = ("relative_position_index", "attn_mask")
RENAMES = {"embedding_kernel": "patch_embed.proj.weight", "embedding_bias": "patch_embed.proj.bias",
           "head/kernel": "head.fc.weight", "head/bias": "head.fc.bias"}
MODEL = Swin


def matches(sd: Mapping) -> bool:
  """True for a Swin state dict (timm's names or the official ones)."""
  return any(k.endswith(MARKER) for k in sd)


# ------------------------------------------------------------------ names and layouts
def timm_key(path: str) -> str:
  """Our flat parameter name -> timm's state-dict key."""
  if path in RENAMES:
    return RENAMES[path]
  parts = path.split("/")
  if parts[0] == "embedding_norm":
    parts[0] = "patch_embed.norm"
  elif parts[0].startswith("merge_"):
    parts[0] = f"layers.{parts[0][len('merge_'):]}.downsample"
  elif parts[0].startswith("stage_"):
    parts[:2] = [f"layers.{parts[0][len('stage_'):]}.blocks.{parts[1][len('block_'):]}"]
  parts[-1] = timm_vit.LEAVES.get(parts[-1], parts[-1])
  return ".".join(parts)


# the same layouts as the ViT's: conv kernel [p,p,C,D] <-> [D,C,p,p], Linear kernels transposed
to_torch_layout, from_torch_layout = timm_vit.to_torch_layout, timm_vit.from_torch_layout


def clean_state_dict(sd: Mapping) -> dict:
  """timm's keys: wrappers and buffers removed, the official layout renamed (as timm's
  checkpoint_filter_fn)."""
  sd = timm_vit.clean_state_dict(sd)
  official = "head.weight" in sd and "head.fc.weight" not in sd
  out = {}
  for k, v in sd.items():
    if any(b in k for b in BUFFERS):
      continue
    if official:
      k = re.sub(r"layers\.(\d+)\.downsample",
                 lambda m: f"layers.{int(m.group(1)) + 1}.downsample", k)
      k = k.replace("head.", "head.fc.")
    out[k] = v
  return out


# ------------------------------------------------------------------ architecture
def model_config(sd: Mapping, *, num_heads: Optional[int] = None) -> dict:
  """The vitjax Swin fields (plus num_classes, image_size) of a timm Swin state dict; the heads
  of each stage are read from its relative position tables."""
  if num_heads is not None:
    raise ValueError(f"num_heads={num_heads} does not apply to a Swin file: its heads per stage "
                     "are read from the relative position tables; leave num_heads unset")
  sd = clean_state_dict(sd)
  embed_dim, _, patch, _ = common.marker(sd, "patch_embed.proj.weight",
                                         "timm Swin state dict").shape
  common.marker(sd, MARKER, "timm Swin state dict")
  stages = sorted({int(k.split(".")[1]) for k in sd if k.startswith("layers.")})
  depths = tuple(len({k.split(".")[3] for k in sd if k.startswith(f"layers.{s}.blocks.")})
                 for s in stages)
  heads = tuple(int(sd[f"layers.{s}.blocks.0.attn.relative_position_bias_table"].shape[1])
                for s in stages)
  table = sd[MARKER].shape[0]
  window = (int(round(np.sqrt(table))) + 1) // 2
  cfg = dict(name="swin", patch_size=int(patch), embed_dim=int(embed_dim), depths=depths,
             num_heads=heads, window_size=window,
             mlp_ratio=float(sd["layers.0.blocks.0.mlp.fc1.weight"].shape[0]) / embed_dim,
             qkv_bias="layers.0.blocks.0.attn.qkv.bias" in sd)
  cfg["num_classes"] = int(sd["head.fc.weight"].shape[0]) if "head.fc.weight" in sd else 0
  cfg["image_size"] = window * int(patch) * 2 ** (len(stages) - 1)
  return cfg


# ------------------------------------------------------------------ conversion
def to_timm(params: Mapping, model) -> dict:
  """vitjax Swin parameters -> a timm state dict (numpy), loadable with strict=True."""
  flat = common.flatten(common.to_numpy(params))
  return {timm_key(p): to_torch_layout(p, np.asarray(x)) for p, x in flat.items()}


def from_timm(sd: Mapping, model, *, skip: Iterable[str] = ()) -> dict:
  """A timm Swin state dict -> parameters for `model` (nested dict of numpy arrays); skip and
  errors as `common.from_state_dict`."""
  return common.from_state_dict(clean_state_dict(sd), model, key=timm_key, layout=from_torch_layout,
                                fmt="timm Swin", model_config=model_config, skip=skip)


def load(path: str, model, **kw) -> dict:
  return from_timm(timm_vit.read_state_dict(path), model, **kw)


def save(path: str, params: Mapping, model):
  timm_vit.write_state_dict(path, to_timm(params, model))
