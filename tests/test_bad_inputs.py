"""Bad configs and inputs fail early with a message that says what is wrong and what would be
right, and never touch the checkpoints already in the workdir.

Every case runs `train_and_evaluate` on a workdir holding a good checkpoint (written once by the
fixture) and checks the error type, its message, and that the checkpoint files are unchanged.
"""
import hashlib
import os
import shutil

import pytest

from configs import default as default_config
from vitjax.train import checkpoint as ckpt_lib
from vitjax.train import trainer


def smoke(data_dir, **overrides):
  config = default_config.get_config("smoke=True")
  config.data.data_dir = data_dir
  config.update(total_steps=2, batch_size=16, eval_every_steps=2, checkpoint_every_steps=2,
                log_every_steps=2, warmup_steps=1)
  config.update(overrides)
  return config


def fingerprint(workdir) -> str:
  """Names and contents of every file under checkpoints/, and the run's config.json."""
  h = hashlib.sha256()
  with open(os.path.join(workdir, "config.json"), "rb") as f:
    h.update(f.read())
  root = os.path.join(workdir, "checkpoints")
  for dirpath, dirnames, files in sorted(os.walk(root)):
    dirnames.sort()
    for name in sorted(files):
      path = os.path.join(dirpath, name)
      h.update(os.path.relpath(path, root).encode())
      with open(path, "rb") as f:
        h.update(f.read())
  return h.hexdigest()


@pytest.fixture(scope="module")
def good_workdir(data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("bad_inputs") / "good")
  trainer.train_and_evaluate(smoke(data_dir), workdir)
  return workdir


def set_path(config, dotted, value):
  *parents, leaf = dotted.split(".")
  node = config
  for p in parents:
    node = node[p]
  with config.unlocked():
    if leaf in node:  # a value of another type, as a config file may hold: replace the field
      del node[leaf]
    node[leaf] = value


# (id, {dotted config field: value}, error type, regex the message must match)
CASES = [
    ("unknown attention", {"model.attention": {"name": "nope"}}, ValueError,
     r"unknown attention 'nope'; valid names: .*mhsa"),
    ("unknown reducer", {"model.tokens": {"name": "nope"}}, ValueError,
     r"unknown token reducer 'nope'; valid names: .*evit"),
    ("unknown variant", {"model.variant": "Q/2"}, ValueError,
     r"unknown ViT variant 'Q' in 'Q/2'; valid"),
    ("malformed variant", {"model.variant": "Ti2"}, ValueError, r"must look like 'S/16'"),
    ("unknown dataset", {"data.name": "no_such_dataset"}, ValueError,
     r"Unknown dataset 'no_such_dataset'"),
    ("keep rate 0", {"model.tokens": {"name": "evit", "keep_rate": 0.0, "locations": (1,)}},
     ValueError, r"keep_rate must be in \(0, 1\], got 0"),
    ("keep rate 1.5", {"model.tokens": {"name": "evit", "keep_rate": 1.5, "locations": (1,)}},
     ValueError, r"keep_rate must be in \(0, 1\], got 1.5"),
    ("image size vs patch", {"model.variant": "Ti/3"}, ValueError,
     r"image size \(8, 8\) is not divisible by the patch"),
    ("mesh vs device count", {"mesh": (("data", 3),)}, ValueError,
     r"mesh \{'data': 3\} does not fit 8 devices"),
    ("batch vs data axis", {"batch_size": 12}, ValueError,
     r"batch_size 12 .* not divisible by the 8 batch shards"),
    ("steps and epochs", {"total_epochs": 3}, ValueError,
     r"set one of total_steps \(2\) and total_epochs \(3\), not both"),
    ("neither steps nor epochs", {"total_steps": None}, ValueError,
     r"set exactly one of total_steps and total_epochs"),
    ("batch size as a string", {"batch_size": "16"}, ValueError,
     r"batch_size must be an int >= 1, got '16' \(str\)"),
    ("lr as a string", {"optimizer.lr": "fast"}, TypeError, r"optimizer.lr must be a number"),
    ("lr zero", {"optimizer.lr": 0.0}, ValueError, r"optimizer.lr must be a positive finite"),
    ("unknown optimizer", {"optimizer.name": "adam9"}, ValueError,
     r"unknown optimizer 'adam9'; valid: \('adamw', 'sgd'\)"),
    ("unknown schedule", {"optimizer.schedule": "step"}, ValueError,
     r"unknown lr schedule 'step'; valid"),
    ("unknown sharding", {"sharding": "zero3"}, ValueError,
     r"unknown sharding strategy 'zero3'; valid: \('dp', 'fsdp'\)"),
    ("fsdp without fsdp axis", {"sharding": "fsdp"}, ValueError,
     r"sharding='fsdp' needs an 'fsdp' mesh axis"),
    ("malformed mesh", {"mesh": ("data",)}, ValueError,
     r"mesh must be a sequence of \(axis name, size\) pairs"),
    ("mesh axis size as a string", {"mesh": (("data", "all"),)}, ValueError,
     r"mesh axis \('data', 'all'\) must be \(str, int\)"),
    ("accumulation vs batch", {"optimizer.grad_accum_steps": 3}, ValueError,
     r"grad_accum_steps=3 must be a positive int dividing batch_size=16"),
    ("label smoothing", {"label_smoothing": 1.5}, ValueError,
     r"label_smoothing must be in \[0, 1\)"),
    ("keep no checkpoints", {"keep_checkpoints": 0}, ValueError,
     r"keep_checkpoints must be an int >= 1"),
    ("checkpoint every 0 steps", {"checkpoint_every_steps": 0}, ValueError,
     r"checkpoint_every_steps must be an int >= 1 or None"),
    ("skip flag as a string", {"skip_nonfinite_steps": "yes"}, TypeError,
     r"skip_nonfinite_steps must be True or False"),
    ("unknown dtype", {"dtype": "float8"}, ValueError, r"unknown compute dtype 'float8'; valid"),
    ("unknown model option", {"model.heads": 4}, ValueError,
     r"unknown model option\(s\) \['heads'\]; valid"),
    ("unknown pp op", {"data.pp_train": "sharpen(2)"}, ValueError, r"sharpen"),
    ("keep-rate warm-up with an unknown option",
     {"model.class_token": True, "model.tokens": {"name": "evit", "keep_rate": 0.5,
                                                  "locations": (1,), "warmup": {"start": 0}}},
     ValueError, r"tokens.warmup has no option\(s\) \['start'\]; valid"),
    ("different model in the workdir", {"model.width": 32}, ckpt_lib.CheckpointMismatchError,
     r"written by a different model: .*shape\(s\) differ.*Use a new --workdir"),
    ("different optimizer in the workdir", {"optimizer.name": "sgd"},
     ckpt_lib.CheckpointMismatchError, r"different optimizer state"),
]


