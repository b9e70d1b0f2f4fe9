"""timm Twins state dicts <-> vitjax `Twins` parameters (both directions).

timm's `Twins` (timm/models/twins.py) keeps the official Meituan-AutoML/Twins names (timm has no
checkpoint filter for them), so one mapping reads both. Names map one to one:

  patch_embeds.{i}.proj [D,C,p,p] / .norm      stage_{i}/patch_embed/proj [p,p,C,D] / norm
  blocks.{i}.{j}.norm1 / norm2 / mlp.fc1 / fc2 stage_{i}/block_{j}/...               (Linear: .T)
  blocks.{i}.{j}.attn.qkv / proj   (LSA)       stage_{i}/block_{j}/attn/qkv / proj
  blocks.{i}.{j}.attn.q / kv / sr / norm (GSA) stage_{i}/block_{j}/attn/q / kv / sr / norm
  pos_block.{i}.proj.0 [D,1,3,3]               stage_{i}/pos_block/proj [3,3,1,D]
  norm, head                                   norm, head
  .weight of a LayerNorm                       /scale

timm stores neither head counts nor window sizes: heads are width / 32 (Twins-SVT) or width / 64
(Twins-PCPVT) unless `num_heads` says otherwise, windows 7. A stage whose block 0 has `attn.qkv`
(LSA) is a Twins-SVT stage; GSA's sr ratio is its conv's kernel size (1 where it has none).
"""
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np

from vitjax.checkpoints import common, timm
from vitjax.models.twins import WINDOW, Twins

MODEL = Twins
LEAVES = {"scale": "weight", "kernel": "weight"}
FMT = "timm Twins"
MARKER = "pos_block.0.proj.0.weight"


def matches(sd: Mapping) -> bool:
  """True for a Twins state dict (timm's names, which are the official ones)."""
  return MARKER in sd or any(k.endswith("." + MARKER) for k in sd)


# ------------------------------------------------------------------ names and layouts
def timm_key(path: str) -> str:
  """Our flat parameter name -> timm's state-dict key."""
  parts = path.split("/")
  parts[-1] = LEAVES.get(parts[-1], parts[-1])
  if not parts[0].startswith("stage_"):
    return ".".join(parts)
  i, rest = parts[0][len("stage_"):], parts[1:]
  if rest[0] == "patch_embed":
    return ".".join([f"patch_embeds.{i}", *rest[1:]])
  if rest[0] == "pos_block":  # timm's PosConv wraps its conv in a Sequential
    return ".".join([f"pos_block.{i}.proj.0", *rest[2:]])
  return ".".join([f"blocks.{i}.{rest[0][len('block_'):]}", *rest[1:]])


def to_torch_layout(path: str, x):
  if path.endswith("/kernel"):  # conv HWIO -> OIHW, Dense [in, out] -> Linear [out, in]
    return np.transpose(x, (3, 2, 0, 1)) if x.ndim == 4 else np.transpose(x)
  return x


def from_torch_layout(path: str, x):
  if path.endswith("/kernel"):
    return np.transpose(x, (2, 3, 1, 0)) if x.ndim == 4 else np.transpose(x)
  return x


# ------------------------------------------------------------------ architecture
def model_config(sd: Mapping, *, num_heads: Optional[Sequence[int]] = None) -> dict:
  """The vitjax Twins fields (plus num_classes, image_size 224) of a timm Twins state dict."""
  sd = timm.clean_state_dict(sd)
  common.marker(sd, MARKER, "timm Twins state dict")
  stages = sorted({int(k.split(".")[1]) for k in sd if k.startswith("patch_embeds.")})
  windows = tuple(WINDOW if f"blocks.{i}.0.attn.qkv.weight" in sd else 1 for i in stages)
  svt = max(windows) > 1
  dims, depths, srs, ratios = [], [], [], []
  for i in stages:
    blocks = {int(k.split(".")[2]) for k in sd if k.startswith(f"blocks.{i}.")}
    width = int(sd[f"patch_embeds.{i}.proj.weight"].shape[0])
    sr = [sd[f"blocks.{i}.{j}.attn.sr.weight"] for j in sorted(blocks)
          if f"blocks.{i}.{j}.attn.sr.weight" in sd]
    dims.append(width)
    depths.append(len(blocks))
    srs.append(int(sr[0].shape[-1]) if sr else 1)
    ratios.append(int(sd[f"blocks.{i}.0.mlp.fc1.weight"].shape[0]) / width)
  heads = tuple(num_heads) if num_heads else tuple(max(1, d // (32 if svt else 64)) for d in dims)
  return dict(name="twins", embed_dims=tuple(dims), depths=tuple(depths), num_heads=heads,
              mlp_ratios=tuple(int(r) if r == int(r) else r for r in ratios),
              window_sizes=windows, sr_ratios=tuple(srs),
              num_classes=int(sd["head.weight"].shape[0]) if "head.weight" in sd else 0,
              image_size=224)


# ------------------------------------------------------------------ conversion
def to_timm(params: Mapping, model) -> dict:
  """vitjax Twins parameters -> a timm state dict (numpy)."""
  del model
  flat = common.flatten(common.to_numpy(params))
  return {timm_key(p): to_torch_layout(p, x) for p, x in flat.items()}


def from_timm(sd: Mapping, model, *, skip: Iterable[str] = ()) -> dict:
  """A timm Twins state dict -> parameters for `model` (nested dict of numpy arrays); skip and
  errors as `common.from_state_dict`."""
  return common.from_state_dict(timm.clean_state_dict(sd), model, key=timm_key,
                                layout=from_torch_layout, fmt=FMT, model_config=model_config,
                                skip=skip)


def load(path: str, model, **kw) -> dict:
  return from_timm(timm.read_state_dict(path), model, **kw)


def save(path: str, params: Mapping, model):
  timm.write_state_dict(path, to_timm(params, model))
