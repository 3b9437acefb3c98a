"""Compiling for hardware this host does not have: the Pallas SSD calls run in a shard_map
over the batch under a mesh (checked on an 8-device CPU mesh in interpret mode, against the
float32 reference), and the smoke config's steps compile for a 4-chip TPU and an 8-GPU
node with the target's Pallas kernel inside (python -m linearizer.aot, with the extras from
`make aot`; skipped without them).

The TPU tests stay in this one file: libtpu takes a lock file per process.
"""

import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT

PREFIX = ROOT / ".aot"
HAS_LIBTPU = (PREFIX / "libtpu").is_dir()
HAS_CUDA_PLUGIN = (PREFIX / "jax_plugins" / "xla_cuda12").is_dir()

SHARDED = """
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
import kernels
rng = np.random.default_rng(0)
b, L, H, Pd, G, S = 8, 40, 4, 16, 2, 16
x = rng.normal(size=(b, L, H, Pd)).astype(np.float32)
dt = rng.uniform(0.01, 0.1, (b, L, H)).astype(np.float32)
A = -rng.uniform(1, 4, H).astype(np.float32)
B, C = (rng.normal(size=(b, L, G, S)).astype(np.float32) for _ in range(2))
D = rng.normal(size=H).astype(np.float32)
mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
batch = NamedSharding(mesh, P(("data", "fsdp")))

def loss(x, impl):
  y = kernels.ssd(x, dt, A, B, C, D, chunk_size=16, impl=impl, interpret=True)
  return (y * y).sum(), y

(_, y_ref), g_ref = jax.value_and_grad(loss, has_aux=True)(x, "reference")
for impl in ("pallas_tpu", "pallas_gpu"):
  def on_mesh(x, impl=impl):  # as sharding.jit_step traces a training step
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return loss(x, impl)
  step = jax.jit(jax.value_and_grad(on_mesh, has_aux=True), in_shardings=batch)
  (_, y), g = step(x)
  text = step.lower(x).as_text()
  print(impl, float(np.abs(y - y_ref).max()), float(np.abs(g - g_ref).max() / np.abs(g_ref).max()),
        text.count("sdy.manual_computation"))
# 'auto' on a CPU mesh: the XLA scan, no kernel call and no manual region
text = jax.jit(lambda x: on_mesh(x, "auto")[1], in_shardings=batch).lower(x).as_text()
print("auto", int("tpu_custom_call" in text or "triton" in text), text.count("manual_computation"))
"""


