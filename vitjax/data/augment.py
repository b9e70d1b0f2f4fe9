"""The DeiT training augmentations (Touvron et al. 2021), following timm's implementations.

pp ops (per example, on the numpy example dict; `rng` is the example's np.random.Generator):
  randaugment(num_layers=2, magnitude=9, magnitude_std=0.5)  timm's `rand-m9-mstd0.5-inc1`
  random_erasing(p=0.25, mode="pixel")                       timm's RandomErasing, after normalize
DeiT's train pp string:
  decode|random_resized_crop(224)|flip_lr|randaugment|normalize|random_erasing(0.25)

Batch level (host numpy batches, before they become global arrays):
  mixup_cutmix(batch, rng, num_classes=...)  mixup 0.8 / cutmix 1.0, switch 0.5, smoothing 0.1;
                                             returns soft labels [B, C] that sum to one.
Sampling:
  RepeatedAugSampler / make_train_loader(..., repeats=3)    DeiT's RASampler as a grain sampler.
"""
from __future__ import annotations

import math
import sys

import grain.python as grain
import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from vitjax.data import pipeline
from vitjax.data import pp

LEVEL_DENOM = 10.0  # magnitudes are on a 0..10 scale
# timm's default fill for DeiT: round(255 * IMAGENET_MEAN)
DEFAULT_FILL = tuple(min(255, round(255 * m)) for m in pp.IMAGENET_MEAN)
INTERPOLATIONS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


# ------------------------------------------------------------------ RandAugment
def _negate_half(value: float, rng) -> float:
  return -value if rng.random() > 0.5 else value


def _enhance_factor(m, rng):  # "increasing" enhancement: 1 +- 0.9 m/10, at least 0.1
  return (max(0.1, 1.0 + _negate_half(m / LEVEL_DENOM * 0.9, rng)),)


def _affine(img, matrix, geo):
  return img.transform(img.size, Image.AFFINE, matrix, resample=geo["resample"],
                       fillcolor=geo["fill"])


def _posterize(img, bits: int):
  # bits 0 keeps no bit (a black image), as older Pillow did; Pillow >= 11 rejects 0
  if bits >= 8:
    return img
  return ImageOps.posterize(img, bits) if bits > 0 else Image.new(img.mode, img.size)


def _solarize_add(img, add):
  lut = [min(255, i + add) if i < 128 else i for i in range(256)]
  return img.point(lut * len(img.getbands()))


# name: (level -> args, (img, *args, geo) -> img); the 15 ops of timm's "inc1" RandAugment set
RAND_OPS = {
    "AutoContrast": (None, lambda img, geo: ImageOps.autocontrast(img)),
    "Equalize": (None, lambda img, geo: ImageOps.equalize(img)),
    "Invert": (None, lambda img, geo: ImageOps.invert(img)),
    "Rotate": (lambda m, rng: (_negate_half(m / LEVEL_DENOM * 30.0, rng),),
               lambda img, deg, geo: img.rotate(deg, resample=geo["resample"],
                                                fillcolor=geo["fill"])),
    "PosterizeIncreasing": (lambda m, rng: (4 - int(m / LEVEL_DENOM * 4),),
                            lambda img, bits, geo: _posterize(img, bits)),
    "SolarizeIncreasing": (lambda m, rng: (256 - min(256, int(m / LEVEL_DENOM * 256)),),
                           lambda img, thresh, geo: ImageOps.solarize(img, thresh)),
    "SolarizeAdd": (lambda m, rng: (min(128, int(m / LEVEL_DENOM * 110)),),
                    lambda img, add, geo: _solarize_add(img, add)),
    "ColorIncreasing": (_enhance_factor,
                        lambda img, f, geo: ImageEnhance.Color(img).enhance(f)),
    "ContrastIncreasing": (_enhance_factor,
                           lambda img, f, geo: ImageEnhance.Contrast(img).enhance(f)),
    "BrightnessIncreasing": (_enhance_factor,
                             lambda img, f, geo: ImageEnhance.Brightness(img).enhance(f)),
    "SharpnessIncreasing": (_enhance_factor,
                            lambda img, f, geo: ImageEnhance.Sharpness(img).enhance(f)),
    "ShearX": (lambda m, rng: (_negate_half(m / LEVEL_DENOM * 0.3, rng),),
               lambda img, s, geo: _affine(img, (1, s, 0, 0, 1, 0), geo)),
    "ShearY": (lambda m, rng: (_negate_half(m / LEVEL_DENOM * 0.3, rng),),
               lambda img, s, geo: _affine(img, (1, 0, 0, s, 1, 0), geo)),
    "TranslateXRel": (lambda m, rng: (_negate_half(m / LEVEL_DENOM * 0.45, rng),),
                      lambda img, pct, geo: _affine(img, (1, 0, pct * img.size[0], 0, 1, 0), geo)),
    "TranslateYRel": (lambda m, rng: (_negate_half(m / LEVEL_DENOM * 0.45, rng),),
                      lambda img, pct, geo: _affine(img, (1, 0, 0, 0, 1, pct * img.size[1]), geo)),
}
OP_NAMES = tuple(RAND_OPS)


