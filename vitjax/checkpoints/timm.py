"""timm ViT / DeiT state dicts <-> vitjax parameters (both directions).

Covers timm's `VisionTransformer` (class token or average pooling, with or without `fc_norm`,
register tokens, layer scale, qk-norm, `no_embed_class`) and `VisionTransformerDistilled` (DeiT
with a distillation token and `head_dist`). Names map one to one:

  patch_embed.proj.weight [D,C,p,p]      embedding_kernel [p,p,C,D]
  blocks.{i}.attn.qkv.weight [3D,D]      block_{i}/attn/qkv/kernel [D,3D]   (same q|k|v, head order)
  blocks.{i}.norm1.weight / .bias        block_{i}/norm1/scale / bias
  blocks.{i}.ls1.gamma                   block_{i}/ls1/gamma
  cls_token, dist_token, reg_token       cls, dist, registers
  pos_embed                              pos_embedding (+ folded into prefix tokens, see common.py)
  norm / fc_norm / head / head_dist      the same names

`.safetensors` files are read and written with the `safetensors` package's numpy API: no PyTorch
needed. `.pth` / `.pt` / `.bin` files need PyTorch installed.
"""
import os
from typing import Iterable, Mapping, Optional

import numpy as np

from vitjax.checkpoints import common
from vitjax.models import VARIANTS

TORCH_SUFFIXES = (".pth", ".pt", ".bin")
SUFFIXES = (".safetensors",) + TORCH_SUFFIXES
TOKEN_KEYS = {"cls": "cls_token", "dist": "dist_token", "registers": "reg_token"}
RENAMES = {"embedding_kernel": "patch_embed.proj.weight", "embedding_bias": "patch_embed.proj.bias"}
LEAVES = {"scale": "weight", "kernel": "weight"}
HEADS_BY_WIDTH = {w: h for w, _, _, h in VARIANTS.values()}


# ------------------------------------------------------------------ names and layouts
def timm_key(path: str) -> str:
  """Our flat parameter name -> timm's state-dict key."""
  if path in RENAMES:
    return RENAMES[path]
  parts = path.split("/")
  if parts[0].startswith("block_"):
    parts[0] = "blocks." + parts[0][len("block_"):]
  parts[-1] = LEAVES.get(parts[-1], parts[-1])
  return ".".join(parts)


def to_torch_layout(path: str, x):
  if path == "embedding_kernel":
    return np.transpose(x, (3, 2, 0, 1))
  if path.endswith("/kernel"):
    return np.transpose(x)  # torch Linear stores [out, in]
  return x


def from_torch_layout(path: str, x):
  if path == "embedding_kernel":
    return np.transpose(x, (2, 3, 1, 0))
  if path.endswith("/kernel"):
    return np.transpose(x)
  return x


def _is_prefix_or_posemb(path: str) -> bool:
  return path in common.PREFIX_NAMES or path == "pos_embedding"


def _check_supported(model):
  if model.pool == "map":
    raise ValueError("pool='map' has no timm mapping here (timm's attention pooling is a "
                     "different module); use pool='cls' or 'gap'")


# ------------------------------------------------------------------ files
def clean_state_dict(sd: Mapping) -> dict:
  """Unwraps {"model": sd} / {"state_dict": sd} (DeiT's .pth files) and DDP's `module.` prefix."""
  for key in ("model", "state_dict"):
    if key in sd and isinstance(sd[key], Mapping):
      sd = sd[key]
  return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}


def _torch():
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("reading or writing .pth/.pt/.bin checkpoints needs PyTorch; without it "
                      "use .safetensors (e.g. convert once where torch is installed with "
                      "safetensors.torch.save_file(state_dict, 'model.safetensors'))") from e
  return torch


