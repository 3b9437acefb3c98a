"""2048² (16,386 tokens) works: the fast scan against the float64 sequential loop at that
length, values and gradients, the bf16 drift there, and the Adventurer students' forward
and forward+backward at 2048² on a CPU, batch 1, within memory (all slow: -m slow).

Figures (this 2-core CPU) are in docs/benchmarks.md, "2048²".
"""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import ROOT, rel_err
from kernels import ssd
from linearizer import models
from test_ssd import ARGS, RTOL, grads, make_inputs, ssd_loop64

pytestmark = pytest.mark.slow
L_2048 = (2048 // 16) ** 2 + 2  # patches, CLS and the heading average: the student's scan


@pytest.fixture(scope="module")
def long_inputs():
  return make_inputs(L_2048, 1, seed=7, nh=2)


def test_xla_scan_matches_the_float64_loop_at_16k_tokens(long_inputs):
  want = ssd_loop64(**long_inputs)
  got = jax.jit(lambda *a: ssd(*a, chunk_size=256, impl="xla"))(*(long_inputs[k] for k in ARGS))
  assert rel_err(got, want) <= RTOL, rel_err(got, want)


def test_xla_scan_gradients_match_float64_finite_differences_at_16k_tokens(long_inputs):
  inp = long_inputs
  r = np.random.default_rng(8)
  w = r.normal(size=inp["x"].shape)
  g = dict(zip(ARGS, grads("xla", 256, inp, jnp.asarray(w, jnp.float32))))
  eps = 1e-6
  for k in ARGS:
    v = r.normal(size=inp[k].shape)  # directional derivative along v
    fd = (
      np.sum(w * ssd_loop64(**{**inp, k: inp[k] + eps * v}))
      - np.sum(w * ssd_loop64(**{**inp, k: inp[k] - eps * v}))
    ) / (2 * eps)
    ad = np.sum(np.asarray(g[k], np.float64) * v)
    assert np.all(np.isfinite(g[k])), k
    assert abs(ad - fd) <= RTOL * max(abs(fd), 1.0), (k, ad, fd)


def test_bfloat16_drift_at_16k_tokens_stays_at_bfloat16_rounding(long_inputs):
  """bf16 inputs, f32 states and decays: the error does not grow along the sequence (the
  last tenth is no worse than the first), and stays at bf16's rounding (2⁻⁸ = 0.4%)."""
  bf16 = {k: jnp.asarray(v, jnp.bfloat16) if k in "xBC" else v for k, v in long_inputs.items()}
  want = ssd_loop64(**{k: np.asarray(v, np.float64) for k, v in bf16.items()})  # same inputs
  got = np.asarray(ssd(**bf16, chunk_size=256, impl="xla"), np.float64)
  err = np.abs(got - want) / np.abs(want).max()
  tenth = L_2048 // 10
  first, last = err[:, :tenth].max(), err[:, -tenth:].max()
  print(f"bf16 drift at L={L_2048}: max {err.max():.2e} (first tenth {first:.2e}, last {last:.2e})")
  assert err.max() < 2e-2 and last < 2 * first + 1e-3


def forward_and_backward_at_2048(variant: str, remat: bool) -> None:
  """Batch 1 at 2048²: finite tokens and gradients, the compiled training program inside
  this machine's memory (24 GiB)."""
  model = models.build(
    "adventurer", variant, image_size=2048, num_classes=0, chunk_size=64, remat=remat
  )
  graphdef, state = nnx.split(model)
  images = jax.random.uniform(jax.random.key(0), (1, 2048, 2048, 3))
  loss = lambda st: jnp.mean(nnx.merge(graphdef, st)(images).tokens ** 2)
  tokens = jax.jit(lambda st: nnx.merge(graphdef, st)(images).tokens)(state)
  assert tokens.shape == (1, L_2048 - 1, model.cfg.width) and bool(jnp.isfinite(tokens).all())
  step = jax.jit(jax.value_and_grad(loss)).lower(state).compile()
  memory = step.memory_analysis()
  held = memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
  print(f"Adventurer-{variant} fwd+bwd at 2048² (remat={remat}): {held / 2**30:.2f} GiB compiled")
  assert held < 16 * 2**30
  value, g = step(state)
  assert np.isfinite(float(value))
  assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(g))


def test_tiny_student_forward_and_backward_at_2048():
  forward_and_backward_at_2048("Ti/16", remat=False)  # 14.2 GiB as it is


def test_base_student_forward_and_backward_at_2048_with_remat():
  """B/16 would keep 43 GiB of activations, so it recomputes them (remat), in a process
  whose XLA:CPU uses the memory-minimising scheduler: the default one, which optimises for
  concurrency, keeps the recomputed activations alive anyway (41 GiB). The flag must be
  set before JAX starts, hence the process."""
  flags = (
    os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_concurrency_optimized_scheduler=false"
  )
  code = "import test_long_sequences as t; t.forward_and_backward_at_2048('B/16', remat=True)"
  path = [str(ROOT), str(ROOT / "tests"), *filter(None, [os.environ.get("PYTHONPATH")])]
  run = subprocess.run(
    [sys.executable, "-c", code],
    cwd=pathlib.Path(__file__).parent,  # (this file and test_ssd; helpers is one folder up)
    env=dict(os.environ, XLA_FLAGS=flags, PYTHONPATH=os.pathsep.join(path)),
    capture_output=True,
    text=True,
  )
  print(run.stdout)
  assert run.returncode == 0, run.stderr[-3000:]
