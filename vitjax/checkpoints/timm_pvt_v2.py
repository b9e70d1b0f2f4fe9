"""timm PVTv2 state dicts <-> vitjax `PVTv2` parameters (both directions).

timm's `PyramidVisionTransformerV2` (timm/models/pvt_v2.py) and the official whai362/PVT files
(`patch_embed1`, `block1.0`, `norm1`, `dwconv.dwconv`: renamed to timm's names on reading, as
timm's checkpoint_filter_fn does). Names map one to one:

  patch_embed.proj.weight [D,C,7,7]          patch_embed/proj/kernel [7,7,C,D]
  stages.{i}.downsample.proj / .norm         stage_{i}/downsample/proj / norm
  stages.{i}.blocks.{j}.attn.q / kv / proj   stage_{i}/block_{j}/attn/q / kv / proj  (Linear: .T)
  stages.{i}.blocks.{j}.attn.sr / .norm      stage_{i}/block_{j}/attn/sr / norm     (conv: HWIO)
  stages.{i}.blocks.{j}.mlp.dwconv [C,1,3,3] stage_{i}/block_{j}/mlp/dwconv/kernel [3,3,1,C]
  stages.{i}.norm, head                      stage_{i}/norm, head
  .weight of a LayerNorm                     /scale

timm stores no head counts: they are PVTv2's (1, 2, 5, 8) unless `num_heads` says otherwise. A
1x1 `attn.sr` marks the linear-SRA models (pvt_v2_*_li): `linear=True`.
"""
import re
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np

from vitjax.checkpoints import common, timm
from vitjax.models.pvt_v2 import PVTv2

MODEL = PVTv2
LEAVES = {"scale": "weight", "kernel": "weight"}
FMT = "timm PVTv2"


def matches(sd: Mapping) -> bool:
  """True for a PVTv2 state dict (timm's names or the official ones)."""
  return any(k.startswith(("stages.0.blocks.", "block1.")) for k in sd)


# ------------------------------------------------------------------ names and layouts
def timm_key(path: str) -> str:
  """Our flat parameter name -> timm's state-dict key."""
  parts = path.split("/")
  for i, part in enumerate(parts[:-1]):
    for ours, theirs in (("stage_", "stages."), ("block_", "blocks.")):
      if part.startswith(ours) and part[len(ours):].isdigit():
        parts[i] = theirs + part[len(ours):]
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
  """whai362/PVT names -> timm's (a timm-named dict is returned unchanged)."""
  if "patch_embed.proj.weight" in sd:
    return dict(sd)
  out = {}
  for k, v in sd.items():
    k = k.replace("dwconv.dwconv", "dwconv")
    k = re.sub(r"^patch_embed1\.", "patch_embed.", k)
    k = re.sub(r"^patch_embed(\d+)\.", lambda m: f"stages.{int(m[1]) - 1}.downsample.", k)
    k = re.sub(r"^block(\d+)\.(\d+)\.", lambda m: f"stages.{int(m[1]) - 1}.blocks.{m[2]}.", k)
    k = re.sub(r"^norm(\d+)\.", lambda m: f"stages.{int(m[1]) - 1}.norm.", k)
    out[k] = v
  return out


def _clean(sd: Mapping) -> dict:
  return from_official(timm.clean_state_dict(sd))


# ------------------------------------------------------------------ architecture
def model_config(sd: Mapping, *, num_heads: Optional[Sequence[int]] = None) -> dict:
  """The vitjax PVTv2 fields (plus num_classes, image_size 224) of a timm PVTv2 state dict."""
  sd = _clean(sd)
  common.marker(sd, "patch_embed.proj.weight", "timm PVTv2 state dict")
  stages = sorted({int(k.split(".")[1]) for k in sd if k.startswith("stages.")})
  dims, depths, srs, ratios = [], [], [], []
  for i in stages:
    blocks = {int(k.split(".")[3]) for k in sd if k.startswith(f"stages.{i}.blocks.")}
    width = int(sd[f"stages.{i}.norm.weight"].shape[0])
    sr = sd.get(f"stages.{i}.blocks.0.attn.sr.weight")
    dims.append(width)
    depths.append(len(blocks))
    srs.append(1 if sr is None else int(sr.shape[-1]))
    ratios.append(int(sd[f"stages.{i}.blocks.0.mlp.fc1.weight"].shape[0]) / width)
  # linear SRA: a 1x1 attn.sr in every stage (a strided one is R x R, and R = 1 has none)
  linear = any(k.endswith("attn.sr.weight") and sd[k].shape[-1] == 1 for k in sd)
  if linear:
    srs = [8, 4, 2, 1][:len(stages)]  # not stored, and not used by linear SRA
  heads = tuple(num_heads) if num_heads else (1, 2, 5, 8)[:len(stages)]
  return dict(name="pvt_v2", embed_dims=tuple(dims), depths=tuple(depths), num_heads=heads,
              sr_ratios=tuple(srs), mlp_ratios=tuple(int(r) if r == int(r) else r for r in ratios),
              qkv_bias="stages.0.blocks.0.attn.q.bias" in sd, linear=linear,
              num_classes=int(sd["head.weight"].shape[0]) if "head.weight" in sd else 0,
              image_size=224)


# ------------------------------------------------------------------ conversion
def to_timm(params: Mapping, model) -> dict:
  """vitjax PVTv2 parameters -> a timm state dict (numpy)."""
  flat = common.flatten(common.to_numpy(params))
  return {timm_key(p): to_torch_layout(p, x) for p, x in flat.items()}


def from_timm(sd: Mapping, model, *, skip: Iterable[str] = ()) -> dict:
  """A timm PVTv2 state dict -> parameters for `model` (nested dict of numpy arrays); skip and
  errors as `common.from_state_dict`."""
  return common.from_state_dict(_clean(sd), model, key=timm_key, layout=from_torch_layout,
                                fmt=FMT, model_config=model_config, skip=skip)


def load(path: str, model, **kw) -> dict:
  return from_timm(timm.read_state_dict(path), model, **kw)


def save(path: str, params: Mapping, model):
  timm.write_state_dict(path, to_timm(params, model))
