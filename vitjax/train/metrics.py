"""Training logs: TensorBoard events, a JSON-lines log, and a console progress bar."""
import json
import os
import time

import jax
import tqdm


class MetricWriter:
  """Writes scalars to TensorBoard and `metrics.jsonl` in the workdir (process 0 only)."""

  def __init__(self, workdir: str, resume_step: int = 0):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tb = None
    if self.enabled:
      drop_rows_after(self.path, resume_step)
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: dict):
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    for k, v in scalars.items():
      self.tb.add_scalar(k, v, step)
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": int(step), "time": time.time(), **scalars}) + "\n")

  def close(self):
    if self.tb is not None:
      self.tb.flush()
      self.tb.close()


def drop_rows_after(path: str, step: int):
  """Keeps the rows of steps <= `step`: a run resumed there rewrites the later ones.

  A run killed between checkpoints logged steps that the resumed run trains again; without this,
  metrics.jsonl would hold two rows for them. A half-written last line (a kill mid-write) goes too.
  """
  if not os.path.exists(path):
    return
  keep = []
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      if row.get("step", 0) <= step:
        keep.append(line if line.endswith("\n") else line + "\n")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(keep)
  os.replace(tmp, path)


def progress_bar(total: int, initial: int):
  return tqdm.tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                   disable=jax.process_index() != 0, mininterval=1.0)


def write_json(path: str, obj: dict):
  if jax.process_index() != 0:
    return
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)  # atomic: a reader never sees half a file
