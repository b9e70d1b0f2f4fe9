"""Tests for vitjax.data: digits builder, pp ops, grain train/eval pipelines."""

import collections
import io
import sys

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import vitjax.data as vd
from vitjax.data import digits
from vitjax.data import pp


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("tfds")
  vd.prepare_digits(str(path))
  return str(path)


def make_cfg(data_dir, **overrides):
  cfg = ml_collections.ConfigDict(dict(
      name="vitjax_digits",
      data_dir=data_dir,
      train_split="train",
      eval_split="test",
      pp_train="resize(12)|flip_lr|value_range(-1,1)",
      pp_eval="resize(12)|value_range(-1,1)",
      shuffle_seed=None,
      worker_count=0,
      prefetch=2,
  ))
  cfg.update(overrides)
  return cfg


def take(loader_or_iter, n):
  it = iter(loader_or_iter)
  return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])


def example_key(image, label):
  return (np.asarray(image, np.float32).tobytes(), int(label))


# ---------------------------------------------------------------- digits ---


def test_digits_builds_without_tensorflow(data_dir):
  assert "tensorflow" not in sys.modules
  cfg = make_cfg(data_dir)
  assert vd.num_examples(cfg, "train") == digits.NUM_TRAIN == 1437
  assert vd.num_examples(cfg, "test") == digits.NUM_TEST == 360
  assert vd.num_classes(cfg) == 10
  train = vd.data_source(cfg, "train")
  labels = np.array([train[i]["label"] for i in range(len(train))])
  assert set(labels) == set(range(10))
  image = train[0]["image"]
  assert image.shape == (8, 8, 1) and image.dtype == np.uint8
  assert max(train[i]["image"].max() for i in range(50)) == 255


def test_digits_split_is_fixed_and_disjoint():
  train, test = digits.split_indices("train"), digits.split_indices("test")
  assert len(train) == 1437 and len(test) == 360
  assert not set(train) & set(test)
  np.testing.assert_array_equal(train, digits.split_indices("train"))


def test_tfds_data_source_builds_registered_digits(tmp_path):
  source = tfds.data_source("vitjax_digits", split="test", data_dir=tmp_path)
  assert len(source) == 360
  assert "tensorflow" not in sys.modules


def test_get_info(data_dir):
  info = vd.get_info(make_cfg(data_dir))
  assert info.num_classes == 10
  assert info.num_examples == {"train": 1437, "test": 360}
  assert info.image_shape == (12, 12, 1)


# ----------------------------------------------------------------- train ---


def test_train_loader_shapes_and_dtypes(data_dir):
  loader = vd.make_train_loader(
      make_cfg(data_dir), global_batch_size=32, seed=0, process_index=1,
      process_count=2,
  )
  for batch in take(loader, 3):
    assert batch["image"].shape == (16, 12, 12, 1)
    assert batch["image"].dtype == np.float32
    assert batch["label"].shape == (16,) and batch["label"].dtype == np.int32
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0


def test_train_loader_is_deterministic(data_dir):
  cfg = make_cfg(data_dir)
  a = take(vd.make_train_loader(cfg, global_batch_size=16, seed=3), 4)
  b = take(vd.make_train_loader(cfg, global_batch_size=16, seed=3), 4)
  c = take(vd.make_train_loader(cfg, global_batch_size=16, seed=4), 4)
  assert_batches_equal(a, b)
  assert not np.array_equal(a[0]["label"], c[0]["label"])


def test_train_loader_crosses_epochs(data_dir):
  cfg = make_cfg(data_dir, train_split="train[:40]")
  batches = take(vd.make_train_loader(cfg, global_batch_size=16, seed=0), 6)
  assert len(batches) == 6  # 96 examples from a 40-example split


def test_train_iterator_resumes_bit_identically(data_dir):
  cfg = make_cfg(data_dir, pp_train="random_resized_crop(8)|flip_lr")
  kwargs = dict(global_batch_size=16, seed=7)
  reference = take(vd.make_train_loader(cfg, **kwargs), 8)

  it = iter(vd.make_train_loader(cfg, **kwargs))
  take(it, 5)
  state = it.get_state()
  resumed = iter(vd.make_train_loader(cfg, **kwargs))
  resumed.set_state(state)
  assert_batches_equal(take(resumed, 3), reference[5:])


