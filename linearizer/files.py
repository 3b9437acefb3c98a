"""Files written whole or not at all: a stop, a full disk or a crash half-way keeps what was
there before, never a truncated file for the next run or the user to trip on. The results,
exports and records the library writes go through here (Orbax commits its own saves
atomically; metrics.jsonl is appended to, a line at a time).
"""

import contextlib
import json
import os
import pathlib
import secrets
from typing import Iterator, Optional, Union

from linearizer.errors import UserError

PathLike = Union[str, os.PathLike]


@contextlib.contextmanager
def replacing(path: PathLike) -> Iterator[pathlib.Path]:
  """Yields a temporary sibling of `path` to write; it is renamed onto `path` when the block
  ends and removed if the block raises.

  An OSError (disk full, no permission, a directory at `path`) becomes a UserError naming
  `path`. The sibling is not a mkstemp file: those are private (0600), whereas what we
  write gets the user's usual permissions.
  """
  path = pathlib.Path(path)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    yield tmp
    os.replace(tmp, path)
  except BaseException as e:
    tmp.unlink(missing_ok=True)
    if isinstance(e, OSError):
      raise UserError(f"Cannot write {path}: {e.strerror or e}.") from e
    raise


def write_bytes(path: PathLike, data: bytes) -> None:
  with replacing(path) as tmp:
    tmp.write_bytes(data)


def write_text(path: PathLike, text: str) -> None:
  with replacing(path) as tmp:
    tmp.write_text(text, encoding="utf-8")


def write_json(path: PathLike, value, *, indent: Optional[int] = 2, default=None) -> None:
  write_text(path, json.dumps(value, indent=indent, default=default))


def _case_blind(folder: str) -> bool:
  """Whether `folder`'s filesystem folds case (macOS's and Windows' defaults): the same
  folder is found under its name with the case of its letters swapped."""
  swapped = folder.swapcase()
  try:
    return swapped != folder and os.path.samefile(folder, swapped)
  except OSError:
    return False


def _identity(path: PathLike) -> str:
  """What names one file: the real path (links and `..` resolved), case-folded where its
  folder's filesystem folds case."""
  real = os.path.realpath(path)
  folder = os.path.dirname(real)
  while folder and not os.path.isdir(folder):  # a folder still to be made: its nearest parent
    folder = os.path.dirname(folder)
  return real.casefold() if folder and _case_blind(folder) else real


def check_outputs(outputs, inputs=(), replaced=()) -> None:
  """Refuses, before anything is written, outputs that would destroy an input or each other.

  Args:
    outputs: (path to write, what it is written for: an input path or a description) pairs.
    inputs: the files the command reads (and the folders it reads whole).
    replaced: folders the command replaces whole (their inputs would go with them).
  Raises:
    UserError naming the two paths: an output that is an input (through links, `..` or a
    case-folding filesystem too), two outputs that are one file, or an input inside a
    folder to be replaced.
  """
  read = {_identity(p): p for p in inputs}
  owners = {}
  for out, source in outputs:
    key = _identity(out)
    if key in read:
      raise UserError(
        f"{out} (written for {source}) is the input {read[key]}: nothing was written; "
        "choose an --output folder that holds none of the inputs."
      )
    if key in owners and owners[key] != source:
      raise UserError(
        f"{owners[key]} and {source} would both be written to {out}: rename one of them "
        "or write them to separate folders."
      )
    owners[key] = source
  for folder in replaced:
    top = _identity(folder)
    for key, path in read.items():
      if key == top or key.startswith(top.rstrip(os.sep) + os.sep):
        raise UserError(
          f"{folder} would be replaced whole, and the input {path} is in it: nothing was "
          "written; choose another output folder."
        )