@pytest.mark.parametrize("name,fields,error,message", CASES, ids=[c[0] for c in CASES])
def test_bad_config_fails_clearly_and_leaves_the_checkpoint_alone(good_workdir, data_dir, name,
                                                                   fields, error, message):
  del name
  config = smoke(data_dir)
  for dotted, value in fields.items():
    set_path(config, dotted, value)
  before = fingerprint(good_workdir)
  with pytest.raises(error, match=message):
    trainer.train_and_evaluate(config, good_workdir)
  assert fingerprint(good_workdir) == before


@pytest.mark.parametrize("arg,message", [
    ("smoke=True,foo=1", r"unknown config arg 'foo'; valid keys: smoke, steps"),
    ("steps=many", r"config arg steps='many' must be a int"),
    ("smoke", r"config arg 'smoke' must look like key=value"),
])
def test_bad_config_args(arg, message):
  with pytest.raises(ValueError, match=message):
    default_config.get_config(arg)


def test_unwritable_workdir(data_dir, tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  with pytest.raises(PermissionError, match=r"workdir .* is not writable .* pass a --workdir"):
    trainer.train_and_evaluate(smoke(data_dir), str(blocker / "run"))


def test_corrupted_checkpoint_dir_falls_back_and_finishes(good_workdir, data_dir, tmp_path):
  workdir = str(tmp_path / "copy")
  shutil.copytree(good_workdir, workdir)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  os.makedirs(os.path.join(ckpt_dir, "4"))  # an empty step directory: nothing to restore
  os.makedirs(os.path.join(ckpt_dir, "5.orbax-checkpoint-tmp-123"))  # an interrupted save
  summary = trainer.train_and_evaluate(smoke(data_dir, total_steps=4, checkpoint_every_steps=4),
                                       workdir)
  assert summary["final_step"] == 4
  names = os.listdir(ckpt_dir)
  assert any(n.startswith("damaged-4-") for n in names) and "4" in names  # set aside, redone
  assert not any("orbax-checkpoint-tmp" in n for n in names)
