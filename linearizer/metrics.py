"""What a run reports: `metrics.jsonl`, TensorBoard events and a progress line on stdout;
and how a compiled function is timed (evaluation's img/s and the benchmark share it)."""

import json
import os
import statistics
import time

import jax
import numpy as np

from linearizer.log import log, main_process, warn


def _scalars(metrics: dict) -> dict:
  return {k: float(np.asarray(v)) for k, v in metrics.items()}


class MetricWriter:
  """Writes one JSON object per logged step, TensorBoard scalars, and prints progress.

  Only process 0 writes; the others stay silent so a pod prints one log.
  """

  def __init__(self, directory: str, *, stage: str, total_steps: int, batch_size: int):
    self.stage, self.total, self.batch_size = stage, total_steps, batch_size
    self.active = main_process()
    self.jsonl, self.tb = None, None
    if self.active:
      os.makedirs(directory, exist_ok=True)
      self.jsonl = open(os.path.join(directory, "metrics.jsonl"), "a", encoding="utf-8")
      try:  # TensorBoard event files without TensorFlow
        from tensorboardX import SummaryWriter  # optional: no TensorBoard events without it

        self.tb = SummaryWriter(os.path.join(directory, "tb"))
      except ImportError:
        warn("tensorboardX is not installed: no TensorBoard events.")
    self.last_time, self.last_step, self.start = None, None, time.time()
    self.excluded = 0.0  # seconds since the last write spent outside training (hooks)

  def write(self, step: int, metrics: dict) -> dict:
    """Logs `metrics` at `step` (every key a scalar); returns them as floats with img/s."""
    values = _scalars(metrics)
    now = time.time()
    if self.last_time is not None and step > self.last_step:
      seconds = now - self.last_time - self.excluded
      values["img_per_s"] = (step - self.last_step) * self.batch_size / seconds
    self.last_time, self.last_step, self.excluded = now, step, 0.0
    self._append(step, values)
    if self.active:
      log(self.progress_line(step, values))
    return values

  def record(self, step: int, metrics: dict) -> None:
    """Logs `metrics` at `step` to metrics.jsonl and TensorBoard only (no progress line,
    no img/s): measurements taken beside training, such as the scorecard."""
    self._append(step, _scalars(metrics))

  def exclude(self, seconds: float) -> None:
    """Leaves `seconds` (spent outside training) out of the next img/s."""
    self.excluded += seconds

  def _append(self, step: int, values: dict) -> None:
    if self.active:
      self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
      self.jsonl.flush()
      if self.tb is not None:
        for k, v in values.items():
          self.tb.add_scalar(f"{self.stage}/{k}", v, step)

  def progress_line(self, step: int, values: dict) -> str:
    terms = " ".join(
      f"{k}={v:.4g}" for k, v in values.items() if k not in ("img_per_s", "lr", "step")
    )
    speed = values.get("img_per_s")
    eta = ""
    if speed:
      secs = (self.total - step) * self.batch_size / speed
      eta = f" | {speed:.1f} img/s | ETA {int(secs // 60)}m{int(secs % 60):02d}s"
    return f"[{self.stage}] step {step}/{self.total} | {terms}{eta}"

  def close(self):
    if self.jsonl:
      self.jsonl.close()
    if self.tb:
      self.tb.close()


def time_compiled(compiled, args, repeats: int, carry=None) -> float:
  """Median seconds of `compiled(*args)` after one warm-up call, each call ended by
  `jax.block_until_ready`.

  carry(args, out) -> next args, for steps that donate their state.
  """
  out = jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(repeats):
    if carry is not None:
      args = carry(args, out)
    start = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)