def _to_pil(image: np.ndarray) -> Image.Image:
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3):
    raise ValueError(f"randaugment works on uint8 HxWx1 or HxWx3 images (before normalize), got "
                     f"{image.dtype} {image.shape}")
  return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def apply_op(img: Image.Image, name: str, magnitude: float, rng, geo: dict) -> Image.Image:
  level_fn, op = RAND_OPS[name]
  args = level_fn(magnitude, rng) if level_fn else ()
  return op(img, *args, geo)


@pp.register("randaugment")
def randaugment(example, rng, num_layers: int = 2, magnitude: float = 9.0,
                magnitude_std: float = 0.5, prob: float = 0.5, fill=DEFAULT_FILL,
                interpolation: str = "bicubic"):
  """timm's RandAugment `rand-m9-mstd0.5-inc1` (DeiT): `num_layers` ops drawn with replacement
  from the 15 "increasing" ops, each applied with probability `prob` at a magnitude drawn from
  N(magnitude, magnitude_std) clipped to [0, 10]. Geometric ops fill with the mean colour."""
  image = example["image"]
  img = _to_pil(image)
  fill_value = tuple(fill) if img.mode == "RGB" else int(round(float(np.mean(fill))))
  geo = dict(resample=INTERPOLATIONS[interpolation], fill=fill_value)
  for i in rng.choice(len(OP_NAMES), size=num_layers, replace=True):
    if prob < 1.0 and rng.random() > prob:
      continue
    m = rng.normal(magnitude, magnitude_std) if magnitude_std > 0 else magnitude
    img = apply_op(img, OP_NAMES[i], max(0.0, min(LEVEL_DENOM, m)), rng, geo)
  example["image"] = np.asarray(img).reshape(image.shape)
  return example


# ------------------------------------------------------------------ random erasing
ERASE_MODES = ("pixel", "rand", "const")


@pp.register("random_erasing")
def random_erasing(example, rng, p: float = 0.25, mode: str = "pixel", min_area: float = 0.02,
                   max_area: float = 1 / 3, min_aspect: float = 0.3, max_aspect=None,
                   max_count: int = 1):
  """timm's RandomErasing on a normalised float image: with probability p, up to 10 tries to
  place a box of area in [min_area, max_area] of the image and log-uniform aspect ratio, filled
  with N(0, 1) noise per pixel ("pixel"), per channel ("rand") or zeros ("const")."""
  if mode not in ERASE_MODES:
    raise ValueError(f"random_erasing mode must be one of {ERASE_MODES}, got {mode!r}")
  image = example["image"]
  if not np.issubdtype(image.dtype, np.floating):
    raise ValueError("random_erasing works on normalised float images: put it after normalize")
  if rng.random() > p:
    return example
  image = np.array(image, np.float32)
  h_img, w_img, chans = image.shape
  count = 1 if max_count == 1 else int(rng.integers(1, max_count + 1))
  log_ratio = (math.log(min_aspect), math.log(max_aspect or 1 / min_aspect))
  for _ in range(count):
    for _ in range(10):
      area = rng.uniform(min_area, max_area) * h_img * w_img / count
      aspect = math.exp(rng.uniform(*log_ratio))
      h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
      if w < w_img and h < h_img:
        top, left = int(rng.integers(0, h_img - h + 1)), int(rng.integers(0, w_img - w + 1))
        image[top:top + h, left:left + w] = _erase_values(rng, mode, (h, w, chans))
        break
  example["image"] = image
  return example


def _erase_values(rng, mode: str, shape):
  if mode == "pixel":
    return rng.standard_normal(shape, dtype=np.float32)
  if mode == "rand":
    return rng.standard_normal((1, 1, shape[-1]), dtype=np.float32)
  return np.zeros((1, 1, shape[-1]), np.float32)


# ------------------------------------------------------------------ mixup / cutmix
def smooth_one_hot(labels, num_classes: int, smoothing: float) -> np.ndarray:
  off = smoothing / num_classes
  out = np.full((len(labels), num_classes), off, np.float32)
  out[np.arange(len(labels)), labels] = 1.0 - smoothing + off
  return out


