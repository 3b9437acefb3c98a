"""What every part of the library may raise for bad input, and the one way it prints.

`UserError` marks a problem the user can fix (a config key, a path, a checkpoint that does
not fit, images of the wrong shape): every CLI (`main.py`, `python -m linearizer.convert`)
prints it as one `error: ...` line and exits 2, without a traceback. Anything else is a bug
and keeps its traceback. `kernels/` stays standalone and raises `ValueError`; the model
configs check what a user sets before a kernel ever sees it.
"""

import os
import sys
import threading
import traceback

import jax


class UserError(ValueError):
  """Bad input: one message naming what was wrong and what was expected."""


class MissingPathError(UserError, FileNotFoundError):
  """A path the user named does not exist (or is not what it must be)."""


class PathExistsError(UserError, FileExistsError):
  """A path the user named would be overwritten."""


class NonFiniteError(UserError, FloatingPointError):
  """A training run stopped at a non-finite loss or gradient (nan_policy)."""


def main_process() -> bool:
  """Whether this is process 0, the one that prints and writes shared files."""
  return jax.process_index() == 0


def log(*args, **kwargs) -> None:
  """`print` on process 0 only (multi-host runs print once), flushed at once."""
  if main_process():
    print(*args, **kwargs, flush=True)


def exit_with(error: BaseException, code: int = 2):
  """The CLIs' ending for a UserError: `error: <message>` on stderr, then exit `code`."""
  print(f"error: {error}", file=sys.stderr, flush=True)
  sys.exit(code)


def library_noise_to(path: str) -> None:
  """Tracebacks that third-party code leaves for errors it ignores (Orbax's asyncio loop
  closing under TensorStore's callbacks after a failed read: unraisable exceptions and
  exceptions in its threads) go to `path`, appended, not to the terminal; the first one
  prints one line saying where. The run's own messages are unaffected. If `path` cannot
  be written, they reach stderr as before."""
  told, hooks = [], (sys.unraisablehook, threading.excepthook)

  def write(text, fallback, *args):
    try:
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path, "a", encoding="utf-8") as f:
        f.write(text)
    except OSError:
      return fallback(*args)
    if not told:
      told.append(True)
      print(f"note: tracebacks of errors libraries ignored are in {path}", file=sys.stderr)

  def unraisable(u):
    head = f"{u.err_msg or 'Exception ignored in'}: {u.object!r}\n"
    body = "".join(traceback.format_exception(u.exc_type, u.exc_value, u.exc_traceback))
    write(head + body, hooks[0], u)

  def in_thread(args):
    name = args.thread.name if args.thread is not None else "?"
    body = "".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback))
    write(f"Exception in thread {name}:\n{body}", hooks[1], args)

  sys.unraisablehook, threading.excepthook = unraisable, in_thread
