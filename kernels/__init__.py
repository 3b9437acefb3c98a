"""The SSD (Mamba-2 selective scan) op, method.md §6 step 4.

`ssd` is the only entry the models use; `impl` picks the implementation:
  reference   sequential lax.scan over tokens, float32 (the test oracle)
  xla         chunked matmul ("SSD") form in plain XLA ops, hand-written backward
  pallas_tpu  Pallas TPU (Mosaic) kernel, forward and backward (kernels/pallas_tpu.py)
  pallas_gpu  Pallas GPU (Triton) kernel, forward and backward (kernels/pallas_gpu.py)
  auto        the Pallas kernel of the target platform (TPU, GPU) when it supports the
              shapes, else xla
The target platform is that of the mesh in context (`jax.sharding.use_abstract_mesh`, or
`jax.set_mesh`), else JAX's default backend: a program compiled on a CPU host for a TPU
mesh holds the TPU's kernel and chunk. Under a mesh of several devices a Pallas impl runs
in a `shard_map` over the batch (XLA cannot partition a Mosaic or Triton call itself: it
refuses the one, all-gathers around the other), and 'auto' decides on one shard's shapes.
Every impl is differentiable in reverse mode (grad, vjp); xla and the Pallas ones are
custom_vjps, so none but reference has forward mode (jvp). The Pallas ones run on a CPU
with interpret=True (tests).

Beside them, two forms for checking and for pictures (kernels/reference.py):
`ssd_quadratic`, the same map as one L x L masked matmul (a second oracle, O(L^2)), and
`ssd_matrix`, that (batch, H, L, L) mixing matrix itself.
"""

import contextlib
import contextvars
import functools
import numbers
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from kernels import pallas_gpu, pallas_tpu
from kernels.reference import segment_runs, ssd_matrix, ssd_quadratic, ssd_reference
from kernels.xla import ssd_xla

__all__ = [
  "ssd",
  "ssd_matrix",
  "ssd_quadratic",
  "ssd_reference",
  "segment_runs",
  "IMPLS",
  "Implementation",
  "pick_impl",
  "platform_name",
  "target_platform",
  "targeting",
  "chunk_for",
  "chunk_run",
  "CHUNK_TABLE",
]

# An array argument: a jax.Array or a NumPy array (anything with .shape and .dtype).
Array = jax.Array | np.ndarray

# What `impl` may be: a key of IMPLS, or "auto" (the backend's Pallas kernel, else xla).
Implementation = Literal["reference", "xla", "pallas_tpu", "pallas_gpu", "auto"]

# impl name -> fn(x, dt, A, B, C, D, *, chunk_size, interpret)
IMPLS: dict[str, Callable[..., jax.Array]] = {
  "reference": ssd_reference,
  "xla": ssd_xla,
  "pallas_tpu": pallas_tpu.ssd_pallas_tpu,
  "pallas_gpu": pallas_gpu.ssd_pallas_gpu,
}
# backend -> (its Pallas impl, that module's unsupported_reason)
_PALLAS = {
  "tpu": ("pallas_tpu", pallas_tpu.unsupported_reason),
  "gpu": ("pallas_gpu", pallas_gpu.unsupported_reason),
}


# chunk_size=0: the chunk measured fastest for impl='xla' on the backend, by sequence length:
# rows (longest L, chunk), the first that covers L wins; a backend nobody has measured
# keeps 256. CPU (2 cores, forward and fwd+bwd, docs/benchmarks.md "Chunk sweep"): up to
# 128 tokens one chunk wins (L = 65: 2.4 ms fwd+bwd against 6.8 at chunk 64); above, 32 is
# fastest at every length timed (198 to 4098: 1.1-1.3x faster than 64 fwd+bwd). `onnx_export`
# writes graphs for ONNX Runtime, timed apart: 64 beats 32 and 128 there (Ti/16 at 224², 512²).
CHUNK_TABLE = {"cpu": ((128, 128), (None, 32)), "onnxruntime": ((None, 64),)}
# Elsewhere (TPU, GPU) 256, chosen by memory, not yet by time: compiled for a v5e chip
# (`python -m linearizer.aot --ssd_memory`, docs/results/aot.md), the XLA scan's temporaries
# at 1,026-16,386 tokens are within 15% of the smallest chunk's (128) in training and 30-40%
# below them in a forward at 4,098; 32, the CPU's choice, takes 2-7x more. The Pallas TPU
# kernel at 256 needs less than the XLA scan at any chunk. (Levanter found 512 1.55x faster
# than 128 for its XLA scan on a v5p: time it when a device is lent.)
DEFAULT_CHUNK = 256


