"""Runs main.py with test hooks that hold it at chosen moments, so a test can kill it there.

  python tests/reliability_runner.py <main.py flags>

Environment (all optional):
  VITJAX_TEST_HOLD_STEP=N   after step N (once every earlier save is committed), print
                            "HOLDING-STEP N" and wait for a signal (or a kill)
  VITJAX_TEST_HOLD_SAVE=N   hold the asynchronous save of step N just before orbax commits it
                            (its files written, the temporary directory not yet renamed), print
                            "HOLDING-SAVE N" and wait for a kill
  VITJAX_TEST_HOLD_PRUNE=N  hold orbax's deletion of the old step N (pruned after a newer save
                            is committed) with some of its files deleted, print
                            "HOLDING-PRUNE N" and wait for a kill
  VITJAX_TEST_HOLD_EVAL=N   hold the evaluation after step N midway (some eval batches done),
                            print "HOLDING-EVAL N" and wait for a kill
  VITJAX_TEST_NAN_AT_STEP=N  the images of (1-based) step N become NaN inside the step, so
                            its loss and gradients are not finite
  VITJAX_TEST_SET='{"k": v}'  config fields set after the flags are parsed (keys the config file
                            does not define)
"""
import asyncio
import glob
import json
import os
import runpy
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def workdir() -> str:
  return next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--workdir="))


def hold_step(n: int):
  from vitjax.train import guard  # pylint: disable=import-outside-toplevel
  poll = guard.StopRequests.poll

  def held(self, done):
    if done == n:
      pattern = os.path.join(workdir(), "checkpoints", "*.orbax-checkpoint-tmp*")
      while glob.glob(pattern):
        time.sleep(0.02)
      print(f"HOLDING-STEP {n}", flush=True)
      while not self.received:
        time.sleep(0.02)
    return poll(self, done)

  guard.StopRequests.poll = held


def hold_save(n: int):
  from orbax.checkpoint._src.path import atomicity  # pylint: disable=import-outside-toplevel
  finalize = atomicity.AtomicRenameTemporaryPath.finalize

  async def held(self):
    final = self._final_path  # pylint: disable=protected-access
    if final.name == str(n) and final.parent.name == "checkpoints":
      print(f"HOLDING-SAVE {n}", flush=True)
      await asyncio.sleep(3600)
    return await finalize(self)

  atomicity.AtomicRenameTemporaryPath.finalize = held


def hold_prune(n: int):
  from orbax.checkpoint._src.path import deleter  # pylint: disable=import-outside-toplevel
  delete = deleter.PathDeleter.delete

  def held(self, path, **kwargs):
    if path.name == str(n) and path.parent.name == "checkpoints":
      files = sorted(glob.glob(os.path.join(str(path), "**", "*"), recursive=True))
      for f in [f for f in files if os.path.isfile(f)][::2]:  # half of them already gone
        os.remove(f)
      print(f"HOLDING-PRUNE {n}", flush=True)
      time.sleep(3600)
    return delete(self, path, **kwargs)

  deleter.PathDeleter.delete = held


def hold_eval(n: int):
  from vitjax import data  # pylint: disable=import-outside-toplevel
  from vitjax.train import trainer  # pylint: disable=import-outside-toplevel
  evaluate = trainer.evaluate
  batches = data.make_eval_batches

  def held(eval_step, params, config, *args, **kwargs):
    calls["n"] += 1
    if calls["n"] * config.eval_every_steps != n:
      return evaluate(eval_step, params, config, *args, **kwargs)

    def halfway(*a, **k):
      for i, batch in enumerate(batches(*a, **k)):
        if i == 1:
          print(f"HOLDING-EVAL {n}", flush=True)
          time.sleep(3600)
        yield batch
    data.make_eval_batches = halfway
    return evaluate(eval_step, params, config, *args, **kwargs)

  calls = {"n": 0}
  trainer.evaluate = held


def nan_at_step(n: int):
  """Poisons step n from outside the trainer: its train step sees NaN images."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from vitjax.train import trainer  # pylint: disable=import-outside-toplevel
  make = trainer.make_train_step

  def poisoned(*args, **kwargs):
    step_fn = make(*args, **kwargs)

    def fn(state, batch):
      bad = state.step + 1 == n
      image = jnp.where(bad, jnp.nan, batch["image"].astype(jnp.float32))
      return step_fn(state, {**batch, "image": image})
    return fn

  trainer.make_train_step = poisoned


def set_config(fields: dict):
  from vitjax.train import trainer  # pylint: disable=import-outside-toplevel
  train = trainer.train_and_evaluate

  def patched(config, workdir_, **kwargs):
    with config.unlocked():
      config.update(fields)
    return train(config, workdir_, **kwargs)

  trainer.train_and_evaluate = patched


if __name__ == "__main__":
  if os.environ.get("VITJAX_TEST_HOLD_STEP"):
    hold_step(int(os.environ["VITJAX_TEST_HOLD_STEP"]))
  if os.environ.get("VITJAX_TEST_HOLD_SAVE"):
    hold_save(int(os.environ["VITJAX_TEST_HOLD_SAVE"]))
  if os.environ.get("VITJAX_TEST_HOLD_PRUNE"):
    hold_prune(int(os.environ["VITJAX_TEST_HOLD_PRUNE"]))
  if os.environ.get("VITJAX_TEST_HOLD_EVAL"):
    hold_eval(int(os.environ["VITJAX_TEST_HOLD_EVAL"]))
  if os.environ.get("VITJAX_TEST_NAN_AT_STEP"):
    nan_at_step(int(os.environ["VITJAX_TEST_NAN_AT_STEP"]))
  if os.environ.get("VITJAX_TEST_SET"):
    set_config(json.loads(os.environ["VITJAX_TEST_SET"]))
  sys.argv = [os.path.join(ROOT, "main.py")] + sys.argv[1:]
  runpy.run_path(sys.argv[0], run_name="__main__")
