"""Input pipelines: tfds array_record data sources read through grain.

Training uses grain's `DataLoader`: a seeded, infinitely repeating
`IndexSampler` over all records of which each host reads its rows of every
global batch (`_HostSlice`), per-example pp ops, batches of the *local* batch
size. Its iterator is checkpointable (`get_state()/set_state()`, or orbax via
`grain.python.PyGrainCheckpointSave/Restore`), and resuming is bit-identical
because each example's augmentation rng is `Philox(seed + sampler index)`.

Evaluation reads a disjoint strided shard per host, pads the last batch with
`mask=False` rows, and gives every host the same number of batches so that
multi-host jitted evaluation never waits on a host that ran out of data.

`data_cfg` fields: name, data_dir (None: tfds default), train_split,
eval_split, pp_train, pp_eval, shuffle_seed (None: the `seed` argument),
worker_count (0: in-process), prefetch (batches), and optionally image_key,
label_key ("image", "label") and read_threads (reader threads).
"""

from __future__ import annotations

import os
from typing import Any, Iterator, NamedTuple

from absl import flags
import grain.python as grain
import jax
import numpy as np
import tensorflow_datasets as tfds

from vitjax.data import digits
from vitjax.data import pp as pp_lib


class DatasetNotPreparedError(FileNotFoundError):
  """A known tfds dataset has no array_record files in `data_dir`."""


class DataInfo(NamedTuple):
  num_classes: int
  num_examples: dict[str, int]  # {train_split: n, eval_split: n}
  image_shape: tuple[int, ...]  # one eval example after pp_eval (model input)


# ------------------------------------------------------------- data source ---


def _get(cfg, key: str, default=None):
  value = cfg.get(key, default)
  return default if value is None else value


def _how_to_prepare(name: str, data_dir) -> str:
  where = f" --data_dir={data_dir}" if data_dir else ""
  return (
      "vitjax reads tfds datasets in array_record format and never downloads"
      " at run time. Prepare it once on a machine with TensorFlow and network"
      f" access:\n  tfds build {name} --file_format=array_record{where}\nand"
      " copy the resulting folder into data_dir here (ImageNet first needs its"
      " archives in --manual_dir). The embedded dataset"
      f" {digits.NAME!r} needs no download: it is built from scikit-learn."
  )


def _builder(cfg) -> tfds.core.DatasetBuilder:
  name = cfg.get("name")
  if not name:
    raise ValueError(f"data.name is empty; e.g. {digits.NAME!r} or 'cifar10'.")
  data_dir = cfg.get("data_dir")
  if name.split(":")[0] == digits.NAME:
    return digits.prepare(data_dir)
  try:
    return tfds.builder(name, data_dir=data_dir)
  except tfds.core.DatasetNotFoundError:
    raise ValueError(
        f"Unknown dataset {name!r}: tensorflow-datasets has no builder of that"
        " name (see https://www.tensorflow.org/datasets/catalog). "
        + _how_to_prepare("<name>", data_dir)
    ) from None


def _diagnose(builder, cfg, split: str) -> Exception | None:
  """A clear error for a data source that failed to open, if we know why."""
  name, data_dir = cfg.get("name"), cfg.get("data_dir")
  if not builder.is_prepared():
    return DatasetNotPreparedError(
        f"Dataset {name!r} is not prepared: no files at {builder.data_path}. "
        + _how_to_prepare(name, data_dir)
    )
  fmt = builder.info.file_format
  if fmt not in tfds.core.FileFormat.with_random_access():
    return ValueError(
        f"Dataset {name!r} in {builder.data_path} is stored as {fmt.value},"
        " which has no random access. Convert it once (with TensorFlow):\n "
        " tfds convert_format"
        f" --dataset_version_dir={builder.data_path} --out_file_format=array_record"
    )
  base = split.split("[")[0].split("+")[0]
  if base not in builder.info.splits:
    return ValueError(
        f"Dataset {name!r} has no split {split!r}; splits:"
        f" {sorted(builder.info.splits)}."
    )
  return None


