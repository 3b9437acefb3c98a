"""Compile-only: every training step a config's stages would run, compiled for a TPU or GPU
topology from this host, with no chip and no weights (MaxText's `train_compile`).

  python -m linearizer.aot --config configs/imagenet.py --topology v5e:4x4 [--slices 2]
      [--config.distill.batch_size=2048 ...]

For each stage with a step (`stages.Stage.steps`: train_teacher, distill, finetune,
train_student) it builds the step as `train.fit` would (the same state, shardings, mesh and
jit; models from `nnx.eval_shape`), compiles it for the topology's devices and prints the
per-chip argument, output, temporary and code bytes against the chip's memory, whether it
fits, the kernels the program holds and its FLOPs. A TPU compile refuses a program that
does not fit (the error names the stage, the topology and the bytes); for a GPU the tool
compares the bytes with what JAX gives a program by default (75% of the memory).

It needs the compile-only extras (libtpu for TPUs, jax-cuda12-plugin/-pjrt for GPUs),
installed apart from the project's environment (`make aot` puts them in .aot/, which the
tool puts on its path; LINEARIZER_AOT_PREFIX names another): importable from the project's
environment, they would change the CPU suite's and the demo's JAX (docs/aot.md).
"""

import contextlib
import dataclasses
import os
import sys
from typing import Optional

# Where `make aot` installs the extras (requirements-aot.txt), apart from the environment.
PREFIX = os.environ.get(
  "LINEARIZER_AOT_PREFIX", os.path.join(os.path.dirname(os.path.dirname(__file__)), ".aot")
)
NOISE = os.path.join(os.environ.get("TMPDIR", "/tmp"), "linearizer-aot.log")  # libraries' logs
if __name__ == "__main__":  # before JAX loads its plugins
  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only devices; the host runs on CPU
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # beside another libtpu process
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # no metadata server to ask
  sys.path.insert(0, PREFIX)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import flags  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from linearizer import data, files, sharding, stages, train  # noqa: E402
from linearizer.errors import UserError, one_line_errors  # noqa: E402
from linearizer.log import library_noise_to, log  # noqa: E402

GIB = 2**30
# Per-chip memory of the TPU generations (GiB): Cloud TPU's system-architecture pages.
TPU_HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
MEGACORE = ("v4", "v5p")  # one device per chip only with the megacore chip config
# Custom calls the compiled program holds, by the kernel they are (for the table).
KERNEL_CALLS = {"tpu_custom_call": "pallas_tpu", "__gpu$xla.gpu.triton": "pallas_gpu"}


@dataclasses.dataclass(frozen=True)
class Target:
  """The devices of a topology and what one of them holds."""

  name: str
  platform: str  # 'tpu' or 'cuda'
  devices: list
  memory_bytes: int  # what a program may use per chip


def tpu_target(topology: str, slices: int = 1) -> Target:
  """`v5e:2x2`, `v5p:2x2x1`, ... as compile-only devices (libtpu)."""
  generation = topology.partition(":")[0]
  if generation not in TPU_HBM_GIB or ":" not in topology:
    raise UserError(
      f"--topology {topology!r}; expected a TPU generation and shape, e.g. v5e:2x2, "
      f"v6e:4x4, v4:2x2x1 or v5p:2x2x1 (generations {sorted(TPU_HBM_GIB)})."
    )
  extra = {"chip_config_name": "megacore"} if generation in MEGACORE else {}
  try:
    with native_stderr_to(NOISE):  # libtpu's start-up warnings (hostnames, metadata)
      topo = topologies.get_topology_desc(
        topology_name=topology, platform="tpu", num_slices=slices, **extra
      )
  except RuntimeError:  # no TPU plugin: `target` names the fix
    raise
  except Exception as e:  # libtpu's own message: a shape it does not know
    raise UserError(f"--topology {topology!r}: libtpu refused it ({e}).") from e
  return Target(topology, "tpu", list(topo.devices), TPU_HBM_GIB[generation] * GIB)


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


def target(topology: str, slices: int) -> Target:
  """The topology's devices; one clear error when libtpu is not installed."""
  try:
    return tpu_target(topology, slices)
  except RuntimeError as e:  # no TPU plugin: JAX cannot make TPU devices
    raise UserError(
      f"--topology {topology}: {str(e).splitlines()[0]}. The compile-only tool needs "
      f"libtpu in {PREFIX}: run `make aot` (docs/aot.md)."
    ) from e


def stage_programs(config, classes: int) -> dict:
  """{stage: train.Program} of the configured stages that train."""
  return {
    name: stages.STAGES[name].steps(config, classes)
    for name in config.stages
    if stages.STAGES[name].steps is not None
  }


