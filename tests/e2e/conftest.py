"""The main.py runs several end-to-end files build on, each run once per test session.

`shared_run` runs a process the first time a test asks for it and hands later askers its
workdir, also those in other pytest-xdist workers: the run happens in a folder beside the
workers' own temporary folders (tmp_path_factory's base folder, or the one above it under
xdist: the session's), under a lock on a file there; the first worker to take the lock runs
main.py, and a `.done` file written last tells the others it finished (pytest-xdist's
documented pattern, with the standard library's fcntl.flock for the `filelock` package: that
is no pin of ours, only a dependency of torch's and huggingface_hub's). The workdir is
shared: a test that would change it (run main.py on it, delete or damage a file) works on
a copy (shutil.copytree).
"""

import fcntl
import os
import shutil

import pytest

import helpers
from train_teacher_run import FLAGS


def shared_run(tmp_path_factory, name: str, *flags, config: str = helpers.SMOKE):
  """helpers.run_main(WORKDIR, *flags, config=config), once per session: (WORKDIR, stdout)."""
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):  # each worker's base folder is in the session's
    root = root.parent
  root = root / "shared-runs"
  root.mkdir(exist_ok=True)
  workdir, stdout, done = root / name, root / f"{name}.stdout", root / f"{name}.done"
  with open(root / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # (released when the file is closed)
    if not done.exists():
      shutil.rmtree(workdir, ignore_errors=True)  # what a failed attempt left behind
      stdout.write_text(helpers.run_main(workdir, *flags, config=config).stdout)
      done.touch()
  return workdir, stdout.read_text()


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
  """`main.py --config configs/demo.py:smoke`: every stage, 4 steps each."""
  return shared_run(tmp_path_factory, "demo")


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
  """The smoke config's train_teacher stage alone, 30 steps, a checkpoint every 3: the
  uninterrupted run every interrupted one must reproduce bitwise."""
  return shared_run(tmp_path_factory, "reference", *FLAGS)[0]
