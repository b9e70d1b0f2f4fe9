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
import re
import shutil
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


# ----------------------------------------------------------------- kills at other moments
@pytest.mark.slow
def test_kills_during_first_save_pruning_and_evaluation_then_resume_is_bit_identical(
    reference, data_dir, tmp_path):
  workdir = str(tmp_path / "faults")
  keep2 = "--config.keep_checkpoints=2"  # the save of step 9 prunes step 3
  # 1. kill -9 while the very first save (step 3) is in flight: nothing committed.
  run = Run(workdir, data_dir, keep2, hold_save=3)
  run.wait_for("HOLDING-SAVE 3")
  run.kill9()
  assert steps_on_disk(workdir) == []

  # 2. kill -9 while orbax deletes step 3 (half its files gone), after step 9 was committed.
  run = Run(workdir, data_dir, keep2, hold_prune=3)
  run.wait_for("HOLDING-PRUNE 3")
  run.kill9()
  assert "resumed at step" not in run.output()  # step 3 never committed: started at step 0
  assert steps_on_disk(workdir) == [3, 6, 9]

  # 3. kill -9 in the middle of the evaluation after step 12 (before its save).
  run = Run(workdir, data_dir, keep2, hold_eval=12)
  run.wait_for("HOLDING-EVAL 12")
  run.kill9()
  assert "resumed at step 9" in run.output()
  assert not os.path.exists(os.path.join(workdir, "summary.json"))

  # 4. the same command finishes the run: the half-deleted step 3 is pruned again, never read.
  run = Run(workdir, data_dir, keep2)
  assert run.finish() == 0, run.output()[-3000:]
  assert "resumed at step 9" in run.output() and "damaged" not in run.output()
  assert steps_on_disk(workdir) == [9, 12]
  assert_same_run(workdir, reference)


def _unshare_tmpfs_works() -> bool:
  try:
    return subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                          capture_output=True, timeout=30).returncode == 0
  except (OSError, subprocess.SubprocessError):
    return False


@pytest.mark.slow
def test_a_full_disk_stops_with_one_line_and_keeps_the_saved_steps(data_dir, tmp_path):
  """A real full disk: a 1.5 MiB tmpfs (in a user and mount namespace) holds the first step
  (about 1 MiB), not the second."""
  if not _unshare_tmpfs_works():
    pytest.skip("no user/mount namespaces here to mount a small tmpfs (unshare -rm)")
  mnt, out = tmp_path / "disk", tmp_path / "copy"
  mnt.mkdir()
  cmd = [sys.executable, RUNNER, *FLAGS, f"--workdir={mnt}/run"]
  script = (f"mount -t tmpfs -o size=1500k tmpfs {mnt} && {' '.join(map(repr, cmd))}; "
            f"rc=$?; cp -r {mnt}/run {out}; exit $rc")
  proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=ROOT, env=env_for(data_dir),
                        capture_output=True, text=True, timeout=300)
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert len(errors) == 1, proc.stderr
  assert re.fullmatch(
      re.escape(f"error: no space left to save the checkpoint of step 6 in {mnt}/run/checkpoints: "
                "it needs about ") + r"\d\.\d MiB, \d\.\d MiB are free; " + re.escape(
                    "the steps saved before it (3) are intact: free disk space (or lower "
                    "keep_checkpoints), then run the same command again to resume"), errors[0])
  assert "Traceback" not in proc.stderr
  assert steps_on_disk(str(out)) == [3]
  ckpt_lib.verify(str(out / "checkpoints" / "3"))  # every byte as saved


def small_state(scale=1.0):
  return {"w": np.arange(8.0, dtype=np.float32) * scale, "b": np.ones((2, 3), np.float32)}


def small_abstract():
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one),
                                small_state())


