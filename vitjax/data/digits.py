"""The embedded default dataset: scikit-learn's 8x8 digits as a tfds builder.

`load_digits` ships inside the scikit-learn wheel, so this dataset builds
offline in well under a second; it lets every config, test and colab run with
no download.

Building without TensorFlow: tfds writes array_record shards and serialises
`tfds.features.Tensor` with numpy only (`tfds.features.Image` would need TF to
encode PNGs). The builder therefore defaults to `file_format="array_record"`
(tfds' own default, tfrecord, needs TF to write) and never asks GCS for a
prebuilt copy, so both `prepare()` and a plain
`tfds.data_source("vitjax_digits", data_dir=...)` build it TF-free.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

NAME = "vitjax_digits"
NUM_TRAIN = 1437
NUM_TEST = 360
_SPLIT_SEED = 0  # fixed: the train/test split must never change for v1.0.0


def _images_and_labels() -> tuple[np.ndarray, np.ndarray]:
  """All 1797 digits as uint8 (N, 8, 8, 1) in 0..255 and int labels."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

  digits = load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
  return images[..., None], digits.target.astype(np.int64)


def split_indices(split: str) -> np.ndarray:
  """Indices into `load_digits()` of one split (a fixed random permutation)."""
  perm = np.random.default_rng(_SPLIT_SEED).permutation(NUM_TRAIN + NUM_TEST)
  return {"train": perm[:NUM_TRAIN], "test": perm[NUM_TRAIN:]}[split]


class VitjaxDigits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn digits: 1797 8x8 grayscale images of 10 classes."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Fixed 1437/360 train/test split (seed 0)."}
  # No checksum file or package metadata: tfds would otherwise locate them
  # next to this module, a lookup that needs `importlib_resources` for
  # modules inside packages (not a dependency of tfds 4.9.10).
  code_path = None

  def __init__(self, *, file_format=None, **kwargs):
    super().__init__(file_format=file_format or "array_record", **kwargs)

  def download_and_prepare(self, *, download_config=None, **kwargs):
    if download_config is None:  # Nothing to fetch: never probe GCS.
      download_config = tfds.download.DownloadConfig(try_download_gcs=False)
    return super().download_and_prepare(
        download_config=download_config, **kwargs
    )

  def _info(self) -> tfds.core.DatasetInfo:
    # Built directly (not from package metadata files): this builder lives in
    # a plain module, not in a tfds dataset folder.
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            "Optical recognition of handwritten digits (UCI), as shipped by"
            " scikit-learn: 8x8 grayscale images, pixels rescaled from 0..16"
            " to 0..255."
        ),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=("image", "label"),
        homepage="https://archive.ics.uci.edu/dataset/80",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Data comes from the scikit-learn wheel.
    return {s: self._generate_examples(s) for s in ("train", "test")}

  def _generate_examples(self, split):
    images, labels = _images_and_labels()
    for i in split_indices(split):
      yield int(i), {"image": images[i], "label": int(labels[i])}


def prepare(data_dir=None) -> VitjaxDigits:
  """Returns the digits builder, building it into `data_dir` if needed."""
  builder = VitjaxDigits(data_dir=data_dir)
  if not builder.is_prepared():
    try:
      builder.download_and_prepare()
    except Exception:  # pylint: disable=broad-except
      # Another process (e.g. a second host on a shared disk) may have won
      # the race to the final directory; only re-raise if nothing is there.
      builder = VitjaxDigits(data_dir=data_dir)
      if not builder.is_prepared():
        raise
  return builder