def test_pallas_calls_run_in_a_shard_map_over_the_batch():
  env = dict(
    os.environ,
    PYTHONPATH=str(ROOT),
    JAX_PLATFORMS="cpu",
    XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8",
  )
  proc = subprocess.run(
    [sys.executable, "-c", SHARDED], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [line.split() for line in proc.stdout.splitlines()]
  assert [r[0] for r in rows] == ["pallas_tpu", "pallas_gpu", "auto"]
  assert rows.pop() == ["auto", "0", "0"]
  for _, value_err, grad_err, manual in rows:
    assert float(value_err) < 1e-4 and float(grad_err) < 1e-4
    assert int(manual) >= 1  # the kernel's call sits inside a manual (shard_map) region


def aot(tmp_path, *flags):
  return subprocess.run(
    [sys.executable, "-m", "linearizer.aot", "--config", "configs/demo.py:smoke", *flags],
    cwd=ROOT,
    env=dict(os.environ, PYTHONPATH=str(ROOT), TMPDIR=str(tmp_path)),
    capture_output=True,
    text=True,
    timeout=600,  # against a hung compile (a compile takes about a minute here)
  )


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not in .aot/ (make aot)")
def test_the_smoke_steps_compile_for_a_four_chip_tpu(tmp_path):
  """Every training stage of the smoke config compiles, partitioned over v5e:2x2; the
  students' steps hold the Pallas TPU kernel (chosen for the target, not this CPU host)."""
  out = tmp_path / "aot.json"
  proc = aot(tmp_path, "--topology", "v5e:2x2", "--out", str(out))
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  assert proc.stderr.strip() == "", proc.stderr[-2000:]  # libtpu's start-up noise goes to a log
  rows = json.loads(out.read_text())["stages"]
  assert list(rows) == ["train_teacher", "distill", "finetune", "train_student"]
  assert rows["train_teacher"]["kernels"] == ["xla"]  # a ViT: no SSD
  for stage in ("distill", "finetune", "train_student"):
    assert rows[stage]["kernels"] == ["pallas_tpu"], stage
  for row in rows.values():
    assert row["images_per_chip"] == 4 and row["fits"]  # the smoke batch 16 over 4 chips
    assert 0 < row["total_bytes"] < row["memory_bytes"] == 16 * 2**30


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not in .aot/ (make aot)")
def test_the_packed_distillation_step_compiles_for_a_four_chip_tpu(tmp_path):
  """Packed batches (issue 43): 16 rows of 64 patches, 4 images a row at most, the segment
  ids sharded with the rows into the Pallas TPU kernel's shard_map."""
  out = tmp_path / "packed.json"
  packed = ["--config.data.packing=True", "--config.data.sequence_length=64"]
  proc = aot(
    tmp_path, "--topology", "v5e:2x2", "--config.stages=('distill',)", *packed, "--out", str(out)
  )
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  row = json.loads(out.read_text())["stages"]["distill"]
  assert row["kernels"] == ["pallas_tpu"] and row["fits"] and row["images_per_chip"] == 4


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not in .aot/ (make aot)")
def test_a_step_that_does_not_fit_or_a_bad_topology_is_one_error(tmp_path):
  proc = aot(
    tmp_path,
    "--topology",
    "v5e:2x2",
    "--config.stages=('distill',)",
    "--config.distill.batch_size=262144",
  )
  assert proc.returncode == 2, proc.stderr[-3000:]
  (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
  assert "[distill]" in line and "v5e:2x2" in line and "memory" in line, line
  assert "batch_size" in line and "Traceback" not in proc.stderr
  proc = aot(tmp_path, "--topology", "v9:2x2")
  assert proc.returncode == 2 and proc.stderr.startswith("error: --topology 'v9:2x2'")


@pytest.mark.skipif(not HAS_CUDA_PLUGIN, reason="jax-cuda12-plugin is not in .aot/ (make aot)")
def test_the_distill_step_compiles_for_an_eight_gpu_node(tmp_path):
  """Partitioned over h100:1x1x8 with the Pallas GPU (Triton) kernel inside; a batch whose
  step needs more than JAX gives a program (75% of an H100) is refused by name."""
  distill = ("--config.stages=('distill',)",)
  out = tmp_path / "aot.json"
  proc = aot(tmp_path, "--topology", "h100:1x1x8", *distill, "--out", str(out))
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  assert proc.stderr.strip() == "", proc.stderr[-2000:]  # the plugin's start-up lines: a log
  row = json.loads(out.read_text())["stages"]["distill"]
  assert row["kernels"] == ["pallas_gpu"] and row["images_per_chip"] == 2 and row["fits"]
  assert row["memory_bytes"] == int(0.75 * 84929347584)
  proc = aot(tmp_path, "--topology", "h100:1x1x8", *distill, "--config.distill.batch_size=4194304")
  assert proc.returncode == 2, proc.stderr[-3000:]
  (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
  assert "[distill] needs" in line and "h100:1x1x8" in line and "59.32 GiB" in line, line


SERVE_ON_TPU = """
import os, tempfile
import jax, jax.numpy as jnp, numpy as np
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from linearizer import models, serving
student = models.build("adventurer", "Ti/8", image_size=32, depth=2)
out = serving.export_student(student, os.path.join(tempfile.mkdtemp(), "export"))
with open(os.path.join(out, serving.PLATFORM_FILES["tpu"]), "rb") as f:
  exported = jax.export.deserialize(bytearray(f.read()))
topology = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu")
chip = NamedSharding(Mesh(np.array(topology.devices[:1]), ("x",)), P())
images = jax.ShapeDtypeStruct((8, 32, 32, 3), jnp.float32)
compiled = jax.jit(exported.call, in_shardings=chip, out_shardings=chip).lower(images).compile()
print(compiled.as_text().count("tpu_custom_call"))
"""


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not in .aot/ (make aot)")
def test_the_exported_students_tpu_file_compiles_for_a_tpu_chip(tmp_path):
  """An export made on this CPU host serves on a TPU with the Pallas kernel: its TPU file,
  deserialised, compiles for a v5e chip with the Mosaic calls (one per Mamba-2 block)."""
  env = dict(
    os.environ,
    PYTHONPATH=f"{ROOT}{os.pathsep}{PREFIX}",
    JAX_PLATFORMS="cpu",
    ALLOW_MULTIPLE_LIBTPU_LOAD="1",
    TPU_WORKER_HOSTNAMES="localhost",
    TMPDIR=str(tmp_path),
  )
  proc = subprocess.run(
    [sys.executable, "-c", SERVE_ON_TPU],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert int(proc.stdout.split()[-1]) == 2  # depth 2: two Mamba-2 blocks, one kernel call each