def read_state_dict(path: str) -> dict:
  """A timm checkpoint file -> {key: numpy array}."""
  suffix = os.path.splitext(path)[1]
  if suffix == ".safetensors":
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
    return clean_state_dict(load_file(path))
  if suffix in TORCH_SUFFIXES:
    torch = _torch()
    sd = clean_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return {k: (v.float() if v.is_floating_point() else v).numpy() for k, v in sd.items()
            if hasattr(v, "numpy")}
  raise ValueError(f"unknown timm checkpoint suffix {suffix!r} in {path}; valid: {SUFFIXES}")


def write_state_dict(path: str, sd: Mapping):
  suffix = os.path.splitext(path)[1]
  sd = {k: np.ascontiguousarray(v) for k, v in sd.items()}
  if suffix == ".safetensors":
    from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
    save_file(sd, path)
  elif suffix in TORCH_SUFFIXES:
    torch = _torch()
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, path)
  else:
    raise ValueError(f"unknown timm checkpoint suffix {suffix!r} in {path}; valid: {SUFFIXES}")


# ------------------------------------------------------------------ architecture
def _source_tokens(sd: Mapping) -> dict:
  return {n: sd[k] for n, k in TOKEN_KEYS.items() if k in sd}


def _posemb_covers(sd: Mapping, tokens: Mapping, no_embed_class: Optional[bool], grid=None,
                   prefer_covered: bool = True) -> tuple:
  """Which prefix tokens timm's `pos_embed` covers: all of them, or none (no_embed_class)."""
  n_prefix = sum(t.shape[1] for t in tokens.values())
  length = sd["pos_embed"].shape[1]
  names = [n for n in common.PREFIX_NAMES if n in tokens]
  options = []
  if n_prefix and common.is_square(length - n_prefix):
    options.append(tuple(names))
  if common.is_square(length):
    options.append(())
  if no_embed_class is not None:
    want = () if no_embed_class else tuple(names)
    if want not in options:
      raise common.CheckpointMismatch(
          f"pos_embed has {length} entries, which does not fit no_embed_class={no_embed_class} "
          f"with {n_prefix} prefix tokens")
    return want
  if not options:
    raise common.CheckpointMismatch(f"pos_embed has {length} entries: neither it nor it minus "
                                    f"the {n_prefix} prefix tokens is a square grid")
  if len(options) > 1 and grid is not None:  # ambiguous: the one with the model's grid wins
    fits = [o for o in options
            if length - (n_prefix if o else 0) == grid[0] * grid[1]]
    options = fits or options
  return options[0] if prefer_covered or len(options) == 1 else options[-1]