def compile_stage(config, name: str, program: train.Program, tgt: Target) -> dict:
  """Compiles stage `name`'s step for `tgt`; its per-chip bytes, kernels and FLOPs."""
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, devices=tgt.devices)
  settings = train.loop_settings(config, program.block, "", name)
  settings = dataclasses.replace(settings, mesh=mesh)
  batch = program.block.batch_size
  if batch % mesh.size:
    raise UserError(
      f"[{name}] batch_size {batch} does not split over the {mesh.size} devices of "
      f"{tgt.name}: use a multiple of {mesh.size}."
    )
  state = train.abstract_state(program.module, program.tx, settings.ema)
  step, _, _ = train.jitted_step(settings, program.step_fn, state, program.frozen)
  size = program.image_size
  images = data.Batch(
    image=jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32),
    label=jax.ShapeDtypeStruct((batch,), jnp.int32),
  )
  rng = jax.eval_shape(lambda: jax.random.key(0))
  try:
    compiled = step.lower(state, *program.frozen, images, rng).compile()
  except Exception as e:  # XLA's refusal: out of memory, or a call it cannot partition
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    hint = " Lower the stage's batch_size or use more chips." if "memory" in first else ""
    raise UserError(
      f"[{name}] does not compile for {tgt.name} ({mesh.size} chips): {first}{hint}"
    ) from e
  return measure(compiled, batch // mesh.size, tgt)


def measure(compiled, per_chip: int, tgt: Target) -> dict:
  """Per-chip bytes (total = arguments + outputs − aliased + temporaries + code), whether
  they fit the chip, the Pallas kernels in the program and its FLOPs per chip."""
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
    images_per_chip=per_chip,
    bytes=parts,
    total_bytes=total,
    memory_bytes=tgt.memory_bytes,
    fits=total <= tgt.memory_bytes,
    kernels=kernels,
    flops=cost.get("flops"),
  )


def table(rows: dict, tgt: Target) -> str:
  gib = lambda b: f"{b / GIB:8.2f}"
  lines = [
    f"compiled for {tgt.name} ({len(tgt.devices)} chips, {tgt.memory_bytes / GIB:.1f} GiB each)",
    "stage           img/chip  args GiB   out GiB  temp GiB  code GiB total GiB  fits  kernels",
  ]
  for name, r in rows.items():
    b = r["bytes"]
    lines.append(
      f"{name:15s} {r['images_per_chip']:8d} {gib(b['argument'])} {gib(b['output'])}"
      f" {gib(b['temp'])} {gib(b['code'])} {gib(r['total_bytes'])}  {'yes' if r['fits'] else 'NO':4s}"
      f"  {','.join(r['kernels'])}"
    )
  return "\n".join(lines)


def run(config, topology: str, slices: int = 1, out: Optional[str] = None) -> dict:
  """Compiles the config's training steps for `topology`; {stage: measurements}.

  Args:
    config: an experiment config (configs/*.py).
    topology: a TPU topology, e.g. 'v5e:2x2'.
    slices: TPU slices (multi-slice: the data axis spans them).
    out: a JSON file to write the measurements to, or None.
  Returns:
    {stage: measure()'s dict}. Raises UserError naming the stage when one does not
    compile or does not fit.
  """
  # A compile-only executable cannot be stored or read back: no persistent cache here.
  jax.config.update("jax_enable_compilation_cache", False)
  tgt = target(topology, slices)
  # The head's size: the config's, else the training data's (a source the host can open).
  classes = config.data.num_classes or data.num_classes(config.data, data.train_source(config.data))
  rows = {}
  for name, program in stage_programs(config, classes).items():
    log(f"[aot] compiling {name} for {tgt.name} ...")
    rows[name] = compile_stage(config, name, program, tgt)
    if not rows[name]["fits"]:
      raise UserError(
        f"[{name}] needs {rows[name]['total_bytes'] / GIB:.2f} GiB per chip on {tgt.name}; "
        f"a chip has {tgt.memory_bytes / GIB:.2f} GiB: lower the stage's batch_size or use "
        "more chips."
      )
  log(table(rows, tgt))
  if out:
    files.write_json(out, dict(topology=tgt.name, slices=slices, stages=rows))
  return rows


def main(argv=None) -> None:
  """`python -m linearizer.aot --config FILE[:args] --topology v5e:2x2 [--slices N]
  [--out FILE.json] [--config.x=y ...]`."""
  config_flags.DEFINE_config_file("config", None, "Experiment config (configs/*.py[:args]).")
  flags.DEFINE_string("topology", None, "A TPU topology: v5e:2x2, v6e:4x4, v4:2x2x1, v5p:2x2x1.")
  flags.DEFINE_integer("slices", 1, "TPU slices (multi-slice: the data axis spans them).")
  flags.DEFINE_string("out", None, "A JSON file for the measurements.")
  flags.mark_flags_as_required(["config", "topology"])
  with one_line_errors():
    try:
      flags.FLAGS(sys.argv if argv is None else argv)
    except (flags.Error, KeyError, AttributeError, ValueError, TypeError) as e:
      raise UserError(str(e).strip().splitlines()[-1]) from e
    library_noise_to(NOISE)
    run(flags.FLAGS.config, flags.FLAGS.topology, flags.FLAGS.slices, flags.FLAGS.out)


if __name__ == "__main__":
  main()
