"""Official CvT state dicts <-> vitjax `CvT` parameters and BatchNorm statistics.

The official microsoft/CvT model (lib/models/cls_cvt.py, ConvolutionalVisionTransformer; its
released `.pth` files, read as timm files are: `.pth` needs PyTorch, `.safetensors` does not).
timm has no CvT. Names map one to one:

  stage{s}.patch_embed.proj [D,C,k,k] / .norm          embed_{s}/proj [k,k,C,D] / embed_{s}/norm
  stage{s}.cls_token (last stage)                      cls
  stage{s}.blocks.{j}.norm1 / norm2 / mlp.fc1 / fc2    stage_{s}/block_{j}/norm1 / ...
  stage{s}.blocks.{j}.attn.conv_proj_{q,k,v}.conv      stage_{s}/block_{j}/attn/conv_proj_q/conv
    [C,1,3,3] / .bn (weight, bias)                       [3,3,1,C] / bn (scale, bias)
  stage{s}.blocks.{j}.attn.proj_{q,k,v} / proj         .../attn/proj_{q,k,v} / proj (.T)
  norm, head                                           norm, head
  BatchNorm running_mean / running_var                 batch_stats .../bn/mean / var

The parameters come from `from_official` / `load` (as every family); the BatchNorm running
statistics, which the model needs in evaluation, from `batch_stats_from_official`, or both at
once as flax variables from `variables_from_official` / `load_variables`. `to_official` takes
parameters or variables ({"params", "batch_stats"}) and writes num_batches_tracked too, so that
the file loads into the official model with strict=True (without statistics it writes flax's
initial ones, mean 0, var 1). A state dict stores neither the heads, the strides nor the image
size: `model_config` gives the official head width 64 (heads = width / 64, every official
config), the official embedding strides and paddings, stride_kv 2 and 224 px.
"""
import re
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np

from vitjax.checkpoints import common
from vitjax.checkpoints import timm as timm_vit
from vitjax.models import cvt as cvt_lib

MODEL = cvt_lib.CvT
FMT = "official CvT"
LEAVES = {"scale": "weight", "kernel": "weight", "mean": "running_mean", "var": "running_var"}
STATS = ("running_mean", "running_var", "num_batches_tracked")
HEAD_DIM = 64  # every official config: width / heads
MARKER = "stage0.patch_embed.proj.weight"


def matches(sd: Mapping) -> bool:
  """True for an official CvT state dict."""
  return any(k == MARKER or k.endswith("." + MARKER) for k in sd)


# ------------------------------------------------------------------ names and layouts
def official_key(path: str, model) -> str:
  """Our flat parameter (or statistic) name -> the official state-dict key."""
  parts = path.split("/")
  first = parts[0]
  if first == "cls":
    return f"stage{len(model.depths) - 1}.cls_token"
  if first.startswith("embed_"):
    parts[0] = f"stage{first[len('embed_'):]}.patch_embed"
  elif first.startswith("stage_"):
    parts[:2] = [f"stage{first[len('stage_'):]}.blocks.{parts[1][len('block_'):]}"]
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
def model_config(sd: Mapping, *, num_heads: Optional[Sequence[int]] = None) -> dict:
  """The vitjax CvT fields (plus num_classes, image_size 224) of an official CvT state dict;
  heads width / 64 unless given (one int for every stage, or one per stage)."""
  sd = timm_vit.clean_state_dict(sd)
  common.marker(sd, MARKER, "official CvT state dict")
  stages = sorted({int(m.group(1)) for k in sd for m in [re.match(r"stage(\d+)\.", k)] if m})
  embed = [np.shape(sd[f"stage{s}.patch_embed.proj.weight"]) for s in stages]
  dims = tuple(int(e[0]) for e in embed)
  depths = tuple(len({k.split(".")[2] for k in sd if k.startswith(f"stage{s}.blocks.")})
                 for s in stages)
  attn = "stage0.blocks.0.attn."
  n = len(stages)
  if num_heads is not None:
    num_heads = (num_heads,) * n if isinstance(num_heads, int) else tuple(num_heads)
  return dict(name="cvt", embed_dims=dims, depths=depths,
              num_heads=num_heads or tuple(max(1, d // HEAD_DIM) for d in dims),
              patch_sizes=tuple(int(e[-1]) for e in embed),
              patch_strides=cvt_lib.PATCH_STRIDES[:n], patch_paddings=cvt_lib.PATCH_PADDINGS[:n],
              mlp_ratio=float(np.shape(sd["stage0.blocks.0.mlp.fc1.weight"])[0]) / dims[0],
              kernel_size=int(np.shape(sd[attn + "conv_proj_q.conv.weight"])[-1]),
              qkv_bias=attn + "proj_q.bias" in sd,
              class_token=f"stage{stages[-1]}.cls_token" in sd,
              num_classes=int(np.shape(sd["head.weight"])[0]) if "head.weight" in sd else 0,
              image_size=224)


# ------------------------------------------------------------------ conversion
def to_official(variables: Mapping, model) -> dict:
  """vitjax CvT parameters, or variables {"params", "batch_stats"}, -> an official state dict
  (numpy), loadable with strict=True."""
  variables = common.to_numpy(variables)
  key = lambda p: official_key(p, model)  # noqa: E731
  sd = {key(p): to_torch_layout(p, np.asarray(x))
        for p, x in common.flatten(variables.get("params", variables)).items()}
  sd.update(common.batch_stats_to_state_dict(variables, model, key))
  return sd


def from_official(sd: Mapping, model, *, skip: Iterable[str] = ()) -> dict:
  """An official CvT state dict -> parameters for `model` (nested dict of numpy arrays); skip
  and errors as `common.from_state_dict`."""
  params, _ = split_state_dict(sd)
  return common.from_state_dict(params, model, key=lambda p: official_key(p, model),
                                layout=from_torch_layout, fmt=FMT, model_config=model_config,
                                skip=skip)


def batch_stats_from_official(sd: Mapping, model) -> dict:
  """An official CvT state dict's BatchNorm running statistics -> the model's `batch_stats`."""
  _, stats = split_state_dict(sd)
  return common.batch_stats_from_state_dict(stats, model, key=lambda p: official_key(p, model),
                                            fmt=FMT, hint=common.config_hint(model_config, sd))


def variables_from_official(sd: Mapping, model, *, skip: Iterable[str] = ()) -> dict:
  """{"params", "batch_stats"} for `model` from an official CvT state dict."""
  return {"params": from_official(sd, model, skip=skip),
          "batch_stats": batch_stats_from_official(sd, model)}


def load(path: str, model, **kw) -> dict:
  return from_official(timm_vit.read_state_dict(path), model, **kw)


def load_variables(path: str, model, **kw) -> dict:
  return variables_from_official(timm_vit.read_state_dict(path), model, **kw)


def save(path: str, variables: Mapping, model):
  timm_vit.write_state_dict(path, to_official(variables, model))
