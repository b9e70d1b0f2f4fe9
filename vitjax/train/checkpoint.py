"""orbax checkpoints of the whole train state and the data-iterator position.

Saves are asynchronous and atomic: orbax writes a step into `<step>.orbax-checkpoint-tmp-*` and
renames it when every file is written, so a kill at any moment (`kill -9` included) leaves the
previous checkpoints intact. On the next start:
  - a leftover temporary directory (an interrupted save) is reported and removed by orbax;
  - a step directory that fails to restore (truncated or missing files: a copy cut short, a full
    disk) is reported, moved aside to `damaged-<step>-<time>` (never deleted) and the next older
    step is restored instead;
  - a checkpoint written by a different model or optimizer stops the run with a message that says
    so, before anything is restored or moved.
Keeps the newest `keep` steps plus every step divisible by `keep_every`.
"""
import glob
import logging
import os
import re
import time

import grain.python as grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

TMP_MARKER = ".orbax-checkpoint-tmp"


class CheckpointMismatchError(ValueError):
  """The checkpoint in the workdir was written by a different model or optimizer."""


def warn(msg: str):
  if jax.process_index() == 0:
    logging.warning(msg)


def check_writable(workdir: str):
  """A clear error up front instead of an orbax traceback at the first save."""
  if "://" in workdir:  # remote file systems: orbax reports their own errors
    return
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write-probe-{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise PermissionError(f"workdir {workdir!r} is not writable ({e.strerror}); checkpoints and "
                          "logs go there: pass a --workdir you can write to") from None


class Checkpointer:
  """A thin wrapper over `ocp.CheckpointManager` with items `state` and `data`."""

  def __init__(self, workdir: str, *, keep: int = 3, keep_every: int | None = None,
               async_save: bool = True):
    if not isinstance(keep, int) or keep < 1:
      raise ValueError(f"keep_checkpoints must be a positive int, got {keep!r}")
    if keep_every is not None and (not isinstance(keep_every, int) or keep_every < 1):
      raise ValueError(f"keep_checkpoint_every_steps must be None or a positive int, got "
                       f"{keep_every!r}")
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.interrupted = self._report_interrupted_saves()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, keep_period=keep_every, create=True,
        enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.PyGrainCheckpointHandler()})

  def _report_interrupted_saves(self) -> list:
    tmp = sorted(glob.glob(os.path.join(self.directory, f"*{TMP_MARKER}*")))
    for path in tmp:
      warn(f"ignoring incomplete checkpoint {path} (a save was interrupted); orbax removes it "
           "and the newest complete step is used")
    return tmp

  def latest_step(self):
    return self.manager.latest_step()

  def all_steps(self):
    return sorted(self.manager.all_steps())

  def save(self, step: int, state, data_iter=None, *, force: bool = False) -> bool:
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      items["data"] = grain.PyGrainCheckpointSave(data_iter)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, abstract_state, data_iter=None, step=None):
    """Restores `step` into the shardings of `abstract_state` (ShapeDtypeStructs with .sharding)."""
    step = self.latest_step() if step is None else step
    self.check_compatible(step, abstract_state)
    if data_iter is not None:
      self.check_processes(step)
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items["data"] = grain.PyGrainCheckpointRestore(data_iter)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"], step

  def restore_latest(self, abstract_state, data_iter=None):
    """The newest step that restores, falling back past damaged ones; (None, 0) without any."""
    for step in reversed(self.all_steps()):
      try:
        return self.restore(abstract_state, data_iter, step)
      except CheckpointMismatchError:
        raise
      except Exception as e:  # pylint: disable=broad-except  (orbax/tensorstore raise many types)
        reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        aside = self._set_aside(step)
        older = [s for s in self.all_steps() if s < step]
        warn(f"checkpoint step {step} in {self.directory} is damaged and was not restored "
             f"({reason}); moved it to {aside}; "
             + (f"falling back to step {older[-1]}" if older else "no older step: starting over"))
    return None, 0

  def _set_aside(self, step: int) -> str:
    """Renames a damaged step out of orbax's view (kept for inspection, never deleted)."""
    src = epath.Path(self.directory) / str(step)
    dst = epath.Path(self.directory) / f"damaged-{step}-{int(time.time())}"
    if jax.process_index() == 0 and src.exists():
      src.rename(dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      multihost_utils.sync_global_devices(f"vitjax_set_aside_{step}")
    self.manager.reload()
    return str(dst)

  def check_compatible(self, step: int, abstract_state):
    """Raises CheckpointMismatchError if `step` holds parameters of other names or shapes.

    Unreadable metadata is not judged here: the restore that follows reports the damage.
    """
    try:
      saved = self.manager.item_metadata(step)["state"]
      saved = getattr(saved, "tree", saved)  # orbax's TreeMetadata holds the nested dicts
      saved_params = _shapes(saved["params"])
      saved_leaves = sorted(_shapes(saved).values())
    except Exception:  # pylint: disable=broad-except
      return
    want_params = _shapes(abstract_state.params)
    if saved_params != want_params:
      raise CheckpointMismatchError(
          f"the checkpoint at step {step} in {self.directory} was written by a different model: "
          f"{_diff(saved_params, want_params)}. Use a new --workdir for a new model, or the "
          "config that wrote this checkpoint to resume it")
    if saved_leaves != sorted(_shapes(abstract_state).values()):
      raise CheckpointMismatchError(
          f"the checkpoint at step {step} in {self.directory} has the same parameters but a "
          "different optimizer state (another optimizer or its options?). Use a new --workdir, "
          "or the optimizer config that wrote this checkpoint")

  def check_processes(self, step: int):
    """The data-iterator positions are per process: resuming needs the same process count."""
    path = os.path.join(self.directory, str(step), "data")
    counts = {int(m.group(1)) for m in (re.fullmatch(r"process_\d+-of-(\d+)\.json", n)
                                        for n in (os.listdir(path) if os.path.isdir(path) else ()))
              if m}
    if counts and jax.process_count() not in counts:
      raise CheckpointMismatchError(
          f"the checkpoint at step {step} in {self.directory} holds the data-iterator positions "
          f"of {sorted(counts)} processes but this run has {jax.process_count()}: resume with "
          "the same number of processes")

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def _key(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _shapes(tree) -> dict:
  """'path/to/leaf' -> (shape, dtype) for every array-like leaf (metadata or abstract)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(_key(k) for k in path): (tuple(leaf.shape), np.dtype(leaf.dtype).name)
          for path, leaf in leaves if hasattr(leaf, "shape")}


def _diff(saved: dict, want: dict, limit: int = 3) -> str:
  parts = []
  missing, extra = sorted(set(want) - set(saved)), sorted(set(saved) - set(want))
  if missing:
    parts.append(f"{len(missing)} parameter(s) missing from it, e.g. {missing[:limit]}")
  if extra:
    parts.append(f"{len(extra)} parameter(s) this model lacks, e.g. {extra[:limit]}")
  shapes = [f"{k}: saved {saved[k][0]}, model {want[k][0]}"
            for k in sorted(set(saved) & set(want)) if saved[k] != want[k]]
  if shapes:
    parts.append(f"{len(shapes)} shape(s) differ, e.g. {shapes[:limit]}")
  return "; ".join(parts)


def abstract_with_shardings(tree, shardings):
  return jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
