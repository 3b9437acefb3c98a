"""Compile-only devices of TPU and GPU topologies this host does not have, for
`linearizer.aot`: libtpu turns a topology name into TPU devices, and the CUDA plugin turns
a GPU target description into GPU devices (deviceless compilation: no GPU, no CUDA
libraries, no ptxas).

  v5e:2x2, v6e:4x4, v4:2x2x1, v5p:2x2x1    a TPU slice (generation:shape)
  h100:1x1x8, a100:2x1x8, h200:1x1x8        GPUs: partitions x hosts x GPUs per host
"""

import contextlib
import dataclasses
import os
import sys

from jax.experimental import topologies

from linearizer.errors import UserError

GIB = 2**30
# Per-chip memory of the TPU generations (GiB): Cloud TPU's system-architecture pages.
TPU_HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
MEGACORE = ("v4", "v5p")  # one device per chip only with the megacore chip config
# What JAX gives a program of a GPU's memory by default (XLA_PYTHON_CLIENT_MEM_FRACTION):
# XLA:GPU compiles a program of any size, so the tool compares against this share.
GPU_MEMORY_FRACTION = 0.75


def _gpu(name, cc, cores, fpus, smem_core, smem_optin, l2, clock, bandwidth, memory, source):
  """XLA's GPU target description (a GpuTargetConfigProto in text form)."""
  return (
    f"""gpu_device_info {{ threads_per_block_limit: 1024 threads_per_warp: 32
  shared_memory_per_block: 49152 shared_memory_per_core: {smem_core}
  threads_per_core_limit: 2048 core_count: {cores} fpus_per_core: {fpus}
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: {bandwidth} l2_cache_size: {l2} clock_rate_ghz: {clock}
  device_memory_size: {memory} shared_memory_per_block_optin: {smem_optin}
  cuda_compute_capability {{ major: {cc[0]} minor: {cc[1]} }}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536 }}
platform_name: "CUDA" dnn_version_info {{ major: 9 minor: 8 }}
runtime_version {{ major: 12 minor: 8 }}
device_description_str: "{name}" """,
    memory,
    source,
  )


# name -> (target config, device memory in bytes, where the values come from)
GPUS = {
  # XLA's own H100 SXM spec (jax-ml/jax#28376, xla/backends/gpu/target_config/specs).
  "h100": _gpu(
    "NVIDIA H100 80GB HBM3",
    (9, 0),
    132,
    128,
    233472,
    232448,
    52428800,
    1.98,
    3352320000000,
    84929347584,
    "XLA's H100 SXM spec",
  ),
  # The H100's chip (the same SMs) with the H200's memory: datasheet values, unverified.
  "h200": _gpu(
    "NVIDIA H200",
    (9, 0),
    132,
    128,
    233472,
    232448,
    52428800,
    1.98,
    4800000000000,
    150754820096,
    "H200 datasheet on the H100's spec (unverified)",
  ),
  # A100 80GB SXM from its datasheet and CUDA's sm_80 limits, unverified on a device.
  "a100": _gpu(
    "NVIDIA A100-SXM4-80GB",
    (8, 0),
    108,
    64,
    167936,
    166912,
    41943040,
    1.41,
    2039000000000,
    85899345920,
    "A100 80GB datasheet (unverified)",
  ),
}


@dataclasses.dataclass(frozen=True)
class Target:
  """The devices of a topology and what a program may use of one of them."""

  name: str
  platform: str  # 'tpu' or 'gpu'
  devices: list
  memory_bytes: int  # per chip
  note: str = ""  # where the figures come from, what the memory limit means


def target(topology: str, slices: int = 1) -> Target:
  """The compile-only devices of `topology` (see the module docstring).

  Raises:
    UserError: a name neither table knows, a shape the plugin refuses, or the plugin
      (libtpu, jax-cuda12-plugin) missing: `make aot` installs them.
  """
  kind, _, shape = topology.partition(":")
  if kind in TPU_HBM_GIB and shape:
    return _tpu(topology, kind, slices)
  if kind in GPUS and shape:
    return _gpu_target(topology, kind, shape)
  raise UserError(
    f"--topology {topology!r}; expected a TPU slice such as v5e:2x2, v6e:4x4, v4:2x2x1 or "
    f"v5p:2x2x1 (generations {sorted(TPU_HBM_GIB)}) or GPUs such as h100:1x1x8 "
    f"(partitions x hosts x GPUs per host; {sorted(GPUS)})."
  )


def _tpu(topology: str, generation: str, slices: int) -> Target:
  extra = {"chip_config_name": "megacore"} if generation in MEGACORE else {}
  topo = _plugin_call(
    topology,
    "libtpu",
    lambda: topologies.get_topology_desc(
      topology_name=topology, platform="tpu", num_slices=slices, **extra
    ),
  )
  return Target(topology, "tpu", list(topo.devices), TPU_HBM_GIB[generation] * GIB)


def _gpu_target(topology: str, kind: str, shape: str) -> Target:
  config, memory, source = GPUS[kind]
  topo = _plugin_call(
    topology,
    "jax-cuda12-plugin",
    lambda: topologies.get_topology_desc(platform="cuda", target_config=config, topology=shape),
  )
  limit = int(GPU_MEMORY_FRACTION * memory)
  note = f"{source}; memory: {GPU_MEMORY_FRACTION:.0%} of {memory / GIB:.1f} GiB, JAX's default"
  return Target(topology, "gpu", list(topo.devices), limit, note)


def _plugin_call(topology: str, plugin: str, fn):
  """`fn()` with the plugin's start-up warnings sent to the log; its refusals as one error."""
  try:
    with native_stderr_to(NOISE):
      return fn()
  except Exception as e:  # pylint: disable=broad-except
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "not installed" in first or "not implemented" in first:  # JAX without the plugin
      raise UserError(
        f"--topology {topology}: {first}. Compiling for it needs {plugin} on the tool's "
        f"path: run `make aot` (docs/aot.md)."
      ) from e
    raise UserError(f"--topology {topology!r}: {plugin} refused it ({first}).") from e


NOISE = os.path.join(os.environ.get("TMPDIR", "/tmp"), "linearizer-aot.log")


@contextlib.contextmanager
def native_stderr_to(path: str):
  """File descriptor 2 sent to `path` (appended) inside the block: what C++ libraries print
  there, which Python's logging never sees."""
  sys.stderr.flush()
  saved = os.dup(2)
  with open(path, "a", encoding="utf-8") as f:
    os.dup2(f.fileno(), 2)
    try:
      yield
    finally:
      os.dup2(saved, 2)
      os.close(saved)
