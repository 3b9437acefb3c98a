"""Tests of the Pallas GPU (Triton) SSD kernel, kernels/pallas_gpu.py.

On a CPU the kernels run in the Pallas interpreter (interpret=True); the test marked
`accelerator` runs them compiled on a GPU. Oracles: the float64 NumPy loop of
tests/models/test_ssd.py, the XLA impl, and the reference scan.

Tolerances (stated once, used below):
  float32 values vs float64 loop and vs xla:  max |y - y_ref| <= 1e-4 * max |y_ref|
  float32 grads vs jax.grad of xla/reference: max |g - g_ref| <= 1e-4 * max |g_ref|
                                              per input (x, dt, A, B, C, D)
  bf16 inputs vs float32 on the same (bf16-rounded) inputs:
    values                                    <= 2e-2 * max |y_f32|
    grads (cotangent bf16-rounded as well)    <= 2e-2 * max |g_f32| per input
  Measured in interpret mode (L 198 and 785): float32 values <= 7e-7, grads <= 2e-6;
  bf16 values 4e-3 and grads <= 7e-3, the same as the XLA impl run in bf16.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.pallas_gpu import ssd_pallas_gpu, unsupported_reason
from kernels.reference import ssd_reference
from kernels.xla import ssd_xla
from test_ssd import ssd_loop64

RTOL = 1e-4
BF16_RTOL = 2e-2
BF16_GRAD_RTOL = 2e-2
BATCH = 2
ARGS = ("x", "dt", "A", "B", "C", "D")


def make_inputs(L, G=1, H=4, P=16, S=16, seed=0, batch=BATCH):
  """As tests/test_ssd.make_inputs, with Triton-sized P and S (powers of two >= 16)."""
  r = np.random.default_rng(seed)

  def f(*shape):
    return r.normal(size=shape).astype(np.float32)

  dt = np.log1p(np.exp(f(batch, L, H) - 2)).astype(np.float32)
  A = -np.exp(r.uniform(-3, 1, H)).astype(np.float32)
  return dict(x=f(batch, L, H, P), dt=dt, A=A, B=f(batch, L, G, S), C=f(batch, L, G, S), D=f(H))


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)


@functools.lru_cache(maxsize=None)
def jitted(fn, chunk_size, interpret=True):
  kw = dict(interpret=interpret) if fn is ssd_pallas_gpu else {}
  return jax.jit(functools.partial(fn, chunk_size=chunk_size, **kw))


def value_and_grads(fn, chunk_size, inp, w, interpret=True):
  """y = fn(**inp) and d/d(every input given) of sum(w * y), in one compiled call."""
  names = [k for k in ARGS if inp.get(k) is not None]
  kw = dict(interpret=interpret) if fn is ssd_pallas_gpu else {}

  def loss(*args):
    y = fn(**dict(inp, **dict(zip(names, args))), chunk_size=chunk_size, **kw)
    return jnp.sum(w * y.astype(jnp.float32)), y

  (_, y), g = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(names))), has_aux=True))(
    *(inp[k] for k in names)
  )
  return y, dict(zip(names, g))


def exact(fn, *args, **kwargs):
  """An oracle in float32 without TF32 passes (XLA's default for float32 on GPUs)."""
  with jax.default_matmul_precision("highest"):
    return fn(*args, **kwargs)


def check_values(inp, chunk_size, interpret=True):
  y = jitted(ssd_pallas_gpu, chunk_size, interpret)(**inp)
  assert y.shape == inp["x"].shape and y.dtype == jnp.float32
  assert rel_err(y, ssd_loop64(**inp)) <= RTOL
  assert rel_err(y, exact(jitted(ssd_xla, chunk_size), **inp)) <= RTOL


def check_grads(inp, chunk_size, oracle=ssd_xla, interpret=True, seed=1):
  w = jnp.asarray(np.random.default_rng(seed).normal(size=inp["x"].shape), jnp.float32)
  y, got = value_and_grads(ssd_pallas_gpu, chunk_size, inp, w, interpret)
  y_want, want = exact(value_and_grads, oracle, chunk_size, inp, w)
  assert rel_err(y, y_want) <= RTOL
  for k in want:
    assert got[k].shape == want[k].shape and got[k].dtype == want[k].dtype, k
    assert np.all(np.isfinite(got[k])), k
    assert rel_err(got[k], want[k]) <= RTOL, (k, rel_err(got[k], want[k]))


def check_bf16(inp, chunk_size, interpret=True):
  bf = {k: jnp.asarray(v, jnp.bfloat16) for k, v in inp.items()}
  f32 = {k: v.astype(jnp.float32) for k, v in bf.items()}  # same values, exact in f32
  w = jnp.asarray(np.random.default_rng(9).normal(size=inp["x"].shape), jnp.bfloat16)
  y, got = value_and_grads(ssd_pallas_gpu, chunk_size, bf, w, interpret)
  y_want, want = exact(value_and_grads, ssd_xla, chunk_size, f32, w.astype(jnp.float32))
  assert y.dtype == jnp.bfloat16 and y.shape == inp["x"].shape
  assert rel_err(y.astype(jnp.float32), y_want) <= BF16_RTOL
  for k in want:
    assert got[k].dtype == jnp.bfloat16 and np.all(np.isfinite(got[k].astype(jnp.float32))), k
    assert rel_err(got[k].astype(jnp.float32), want[k]) <= BF16_GRAD_RTOL, (
      k,
      rel_err(got[k].astype(jnp.float32), want[k]),
    )


# ---------------------------------------------------------------- values


@pytest.mark.parametrize(
  "L,G,H,chunk_size",
  [
    (1, 1, 4, 64),  # one token, padded to a 16-token chunk
    (63, 2, 4, 16),  # 4 chunks, the last padded by one token
    (198, 2, 4, 64),  # the production chunk, 4 chunks
    (198, 1, 8, 48),  # chunk 48 runs as 32
    (198, 2, 6, 256),  # chunk 256 runs as 64 (MAX_CHUNK)
  ],
)
def test_matches_float64_loop_and_xla(L, G, H, chunk_size):
  check_values(make_inputs(L, G, H), chunk_size)


def test_headdim_64_dstate_64():
  check_values(make_inputs(198, G=1, H=2, P=64, S=64, seed=3), 64)


def test_mixed_headdim_dstate():
  check_values(make_inputs(70, G=1, H=2, P=32, S=64, seed=4), 32)


def test_without_D():
  inp = dict(make_inputs(100, G=2, seed=1), D=None)
  y = jitted(ssd_pallas_gpu, 32)(**inp)
  assert rel_err(y, ssd_loop64(**inp)) <= RTOL


@pytest.mark.slow
@pytest.mark.parametrize("G", [1, 2])
def test_long_sequence(G):
  check_values(make_inputs(785, G, seed=5), 64)


# ---------------------------------------------------------------- gradients


def test_grads_match_xla():
  check_grads(make_inputs(198, G=2, H=4, seed=6), 64)


def test_grads_match_reference_padded_chunks():
  check_grads(make_inputs(63, G=2, H=4, seed=7), 16, oracle=ssd_reference)


def test_grads_headdim_64_dstate_64():
  check_grads(make_inputs(100, G=1, H=2, P=64, S=64, seed=8), 64)


def test_grads_without_D():
  inp = dict(make_inputs(70, G=1, H=2, seed=9), D=None)
  check_grads(inp, 32)


def test_grads_finite_with_extreme_decays():
  # Decays that underflow to 0 and decays ~1, with padding: masked segment sums
  # must not leak inf * 0 = NaN into values or gradients.
  inp = make_inputs(70, G=1, H=2, seed=10)
  inp["dt"][:, :, 0] = 50.0
  inp["dt"][:, :, 1] = 1e-6
  inp["A"][0] = -100.0
  w = jnp.ones(inp["x"].shape, jnp.float32)
  y, got = value_and_grads(ssd_pallas_gpu, 32, inp, w)
  _, want = value_and_grads(ssd_xla, 32, inp, w)
  assert np.all(np.isfinite(y))
  for k in ARGS:
    assert np.all(np.isfinite(got[k])), k
    assert rel_err(got[k], want[k]) <= RTOL, (k, rel_err(got[k], want[k]))


@pytest.mark.slow
def test_grads_long_sequence():
  check_grads(make_inputs(785, G=2, H=4, seed=11), 64)


def test_backward_is_a_pallas_kernel():
  inp = make_inputs(40, G=1, H=2)
  args = [inp[k] for k in ARGS]

  def f(*a):
    return ssd_pallas_gpu(*a, chunk_size=16, interpret=True)

  y, vjp = jax.vjp(f, *args)
  fwd_text = str(jax.make_jaxpr(lambda *a: jax.vjp(f, *a)[0])(*args))
  bwd_text = str(jax.make_jaxpr(vjp)(y))
  assert "pallas_call" in fwd_text and "ssd_gpu_fwd" in fwd_text
  assert "pallas_call" in bwd_text and "ssd_gpu_bwd" in bwd_text


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_forward_and_backward_lower_to_triton(dtype):
  # Cross-lowering for CUDA needs no GPU: it runs the Pallas Triton lowering of both
  # kernels (op support, power-of-two tiles, dot shapes), here with the production
  # head shape, a padded length and G = 2. Compiling the Triton IR needs a GPU.
  def sd(*shape, d=dtype):
    return jax.ShapeDtypeStruct(shape, d)

  avals = (
    sd(2, 197, 4, 64),
    sd(2, 197, 4),
    sd(4, d=jnp.float32),
    sd(2, 197, 2, 64),
    sd(2, 197, 2, 64),
    sd(4, d=jnp.float32),
  )

  def fwd_bwd(*args):
    y, vjp = jax.vjp(functools.partial(ssd_pallas_gpu, chunk_size=256), *args)
    return vjp(y)

  hlo = jax.jit(fwd_bwd).trace(*avals).lower(lowering_platforms=("cuda",)).as_text()
  assert hlo.count("triton") >= 2


# ---------------------------------------------------------------- bf16


def test_bf16_values_and_grads():
  check_bf16(make_inputs(198, G=2, H=4, seed=12), 64)


def test_bf16_headdim_64_dstate_64():
  check_bf16(make_inputs(70, G=1, H=2, P=64, S=64, seed=13), 32)


# ---------------------------------------------------------------- errors


def test_unsupported_shapes_give_one_clear_error():
  assert unsupported_reason((2, 197, 24, 64), (2, 197, 1, 64), 256, jnp.bfloat16) is None
  assert unsupported_reason((2, 10, 4, 16), (2, 10, 2, 16), 16, "float32") is None
  cases = [
    (make_inputs(10, P=8), 64, jnp.float32, r"headdim P = 8 must be a power of two"),
    (make_inputs(10, P=48), 64, jnp.float32, r"headdim P = 48 must be a power of two"),
    (make_inputs(10, S=256), 64, jnp.float32, r"d_state S = 256 must be a power of two"),
    (make_inputs(10), 8, jnp.float32, r"chunk_size = 8 must be an int >= 16"),
    (make_inputs(10), 64, jnp.float16, r"dtype float16 is not supported"),
  ]
  for inp, chunk_size, dtype, msg in cases:
    inp = {k: v.astype(dtype) if k == "x" else v for k, v in inp.items()}
    reason = unsupported_reason(inp["x"].shape, inp["B"].shape, chunk_size, dtype)
    assert reason is not None and "\n" not in reason
    with pytest.raises(ValueError, match=msg):
      ssd_pallas_gpu(**inp, chunk_size=chunk_size, interpret=True)
    with pytest.raises(ValueError, match=msg):  # at trace time, under jit too
      jax.jit(functools.partial(ssd_pallas_gpu, chunk_size=chunk_size, interpret=True))(**inp)


# ---------------------------------------------------------------- on a GPU


@pytest.mark.accelerator
def test_compiled_on_gpu():
  if jax.default_backend() != "gpu":
    pytest.skip("needs a GPU (jax.default_backend() is not 'gpu')")
  for L, G, H, P, S in [(197, 1, 8, 64, 64), (785, 2, 4, 64, 64), (63, 2, 4, 16, 32)]:
    inp = make_inputs(L, G, H, P, S, seed=L)
    check_values(inp, 64, interpret=False)
    check_grads(inp, 64, interpret=False)
    check_bf16(inp, 64, interpret=False)
  check_grads(dict(make_inputs(100, 2, 4, 64, 64), D=None), 32, interpret=False)
