"""What every checkpoint format shares: flat names, scanned blocks, key checks, prefix tokens.

Prefix tokens ([CLS], distillation, registers) are learned constants, so a position embedding that
a format adds to them can be folded into the token itself (`tok + pos`) without changing the
function. Importers use that to map any source layout onto the model's layout exactly:
`posemb_prefix=True` models keep a position entry for [CLS]/dist (zero when the source had none);
everything else is folded. Patch position embeddings are resampled to the model's grid.
"""
import math
from typing import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from vitjax.models import resample_posemb, sincos2d

PREFIX_NAMES = ("cls", "dist", "registers")  # our order of the prefix tokens


class CheckpointMismatch(ValueError):
  """A checkpoint whose names or shapes do not fit the model."""


# ------------------------------------------------------------------ flat trees
def flatten(tree: Mapping, prefix: str = "") -> dict:
  """{"a": {"b": x}} -> {"a/b": x}."""
  out = {}
  for k, v in tree.items():
    name = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(flatten(v, name + "/"))
    else:
      out[name] = v
  return out


def unflatten(flat: Mapping) -> dict:
  out = {}
  for name, v in flat.items():
    node = out
    *parents, leaf = name.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return out


def unscan(params: Mapping, depth: int) -> dict:
  """`encoder/block/...` stacked over depth (scan=True) -> `block_{i}/...` (how converters see
  the blocks)."""
  params = dict(params)
  if "encoder" not in params:
    return params
  stacked = flatten(params.pop("encoder")["block"])
  for i in range(depth):
    params[f"block_{i}"] = unflatten({k: _layer(v, i) for k, v in stacked.items()})
  return params


def _layer(x, i: int):
  if isinstance(x, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(x.shape[1:], x.dtype)
  return np.asarray(x)[i]


def rescan(params: Mapping, depth: int) -> dict:
  """Inverse of `unscan`."""
  params = dict(params)
  blocks = [flatten(params.pop(f"block_{i}")) for i in range(depth)]
  params["encoder"] = {"block": unflatten(
      {k: np.stack([b[k] for b in blocks]) for k in blocks[0]})}
  return params


def to_numpy(tree):
  return jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), tree)


def abstract_params(model, channels: int = 3) -> dict:
  """Shapes of the model's parameters without computing them."""
  images = jax.ShapeDtypeStruct((1, *model.image_size, channels), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(images.shape)))
  return dict(variables["params"])


def abstract_batch_stats(model, channels: int = 3) -> dict:
  """Shapes of the model's BatchNorm statistics (flat names) without computing them."""
  images = jnp.zeros((1, *model.image_size, channels))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), images))
  return flatten(dict(shapes["batch_stats"]))


def batch_stats_to_state_dict(variables: Mapping, model, key) -> dict:
  """The PyTorch BatchNorm entries (running_mean / running_var and num_batches_tracked, under
  `key(path)`) of variables {"params", "batch_stats"}; flax's initial statistics (mean 0, var 1)
  when they carry none, so that the file loads with strict=True."""
  stats = flatten(variables.get("batch_stats") or {})
  if not stats:
    stats = {p: (np.ones if p.endswith("/var") else np.zeros)(s.shape, np.float32)
             for p, s in abstract_batch_stats(model).items()}
  sd = {}
  for p, x in stats.items():
    sd[key(p)] = np.asarray(x, np.float32)
    if p.endswith("/mean"):
      sd[key(p[:-len("mean")] + "num_batches_tracked")] = np.zeros((), np.int64)
  return sd


def batch_stats_from_state_dict(stats: Mapping, model, *, key, fmt: str, hint: str = "") -> dict:
  """A state dict's BatchNorm statistics (its running_* entries, `key(path)` each) -> the
  model's `batch_stats`; missing, unexpected and misshapen entries are errors as for parameters."""
  abstract = abstract_batch_stats(model)
  names = {p: key(p) for p in abstract}
  present = {k for k in stats if not k.endswith("num_batches_tracked")}
  check_keys(present, set(names.values()), fmt=fmt, hint=hint)
  flat = {p: np.asarray(stats[k], np.float32) for p, k in names.items()}
  check_shapes(flat, abstract, fmt=fmt, names=names)
  return unflatten(flat)


