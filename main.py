r"""Trains and evaluates a vitjax config. Flags only; everything else lives in the config.

  python main.py --config=configs/default.py --workdir=workdirs/default
  python main.py --config=configs/vit.py:variant=S/16,dataset=cifar10 --workdir=DIR \
      --config.optimizer.lr=1e-3

Running the same command again resumes from the latest checkpoint in --workdir.
SIGTERM or Ctrl-C saves a checkpoint at the next step boundary and exits with 128 + the signal
number (143, 130); a non-finite loss exits with 1 and keeps the last good checkpoint.

Every error about the input (the config file, its args, a --config.* override, a value out of
range, a workdir that does not fit) is one line, `error: what was wrong; what would be right`, and
exit status 1; --traceback (or VITJAX_TRACEBACK=1) shows the traceback instead.
Every checkpoint damaged: the run stops unless --start_over; a checkpoint of another model
config: the run stops unless --allow_model_change (fine-tuning from it).

Multi-host: `--distributed` on every host. TPU pods and SLURM/Open MPI clusters are detected by
`jax.distributed.initialize()`; elsewhere pass --coordinator_address=HOST:PORT (process 0's host),
--num_processes and --process_id (e.g. two processes on one CPU machine:
`--distributed --coordinator_address=127.0.0.1:12345 --num_processes=2 --process_id=0`, and
`--process_id=1` in a second shell).
"""
import importlib.util
import logging as std_logging
import os
import sys
import traceback

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
_START_OVER = flags.DEFINE_bool("start_over", False,
                                "When every checkpoint in --workdir is damaged, move them aside "
                                "(as damaged-<step>-<time>) and train from step 0.")
_ALLOW_MODEL_CHANGE = flags.DEFINE_bool("allow_model_change", False,
                                        "Resume a checkpoint trained with another model config "
                                        "(same parameter shapes), e.g. to fine-tune from it.")
flags.DEFINE_bool("traceback", False, "Show the traceback of an error, not just its message.")


def show_traceback(argv=()) -> bool:
  return "--traceback" in argv or os.environ.get("VITJAX_TRACEBACK", "") not in ("", "0")


def fail(msg: str):
  print(f"error: {msg}", file=sys.stderr, flush=True)
  sys.exit(1)


def load_config_file(spec: str):
  """The config of "path[:args]", loaded as --config loads it, with one-line errors."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise ValueError(f"config file {path} does not exist; pass an existing one, e.g. "
                     "--config=configs/default.py (args after a colon: "
                     "configs/default.py:smoke=True)")
  try:
    module_spec = importlib.util.spec_from_file_location("vitjax_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
  except Exception as e:  # pylint: disable=broad-except  (anything a config file may raise)
    where = f", line {e.lineno}" if isinstance(e, SyntaxError) else ""
    raise ValueError(f"config file {path} cannot be loaded ({type(e).__name__}: "
                     f"{(str(e).splitlines() or [''])[0]}{where}); fix it or pass another "
                     "config file") from None
  if not hasattr(module, "get_config"):
    raise ValueError(f"config file {path} defines no get_config(); a config file defines "
                     "get_config(arg=None) returning an ml_collections.ConfigDict")
  try:
    return module.get_config(arg) if arg else module.get_config()
  except (ValueError, TypeError, KeyError) as e:
    raise ValueError(f"--config={spec}: {str(e).strip(chr(34) + chr(39))}") from None


def _field(config, dotted: str):
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def _short(value) -> str:
  if hasattr(value, "keys"):
    return f"a dict with fields {', '.join(sorted(value.keys()))}"
  return f"{type(value).__name__} {value!r}"[:120]


def missing_field(config, flag: str):
  """For --config.a.b=v: the message where config.a.b does not exist, else None."""
  name = flag[len("--config."):].partition("=")[0]
  parts = name.split(".")
  for i in range(len(parts)):
    parent = ".".join(parts[:i])
    node = _field(config, parent) if parent else config
    where = f"config.{parent}" if parent else "the config"
    if not hasattr(node, "keys"):
      return f"--config.{name}: {where} is {_short(node)}, not a dict with fields"
    if parts[i] not in node:
      return (f"--config.{name}: {where} has no field {parts[i]!r}; its fields: "
              f"{', '.join(sorted(node.keys()))}")
  return None


def describe_flag_error(config, error: Exception, argv) -> str:
  overrides = [a for a in argv[1:] if a.startswith("--config.")] if config is not None else []
  for flag in overrides:
    msg = missing_field(config, flag)
    if msg:
      return msg
  first = (str(error).splitlines() or [""])[0]
  for flag in overrides:
    name, _, value = flag[len("--config."):].partition("=")
    if f"--config.{name}" in first:
      first = first.replace(f"flag --config.{name}={value}: ", "")
      return (f"--config.{name}={value}: {first}; config.{name} is "
              f"{_short(_field(config, name))}: pass a value of that kind")
  if "Unknown command line flag" in first:
    return first + "; see --helpshort for the flags (config fields go as --config.FIELD=VALUE)"
  return first


def parse_flags(argv):
  """absl's flag parsing, with one line for what was wrong in place of a traceback."""
  try:
    spec = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")), None)
    config = load_config_file(spec) if spec else None
    try:
      rest = flags.FLAGS(argv)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(describe_flag_error(config, e, argv)) from None
    if flags.FLAGS.config is None or flags.FLAGS.workdir is None:
      raise ValueError("pass --config=FILE[:args] and --workdir=DIR, e.g. "
                       "--config=configs/default.py --workdir=workdirs/default")
    return rest
  except ValueError as e:
    if show_traceback(argv):
      raise
    fail(str(e))


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
  # A failed background save: orbax logs it from several threads with tracebacks; the run stops
  # with one line that says what failed (checkpoint.CheckpointSaveError).
  logging.get_absl_handler().addFilter(
      lambda record: not (record.levelno >= std_logging.ERROR and "/orbax/" in record.pathname))
  try:
    summary = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value,
                                         start_over=_START_OVER.value,
                                         allow_model_change=_ALLOW_MODEL_CHANGE.value)
  except (ValueError, TypeError, KeyError, OSError, guard.NonFiniteError,
          checkpoint.CheckpointDamagedError) as e:
    # Errors about the input or the run, not the code: the message is the whole story.
    if flags.FLAGS.traceback or show_traceback():
      traceback.print_exc()
    msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    fail(" ".join(line.strip() for line in msg.splitlines()) or type(e).__name__)
  if jax.process_index() == 0:
    print({k: v for k, v in summary.items() if v is not None}, flush=True)
  if summary.get("stopped_by"):
    import signal  # pylint: disable=import-outside-toplevel
    sys.exit(128 + int(signal.Signals[summary["stopped_by"]]))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
