"""Tests of linearizer.sharding: sharded steps equal the one-device step, on one or two hosts.

Equivalence runs go through tests/sharded_run.py in subprocesses, which is where JAX can be
given 8 simulated CPU devices, or started as two `jax.distributed` processes on localhost
(gloo CPU collectives). Each run makes 3 distillation and/or supervised steps (AdamW with
clipping and an EMA, dropout and drop path, random masks, mixup/cutmix) of a tiny ViT
teacher and Adventurer student on a fixed global batch of 16 images.

Tolerances (stated once, used below):
  loss of every step:                 relative |a - b| / |b| <= 1e-5
  after 3 steps, each of the parameters, the EMA, Adam's mu and Adam's nu as a whole:
                                      relative ||a - b||_2 / ||b||_2 <= 1e-5
  each single leaf of those:          relative ||a - b||_2 / ||b||_2 <= 1e-3
  step counters:                      exact
Why the looser per-leaf bound: AdamW divides by sqrt(v), so an element whose gradient is a
near-cancelling sum (summed in another order across devices) moves by a visibly different
fraction of the learning rate; on the zero-initialised biases, after three full-lr steps,
this reaches ~1e-4 of the leaf's norm while the whole parameter set agrees to ~1e-6. A
sharding bug (a gradient not reduced over an axis, rows or random keys mixed up) moves a
leaf by O(1) and the losses by far more than 1e-5.
"""

import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from configs import common
from helpers import ROOT
from linearizer import optim, sharding, train

SCRIPT = str(ROOT / "tests" / "sharded_run.py")
RTOL = 1e-5
LEAF_RTOL = 1e-3
TIMEOUT_S = 300  # per run of sharded_run.py: a hang fails the test instead of blocking


# ---------------------------------------------------------------------------------------
# Running tests/sharded_run.py.
# ---------------------------------------------------------------------------------------
def _env():
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
  env["JAX_PLATFORMS"] = "cpu"
  for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    env.pop(key, None)
  return env


def _launch(args, log):
  return subprocess.Popen(
    [sys.executable, SCRIPT, *args], cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT
  )


def _run(tmp_path, name, meshes, devices, num_processes=1):
  """Runs sharded_run.py (in `num_processes` processes) and returns its .npz as a dict."""
  out = str(tmp_path / f"{name}.npz")
  args = ["--devices", str(devices), "--out", out] + [a for m in meshes for a in ("--mesh", m)]
  if num_processes > 1:
    with socket.socket() as s:  # a free port for the coordinator
      s.bind(("localhost", 0))
      port = s.getsockname()[1]
    args += ["--coordinator", f"localhost:{port}", "--num_processes", str(num_processes)]
  logs = [tmp_path / f"{name}.{i}.log" for i in range(num_processes)]
  procs, deadline = [], time.monotonic() + TIMEOUT_S
  try:
    for i, log in enumerate(logs):
      with open(log, "w") as f:
        extra = ["--process_id", str(i)] if num_processes > 1 else []
        procs.append(_launch(args + extra, f))
    # Wait for all; stop early when one fails (its peers would wait for it until timeout).
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
      if any(p.poll() for p in procs):
        break
      time.sleep(0.5)
  finally:
    for p in procs:  # only the processes started here, by their handle
      if p.poll() is None:
        p.kill()
        p.wait()
  if any(p.returncode for p in procs):  # killed ones too (negative)
    tails = "\n".join(
      f"--- process {i} (rc {p.returncode}):\n" + log.read_text()[-4000:]
      for i, (p, log) in enumerate(zip(procs, logs))
    )
    pytest.fail(f"sharded_run.py failed (or ran past {TIMEOUT_S}s):\n{tails}")
  with np.load(out) as f:
    return dict(f)


@pytest.fixture(scope="module")
def one_host(tmp_path_factory):
  """One process with 8 CPU devices: one device, data=8, and data=2 × fsdp=4 (the packed
  distillation on the first two)."""
  meshes = ["1x1", "8x1", "2x4:distill,supervised"]
  return _run(tmp_path_factory.mktemp("one_host"), "one_host", meshes, 8)


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory):
  """Two jax.distributed processes with 4 CPU devices each (8 in all).

  1x-1 resolves to fsdp=8, so FSDP gathers and gradient reductions cross the processes;
  2x4 puts the data axis across them.
  """
  return _run(
    tmp_path_factory.mktemp("two_hosts"),
    "two_hosts",
    ["1x-1:distill", "2x4:supervised"],
    4,
    num_processes=2,
  )


def _group(leaf):
  """Which whole the tolerance applies to: 'params', 'ema', 'mu', 'nu' (or the leaf itself)."""
  parts = leaf.split("/")
  for name in ("mu", "nu"):
    if name in parts:
      return name
  return parts[0] if parts[0] in ("params", "ema") else leaf


