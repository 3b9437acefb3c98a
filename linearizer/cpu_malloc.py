"""On the CPU, keep XLA's per-step scratch memory mapped between steps (glibc only).

XLA:CPU allocates each step's temporary buffer (231 MB for the demo student's batch-64 train
step) with posix_memalign from a worker thread. glibc serves an allocation that large with a
fresh mmap and unmaps it on free, so every step the kernel faults in and zeroes every page
again: 56k page faults a step, a third of the CPU time spent in the kernel on 2 cores.
The tunables below let the next step reuse the same pages: that train step goes from about
245 to 156 ms, with bit-identical results, for a peak RSS of 906 MB instead of 739
(docs/benchmarks.md). All three are needed: one arena (the main one, which grows with
brk), as a worker thread's own arena maps any block larger than its 64 MB heaps; no mmap
for large blocks; and freed memory kept (up to 1 GiB) instead of trimmed. glibc reads
tunables only at start-up, so main.py re-executes itself with them, once, before JAX is
imported.

Applied only where JAX will run on the CPU (JAX_PLATFORMS names cpu first, or no
accelerator plugin and no libtpu is installed), when main.py was started as a script, and
when GLIBC_TUNABLES is unset: set it (even to nothing) to opt out.
"""

import importlib.metadata
import importlib.util
import os
import platform
import sys

TUNABLES = "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1073741824"


def runs_on_cpu(environ) -> bool:
  """Whether JAX will pick the CPU: JAX_PLATFORMS says so, or nothing else is installed
  (JAX finds PJRT plugins by entry point and in the `jax_plugins` namespace package)."""
  platforms = environ.get("JAX_PLATFORMS", "")
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  return (
    not importlib.metadata.entry_points(group="jax_plugins")
    and importlib.util.find_spec("jax_plugins") is None
    and importlib.util.find_spec("libtpu") is None
  )


def environment(environ=None):
  """The environment to re-execute with, or None where there is nothing to do."""
  environ = os.environ if environ is None else environ
  if "GLIBC_TUNABLES" in environ or sys.platform != "linux":
    return None
  if platform.libc_ver()[0] != "glibc" or not runs_on_cpu(environ):
    return None
  return dict(environ, GLIBC_TUNABLES=TUNABLES)


def started_as_script() -> bool:
  """Whether re-running the command line runs this script again: not under IPython's
  %run or a debugger (the command line is theirs), nor from stdin (read once)."""
  argv, orig = sys.argv, sys.orig_argv
  return (
    os.path.isfile(argv[0])
    and orig[len(orig) - len(argv) :] == argv
    and "IPython" not in sys.modules
  )


def reexec():
  """Replaces this process with itself under the tunables (same pid, argv, interpreter
  options); returns only where nothing is to be done."""
  env = environment()
  if env is not None and started_as_script():
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)
