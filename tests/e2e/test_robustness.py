"""main.py as a process under faults: signals, kill -9, corrupted checkpoints, NaNs, a
failing or read-only disk, a second run on a live workdir, noisy libraries, an unreadable
image. Each run ends with nothing lost: the same weights as an uninterrupted run (the shared
`reference`, conftest.py), or a clear one-line error and the workdir's checkpoints
untouched. (Bad input and refused settings: test_bad_input.py.)

Runs the train_teacher stage of train_teacher_run.py: the smoke config, 30 steps, a
checkpoint every 3, so that there is time to interrupt it.
"""

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import ROOT, assert_clean_error, env
from linearizer import log as log_module
from train_teacher_run import STEPS, assert_same_run, command, run_main


def start_and_interrupt(workdir, at_step, sig, delay=0.0):
  """Starts main.py, sends `sig` once step `at_step` is logged (after `delay` s); its output."""
  proc = subprocess.Popen(
    command(workdir), cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if line.startswith(f"[train_teacher] step {at_step}/"):
      time.sleep(delay)
      proc.send_signal(sig)
      break
  out, err = proc.communicate(timeout=300)
  return proc.returncode, "".join(lines) + out, err


def steps_saved(workdir):
  return sorted(int(d) for d in os.listdir(workdir / "train_teacher" / "ckpt") if d.isdigit())


@pytest.mark.parametrize(
  "sig",
  [
    signal.SIGTERM,  # SIGINT takes the same path: slow only
    pytest.param(signal.SIGINT, marks=pytest.mark.slow),
  ],
)
def test_signal_saves_the_current_step_and_resume_finishes_identically(reference, tmp_path, sig):
  code, out, _ = start_and_interrupt(tmp_path, 4, sig)
  assert code == 128 + sig, out
  stopped = int(out.split("Stopped [train_teacher] at step ")[1].split(",")[0])
  assert 4 <= stopped < STEPS and steps_saved(tmp_path)[-1] == stopped
  out = run_main(tmp_path).stdout
  assert f"resumed from the checkpoint of step {stopped}" in out
  assert_same_run(tmp_path, reference)


def kill_and_resume(reference, workdir, at_step, delay):
  code, _, _ = start_and_interrupt(workdir, at_step, signal.SIGKILL, delay)
  assert code == -signal.SIGKILL
  ckpt = workdir / "train_teacher" / "ckpt"
  last = max(steps_saved(workdir), default=0) if os.path.isdir(ckpt) else 0
  out = run_main(workdir).stdout
  if last:  # the newest complete checkpoint; an incomplete one is never picked up
    assert f"resumed from the checkpoint of step {last}" in out
  assert_same_run(workdir, reference)


def test_kill_9_resumes_from_the_last_complete_checkpoint(reference, tmp_path):
  kill_and_resume(reference, tmp_path, at_step=6, delay=0.0)  # step 6 is being saved


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(4))
def test_kill_9_at_random_moments(reference, tmp_path, trial):
  rng = random.Random(trial)
  kill_and_resume(
    reference, tmp_path, at_step=rng.randrange(1, STEPS - 2), delay=rng.uniform(0, 0.3)
  )


def test_corrupted_latest_checkpoint_falls_back_to_the_previous_one(reference, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(reference, workdir)
  shutil.rmtree(workdir / "train_teacher" / "model")  # the stage never finished ...
  ckpt = workdir / "train_teacher" / "ckpt"
  assert steps_saved(workdir) == [STEPS - 3, STEPS]
  for root, _, files in os.walk(ckpt / str(STEPS) / "state"):  # ... and its last save is damaged
    for name in files:
      with open(os.path.join(root, name), "r+b") as f:
        f.write(b"\x00garbage" * 8)
  proc = run_main(workdir)
  assert f"Checkpoint at step {STEPS} could not be restored" in proc.stderr
  assert f"resumed from the checkpoint of step {STEPS - 3}" in proc.stdout
  assert any(d.startswith(f"{STEPS}.unreadable-") for d in os.listdir(ckpt))  # kept aside
  assert_same_run(workdir, reference)
  # Orbax's own tracebacks of the failed read (its asyncio loop) are not the user's: a few
  # lines reach the terminal, the rest goes to DIR/logs/libraries.log (before: 700+ lines).
  assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) <= 5, proc.stderr


def test_nan_loss_stops_with_the_step_and_terms_named(tmp_path):
  proc = run_main(tmp_path, "--config.train_teacher.optim.lr=1e30", code=2)
  assert_clean_error(
    proc, "non-finite loss or gradient at step", "loss=", "grad_norm=", "nan_policy"
  )
  step = int(proc.stderr.split("at step ")[1].split(":")[0])
  assert all(s < step for s in steps_saved(tmp_path))  # only good states were saved
  assert not os.path.exists(tmp_path / "train_teacher" / "model")


