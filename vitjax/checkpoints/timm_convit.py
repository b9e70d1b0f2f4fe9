"""timm ConViT state dicts <-> vitjax `ConViT` parameters (both directions).

timm's `ConVit` (huggingface/pytorch-image-models, timm/models/convit.py), whose names are the
official facebookresearch/convit ones. Names map one to one:

  patch_embed.proj.weight [D,C,p,p]        embedding_kernel [p,p,C,D]
  cls_token, pos_embed [1,N,D]             cls, pos_embedding (patches only: no [CLS] row)
  blocks.{i}.attn.qk / v / proj            block_{i}/attn/qk / v / proj        (GPSA; Linear: .T)
  blocks.{i}.attn.pos_proj.weight [H,3]    block_{i}/attn/pos_proj/kernel [3,H]
  blocks.{i}.attn.gating_param [H]         block_{i}/attn/gating_param
  blocks.{i}.attn.qkv / proj               block_{i}/attn/qkv / proj           (MHSA)
  blocks.{i}.norm1 / norm2 / mlp.fc1 / fc2 the same names (.weight of a LayerNorm: /scale)
  norm, head                               norm, head

A ConViT file is told from a ViT file by its `attn.gating_param`s; their number is
local_up_to_layer and their length the number of heads. The position embedding is resampled to
the model's grid (GPSA's relative positions follow any square grid).
"""
from typing import Iterable, Mapping, Optional

import numpy as np

from vitjax.checkpoints import common
from vitjax.checkpoints import timm as timm_vit
from vitjax.models import resample_posemb
from vitjax.models.convit import ConViT

MODEL = ConViT
FMT = "timm ConViT"
RENAMES = {"embedding_kernel": "patch_embed.proj.weight", "embedding_bias": "patch_embed.proj.bias",
           "cls": "cls_token", "pos_embedding": "pos_embed"}


def matches(sd: Mapping) -> bool:
  """True for a ConViT state dict (GPSA's gating parameters; a ViT file has none)."""
  return any(k.endswith("attn.gating_param") for k in sd)


# ------------------------------------------------------------------ names and layouts
def timm_key(path: str) -> str:
  """Our flat parameter name -> timm's state-dict key."""
  if path in RENAMES:
    return RENAMES[path]
  parts = path.split("/")
  if parts[0].startswith("block_"):
    parts[0] = "blocks." + parts[0][len("block_"):]
  parts[-1] = timm_vit.LEAVES.get(parts[-1], parts[-1])
  return ".".join(parts)


# the ViT's layouts: conv kernel [p,p,C,D] <-> [D,C,p,p], Linear kernels transposed
to_torch_layout = timm_vit.to_torch_layout


def importer_layout(model):
  """from_torch_layout for `model`: the ViT's, and the position embedding resampled to the
  model's grid."""
  def layout(path: str, x):
    if path == "pos_embedding":
      return resample_posemb(x, model.grid, num_prefix=0)
    return timm_vit.from_torch_layout(path, x)
  return layout


# ------------------------------------------------------------------ architecture
def model_config(sd: Mapping, *, num_heads: Optional[int] = None) -> dict:
  """The vitjax ConViT fields (plus num_classes, image_size) of a timm ConViT state dict."""
  sd = timm_vit.clean_state_dict(sd)
  width, _, patch, _ = common.marker(sd, "patch_embed.proj.weight", "timm ConViT state dict").shape
  depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
  gates = [k for k in sd if k.startswith("blocks.") and k.endswith("attn.gating_param")]
  if not gates:
    raise common.CheckpointMismatch("not a timm ConViT state dict: no blocks.*.attn.gating_param")
  heads = num_heads or int(sd[gates[0]].shape[0])
  cfg = dict(name="convit", patch_size=int(patch), width=int(width), depth=depth,
             num_heads=int(heads), mlp_dim=int(sd["blocks.0.mlp.fc1.weight"].shape[0]),
             local_up_to_layer=len(gates), qkv_bias="blocks.0.attn.qk.bias" in sd)
  if "pos_embed" in sd:
    cfg["image_size"] = int(round(np.sqrt(sd["pos_embed"].shape[1]))) * int(patch)
  else:
    cfg.update(posemb="none", image_size=224)
  cfg["num_classes"] = int(sd["head.weight"].shape[0]) if "head.weight" in sd else 0
  return cfg


# ------------------------------------------------------------------ conversion
def to_timm(params: Mapping, model) -> dict:
  """vitjax ConViT parameters -> a timm state dict (numpy), loadable with strict=True."""
  del model
  flat = common.flatten(common.to_numpy(params))
  return {timm_key(p): to_torch_layout(p, np.asarray(x)) for p, x in flat.items()}


def from_timm(sd: Mapping, model, *, skip: Iterable[str] = ()) -> dict:
  """A timm ConViT state dict -> parameters for `model` (nested dict of numpy arrays); skip and
  errors as `common.from_state_dict`."""
  return common.from_state_dict(timm_vit.clean_state_dict(sd), model, key=timm_key,
                                layout=importer_layout(model), fmt=FMT,
                                model_config=model_config, skip=skip)


def load(path: str, model, **kw) -> dict:
  return from_timm(timm_vit.read_state_dict(path), model, **kw)


def save(path: str, params: Mapping, model):
  timm_vit.write_state_dict(path, to_timm(params, model))
