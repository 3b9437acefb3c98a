"""The int32 guard of the Pallas kernels: every array a kernel indexes must have fewer
elements than int32 can count.

Pallas lowers block offsets and in-kernel indices to int32 (Triton's pointer arithmetic,
Mosaic's index maps), so an array past 2³¹ - 1 elements would be read or written at wrapped
offsets: silently wrong output, not an error (state-spaces/mamba#1015 is this bug in
mamba-ssm's Triton kernels, at large batch × length). The kernels refuse such shapes, and
`kernels.ssd(impl="auto")` falls back to the XLA impl, whose indexing is 64-bit.
"""

import math

INT32_MAX = 2**31 - 1


def int32_overflow_reason(kernel: str, arrays: dict) -> str | None:
  """None if every array of `arrays` (name -> shape, as the kernel holds it: padded,
  transposed) has at most INT32_MAX elements, else a one-line reason naming the first. A
  symbolic size (jax.export) counts as too large unless its dimensions' constraints bound
  it (e.g. `symbolic_shape("batch", constraints=("batch <= 1024",))`)."""
  for name, shape in arrays.items():
    size = math.prod(shape)
    try:
      too_large = bool(size > INT32_MAX)
    except Exception:  # jax.export's InconclusiveDimensionOperation: no bound is known
      return f"{kernel}: {name} {tuple(shape)} has a symbolic size with no bound under 2³¹"
    if too_large:
      return (
        f"{kernel}: {name} {tuple(shape)} has {size:,} elements, past the {INT32_MAX:,} "
        "that the kernel's int32 offsets address (use impl='xla', or a smaller batch)"
      )
  return None
