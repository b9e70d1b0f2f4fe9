r"""Trains and evaluates a vitjax config. Flags only; everything else lives in the config.

  python main.py --config=configs/default.py --workdir=workdirs/default
  python main.py --config=configs/vit.py:variant=S/16,dataset=cifar10 --workdir=DIR \
      --config.optimizer.lr=1e-3

Running the same command again resumes from the latest checkpoint in --workdir.
SIGTERM or Ctrl-C saves a checkpoint at the next step boundary and exits with 128 + the signal
number (143, 130); a non-finite loss exits with 1 and keeps the last good checkpoint.

Multi-host: `--distributed` on every host. TPU pods and SLURM/Open MPI clusters are detected by
`jax.distributed.initialize()`; elsewhere pass --coordinator_address=HOST:PORT (process 0's host),
--num_processes and --process_id (e.g. two processes on one CPU machine:
`--distributed --coordinator_address=127.0.0.1:12345 --num_processes=2 --process_id=0`, and
`--process_id=1` in a second shell).
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:args]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints and logs go.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "Call jax.distributed.initialize() (multi-host). Without the "
                                 "three flags below it reads the cluster from the environment.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "HOST:PORT of process 0 (with --distributed).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "Number of processes (with --distributed).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "This process's index in [0, num_processes).")
flags.mark_flags_as_required(["config", "workdir"])


def init_distributed():
  """jax.distributed.initialize from the flags, or from the environment when none are given."""
  import jax  # pylint: disable=import-outside-toplevel
  given = {"coordinator_address": _COORDINATOR.value, "num_processes": _NUM_PROCESSES.value,
           "process_id": _PROCESS_ID.value}
  if not _DISTRIBUTED.value:
    if any(v is not None for v in given.values()):
      raise app.UsageError("--coordinator_address/--num_processes/--process_id need "
                           "--distributed")
    return
  if any(v is None for v in given.values()) and any(v is not None for v in given.values()):
    raise app.UsageError("pass all of --coordinator_address, --num_processes and --process_id, "
                         "or none of them (auto-detection on TPU pods, SLURM, Open MPI)")
  if _NUM_PROCESSES.value is not None and not 0 <= _PROCESS_ID.value < _NUM_PROCESSES.value:
    raise app.UsageError(f"--process_id={_PROCESS_ID.value} must be in "
                         f"[0, {_NUM_PROCESSES.value})")
  # CPU processes need a collectives backend to talk to each other; GPUs and TPUs ignore this.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**{k: v for k, v in given.items() if v is not None})
  print(f"process {jax.process_index()} of {jax.process_count()}: "
        f"{jax.local_device_count()} local / {jax.device_count()} global devices", flush=True)


def main(argv):
  del argv
  init_distributed()
  # pylint: disable=import-outside-toplevel
  import jax
  from vitjax.train import checkpoint, guard, trainer
  logging.set_verbosity(logging.WARNING)  # orbax and grain are chatty at INFO
  try:
    summary = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (guard.NonFiniteError, checkpoint.CheckpointMismatchError, PermissionError) as e:
    # Errors about the run, not the code: the message is the whole story.
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)
  if jax.process_index() == 0:
    print({k: v for k, v in summary.items() if v is not None}, flush=True)
  if summary.get("stopped_by"):
    import signal  # pylint: disable=import-outside-toplevel
    sys.exit(128 + int(signal.Signals[summary["stopped_by"]]))


if __name__ == "__main__":
  app.run(main)
