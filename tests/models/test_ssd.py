"""Tests of kernels.ssd (method.md §6 step 4) against an independent float64 NumPy loop,
and against the second oracle, the L x L form `ssd_quadratic` (kernels/reference.py).

Tolerances (stated once, used below):
  float32 impls vs float64:     max |y - y64| <= 1e-4 * max |y64|
  ssd_quadratic in float64 vs the float64 loop: <= 1e-12 (the same map, exactly)
  float32 grads vs finite diffs: relative 1e-4 on directional derivatives
  xla vs reference grads:        max |g_xla - g_ref| <= 1e-4 * max |g_ref| per input
  bf16 inputs vs float32:        max |y_bf16 - y_f32| <= 2e-2 * max |y_f32|
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import rel_err
from kernels import (
  IMPLS,
  Implementation,
  chunk_for,
  chunk_run,
  ssd,
  ssd_matrix,
  ssd_quadratic,
  ssd_reference,
)
from kernels import xla as kernels_xla

RTOL = 1e-4
RTOL64 = 1e-12
BF16_RTOL = 2e-2
BATCH, H, P, S = 2, 4, 8, 16


def ssd_loop64(x, dt, A, B, C, D):
  """method.md §6 step 4 as written, token by token, in float64 (the oracle)."""
  x, dt, A, B, C = (np.asarray(v, np.float64) for v in (x, dt, A, B, C))
  batch, L, nh, hp = x.shape
  per_group = nh // B.shape[2]
  s = np.zeros((batch, nh, hp, B.shape[3]))
  y = np.empty_like(x)
  for t in range(L):
    B_t = np.repeat(B[:, t], per_group, axis=1)  # head h uses group h // per_group
    C_t = np.repeat(C[:, t], per_group, axis=1)
    s = (
      np.exp(dt[:, t] * A)[:, :, None, None] * s
      + (dt[:, t, :, None] * x[:, t])[..., None] * B_t[:, :, None, :]
    )
    y[:, t] = np.einsum("bhpn,bhn->bhp", s, C_t)
    if D is not None:
      y[:, t] += np.asarray(D, np.float64)[:, None] * x[:, t]
  return y


def make_inputs(L, G, seed=0, nh=H):
  """dt = softplus(normal - 2), A = -exp(U[-3, 1]): some heads decay slowly, so
  state really crosses chunk boundaries; others decay fast."""
  r = np.random.default_rng(seed)

  def f(*shape):
    return r.normal(size=shape).astype(np.float32)

  dt = np.log1p(np.exp(f(BATCH, L, nh) - 2)).astype(np.float32)
  A = -np.exp(r.uniform(-3, 1, nh)).astype(np.float32)
  return dict(x=f(BATCH, L, nh, P), dt=dt, A=A, B=f(BATCH, L, G, S), C=f(BATCH, L, G, S), D=f(nh))


@functools.lru_cache(maxsize=None)
def oracle(L, G):
  return ssd_loop64(**make_inputs(L, G))


@functools.lru_cache(maxsize=None)
def jitted(impl, chunk_size):
  return jax.jit(functools.partial(ssd, impl=impl, chunk_size=chunk_size))


# ---------------------------------------------------------------- values


@pytest.mark.parametrize("impl", ["reference", "xla"])
@pytest.mark.parametrize("G", [1, 2])
@pytest.mark.parametrize("L", [1, 63, 198, 785])
@pytest.mark.parametrize("chunk_size", [64, 256])
def test_matches_float64_loop(impl, G, L, chunk_size):
  y = jitted(impl, chunk_size)(**make_inputs(L, G))
  assert y.shape == (BATCH, L, H, P) and y.dtype == jnp.float32
  assert rel_err(y, oracle(L, G)) <= RTOL


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_without_D_and_auto(impl):
  inp = make_inputs(100, 2, seed=1)
  want = ssd_loop64(**{**inp, "D": None})
  assert rel_err(ssd(**{**inp, "D": None}, impl=impl, chunk_size=32), want) <= RTOL
  np.testing.assert_array_equal(
    ssd(**inp, impl="auto", chunk_size=32), ssd(**inp, impl="xla", chunk_size=32)
  )


# ---------------------------------------------------------------- the quadratic form

quadratic = jax.jit(ssd_quadratic)


@pytest.mark.parametrize("G", [1, 2, 4])
@pytest.mark.parametrize("L", [1, 63, 198])
@pytest.mark.parametrize("with_D", [True, False])
def test_quadratic_in_float64_is_the_float64_loop(G, L, with_D):
  """M[t, s] = (C_t . B_s) exp(A sum_{r=s+1..t} dt_r) dt_s is the scan's discretisation."""
  inp = make_inputs(L, G, seed=8)
  if not with_D:
    inp["D"] = None
  with jax.enable_x64(True):
    y = quadratic(**{k: None if v is None else v.astype(np.float64) for k, v in inp.items()})
    assert y.dtype == jnp.float64
  assert rel_err(y, ssd_loop64(**inp)) <= RTOL64


