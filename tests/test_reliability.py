"""Preemption, kills and bad steps, for real: main.py runs as a subprocess and is killed.

Every run is the smoke config (12 steps, a checkpoint every 3, one device per process). A run that
is killed (`kill -9`) before its first save, while an asynchronous save is in flight and right
after a save, stopped by SIGTERM in between and restarted each time with the same command, must
log the same losses at every step and end with the same parameters, bit for bit, as a run that
was never interrupted. `tests/reliability_runner.py` holds main.py at those moments.
"""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import reliability_runner
from configs import default as default_config
from vitjax.train import checkpoint as ckpt_lib
from vitjax.train import guard, trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = os.path.join(ROOT, "tests", "reliability_runner.py")
FLAGS = ("--config=configs/default.py:smoke=True", "--config.total_steps=12",
         "--config.checkpoint_every_steps=3", "--config.eval_every_steps=12",
         "--config.log_every_steps=1", "--config.keep_checkpoints=10")


def env_for(data_dir, **hooks):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device
  env.update(TFDS_DATA_DIR=data_dir, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="3",
             JAX_PLATFORMS="cpu", **{f"VITJAX_TEST_{k.upper()}": str(v) for k, v in hooks.items()})
  return env


class Run:
  """main.py (through the hook runner) in the background, its output in a file."""

  def __init__(self, workdir, data_dir, *extra, n_devices=None, log=None, **hooks):
    self.log = open(log or f"{workdir}.log", "a+")
    self.log.write(f"\n=== run {extra} {hooks}\n")
    self.log.flush()
    self.start = self.log.tell()
    env = env_for(data_dir, **hooks)
    if n_devices:
      env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n_devices}"
    self.proc = subprocess.Popen(
        [sys.executable, RUNNER, *FLAGS, f"--workdir={workdir}", *extra], cwd=ROOT,
        env=env, stdout=self.log, stderr=subprocess.STDOUT)

  def output(self) -> str:
    with open(self.log.name) as f:
      f.seek(self.start)
      return f.read().replace("\r", "\n")

  def wait_for(self, text: str, timeout: float = 240):
    deadline = time.time() + timeout
    while text not in self.output():
      if self.proc.poll() is not None:
        raise AssertionError(f"exited ({self.proc.returncode}) before {text!r}:\n"
                             f"{self.output()[-3000:]}")
      if time.time() > deadline:
        self.proc.kill()
        raise AssertionError(f"no {text!r} after {timeout} s:\n{self.output()[-3000:]}")
      time.sleep(0.05)

  def finish(self, timeout: float = 300) -> int:
    rc = self.proc.wait(timeout)
    self.log.close()
    return rc

  def kill9(self):
    self.proc.send_signal(signal.SIGKILL)
    return self.finish()


def steps_on_disk(workdir):
  names = os.listdir(os.path.join(workdir, "checkpoints"))
  return sorted(int(n) for n in names if n.isdigit())


def losses(workdir) -> dict:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  steps = [r["step"] for r in rows if "train/loss" in r]
  assert len(steps) == len(set(steps)), f"duplicate metric rows: {sorted(steps)}"
  return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def params_at(workdir, step):
  mngr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                               item_handlers={"state": ocp.StandardCheckpointHandler()})
  one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # whatever wrote it
  abstract = jax.tree_util.tree_map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one_device),
      mngr.item_metadata(step)["state"].tree)
  state = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract)))["state"]
  mngr.close()
  return jax.tree_util.tree_leaves(jax.device_get(state["params"]))


def assert_same_run(workdir, reference):
  a, b = losses(reference), losses(workdir)
  assert sorted(a) == sorted(b) == list(range(1, 13))
  assert [a[k] for k in sorted(a)] == [b[k] for k in sorted(b)]  # exact
  for x, y in zip(params_at(reference, 12), params_at(workdir, 12)):
    np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
  """The uninterrupted run."""
  workdir = str(tmp_path_factory.mktemp("reliability") / "reference")
  run = Run(workdir, data_dir)
  assert run.finish() == 0, run.output()[-3000:]
  return workdir


@pytest.mark.slow
def test_kills_and_sigterm_then_resume_is_bit_identical(reference, data_dir, tmp_path):
  workdir = str(tmp_path / "interrupted")
  # 1. kill -9 before the first save: nothing on disk, the next start begins at step 0.
  run = Run(workdir, data_dir, hold_step=2)
  run.wait_for("HOLDING-STEP 2")
  run.kill9()
  assert steps_on_disk(workdir) == []

  # 2. kill -9 while the asynchronous save of step 6 is in flight (files written, not committed).
  run = Run(workdir, data_dir, hold_save=6)
  run.wait_for("HOLDING-SAVE 6")
  run.kill9()
  assert steps_on_disk(workdir) == [3]
  assert glob.glob(os.path.join(workdir, "checkpoints", "6.orbax-checkpoint-tmp*"))

  # 3. the next start ignores the incomplete step 6 with a warning and resumes at step 3;
  #    SIGTERM after step 7 saves there and exits with 128 + 15.
  run = Run(workdir, data_dir, hold_step=7)
  run.wait_for("HOLDING-STEP 7")
  run.proc.send_signal(signal.SIGTERM)
  assert run.finish() == 128 + signal.SIGTERM, run.output()[-3000:]
  out = run.output()
  assert "ignoring incomplete checkpoint" in out and "6.orbax-checkpoint-tmp" in out
  assert "resumed at step 3" in out
  assert "stopped by SIGTERM after step 7" in out and "Traceback" not in out
  assert steps_on_disk(workdir) == [3, 6, 7]
  assert not os.path.exists(os.path.join(workdir, "summary.json"))

  # 4. kill -9 right after the save of step 9 is committed.
  run = Run(workdir, data_dir, hold_step=10)
  run.wait_for("HOLDING-STEP 10")
  run.kill9()
  assert steps_on_disk(workdir) == [3, 6, 7, 9]

  # 5. the same command once more finishes the run.
  run = Run(workdir, data_dir)
  assert run.finish() == 0, run.output()[-3000:]
  assert "resumed at step 9" in run.output()
  assert_same_run(workdir, reference)


