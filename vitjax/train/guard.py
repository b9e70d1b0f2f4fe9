"""Stopping safely: preemption signals that every host obeys at the same step, and non-finite
steps caught before any checkpoint of their state is written.

The host reads per-step flags `LAG` steps after dispatching the step that produced them, so the
check costs no device sync in the steady state (the device is still busy with the newer steps).
"""
import collections
import signal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

LAG = 2
SIGNALS = (signal.SIGTERM, signal.SIGINT)


def say(msg: str):
  if jax.process_index() == 0:
    print(msg, flush=True)


class NonFiniteError(FloatingPointError):
  """A training step produced a non-finite loss or gradient."""


class StopRequests:
  """SIGTERM / SIGINT -> a stop at a step boundary, the same step on every host.

  One process: the step after the signal. Several: each step every host votes (a tiny jitted
  max over all devices) and reads the vote of `LAG` steps ago, so all hosts read the same votes
  at the same steps and stop together even when only one of them was signalled.
  A second signal stops at once, without saving.
  """

  def __init__(self):
    self.received = 0
    self._old = {}
    self._votes = collections.deque()
    self._multi = jax.process_count() > 1
    if self._multi:
      mesh = Mesh(np.asarray(jax.devices()), ("hosts",))
      self._local = len(jax.local_devices())
      self._in = NamedSharding(mesh, P("hosts"))
      self._max = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, P()))

  def __enter__(self):
    for sig in SIGNALS:
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread (some notebooks, test runners): no handlers
        pass
    return self

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)
    self._old = {}

  def _handle(self, signum, frame):
    del frame
    if self.received:
      raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping without saving")
    self.received = signum
    print(f"received {signal.Signals(signum).name}: saving a checkpoint at the next step "
          "boundary, then exiting (send it again to exit at once, without saving)", flush=True)

  def poll(self, done: int) -> int:
    """The signal number to stop on after step `done` (0: go on). Call once per step."""
    if not self._multi:
      return self.received
    local = np.full((self._local,), self.received, np.int32)
    vote = self._max(jax.make_array_from_process_local_data(self._in, local))
    self._votes.append((done, vote))
    while self._votes and self._votes[0][0] <= done - LAG:
      signum = int(self._votes.popleft()[1])
      if signum:
        self.received = self.received or signum
        return signum
    return 0


class FiniteCheck:
  """Reads each step's `train/nonfinite` flag; raises on the first bad step unless skipping."""

  def __init__(self, skip: bool, last_good):
    self.skip, self.last_good = skip, last_good  # last_good() -> newest saved step or None
    self.pending = collections.deque()
    self.skipped = 0

  def add(self, done: int, metrics: dict):
    keys = ("train/nonfinite", "train/loss", "train/grad_norm")
    self.pending.append((done, tuple(metrics[k] for k in keys)))

  def check(self, upto: int):
    """Checks every pending step <= upto (call with the current step before saving)."""
    while self.pending and self.pending[0][0] <= upto:
      done, flags = self.pending.popleft()
      bad, loss, grad_norm = (float(x) for x in jax.device_get(flags))
      if not bad:
        continue
      if self.skip:
        self.skipped += 1
        if self.skipped <= 3:
          say(f"step {done}: non-finite loss or gradient (loss {loss}, grad norm {grad_norm}); "
              "update skipped (skip_nonfinite_steps=True)")
        continue
      last = self.last_good()
      raise NonFiniteError(
          f"non-finite loss or gradient at step {done} (loss {loss}, grad norm {grad_norm}). "
          "Stopped without saving that state; "
          + (f"the newest checkpoint (step {last}) is the last good one. " if last is not None
             else "no checkpoint was written. ")
          + "Try a lower optimizer.lr, optimizer.clip_norm, or skip_nonfinite_steps=True (which "
          "skips such updates).")

  def flush(self):
    self.check(float("inf"))
