"""Preprocessing ops, chosen by name from a big_vision-style string.

A pp string is a `|`-separated list of ops, each `name` or `name(args)` where
args are Python literals, e.g. `"decode|random_resized_crop(224)|flip_lr|normalize"`.
Every op is a plain function `op(example, rng, *args, **kwargs) -> example` on a
numpy example dict (`{"image": HxWxC uint8, "label": int}`); `rng` is a
`np.random.Generator` that random ops draw from (deterministic ops ignore it).
New ops (RandAugment, random erasing, ...) join with `@register("name")`.

Ops are stored as (name, args, kwargs) and looked up at call time, so a parsed
pipeline pickles cleanly into grain worker processes.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import math
from typing import Any, Callable

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_REGISTRY: dict[str, Callable[..., dict]] = {}


def register(name: str):
  """Decorator adding `fn(example, rng, *args, **kwargs)` as op `name`."""

  def wrap(fn):
    if name in _REGISTRY:
      raise ValueError(f"pp op {name!r} is already registered.")
    _REGISTRY[name] = fn
    return fn

  return wrap


def available_ops() -> list[str]:
  return sorted(_REGISTRY)


def get_op(name: str) -> Callable[..., dict]:
  if name not in _REGISTRY:
    raise ValueError(
        f"Unknown pp op {name!r}. Valid ops: {', '.join(available_ops())}."
    )
  return _REGISTRY[name]


# ---------------------------------------------------------------- parsing ---


@dataclasses.dataclass(frozen=True)
class Op:
  """One parsed op: calling it applies the registered function."""

  name: str
  args: tuple = ()
  kwargs: tuple = ()  # sorted (key, value) pairs: keeps Op hashable/picklable

  def __call__(self, example: dict, rng: np.random.Generator | None) -> dict:
    return get_op(self.name)(example, rng, *self.args, **dict(self.kwargs))


@dataclasses.dataclass(frozen=True)
class Pipeline:
  """A parsed pp string; `pipeline(example, rng)` runs the ops in order."""

  ops: tuple[Op, ...]

  def __call__(self, example: dict, rng: np.random.Generator | None) -> dict:
    example = dict(example)  # never mutate the caller's record
    for op in self.ops:
      example = op(example, rng)
    return example


def _split_top_level(spec: str) -> list[str]:
  """Splits on `|` outside parentheses/brackets."""
  parts, depth, start = [], 0, 0
  for i, ch in enumerate(spec):
    depth += ch in "([{"
    depth -= ch in ")]}"
    if ch == "|" and depth == 0:
      parts.append(spec[start:i])
      start = i + 1
  parts.append(spec[start:])
  return [p.strip() for p in parts if p.strip()]


def parse_op(text: str) -> Op:
  """Parses `name` or `name(literal, ..., key=literal)` into a validated Op."""
  try:
    call = ast.parse(text, mode="eval").body
    if isinstance(call, ast.Name):
      name, args, kwargs = call.id, (), {}
    elif isinstance(call, ast.Call) and isinstance(call.func, ast.Name):
      name = call.func.id
      args = tuple(ast.literal_eval(a) for a in call.args)
      kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    else:
      raise ValueError("not of the form name(args)")
  except (SyntaxError, ValueError) as e:
    raise ValueError(
        f"Cannot parse pp op {text!r} ({e}); expected `name` or "
        "`name(python literals)`, e.g. `resize(224)`."
    ) from None
  fn = get_op(name)
  try:  # Bad arguments fail at parse time, not deep inside a data worker.
    inspect.signature(fn).bind({}, None, *args, **kwargs)
  except TypeError as e:
    raise ValueError(
        f"Bad arguments for pp op {text!r}: {e}. Signature: "
        f"{name}{_public_signature(fn)}."
    ) from None
  return Op(name, args, tuple(sorted(kwargs.items())))


def _public_signature(fn) -> str:
  params = list(inspect.signature(fn).parameters.values())[2:]
  return str(inspect.Signature(params))


def parse(spec: str | None) -> Pipeline:
  """Parses a whole pp string; an empty string or None is the identity."""
  return Pipeline(tuple(parse_op(p) for p in _split_top_level(spec or "")))


# ---------------------------------------------------------------- helpers ---


def _hw(size) -> tuple[int, int]:
  if isinstance(size, int):
    return size, size
  h, w = size
  return int(h), int(w)


def _resize_array(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
  """Bilinear resize with PIL (antialiased when shrinking), dtype preserved."""
  h, w = hw
  if image.shape[:2] == (h, w):
    return image
  if image.dtype == np.uint8 and image.shape[-1] in (1, 3, 4):
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[image.shape[-1]]
    pil = Image.fromarray(image[..., 0] if mode == "L" else image, mode)
    out = np.asarray(pil.resize((w, h), Image.BILINEAR))
    return out.reshape(h, w, image.shape[-1])
  # Other dtypes/channel counts: resize each channel as a float32 'F' image.
  chans = [
      np.asarray(
          Image.fromarray(image[..., c].astype(np.float32), "F").resize(
              (w, h), Image.BILINEAR
          )
      )
      for c in range(image.shape[-1])
  ]
  out = np.stack(chans, axis=-1)
  if np.issubdtype(image.dtype, np.integer):
    info = np.iinfo(image.dtype)
    out = np.clip(np.round(out), info.min, info.max)
  return out.astype(image.dtype)


def _crop(image: np.ndarray, top: int, left: int, h: int, w: int):
  return image[top : top + h, left : left + w]


# -------------------------------------------------------------------- ops ---


@register("decode")
def decode(example, rng, channels: int = 3):
  """Encoded JPEG/PNG bytes -> HxWxC uint8 (no-op if already decoded)."""
  del rng
  image = example["image"]
  if isinstance(image, np.ndarray) and image.dtype != object and image.ndim == 3:
    return example
  if isinstance(image, np.ndarray):  # a 0-d object/bytes array from a source
    image = image.item()
  mode = {1: "L", 3: "RGB"}[channels]
  pil = Image.open(io.BytesIO(image)).convert(mode)
  example["image"] = np.asarray(pil).reshape(pil.height, pil.width, channels)
  return example


@register("resize")
def resize(example, rng, size):
  """Bilinear resize to `size` (int: square, or (h, w))."""
  del rng
  example["image"] = _resize_array(example["image"], _hw(size))
  return example


@register("resize_small")
def resize_small(example, rng, size: int):
  """Resizes so that the shorter side is `size`, keeping the aspect ratio."""
  del rng
  h, w = example["image"].shape[:2]
  scale = size / min(h, w)
  hw = (max(size, round(h * scale)), max(size, round(w * scale)))
  example["image"] = _resize_array(example["image"], hw)
  return example


@register("central_crop")
def central_crop(example, rng, size):
  """Crops the central `size` (int or (h, w)) window."""
  del rng
  image = example["image"]
  h, w = _hw(size)
  if h > image.shape[0] or w > image.shape[1]:
    raise ValueError(f"central_crop({size}) larger than image {image.shape}.")
  top, left = (image.shape[0] - h) // 2, (image.shape[1] - w) // 2
  example["image"] = _crop(image, top, left, h, w)
  return example


def _inception_box(height, width, rng, scale, ratio):
  """Samples (top, left, h, w) with area fraction in `scale` and aspect ratio
  (w/h) log-uniform in `ratio`; falls back to a central crop after 10 tries."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  # Fallback: the largest central crop whose aspect ratio lies within `ratio`.
  aspect = width / height
  if aspect < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif aspect > ratio[1]:
    h, w = height, int(round(height * ratio[1]))
  else:
    h, w = height, width
  return (height - h) // 2, (width - w) // 2, h, w