def test_train_iterator_orbax_checkpoint(data_dir, tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  import grain.python as grain  # pylint: disable=g-import-not-at-top

  cfg = make_cfg(data_dir)
  kwargs = dict(global_batch_size=8, seed=1)
  reference = take(vd.make_train_loader(cfg, **kwargs), 5)

  it = iter(vd.make_train_loader(cfg, **kwargs))
  take(it, 3)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(3, args=ocp.args.Composite(
        step=ocp.args.JsonSave({"step": 3}),
        data=grain.PyGrainCheckpointSave(it),
    ))
    mngr.wait_until_finished()
  fresh = iter(vd.make_train_loader(cfg, **kwargs))
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    restored = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(
        step=ocp.args.JsonRestore(),
        data=grain.PyGrainCheckpointRestore(fresh),
    ))
  assert restored.step == {"step": 3}
  assert_batches_equal(take(restored.data, 2), reference[3:])


def test_train_hosts_read_disjoint_shards(data_dir):
  cfg = make_cfg(data_dir, pp_train="")
  seen = []
  for host in range(2):
    loader = vd.make_train_loader(
        cfg, global_batch_size=64, seed=0, process_index=host, process_count=2
    )
    # 718 = one epoch of a 1437 // 2 example shard, rounded down to batches.
    batches = take(loader, 718 // 32)
    seen.append({
        example_key(i, l)
        for b in batches for i, l in zip(b["image"], b["label"])
    })
  assert not seen[0] & seen[1]


def test_train_loader_with_worker_process_matches_in_process(data_dir):
  cfg = make_cfg(data_dir, worker_count=1)
  it = iter(vd.make_train_loader(cfg, global_batch_size=8, seed=2))
  with_worker = take(it, 3)
  del it
  cfg.worker_count = 0
  assert_batches_equal(
      with_worker, take(vd.make_train_loader(cfg, global_batch_size=8, seed=2), 3)
  )


def test_global_batch_not_divisible_by_hosts(data_dir):
  with pytest.raises(ValueError, match="multiple of the number of processes"):
    vd.make_train_loader(
        make_cfg(data_dir), global_batch_size=30, seed=0, process_index=0,
        process_count=4,
    )
  with pytest.raises(ValueError, match="multiple of the number of processes"):
    vd.make_eval_batches(
        make_cfg(data_dir), global_batch_size=9, process_index=0,
        process_count=2,
    )


# ------------------------------------------------------------------ eval ---


@pytest.mark.parametrize(
    "split,global_batch,hosts",
    [("test", 64, 2), ("test[:10]", 4, 4), ("test[:7]", 3, 3)],
)
def test_eval_shards_cover_every_example_once(
    data_dir, split, global_batch, hosts
):
  cfg = make_cfg(data_dir, pp_eval="")
  source = vd.data_source(cfg, split)
  expected = collections.Counter(
      example_key(source[i]["image"], source[i]["label"])
      for i in range(len(source))
  )
  seen, num_batches = collections.Counter(), []
  for host in range(hosts):
    batches = list(vd.make_eval_batches(
        cfg, global_batch_size=global_batch, split=split, process_index=host,
        process_count=hosts,
    ))
    num_batches.append(len(batches))
    for b in batches:
      assert b["image"].shape[0] == global_batch // hosts
      assert b["mask"].dtype == np.bool_
      for image, label in zip(b["image"][b["mask"]], b["label"][b["mask"]]):
        seen[example_key(image, label)] += 1
  assert len(set(num_batches)) == 1  # every host runs the same eval steps
  assert num_batches[0] == vd.num_eval_batches(len(source), global_batch // hosts, hosts)
  assert seen == expected
  assert sum(seen.values()) == len(source)


def test_eval_pads_whole_batches_for_short_host(data_dir):
  # 10 examples over 4 hosts: shards of 3, 3, 2, 2 -> 3 batches of 1 each.
  cfg = make_cfg(data_dir)
  batches = list(vd.make_eval_batches(
      cfg, global_batch_size=4, split="test[:10]", process_index=3,
      process_count=4,
  ))
  assert [int(b["mask"].sum()) for b in batches] == [1, 1, 0]
  assert batches[-1]["image"].shape == (1, 12, 12, 1)


def test_eval_default_split_and_shapes(data_dir):
  batches = list(vd.make_eval_batches(make_cfg(data_dir), global_batch_size=100))
  assert len(batches) == 4
  assert sum(int(b["mask"].sum()) for b in batches) == 360
  assert batches[0]["image"].shape == (100, 12, 12, 1)
  assert batches[0]["label"].dtype == np.int32


# ---------------------------------------------------------------- errors ---


def test_unknown_dataset_error(tmp_path):
  cfg = make_cfg(str(tmp_path), name="no_such_dataset_xyz")
  with pytest.raises(ValueError, match="Unknown dataset 'no_such_dataset_xyz'") as e:
    vd.num_examples(cfg, "train")
  assert "vitjax_digits" in str(e.value)
  assert "--file_format=array_record" in str(e.value)


def test_known_but_unprepared_dataset_error(tmp_path):
  cfg = make_cfg(str(tmp_path), name="cifar10")
  with pytest.raises(vd.DatasetNotPreparedError, match="not prepared") as e:
    vd.make_train_loader(cfg, global_batch_size=8, seed=0)
  assert "tfds build cifar10 --file_format=array_record" in str(e.value)


def test_unknown_split_error(data_dir):
  with pytest.raises(ValueError, match="no split 'validation'"):
    vd.num_examples(make_cfg(data_dir), "validation")


def test_other_tfds_dataset_through_mock_data():
  cfg = make_cfg(
      None, name="cifar10",
      pp_train="decode|random_resized_crop(16)|flip_lr|normalize",
      pp_eval="decode|central_crop(24)|value_range(0,1)",
  )
  with tfds.testing.mock_data(num_examples=20):
    assert vd.num_classes(cfg) == 10
    batch = take(vd.make_train_loader(cfg, global_batch_size=8, seed=0), 1)[0]
    assert batch["image"].shape == (8, 16, 16, 3)
    evals = list(vd.make_eval_batches(cfg, global_batch_size=8))
  assert sum(int(b["mask"].sum()) for b in evals) == 20
  assert evals[0]["image"].shape == (8, 24, 24, 3)


# -------------------------------------------------------------------- pp ---

RGB = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)

# One call per registered op: (pp string, input image, expected output shape).
OP_CASES = {
    "decode": ("decode", RGB, (20, 30, 3)),
    "resize": ("resize((10, 15))", RGB, (10, 15, 3)),
    "resize_small": ("resize_small(10)", RGB, (10, 15, 3)),
    "central_crop": ("central_crop(8)", RGB, (8, 8, 3)),
    "random_resized_crop": ("random_resized_crop(16)", RGB, (16, 16, 3)),
    "flip_lr": ("flip_lr", RGB, (20, 30, 3)),
    "value_range": ("value_range(-1, 1)", RGB, (20, 30, 3)),
    "normalize": ("normalize", RGB, (20, 30, 3)),
    "grayscale_to_rgb": ("grayscale_to_rgb", RGB[..., :1], (20, 30, 3)),
    "keep_channels": ("keep_channels(1)", RGB, (20, 30, 1)),
    "random_crop": ("random_crop(20, pad=2)", RGB, (20, 20, 3)),
    "randaugment": ("randaugment", RGB, (20, 30, 3)),
    "random_erasing": ("normalize|random_erasing(1.0)", RGB, (20, 30, 3)),
}


def test_every_registered_op_has_a_case():
  assert set(OP_CASES) <= set(pp.available_ops())
  assert set(pp.available_ops()) <= set(OP_CASES)


@pytest.mark.parametrize("name", sorted(OP_CASES))
def test_op_shape_and_determinism(name):
  spec, image, shape = OP_CASES[name]
  pipeline = pp.parse(spec)
  run = lambda seed: pipeline(
      {"image": image, "label": 3}, np.random.default_rng(seed)
  )
  out = run(0)
  assert out["image"].shape == shape and out["label"] == 3
  np.testing.assert_array_equal(out["image"], run(0)["image"])


def test_random_ops_vary_with_rng():
  for spec in ("random_resized_crop(16)", "flip_lr"):
    pipeline = pp.parse(spec)
    outs = [pipeline({"image": RGB}, np.random.default_rng(s))["image"]
            for s in range(8)]
    assert any(not np.array_equal(outs[0], o) for o in outs[1:]), spec


def test_flip_lr_flips():
  out = pp.parse("flip_lr(p=1.0)")({"image": RGB}, np.random.default_rng(0))
  np.testing.assert_array_equal(out["image"], RGB[:, ::-1])


def test_value_range_and_normalize_values():
  image = np.array([[[0], [255]]], np.uint8)
  out = pp.parse("value_range(-1, 1)")({"image": image}, None)["image"]
  np.testing.assert_allclose(out.ravel(), [-1.0, 1.0])
  assert out.dtype == np.float32
  out = pp.parse("normalize(0.5, 0.25)")({"image": image}, None)["image"]
  np.testing.assert_allclose(out.ravel(), [-2.0, 2.0])
  rgb = pp.parse("normalize")({"image": RGB}, None)["image"]
  expected = (RGB[0, 0] / 255.0 - np.array(pp.IMAGENET_MEAN)) / pp.IMAGENET_STD
  np.testing.assert_allclose(rgb[0, 0], expected, rtol=1e-5)


def test_resize_is_bilinear_and_keeps_constant_images():
  flat = np.full((8, 8, 1), 100, np.uint8)
  out = pp.parse("resize(16)")({"image": flat}, None)["image"]
  assert out.shape == (16, 16, 1) and out.dtype == np.uint8
  assert (out == 100).all()
  floats = pp.parse("value_range(0,1)|resize((4, 6))")({"image": RGB}, None)
  assert floats["image"].shape == (4, 6, 3)
  assert floats["image"].dtype == np.float32


def test_random_resized_crop_full_scale_is_plain_resize():
  square = RGB[:, :20]
  crop = pp.parse("random_resized_crop(10, scale=(1.0, 1.0), ratio=(1.0, 1.0))")
  out = crop({"image": square}, np.random.default_rng(0))["image"]
  resized = pp.parse("resize(10)")({"image": square}, None)["image"]
  np.testing.assert_array_equal(out, resized)


def test_random_resized_crop_box_within_bounds():
  rng = np.random.default_rng(0)
  for _ in range(200):
    top, left, h, w = pp._inception_box(  # pylint: disable=protected-access
        20, 30, rng, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)
    )
    assert 0 <= top and top + h <= 20 and 0 <= left and left + w <= 30
    assert 0.08 * 600 * 0.8 <= h * w <= 600


