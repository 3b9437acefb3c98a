"""How the benchmark times: compile apart (its seconds, XLA's FLOPs and memory), then the
median of timed calls (`metrics.time_compiled`); the device's matmul rate; the timing row
every timed measurement writes.

Every timing: compile first (its time reported apart), one warm-up call, then the median of
`repeats` calls, each ended by `jax.block_until_ready`.
"""

import time

import jax
import jax.numpy as jnp

from linearizer.bench import results
from linearizer.metrics import time_compiled


def compile_fn(jitted, args):
  """(compiled, seconds to lower and compile, FLOPs, compiled memory in bytes)."""
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  seconds = time.perf_counter() - start
  mem = compiled.memory_analysis()
  nbytes = None
  if mem is not None:  # what this program holds at once: arguments, outputs, scratch
    nbytes = int(
      mem.argument_size_in_bytes
      + mem.output_size_in_bytes
      + mem.temp_size_in_bytes
      - mem.alias_size_in_bytes
    )
  return compiled, seconds, results.flops_from_cost(compiled.cost_analysis()), nbytes


def device_peak_bytes():
  """The device's peak bytes in use so far (process-wide, never reset); None on CPU."""
  stats = jax.devices()[0].memory_stats()
  return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def is_oom(err):
  """Whether `err` is the device running out of memory."""
  text = str(err)
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def timed(jitted, args, repeats, carry=None) -> dict:
  """Compiles, then times (`metrics.time_compiled`): the timing fields of `timed_row`."""
  compiled, compile_s, flops, nbytes = compile_fn(jitted, args)
  seconds = time_compiled(compiled, args, repeats, carry=carry)
  return dict(seconds=seconds, compile_s=compile_s, flops=flops, nbytes=nbytes)


# The steps donate their state: every call gets the state the previous one returned.
CARRY_STATE = lambda args, out: (out[0],) + tuple(args[1:])


def timed_row(meta, peak, *, batch, seconds, compile_s, flops, nbytes, **fields):
  """A timing row: `fields`, then latency, img/s, FLOPs per image, MFU and memory."""
  per_image = flops / batch if flops else None
  return dict(
    meta,
    **fields,
    batch=batch,
    compile_s=compile_s,
    latency_ms=1e3 * seconds,
    img_per_s=batch / seconds,
    flops_per_image=per_image,
    mfu=results.mfu(per_image, batch / seconds, peak),
    compiled_bytes=nbytes,
    peak_bytes=device_peak_bytes(),
  )


def measure_matmul(n: int, dtype: str, calls: int, meta: dict) -> dict:
  """The device's matmul rate: an (n, n) @ (n, n) product in `dtype`, 2n³ FLOPs a call.
  A ceiling, so the fastest of `calls` calls after three warm-ups (a CPU's first calls
  run at half speed while its clock rises)."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(dtype))
  compiled, compile_s, _, _ = compile_fn(jax.jit(jnp.matmul), (a, a))
  for _ in range(3):
    jax.block_until_ready(compiled(a, a))
  times = []
  for _ in range(calls):
    start = time.perf_counter()
    jax.block_until_ready(compiled(a, a))
    times.append(time.perf_counter() - start)
  seconds = min(times)
  return dict(meta, kind="matmul", n=n, ms=1e3 * seconds, flop_per_s=2 * n**3 / seconds)
