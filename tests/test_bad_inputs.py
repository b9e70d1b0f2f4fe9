"""Bad configs and inputs fail early with a message that says what is wrong and what would be
right, and never touch the checkpoints already in the workdir.

Every case runs `train_and_evaluate` on a workdir holding a good checkpoint (written once by the
fixture) and checks the error type, its message, and that the checkpoint files are unchanged.
"""
import contextlib
import hashlib
import os
import shutil
import subprocess
import sys

import pytest

from configs import default as default_config
from vitjax.tokens import registry as tokens_registry
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


class Prefix(str):
  """A message checked up to here (what follows lists a registry that grows with the project)."""


# (id, {dotted config field: value}, error type, the message: exact, with {ckpt} for the
# workdir's checkpoints/ folder; Prefix(...) where it goes on to list a registry that grows)
CASES = [
    ('unknown attention', {'model.attention': {'name': 'nope'}}, ValueError,
     Prefix("unknown attention 'nope'; valid")),
    ('unknown reducer', {'model.tokens': {'name': 'nope'}}, ValueError,
     Prefix("unknown token reducer 'nope'; valid")),
    ('unknown variant', {'model.variant': 'Q/2'}, ValueError,
     "unknown ViT variant 'Q' in 'Q/2'; valid: Ti, S, M, B, L, H"),
    ('malformed variant', {'model.variant': 'Ti2'}, ValueError,
     "variant must look like 'S/16' (name/patch), got 'Ti2'; valid names: Ti, S, M, B, L, H"),
    ('unknown dataset', {'data.name': 'no_such_dataset'}, ValueError,
     "Unknown dataset 'no_such_dataset': tensorflow-datasets has no builder of that name (see "
     'https://www.tensorflow.org/datasets/catalog). vitjax reads tfds datasets in array_record '
     'format and never downloads at run time. Prepare it once on a machine with TensorFlow and '
     'network access:\n  tfds build <name> --file_format=array_record --data_dir={data_dir}\nand '
     'copy the resulting folder into data_dir here (ImageNet first needs its archives in '
     "--manual_dir). The embedded dataset 'vitjax_digits' needs no download: it is built from "
     'scikit-learn.'),
    ('keep rate 0',
     {'model.tokens': {'name': 'evit', 'keep_rate': 0.0, 'locations': (1,)}},
     ValueError,
     "token reducer 'evit': keep_rate must be in (0, 1], got 0.0"),
    ('keep rate 1.5',
     {'model.tokens': {'name': 'evit', 'keep_rate': 1.5, 'locations': (1,)}},
     ValueError,
     "token reducer 'evit': keep_rate must be in (0, 1], got 1.5"),
    ('image size vs patch', {'model.variant': 'Ti/3'}, ValueError,
     'image size (8, 8) is not divisible by the patch size 3'),
    ('mesh vs device count', {'mesh': (('data', 3),)}, ValueError,
     "mesh {'data': 3} does not fit 8 devices: the fixed axes multiply to 3, which must divide 8"),
    ('batch vs data axis', {'batch_size': 12}, ValueError,
     "batch_size 12 (micro-batch 12) is not divisible by the 8 batch shards of the mesh {'data': "
     '8}'),
    ('steps and epochs', {'total_epochs': 3}, ValueError,
     'set one of total_steps (2) and total_epochs (3), not both: set the other to None'),
    ('neither steps nor epochs', {'total_steps': None}, ValueError,
     'set exactly one of total_steps and total_epochs'),
    ('batch size as a string', {'batch_size': '16'}, ValueError,
     "batch_size must be an int >= 1, got '16' (str)"),
    ('lr as a string', {'optimizer.lr': 'fast'}, TypeError,
     "optimizer.lr must be a number, got 'fast' (str)"),
    ('lr zero', {'optimizer.lr': 0.0}, ValueError,
     'optimizer.lr must be a positive finite number, got 0.0'),
    ('unknown optimizer', {'optimizer.name': 'adam9'}, ValueError,
     "unknown optimizer 'adam9'; valid: ('adamw', 'sgd')"),
    ('unknown schedule', {'optimizer.schedule': 'step'}, ValueError,
     "unknown lr schedule 'step'; valid: ('cosine', 'linear', 'constant')"),
    ('unknown sharding', {'sharding': 'zero3'}, ValueError,
     "unknown sharding strategy 'zero3'; valid: ('dp', 'fsdp')"),
    ('fsdp without fsdp axis', {'sharding': 'fsdp'}, ValueError,
     "sharding='fsdp' needs an 'fsdp' mesh axis, e.g. mesh=(('data', 1), ('fsdp', -1))"),
    ('malformed mesh', {'mesh': ('data',)}, ValueError,
     "mesh must be a sequence of (axis name, size) pairs, e.g. (('data', -1),) or (('data', 2), "
     "('fsdp', -1)); got ('data',)"),
    ('mesh axis size as a string', {'mesh': (('data', 'all'),)}, ValueError,
     "mesh axis ('data', 'all') must be (str, int); e.g. (('data', -1),) or (('data', 2), "
     "('fsdp', -1))"),
    ('accumulation vs batch', {'optimizer.grad_accum_steps': 3}, ValueError,
     'optimizer.grad_accum_steps=3 must be a positive int dividing batch_size=16'),
    ('label smoothing', {'label_smoothing': 1.5}, ValueError,
     'label_smoothing must be in [0, 1), got 1.5'),
    ('keep no checkpoints', {'keep_checkpoints': 0}, ValueError,
     'keep_checkpoints must be an int >= 1, got 0 (int)'),
    ('checkpoint every 0 steps', {'checkpoint_every_steps': 0}, ValueError,
     'checkpoint_every_steps must be an int >= 1 or None, got 0 (int)'),
    ('skip flag as a string', {'skip_nonfinite_steps': 'yes'}, TypeError,
     "skip_nonfinite_steps must be True or False, got 'yes'"),
    ('unknown dtype', {'dtype': 'float8'}, ValueError,
     "unknown compute dtype 'float8'; valid: float32, bfloat16, float16"),
    ('unknown model option', {'model.heads': 4}, ValueError,
     Prefix("unknown model option(s) ['heads']; valid")),
    ('unknown pp op', {'data.pp_train': 'sharpen(2)'}, ValueError,
     Prefix("Unknown pp op 'sharpen'. Valid")),
    ('keep-rate warm-up with an unknown option',
     {'model.class_token': True,
      'model.tokens': {'name': 'evit', 'keep_rate': 0.5,
          'locations': (1,), 'warmup': {'start': 0}}},
     ValueError,
     "tokens.warmup has no option(s) ['start']; valid: ['grid', 'max_buckets', 'ramp_epochs', "
     "'start_epoch']"),
    ('different model in the workdir', {'model.width': 32}, ckpt_lib.CheckpointMismatchError,
     'the checkpoint at step 2 in {ckpt} was written by a different model: 27 shape(s) differ, '
     "e.g. ['block_0/attn/proj/bias: saved (64,), model (32,)', 'block_0/attn/proj/kernel: saved "
     "(64, 64), model (32, 32)', 'block_0/attn/qkv/bias: saved (192,), model (96,)']. Use a new "
     '--workdir for a new model, or the config that wrote this checkpoint to resume it'),
    ('different optimizer in the workdir',
     {'optimizer.name': 'sgd'},
     ckpt_lib.CheckpointMismatchError,
     'the checkpoint at step 2 in {ckpt} has the same parameters but a different optimizer state '
     '(another optimizer or its options?). Use a new --workdir, or the optimizer config that '
     'wrote this checkpoint'),
    # Out of range: an error, never a silent clamp or a no-op.
    ('tome r negative', {'model.tokens': {'name': 'tome', 'r': -5}}, ValueError,
     "token reducer 'tome': r must be an int >= 0 (tokens merged per block) or a list of them, "
     'got -5'),
    ('tome keep rate leaves no token',
     {'model.class_token': True,
      'model.tokens': {'name': 'tome', 'keep_rate': 0.01, 'locations': (1,)}},
     ValueError,
     "token reducer 'tome': keep_rate 0.01 leaves no token at a location (counts [0] of 16 "
     'patches): use a larger keep_rate'),
    ('drop path 2.0', {'model.drop_path': 2.0}, ValueError,
     'model.drop_path must be in [0, 1) (a drop probability), got 2.0'),
    ('dropout 1.0', {'model.dropout': 1.0}, ValueError,
     'model.dropout must be in [0, 1) (a drop probability), got 1.0'),
    ('depth 0', {'model.depth': 0}, ValueError,
     'model.depth must be a positive int, got 0'),
    ('warm-up longer than the run', {'warmup_steps': 5}, ValueError,
     'the lr warm-up (5 steps) is longer than the run (2 steps): the lr would never reach '
     'optimizer.lr; set warmup_steps (or warmup_epochs) to at most 2 steps'),
    ('mesh without a batch axis', {'mesh': (('model', -1),)}, ValueError,
     "mesh (('model', -1),) has no batch axis (data or fsdp): every device would compute the "
     "whole batch; add one, e.g. (('data', -1), ('model', 2)), or (('data', 1), ('model', -1)) "
     'to replicate the batch on purpose'),
    ('reducer at a block the model lacks',
     {'model.class_token': True,
      'model.tokens': {'name': 'evit', 'keep_rate': 0.7, 'locations': (1, 2)}},
     ValueError,
     "token reducer 'evit': locations has block 2; blocks are 0..1"),
    # The same parameter shapes from another model config: refused, naming the fields.
    ('other number of heads in the workdir',
     {'model.num_heads': 4},
     ckpt_lib.CheckpointMismatchError,
     'the checkpoint at step 2 in {ckpt} was trained with another model config: model.num_heads: '
     '2 in the checkpoint, 4 now. Use a new --workdir for a new model, the config that wrote '
     'this checkpoint to resume it, or --allow_model_change to fine-tune from it'),
    ('other attention in the workdir',
     {'model.attention': {'name': 'relu'}},
     ckpt_lib.CheckpointMismatchError,
     'the checkpoint at step 2 in {ckpt} was trained with another model config: '
     "model.attention.name: 'mhsa' in the checkpoint, 'relu' now. Use a new --workdir for a new "
     'model, the config that wrote this checkpoint to resume it, or --allow_model_change to '
     'fine-tune from it'),
]