def data_source(cfg, split: str):
  """The random-access tfds source of `split` (tfds split syntax allowed)."""
  builder = _builder(cfg)
  try:
    return builder.as_data_source(split=split)
  except Exception as e:  # pylint: disable=broad-except
    error = _diagnose(builder, cfg, split)
    if error is None:
      raise
    raise error from e


def num_examples(data_cfg, split: str) -> int:
  return len(data_source(data_cfg, split))


def num_classes(data_cfg) -> int:
  label = _builder(data_cfg).info.features[_get(data_cfg, "label_key", "label")]
  return int(label.num_classes)


def get_info(data_cfg) -> DataInfo:
  """Classes, split sizes and the model input shape (after pp_eval)."""
  splits = (_get(data_cfg, "train_split", "train"), _eval_split(data_cfg, None))
  example = _Preprocess(data_cfg, _get(data_cfg, "pp_eval", ""))(
      data_source(data_cfg, splits[1])[0], np.random.default_rng(0)
  )
  return DataInfo(
      num_classes=num_classes(data_cfg),
      num_examples={s: num_examples(data_cfg, s) for s in splits},
      image_shape=tuple(example["image"].shape),
  )


# ------------------------------------------------------------- processing ---


def _process_index_and_count(process_index, process_count) -> tuple[int, int]:
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if not 0 <= index < count:
    raise ValueError(f"process_index={index} not in [0, {count}).")
  return int(index), int(count)


def local_batch_size(global_batch_size: int, process_count: int) -> int:
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(
        f"Global batch size {global_batch_size} must be a positive multiple"
        f" of the number of processes ({process_count}): each host loads"
        " global_batch_size // process_count examples."
    )
  return global_batch_size // process_count


class _Preprocess:
  """Record -> {"image": float32, "label": int32} through a pp pipeline."""

  def __init__(self, cfg, pp_string: str):
    self.pipeline = pp_lib.parse(pp_string)  # parse early: errors up front
    self.image_key = _get(cfg, "image_key", "image")
    self.label_key = _get(cfg, "label_key", "label")

  def __call__(self, record: dict, rng: np.random.Generator) -> dict:
    example = {"image": record[self.image_key], "label": record[self.label_key]}
    example = self.pipeline(example, rng)
    return {
        "image": np.asarray(example["image"], np.float32),
        "label": np.asarray(example["label"], np.int32),
    }


class _RandomPreprocess(grain.RandomMapTransform):
  """grain hands each record an rng seeded with Philox(seed + index)."""

  def __init__(self, preprocess: _Preprocess):
    self.preprocess = preprocess

  def random_map(self, element, rng):
    return self.preprocess(element, rng)


def _workers(cfg) -> int:
  workers = int(_get(cfg, "worker_count", 0))
  if workers > 0 and not flags.FLAGS.is_parsed():
    # grain's worker processes read absl flags; outside `app.run` (notebooks,
    # tests) nobody parsed them, so accept the defaults.
    flags.FLAGS.mark_as_parsed()
  return workers


def _read_options(cfg, local_batch: int) -> grain.ReadOptions:
  threads = _get(cfg, "read_threads", min(16, os.cpu_count() or 1))
  prefetch = _get(cfg, "prefetch", 2)
  return grain.ReadOptions(
      num_threads=threads, prefetch_buffer_size=max(1, prefetch * local_batch)
  )


# ------------------------------------------------------------------ train ---


