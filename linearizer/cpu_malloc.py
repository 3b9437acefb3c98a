"""On the CPU, keep XLA's per-step scratch memory mapped between steps (glibc only).

XLA:CPU allocates each step's temporary buffer (231 MB for the demo student's batch-64 train
step) with posix_memalign from a worker thread. glibc serves an allocation that large with a
fresh mmap and unmaps it on free, so every step the kernel faults in and zeroes every page
again: 56k page faults a step, a third of the CPU time spent in the kernel on 2 cores.
These glibc tunables (one arena, no mmap for large blocks, freed memory kept up to 1 GiB)
let the next step reuse the same pages: that train step goes from ~240 to ~155 ms, with
bit-identical results. glibc reads tunables only at start-up, so main.py re-executes itself
with them, once, before JAX is imported.

Not applied where JAX will use an accelerator (a PJRT plugin or libtpu is installed and
JAX_PLATFORMS does not say cpu), nor when GLIBC_TUNABLES is already set: set it (even to
nothing) to opt out.
"""
import importlib.metadata
import importlib.util
import os
import platform
import sys

TUNABLES = ("glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
            "glibc.malloc.trim_threshold=1073741824")


def runs_on_cpu(environ) -> bool:
  """Whether JAX will pick the CPU: JAX_PLATFORMS says so, or nothing else is installed."""
  platforms = environ.get("JAX_PLATFORMS", "")
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  plugins = importlib.metadata.entry_points(group="jax_plugins")
  return not plugins and importlib.util.find_spec("libtpu") is None


def environment(environ=None):
  """The environment to re-execute with, or None where there is nothing to do."""
  environ = os.environ if environ is None else environ
  if "GLIBC_TUNABLES" in environ or sys.platform != "linux":
    return None
  if platform.libc_ver()[0] != "glibc" or not runs_on_cpu(environ):
    return None
  return dict(environ, GLIBC_TUNABLES=TUNABLES)


def reexec():
  """Replaces this process with itself under the tunables (same pid, argv, interpreter
  options); returns only where nothing is to be done."""
  env = environment()
  if env is not None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)