def test_skip_policy_leaves_the_state_as_it_was():
  """guard_step(skip=True): a non-finite step keeps params, optimizer and EMA; step advances."""
  import jax.numpy as jnp

  from linearizer import train

  def bad_step(state, batch, rng):
    del rng
    new = state.replace(
      step=state.step + 1,
      params={"w": state.params["w"] + batch},
      opt_state=(state.opt_state[0] + 1,),
    )
    return new, {"loss": jnp.sum(new.params["w"]), "grad_norm": jnp.float32(1.0)}

  state = train.TrainState(
    step=jnp.int32(0), params={"w": jnp.ones(3)}, opt_state=(jnp.int32(0),), ema=None, rest=None
  )
  step = train.guard_step(bad_step, skip=True)
  good, m = step(state, jnp.ones(3), None)
  assert bool(m["finite"]) and float(good.params["w"][0]) == 2 and int(good.opt_state[0]) == 1
  kept, m = step(good, jnp.array([jnp.nan, 0.0, 0.0]), None)
  assert not bool(m["finite"]) and int(kept.step) == 2
  np.testing.assert_array_equal(kept.params["w"], good.params["w"])
  assert int(kept.opt_state[0]) == 1


def test_skip_policy_gives_up_after_many_faulty_steps(tmp_path):
  proc = run_main(
    tmp_path, "--config.train_teacher.optim.lr=1e30", "--config.nan_policy=skip", code=2
  )
  assert "update skipped" in proc.stdout
  assert_clean_error(proc, "steps in a row were skipped", "skipping did not get past them")
  assert "set --config.nan_policy=skip" not in proc.stderr  # it is set already


FAILING_SAVE = """
import errno, runpy, sys
import orbax.checkpoint as ocp
save = ocp.CheckpointManager.save
def failing(self, step, *args, **kwargs):
  if step == 6:
    raise OSError(errno.ENOSPC, "No space left on device")
  return save(self, step, *args, **kwargs)
ocp.CheckpointManager.save = failing
sys.argv = sys.argv[1:]
runpy.run_path("main.py", run_name="__main__")
"""


def test_failed_save_stops_cleanly_and_keeps_the_last_good_checkpoint(reference, tmp_path):
  proc = run_main(tmp_path, code=2, python=("-c", FAILING_SAVE, "main.py"))
  assert_clean_error(
    proc,
    "Could not save the checkpoint of step 6",
    "No space left",
    "the last good checkpoint is step 3",
  )
  assert steps_saved(tmp_path) == [3]
  out = run_main(tmp_path).stdout
  assert "resumed from the checkpoint of step 3" in out
  assert_same_run(tmp_path, reference)


def mount(*args):
  """`mount ARGS`, or the test skips where this process may not mount (not root, or a
  container without the capability)."""
  proc = subprocess.run(["mount", *map(str, args)], capture_output=True, text=True)
  if proc.returncode:
    pytest.skip(f"cannot mount here: {proc.stderr.strip()}")


@contextlib.contextmanager
def read_only(path):
  """`path` read-only to main.py: chmod for a normal user; for root, whom permissions do
  not stop, a read-only bind mount of it over itself."""
  if os.geteuid() != 0:
    path.chmod(0o555)
    try:
      yield
    finally:
      path.chmod(0o755)
    return
  mount("--bind", path, path)
  try:
    mount("-o", "remount,ro,bind", path, path)
    yield
  finally:
    subprocess.run(["umount", str(path)], check=True)


def test_a_read_only_stage_directory(reference, tmp_path):
  """A stage whose last checkpoint is there but whose model/ is not, in a directory that
  cannot be written: one message naming the path; once writable, the same command ends
  the stage as the uninterrupted run did (before: a PermissionError traceback)."""
  run = tmp_path / "run"
  shutil.copytree(reference, run)
  shutil.rmtree(run / "train_teacher" / "model")
  before = sorted(os.listdir(run / "train_teacher" / "ckpt"))
  with read_only(run / "train_teacher"):
    proc = run_main(run, code=2)
  assert_clean_error(proc, f"could not write {run / 'train_teacher'}", "Make it writable")
  assert sorted(os.listdir(run / "train_teacher" / "ckpt")) == before
  run_main(run)
  assert_same_run(run, reference)


@pytest.mark.slow
def test_a_disk_that_fills_up(reference, tmp_path):
  """A real full disk (a small tmpfs): the message names the step whose save failed and
  the last good one, and is the only line besides the note on where the library logs
  went (before: line 1026 of 1085, among 124 tracebacks); with space freed, the same
  command resumes and ends as the uninterrupted run did."""
  disk = tmp_path / "disk"
  disk.mkdir()
  mount("-t", "tmpfs", "-o", "size=1100k", "tmpfs", disk)
  try:
    proc = run_main(disk / "run", code=2)
    assert_clean_error(proc, "No space left on device", "Could not save the checkpoint of step")
    last = steps_saved(disk / "run")[-1]
    assert f"step {last + 3} in" in proc.stderr, proc.stderr
    assert f"the last good checkpoint is step {last}." in proc.stderr, proc.stderr
    mount("-o", "remount,size=64m", disk)
    assert f"resumed from the checkpoint of step {last}" in run_main(disk / "run").stdout
    assert_same_run(disk / "run", reference)
  finally:
    subprocess.run(["umount", str(disk)], check=True)