@pytest.mark.slow
def test_nan_stops_at_the_first_bad_step_and_keeps_the_last_good_checkpoint(data_dir, tmp_path):
  workdir = str(tmp_path / "nan")
  run = Run(workdir, data_dir, "--config.log_every_steps=4", nan_at_step=5)
  assert run.finish() == 1
  out = run.output()
  assert "non-finite loss or gradient at step 5" in out
  assert "newest checkpoint (step 3) is the last good one" in out and "Traceback" not in out
  assert steps_on_disk(workdir) == [3]  # the save at step 6 (bad state) never happened
  assert all(np.isfinite(p).all() for p in params_at(workdir, 3))


# ----------------------------------------------------------------- in-process (fast) checks
def smoke(data_dir, **overrides):
  config = default_config.get_config("smoke=True")
  config.data.data_dir = data_dir
  config.update(overrides)
  return config


@pytest.fixture
def nan_at_step(monkeypatch):
  """nan_at_step(n): the train step n (1-based) of this test sees NaN images."""
  def poison(n):
    monkeypatch.setattr(trainer, "make_train_step", trainer.make_train_step)  # undone after
    reliability_runner.nan_at_step(n)
  return poison


def test_skip_nonfinite_steps_skips_the_update_and_counts_it(data_dir, tmp_path, nan_at_step):
  nan_at_step(5)
  config = smoke(data_dir, total_steps=6, skip_nonfinite_steps=True, batch_size=32)
  summary = trainer.train_and_evaluate(config, str(tmp_path))
  assert summary["final_step"] == 6 and summary["skipped_steps"] == 1
  assert np.isfinite(summary["eval_loss"])
  with open(tmp_path / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f if "train/nonfinite" in line]
  assert [r["train/skipped_steps"] for r in rows] == [0, 0, 1]  # logged at steps 2, 4, 6


def test_skipped_step_leaves_the_state_unchanged(data_dir, nan_at_step):
  from vitjax import data  # pylint: disable=import-outside-toplevel
  from vitjax.train import mesh as mesh_lib, optim  # pylint: disable=import-outside-toplevel
  nan_at_step(2)
  config = smoke(data_dir, batch_size=16, skip_nonfinite_steps=True)
  info = data.get_info(config.data)
  model = trainer.build_model(config, info)
  tx, _ = optim.make_optimizer(config.optimizer, 10, 2)
  mesh = mesh_lib.make_mesh((("data", 1),), jax.devices()[:1])
  state, _ = trainer.create_state(model, tx, config, mesh, info.image_shape)
  step = jax.jit(trainer.make_train_step(model, tx, config))
  batch = next(iter(data.make_train_loader(config.data, global_batch_size=16, seed=0)))
  s1, m1 = step(state, batch)
  s2, m2 = step(s1, batch)  # step 2 is poisoned
  assert float(m1["train/nonfinite"]) == 0 and float(m2["train/nonfinite"]) == 1
  assert int(s2.step) == 2
  for a, b in zip(jax.tree_util.tree_leaves((s1.params, s1.opt_state)),
                  jax.tree_util.tree_leaves((s2.params, s2.opt_state))):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_requests_a_stop_and_handlers_are_restored(sig):
  before = signal.getsignal(sig)
  with guard.StopRequests() as stop:
    assert stop.poll(1) == 0
    os.kill(os.getpid(), sig)
    time.sleep(0.05)
    assert stop.poll(2) == sig
  assert signal.getsignal(sig) is before


def test_damaged_newest_step_is_set_aside_and_the_previous_one_restored(tmp_path):
  state = {"w": np.arange(8.0, dtype=np.float32), "b": np.ones((2, 3), np.float32)}
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), keep=5, async_save=False)
  for s in (1, 2):
    ckpt.save(s, jax.tree_util.tree_map(lambda x, s=s: x * s, state), force=True)
  ckpt.close()
  for f in glob.glob(str(tmp_path / "checkpoints" / "2" / "state" / "**" / "d" / "*"),
                     recursive=True):
    with open(f, "r+b") as fh:  # truncated files: a copy cut short, a full disk
      fh.truncate(3)
  abstract = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                     sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])),
      state)
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), keep=5, async_save=False)
  ckpt.check_compatible = lambda step, abstract: None  # a plain dict, not a TrainState
  restored, step = ckpt.restore_latest(abstract)
  ckpt.close()
  assert step == 1
  np.testing.assert_array_equal(restored["w"], state["w"])
  names = os.listdir(tmp_path / "checkpoints")
  assert "2" not in names and any(n.startswith("damaged-2-") for n in names)
