"""Compile-only: every training step a config's stages would run, compiled for a TPU or GPU
topology from this host, with no chip and no weights (MaxText's `train_compile`).

  python -m linearizer.aot --config configs/imagenet.py --topology v5e:4x4 [--slices 2]
      [--find_batch] [--out aot.json] [--config.distill.batch_size=2048 ...]
  python -m linearizer.aot --ssd_memory --topology v5e:2x2     # the SSD probe (below)

For each stage with a step (`stages.Stage.steps`: train_teacher, distill, finetune,
train_student) it builds the step as `train.fit` would (the same state, shardings, mesh and
jit; models from `nnx.eval_shape`), compiles it for the topology's devices
(`linearizer.topologies`) and prints the per-chip argument, output, temporary and code
bytes against the chip's memory, whether it fits, the kernels the program holds and its
FLOPs. A TPU compile refuses a program that does not fit; XLA:GPU does not, so for GPUs
the tool compares the bytes with what JAX gives a program by default (75% of the memory).
`--find_batch` fits the per-chip bytes as affine in the batch from two compiles and checks
the largest batch it predicts with a third.

It needs the compile-only extras (libtpu for TPUs, jax-cuda12-plugin/-pjrt for GPUs),
installed apart from the project's environment (`make aot` puts them in .aot/, which the
tool puts on its path; LINEARIZER_AOT_PREFIX names another): importable from the project's
environment, they would change the CPU suite's and the demo's JAX (docs/aot.md).
"""

import dataclasses
import os
import sys
from typing import Optional

# Where `make aot` installs the extras (requirements-aot.txt), apart from the environment.
PREFIX = os.environ.get(
  "LINEARIZER_AOT_PREFIX", os.path.join(os.path.dirname(os.path.dirname(__file__)), ".aot")
)
if __name__ == "__main__":  # before JAX loads its plugins
  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only devices; the host runs on CPU
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # beside another libtpu process
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # no metadata server to ask
  # Without an autotuner XLA:GPU's Triton GEMM tiler fails ("Couldn't find output tile
  # sizes"); cuBLAS GEMMs compile (memory is unchanged, kernel choices may differ).
  os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_triton_gemm=false"
  sys.path.insert(0, PREFIX)
  # The CUDA plugin prints its start-up lines (no driver, absl's preamble) on descriptor 2
  # as JAX loads it: to the log, so that a refusal stays one `error:` line.
  _stderr = os.dup(2)
  with open(os.path.join(os.environ.get("TMPDIR", "/tmp"), "linearizer-aot.log"), "a") as _log:
    os.dup2(_log.fileno(), 2)
    try:
      import jax  # noqa: E402, F401
    finally:
      os.dup2(_stderr, 2)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from ml_collections import config_flags  # noqa: E402

import kernels  # noqa: E402
from linearizer import data, files, sharding, stages, topologies, train  # noqa: E402
from linearizer.errors import UserError, one_line_errors  # noqa: E402
from linearizer.log import library_noise_to, log  # noqa: E402
from linearizer.program import Program  # noqa: E402

GIB = topologies.GIB
# Custom calls the compiled program holds, by the kernel they are (for the table).
KERNEL_CALLS = {"tpu_custom_call": "pallas_tpu", "__gpu$xla.gpu.triton": "pallas_gpu"}


class CompileError(UserError):
  """XLA refused the program (out of memory on a TPU, or a call it cannot partition)."""


def stage_programs(config, classes: int) -> dict:
  """{name: Program} of the configured stages that train (segment: one a backbone)."""
  found = {}
  for stage in config.stages:
    if stages.STAGES[stage].steps is not None:
      found.update(stages.STAGES[stage].steps(config, classes))
  return found


def compile_step(config, name: str, program: Program, tgt, batch: int) -> dict:
  """Compiles stage `name`'s step for `tgt` at global batch `batch`; `measure`'s dict."""
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, devices=tgt.devices)
  if batch % mesh.size:
    raise UserError(
      f"[{name}] batch_size {batch} does not split over the {mesh.size} devices of "
      f"{tgt.name}: use a multiple of {mesh.size}."
    )
  settings = dataclasses.replace(train.loop_settings(config, program.block, "", name), mesh=mesh)
  state = train.abstract_state(program.module, program.tx, settings.ema)
  step, _, _ = train.jitted_step(settings, program.step_fn, state, program.frozen)
  rng = jax.eval_shape(lambda: jax.random.key(0))
  try:
    compiled = step.lower(state, *program.frozen, program.batch(batch), rng).compile()
  except Exception as e:  # pylint: disable=broad-except  (XLA's refusals have no one type)
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    hint = " Lower the stage's batch_size or use more chips." if "memory" in first else ""
    raise CompileError(
      f"[{name}] does not compile for {tgt.name} ({mesh.size} chips) at batch {batch}: "
      f"{first}{hint}"
    ) from e
  return measure(compiled, batch, mesh.size, tgt)


