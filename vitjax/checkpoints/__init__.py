"""Pretrained checkpoints in and out: timm (`.safetensors`, `.pth`; ViT, Swin, PVTv2, Twins,
DaViT, ConViT, MViTv2, MaxViT, GC ViT; the official CvT's) and big_vision (`.npz`; ViT).

  model, params = checkpoints.load_model("deit_small.safetensors")   # architecture + weights
  model = checkpoints.build_model("deit_small.safetensors", tokens=dict(name="evit", keep_rate=0.7))
  params = checkpoints.load("deit_small.safetensors", model)          # numpy, nested like init
  checkpoints.save("out.npz", params, model)                          # format from the suffix

`load` checks names and shapes against the model and says which keys are missing or unexpected;
the position embedding is resampled to the model's resolution. `skip=("head",)` leaves the head
out, and `load_into(path, model, init_params, skip=...)` puts the rest over a fresh init.
"""
import os
from typing import Iterable, Mapping, Optional

from vitjax import models
from vitjax.checkpoints import (big_vision, common, official_cvt, timm, timm_convit, timm_davit,
                                timm_gcvit, timm_maxvit, timm_mvitv2, timm_pvt_v2, timm_swin,
                                timm_twins)
from vitjax.checkpoints.common import CheckpointMismatch, merge  # noqa: F401

FORMATS = {"timm": timm, "big_vision": big_vision}
# timm model families besides the ViT: modules with MODEL (our class) and matches(state dict);
# the first that matches wins (Twins before DaViT; DaViT, MViTv2, MaxViT and GC ViT before
# PVTv2: their files share names)
TIMM_FAMILIES = (timm_swin, timm_twins, timm_davit, timm_mvitv2, timm_maxvit, timm_gcvit,
                 timm_pvt_v2, timm_convit, official_cvt)


def detect_format(path: str) -> str:
  suffix = os.path.splitext(str(path))[1]
  if suffix in timm.SUFFIXES:
    return "timm"
  if suffix == ".npz":
    return "big_vision"
  raise ValueError(f"cannot tell the checkpoint format of {path!r} from its suffix: "
                   f"{', '.join(timm.SUFFIXES)} are timm, .npz is big_vision")


def is_pretrained_file(path) -> bool:
  """True for a timm / big_vision file (as opposed to one of our orbax checkpoint folders)."""
  return os.path.isfile(str(path)) and os.path.splitext(str(path))[1] in (*timm.SUFFIXES, ".npz")


def _module(fmt: Optional[str], path: str, model=None, raw: Optional[Mapping] = None):
  """The converter for a format; for timm, the family of `model` or of the state dict `raw`."""
  fmt = fmt or detect_format(path)
  if fmt not in FORMATS:
    raise ValueError(f"unknown checkpoint format {fmt!r}; valid: {', '.join(FORMATS)}")
  families = [f for f in TIMM_FAMILIES if isinstance(model, f.MODEL)]
  if families and FORMATS[fmt] is not timm:
    raise ValueError(f"{type(model).__name__} checkpoints are timm files "
                     f"({', '.join(timm.SUFFIXES)}), not {fmt}")
  if FORMATS[fmt] is timm:
    for family in TIMM_FAMILIES:
      if isinstance(model, family.MODEL) or (raw is not None and family.matches(raw)):
        return family
  return FORMATS[fmt]


def read(path: str, fmt: Optional[str] = None) -> dict:
  """The raw file contents: a timm state dict or big_vision's flat names -> numpy arrays."""
  mod = _module(fmt, path)
  return mod.read_state_dict(path) if mod is timm else mod.read_npz(path)


def model_config(path: str, fmt: Optional[str] = None, **kw) -> dict:
  """The architecture stored in a file: vitjax model fields plus num_classes and image_size."""
  raw = read(path, fmt)
  return _module(fmt, path, raw=raw).model_config(raw, **kw)


def build_model(path: str, *, fmt: Optional[str] = None, num_classes: Optional[int] = None,
                image_size=None, dtype: str = "float32", num_heads: Optional[int] = None,
                **overrides):
  """A ViT, Swin, PVTv2, Twins, DaViT, ConViT, MViTv2, MaxViT, GC ViT or CvT with the architecture
  of the file (any field overridable, e.g. tokens=...), without its weights: `load_model` gives
  both."""
  kw = {"num_heads": num_heads} if num_heads else {}
  cfg = model_config(path, fmt, **kw)
  file_classes, file_size = cfg.pop("num_classes"), cfg.pop("image_size", None)
  cfg.update(overrides)
  return models.build(cfg, num_classes=file_classes if num_classes is None else num_classes,
                      image_size=image_size or file_size, dtype=dtype)


def load_model(path: str, *, fmt: Optional[str] = None, **build_kw):
  """(model, params) of a file: `build_model(path, **build_kw)` and its parameters for it."""
  model = build_model(path, fmt=fmt, **build_kw)
  return model, load(path, model, fmt=fmt)


def load(path: str, model, *, fmt: Optional[str] = None, skip: Iterable[str] = (), **kw) -> dict:
  """Parameters for `model` from a timm / big_vision file (see the format modules)."""
  return _module(fmt, path, model).load(path, model, skip=skip, **kw)


def load_variables(path: str, model, *, fmt: Optional[str] = None,
                   skip: Iterable[str] = ()) -> dict:
  """What `model.apply` takes from a file: {"params"}, plus {"batch_stats"} for a family whose
  files carry BatchNorm running statistics (its module's `load_variables`)."""
  mod = _module(fmt, path, model)
  if hasattr(mod, "load_variables"):
    return mod.load_variables(path, model, skip=skip)
  return {"params": mod.load(path, model, skip=skip)}


def load_into(path: str, model, init_params: Mapping, *, fmt: Optional[str] = None,
              skip: Iterable[str] = ()) -> dict:
  """The file's parameters over `init_params` (those in `skip` keep their initial values)."""
  return merge(common.to_numpy(init_params), load(path, model, fmt=fmt, skip=skip))


def save(path: str, params: Mapping, model, *, fmt: Optional[str] = None):
  """Writes `params` of `model` in the format of `path`'s suffix (or `fmt`)."""
  _module(fmt, path, model).save(path, params, model)
