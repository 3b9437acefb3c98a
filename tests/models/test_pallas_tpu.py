"""Tests of the Pallas TPU (Mosaic) SSD kernel, kernels/pallas_tpu.py, in TPU
interpret mode on CPU (interpret=True -> pltpu.InterpretParams(), which models
VMEM scratch, SMEM and the sequential grid; scratch starts as NaN, so a missing
state reset would show). A last test lowers the kernels for TPU (Mosaic MLIR)
without a TPU, which catches primitives Mosaic cannot lower and bad blocks.

Tolerances (errors are max |a - b| / max |b| over the whole array):
  f32 values vs the float64 loop and vs ssd_xla:      1e-4   (measured ~2e-7)
  f32 grads (x, dt, A, B, C, D) vs jax.grad of ssd_xla
    and of ssd_reference:                              1e-4   (measured ~1e-6)
  bf16 values vs f32 on the same bf16-rounded inputs:  2e-2   (measured ~4e-3, as xla)
  bf16 grads vs f32 reference grads on those inputs:   2e-2   (measured ~8e-3, as xla)
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import rel_err
from kernels.pallas_tpu import _head_blocks, ssd_pallas_tpu, unsupported_reason
from kernels.reference import ssd_reference
from kernels.xla import ssd_xla
from test_ssd import make_inputs, ssd_loop64

RTOL = 1e-4
BF16_RTOL = 2e-2
BF16_GRAD_RTOL = 2e-2
ARGS = ("x", "dt", "A", "B", "C", "D")


def inputs(L, G, nh, P=8, S=16, seed=0, with_D=True):
  """Inputs as in test_ssd.make_inputs, for any head count and sizes."""
  if (P, S) == (8, 16):
    inp = make_inputs(L, G, seed=seed, nh=nh)
  else:
    r = np.random.default_rng(seed)

    def f(*shape):
      return r.normal(size=shape).astype(np.float32)

    inp = dict(
      x=f(2, L, nh, P),
      dt=np.log1p(np.exp(f(2, L, nh) - 2)).astype(np.float32),
      A=-np.exp(r.uniform(-3, 1, nh)).astype(np.float32),
      B=f(2, L, G, S) / np.sqrt(S),
      C=f(2, L, G, S),
      D=f(nh),
    )
  if not with_D:
    inp["D"] = None
  return inp


@functools.lru_cache(maxsize=None)
def kernel(chunk_size, impl="pallas_tpu"):
  if impl == "xla":
    return jax.jit(functools.partial(ssd_xla, chunk_size=chunk_size))
  return jax.jit(functools.partial(ssd_pallas_tpu, chunk_size=chunk_size, interpret=True))


@functools.lru_cache(maxsize=None)
def grad_fn(impl, chunk_size, with_D):
  """Jitted d/d(inputs) of sum(w * y) for one impl (compiled once per shape)."""
  fn = {
    "pallas_tpu": functools.partial(ssd_pallas_tpu, interpret=True),
    "xla": ssd_xla,
    "reference": ssd_reference,
  }[impl]

  def loss(w, x, dt, A, B, C, D):
    y = fn(x, dt, A, B, C, D if with_D else None, chunk_size=chunk_size)
    return jnp.sum(w * y.astype(jnp.float32))

  return jax.jit(jax.grad(loss, argnums=(1, 2, 3, 4, 5, 6) if with_D else (1, 2, 3, 4, 5)))


def grads(impl, chunk_size, inp, w):
  with_D = inp["D"] is not None
  D = inp["D"] if with_D else jnp.zeros_like(inp["A"])
  args = [inp[k] for k in ARGS[:5]] + [D]
  return dict(zip(ARGS, grad_fn(impl, chunk_size, with_D)(w, *args)))


def as_bf16(inp):
  return {k: None if v is None else jnp.asarray(v, jnp.bfloat16) for k, v in inp.items()}


def as_f32(inp):
  return {k: None if v is None else jnp.asarray(v, jnp.float32) for k, v in inp.items()}


# ---------------------------------------------------------------- values

VALUE_CASES = [  # (L, G, heads, with D, chunk_size)
  (1, 1, 4, True, 64),
  (63, 2, 4, False, 64),  # one padded chunk
  (198, 2, 4, True, 64),  # 4 chunks, the last padded
  (198, 1, 8, True, 256),  # 2 head blocks per group, one chunk of 200
  pytest.param(785, 2, 4, True, 64, marks=pytest.mark.slow),
  pytest.param(785, 1, 2, False, 128, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("L, G, nh, with_D, chunk_size", VALUE_CASES)
def test_values_match_float64_loop_and_xla(L, G, nh, with_D, chunk_size):
  inp = inputs(L, G, nh, with_D=with_D)
  y = kernel(chunk_size)(**inp)
  assert y.shape == (2, L, nh, 8) and y.dtype == jnp.float32
  assert rel_err(y, ssd_loop64(**inp)) <= RTOL
  assert rel_err(y, kernel(chunk_size, "xla")(**inp)) <= RTOL


def test_headdim_64_dstate_64_values_and_grads():
  # The production shape (headdim 64, d_state 64), 3 chunks of 128, the last padded.
  inp = inputs(300, 1, 2, P=64, S=64, seed=8)
  y = kernel(128)(**inp)
  assert rel_err(y, ssd_loop64(**inp)) <= RTOL
  w = jnp.asarray(np.random.default_rng(9).normal(size=y.shape), jnp.float32)
  got, want = grads("pallas_tpu", 128, inp, w), grads("xla", 128, inp, w)
  for k in ARGS:
    assert rel_err(got[k], want[k]) <= RTOL, (k, rel_err(got[k], want[k]))


def test_bf16_close_to_f32():
  bf = as_bf16(inputs(198, 2, 4, seed=7))
  y = kernel(64)(**bf)
  assert y.dtype == jnp.bfloat16 and y.shape == (2, 198, 4, 8)
  want = kernel(64, "xla")(**as_f32(bf))  # the same rounded inputs, in f32
  assert rel_err(y.astype(jnp.float32), want) <= BF16_RTOL


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("nh, G, with_D", [(4, 2, True), (8, 1, False)])
def test_grads_match_xla_and_reference(nh, G, with_D):
  # L = 100 with chunk 32: 4 chunks, the last one padded. (8 heads, G = 1):
  # two head blocks per group, whose dB, dC partial sums the wrapper adds.
  inp = inputs(100, G, nh, seed=2, with_D=with_D)
  w = jnp.asarray(np.random.default_rng(3).normal(size=(2, 100, nh, 8)), jnp.float32)
  got = grads("pallas_tpu", 32, inp, w)
  assert ("D" in got) == with_D
  for impl in ("xla", "reference"):
    want = grads(impl, 32, inp, w)
    for k in got:
      assert got[k].shape == want[k].shape and got[k].dtype == want[k].dtype, k
      assert rel_err(got[k], want[k]) <= RTOL, (impl, k, rel_err(got[k], want[k]))


@pytest.mark.slow
def test_grads_match_reference_long():
  inp = inputs(785, 2, 4, seed=12)
  w = jnp.asarray(np.random.default_rng(13).normal(size=(2, 785, 4, 8)), jnp.float32)
  got, want = grads("pallas_tpu", 64, inp, w), grads("reference", 64, inp, w)
  for k in ARGS:
    assert rel_err(got[k], want[k]) <= RTOL, (k, rel_err(got[k], want[k]))


def test_bf16_grads_close_to_f32_reference():
  bf = as_bf16(inputs(100, 2, 4, seed=10))
  w = jnp.asarray(np.random.default_rng(11).normal(size=(2, 100, 4, 8)), jnp.float32)
  got = grads("pallas_tpu", 32, bf, w)
  want = grads("reference", 32, as_f32(bf), w)
  for k in ARGS:
    assert got[k].dtype == jnp.bfloat16, k
    assert rel_err(got[k], want[k]) <= BF16_GRAD_RTOL, (k, rel_err(got[k], want[k]))


def test_grads_finite_with_extreme_decays():
  # Decays that underflow to 0 (dt |A| = 5000) and ones ~1 (dt = 1e-6), with padding:
  # no inf * 0 = NaN may reach values or gradients. Same shapes as above: no recompile.
  inp = inputs(100, 2, 4, seed=6)
  inp["dt"][:, :, 0] = 50.0
  inp["dt"][:, :, 1] = 1e-6
  inp["A"][0] = -100.0
  g = grads("pallas_tpu", 32, inp, jnp.ones((2, 100, 4, 8), jnp.float32))
  for k in ARGS:
    assert np.all(np.isfinite(g[k])), k
  want = grads("xla", 32, inp, jnp.ones((2, 100, 4, 8), jnp.float32))
  for k in ARGS:
    assert rel_err(g[k], want[k]) <= RTOL, (k, rel_err(g[k], want[k]))


def _pallas_call_names(jaxpr):
  """Names of every pallas_call in a (closed) jaxpr, nested ones included."""
  names = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call":
      info = eqn.params.get("name_and_src_info", eqn.params.get("name"))
      names.append(str(getattr(info, "name", info)))
    else:
      for sub in _sub_jaxprs(eqn.params):
        names += _pallas_call_names(sub)
  return names


def _sub_jaxprs(params):
  for v in params.values():
    for u in v if isinstance(v, (tuple, list)) else [v]:
      if hasattr(u, "eqns"):
        yield u
      elif hasattr(u, "jaxpr") and hasattr(u.jaxpr, "eqns"):
        yield u.jaxpr


def test_backward_is_the_pallas_kernel():
  inp = inputs(63, 2, 4)
  args = [inp[k] for k in ARGS]
  f = functools.partial(ssd_pallas_tpu, chunk_size=32, interpret=True)

  def value_and_vjp(args, ct):
    y, vjp = jax.vjp(f, *args)
    return y, vjp(ct)

  jaxpr = jax.make_jaxpr(value_and_vjp)(args, jnp.ones((2, 63, 4, 8))).jaxpr  # traced only
  calls = [e for e in jaxpr.eqns if e.primitive.name == "pallas_call"]
  assert _pallas_call_names(jaxpr) == ["ssd_tpu_fwd", "ssd_tpu_bwd"]
  # The forward saves y and only the state entering each chunk: f32 (batch, nc, H, P, S).
  assert [(v.aval.shape, v.aval.dtype) for v in calls[0].outvars] == [
    ((2, 4, 64, 8), jnp.float32),
    ((2, 2, 4, 8, 16), jnp.float32),
  ]
  # No scan over tokens or chunks outside the kernels: the walk is their sequential grid.
  prims = {e.primitive.name for e in jaxpr.eqns}
  assert not prims & {"scan", "while"}, prims


# ---------------------------------------------------------------- the model's layout

TOKEN_MAJOR_CASES = [  # (L, G, heads, P, chunk_size): hb * P fills 128-lane rows, or one group
  (300, 2, 4, 64, 128),  # 2 heads a step (128 lanes), 3 chunks, the last ragged
  (256, 1, 4, 32, 64),  # 4 heads a step, L a multiple of the chunk (no ragged block)
  (37, 1, 4, 16, 64),  # all H heads a step (the full lane dim), one ragged chunk of 48
]


@pytest.mark.parametrize("L, G, nh, P, chunk_size", TOKEN_MAJOR_CASES)
def test_token_major_layout_values_and_grads(L, G, nh, P, chunk_size):
  """Where a block of heads fills whole lane rows the kernel reads x and writes y, dx in
  the model's own (batch, L, H * P) layout, unpadded: the ragged last chunk's rows past L
  are masked in the kernel (interpret mode fills them with garbage, so a missing mask
  shows), and nothing is transposed or padded around the call."""
  assert _head_blocks(nh, G, P)[1]
  inp = inputs(L, G, nh, P=P, S=16, seed=4)
  y = kernel(chunk_size)(**inp)
  assert rel_err(y, ssd_loop64(**inp)) <= RTOL
  w = jnp.asarray(np.random.default_rng(5).normal(size=y.shape), jnp.float32)
  got, want = grads("pallas_tpu", chunk_size, inp, w), grads("reference", chunk_size, inp, w)
  for k in ARGS:
    assert rel_err(got[k], want[k]) <= RTOL, (k, rel_err(got[k], want[k]))
  args = [inp[k] for k in ARGS]
  jaxpr = jax.make_jaxpr(functools.partial(ssd_pallas_tpu, chunk_size=chunk_size))(*args)
  prims = {e.primitive.name for e in jaxpr.eqns}
  # x goes in and y comes out by reshapes alone (only dt, B and C are laid out for it)
  assert [e.primitive.name for e in jaxpr.eqns].count("transpose") == 3, prims


def test_head_major_layout_where_heads_do_not_fill_lanes():
  assert _head_blocks(4, 2, 8) == (2, False)  # 16 lanes a step, not the whole 32
  assert _head_blocks(24, 1, 64) == (4, True)  # Adventurer-B: 4 heads, 256 lanes
  assert _head_blocks(6, 1, 64) == (2, True)  # Adventurer-Ti: 2 heads, 128 lanes


# ---------------------------------------------------------------- errors and lowering


@pytest.mark.parametrize(
  "x_shape, B_shape, chunk_size, dtype, match",
  [
    ((2, 64, 4, 8), (2, 64, 2, 16), 100, jnp.float32, "chunk_size 100 must be a multiple of 8"),
    ((2, 64, 4, 8), (2, 64, 2, 16), 8, jnp.bfloat16, "multiple of 16 \\(for bfloat16\\)"),
    ((2, 64, 4, 8), (2, 64, 2, 16), 512, jnp.float32, "at most 256"),
    ((2, 64, 4, 12), (2, 64, 2, 16), 64, jnp.float32, "headdim P = 12"),
    ((2, 64, 4, 8), (2, 64, 2, 1024), 64, jnp.float32, "d_state S = 1024"),
    ((2, 64, 4, 8), (2, 64, 2, 16), 64, jnp.float16, "dtype float16 unsupported"),
  ],
)
def test_unsupported_shapes_give_clear_error(x_shape, B_shape, chunk_size, dtype, match):
  reason = unsupported_reason(x_shape, B_shape, chunk_size, dtype)
  assert reason is not None and reason.startswith("pallas_tpu: ") and "\n" not in reason
  batch, L, nh, _ = x_shape
  args = (
    jnp.zeros(x_shape, dtype),
    jnp.ones((batch, L, nh), dtype),
    -jnp.ones((nh,), dtype),
    jnp.zeros(B_shape, dtype),
    jnp.zeros(B_shape, dtype),
  )
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(functools.partial(ssd_pallas_tpu, chunk_size=chunk_size), *args)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_supported_shapes(dtype):
  for chunk in (32, 64, 128, 256):
    assert unsupported_reason((8, 1025, 12, 64), (8, 1025, 1, 64), chunk, dtype) is None
  assert unsupported_reason((2, 7, 4, 8), (2, 7, 2, 16), 16, dtype) is None


@pytest.mark.parametrize(
  "L, nh, G, P, S, chunk_size, dtype",
  [
    (1000, 12, 1, 64, 64, 256, jnp.bfloat16),  # production: headdim 64, d_state 64
    (1000, 12, 1, 64, 64, 128, jnp.float32),
    (63, 6, 2, 8, 16, 64, jnp.float32),
    (63, 4, 2, 64, 16, 64, jnp.bfloat16),  # token-major, ragged
  ],
)
def test_lowers_to_mosaic_for_tpu(L, nh, G, P, S, chunk_size, dtype):
  # Forward and backward lowered for TPU from this CPU-only machine: every op in
  # the kernels has a Mosaic lowering and every block obeys the (8, 128) rule.
  x = jax.ShapeDtypeStruct((2, L, nh, P), dtype)
  dt = jax.ShapeDtypeStruct((2, L, nh), dtype)
  hv = jax.ShapeDtypeStruct((nh,), dtype)
  B = jax.ShapeDtypeStruct((2, L, G, S), dtype)

  def loss(*a):
    return jnp.sum(ssd_pallas_tpu(*a, chunk_size=chunk_size).astype(jnp.float32))

  lowered = (
    jax.jit(jax.value_and_grad(loss, argnums=tuple(range(6))))
    .trace(x, dt, hv, B, B, hv)
    .lower(lowering_platforms=("tpu",))
  )
  assert lowered.as_text().count("tpu_custom_call") == 2  # forward, backward