@pytest.mark.parametrize("name,fields,error,message", CASES, ids=[c[0] for c in CASES])
def test_bad_config_fails_clearly_and_leaves_the_checkpoint_alone(good_workdir, data_dir, name,
                                                                   fields, error, message):
  config = smoke(data_dir)
  for dotted, value in fields.items():
    set_path(config, dotted, value)
  before = fingerprint(good_workdir)
  with pytest.raises(error) as e:
    trainer.train_and_evaluate(config, good_workdir)
  got = str(e.value)
  want = message.replace("{ckpt}", os.path.join(good_workdir, "checkpoints")).replace(
      "{data_dir}", data_dir)
  if isinstance(message, Prefix):
    assert got.startswith(want), got
  else:
    assert got == want
  # one line (main.py joins the lines of the one message that explains how to prepare data)
  assert "\n" not in got or name == "unknown dataset"
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


# ----------------------------------------------------------------- main.py: one line, exit 1
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = "--config=configs/default.py:smoke=True"
MODEL_FIELDS = ("attention, class_token, depth, drop_path, dropout, mlp_dim, name, num_heads, "
                "pool, posemb, tokens, variant, width")
CONFIG_FIELDS = ("batch_size, checkpoint_every_steps, data, dtype, eval_every_steps, "
                 "keep_checkpoints, label_smoothing, log_every_steps, mesh, model, optimizer, "
                 "seed, sharding, total_steps, warmup_steps")

