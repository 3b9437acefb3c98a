"""Stopping cleanly on SIGINT (Ctrl-C) and SIGTERM (pre-emption): save, then exit.

The handler only records the request; the training loop checks it after each step, writes
a checkpoint of that step and exits, so a run never loses more than the step in flight
and the same command resumes it. A second Ctrl-C stops at once.
"""

import os
import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

from linearizer.log import log

_requested = None  # the signal number, once one arrived


def _handle(signum, frame):
  del frame
  global _requested
  if _requested is not None:  # asked twice: stop now, with the signal's default action
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    return
  _requested = signum
  # Every process says what it received (a plain print: this runs in a signal handler).
  print(
    f"\n{signal.Signals(signum).name} received: saving a checkpoint after this step, "
    "then stopping (send it again to stop at once).",
    flush=True,
  )


def install():
  """Routes SIGINT and SIGTERM to the handler (main thread only; elsewhere a no-op)."""
  if threading.current_thread() is threading.main_thread():
    for sig in (signal.SIGINT, signal.SIGTERM):
      signal.signal(sig, _handle)


def requested() -> bool:
  """Whether any process was asked to stop (all processes agree, so they stop together)."""
  local = _requested is not None
  if jax.process_count() == 1:
    return local
  return bool(np.any(multihost_utils.process_allgather(np.asarray(local))))


class Stopped(SystemExit):
  """Raised after the checkpoint is written; exits with 128 + the signal number."""

  def __init__(self, where: str):
    signum = _requested or signal.SIGTERM
    log(f"Stopped {where}. Run the same command again to resume.")
    super().__init__(128 + int(signum))
