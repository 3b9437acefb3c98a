"""Meshes, parameter shardings from regex rules, global batches, and multi-host start-up.

The mesh has two axes: `data` (pure data parallelism: parameters replicated) and `fsdp`
(data parallelism whose large parameters and optimizer moments are split across it). The
batch is split over both. One rule function serves the whole train state, so optimizer
moments are sharded exactly like the parameters they follow.
"""

import functools
import os
import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from linearizer.errors import UserError
from linearizer.optim import path_str

AXES = ("data", "fsdp")
BATCH = P(AXES)


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
  """A (data, fsdp) mesh; one size may be -1 for "all remaining devices"."""
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if data == -1 and fsdp == -1:
    raise UserError("At most one of mesh.data and mesh.fsdp may be -1.")
  if not all(s == -1 or s > 0 for s in (data, fsdp)):
    raise UserError(f"Mesh sizes must be positive or -1, got data={data}, fsdp={fsdp}.")
  data = n // fsdp if data == -1 else data
  fsdp = n // data if fsdp == -1 else fsdp
  if data * fsdp != n:
    raise UserError(f"Mesh data={data} × fsdp={fsdp} does not cover the {n} devices.")
  # Auto axes: the step's shardings come from jit_step and XLA propagates the rest
  # (jax.make_mesh would default to Explicit axes, which put shardings into the types).
  auto = (jax.sharding.AxisType.Auto,) * len(AXES)
  if devices == list(jax.devices()):  # let JAX order devices for the physical topology
    return jax.make_mesh((data, fsdp), AXES, axis_types=auto)
  return Mesh(np.asarray(devices).reshape(data, fsdp), AXES, axis_types=auto)


def spec_for(path: str, shape: tuple, mesh: Mesh, rules=(), fsdp_min_size: int = 2**18):
  """PartitionSpec of one array: the first matching rule, else FSDP for large arrays.

  rules: (regex, spec tuple) pairs matched against the array's path. Without a match, an
  array with at least `fsdp_min_size` elements is split over `fsdp` along its largest
  divisible dimension; everything else is replicated.
  """
  for pattern, spec in rules:
    if re.search(pattern, path):
      return P(*spec)
  fsdp = mesh.shape["fsdp"]
  if fsdp > 1 and int(np.prod(shape)) >= fsdp_min_size:
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
      if shape[dim] % fsdp == 0:
        return P(*[("fsdp" if d == dim else None) for d in range(len(shape))])
  return P()


def tree_shardings(tree, mesh: Mesh, rules=(), fsdp_min_size: int = 2**18):
  """NamedShardings for every array of a pytree (e.g. a whole TrainState)."""
  return jax.tree_util.tree_map_with_path(
    lambda p, x: NamedSharding(
      mesh, spec_for(path_str(p), np.shape(x), mesh, rules, fsdp_min_size)
    ),
    tree,
  )


def put(tree, shardings):
  """Places a pytree that every process holds in full onto the mesh."""
  return jax.tree.map(
    lambda x, s: (
      jax.make_array_from_callback(np.shape(x), s, lambda idx: x[idx])
      if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
      else jax.device_put(x, s)
    ),
    tree,
    shardings,
  )


def global_batch(local_batch, mesh: Mesh):
  """Assembles each process's share of the batch into global arrays split over the mesh."""
  sharding = NamedSharding(mesh, BATCH)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)


def on_mesh(fn, mesh: Mesh):
  """`fn`, traced with `mesh` in context. The SSD kernels and the attention read it: the
  Pallas calls run in a shard_map over the batch (XLA cannot partition them itself), and
  each picks the kernel of the mesh's platform, not the host's (a CPU host compiling for
  a TPU topology gets the TPU's program)."""

  @functools.wraps(fn)
  def traced_on_mesh(*args):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args)

  return traced_on_mesh


def jit_step(step, mesh: Mesh, state_shardings, extra_shardings=()):
  """jax.jit of `step(state, *extra, batch, rng)` with explicit shardings, state donated.

  `extra_shardings` lists the shardings of the arguments between the state and the batch
  (the frozen teacher's parameters for distillation).
  """
  replicated = NamedSharding(mesh, P())
  batch = NamedSharding(mesh, BATCH)
  return jax.jit(
    on_mesh(step, mesh),
    in_shardings=(state_shardings, *extra_shardings, batch, replicated),
    out_shardings=(state_shardings, replicated),
    donate_argnums=0,
  )


def initialize_distributed(coordinator_address=None, num_processes=None, process_id=None):
  """Starts multi-host JAX when the run has several processes; a no-op otherwise.

  Explicit arguments (or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID) set
  up a cluster by hand, e.g. several processes on one machine; on TPU pods and SLURM/MPI
  GPU clusters JAX finds its peers itself. CPU processes talk through gloo collectives.
  """
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  num_processes = int(num_processes or os.environ.get("JAX_NUM_PROCESSES", 0)) or None
  process_id = process_id if process_id is not None else os.environ.get("JAX_PROCESS_ID")
  auto = any(
    k in os.environ
    for k in (
      "SLURM_NTASKS",
      "OMPI_COMM_WORLD_SIZE",
      "TPU_WORKER_ID",
      "MEGASCALE_COORDINATOR_ADDRESS",
    )
  )
  if not (coordinator_address or auto) or (num_processes or 2) < 2:
    return False
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    coordinator_address=coordinator_address,
    num_processes=num_processes,
    process_id=int(process_id) if process_id is not None else None,
  )
  return True