def assert_same_run(results, mesh, ref, ref_mesh, kind):
  """Losses per step and every saved leaf of `mesh` match those of `ref_mesh`."""
  loss, ref_loss = results[f"{mesh}/{kind}/loss"], ref[f"{ref_mesh}/{kind}/loss"]
  assert loss.shape == ref_loss.shape == (3,)
  np.testing.assert_allclose(
    loss, ref_loss, rtol=RTOL, atol=0, err_msg=f"{kind} loss per step, {mesh} vs {ref_mesh}"
  )
  prefix, ref_prefix = f"{mesh}/{kind}/", f"{ref_mesh}/{kind}/"
  leaves = {k[len(prefix) :] for k in results if k.startswith(prefix)} - {"loss"}
  ref_leaves = {k[len(ref_prefix) :] for k in ref if k.startswith(ref_prefix)} - {"loss"}
  assert leaves == ref_leaves
  diff2, norm2, leaf_err = {}, {}, {}
  for k in sorted(leaves):
    a, b = results[prefix + k], ref[ref_prefix + k]
    assert a.shape == b.shape and a.dtype == b.dtype, k
    if np.issubdtype(b.dtype, np.integer):  # step counters
      np.testing.assert_array_equal(a, b, err_msg=k)
      continue
    a, b = a.astype(np.float64), b.astype(np.float64)
    d2, n2 = np.sum((a - b) ** 2), np.sum(b**2)
    g = _group(k)
    diff2[g], norm2[g] = diff2.get(g, 0.0) + d2, norm2.get(g, 0.0) + n2
    leaf_err[k] = np.sqrt(d2 / max(n2, 1e-300))
  assert set(diff2) == {"params", "ema", "mu", "nu"}, sorted(diff2)
  for g in diff2:
    err = np.sqrt(diff2[g] / norm2[g])
    assert err <= RTOL, f"{kind}, {mesh} vs {ref_mesh}: {g} differ by {err:.2e} relative"
  worst = max(leaf_err, key=leaf_err.get)
  assert leaf_err[worst] <= LEAF_RTOL, (
    f"{kind}, {mesh} vs {ref_mesh}: {worst} differs by {leaf_err[worst]:.2e} relative"
  )
  # The steps really trained: the loss moved and the first moments are non-zero.
  assert ref_loss[0] != ref_loss[-1]
  assert np.sqrt(norm2["mu"]) > 0


# ---------------------------------------------------------------------------------------
# Equivalence: one host with 8 devices, and two hosts.
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
  "mesh, kind",
  [("8x1", "distill"), ("8x1", "supervised"), ("8x1", "packed")]
  + [("2x4", "distill"), ("2x4", "supervised")],
)
def test_sharded_step_matches_one_device(one_host, mesh, kind):
  assert list(one_host[f"{mesh}/mesh"]) == [int(v) for v in mesh.split("x")]
  assert list(one_host["1x1/mesh"]) == [1, 1]
  assert_same_run(one_host, mesh, one_host, "1x1", kind)


@pytest.mark.parametrize("mesh,kind", [("1x-1", "distill"), ("2x4", "supervised")])
def test_two_processes_match_one_process(two_hosts, one_host, mesh, kind):
  assert list(two_hosts["1x-1/mesh"]) == [1, 8]  # -1 counts every process's devices
  assert list(two_hosts["2x4/mesh"]) == [2, 4]
  assert_same_run(two_hosts, mesh, one_host, "1x1", kind)


# ---------------------------------------------------------------------------------------
# Unit tests: rules, FSDP placement, meshes.
# ---------------------------------------------------------------------------------------
MESH = AbstractMesh((2, 4), ("data", "fsdp"))
NO_FSDP = AbstractMesh((8, 1), ("data", "fsdp"))


def test_rules_take_precedence_first_match_wins():
  rules = [(r"embed/kernel$", (None, "fsdp")), (r"kernel$", ()), (r"bias$", ("data",))]
  big = (512, 1024)
  # A matching rule decides, even for arrays FSDP would split another way or not at all.
  assert sharding.spec_for("patch_embed/kernel", big, MESH, rules) == P(None, "fsdp")
  assert sharding.spec_for("layers/0/mlp/kernel", big, MESH, rules) == P()
  assert sharding.spec_for("head/bias", (8,), MESH, rules, fsdp_min_size=2**30) == P("data")
  # Rules are regexes searched in the path: anywhere unless anchored.
  assert sharding.spec_for("layers/0/mlp/w1/kernel", big, MESH, [(r"mlp", ("fsdp",))]) == P("fsdp")
  assert sharding.spec_for("x/kernel/scale", big, MESH, rules) == P(None, "fsdp")  # no match