@pytest.mark.parametrize("G", [1, 2, 4])
@pytest.mark.parametrize("L", [1, 63, 198, 785])
def test_quadratic_matches_reference_and_xla(G, L):
  inp = make_inputs(L, G, seed=9)
  y = quadratic(**inp)
  assert y.shape == (BATCH, L, H, P) and y.dtype == jnp.float32
  assert rel_err(y, jax.jit(ssd_reference)(**inp)) <= RTOL
  assert rel_err(jitted("xla", 64)(**inp), y) <= RTOL


def test_matrix_is_lower_triangular_and_shared_within_a_group():
  L, G = 30, 2
  inp = make_inputs(L, G, seed=10)
  M = np.asarray(ssd_matrix(inp["dt"], inp["A"], inp["B"], inp["C"]))
  assert M.shape == (BATCH, H, L, L) and M.dtype == np.float32
  assert np.all(M[..., ~np.tril(np.ones((L, L), bool))] == 0)  # exactly 0 above
  # On the diagonal nothing has decayed yet: (C_t . B_t) dt_t, with head h on group h // 2.
  cb = np.einsum("btgn,btgn->bgt", inp["C"], inp["B"]).repeat(H // G, axis=1)
  want = cb * np.moveaxis(inp["dt"], 1, -1)
  np.testing.assert_allclose(np.diagonal(M, axis1=-2, axis2=-1), want, rtol=1e-5, atol=1e-6)


def test_quadratic_grads_finite_with_extreme_decays():
  # exp(-inf) above the diagonal, underflowing and ~1 decays below: no inf * 0 = NaN.
  inp = make_inputs(40, 1, seed=6)
  inp["dt"][:, :, 0] = 50.0
  inp["dt"][:, :, 1] = 1e-6
  inp["A"][0] = -100.0
  args = [inp[k] for k in ARGS]
  g = jax.jit(jax.grad(lambda *a: jnp.sum(ssd_quadratic(*a)), argnums=tuple(range(6))))(*args)
  for k, v in zip(ARGS, g):
    assert np.all(np.isfinite(v)), k


def test_implementation_literal_names_every_impl():
  assert set(Implementation.__args__) == {*IMPLS, "auto"}


# ---------------------------------------------------------------- gradients

ARGS = ("x", "dt", "A", "B", "C", "D")


def grads(impl, chunk_size, inp, w):
  """d/d(every input) of the linear functional sum(w * y)."""

  def f(*args):
    return jnp.sum(w * ssd(*args, impl=impl, chunk_size=chunk_size))

  return jax.jit(jax.grad(f, argnums=tuple(range(6))))(*(inp[k] for k in ARGS))


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_grads_match_finite_differences_of_float64_loop(impl):
  # L = 63 with chunk 16: 4 chunks, the last one padded by one token.
  L, G = 63, 2
  inp = make_inputs(L, G, seed=2, nh=2)
  r = np.random.default_rng(3)
  w = r.normal(size=(BATCH, L, 2, P))
  g = dict(zip(ARGS, grads(impl, 16, inp, jnp.asarray(w, jnp.float32))))

  def loss64(d):
    return np.sum(w * ssd_loop64(**d))

  eps = 1e-6
  for k in ARGS:
    v = r.normal(size=inp[k].shape)  # directional derivative along v
    plus = {**inp, k: inp[k] + eps * v}
    minus = {**inp, k: inp[k] - eps * v}
    fd = (loss64(plus) - loss64(minus)) / (2 * eps)
    ad = np.sum(np.asarray(g[k], np.float64) * v)
    assert np.all(np.isfinite(g[k])), k
    assert abs(ad - fd) <= RTOL * max(abs(fd), 1.0), (k, ad, fd)


@pytest.mark.parametrize("L", [198, 785])
def test_xla_grads_match_reference(L):
  inp = make_inputs(L, 2, seed=4)
  w = jnp.asarray(np.random.default_rng(5).normal(size=(BATCH, L, H, P)), jnp.float32)
  g_ref = grads("reference", 64, inp, w)
  g_xla = grads("xla", 64, inp, w)
  for k, a, b in zip(ARGS, g_xla, g_ref):
    assert np.all(np.isfinite(a)), k
    assert rel_err(a, b) <= RTOL, (k, rel_err(a, b))


def test_xla_grads_finite_with_extreme_decays():
  # Huge dt * |A| (decays underflow to 0) and tiny dt (decays ~1), with padding:
  # the masked segment sums must not leak inf * 0 = NaN into gradients.
  inp = make_inputs(70, 1, seed=6)
  inp["dt"][:, :, 0] = 50.0
  inp["dt"][:, :, 1] = 1e-6
  inp["A"][0] = -100.0
  w = jnp.ones((BATCH, 70, H, P), jnp.float32)
  for k, g in zip(ARGS, grads("xla", 32, inp, w)):
    assert np.all(np.isfinite(g)), k
  assert np.all(np.isfinite(ssd(**inp, impl="xla", chunk_size=32)))


@pytest.mark.parametrize(
  "L, G, chunk_size, with_D",
  [(1, 1, 16, True), (63, 2, 16, True), (64, 1, 16, False), (37, 1, 64, True)],
)
def test_xla_hand_written_backward_is_autodiffs(L, G, chunk_size, with_D):
  # The custom_vjp against JAX's autodiff of the same forward: one chunk, several with the
  # last padded, an exact multiple, G = 2, no D.
  inp = make_inputs(L, G, seed=8)
  w = jnp.asarray(np.random.default_rng(9).normal(size=(BATCH, L, H, P)), jnp.float32)
  args = [inp[k] for k in ARGS[:5]] + [inp["D"] if with_D else None]
  argnums = tuple(range(6 if with_D else 5))

  def g(f):
    loss = lambda *a: jnp.sum(w * f(*a, chunk_size=chunk_size))
    return jax.jit(jax.grad(loss, argnums))(*args)

  for k, a, b in zip(ARGS, g(kernels_xla.ssd_xla), g(kernels_xla.ssd_xla_autodiff)):
    assert a.dtype == b.dtype and a.shape == b.shape, k
    if not np.any(b):  # L = 1: no decay is applied, so A's gradient is exactly zero
      assert not np.any(a), k
      continue
    assert rel_err(a, b) <= 1e-5, (k, rel_err(a, b))


def test_xla_backward_keeps_only_inputs_and_chunk_states():
  # What the forward hands the backward: the six inputs and one (P x S) state per chunk
  # and head, nothing of size L x chunk (autodiff keeps the chunk's decay matrices).
  L, chunk = 1026, 64
  inp = {k: jnp.asarray(v) for k, v in make_inputs(L, 1, seed=10).items()}
  states = BATCH * (-(-L // chunk)) * H * P * S * 4

  def saved_bytes(f):
    _, backward = jax.vjp(functools.partial(f, chunk_size=chunk), *(inp[k] for k in ARGS))
    return sum(v.nbytes for v in jax.tree.leaves(backward))

  inputs = sum(v.nbytes for v in inp.values())
  assert saved_bytes(kernels_xla.ssd_xla) <= inputs + states
  assert saved_bytes(kernels_xla.ssd_xla_autodiff) > inputs + states + BATCH * L * H * chunk * 4


def test_xla_bf16_grads_close_to_f32():
  inp = make_inputs(198, 2, seed=11)
  bf = {k: jnp.asarray(v, jnp.bfloat16) for k, v in inp.items()}
  w = jnp.asarray(np.random.default_rng(12).normal(size=(BATCH, 198, H, P)), jnp.float32)
  g_bf = grads("xla", 64, bf, w)
  g_32 = grads("xla", 64, {k: v.astype(jnp.float32) for k, v in bf.items()}, w)
  for k, a, b in zip(ARGS, g_bf, g_32):
    assert a.dtype == jnp.bfloat16, k
    assert rel_err(a.astype(jnp.float32), b) <= BF16_RTOL, (k, rel_err(a, b))


# ---------------------------------------------------------------- bf16


def test_xla_bf16_close_to_f32():
  inp = make_inputs(198, 2, seed=7)
  bf = {k: jnp.asarray(v, jnp.bfloat16) for k, v in inp.items()}
  y = jitted("xla", 64)(**bf)
  assert y.dtype == jnp.bfloat16 and y.shape == (BATCH, 198, H, P)
  # Same (bf16-rounded) inputs in float32: measures the op's bf16 error only.
  want = jitted("xla", 64)(**{k: v.astype(jnp.float32) for k, v in bf.items()})
  assert rel_err(y.astype(jnp.float32), want) <= BF16_RTOL


# ---------------------------------------------------------------- errors


def test_errors():
  inp = make_inputs(10, 2)
  choices = "'auto', 'pallas_gpu', 'pallas_tpu', 'reference', 'xla'"
  with pytest.raises(ValueError, match=rf"impl='fast'.*{choices}"):
    ssd(**inp, impl="fast")
  for impl in ("pallas_tpu", "pallas_gpu"):  # on this CPU, only in interpret mode
    with pytest.raises(ValueError, match=rf"impl='{impl}' compiles for a .PU.*interpret=True"):
      ssd(**inp, impl=impl)
  bad = {
    "x": np.zeros((BATCH, 10, H)),
    "dt": np.zeros((BATCH, 11, H)),
    "A": np.zeros((H + 1,)),
    "B": np.zeros((BATCH, 10, 3, S)),  # H = 4 not divisible by G = 3
    "C": np.zeros((BATCH, 10, 2, S + 1)),
    "D": np.zeros((1,)),
  }
  for name, value in bad.items():
    shape = str(value.shape).replace("(", r"\(").replace(")", r"\)")
    with pytest.raises(ValueError, match=rf"ssd: {name} has shape {shape}, expected"):
      ssd(**{**inp, name: value})
  with pytest.raises(ValueError, match="chunk_size"):
    ssd(**inp, chunk_size=-1)


def test_chunk_size_0_takes_the_measured_table():
  """chunk_size=0: CHUNK_TABLE's chunk for the backend and length (on a CPU one chunk up
  to 128 tokens, 32 above; 64 for ONNX Runtime), 256 on a backend nobody measured; the
  same output as asking for it."""
  assert chunk_for(1, "cpu") == chunk_for(128, "cpu") == 128
  assert chunk_for(129, "cpu") == chunk_for(16386, "cpu") == 32
  assert chunk_for(51, "onnxruntime") == chunk_for(16386, "onnxruntime") == 64
  assert chunk_for(4098, "gpu") == chunk_for(4098, "tpu") == chunk_for(9, "cuda") == 256
  # What runs: pallas_gpu caps the chunk at a power of two <= 64; the others cut it to L.
  assert chunk_run("pallas_gpu", 256, 4098) == chunk_run("pallas_gpu", 100, 4098) == 64
  assert chunk_run("xla", 256, 4098) == 256 and chunk_run("pallas_tpu", 256, 51) == 51
  inputs = make_inputs(150, 1)
  here = chunk_for(150)  # this backend's
  np.testing.assert_array_equal(
    ssd(**inputs, chunk_size=0, impl="xla"), ssd(**inputs, chunk_size=here, impl="xla")
  )


def test_auto_picks_the_backends_pallas_kernel_when_it_takes_the_shapes():
  """impl='auto': the Pallas kernel of the backend for supported shapes, else xla."""
  from kernels import pick_impl

  x = jnp.zeros((2, 100, 24, 64), jnp.bfloat16)
  B = jnp.zeros((2, 100, 1, 64), jnp.bfloat16)
  assert pick_impl(x, B, 256, backend="tpu") == "pallas_tpu"
  assert pick_impl(x, B, 256, backend="gpu") == "pallas_gpu"
  assert pick_impl(x, B, 256, backend="cuda") == "pallas_gpu"
  assert pick_impl(x, B, 256, backend="cpu") == "xla"
  odd = jnp.zeros((2, 100, 24, 12), jnp.float32)  # headdim 12: neither kernel takes it
  assert pick_impl(odd, B, 256, backend="tpu") == "xla"
  assert pick_impl(odd, B, 256, backend="gpu") == "xla"
  assert pick_impl(x, B, 500, backend="tpu") == "xla"  # chunk above the TPU kernel's cap
  assert pick_impl(x.astype(jnp.float16), B, 64, backend="gpu") == "xla"
  # On this CPU, auto is xla: exactly its output.
  inputs = make_inputs(63, 1)
  np.testing.assert_array_equal(
    ssd(**inputs, chunk_size=16), ssd(**inputs, chunk_size=16, impl="xla")
  )


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
def test_pallas_impl_refuses_unsupported_shapes_by_name(impl):
  inputs = make_inputs(20, 1)
  inputs["x"] = np.zeros((BATCH, 20, H, 12), np.float32)  # headdim 12
  with pytest.raises(ValueError, match="headdim"):
    ssd(**inputs, chunk_size=16, impl=impl, interpret=True)


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_pallas_kernels_refuse_shapes_past_int32_offsets(backend):
  """Shapes only, never run: an array past 2³¹ - 1 elements would be indexed at wrapped
  int32 offsets (silently wrong output, state-spaces/mamba#1015), so the kernel refuses it
  by name and impl='auto' takes the XLA scan."""
  from kernels import pallas_gpu, pallas_tpu, pick_impl

  unsupported = {"tpu": pallas_tpu, "gpu": pallas_gpu}[backend].unsupported_reason
  shape = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)
  # 64 tokens (one chunk), 16 heads of 64: x holds batch · 2¹⁶ elements, the largest array.
  fits, past = shape(32767, 64, 16, 64), shape(32768, 64, 16, 64)
  groups = lambda x: shape(x.shape[0], 64, 1, 16)
  assert unsupported(fits.shape, groups(fits).shape, 64, jnp.bfloat16) is None
  reason = unsupported(past.shape, groups(past).shape, 64, jnp.bfloat16)
  assert "x (" in reason and "2,147,483,648 elements" in reason and "int32" in reason
  assert pick_impl(fits, groups(fits), 64, backend=backend) == f"pallas_{backend}"
  assert pick_impl(past, groups(past), 64, backend=backend) == "xla"
  # Adventurer-B/16 at 2048² (16,386 tokens, 24 heads): batch 32 fits, 128 does not.
  adv = lambda b: (shape(b, 16386, 24, 64), shape(b, 16386, 1, 64))
  assert pick_impl(*adv(32), 64, backend=backend) == f"pallas_{backend}"
  assert pick_impl(*adv(128), 64, backend=backend) == "xla"
