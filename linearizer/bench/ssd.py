"""The SSD kernel rows (part `ssd`): forward and forward+backward of every `kernels.ssd`
impl at the student's scan shapes, with the FLOPs and bytes the chunked algorithm must do
and the fraction of the device's roofline; a Pallas impl for another platform is skipped.
"""

import jax
import jax.numpy as jnp

import kernels
from linearizer.bench import results
from linearizer.bench.settings import Settings
from linearizer.bench.timing import compile_fn
from linearizer.log import log
from linearizer.metrics import time_compiled


def ssd_inputs(batch, length, heads, headdim, d_state, dtype):
  """Random (x, dt, A, B, C, D) of one group, as kernels.ssd takes them."""
  keys = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(keys[0], (batch, length, heads, headdim), dtype)
  dt = jax.nn.softplus(jax.random.normal(keys[1], (batch, length, heads))) * 0.1
  A = -jnp.linspace(1.0, 16.0, heads)
  B = jax.random.normal(keys[2], (batch, length, 1, d_state), dtype)
  C = jax.random.normal(keys[3], (batch, length, 1, d_state), dtype)
  return x, dt, A, B, C, jnp.ones((heads,))


def ssd_row(impl, mode, args, shape, s: Settings, meta, peak, bandwidth):
  """One SSD timing; a Pallas impl raises ValueError (at trace time) for shapes it refuses."""
  chunk = s.chunk_at(shape[1])
  run_chunk = kernels.chunk_run(impl, chunk, shape[1])  # pallas_gpu caps its own
  fwd = lambda *a: kernels.ssd(*a, chunk_size=chunk, impl=impl)
  # Forward+backward: the gradient of a scalar of y with respect to every input.
  fn = (
    fwd
    if mode == "fwd"
    else jax.grad(lambda *a: jnp.sum(fwd(*a).astype(jnp.float32)), argnums=tuple(range(len(args))))
  )
  compiled, compile_s, xla_flops, _ = compile_fn(jax.jit(fn), args)
  seconds = time_compiled(compiled, args, s.repeats)
  backward = mode == "fwd+bwd"
  # The FLOPs of the chunk the impl runs, so rooflines compare.
  flops = results.ssd_flops(*shape, run_chunk) * (3 if backward else 1)
  nbytes = results.ssd_bytes(*shape, args[0].dtype.itemsize, backward=backward)
  return dict(
    meta,
    chunk_size=run_chunk,
    compile_s=compile_s,
    ms=1e3 * seconds,
    flops=flops,
    xla_flops=xla_flops,
    bytes=nbytes,
    tflop_per_s=flops / seconds / 1e12,
    gb_per_s=nbytes / seconds / 1e9,
    roofline_pct=results.roofline_fraction(flops, nbytes, seconds, peak, bandwidth),
  )


def measure_ssd(config, s: Settings, meta, peak, bandwidth):
  """Forward and forward+backward of every kernels.ssd impl at each sequence length."""
  c = config.bench.ssd
  rows = []
  for impl in kernels.IMPLS:
    if impl.startswith("pallas_") and impl != f"pallas_{kernels.platform_name()}":
      rows.append(dict(meta, kind="ssd", impl=impl, skipped=f"needs a {impl[7:].upper()}"))
      continue
    try:
      for length in s.ssd_lengths:
        shape = (s.ssd_batch, length, c.heads, c.headdim, c.d_state)
        args = ssd_inputs(*shape, jnp.dtype(s.dtype))
        for mode in ("fwd", "fwd+bwd"):
          row = dict(
            meta,
            kind="ssd",
            impl=impl,
            mode=mode,
            batch=shape[0],
            length=length,
            heads=c.heads,
            headdim=c.headdim,
            d_state=c.d_state,
          )
          rows.append(ssd_row(impl, mode, args, shape, s, row, peak, bandwidth))
          log(f"[bench] ssd {impl:<9} {mode:<7} L={length:<6} {rows[-1]['ms']:9.2f} ms")
    except ValueError as err:  # a Pallas kernel refusing these shapes, at trace time
      rows.append(dict(meta, kind="ssd", impl=impl, skipped=str(err)))
      log(f"[bench] ssd {impl}: skipped ({err})")
  return rows