def test_large_arrays_split_over_fsdp_on_largest_divisible_dim():
  spec = lambda shape, **kw: sharding.spec_for("w", shape, MESH, fsdp_min_size=1024, **kw)
  assert spec((64, 392)) == P(None, "fsdp")
  assert spec((392, 64)) == P("fsdp", None)
  assert spec((3, 64, 392, 5)) == P(None, None, "fsdp", None)
  assert spec((390, 64)) == P(None, "fsdp")  # largest (390) not divisible by 4
  assert spec((64, 64)) == P("fsdp", None)  # ties: the first such dimension
  assert spec((4096,)) == P("fsdp")
  assert spec((33, 35)) == P()  # nothing divisible: replicated
  assert spec((32, 32)) == P("fsdp", None)  # exactly fsdp_min_size elements
  assert spec((31, 32)) == P()  # below fsdp_min_size


def test_small_arrays_scalars_and_no_fsdp_axis_replicated():
  assert sharding.spec_for("step", (), MESH, fsdp_min_size=1) == P()
  assert sharding.spec_for("b", (256,), MESH) == P()  # default threshold 2**18
  assert sharding.spec_for("w", (1024, 1024), NO_FSDP) == P()
  assert sharding.spec_for("w", (512, 1024), MESH) == P(None, "fsdp")


class _Tiny(nnx.Module):
  def __init__(self, rngs):
    self.dense = nnx.Linear(64, 128, rngs=rngs)  # kernel 8192 elements: split
    self.out = nnx.Linear(128, 8, rngs=rngs)  # kernel 1024: split; biases small
    self.norm = nnx.LayerNorm(128, rngs=rngs)
    self.drop = nnx.Dropout(0.1, rngs=rngs)


def test_tree_shardings_moments_follow_their_params():
  tx = optim.make_optimizer(common.optim(ema_decay=0.9), 1)
  _, state = train.init_state(_Tiny(nnx.Rngs(0)), tx, ema=True)
  shardings = sharding.tree_shardings(state, MESH, fsdp_min_size=1024)
  assert all(isinstance(s, NamedSharding) and s.mesh == MESH for s in jax.tree.leaves(shardings))
  specs = {optim.path_str(p): s.spec for p, s in jax.tree_util.tree_leaves_with_path(shardings)}
  params = {k[len("params/") :]: v for k, v in specs.items() if k.startswith("params/")}
  assert params == {
    "dense/kernel": P(None, "fsdp"),
    "dense/bias": P(),
    "out/kernel": P("fsdp", None),
    "out/bias": P(),
    "norm/scale": P(),
    "norm/bias": P(),
  }
  moments = 0
  for k, spec in specs.items():
    if k.startswith("opt_state/"):
      if "/mu/" in k or "/nu/" in k:  # Adam's moments: exactly like their parameter
        assert spec == params[k.split("/mu/" if "/mu/" in k else "/nu/", 1)[1]], k
        moments += 1
      else:  # counts
        assert spec == P(), k
    if k.startswith("ema/"):
      assert spec == params[k[len("ema/") :]], k
  assert moments == 2 * len(params)
  assert specs["step"] == P()
  assert all(v == P() for k, v in specs.items() if k.startswith("rest/"))


def test_make_mesh_sizes_and_errors():
  n = len(jax.devices())
  assert dict(sharding.make_mesh().shape) == {"data": n, "fsdp": 1}
  assert dict(sharding.make_mesh(-1, 1).shape) == {"data": n, "fsdp": 1}
  assert dict(sharding.make_mesh(1, -1).shape) == {"data": 1, "fsdp": n}
  one = jax.devices()[:1]
  mesh = sharding.make_mesh(1, 1, devices=one)
  assert dict(mesh.shape) == {"data": 1, "fsdp": 1} and list(mesh.devices.flat) == one
  # Auto axes on both paths: steps see plain arrays, not sharding-typed ones.
  assert sharding.make_mesh().axis_types == (AxisType.Auto, AxisType.Auto)
  assert mesh.axis_types == (AxisType.Auto, AxisType.Auto)
  with pytest.raises(ValueError, match="At most one"):
    sharding.make_mesh(-1, -1)
  with pytest.raises(ValueError, match=f"does not cover the {n} devices"):
    sharding.make_mesh(n + 1, 1)
  with pytest.raises(ValueError, match="does not cover the 1 devices"):
    sharding.make_mesh(1, 2, devices=one)
  with pytest.raises(ValueError, match="does not cover"):
    sharding.make_mesh(2, -1, devices=one)  # -1 resolves to 0
  for bad in ((0, 1), (1, 0), (-1, 0), (0, -1), (-2, 1)):
    with pytest.raises(ValueError, match="positive"):
      sharding.make_mesh(*bad, devices=one)


def test_initialize_distributed_is_a_noop_for_one_process(monkeypatch):
  for key in (
    "JAX_COORDINATOR_ADDRESS",
    "JAX_NUM_PROCESSES",
    "JAX_PROCESS_ID",
    "SLURM_NTASKS",
    "OMPI_COMM_WORLD_SIZE",
    "TPU_WORKER_ID",
    "MEGASCALE_COORDINATOR_ADDRESS",
  ):
    monkeypatch.delenv(key, raising=False)
  assert sharding.initialize_distributed() is False
  assert sharding.initialize_distributed("localhost:1234", 1, 0) is False
