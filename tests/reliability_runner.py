"""Runs main.py with test hooks that hold it at chosen moments, so a test can kill it there.

  python tests/reliability_runner.py <main.py flags>

Environment (all optional):
  VITJAX_TEST_HOLD_STEP=N   after step N (once every earlier save is committed), print
                            "HOLDING-STEP N" and wait for a signal (or a kill)
  VITJAX_TEST_HOLD_SAVE=N   hold the asynchronous save of step N just before orbax commits it
                            (its files written, the temporary directory not yet renamed), print
                            "HOLDING-SAVE N" and wait for a kill
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

  def patched(config, workdir_):
    with config.unlocked():
      config.update(fields)
    return train(config, workdir_)

  trainer.train_and_evaluate = patched


if __name__ == "__main__":
  if os.environ.get("VITJAX_TEST_HOLD_STEP"):
    hold_step(int(os.environ["VITJAX_TEST_HOLD_STEP"]))
  if os.environ.get("VITJAX_TEST_HOLD_SAVE"):
    hold_save(int(os.environ["VITJAX_TEST_HOLD_SAVE"]))
  if os.environ.get("VITJAX_TEST_NAN_AT_STEP"):
    nan_at_step(int(os.environ["VITJAX_TEST_NAN_AT_STEP"]))
  if os.environ.get("VITJAX_TEST_SET"):
    set_config(json.loads(os.environ["VITJAX_TEST_SET"]))
  sys.argv = [os.path.join(ROOT, "main.py")] + sys.argv[1:]
  runpy.run_path(sys.argv[0], run_name="__main__")
