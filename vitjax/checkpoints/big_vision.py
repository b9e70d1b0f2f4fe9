"""big_vision ViT `.npz` checkpoints <-> vitjax parameters (both directions).

big_vision's names (flax, '/'-joined in the npz):

  embedding/kernel [p,p,C,D], embedding/bias          embedding_kernel, embedding_bias
  pos_embedding [1,hw,D] (patches only), cls          pos_embedding, cls
  Transformer/encoderblock_{i}/LayerNorm_0, _1        block_{i}/norm1, norm2
    MultiHeadDotProductAttention_0/{query,key,value}  block_{i}/attn/qkv (fused, [D,H,hd] each)
    MultiHeadDotProductAttention_0/out [H,hd,D]       block_{i}/attn/proj [D,D]
    MlpBlock_0/Dense_0, Dense_1                       block_{i}/mlp/fc1, fc2
  Transformer/encoder_norm                            norm
  MAPHead_0/{probe,MultiHeadDotProductAttention_0,LayerNorm_0,MlpBlock_0}   map_head/...
  head                                                head

big_vision's ViT uses flax's tanh-approximate GELU (build the model with gelu_approximate=True),
adds the position embedding before the [CLS] token (posemb_prefix=False) and normalises before
average pooling (pool="gap", fc_norm=False). Older checkpoints (the original ViT / AugReg npz:
MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3, Transformer/posembed_input with a [CLS]
entry) and scanned ones (Transformer/encoderblock stacked over depth) are read too.
"""
import re
from typing import Iterable, Mapping

import numpy as np

from vitjax.checkpoints import common

ENC = "Transformer/encoderblock_{}/"
MHA = "MultiHeadDotProductAttention_0/"
SIMPLE = (  # (our name pattern, big_vision name); the leaf names (scale/bias/kernel) are shared
    (r"^embedding_(kernel|bias)$", r"embedding/\1"),
    (r"^block_(\d+)/norm1/", r"Transformer/encoderblock_\1/LayerNorm_0/"),
    (r"^block_(\d+)/norm2/", r"Transformer/encoderblock_\1/LayerNorm_1/"),
    (r"^block_(\d+)/mlp/fc1/", r"Transformer/encoderblock_\1/MlpBlock_0/Dense_0/"),
    (r"^block_(\d+)/mlp/fc2/", r"Transformer/encoderblock_\1/MlpBlock_0/Dense_1/"),
    (r"^block_(\d+)/attn/proj/", r"Transformer/encoderblock_\1/" + MHA + "out/"),
    (r"^norm/", "Transformer/encoder_norm/"),
    (r"^head/", "head/"),
    (r"^map_head/Mlp_0/fc1/", "MAPHead_0/MlpBlock_0/Dense_0/"),
    (r"^map_head/Mlp_0/fc2/", "MAPHead_0/MlpBlock_0/Dense_1/"),
    (r"^map_head/", "MAPHead_0/"),
)
OLD_NAMES = (  # pre-2022 names -> big_vision's current ones (as its fix_old_checkpoints does)
    (r"^(Transformer/encoderblock_\d+/)MultiHeadDotProductAttention_1/", r"\1" + MHA),
    (r"^(Transformer/encoderblock_\d+/)LayerNorm_2/", r"\1LayerNorm_1/"),
    (r"^(Transformer/encoderblock_\d+/)MlpBlock_3/", r"\1MlpBlock_0/"),
    (r"^Transformer/posembed_input/pos_embedding$", "pos_embedding"),
    (r"^Transformer/pos_embedding$", "pos_embedding"),
)
QKV = re.compile(r"^block_(\d+)/attn/qkv/(kernel|bias)$")


def bv_name(path: str):
  """Our flat name -> big_vision's, or None where big_vision has no such parameter."""
  if path in ("cls", "pos_embedding"):
    return path
  for pattern, repl in SIMPLE:
    if re.search(pattern, path):
      return re.sub(pattern, repl, path)
  return None


def _unsupported(paths) -> ValueError:
  return ValueError(
      "big_vision's ViT has no equivalent for the model's parameters "
      f"{sorted(paths)[:8]} (layer scale, qk-norm, fc_norm, distillation/register tokens and "
      "learned token reducers are not part of it); build the model without them")


# ------------------------------------------------------------------ files
def normalize(flat: Mapping) -> dict:
  """Strips a `params/` or `opt/target/` prefix, renames old names and unstacks scanned blocks."""
  out = {}
  for key, v in flat.items():
    for prefix in ("params/", "opt/target/"):
      key = key[len(prefix):] if key.startswith(prefix) else key
    for pattern, repl in OLD_NAMES:
      key = re.sub(pattern, repl, key)
    if key.startswith("Transformer/encoderblock/"):  # scan=True in big_vision
      rest = key[len("Transformer/encoderblock/"):]
      for i, layer in enumerate(np.asarray(v)):
        out[ENC.format(i) + rest] = layer
    else:
      out[key] = np.asarray(v)
  return out


def read_npz(path: str) -> dict:
  with np.load(path, allow_pickle=False) as f:
    return normalize({k: f[k] for k in f.files})


def write_npz(path: str, flat: Mapping):
  np.savez(path, **{k: np.ascontiguousarray(v) for k, v in flat.items()})


