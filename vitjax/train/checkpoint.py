"""orbax checkpoints of the whole train state and the data-iterator position, with checksums.

Saves are asynchronous and atomic: orbax writes a step into `<step>.orbax-checkpoint-tmp-*` and
renames it when every file is written, so a kill at any moment (`kill -9` included) leaves the
previous checkpoints intact. Just before that rename, process 0 writes `manifest.json` into the
step: the size and SHA-256 of every file of the step (the arrays, orbax's metadata, the
data-iterator positions) and the model and data config that trained it. On the next start:
  - a leftover temporary directory (an interrupted save) is reported and removed by orbax;
  - a step whose files do not match its manifest (a flipped bit, a truncated or deleted file), or
    that fails to restore, is damaged: once an older step restores, the damaged newer ones are
    reported and moved aside to `damaged-<step>-<time>` (never deleted). When no step restores the
    run stops and moves nothing, unless told to start over;
  - a checkpoint written by a different model (other parameter shapes, or the same shapes from
    another model config) or optimizer stops the run with a message that says so, before
    anything is restored or moved.
A failed background save (a full disk) stops the run at the next step with one line.
Keeps the newest `keep` steps plus every step divisible by `keep_every`.
"""
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import time

import grain.python as grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

TMP_MARKER = ".orbax-checkpoint-tmp"
MANIFEST = "manifest.json"
# orbax rewrites the step's own metadata (its commit timestamp) after the rename: not checksummed.
UNSEALED = ("_CHECKPOINT_METADATA",)
SEALED_KEY = "vitjax_manifest"
CHUNK = 1 << 20


class CheckpointMismatchError(ValueError):
  """The checkpoint in the workdir was written by a different model or optimizer."""


class CheckpointDamagedError(RuntimeError):
  """No checkpoint in the workdir restores (every step is damaged)."""


class CheckpointSaveError(OSError):
  """A (background) save failed: the disk is full or the folder became unwritable."""


class CorruptStepError(ValueError):
  """A step's files do not match the checksums written when it was saved."""


def warn(msg: str):
  if jax.process_index() == 0:
    logging.warning(msg)


def check_writable(workdir: str):
  """A clear error up front instead of an orbax traceback (or a hang) at the first save."""
  if "://" in workdir:  # remote file systems: orbax reports their own errors
    return
  for folder, what in ((workdir, "workdir"), (os.path.join(workdir, "checkpoints"),
                                              "checkpoint folder")):
    try:
      os.makedirs(folder, exist_ok=True)
      probe = os.path.join(folder, f".write-probe-{os.getpid()}")
      with open(probe, "w") as f:
        f.write("ok")
      os.remove(probe)
    except OSError as e:
      raise PermissionError(f"{what} {folder!r} is not writable ({e.strerror}); checkpoints and "
                            "logs go there: pass a --workdir you can write to") from None


# ------------------------------------------------------------------ checksums
def _digest(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(CHUNK), b""):
      h.update(block)
  return h.hexdigest()


def _files(step_dir: str) -> list:
  out = []
  for dirpath, dirnames, names in os.walk(step_dir):
    dirnames.sort()
    out += [os.path.relpath(os.path.join(dirpath, n), step_dir) for n in sorted(names)]
  return [f for f in out if f != MANIFEST and os.path.basename(f) not in UNSEALED]