def test_a_failed_background_save_is_reported_at_the_next_poll(tmp_path, monkeypatch):
  """A save that fails in orbax's background thread (here ENOSPC while sealing the step, its
  last file) is reported by the next poll (the loop polls once per step), once, in one line."""
  import errno  # pylint: disable=import-outside-toplevel
  seal = ckpt_lib.write_manifest

  def full(step_dir, run=None):
    if os.path.basename(step_dir).startswith("2."):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return seal(step_dir, run)

  monkeypatch.setattr(ckpt_lib, "write_manifest", full)
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), keep=5)
  ckpt.save(1, small_state(), force=True)
  ckpt.save(2, small_state(2.0), force=True)
  deadline = time.time() + 60
  with pytest.raises(ckpt_lib.CheckpointSaveError) as e:
    while time.time() < deadline:
      ckpt.poll()
      time.sleep(0.01)
  assert str(e.value) == (
      f"saving the checkpoint of step 2 in {tmp_path}/checkpoints failed: No space left on "
      "device (errno 28); the steps saved before it (1) are intact: free disk space or fix the "
      "folder's permissions, then run the same command again to resume")
  ckpt.close()  # reported once: closing does not raise it again
  assert steps_on_disk(str(tmp_path)) == [1]
  ckpt_lib.verify(str(tmp_path / "checkpoints" / "1"))


# ----------------------------------------------------------------- damaged checkpoint files
@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
  """A run of 4 steps with checkpoints at steps 2 and 4, and what restoring it needs."""
  from vitjax import data  # pylint: disable=import-outside-toplevel
  from vitjax.train import mesh as mesh_lib, optim  # pylint: disable=import-outside-toplevel
  workdir = str(tmp_path_factory.mktemp("damage") / "run")
  config = smoke(data_dir, total_steps=4, checkpoint_every_steps=2, eval_every_steps=4,
                 batch_size=16)
  summary = trainer.train_and_evaluate(config, workdir)
  info = data.get_info(config.data)
  model = trainer.build_model(config, info)
  tx, _ = optim.make_optimizer(config.optimizer, 4, config.warmup_steps)
  mesh = mesh_lib.make_mesh(config.mesh)
  abstract, _, _ = trainer.state_spec(model, tx, config, mesh, info.image_shape)
  return dict(workdir=workdir, config=config, summary=summary, abstract=abstract,
              params={s: params_at(workdir, s) for s in (2, 4)})


def file_kinds(step_dir) -> dict:
  """One file of each kind in a step: orbax's metadata, the OCDBT manifests and data files of
  the arrays, the data-iterator position, the commit markers and the checksum manifest."""
  kinds = {}
  for rel in sorted(ckpt_lib._files(step_dir)) + [ckpt_lib.MANIFEST, "_CHECKPOINT_METADATA"]:
    kind = re.sub(r"/[0-9a-f]{32}$", "/<data file>", rel)
    if kind.endswith("<data file>"):  # the largest of the array data files
      rel = max((r for r in ckpt_lib._files(step_dir) if os.path.dirname(r) ==
                 os.path.dirname(rel)), key=lambda r: os.path.getsize(os.path.join(step_dir, r)))
    kinds.setdefault(kind, rel)
  return kinds