# (id, main.py args, the exact line on stderr): errors found while the flags are parsed, before
# JAX is imported (a fraction of a second each)
CLI_CASES = [
    ("config file missing", ["--config=configs/nope.py"],
     "error: config file configs/nope.py does not exist; pass an existing one, e.g. "
     "--config=configs/default.py (args after a colon: configs/default.py:smoke=True)"),
    ("config file broken", ["--config={tmp}/broken.py"],
     "error: config file {tmp}/broken.py cannot be loaded (SyntaxError: invalid syntax "
     "(broken.py, line 1), line 1); fix it or pass another config file"),
    ("config file without get_config", ["--config={tmp}/empty.py"],
     "error: config file {tmp}/empty.py defines no get_config(); a config file defines "
     "get_config(arg=None) returning an ml_collections.ConfigDict"),
    ("unknown config arg", ["--config=configs/default.py:smoke=True,foo=1"],
     "error: --config=configs/default.py:smoke=True,foo=1: unknown config arg 'foo'; valid "
     "keys: smoke, steps, attention, tokens, keep_rate"),
    ("config arg of the wrong type", ["--config=configs/default.py:steps=many"],
     "error: --config=configs/default.py:steps=many: config arg steps='many' must be a int"),
    ("override of a missing model field", [SMOKE, "--config.model.patch_size=3"],
     f"error: --config.model.patch_size: config.model has no field 'patch_size'; its fields: "
     f"{MODEL_FIELDS}"),
    ("override of a missing field", [SMOKE, "--config.image_size=16"],
     f"error: --config.image_size: the config has no field 'image_size'; its fields: "
     f"{CONFIG_FIELDS}"),
    ("override below a value", [SMOKE, "--config.model.attention.name.x=3"],
     "error: --config.model.attention.name.x: config.model.attention.name is str 'mhsa', not a "
     "dict with fields"),
    ("override of the wrong type", [SMOKE, "--config.batch_size=abc"],
     "error: --config.batch_size=abc: invalid literal for int() with base 10: 'abc'; "
     "config.batch_size is int 128: pass a value of that kind"),
    ("unknown flag", [SMOKE, "--steps=3"],
     "error: Unknown command line flag 'steps'; see --helpshort for the flags (config fields go "
     "as --config.FIELD=VALUE)"),
    ("no config", [],
     "error: pass --config=FILE[:args] and --workdir=DIR, e.g. --config=configs/default.py "
     "--workdir=workdirs/default"),
]