def chunk_for(length: int, backend: str | None = None) -> int:
  """The table's chunk for a sequence of `length` tokens on `backend` (default: the
  target platform's, `target_platform`)."""
  for longest, chunk in CHUNK_TABLE.get(platform_name(backend or target_platform()), ()):
    if longest is None or length <= longest:
      return chunk
  return DEFAULT_CHUNK


def chunk_run(impl: str, chunk_size: int, length: int) -> int:
  """Tokens per chunk `impl` runs when asked for `chunk_size` at `length`: pallas_gpu
  takes a power of two of at most 64 (its tiles live in registers), the others the chunk
  itself, cut to the sequence."""
  if impl == "pallas_gpu":
    return pallas_gpu.chunk_len(chunk_size, length)
  return min(chunk_size, length)


def platform_name(name: str | None = None) -> str:
  """The backend as the Pallas impls name it: 'tpu', 'gpu' (CUDA or ROCm), 'cpu'."""
  name = name or jax.default_backend()
  return "gpu" if name in ("cuda", "rocm") else name


_TARGET = contextvars.ContextVar("kernels_target", default=None)


@contextlib.contextmanager
def targeting(platform: str):
  """Traces within build programs for `platform` ('tpu', 'gpu'/'cuda', 'cpu'): what
  `jax.export` for one platform needs, since an export has no mesh to say it. jax's trace
  cache does not key on it: jit a new function inside it."""
  token = _TARGET.set(platform_name(platform))
  try:
    yield
  finally:
    _TARGET.reset(token)


def target_platform() -> str:
  """The platform the program is built for: the one `targeting` names, else that of the
  devices of the mesh in context (while tracing under `jax.sharding.use_abstract_mesh` or
  `jax.set_mesh`), else JAX's default backend; named as `platform_name` names it."""
  if _TARGET.get() is not None:
    return _TARGET.get()
  device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
  return platform_name(device.platform if device is not None else None)