def model_config(sd: Mapping, *, num_heads: Optional[int] = None, no_embed_class=None) -> dict:
  """The vitjax model fields (plus num_classes, image_size) of a timm ViT/DeiT state dict.

  timm does not store the number of heads: it is taken from the standard variants by width
  (Ti 3, S 6, M 8, B 12, L 16, H 16), else width // 64; pass `num_heads` when it differs.
  """
  sd = clean_state_dict(sd)
  width, _, patch, _ = common.marker(sd, "patch_embed.proj.weight", "timm ViT state dict").shape
  depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
  tokens = _source_tokens(sd)
  cfg = dict(name="vit", patch_size=int(patch), width=int(width), depth=depth,
             mlp_dim=int(sd["blocks.0.mlp.fc1.weight"].shape[0]),
             num_heads=int(num_heads or HEADS_BY_WIDTH.get(width, max(width // 64, 1))),
             class_token="cls" in tokens, distill_token="dist" in tokens,
             num_registers=int(tokens["registers"].shape[1]) if "registers" in tokens else 0,
             qkv_bias="blocks.0.attn.qkv.bias" in sd, qk_norm="blocks.0.attn.q_norm.weight" in sd,
             layerscale=1e-5 if "blocks.0.ls1.gamma" in sd else None, gelu_approximate=False)
  if "fc_norm.weight" in sd:
    cfg.update(pool="gap", fc_norm=True)
  elif "cls" not in tokens:
    cfg.update(pool="gap", fc_norm=False)
  else:
    cfg.update(pool="cls")
  if "pos_embed" in sd:
    covered = _posemb_covers(sd, tokens, no_embed_class,
                             prefer_covered="registers" not in tokens)
    cfg["posemb_prefix"] = bool(covered)
    n_patches = sd["pos_embed"].shape[1] - sum(tokens[n].shape[1] for n in covered)
    side = int(round(np.sqrt(n_patches)))
    cfg["image_size"] = side * int(patch)
  else:
    cfg["posemb"] = "sincos2d"
  cfg["num_classes"] = int(sd["head.weight"].shape[0]) if "head.weight" in sd else 0
  return cfg


# ------------------------------------------------------------------ conversion
def to_timm(params: Mapping, model) -> dict:
  """vitjax parameters -> a timm state dict (numpy). pos_embed covers every prefix token
  (timm's default) when the model has posemb_prefix=True, else only the patches
  (no_embed_class=True)."""
  _check_supported(model)
  flat = common.flatten(common.unscan(common.to_numpy(params), model.depth))
  sd = {timm_key(p): to_torch_layout(p, x) for p, x in flat.items() if not _is_prefix_or_posemb(p)}
  tokens, rows, patch = common.export_prefix(model, flat)
  sd.update({TOKEN_KEYS[n]: t for n, t in tokens.items()})
  if model.posemb == "learn" and model.posemb_prefix:
    pieces = [rows.get(n, np.zeros_like(tokens[n])) for n in common.prefix_names(model)]
  else:
    pieces = []
  sd["pos_embed"] = np.concatenate(pieces + [patch], axis=1)
  return sd


def from_timm(sd: Mapping, model, *, skip: Iterable[str] = (), no_embed_class=None) -> dict:
  """A timm state dict -> vitjax parameters for `model` (nested dict of numpy arrays).

  skip: our parameter names to leave out (e.g. ("head",) to fine-tune with a new head; merge
  the result over a fresh init with `common.merge`). The position embedding is resampled to the
  model's grid. Raises CheckpointMismatch naming missing / unexpected keys and bad shapes.
  """
  _check_supported(model)
  sd = clean_state_dict(sd)
  skip = tuple(skip)
  channels = np.shape(sd.get("patch_embed.proj.weight", np.zeros((0, 3))))[1]
  abstract = common.flatten(common.unscan(common.abstract_params(model, channels), model.depth))
  names = {p: timm_key(p) for p in abstract
           if not _is_prefix_or_posemb(p) and not common.skipped(p, skip)}
  token_keys = {n: TOKEN_KEYS[n] for n in common.prefix_names(model)}
  expected = set(names.values()) | set(token_keys.values())
  if model.posemb == "learn" or "pos_embed" in sd:
    expected.add("pos_embed")
  ignored = {timm_key(p) for p in abstract if common.skipped(p, skip)}
  common.check_keys(set(sd) - ignored, expected, fmt="timm",
                    hint=common.config_hint(model_config, sd))
  flat = {p: from_torch_layout(p, np.asarray(sd[k], np.float32)) for p, k in names.items()}
  tokens = {n: np.asarray(sd[k], np.float32) for n, k in token_keys.items()}
  rows, patch = {}, None
  if "pos_embed" in sd:
    covered = _posemb_covers(sd, tokens, no_embed_class, model.grid,
                             prefer_covered=bool(common.covered_by_posemb(model)))
    rows, patch = common.split_posemb(np.asarray(sd["pos_embed"], np.float32), tokens, covered)
  flat.update(common.import_prefix(model, tokens, patch, rows))
  return common.nest(flat, abstract, model, fmt="timm", names=names)


def load(path: str, model, **kw) -> dict:
  return from_timm(read_state_dict(path), model, **kw)


def save(path: str, params: Mapping, model):
  write_state_dict(path, to_timm(params, model))