def test_decode_png_bytes_and_passthrough():
  buf = io.BytesIO()
  Image.fromarray(RGB).save(buf, format="PNG")
  out = pp.parse("decode")({"image": buf.getvalue()}, None)["image"]
  np.testing.assert_array_equal(out, RGB)
  gray = pp.parse("decode(1)")({"image": buf.getvalue()}, None)["image"]
  assert gray.shape == (20, 30, 1)
  assert pp.parse("decode")({"image": RGB}, None)["image"] is RGB


def test_parse_splits_only_top_level_bars():
  pipeline = pp.parse(" resize((16, 8)) | value_range(lo=0, hi=1) |")
  assert [op.name for op in pipeline.ops] == ["resize", "value_range"]
  assert pipeline.ops[0].args == ((16, 8),)
  assert dict(pipeline.ops[1].kwargs) == {"lo": 0, "hi": 1}
  assert pp.parse("").ops == () and pp.parse(None).ops == ()


def test_unknown_op_names_valid_ops():
  with pytest.raises(ValueError, match="Unknown pp op 'resise'") as e:
    pp.parse("resise(16)|flip_lr")
  assert "resize" in str(e.value) and "random_resized_crop" in str(e.value)


def test_bad_op_arguments_and_syntax(data_dir):
  with pytest.raises(ValueError, match="Bad arguments for pp op"):
    pp.parse("resize(16, 17, 18)")
  with pytest.raises(ValueError, match="Cannot parse pp op"):
    pp.parse("resize(size=x)")
  with pytest.raises(ValueError, match="Unknown pp op"):
    vd.make_train_loader(
        make_cfg(data_dir, pp_train="nope"), global_batch_size=8, seed=0
    )


def test_register_new_op():
  @pp.register("test_invert")
  def invert(example, rng):  # pylint: disable=unused-variable
    del rng
    example["image"] = 255 - example["image"]
    return example

  out = pp.parse("test_invert")({"image": RGB}, None)["image"]
  np.testing.assert_array_equal(out, 255 - RGB)
  with pytest.raises(ValueError, match="already registered"):
    pp.register("test_invert")(invert)
  del pp._REGISTRY["test_invert"]  # pylint: disable=protected-access
