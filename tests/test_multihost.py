"""Multi-host: two processes on localhost (4 CPU devices each, gloo collectives) train exactly as
one process with 8 devices; SIGTERM to one host stops both at the same step; each example of an
epoch goes to exactly one host."""
import collections
import json
import os
import signal
import socket

import numpy as np
import pytest

from configs import default as default_config
from test_reliability import Run, losses, params_at, steps_on_disk
from vitjax import data

MULTI_FLAGS = ("--config.total_steps=8", "--config.checkpoint_every_steps=4",
               "--config.eval_every_steps=8")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start(workdir, data_dir, n_devices, *extra, log=None, **hooks):
  return Run(workdir, data_dir, *MULTI_FLAGS, *extra, n_devices=n_devices, log=log, **hooks)


def start_pair(workdir, data_dir, hold_step_on_1=None):
  port = free_port()
  runs = []
  for i in range(2):
    hooks = {"hold_step": hold_step_on_1} if (i == 1 and hold_step_on_1) else {}
    runs.append(start(workdir, data_dir, 4, "--distributed",
                      f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                      f"--process_id={i}", log=f"{workdir}.p{i}.log", **hooks))
  return runs


@pytest.mark.slow
def test_two_hosts_match_one_host_and_stop_together_on_sigterm(data_dir, tmp_path):
  reference = str(tmp_path / "one_host")
  run = start(reference, data_dir, 8)
  assert run.finish() == 0, run.output()[-3000:]

  workdir = str(tmp_path / "two_hosts")
  p0, p1 = start_pair(workdir, data_dir, hold_step_on_1=3)
  p1.wait_for("HOLDING-STEP 3")
  p1.proc.send_signal(signal.SIGTERM)  # only host 1 is told
  for p in (p0, p1):
    assert p.finish() == 128 + signal.SIGTERM, p.output()[-3000:]
  # Host 1 voted after step 3; both read the votes two steps later and stop after step 5.
  assert "stopped by SIGTERM after step 5" in p0.output()
  assert steps_on_disk(workdir) == [4, 5]

  for p in start_pair(workdir, data_dir):
    assert p.finish() == 0, p.output()[-3000:]
  a, b = losses(reference), losses(workdir)
  assert sorted(a) == sorted(b) == list(range(1, 9))
  np.testing.assert_allclose([b[k] for k in sorted(b)], [a[k] for k in sorted(a)], rtol=1e-5)
  for x, y in zip(params_at(reference, 8), params_at(workdir, 8)):
    np.testing.assert_allclose(y, x, atol=3e-5)  # AdamW amplifies summation-order noise
  with open(os.path.join(workdir, "summary.json")) as f:
    assert json.load(f)["eval_count"] == 360


def test_each_example_goes_to_exactly_one_host_per_epoch(data_dir):
  config = default_config.get_config("smoke=True")
  config.data.data_dir = data_dir
  config.data.pp_train = ""  # raw pixels identify the examples
  source = data.data_source(config.data, "train")
  n = len(source)  # 1437 = 3 * 479: a global batch of 2 * 479 spans 1.5 epochs
  local = n // 3
  hosts = [iter(data.make_train_loader(config.data, global_batch_size=2 * local, seed=0,
                                       process_index=i, process_count=2)) for i in range(2)]
  # Epoch 0 is stream positions [0, n): host 0's first two batches, host 1's first one.
  seen = [next(hosts[0]), next(hosts[1]), next(hosts[0])]
  got = collections.Counter(img.tobytes() for b in seen for img in b["image"].astype(np.uint8))
  want = collections.Counter(np.asarray(source[i]["image"]).tobytes() for i in range(n))
  assert got == want


def test_global_batch_does_not_depend_on_the_number_of_hosts(data_dir):
  config = default_config.get_config("smoke=True")
  config.data.data_dir = data_dir
  one = iter(data.make_train_loader(config.data, global_batch_size=32, seed=0))
  four = [iter(data.make_train_loader(config.data, global_batch_size=32, seed=0,
                                      process_index=i, process_count=4)) for i in range(4)]
  for _ in range(50):  # past the first epoch boundary (1437 / 32 = 45 batches)
    whole, parts = next(one), [next(h) for h in four]
    for key in ("image", "label"):
      np.testing.assert_array_equal(whole[key], np.concatenate([p[key] for p in parts]))
