"""Train-state checkpoints with Orbax: periodic async saves, the last N kept, auto-resume.

A checkpoint holds the trained state (step, parameters, optimizer, EMA) and the data
position; never the frozen teacher. Saves commit atomically (Orbax writes to a temporary
directory and renames it), so a crash mid-save leaves the previous checkpoints intact;
a checkpoint that still fails to restore is reported, moved aside to `<step>.unreadable`
(never deleted) and the one before it is used. A save that fails (disk full, no
permission) raises SaveError; the checkpoints already written stay as they are.
"""

import os
import time

import jax
import orbax.checkpoint as ocp

from linearizer.errors import UserError
from linearizer.log import main_process, warn


class SaveError(UserError, OSError):
  """A checkpoint could not be written (the CLIs report it in one line, exit 2)."""


class Checkpointer:
  def __init__(self, directory, *, keep: int = 2, async_save: bool = True):
    directory = str(directory)
    if "://" not in directory:  # Orbax saves only to absolute paths (gs://… are left alone)
      directory = os.path.abspath(directory)
    self.directory = directory
    self._pending = None  # the step of the save that may still be under way
    self.manager = ocp.CheckpointManager(
      directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=True
      ),
    )

  @staticmethod
  def _saved_part(state):
    return state.replace(rest=None)  # RNG streams are reseeded every step: nothing to keep

  def save(self, step: int, state, data_state: dict, *, force: bool = False) -> bool:
    """Starts an (async) save of `state` and the data position at `step`.

    A step that is already saved (a stop right after a periodic save, or a resume of a
    finished stage) is left as it is.
    """
    if step in self.manager.all_steps():
      return False
    try:  # the previous async save: Orbax's save would wait for it too, and report its
      self.manager.wait_until_finished()  # failure as this step's
      self.manager.check_for_errors()
    except Exception as e:
      raise self._failed(self._pending, e) from e
    try:
      started = self.manager.save(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardSave(self._saved_part(state)), data=ocp.args.JsonSave(data_state)
        ),
        force=force,
      )
    except Exception as e:
      raise self._failed(step, e) from e
    self._pending = step if started else self._pending
    return started

  def restore_latest(self, state):
    """(state, data_state) from the newest checkpoint that restores, or (None, None).

    `state` is a freshly initialised state of the same structure and shardings: it gives
    the target shapes and the parts that are not saved.
    """
    target = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self._saved_part(state)
    )
    unreadable = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        restored = self.manager.restore(
          step,
          args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()
          ),
        )
      except Exception as e:
        warn(  # the first line only: TensorStore's error spells out its whole spec
          "Checkpoint at step %d could not be restored (%s: %s); trying the one before it.",
          step,
          type(e).__name__,
          str(e).splitlines()[0][:160] if str(e) else "",
        )
        unreadable.append(step)
        continue
      self._move_aside(unreadable, f"resuming from step {step}")
      return restored.state.replace(rest=state.rest), restored.data
    self._move_aside(unreadable, "none is readable: starting over from step 0")
    return None, None

  def _move_aside(self, steps, then: str) -> None:
    """Unreadable checkpoints would make Orbax skip every save up to their step and refuse
    to save at it: they are moved aside (kept for inspection), and the run writes those
    steps again."""
    for bad in steps:
      aside = os.path.join(self.directory, f"{bad}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}")
      if main_process():
        os.rename(os.path.join(self.directory, str(bad)), aside)
      warn("Moved the unreadable checkpoint of step %d to %s; %s.", bad, aside, then)
    if steps:
      self.manager.reload()

  def latest_step(self):
    return self.manager.latest_step()

  def wait(self):
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      raise self._failed(self._pending, e) from e

  def _failed(self, step, error) -> SaveError:
    try:  # saves still under way complete (or fail) before the process exits
      self.manager.wait_until_finished()
    except Exception:
      pass
    good = [s for s in self.manager.all_steps() if s != step]
    last = f"the last good checkpoint is step {max(good)}" if good else "no checkpoint was kept"
    return SaveError(
      f"Could not save the checkpoint of step {step} in {self.directory} "
      f"({type(error).__name__}: {error}); {last}. Free disk space or fix the "
      "permissions, then run the same command again to resume from it."
    )

  def close(self):
    self.manager.close()