def zeros_like_abstract(abstract):
  """Broadcast views of zeros: the right shapes for free (for computing expected names)."""
  return jax.tree_util.tree_map(lambda s: np.broadcast_to(np.zeros((), s.dtype), s.shape), abstract)


# ------------------------------------------------------------------ checks
def _listing(names: Iterable[str], limit: int = 12) -> str:
  names = sorted(names)
  shown = ", ".join(names[:limit])
  return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def check_keys(present: Iterable[str], expected: Iterable[str], *, fmt: str, hint: str = ""):
  """Raises CheckpointMismatch naming the missing and the unexpected keys."""
  present, expected = set(present), set(expected)
  missing, unexpected = expected - present, present - expected
  if not missing and not unexpected:
    return
  parts = [f"the {fmt} checkpoint does not fit the model:"]
  if missing:
    parts.append(f"missing keys ({len(missing)}): {_listing(missing)}")
  if unexpected:
    parts.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
  if hint:
    parts.append(hint)
  raise CheckpointMismatch("\n  ".join(parts))


def check_shapes(flat: Mapping, abstract_flat: Mapping, *, fmt: str, names: Mapping = None):
  """Every converted array must have the model's shape; names the offenders (and their keys)."""
  bad = []
  for path, x in flat.items():
    want = tuple(abstract_flat[path].shape)
    if tuple(np.shape(x)) != want:
      src = f" (from {names[path]})" if names and path in names else ""
      bad.append(f"{path}{src}: checkpoint {tuple(np.shape(x))} vs model {want}")
  if bad:
    raise CheckpointMismatch(f"the {fmt} checkpoint has shapes that do not fit the model:\n  "
                             + "\n  ".join(bad))


def marker(raw: Mapping, key: str, what: str):
  """raw[key], the array that marks a file as `what`; CheckpointMismatch when it is absent."""
  if key not in raw:
    raise CheckpointMismatch(f"not a {what}: no {key}; keys start with {sorted(raw)[:8]}")
  return raw[key]

def config_hint(model_config, raw: Mapping) -> str:
  """A mismatch message's last line: the architecture `model_config(raw)` reads from the file,
  or "" when it cannot read one."""
  try:
    cfg = model_config(raw)
  except (ValueError, KeyError, IndexError):
    return ""
  return "the checkpoint looks like a model with " + ", ".join(f"{k}={v!r}" for k, v in cfg.items())


def nest(flat: Mapping, abstract_flat: Mapping, model, *, fmt: str, names: Mapping = None) -> dict:
  """Converted flat parameters, shape-checked, as the model's nested tree (stacked if it scans)."""
  check_shapes(flat, abstract_flat, fmt=fmt, names=names)
  params = unflatten(flat)
  return rescan(params, model.depth) if model.scan else params

# ------------------------------------------------------------------ prefix tokens and posemb
def prefix_names(model) -> list:
  """The model's prefix tokens, in order."""
  on = {"cls": model.class_token, "dist": model.distill_token, "registers": model.num_registers}
  return [n for n in PREFIX_NAMES if on[n]]


def covered_by_posemb(model) -> tuple:
  """Prefix tokens with an entry in the model's `pos_embedding` (ViT.add_prefix_and_posemb)."""
  if model.posemb != "learn" or not model.posemb_prefix:
    return ()
  return tuple(n for n in ("cls", "dist") if n in prefix_names(model))


def is_square(n: int) -> bool:
  return n > 0 and int(round(math.sqrt(n))) ** 2 == n


def split_posemb(pos, tokens: Mapping, covered: Iterable[str]):
  """Source pos [1, L, D] -> ({token name: its pos rows}, patch pos [1, hw, D])."""
  rows, i = {}, 0
  for name in covered:
    k = tokens[name].shape[1]
    rows[name], i = pos[:, i:i + k], i + k
  patch = pos[:, i:]
  if not is_square(patch.shape[1]):
    raise CheckpointMismatch(f"the position embedding has {patch.shape[1]} patch entries after "
                             f"{i} prefix entries: not a square grid")
  return rows, patch


