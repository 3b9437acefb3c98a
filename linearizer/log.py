"""What the library prints: `log` (process 0's progress lines), `warn` (our warnings, as
`warning: ...` on stderr) and `library_noise_to` (third-party logging and ignored tracebacks
sent to a file, not the terminal). Errors and how the CLIs end on them: `linearizer.errors`.
"""

import logging
import os
import sys
import tempfile
import threading
import traceback

import jax


def main_process() -> bool:
  """Whether this is process 0, the one that prints and writes shared files."""
  return jax.process_index() == 0


def log(*args, **kwargs) -> None:
  """`print` on process 0 only (multi-host runs print once), flushed at once."""
  if main_process():
    print(*args, **kwargs, flush=True)


# The project's own warnings (a checkpoint moved aside, an unreadable image): the CLIs print
# them as `warning: ...` lines, whatever they do with the libraries' logging.
OURS = logging.getLogger("linearizer")


def warn(message: str, *args) -> None:
  """One warning of ours (`logging` style %-arguments), on every process that meets it."""
  OURS.warning(message, *args)


class _LogFile:
  """Appends to `path`, made at the first write (a run that logs nothing leaves no file),
  and says once on stderr where it is. If `path` cannot be written (the disk that filled
  up), a file in the system's temporary directory; failing that, the text is dropped."""

  def __init__(self, path):
    fallback = os.path.join(tempfile.gettempdir(), f"linearizer-{os.getpid()}-libraries.log")
    self.paths, self.told, self.why = [path, fallback], None, ""

  def write(self, text):
    for path in self.paths:
      try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
          f.write(text)
      except OSError as e:
        self.why = self.why or f"could not write {path} ({e.strerror}); "
        continue
      if self.told != path:
        self.told = path
        print(
          f"note: {self.why}messages and tracebacks of libraries are in {path}", file=sys.stderr
        )
      return

  def flush(self):
    pass


def library_noise_to(path: str) -> None:
  """Third-party noise goes to `path`, not to the terminal: the libraries' log records (absl
  and Python logging: Orbax's warnings and its errors with their tracebacks) and the
  tracebacks they leave for errors they ignore (Orbax's asyncio loop closing under
  TensorStore's callbacks after a failed read: unraisable exceptions and exceptions in its
  threads). The first one prints one line saying where. Our own warnings (`warn`) still
  print on stderr, as `warning: ...`; errors we raise are unaffected."""
  sink = _LogFile(path)
  root = logging.getLogger()
  for handler in list(root.handlers):
    root.removeHandler(handler)
  to_file = logging.StreamHandler(sink)
  to_file.setFormatter(
    logging.Formatter("%(levelname).1s %(asctime)s %(name)s %(filename)s:%(lineno)d] %(message)s")
  )
  root.addHandler(to_file)
  to_user = logging.StreamHandler(sys.stderr)
  to_user.setFormatter(_Lowercase("%(levelname)s: %(message)s"))
  OURS.handlers, OURS.propagate = [to_user], False

  def unraisable(u):
    head = f"{u.err_msg or 'Exception ignored in'}: {u.object!r}\n"
    sink.write(head + "".join(traceback.format_exception(u.exc_type, u.exc_value, u.exc_traceback)))

  def in_thread(args):
    name = args.thread.name if args.thread is not None else "?"
    body = "".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback))
    sink.write(f"Exception in thread {name}:\n{body}")

  sys.unraisablehook, threading.excepthook = unraisable, in_thread


class _Lowercase(logging.Formatter):
  def format(self, record):
    return super().format(record).replace(record.levelname, record.levelname.lower(), 1)