def measure(compiled, batch: int, chips: int, tgt) -> dict:
  """Per-chip bytes (total = arguments + outputs − aliased + temporaries + code), whether
  they fit the chip, the Pallas kernels in the program and its FLOPs (None on a GPU,
  whose compiler gives no cost analysis)."""
  mem = compiled.memory_analysis()
  parts = dict(
    argument=mem.argument_size_in_bytes,
    output=mem.output_size_in_bytes,
    alias=mem.alias_size_in_bytes,
    temp=mem.temp_size_in_bytes,
    code=mem.generated_code_size_in_bytes,
  )
  total = parts["argument"] + parts["output"] - parts["alias"] + parts["temp"] + parts["code"]
  text = compiled.as_text()
  kernels = sorted({k for call, k in KERNEL_CALLS.items() if call in text}) or ["xla"]
  cost = compiled.cost_analysis() or {}
  cost = cost[0] if isinstance(cost, list) else cost
  return dict(
    batch=batch,
    images_per_chip=batch // chips,
    bytes=parts,
    total_bytes=total,
    memory_bytes=tgt.memory_bytes,
    fits=total <= tgt.memory_bytes,
    kernels=kernels,
    flops=cost.get("flops"),
  )


def find_batch(config, name: str, program: Program, tgt) -> dict:
  """The largest global batch whose step fits: per-chip bytes fitted as a + b·n (n images
  a chip) from compiles at 1 and 2 images a chip, the prediction checked by a third
  compile (stepping down a tenth at a time, at most three times, where it does not fit)."""
  chips = len(tgt.devices)
  one, two = (compile_step(config, name, program, tgt, n * chips) for n in (1, 2))
  slope = two["total_bytes"] - one["total_bytes"]
  base = one["total_bytes"] - slope
  n = max(1, int((tgt.memory_bytes - base) // max(slope, 1)))
  for _ in range(4):
    try:
      row = compile_step(config, name, program, tgt, n * chips)
      if row["fits"]:
        return dict(row, predicted_per_chip=n, bytes_per_image=slope, fixed_bytes=base)
    except CompileError:
      pass
    n = max(1, int(n * 0.9))
  raise UserError(f"[{name}] no batch found that fits {tgt.name} (tried down to {n} a chip).")


# The SSD probe: one chip's temporaries for the scan alone, per implementation and chunk, at
# the token counts of a B/16 student at 224², 512², 1024² and 2048² (batch 8, 24 heads,
# headdim and d_state 64, one group, bf16), forward and forward + backward.
PROBE_SHAPE = dict(batch=8, heads=24, headdim=64, d_state=64)
PROBE_LENGTHS = (198, 1026, 4098, 16386)
PROBE_IMPLS = (("pallas_tpu", 256), ("xla", 32), ("xla", 128), ("xla", 256), ("xla", 512))


def ssd_memory(topology: str) -> dict:
  """{'fwd'|'grad': {impl@chunk: {length: temporary MiB}}} on one chip of `topology`."""
  jax.config.update("jax_enable_compilation_cache", False)
  tgt = topologies.target(topology, 1)
  chip = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(tgt.devices[:1]), ("x",)), P())
  b, H, hd, S = PROBE_SHAPE.values()
  bf16, f32 = jax.numpy.bfloat16, jax.numpy.float32
  rows = {"fwd": {}, "grad": {}}
  for impl, chunk in PROBE_IMPLS:
    for L in PROBE_LENGTHS:
      args = [(b, L, H, hd), (b, L, H), (H,), (b, L, 1, S), (b, L, 1, S), (H,)]
      args = [jax.ShapeDtypeStruct(a, bf16 if i in (0, 3, 4) else f32) for i, a in enumerate(args)]

      def y(*a, impl=impl, chunk=chunk):
        with kernels.targeting(tgt.devices[0].platform):
          return kernels.ssd(*a, chunk_size=chunk, impl=impl)

      grad = jax.grad(lambda *a: y(*a).astype(f32).sum(), argnums=(0, 1, 3, 4))
      for kind, fn in (("fwd", y), ("grad", grad)):
        compiled = jax.jit(lambda *a, fn=fn: fn(*a), in_shardings=chip).lower(*args).compile()
        mib = compiled.memory_analysis().temp_size_in_bytes / 2**20
        rows[kind].setdefault(f"{impl}@{chunk}", {})[L] = round(mib, 1)
        log(f"[aot] ssd {kind:4s} {impl}@{chunk:<3d} {L:6d} tokens: {mib:9.1f} MiB")
  return rows