def damage(path, how):
  if how == "delete":
    os.remove(path)
  elif how == "truncate":
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)
  else:  # one flipped bit in the middle
    with open(path, "r+b") as f:
      f.seek(os.path.getsize(path) // 2)
      byte = f.read(1)
      f.seek(-1, 1)
      f.write(bytes([byte[0] ^ 0x10]))


def restore(workdir, trained, **kwargs):
  ckpt = ckpt_lib.Checkpointer(workdir, run=ckpt_lib.run_fields(trained["config"]))
  try:
    state, step = ckpt.restore_latest(trained["abstract"], **kwargs)
  finally:
    ckpt.close()
  return (None if state is None else jax.tree_util.tree_leaves(jax.device_get(state.params))), step


KINDS = ["_CHECKPOINT_METADATA", "commit_success.txt", "data/commit_success.txt",
         "data/process_0-of-1.json", "manifest.json", "state/_METADATA", "state/_sharding",
         "state/array_metadatas/process_0", "state/commit_success.txt", "state/d/<data file>",
         "state/manifest.ocdbt", "state/ocdbt.process_0/d/<data file>",
         "state/ocdbt.process_0/manifest.ocdbt"]


def test_every_kind_of_checkpoint_file_is_listed(trained):
  assert sorted(file_kinds(os.path.join(trained["workdir"], "checkpoints", "4"))) == KINDS


# The reason verify() gives, or None for the files the checksums do not cover.
def expected_reason(rel, how):
  if rel in ("_CHECKPOINT_METADATA", "commit_success.txt"):  # rewritten / written after sealing
    return None
  if rel == ckpt_lib.MANIFEST:  # deleted: the step's orbax metadata says it had one (restore)
    return None if how == "delete" else "its manifest.json is unreadable"
  return {"flip": f"{rel} does not match its checksum (its content changed after the save)",
          "truncate": f"{rel} has {{half}} bytes, {{size}} when saved",
          "delete": f"{rel} is missing"}[how]


@pytest.mark.parametrize("how", ["flip", "truncate", "delete"])
def test_a_damaged_file_of_any_kind_is_detected(trained, tmp_path, how):
  """Every kind of file of a step, damaged one at a time, against the step's checksums."""
  workdir = str(tmp_path / "run")
  shutil.copytree(trained["workdir"], workdir)
  step_dir = os.path.join(workdir, "checkpoints", "4")
  for kind, rel in file_kinds(step_dir).items():
    path = os.path.join(step_dir, rel)
    keep = open(path, "rb").read()
    damage(path, how)
    want = expected_reason(rel, how)
    if want is None:
      ckpt_lib.verify(step_dir)
    else:
      with pytest.raises(ckpt_lib.CorruptStepError) as e:
        ckpt_lib.verify(step_dir)
      assert str(e.value) == want.format(half=len(keep) // 2, size=len(keep)), kind
    with open(path, "wb") as f:  # undamaged again for the next kind
      f.write(keep)
    ckpt_lib.verify(step_dir)


@pytest.mark.parametrize("kind,how", [("state/ocdbt.process_0/d/<data file>", "flip"),
                                      ("data/process_0-of-1.json", "truncate"),
                                      ("manifest.json", "delete"),
                                      ("_CHECKPOINT_METADATA", "flip"),
                                      ("commit_success.txt", "delete")])
def test_a_damaged_newest_step_is_set_aside_and_the_previous_one_restored(trained, tmp_path,
                                                                          kind, how):
  """The restore never returns other numbers than the ones saved: a damaged step is set aside
  and the previous one restored; orbax's own step metadata (timestamps, rewritten at commit) and
  its final commit marker are not covered: damaged, the step still restores exactly, or is set
  aside by orbax's own parse."""
  workdir = str(tmp_path / "run")
  shutil.copytree(trained["workdir"], workdir)
  step_dir = os.path.join(workdir, "checkpoints", "4")
  damage(os.path.join(step_dir, file_kinds(step_dir)[kind]), how)
  params, step = restore(workdir, trained)
  names = os.listdir(os.path.join(workdir, "checkpoints"))
  if expected_reason(kind, how) is None and step == 4:
    assert "4" in names
  else:
    assert step == 2
    assert "4" not in names and any(n.startswith("damaged-4-") for n in names)
  for a, b in zip(params, trained["params"][step]):
    np.testing.assert_array_equal(a, b)


def test_every_step_damaged_stops_unless_told_to_start_over(trained, tmp_path):
  workdir = str(tmp_path / "all")
  shutil.copytree(trained["workdir"], workdir)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  for step in (2, 4):
    damage(os.path.join(ckpt_dir, str(step), file_kinds(os.path.join(ckpt_dir, str(step)))[
        "state/ocdbt.process_0/d/<data file>"]), "flip")
  before = sorted(os.listdir(ckpt_dir))
  with pytest.raises(ckpt_lib.CheckpointDamagedError) as e:
    restore(workdir, trained)
  msg = str(e.value)
  assert msg.startswith(f"every checkpoint in {ckpt_dir} is damaged (step 4: state/ocdbt.process_0/"
                        "d/") and "; step 2: state/ocdbt.process_0/d/" in msg
  assert msg.endswith("does not match its checksum (its content changed after the save)); "
                      "nothing was moved or deleted: restore the folder from a copy, or pass "
                      "--start_over to set them aside (as damaged-<step>-<time>) and train from "
                      "step 0")
  assert sorted(os.listdir(ckpt_dir)) == before
  assert restore(workdir, trained, start_over=True) == (None, 0)
  assert sorted(n.split("-")[1] for n in os.listdir(ckpt_dir)) == ["2", "4"]  # set aside


def test_a_flipped_bit_in_the_newest_step_is_trained_again_from_the_previous(trained, data_dir,
                                                                              tmp_path):
  """What a user sees: the rerun falls back to step 2 and ends exactly as the undamaged run."""
  workdir = str(tmp_path / "flip")
  shutil.copytree(trained["workdir"], workdir)
  step_dir = os.path.join(workdir, "checkpoints", "4")
  damage(os.path.join(step_dir, file_kinds(step_dir)["state/ocdbt.process_0/d/<data file>"]),
         "flip")
  os.remove(os.path.join(workdir, "summary.json"))
  summary = trainer.train_and_evaluate(trained["config"], workdir)
  assert summary["final_step"] == 4
  assert summary["eval_loss"] == trained["summary"]["eval_loss"]  # exact
  for a, b in zip(params_at(workdir, 4), trained["params"][4]):
    np.testing.assert_array_equal(a, b)


def test_a_step_saved_without_checksums_restores_with_a_warning(tmp_path, caplog):
  mngr = ocp.CheckpointManager(str(tmp_path / "checkpoints"),
                               item_handlers={"state": ocp.StandardCheckpointHandler()})
  mngr.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(small_state(3.0))))
  mngr.close()  # as checkpoints were written before they carried checksums
  ckpt = ckpt_lib.Checkpointer(str(tmp_path))
  ckpt.check_compatible = lambda step, abstract: None  # a plain dict, not a TrainState
  restored, step = ckpt.restore_latest(small_abstract())
  ckpt.close()
  assert step == 3
  np.testing.assert_array_equal(restored["w"], small_state(3.0)["w"])
  assert "has no manifest.json (saved by an earlier version): restored without checking" in (
      caplog.text)