def import_prefix(model, tokens: Mapping, pos_patch, pos_rows: Mapping) -> dict:
  """Our cls/dist/registers/pos_embedding for `model` from a source's tokens and posemb parts.

  tokens: {name: [1, k, D]} of the source (our names); pos_rows: the source's position rows of
  the tokens it covers; pos_patch: [1, hw, D] (None for a fixed sin-cos embedding).
  """
  out, rows = {}, []
  covered = covered_by_posemb(model)
  for name in prefix_names(model):
    tok = np.asarray(tokens[name], np.float32)
    pe = pos_rows.get(name)
    if name in covered:
      out[name] = tok
      rows.append(np.zeros_like(tok) if pe is None else np.asarray(pe))
    else:
      out[name] = tok if pe is None else tok + np.asarray(pe)
  if model.posemb == "learn":
    if pos_patch is None:
      raise CheckpointMismatch("the model learns its position embedding but the checkpoint has "
                               "none (posemb='sincos2d' there?)")
    patch = resample_posemb(np.asarray(pos_patch), model.grid, num_prefix=0)
    out["pos_embedding"] = np.concatenate(rows + [patch], axis=1).astype(np.float32)
  elif pos_patch is not None:
    fixed = sincos2d(model.grid, model.width)
    if pos_patch.shape != fixed.shape or not np.allclose(pos_patch, fixed, atol=1e-5):
      raise CheckpointMismatch("the checkpoint has a learned position embedding but the model "
                               "uses posemb='sincos2d'; build it with posemb='learn'")
  return out


def export_prefix(model, flat: Mapping):
  """({name: token}, {name: its pos rows}, patch pos or the fixed sin-cos one) of our params."""
  tokens = {n: np.asarray(flat[n]) for n in prefix_names(model)}
  if model.posemb != "learn":
    return tokens, {}, sincos2d(model.grid, model.width)
  pos, rows, i = np.asarray(flat["pos_embedding"]), {}, 0
  for name in covered_by_posemb(model):
    rows[name], i = pos[:, i:i + 1], i + 1
  return tokens, rows, pos[:, i:]


# ------------------------------------------------------------------ using a partial checkpoint
def merge(init_params: Mapping, loaded: Mapping) -> dict:
  """`loaded` over `init_params` (e.g. a checkpoint without the head over a fresh init)."""
  init_flat, loaded_flat = flatten(init_params), flatten(loaded)
  extra = set(loaded_flat) - set(init_flat)
  if extra:
    raise CheckpointMismatch(f"loaded parameters the model does not have: {_listing(extra)}")
  check_shapes(loaded_flat, init_flat, fmt="loaded")
  return unflatten({k: loaded_flat.get(k, v) for k, v in init_flat.items()})


def from_state_dict(sd: Mapping, model, *, key, layout, fmt: str, model_config,
                    skip: Iterable[str] = ()) -> dict:
  """A cleaned state dict of a family whose parameters map one to one -> parameters for `model`.

  key(path) is the state-dict key of our flat parameter name, layout(path, array) turns the
  stored array into ours; skip: our names to leave out (e.g. ("head",)). Raises
  CheckpointMismatch naming missing / unexpected keys and bad shapes.
  """
  skip = tuple(skip)
  channels = np.shape(sd.get("patch_embed.proj.weight", np.zeros((0, 3))))[1]
  abstract = flatten(abstract_params(model, channels))
  names = {p: key(p) for p in abstract if not skipped(p, skip)}
  ignored = {key(p) for p in abstract if skipped(p, skip)}
  check_keys(set(sd) - ignored, set(names.values()), fmt=fmt,
             hint=config_hint(model_config, sd))
  flat = {p: layout(p, np.asarray(sd[k], np.float32)) for p, k in names.items()}
  check_shapes(flat, abstract, fmt=fmt, names=names)
  return unflatten(flat)


def skipped(path: str, skip: Iterable[str]) -> bool:
  """True when `path` is, or lies under, one of the `skip` names (e.g. "head")."""
  return any(path == s or path.startswith(s + "/") for s in skip)
