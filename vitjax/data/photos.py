"""Real photographs that ship with scikit-image, as model inputs and as a tiny labelled set.

  images = photos.load(224)                                  # [6, 224, 224, 3] uint8
  images, labels = photos.crops(224, per_photo=8, seed=0)    # label = which photograph

No download: the photographs are part of the scikit-image wheel (`pip install scikit-image`).
`crops` turns them into a small classification task (which photograph is this random crop from?)
for the notebooks' offline paths: a model trained on it attends to the content of real photos.
Inputs go through the preprocessing ops of `vitjax.data.pp`, as a dataset's would.
"""
import numpy as np

from vitjax.data import pp

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")


def photo(name: str) -> np.ndarray:
  """[H, W, 3] uint8: one of `PHOTOS` (any RGB image of `skimage.data`)."""
  try:
    from skimage import data  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("the photographs come with scikit-image: pip install scikit-image") from e
  if name not in PHOTOS:
    raise ValueError(f"unknown photograph {name!r}; valid: {', '.join(PHOTOS)}")
  return np.asarray(getattr(data, name)())[..., :3]


def load(size: int = 224, names=PHOTOS) -> np.ndarray:
  """[len(names), size, size, 3] uint8: each photograph's central square, resized."""
  ops = pp.parse(f"resize_small({size})|central_crop({size})")
  return np.stack([ops({"image": photo(n)}, None)["image"] for n in names])


def crops(size: int = 224, per_photo: int = 8, seed: int = 0, names=PHOTOS,
          scale=(0.25, 1.0)) -> tuple:
  """(images [len(names) * per_photo, size, size, 3] uint8, labels int32): random resized crops
  with random flips, labelled by the photograph they come from; another seed, other crops."""
  if per_photo < 1:
    raise ValueError(f"per_photo must be >= 1, got {per_photo}")
  ops = pp.parse(f"random_resized_crop({size}, scale={tuple(scale)})|flip_lr")
  rng = np.random.default_rng(seed)
  images, labels = [], []
  for label, name in enumerate(names):
    full = photo(name)
    for _ in range(per_photo):
      images.append(ops({"image": full}, rng)["image"])
      labels.append(label)
  return np.stack(images), np.asarray(labels, np.int32)
