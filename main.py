r"""Trains and evaluates a vitjax config. Flags only; everything else lives in the config.

  python main.py --config=configs/default.py --workdir=workdirs/default
  python main.py --config=configs/vit.py:variant=S/16,dataset=cifar10 --workdir=DIR \
      --config.optimizer.lr=1e-3

Running the same command again resumes from the latest checkpoint in --workdir.
"""
from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:args]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints and logs go.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "Call jax.distributed.initialize() (multi-host; reads the "
                                 "cluster from the environment).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  import jax  # pylint: disable=import-outside-toplevel
  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  from vitjax.train import trainer  # pylint: disable=import-outside-toplevel
  logging.set_verbosity(logging.WARNING)  # orbax and grain are chatty at INFO
  summary = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  print({k: v for k, v in summary.items() if v is not None})


if __name__ == "__main__":
  app.run(main)