# ----------------------------------------------------------------- evaluation
@pytest.mark.slow
def test_evaluate_is_quiet_and_writes_beside_the_checkpoint(trained, data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(trained["workdir"], workdir)
  elsewhere = tmp_path / "cwd"
  elsewhere.mkdir()
  env = env_for(data_dir, **{})
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.run(
      [sys.executable, "-m", "vitjax.evaluate", f"--config={ROOT}/configs/default.py:smoke=True",
       f"--config.data.data_dir={data_dir}", f"--checkpoint={workdir}", "--runs=1"],
      cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  assert len(lines) == 4 and lines[0].startswith("| model | reducer |"), proc.stdout
  assert lines[-1] == f"written to {workdir}/evaluation.json"
  assert not [line for line in proc.stderr.splitlines() if "orbax" in line or line[:1] == "I"], (
      proc.stderr)
  with open(os.path.join(workdir, "evaluation.json")) as f:
    assert json.load(f)[0]["top1"] == pytest.approx(100 * trained["summary"]["eval_top1"])
  assert not os.listdir(elsewhere)


def test_evaluate_refuses_a_damaged_step(trained, tmp_path):
  from vitjax import evaluate, loading  # pylint: disable=import-outside-toplevel
  workdir = str(tmp_path / "run")
  shutil.copytree(trained["workdir"], workdir)
  step_dir = os.path.join(workdir, "checkpoints", "4")
  rel = file_kinds(step_dir)["state/ocdbt.process_0/d/<data file>"]
  damage(os.path.join(step_dir, rel), "flip")
  with pytest.raises(loading.LoadError) as e:
    evaluate.run(trained["config"], workdir, runs=1)
  assert str(e.value) == (
      f"the checkpoint in {workdir} at step 4 is damaged ({rel} does not match its checksum (its "
      "content changed after the save)); evaluate another step (--step; saved: 2, 4)")