def make_train_loader(
    data_cfg,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.DataLoader:
  """Infinite shuffled training batches of this host's shard.

  `iter(loader)` is a `grain.DataLoaderIterator` yielding
  {"image": float32 [local_b, H, W, C], "label": int32 [local_b]}.
  """
  index, count = _process_index_and_count(process_index, process_count)
  local_b = local_batch_size(global_batch_size, count)
  preprocess = _Preprocess(data_cfg, _get(data_cfg, "pp_train", ""))
  source = data_source(data_cfg, _get(data_cfg, "train_split", "train"))
  if len(source) < count:
    raise ValueError(f"{len(source)} training examples for {count} hosts.")
  sampler = grain.IndexSampler(
      num_records=len(source),
      shuffle=True,
      num_epochs=None,  # repeat forever; the trainer counts steps
      seed=int(_get(data_cfg, "shuffle_seed", seed)) % 2**31,
  )
  return grain.DataLoader(
      data_source=source,
      sampler=_HostSlice(sampler, local_b, index, count),
      operations=[
          _RandomPreprocess(preprocess),
          grain.Batch(batch_size=local_b, drop_remainder=True),
      ],
      worker_count=_workers(data_cfg),
      worker_buffer_size=max(1, _get(data_cfg, "prefetch", 2)),
      shard_options=grain.NoSharding(),  # _HostSlice already picks this host's rows
      read_options=_read_options(data_cfg, local_b),
  )


class _HostSlice:
  """Host `index` of `count` reads rows [index*b, (index+1)*b) of every global batch.

  One shuffled stream over all records (and each example's augmentation rng,
  Philox(seed + stream position)) does not depend on the number of hosts, so
  every global batch holds the same examples in the same rows on 1 host or many
  (with worker_count=0; workers interleave batches): a multi-host run trains as
  a single-host one does, and each example of an epoch goes to exactly one host.
  """

  def __init__(self, sampler, local_batch: int, index: int, count: int):
    self.sampler, self.local_batch = sampler, local_batch
    self.index, self.count = index, count

  def __len__(self) -> int:
    return len(self.sampler)

  def __getitem__(self, i: int) -> grain.RecordMetadata:
    batch, row = divmod(i, self.local_batch)
    position = (batch * self.count + self.index) * self.local_batch + row
    meta = self.sampler[position]
    return grain.RecordMetadata(index=i, record_key=meta.record_key, rng=meta.rng)

  def __repr__(self) -> str:  # grain checks it when restoring an iterator
    return (f"HostSlice({self.sampler!r}, local_batch={self.local_batch}, "
            f"host={self.index}, hosts={self.count})")


# ------------------------------------------------------------------- eval ---


def _eval_split(cfg, split):
  return split or _get(cfg, "eval_split", "test")


class _EvalExample:
  """Local position -> processed example with a validity mask.

  Host `index` owns global examples index, index + count, ...; positions past
  its shard repeat example 0 with mask=False (padding).
  """

  def __init__(self, source, preprocess, index, count):
    self.source, self.preprocess = source, preprocess
    self.index, self.count = index, count

  def __call__(self, position: int) -> dict:
    global_index = self.index + position * self.count
    valid = global_index < len(self.source)
    record = self.source[global_index if valid else 0]
    rng = np.random.Generator(np.random.Philox(key=global_index))
    example = self.preprocess(record, rng)
    example["mask"] = np.asarray(valid)
    return example


def num_eval_batches(n: int, local_batch: int, process_count: int) -> int:
  """Batches per host: enough for the largest host shard."""
  largest_shard = -(-n // process_count)
  return -(-largest_shard // local_batch)


def make_eval_batches(
    data_cfg,
    *,
    global_batch_size: int,
    split: str | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[dict[str, Any]]:
  """One pass over `split` (default eval_split), dropping no example.

  Yields {"image": float32 [local_b, ...], "label": int32 [local_b],
  "mask": bool [local_b]}; count only rows with mask=True.
  """
  index, count = _process_index_and_count(process_index, process_count)
  local_b = local_batch_size(global_batch_size, count)
  preprocess = _Preprocess(data_cfg, _get(data_cfg, "pp_eval", ""))
  source = data_source(data_cfg, _eval_split(data_cfg, split))
  steps = num_eval_batches(len(source), local_b, count)
  ds = grain.MapDataset.range(steps * local_b).map(
      _EvalExample(source, preprocess, index, count)
  )
  ds = ds.batch(local_b).to_iter_dataset(_read_options(data_cfg, 1))
  workers = _workers(data_cfg)
  if workers > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return iter(ds)
