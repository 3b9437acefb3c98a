"""kernels.ssd with `segment_ids` (a packed sequence): each segment scans alone.

The oracle is the float64 NumPy loop of test_ssd.py run on each segment cut out of the
packed sequence; a packed run must equal it (values) and the gradients of a packed run
must equal those of each segment run alone (against the same impl unpacked, and the
hand-written xla backward against autodiff of its forward). Tolerances are test_ssd.py's:
values 1e-4 relative to the float64 loop, gradients 1e-4 relative, xla's backward 1e-5.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from helpers import rel_err
from kernels import ssd_quadratic
from kernels import xla as kernels_xla
from test_ssd import ARGS, BATCH, RTOL, H, P, make_inputs, ssd_loop64

ssd = functools.partial(kernels.ssd, interpret=True)  # Pallas impls in interpret mode here

IMPLS = ["reference", "xla", "pallas_tpu", "pallas_gpu"]

# Segment lengths per row of the batch (L = 61), for chunks of 16: shorter than a chunk,
# one token long, starting on a chunk boundary (16, 32) and off one, one exactly a chunk,
# and in the second row one spanning a whole chunk after a reset (16..52).
LENGTHS = ((5, 1, 10, 16, 20, 9), (16, 37, 8))
L = 61


def segment_ids(lengths=LENGTHS):
  """(BATCH, L) int32: row b holds segments of lengths[b] with ids 0, 1, 2, ..."""
  return np.stack([np.repeat(np.arange(len(row)), row) for row in lengths]).astype(np.int32)


def inputs(impl, L, G, seed):
  """make_inputs, with headdim 16 for pallas_gpu (its Triton tiles take P >= 16)."""
  inp = make_inputs(L, G, seed)
  if impl == "pallas_gpu":
    inp["x"] = np.concatenate([inp["x"], 0.5 * inp["x"][..., ::-1]], axis=-1)
  return inp


def per_segment_loop64(inp, ids):
  """The float64 loop on every segment of every row alone, pasted back in place."""
  y = np.empty(inp["x"].shape)
  for b in range(BATCH):
    for k in np.unique(ids[b]):
      where = np.flatnonzero(ids[b] == k)
      sl = slice(where[0], where[-1] + 1)
      one = {n: v[b : b + 1, sl] if v.ndim > 1 else v for n, v in inp.items()}
      y[b, sl] = ssd_loop64(**one)[0]
  return y


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("chunk_size", [16, 64])
@pytest.mark.parametrize("G", [1, 2])
def test_a_packed_sequence_is_each_segment_alone(impl, chunk_size, G):
  inp = inputs(impl, L, G, seed=20)
  ids = segment_ids()
  y = jax.jit(lambda ids, **a: ssd(**a, impl=impl, chunk_size=chunk_size, segment_ids=ids))(
    ids, **inp
  )  # (ssd here runs a Pallas impl in interpret mode)
  want = per_segment_loop64(inp, ids)
  assert rel_err(y, want) <= RTOL
  # and the state did cross a boundary without them: the test can fail
  assert rel_err(ssd(**inp, impl=impl, chunk_size=chunk_size), want) > 1e-2


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_an_id_that_comes_back_is_another_segment(impl):
  """Segments are runs: ids 0, 1, 0, 1 are four segments (ids need not be unique)."""
  inp = make_inputs(L, 1, seed=27)
  runs = segment_ids()
  reused = runs % 2  # 0, 1, 0, 1, ... where the runs are 0, 1, 2, 3, ...
  np.testing.assert_array_equal(
    ssd(**inp, impl=impl, chunk_size=16, segment_ids=reused),
    ssd(**inp, impl=impl, chunk_size=16, segment_ids=runs),
  )
  assert rel_err(ssd_quadratic(**inp, segment_ids=reused), per_segment_loop64(inp, runs)) <= RTOL


def test_the_quadratic_form_masks_across_segments():
  inp = make_inputs(L, 2, seed=21)
  ids = segment_ids()
  assert rel_err(ssd_quadratic(**inp, segment_ids=ids), per_segment_loop64(inp, ids)) <= RTOL


def test_one_segment_is_the_unpacked_path_bit_for_bit():
  inp = make_inputs(L, 2, seed=22)
  ones = np.zeros((BATCH, L), np.int32)
  for impl in ("reference", "xla"):
    np.testing.assert_array_equal(
      ssd(**inp, impl=impl, chunk_size=16, segment_ids=ones), ssd(**inp, impl=impl, chunk_size=16)
    )
  # The kernels' masks select the same numbers, but in interpret mode XLA compiles the two
  # kernel bodies separately (other fusions, other vectorised exp): rounding only.
  for impl in ("pallas_tpu", "pallas_gpu"):
    inp = inputs(impl, L, 2, seed=22)
    packed = ssd(**inp, impl=impl, chunk_size=16, segment_ids=ones)
    assert rel_err(packed, ssd(**inp, impl=impl, chunk_size=16)) <= 1e-6, impl


def seg_grads(f, inp, ids, w, chunk_size=16):
  loss = lambda *a: jnp.sum(w * f(*a, chunk_size=chunk_size, segment_ids=ids))
  return jax.jit(jax.grad(loss, tuple(range(6))))(*(inp[k] for k in ARGS))


@pytest.mark.parametrize("G", [1, 2])
def test_xla_hand_written_backward_is_autodiffs_when_packed(G):
  inp = make_inputs(L, G, seed=23)
  ids = jnp.asarray(segment_ids())
  w = jnp.asarray(np.random.default_rng(24).normal(size=(BATCH, L, H, P)), jnp.float32)
  hand = seg_grads(kernels_xla.ssd_xla, inp, ids, w)
  auto = seg_grads(kernels_xla.ssd_xla_autodiff, inp, ids, w)
  for k, a, b in zip(ARGS, hand, auto):
    assert np.all(np.isfinite(a)), k
    assert rel_err(a, b) <= 1e-5, (k, rel_err(a, b))


@pytest.mark.parametrize("impl", IMPLS)
def test_packed_gradients_are_each_segments_alone(impl):
  """d/d(inputs) of a packed run, against each segment alone (x, dt, B, C per token; A and D
  summed over the segments) through the same impl, or for a Pallas kernel through xla
  (one interpret-mode compile per segment length would cost ~40 s; the kernels' unpacked
  gradients equal xla's in test_pallas_tpu.py / test_pallas_gpu.py)."""
  inp = inputs(impl, L, 2, seed=25)
  ids = segment_ids()
  w = np.random.default_rng(26).normal(size=inp["x"].shape).astype(np.float32)
  f = lambda *a, chunk_size, segment_ids: ssd(
    *a, impl=impl, chunk_size=chunk_size, segment_ids=segment_ids
  )
  packed = dict(zip(ARGS, seg_grads(f, inp, jnp.asarray(ids), jnp.asarray(w))))
  want = {k: np.zeros(v.shape, np.float64) for k, v in inp.items()}
  for b in range(BATCH):
    for k in np.unique(ids[b]):
      where = np.flatnonzero(ids[b] == k)
      sl = slice(where[0], where[-1] + 1)
      one = {n: v[b : b + 1, sl] if v.ndim > 1 else v for n, v in inp.items()}
      one_impl = "xla" if impl.startswith("pallas") else impl
      alone = jax.jit(
        jax.grad(
          lambda wb, *a: jnp.sum(wb * ssd(*a, impl=one_impl, chunk_size=16)), tuple(range(1, 7))
        )
      )
      g = alone(w[b : b + 1, sl], *(one[n] for n in ARGS))  # one compile per length
      for n, gn in zip(ARGS, g):
        if inp[n].ndim > 1:
          want[n][b : b + 1, sl] = gn
        else:
          want[n] += np.asarray(gn, np.float64)
  for k in ARGS:
    assert rel_err(packed[k], want[k]) <= RTOL, (k, rel_err(packed[k], want[k]))


def test_segment_ids_of_the_wrong_shape_are_refused():
  inp = make_inputs(8, 1)
  with pytest.raises(ValueError, match=r"segment_ids has shape \(2, 7\)"):
    ssd(**inp, impl="xla", segment_ids=np.zeros((BATCH, 7), np.int32))
  with pytest.raises(ValueError, match="expected integers"):
    ssd(**inp, impl="xla", segment_ids=np.zeros((BATCH, 8), np.float32))


@pytest.mark.parametrize("platform, impl", [("tpu", "pallas_tpu"), ("cuda", "pallas_gpu")])
def test_packed_kernels_lower_for_their_chips(platform, impl):
  """Forward and backward with segment ids lowered for the chip from this CPU host (Mosaic
  for TPU, Triton for GPU), at the production head and state sizes in bfloat16."""
  x = jax.ShapeDtypeStruct((2, 300, 4, 64), jnp.bfloat16)
  B = jax.ShapeDtypeStruct((2, 300, 1, 64), jnp.bfloat16)
  dt = jax.ShapeDtypeStruct((2, 300, 4), jnp.float32)
  hv = jax.ShapeDtypeStruct((4,), jnp.float32)
  ids = jax.ShapeDtypeStruct((2, 300), jnp.int32)
  run = kernels.IMPLS[impl]

  def loss(x, dt, A, B, C, D, ids):
    y = run(x, dt, A, B, C, D, chunk_size=64, segment_ids=kernels.segment_runs(ids))
    return jnp.sum(y.astype(jnp.float32))

  grad = jax.jit(jax.grad(loss, argnums=tuple(range(6))))
  text = grad.trace(x, dt, hv, B, B, hv, ids).lower(lowering_platforms=(platform,)).as_text()
  assert text.count("tpu_custom_call" if platform == "tpu" else "triton") >= 2