# ------------------------------------------------------------------ architecture
def model_config(flat: Mapping) -> dict:
  """The vitjax model fields (plus num_classes, image_size) of a big_vision ViT checkpoint."""
  flat = normalize(flat)
  patch, _, _, width = common.marker(flat, "embedding/kernel", "big_vision ViT checkpoint").shape
  depth = len({k.split("/")[1] for k in flat if k.startswith("Transformer/encoderblock_")})
  q = flat[ENC.format(0) + MHA + "query/kernel"]
  cfg = dict(name="vit", patch_size=int(patch), width=int(width), depth=depth,
             mlp_dim=int(flat[ENC.format(0) + "MlpBlock_0/Dense_0/kernel"].shape[1]),
             num_heads=int(q.shape[1]), class_token="cls" in flat, posemb_prefix=False,
             gelu_approximate=True, fc_norm=False)
  cfg["pool"] = "map" if "MAPHead_0/probe" in flat else ("cls" if "cls" in flat else "gap")
  if "pos_embedding" in flat:
    n = flat["pos_embedding"].shape[1]
    n -= int("cls" in flat and not common.is_square(n))  # the old [CLS] entry
    cfg["image_size"] = int(round(np.sqrt(n))) * int(patch)
  else:
    cfg["posemb"] = "sincos2d"
  cfg["num_classes"] = int(flat["head/kernel"].shape[1]) if "head/kernel" in flat else 0
  return cfg


# ------------------------------------------------------------------ conversion
def _to_bv(flat: Mapping, width: int, heads: int) -> dict:
  """Our flat block/embedding/head parameters (no prefix, no posemb) -> big_vision's."""
  out, bad = {}, []
  for path, x in flat.items():
    if path in ("cls", "pos_embedding"):
      continue
    m = QKV.match(path)
    if m:
      i, leaf = m.groups()
      shape = (width, heads, width // heads) if leaf == "kernel" else (heads, width // heads)
      for name, part in zip(("query", "key", "value"), np.split(x, 3, axis=-1)):
        out[ENC.format(i) + MHA + f"{name}/{leaf}"] = part.reshape(shape)
      continue
    name = bv_name(path)
    if name is None:
      bad.append(path)
    elif name.endswith(MHA + "out/kernel"):
      out[name] = x.reshape(heads, width // heads, width)
    else:
      out[name] = x
  if bad:
    raise _unsupported(bad)
  return out


def _from_bv(src: Mapping, abstract: Mapping, heads: int, skip) -> dict:
  """Inverse of `_to_bv` for the model's (abstract) parameter names."""
  out = {}
  for path, want in abstract.items():
    if path in ("cls", "pos_embedding") or common.skipped(path, skip):
      continue
    m = QKV.match(path)
    if m:
      i, leaf = m.groups()
      parts = [src[ENC.format(i) + MHA + f"{n}/{leaf}"] for n in ("query", "key", "value")]
      out[path] = np.concatenate([p.reshape(*p.shape[:-2], -1) if leaf == "kernel"
                                  else p.reshape(-1) for p in parts], axis=-1)
    elif bv_name(path).endswith(MHA + "out/kernel"):
      out[path] = src[bv_name(path)].reshape(want.shape)
    else:
      out[path] = src[bv_name(path)]
  return out


def to_big_vision(params: Mapping, model) -> dict:
  """vitjax parameters -> big_vision's flat names (position entries of [CLS] folded into it)."""
  flat = common.flatten(common.unscan(common.to_numpy(params), model.depth))
  extra = [n for n in common.prefix_names(model) if n != "cls"]
  if extra:
    raise _unsupported(extra)
  out = _to_bv(flat, model.width, model.num_heads)
  tokens, rows, patch = common.export_prefix(model, flat)
  if "cls" in tokens:
    out["cls"] = tokens["cls"] + rows.get("cls", 0.0)
  if model.posemb == "learn":
    out["pos_embedding"] = patch
  return out


def from_big_vision(flat: Mapping, model, *, skip: Iterable[str] = ()) -> dict:
  """big_vision's flat parameters -> vitjax parameters for `model` (nested numpy).

  skip: our parameter names to leave out (e.g. ("head",)). The position embedding is resampled
  to the model's grid. Raises CheckpointMismatch naming missing / unexpected keys and bad shapes.
  """
  src = {k: np.asarray(v, np.float32) for k, v in normalize(flat).items()}
  skip = tuple(skip)
  channels = np.shape(src.get("embedding/kernel", np.zeros((0, 0, 3))))[2]
  abstract = common.flatten(common.unscan(common.abstract_params(model, channels), model.depth))
  kept = {p: s for p, s in abstract.items() if not common.skipped(p, skip)}
  expected = _to_bv(common.zeros_like_abstract(kept), model.width, model.num_heads)
  ignored = set(_to_bv(common.zeros_like_abstract(
      {p: s for p, s in abstract.items() if p not in kept}), model.width, model.num_heads))
  wanted = set(expected) | ({"cls"} if model.class_token else set())
  if model.posemb == "learn":
    wanted.add("pos_embedding")
  common.check_keys(set(src) - ignored - ({"pos_embedding"} if model.posemb != "learn" else set()),
                    wanted, fmt="big_vision", hint=common.config_hint(model_config, src))
  bad = [f"{k}: checkpoint {src[k].shape} vs model {np.shape(v)}" for k, v in expected.items()
         if src[k].shape != np.shape(v)]
  if bad:
    raise common.CheckpointMismatch("the big_vision checkpoint has shapes that do not fit the "
                                    "model:\n  " + "\n  ".join(bad))
  out = _from_bv(src, kept, model.num_heads, skip)
  tokens = {"cls": src["cls"]} if model.class_token else {}
  rows, patch = {}, src.get("pos_embedding")
  if patch is not None and "cls" in tokens and not common.is_square(patch.shape[1]):
    rows, patch = common.split_posemb(patch, tokens, ("cls",))  # the old [CLS] entry
  out.update(common.import_prefix(model, tokens, patch, rows))
  return common.nest(out, abstract, model, fmt="big_vision")


def load(path: str, model, **kw) -> dict:
  return from_big_vision(read_npz(path), model, **kw)


def save(path: str, params: Mapping, model):
  write_npz(path, to_big_vision(params, model))