def table(rows: dict, tgt) -> str:
  gib = lambda b: f"{b / GIB:8.2f}"
  head = f"compiled for {tgt.name}: {len(tgt.devices)} chips, {tgt.memory_bytes / GIB:.1f} GiB each"
  lines = [
    head + (f" ({tgt.note})" if tgt.note else ""),
    "stage            batch img/chip args GiB  out GiB temp GiB code GiB  total  fits kernels",
  ]
  for name, r in rows.items():
    b = r["bytes"]
    lines.append(
      f"{name:15s} {r['batch']:6d} {r['images_per_chip']:8d}{gib(b['argument'])}"
      f" {gib(b['output'])}{gib(b['temp'])} {gib(b['code'])}{gib(r['total_bytes'])}"
      f"  {'yes' if r['fits'] else 'NO':4s} {','.join(r['kernels'])}"
    )
  return "\n".join(lines)


def run(config, topology: str, slices: int = 1, out: Optional[str] = None, largest=False):
  """Compiles the config's training steps for `topology`; {stage: measurements}.

  Args:
    config: an experiment config (configs/*.py).
    topology: e.g. 'v5e:2x2' or 'h100:1x1x8' (`linearizer.topologies`).
    slices: TPU slices (multi-slice: the data axis spans them).
    out: a JSON file to write the measurements to, or None.
    largest: find each stage's largest batch that fits (`find_batch`) instead.
  Returns:
    {stage: measure()'s dict}. Raises UserError naming the stage, the topology and the
    bytes when one does not compile or does not fit.
  """
  # A compile-only executable cannot be stored or read back: no persistent cache here.
  jax.config.update("jax_enable_compilation_cache", False)
  tgt = topologies.target(topology, slices)
  # The head's size: the config's, else the training data's (a source the host can open).
  classes = config.data.num_classes or data.num_classes(config.data, data.train_source(config.data))
  rows = {}
  for name, program in stage_programs(config, classes).items():
    log(f"[aot] compiling {name} for {tgt.name} ...")
    if largest:
      rows[name] = find_batch(config, name, program, tgt)
      continue
    rows[name] = compile_step(config, name, program, tgt, program.block.batch_size)
    if not rows[name]["fits"]:  # (a GPU compile: the TPU compiler refuses it itself)
      raise UserError(
        f"[{name}] needs {rows[name]['total_bytes'] / GIB:.2f} GiB per chip on {tgt.name}; "
        f"a program gets {tgt.memory_bytes / GIB:.2f} GiB: lower the stage's batch_size or "
        "use more chips."
      )
  log(table(rows, tgt))
  if out:
    files.write_json(out, dict(topology=tgt.name, slices=slices, note=tgt.note, stages=rows))
  return rows


def main(argv=None) -> None:
  """`python -m linearizer.aot --config FILE[:args] --topology NAME [--slices N]
  [--find_batch] [--out FILE.json] [--config.x=y ...]`."""
  config_flags.DEFINE_config_file("config", None, "Experiment config (configs/*.py[:args]).")
  flags.DEFINE_string(
    "topology", None, "v5e:2x2, v6e:4x4, v4:2x2x1, v5p:2x2x1, or GPUs: h100:1x1x8, a100:2x1x8."
  )
  flags.DEFINE_integer("slices", 1, "TPU slices (multi-slice: the data axis spans them).")
  flags.DEFINE_bool("find_batch", False, "Find each stage's largest global batch that fits.")
  flags.DEFINE_string("out", None, "A JSON file for the measurements.")
  flags.DEFINE_bool("ssd_memory", False, "Probe the SSD scan's temporaries on one chip instead.")
  flags.mark_flags_as_required(["topology"])
  with one_line_errors():
    try:
      flags.FLAGS(sys.argv if argv is None else argv)
    except (flags.Error, KeyError, AttributeError, ValueError, TypeError) as e:
      raise UserError(str(e).strip().splitlines()[-1]) from e
    library_noise_to(topologies.NOISE)
    f = flags.FLAGS
    if not f.ssd_memory and f.config is None:
      raise UserError("--config is required (or --ssd_memory for the SSD probe).")
    # The plugins print on descriptor 2 as they start and compile (no CUDA driver, no TPU
    # metadata): to the log; our table is on stdout and a refusal one `error:` line after.
    with topologies.native_stderr_to(topologies.NOISE):
      if f.ssd_memory:
        rows = ssd_memory(f.topology)
        if f.out:
          files.write_json(f.out, dict(topology=f.topology, shape=PROBE_SHAPE, **rows))
      else:
        run(f.config, f.topology, f.slices, f.out, f.find_batch)


if __name__ == "__main__":
  main()