def cutmix_box(h: int, w: int, lam: float, rng):
  """A box of area ~(1 - lam) at a uniform centre, clipped to the image (timm's rand_bbox)."""
  ratio = math.sqrt(1.0 - lam)
  cut_h, cut_w = int(h * ratio), int(w * ratio)
  cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
  y0, y1 = np.clip([cy - cut_h // 2, cy + cut_h // 2], 0, h)
  x0, x1 = np.clip([cx - cut_w // 2, cx + cut_w // 2], 0, w)
  return int(y0), int(y1), int(x0), int(x1)


def mixup_cutmix(batch: dict, rng: np.random.Generator, *, num_classes: int,
                 mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, switch_prob: float = 0.5,
                 prob: float = 1.0, label_smoothing: float = 0.1, correct_lam: bool = True) -> dict:
  """timm's batch-mode Mixup as used by DeiT: one lambda per batch, each example mixed with the
  batch reversed. With probability `prob` mix; then cutmix with probability `switch_prob` (lambda
  ~ Beta(cutmix_alpha), corrected to the clipped box area), else mixup (lambda ~
  Beta(mixup_alpha)). Labels become smoothed one-hots mixed with the same lambda: [B, C] float32.
  """
  images, labels = np.asarray(batch["image"]), np.asarray(batch["label"])
  if len(images) % 2:
    raise ValueError(f"mixup_cutmix needs an even batch (timm's assumption), got {len(images)}")
  lam, use_cutmix = 1.0, False
  if rng.random() < prob and (mixup_alpha > 0 or cutmix_alpha > 0):
    if mixup_alpha > 0 and cutmix_alpha > 0:
      use_cutmix = rng.random() < switch_prob
    else:
      use_cutmix = cutmix_alpha > 0
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    lam = float(rng.beta(alpha, alpha))
  images = np.array(images, np.float32)
  if lam < 1.0:
    flipped = images[::-1]
    if use_cutmix:
      h, w = images.shape[1:3]
      y0, y1, x0, x1 = cutmix_box(h, w, lam, rng)
      images[:, y0:y1, x0:x1] = flipped[:, y0:y1, x0:x1].copy()
      if correct_lam:
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
    else:
      images = lam * images + (1.0 - lam) * flipped
  soft = smooth_one_hot(labels, num_classes, label_smoothing)
  out = dict(batch)
  out["image"] = images.astype(np.float32)
  out["label"] = (lam * soft + (1.0 - lam) * soft[::-1]).astype(np.float32)
  return out


# ------------------------------------------------------------------ repeated augmentation
class RepeatedAugSampler:
  """DeiT's RASampler for grain: each epoch visits a fresh permutation with every image repeated
  `repeats` times in a row; the loader hands consecutive positions to different hosts, so the
  repeats of an image land on different hosts (as on different GPUs in DeiT). An epoch has
  num_records positions, i.e. about num_records / repeats distinct images, as in DeiT. Every
  position gets its own augmentation rng, Philox(seed + position), like grain's IndexSampler.
  """

  def __init__(self, num_records: int, *, repeats: int = 3, seed: int = 0):
    if num_records <= 0 or repeats < 1:
      raise ValueError(f"RepeatedAugSampler needs num_records > 0 and repeats >= 1, got "
                       f"{num_records}, {repeats}")
    self.num_records, self.repeats, self.seed = num_records, repeats, seed
    # a lazy permutation, reshuffled per epoch (index e * n + i reads epoch e's permutation)
    self._perm = grain.MapDataset.range(num_records).shuffle(seed=seed)

  def __len__(self) -> int:
    return sys.maxsize  # repeats forever; the trainer counts steps

  def record_key(self, index: int) -> int:
    epoch, position = divmod(index, self.num_records)
    return int(self._perm[epoch * self.num_records + position // self.repeats]) % self.num_records

  def __getitem__(self, index: int):
    rng = np.random.Generator(np.random.Philox(key=self.seed + index))
    return grain.RecordMetadata(index=index, record_key=self.record_key(index), rng=rng)


def make_train_loader(data_cfg, *, global_batch_size: int, seed: int, repeats: int = 3,
                      process_index=None, process_count=None) -> grain.DataLoader:
  """`pipeline.make_train_loader` with repeated augmentation (same pp, batching and sharding)."""
  # pylint: disable=protected-access
  index, count = pipeline._process_index_and_count(process_index, process_count)
  local_b = pipeline.local_batch_size(global_batch_size, count)
  preprocess = pipeline._Preprocess(data_cfg, pipeline._get(data_cfg, "pp_train", ""))
  source = pipeline.data_source(data_cfg, pipeline._get(data_cfg, "train_split", "train"))
  shard = grain.ShardOptions(shard_index=index, shard_count=count, drop_remainder=True)
  sampler = RepeatedAugSampler(len(source), repeats=repeats,
                               seed=int(pipeline._get(data_cfg, "shuffle_seed", seed)) % 2**31)
  return grain.DataLoader(
      data_source=source, sampler=sampler,
      operations=[pipeline._RandomPreprocess(preprocess),
                  grain.Batch(batch_size=local_b, drop_remainder=True)],
      worker_count=pipeline._workers(data_cfg),
      worker_buffer_size=max(1, pipeline._get(data_cfg, "prefetch", 2)),
      shard_options=shard, read_options=pipeline._read_options(data_cfg, local_b))