def write_manifest(step_dir: str, run: dict | None = None):
  """Checksums of every file in `step_dir` (and the run config), written atomically into it."""
  files = {rel: {"size": os.path.getsize(os.path.join(step_dir, rel)),
                 "sha256": _digest(os.path.join(step_dir, rel))} for rel in _files(step_dir)}
  path = os.path.join(step_dir, MANIFEST)
  with open(path + ".tmp", "w") as f:
    json.dump({"format": 1, "files": files, "run": run}, f, indent=1, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(path + ".tmp", path)


def read_manifest(step_dir: str):
  """The step's manifest, None where it has none (saved before checksums were written)."""
  path = os.path.join(step_dir, MANIFEST)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      manifest = json.load(f)
    assert isinstance(manifest["files"], dict)
  except (OSError, ValueError, KeyError, TypeError, AssertionError):
    raise CorruptStepError(f"its {MANIFEST} is unreadable") from None
  return manifest


def verify(step_dir: str):
  """Raises CorruptStepError naming the first file that differs from the manifest; returns the
  manifest (None for a step saved without one: nothing to check it against)."""
  manifest = read_manifest(step_dir)
  if manifest is None:
    return None
  for rel, want in sorted(manifest["files"].items()):
    path = os.path.join(step_dir, rel)
    if not os.path.isfile(path):
      raise CorruptStepError(f"{rel} is missing")
    size = os.path.getsize(path)
    if size != want["size"]:
      raise CorruptStepError(f"{rel} has {size} bytes, {want['size']} when saved")
    if _digest(path) != want["sha256"]:
      raise CorruptStepError(f"{rel} does not match its checksum (its content changed after the "
                             "save)")
  return manifest


def run_fields(config) -> dict:
  """The part of a config a checkpoint belongs to: the model and the data it was shaped by."""
  fields = {"model": config.model.to_dict() if hasattr(config.model, "to_dict") else config.model,
            "data.name": config.data.get("name"), "image_size": config.get("image_size")}
  return json.loads(json.dumps(fields, default=str))  # tuples -> lists, as read back


def _flat(tree, prefix="") -> dict:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flat(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: tree}


def config_diff(saved: dict, now: dict) -> list:
  """["model.num_heads: 2 in the checkpoint, 4 now", ...]."""
  a, b = _flat(saved), _flat(now)
  missing = object()
  return [f"{k}: {a.get(k, 'unset')!r} in the checkpoint, {b.get(k, 'unset')!r} now"
          for k in sorted(set(a) | set(b)) if a.get(k, missing) != b.get(k, missing)]


class Checkpointer:
  """A thin wrapper over `ocp.CheckpointManager` with items `state` and `data`.

  `run`: the config fields the checkpoints belong to (`run_fields(config)`), stored in each step's
  manifest and compared at restore; `allow_model_change` resumes despite a difference (shapes must
  still fit), for fine-tuning.
  """

  def __init__(self, workdir: str, *, keep: int = 3, keep_every: int | None = None,
               async_save: bool = True, run: dict | None = None,
               allow_model_change: bool = False):
    if not isinstance(keep, int) or keep < 1:
      raise ValueError(f"keep_checkpoints must be a positive int, got {keep!r}")
    if keep_every is not None and (not isinstance(keep_every, int) or keep_every < 1):
      raise ValueError(f"keep_checkpoint_every_steps must be None or a positive int, got "
                       f"{keep_every!r}")
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.run, self.allow_model_change, self.async_save = run, allow_model_change, async_save
    self._saving = None  # the step whose save may still be in flight (until waited for)
    self._sealing = None  # the step of the save orbax runs `_seal` for
    self._failed = False
    self.interrupted = self._report_interrupted_saves()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, keep_period=keep_every, create=True,
        enable_async_checkpointing=async_save, cleanup_tmp_directories=True,
        async_options=ocp.AsyncOptions(post_finalization_callback=self._seal) if async_save
        else None)
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

  # ---------------------------------------------------------------- saving
  def _seal(self):
    """orbax calls this on process 0 once every file of the step is written, just before the
    rename that commits it: the manifest is part of the atomic commit."""
    step = self._sealing
    tmp = glob.glob(os.path.join(self.directory, f"{step}{TMP_MARKER}*"))
    if len(tmp) == 1:
      write_manifest(tmp[0], self.run)
    else:  # another atomicity mode (a commit file in place): seal the final directory
      write_manifest(os.path.join(self.directory, str(step)), self.run)

  def save(self, step: int, state, data_iter=None, *, force: bool = False) -> bool:
    self.wait()  # surfaces a failed earlier save before starting another
    self.check_space(step, state)
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      items["data"] = grain.PyGrainCheckpointSave(data_iter)
    self._saving = self._sealing = step
    # The step's orbax metadata records that the commit includes a manifest (asynchronous saves
    # seal the step before the rename; synchronous ones write it just after): a deleted one is
    # damage too.
    sealed = {SEALED_KEY: True} if self.async_save else None
    try:
      saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force,
                                custom_metadata=sealed)
    except Exception as e:  # pylint: disable=broad-except  (tensorstore raises many types)
      raise self._save_error(step, e) from None
    if not saved:
      self._saving = None
    elif not self.async_save:
      if jax.process_index() == 0:
        write_manifest(os.path.join(self.directory, str(step)), self.run)
      self._saving = None
    return saved

  def poll(self):
    """Raises CheckpointSaveError as soon as a background save has failed (once per step)."""
    if self._saving is not None and not self.manager.is_saving_in_progress():
      self.wait()

  def wait(self):
    step, self._saving = self._saving, None
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      if self._failed:  # reported once already (orbax raises it again at every wait)
        return
      self._failed = True
      raise self._save_error(step, e) from None

  def check_space(self, step: int, state):
    """A full disk found before the save starts: one line, nothing half written (a save that
    runs out of space midway fails in orbax's background threads, which print tracebacks)."""
    if "://" in self.directory:
      return
    steps = self.all_steps()
    if steps:  # every step of a run has about the size of the last one
      need = sum(os.path.getsize(os.path.join(self.directory, str(steps[-1]), f))
                 for f in _files(os.path.join(self.directory, str(steps[-1]))))
    else:  # the arrays, and some room for orbax's metadata
      need = int(1.1 * sum(x.nbytes for x in jax.tree_util.tree_leaves(state)
                           if hasattr(x, "nbytes"))) + (64 << 10)
    free = shutil.disk_usage(self.directory).free
    if free < need:
      raise CheckpointSaveError(
          f"no space left to save the checkpoint of step {step} in {self.directory}: it needs "
          f"about {need / 2**20:.1f} MiB, {free / 2**20:.1f} MiB are free; "
          + self._intact(step) + ": free disk space (or lower keep_checkpoints), then run the "
          "same command again to resume")

  def _intact(self, step) -> str:
    good = [s for s in self.all_steps() if s != step]
    return (f"the steps saved before it ({', '.join(map(str, good))}) are intact" if good
            else "no earlier checkpoint was written")

  def _save_error(self, step, e: Exception) -> CheckpointSaveError:
    cause = e
    while cause.__cause__ is not None or cause.__context__ is not None:  # the deepest: ENOSPC
      cause = cause.__cause__ or cause.__context__
    code = re.search(r"os_error_code='?(\d+)", str(cause))  # tensorstore's form of an OSError
    if code or isinstance(cause, OSError) and cause.errno:
      errno = int(code.group(1)) if code else cause.errno
      why = f"{os.strerror(errno)} (errno {errno})"
    else:
      why = f"{type(cause).__name__}: {(str(cause).splitlines() or [''])[0][:200]}"
    return CheckpointSaveError(
        f"saving the checkpoint of step {step} in {self.directory} failed: {why}; "
        + self._intact(step) + ": free disk space or fix the folder's permissions, then run the "
        "same command again to resume")

  # ---------------------------------------------------------------- restoring
  def restore(self, abstract_state, data_iter=None, step=None):
    """Restores `step` into the shardings of `abstract_state` (ShapeDtypeStructs with .sharding)
    after checking its files against their checksums."""
    step = self.latest_step() if step is None else step
    manifest = verify(os.path.join(self.directory, str(step)))
    if manifest is None and self._sealed(step):
      raise CorruptStepError(f"its {MANIFEST} is missing (the step was saved with one)")
    self.check_compatible(step, abstract_state)
    self.check_run(step, manifest)
    if data_iter is not None:
      self.check_processes(step)
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items["data"] = grain.PyGrainCheckpointRestore(data_iter)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    if manifest is None:
      warn(f"checkpoint step {step} in {self.directory} has no {MANIFEST} (saved by an earlier "
           "version): restored without checking its checksums")
    return restored["state"], step

  def _sealed(self, step: int) -> bool:
    try:
      return bool((self.manager.metadata(step).custom_metadata or {}).get(SEALED_KEY))
    except Exception:  # pylint: disable=broad-except  (unreadable metadata: judged by restoring)
      return False

  def restore_latest(self, abstract_state, data_iter=None, *, start_over: bool = False):
    """The newest step that restores, falling back past damaged ones; (None, 0) without any.

    Damaged steps are moved aside only once an older one has restored; when none does, nothing
    is moved and CheckpointDamagedError is raised, unless `start_over`.
    """
    damaged = []
    for step in reversed(self.all_steps()):
      try:
        restored = self.restore(abstract_state, data_iter, step)
      except CheckpointMismatchError:
        raise
      except Exception as e:  # pylint: disable=broad-except  (orbax/tensorstore raise many types)
        first = str(e).splitlines()[0][:200] if str(e) else ""
        damaged.append((step, first if isinstance(e, CorruptStepError)
                        else f"{type(e).__name__}: {first}"))
        continue
      self._set_aside_all(damaged, f"falling back to step {step}")
      return restored
    if not damaged:
      return None, 0
    if not start_over:
      listed = "; ".join(f"step {s}: {why}" for s, why in damaged)
      raise CheckpointDamagedError(
          f"every checkpoint in {self.directory} is damaged ({listed}); nothing was moved or "
          "deleted: restore the folder from a copy, or pass --start_over to set them aside "
          "(as damaged-<step>-<time>) and train from step 0")
    self._set_aside_all(damaged, "no step left: starting over from step 0 (--start_over)")
    return None, 0

  def _set_aside_all(self, damaged: list, then: str):
    for step, why in damaged:
      aside = self._set_aside(step)
      warn(f"checkpoint step {step} in {self.directory} is damaged and was not restored ({why}); "
           f"moved it to {aside}; {then}")

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

  def check_run(self, step: int, manifest):
    """Raises CheckpointMismatchError where the step was trained with another model config."""
    if manifest is None or self.run is None or manifest.get("run") is None:
      return
    diff = config_diff(manifest["run"], self.run)
    if not diff:
      return
    if self.allow_model_change:
      warn(f"resuming step {step} of {self.directory} with a changed model "
           f"(--allow_model_change): {'; '.join(diff)}")
      return
    raise CheckpointMismatchError(
        f"the checkpoint at step {step} in {self.directory} was trained with another model "
        f"config: {'; '.join(diff)}. Use a new --workdir for a new model, the config that wrote "
        "this checkpoint to resume it, or --allow_model_change to fine-tune from it")

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

  def close(self):
    try:
      self.wait()
    finally:
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