def _batch_mesh(batch: int):
  """(mesh, batch axes) for a `shard_map` over the batch: the mesh in context and those of
  its axes not already manual; the axes are all of them where the batch splits over all,
  else none (each device then runs the whole batch: correct, only redundant). None without a
  mesh of several devices."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None
  axes = tuple(a for a in mesh.axis_names if a not in mesh.manual_axes)
  size = int(np.prod([mesh.shape[a] for a in axes]))
  if size <= 1:
    return None
  return mesh, (axes if batch % size == 0 else ())


def pick_impl(x: Array, B: Array, chunk_size: int, backend: str | None = None) -> Implementation:
  """What impl='auto' runs: the target platform's Pallas kernel if it takes these shapes
  (one shard's, under a mesh), else xla."""
  backend = platform_name(backend or target_platform())
  if backend in _PALLAS:
    name, unsupported = _PALLAS[backend]
    if unsupported(x.shape, B.shape, chunk_size, x.dtype) is None:
      return name
  return "xla"


def _check_shapes(x, dt, A, B, C, D, chunk_size):
  """One clear ValueError naming the argument, the shape received and the one expected."""

  def bad(name, got, want):
    raise ValueError(f"ssd: {name} has shape {tuple(got)}, expected {want}")

  if len(x.shape) != 4 or x.shape[1] < 1:
    bad("x", x.shape, "(batch, L, H, P) with L >= 1")
  batch, L, H, P = x.shape
  if tuple(dt.shape) != (batch, L, H):
    bad("dt", dt.shape, f"(batch, L, H) = {(batch, L, H)}")
  if tuple(A.shape) != (H,):
    bad("A", A.shape, f"(H,) = {(H,)}")
  if len(B.shape) != 4 or tuple(B.shape[:2]) != (batch, L) or B.shape[2] < 1 or H % B.shape[2]:
    bad("B", B.shape, f"(batch, L, G, S) = ({batch}, {L}, G, S) with H = {H} divisible by G")
  if tuple(C.shape) != tuple(B.shape):
    bad("C", C.shape, f"the shape of B, {tuple(B.shape)}")
  if D is not None and tuple(D.shape) != (H,):
    bad("D", D.shape, f"(H,) = {(H,)} or None")
  if not (isinstance(chunk_size, numbers.Integral) and chunk_size >= 0):
    raise ValueError(f"ssd: chunk_size must be a positive int or 0 (the table), got {chunk_size!r}")


def ssd(
  x: Array,
  dt: Array,
  A: Array,
  B: Array,
  C: Array,
  D: Array | None = None,
  *,
  chunk_size: int = 256,
  impl: Implementation = "auto",
  interpret: bool = False,
  segment_ids: Array | None = None,
) -> jax.Array:
  """The Mamba-2 SSD: y_t = sum_{s<=t} (C_t . B_s) exp(A sum_{r=s+1..t} dt_r) dt_s x_s + D x_t.

  Args:
    x: (batch, L, H, P) inputs, L >= 1.
    dt: (batch, L, H) positive step sizes (already softplus'ed).
    A: (H,) negative decay rates.
    B, C: (batch, L, G, S) with H % G == 0 (head h uses group h // (H // G)).
    D: (H,) skip weights, or None for no skip term.
    chunk_size: tokens per chunk of the chunked impls (L need not be a multiple); 0 takes
      `chunk_for(L)`, the measured table's (CHUNK_TABLE).
    impl: which implementation runs (see the module docstring); "auto" picks the
      backend's Pallas kernel when it takes these shapes, else "xla".
    interpret: run Pallas kernels in interpret mode (for CPU tests); others ignore it.
    segment_ids: (batch, L) integers, or None: a packed sequence, each run of one id its
      own sequence; the state carried into a token whose id differs from the previous
      token's is zero (mamba-ssm's `seq_idx`). Every impl takes it.

  Returns:
    y: (batch, L, H, P) in x.dtype.

  Raises:
    ValueError: an unknown impl, a shape that does not fit the others, a chunk_size
      that is not a positive int, or a Pallas impl asked for on another backend without
      interpret=True.
  """
  if impl not in IMPLS and impl != "auto":
    raise ValueError(f"ssd: unknown impl={impl!r}; choose one of {sorted([*IMPLS, 'auto'])}")
  _check_shapes(x, dt, A, B, C, D, chunk_size)
  if segment_ids is not None:
    if tuple(segment_ids.shape) != x.shape[:2] or not jnp.issubdtype(
      segment_ids.dtype, jnp.integer
    ):
      raise ValueError(
        f"ssd: segment_ids has shape {tuple(segment_ids.shape)} and dtype "
        f"{segment_ids.dtype}, expected integers of shape (batch, L) = {tuple(x.shape[:2])}"
      )
    segment_ids = segment_runs(segment_ids)  # ids that come back are new segments
  chunk_size = chunk_size or chunk_for(x.shape[1])
  sharded = _batch_mesh(x.shape[0])
  if impl == "auto":
    shards = int(np.prod([sharded[0].shape[a] for a in sharded[1]])) if sharded else 1
    shard = lambda a: jax.ShapeDtypeStruct((a.shape[0] // shards, *a.shape[1:]), a.dtype)
    impl = pick_impl(shard(x), shard(B), chunk_size)
  platform = impl.partition("_")[2]  # 'tpu' / 'gpu' for the Pallas impls
  if platform and not interpret and target_platform() != platform:
    raise ValueError(
      f"ssd: impl={impl!r} compiles for a {platform.upper()} only (the target "
      f"is {target_platform()}); pass interpret=True to run it here, "
      "or use impl='xla'"
    )
  run = functools.partial(IMPLS[impl], chunk_size=chunk_size, interpret=interpret)
  if segment_ids is not None:
    run = lambda x, dt, A, B, C, D, ids, run=run: run(x, dt, A, B, C, D, segment_ids=ids)
  args = (x, dt, A, B, C, D) + (() if segment_ids is None else (segment_ids,))
  if not platform or sharded is None:  # (xla and reference: XLA partitions them itself)
    return run(*args)
  mesh, axes = sharded
  batch, heads = P(axes), P()
  return jax.shard_map(
    run,
    mesh=mesh,
    in_specs=(batch, batch, heads, batch, batch, None if D is None else heads)
    + ((batch,) if segment_ids is not None else ()),  # segment ids go with their batch rows
    out_specs=batch,
    check_vma=False,  # pallas_call does not track varying manual axes
  )(*args)