@register("random_resized_crop")
def random_resized_crop(
    example, rng, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)
):
  """Inception-style crop: random area/aspect box, resized to `size`."""
  image = example["image"]
  box = _inception_box(image.shape[0], image.shape[1], rng, scale, ratio)
  example["image"] = _resize_array(_crop(image, *box), _hw(size))
  return example


@register("random_crop")
def random_crop(example, rng, size, pad: int = 0):
  """Zero-pads by `pad` pixels on each side, then takes a random `size` crop (CIFAR-style)."""
  image = example["image"]
  if pad:
    image = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
  h, w = _hw(size)
  if h > image.shape[0] or w > image.shape[1]:
    raise ValueError(f"random_crop({size}) is larger than the padded image {image.shape[:2]}")
  top = int(rng.integers(0, image.shape[0] - h + 1))
  left = int(rng.integers(0, image.shape[1] - w + 1))
  example["image"] = _crop(image, top, left, h, w)
  return example


@register("flip_lr")
def flip_lr(example, rng, p: float = 0.5):
  """Horizontal flip with probability `p`."""
  if rng.random() < p:
    example["image"] = example["image"][:, ::-1]
  return example


@register("value_range")
def value_range(example, rng, lo=-1.0, hi=1.0, in_min=0.0, in_max=255.0):
  """Maps [in_min, in_max] (uint8 range by default) linearly to float32 [lo, hi]."""
  del rng
  image = np.asarray(example["image"], np.float32)
  image = (image - in_min) / (in_max - in_min)
  example["image"] = (image * (hi - lo) + lo).astype(np.float32)
  return example


@register("normalize")
def normalize(example, rng, mean=IMAGENET_MEAN, std=IMAGENET_STD):
  """(x - mean) / std per channel, with x in [0, 1] (uint8 input is /255 first)."""
  del rng
  image = example["image"]
  scale = 255.0 if image.dtype == np.uint8 else 1.0
  image = np.asarray(image, np.float32) / scale
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)
  example["image"] = ((image - mean) / std).astype(np.float32)
  return example


@register("grayscale_to_rgb")
def grayscale_to_rgb(example, rng):
  """Repeats a single channel to three (no-op for 3-channel images)."""
  del rng
  image = example["image"]
  if image.shape[-1] == 1:
    example["image"] = np.repeat(image, 3, axis=-1)
  return example


@register("keep_channels")
def keep_channels(example, rng, n: int = 3):
  """Keeps the first `n` channels (e.g. drops alpha); repeats 1 -> n."""
  del rng
  image = example["image"]
  if image.shape[-1] == 1 and n > 1:
    image = np.repeat(image, n, axis=-1)
  example["image"] = image[..., :n]
  return example
