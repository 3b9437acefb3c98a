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
