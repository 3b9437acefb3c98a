"""What every part of the library may raise for bad input, and the one way it prints.

`UserError` marks a problem the user can fix (a config key, a path, a checkpoint that does
not fit, images of the wrong shape): every CLI (`main.py`, `python -m linearizer.convert`)
prints it as one `error: ...` line and exits 2, without a traceback. Anything else is a bug
and keeps its traceback. `kernels/` stays standalone and raises `ValueError`; the model
configs check what a user sets before a kernel ever sees it.
"""

import sys

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