def test_a_second_run_on_a_live_workdir_is_refused_and_a_stale_lock_taken_over(tmp_path):
  """One run per workdir: while one trains, a second (with --restart too) is refused with
  the holder named and nothing moved; the lock goes with the run (SIGTERM included); a lock
  left by a dead process is taken over."""
  long = "--config.train_teacher.steps=100000"
  first = subprocess.Popen(
    command(tmp_path, long),
    cwd=ROOT,
    env=env(),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  for line in first.stdout:
    if line.startswith("[train_teacher] step 3/"):
      break
  for flags in ((long,), (long, "--restart")):
    proc = run_main(tmp_path, *flags, code=2)
    assert_clean_error(proc, "in use by another run", f"pid {first.pid}")
  assert not list(tmp_path.parent.glob(f"{tmp_path.name}.old-*"))  # --restart moved nothing
  first.send_signal(signal.SIGTERM)
  first.communicate(timeout=300)
  assert first.returncode == 143 and not (tmp_path / ".lock").exists()
  gone = subprocess.Popen(["true"])
  gone.wait()
  stale = tmp_path / "stale"
  stale.mkdir()
  lock = dict(host=socket.gethostname(), pid=gone.pid, started="earlier")
  (stale / ".lock").write_text(json.dumps(lock))
  out = run_main(stale).stdout
  assert f"locked by pid {gone.pid}, which is gone: taking over" in out
  assert not (stale / ".lock").exists()


def test_library_noise_goes_to_a_log_file(tmp_path):
  """An exception a library ignores (unraisable, or in one of its threads) is written to
  the file; the terminal gets one line saying where."""
  code = (
    "import threading\n"
    "from linearizer.log import library_noise_to\n"
    f"library_noise_to({str(tmp_path / 'logs' / 'libraries.log')!r})\n"
    "class Bad:\n"
    "  def __del__(self):\n"
    "    raise RuntimeError('Event loop is closed')\n"
    "Bad()\n"
    "t = threading.Thread(target=lambda: 1 / 0)\n"
    "t.start(); t.join()\n"
    "from absl import logging\n"
    "logging.warning('Waiting for previous save to complete')\n"  # Orbax, via absl
    "from linearizer.log import warn\n"
    "warn('ours, still on the terminal')\n"
  )
  proc = subprocess.run(
    [sys.executable, "-c", code], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120
  )
  assert proc.returncode == 0, proc.stderr
  assert proc.stderr.strip().splitlines() == [
    f"note: messages and tracebacks of libraries are in {tmp_path / 'logs' / 'libraries.log'}",
    "warning: ours, still on the terminal",
  ]
  log = (tmp_path / "logs" / "libraries.log").read_text()
  assert "Event loop is closed" in log and "ZeroDivisionError" in log
  assert "Waiting for previous save" in log and "ours" not in log


def test_library_noise_when_its_log_file_cannot_be_written(tmp_path, capsys):
  """The disk that filled up holds the log file too: the noise goes to the temporary
  directory instead (one note saying so), never to the terminal."""
  (tmp_path / "logs").write_text("a file where the log directory would be")
  sink = log_module._LogFile(str(tmp_path / "logs" / "libraries.log"))
  sink.paths[1] = str(tmp_path / "elsewhere.log")
  sink.write("first\n")
  sink.write("second\n")
  assert (tmp_path / "elsewhere.log").read_text() == "first\nsecond\n"
  note = capsys.readouterr().err.splitlines()
  assert len(note) == 1 and note[0].startswith(f"note: could not write {tmp_path / 'logs'}")
  assert note[0].endswith(f"messages and tracebacks of libraries are in {tmp_path}/elsewhere.log")


def test_an_unreadable_image_is_named_once_and_counted(tmp_path):
  """A folder with one corrupt file: named once however often it is read, and counted in
  the run's summary (before: a warning on every read, 666 lines for a 4-step run)."""
  from PIL import Image

  rng = np.random.default_rng(0)
  for k in range(12):
    (tmp_path / "data" / f"c{k % 2}").mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
      tmp_path / "data" / f"c{k % 2}" / f"{k}.png"
    )
  (tmp_path / "data" / "c0" / "bad.png").write_bytes(b"garbage")
  proc = run_main(
    tmp_path / "run",
    f"--config.data.source=folder:{tmp_path / 'data'}",
    "--config.train_teacher.steps=6",
  )
  assert proc.stderr.count("Skipping unreadable image") == 1, proc.stderr[-2000:]
  assert "1 image file(s) skipped" in proc.stdout
