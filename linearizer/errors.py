"""What every part of the library may raise for bad input, and the one way it prints.

`UserError` marks a problem the user can fix (a config key, a path, a checkpoint that does
not fit, images of the wrong shape): every CLI (`main.py`, `python -m linearizer.convert`)
prints it as one `error: ...` line and exits 2, without a traceback. Anything else is a bug
and keeps its traceback. `kernels/` stays standalone and raises `ValueError`; the model
configs check what a user sets before a kernel ever sees it.
"""

import contextlib
import errno
import sys


class UserError(ValueError):
  """Bad input: one message naming what was wrong and what was expected."""


class MissingPathError(UserError, FileNotFoundError):
  """A path the user named does not exist (or is not what it must be)."""


class PathExistsError(UserError, FileExistsError):
  """A path the user named would be overwritten."""


class NonFiniteError(UserError, FloatingPointError):
  """A training run stopped at a non-finite loss or gradient (nan_policy)."""


def cause(error: BaseException) -> str:
  """A library's error as one line, its cause alone: the first line that says what was
  wrong, without the library's advice where ours differs (torch's weights_only errors run
  to ten lines and suggest unpickling the file's code, which we never do)."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  for i, line in enumerate(lines):
    if "WeightsUnpickler error:" in line:  # torch.load(weights_only=True)
      found = line.partition("WeightsUnpickler error:")[2].strip()
      found = found or (lines[i + 1] if i + 1 < len(lines) else "")
      return found.split(" was not an allowed global")[0].split(". Please use")[0]
  return lines[0] if lines else type(error).__name__


def exit_with(error: BaseException, code: int = 2):
  """The CLIs' ending for a UserError: `error: <message>` on stderr, then exit `code`."""
  print(f"error: {error}", file=sys.stderr, flush=True)
  sys.exit(code)


@contextlib.contextmanager
def one_line_errors():
  """The CLIs' body runs under it: a UserError, or a write the file system refused, ends
  the process with `error: <message>` and exit 2; anything else keeps its traceback."""
  try:
    yield
  except UserError as e:
    exit_with(e)
  except OSError as e:
    if unwritable(e) is None:
      raise
    exit_with(unwritable(e))


def unwritable(error: OSError) -> UserError | None:
  """A write the file system refused (read-only, permissions, disk full) as one message, or
  None for any other OSError. The CLIs end with it: what was saved before is untouched."""
  if error.errno not in _UNWRITABLE or not error.filename:
    return None
  return UserError(
    f"could not write {error.filename} ({error.strerror}). Make it writable or free space, "
    "then run the same command again: what was saved before is kept."
  )


_UNWRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}