def main_py(args, env=None):
  env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
         "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})}
  return subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("name,args,line", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_main_prints_one_line_and_exits_1(good_workdir, tmp_path, name, args, line):
  del name
  (tmp_path / "broken.py").write_text("def get_config(:\n")
  (tmp_path / "empty.py").write_text("X = 1\n")
  before = fingerprint(good_workdir)
  proc = main_py([a.format(tmp=tmp_path) for a in args] + [f"--workdir={good_workdir}"])
  assert proc.returncode == 1
  assert proc.stderr == line.format(tmp=tmp_path) + "\n"
  assert fingerprint(good_workdir) == before


def test_main_shows_the_traceback_when_asked():
  proc = main_py(["--config=configs/nope.py", "--workdir=/nonexistent"],
                 env={"VITJAX_TRACEBACK": "1"})
  assert proc.returncode == 1 and "Traceback (most recent call last)" in proc.stderr
  assert "config file configs/nope.py does not exist" in proc.stderr


@pytest.mark.slow
def test_main_refuses_another_model_in_one_line(good_workdir, data_dir):
  """Errors found once the run is set up (here: a workdir of another model config) are one line
  too."""
  before = fingerprint(good_workdir)
  proc = main_py([SMOKE, "--config.model.num_heads=4", f"--workdir={good_workdir}"],
                 env={"TFDS_DATA_DIR": data_dir})
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert proc.stderr.splitlines()[-1] == (
      f"error: the checkpoint at step 2 in {good_workdir}/checkpoints was trained with another "
      "model config: model.num_heads: 2 in the checkpoint, 4 now. Use a new --workdir for a new "
      "model, the config that wrote this checkpoint to resume it, or --allow_model_change to "
      "fine-tune from it")
  assert "Traceback" not in proc.stderr
  assert fingerprint(good_workdir) == before


# ----------------------------------------------------------------- warnings and combinations
def test_read_only_checkpoint_folder_fails_up_front(good_workdir, data_dir, tmp_path):
  workdir = str(tmp_path / "ro")
  shutil.copytree(good_workdir, workdir)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  with read_only(ckpt_dir):
    before = fingerprint(workdir)
    with pytest.raises(PermissionError) as e:
      trainer.train_and_evaluate(smoke(data_dir, total_steps=4), workdir)
    assert str(e.value) == (f"checkpoint folder {ckpt_dir!r} is not writable (Read-only file "
                            "system); checkpoints and logs go there: pass a --workdir you can "
                            "write to") or "(Permission denied)" in str(e.value)
    assert fingerprint(workdir) == before


@contextlib.contextmanager
def read_only(path):
  """A folder nobody can write to: permissions, or a read-only bind mount where the tests run as
  root (which permissions do not stop)."""
  if os.geteuid() != 0:
    os.chmod(path, 0o555)
    try:
      yield
    finally:
      os.chmod(path, 0o755)
    return
  bind = subprocess.run(["mount", "--bind", "-o", "ro", path, path], capture_output=True)
  if bind.returncode:
    pytest.skip(f"running as root without a read-only bind mount: {bind.stderr.strip()}")
  try:
    yield
  finally:
    subprocess.run(["umount", path], check=True)


def test_tome_r_larger_than_the_tokens_allow_warns_what_was_used(caplog):
  from vitjax.tokens import tome  # pylint: disable=import-outside-toplevel
  tome._WARNED.clear()  # pylint: disable=protected-access
  config = default_config.get_config("smoke=True")
  config.model.tokens = {"name": "tome", "r": 100}
  trainer.build_model(config, data_info())
  assert ("token reducer 'tome': r=100 asks for more merges than the tokens allow (at most half "
          "of a block's tokens); merging r=(8, 4) per block instead") in caplog.text


def data_info():
  from vitjax.data import pipeline  # pylint: disable=import-outside-toplevel
  return pipeline.DataInfo(num_classes=10, image_shape=(8, 8, 1),
                           num_examples={"train": 1437, "test": 360})


# every reducer (configs/default.py's keep_rate arg becomes MCTF's r)
REDUCERS = [n for n in tokens_registry.names() if n != "none"]


@pytest.mark.parametrize("reducer", REDUCERS)
def test_smoke_combines_with_a_reducer(reducer):
  config = default_config.get_config(f"smoke=True,tokens={reducer}")
  assert config.model.depth == 2 and tuple(config.model.tokens.locations) == (1,)
  trainer.build_model(config, data_info())
