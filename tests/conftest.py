"""Suite-wide setup, before any test module imports JAX.

Most of the suite's time is XLA:CPU compiling tiny programs, not running them. These flags
compile about five times faster (little LLVM optimisation, no new fusion emitters); they
change how the code is optimised, not the program. The processes the tests start inherit
them through the environment (main.py runs, ablation workers, the notebook's kernel, the
multi-process runs). Flags the caller already set are kept. Only for the CPU: an
accelerator run (-m accelerator) compiles as users' runs do.

Many tests compile the same programs (the demo's steps, run through main.py by several
tests), so the whole session, its processes and pytest-xdist's workers share one persistent
compilation cache, every compile kept however short (a fresh temporary folder per session:
nothing carries over between runs). A cache hit is the program XLA compiled, so tests see
what they would without it.
"""

import atexit
import os
import shutil
import tempfile

from linearizer import cpu_malloc

FAST_COMPILE = {
  "--xla_backend_optimization_level": "0",
  "--xla_llvm_disable_expensive_passes": "true",
  "--xla_cpu_use_fusion_emitters": "false",
}

if cpu_malloc.runs_on_cpu(os.environ):
  _given = os.environ.get("XLA_FLAGS", "").split()
  _named = {f.split("=")[0] for f in _given}
  os.environ["XLA_FLAGS"] = " ".join(
    _given + [f"{k}={v}" for k, v in FAST_COMPILE.items() if k not in _named]
  )

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # set once, by the first process (xdist's)
  _cache = tempfile.mkdtemp(prefix="linearizer-tests-jax-cache-")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


def pytest_configure(config):
  """Test files go to pytest-xdist's workers (--dist loadfile) in the order pytest collects
  them, not re-sorted by how many tests each holds (xdist's default, which sent the longest
  file, tests/e2e/test_notebook.py with its one test, last: a worker idled while the other
  ran it). Collected in path order, tests/e2e/'s few long tests start early and the many
  short files fill in at the end."""
  if hasattr(config.option, "loadscopereorder"):  # (pytest-xdist is loaded)
    config.option.loadscopereorder = False
