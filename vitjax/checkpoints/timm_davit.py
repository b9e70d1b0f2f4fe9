"""timm DaViT state dicts <-> vitjax `DaViT` parameters (both directions).

timm's `DaVit` (huggingface/pytorch-image-models, timm/models/davit.py) and the official
dingmyu/davit files (`patch_embeds.{s}`, `main_blocks.{s}`, `cpe.0` / `cpe.1`, `norms`, `head`:
renamed to timm's names on reading, as timm's checkpoint_filter_fn does). Names map one to one:

  stem.conv.weight [D,C,7,7] / .norm                stem/conv/kernel [7,7,C,D] / stem/norm
  stages.{s}.downsample.norm / .conv                downsample_{s}/norm / conv  (s > 0)
  stages.{s}.blocks.{j}.{k}.cpe1.proj [C,1,3,3]     stage_{s}/block_{2j+k}/cpe1/proj [3,3,1,C]
  stages.{s}.blocks.{j}.{k}.attn.qkv / .proj        stage_{s}/block_{2j+k}/attn/qkv / proj (.T)
  stages.{s}.blocks.{j}.{k}.norm1 / norm2 / mlp     stage_{s}/block_{2j+k}/norm1 / norm2 / mlp
  head.norm, head.fc                                norm, head
  .weight of a LayerNorm                            /scale

(k = 0 the spatial block, k = 1 the channel block of dual unit j.) A state dict stores neither
the heads, the window nor the image size: `model_config` gives timm's head width 32 (heads =
width / 32, every timm variant), window 7 and 224 px unless told otherwise. Florence-2's
layout (`vision_tower.`) is not read.
"""
import re
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np

from vitjax.checkpoints import common
from vitjax.checkpoints import timm as timm_vit
from vitjax.models.davit import DaViT

MODEL = DaViT
FMT = "timm DaViT"
LEAVES = {"scale": "weight", "kernel": "weight"}
HEAD_DIM = 32  # timm's davit_* variants: width / heads
RENAMES = {"norm": "head.norm", "head": "head.fc"}
OFFICIAL_MARKER = "patch_embeds.0.proj.weight"


def matches(sd: Mapping) -> bool:
  """True for a DaViT state dict (timm's names or the official ones)."""
  return any(k.endswith(("stem.conv.weight", OFFICIAL_MARKER)) for k in sd)


# ------------------------------------------------------------------ names and layouts
def timm_key(path: str) -> str:
  """Our flat parameter name -> timm's state-dict key."""
  parts = path.split("/")
  first = parts[0]
  if first in RENAMES:
    parts[0] = RENAMES[first]
  elif first.startswith("downsample_"):
    parts[0] = f"stages.{first[len('downsample_'):]}.downsample"
  elif first.startswith("stage_"):
    block = int(parts[1][len("block_"):])
    parts[:2] = [f"stages.{first[len('stage_'):]}.blocks.{block // 2}.{block % 2}"]
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


def from_official(key: str) -> str:
  """An official dingmyu/davit key -> timm's (the renames of timm's checkpoint_filter_fn)."""
  key = re.sub(r"patch_embeds\.(\d+)", r"stages.\1.downsample", key)
  key = re.sub(r"main_blocks\.(\d+)", r"stages.\1.blocks", key)
  key = key.replace("downsample.proj", "downsample.conv").replace("stages.0.downsample", "stem")
  key = key.replace("head.", "head.fc.").replace("norms.", "head.norm.")
  return key.replace("cpe.0", "cpe1").replace("cpe.1", "cpe2")


def clean_state_dict(sd: Mapping) -> dict:
  """timm's keys: wrappers removed, the official layout renamed."""
  sd = timm_vit.clean_state_dict(sd)
  if OFFICIAL_MARKER in sd and "stem.conv.weight" not in sd:
    return {from_official(k): v for k, v in sd.items()}
  return dict(sd)


# ------------------------------------------------------------------ architecture
def model_config(sd: Mapping, *, num_heads: Optional[Sequence[int]] = None) -> dict:
  """The vitjax DaViT fields (plus num_classes, image_size 224) of a timm DaViT state dict."""
  sd = clean_state_dict(sd)
  common.marker(sd, "stem.conv.weight", "timm DaViT state dict")
  stages = sorted({int(k.split(".")[1]) for k in sd if k.startswith("stages.")})
  dims = tuple(int(sd[f"stages.{s}.blocks.0.0.norm1.weight"].shape[0]) for s in stages)
  depths = tuple(len({k.split(".")[3] for k in sd if k.startswith(f"stages.{s}.blocks.")})
                 for s in stages)
  if num_heads is not None:
    num_heads = (num_heads,) * len(stages) if isinstance(num_heads, int) else tuple(num_heads)
  heads = num_heads or tuple(max(1, d // HEAD_DIM) for d in dims)
  return dict(name="davit", embed_dims=dims, depths=depths, num_heads=heads,
              mlp_ratio=float(sd["stages.0.blocks.0.0.mlp.fc1.weight"].shape[0]) / dims[0],
              qkv_bias="stages.0.blocks.0.0.attn.qkv.bias" in sd,
              num_classes=int(sd["head.fc.weight"].shape[0]) if "head.fc.weight" in sd else 0,
              image_size=224)


# ------------------------------------------------------------------ conversion
def to_timm(params: Mapping, model) -> dict:
  """vitjax DaViT parameters -> a timm state dict (numpy), loadable with strict=True."""
  del model
  flat = common.flatten(common.to_numpy(params))
  return {timm_key(p): to_torch_layout(p, np.asarray(x)) for p, x in flat.items()}


def from_timm(sd: Mapping, model, *, skip: Iterable[str] = ()) -> dict:
  """A timm (or official) DaViT state dict -> parameters for `model` (nested dict of numpy
  arrays); skip and errors as `common.from_state_dict`."""
  return common.from_state_dict(clean_state_dict(sd), model, key=timm_key,
                                layout=from_torch_layout, fmt=FMT, model_config=model_config,
                                skip=skip)


def load(path: str, model, **kw) -> dict:
  return from_timm(timm_vit.read_state_dict(path), model, **kw)


def save(path: str, params: Mapping, model):
  timm_vit.write_state_dict(path, to_timm(params, model))
