"""Blocked attention (linearizer/models/attention.py) against the plain formula in float64,
values and gradients, and the teacher's choice of implementation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linearizer import models
from linearizer.errors import UserError
from linearizer.models import attention
from linearizer.models.attention import blocked_attention


def reference(q, k, v):
  """softmax(q kᵀ / √d) v in float64 NumPy, (B, T, H, D)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  p = np.exp(s - s.max(-1, keepdims=True))
  return np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), v)


def reference_grads(q, k, v, g):
  """d<attention(q, k, v), g>/d(q, k, v) by hand (softmax's Jacobian), float64."""
  q, k, v, g = (np.asarray(x, np.float64) for x in (q, k, v, g))
  scale = 1 / np.sqrt(q.shape[-1])
  s = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  dv = np.einsum("bhqk,bqhd->bkhd", p, g)
  dp = np.einsum("bqhd,bkhd->bhqk", g, v)
  ds = p * (dp - (p * dp).sum(-1, keepdims=True)) * scale
  return np.einsum("bhqk,bkhd->bqhd", ds, k), np.einsum("bhqk,bqhd->bkhd", ds, q), dv


def draw(shape, seed, dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(seed), 4)
  return [2 * jax.random.normal(k, shape, dtype) for k in keys]


# (batch, tokens, heads, head_dim, block_q, block_k): tokens a multiple of neither block,
# unequal blocks, one block longer than the sequence.
SHAPES = [(2, 37, 3, 8, 8, 16), (1, 64, 2, 16, 64, 16), (1, 50, 1, 4, 512, 512)]


@pytest.mark.parametrize("b,t,h,d,bq,bk", SHAPES)
def test_values_and_gradients_match_float64(b, t, h, d, bq, bk):
  q, k, v, g = draw((b, t, h, d), seed=t)
  attend = lambda q, k, v: blocked_attention(q, k, v, block_q=bq, block_k=bk)
  np.testing.assert_allclose(attend(q, k, v), reference(q, k, v), rtol=0, atol=1e-5)
  grads = jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v) * g), (0, 1, 2))(q, k, v)
  for got, want in zip(grads, reference_grads(q, k, v, g)):
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.abs(want).max() * np.sqrt(t))


def test_as_close_to_float64_as_xla_is():
  """'Exact to f32 rounding': blocked's error is of the order of XLA's own."""
  q, k, v, _ = draw((2, 300, 4, 32), seed=1)
  want = reference(q, k, v)
  blocked = np.abs(blocked_attention(q, k, v, block_q=64, block_k=128) - want).max()
  xla = np.abs(jax.nn.dot_product_attention(q, k, v, implementation="xla") - want).max()
  assert blocked < 4 * xla + 1e-7, (blocked, xla)


def test_bfloat16_inputs_stay_close():
  q, k, v, _ = draw((1, 200, 2, 32), seed=2, dtype=jnp.bfloat16)
  got = blocked_attention(q, k, v, block_q=64, block_k=64)
  assert got.dtype == jnp.bfloat16
  xla = jax.nn.dot_product_attention(q, k, v, implementation="xla")
  want = reference(q, k, v)
  assert (
    np.abs(np.asarray(got, np.float64) - want).max()
    < 2 * np.abs(np.asarray(xla, np.float64) - want).max() + 1e-2
  )


def teacher(**overrides):
  return models.build("vit", "Ti/16", image_size=80, num_classes=0, depth=2, **overrides)


def test_teacher_with_blocked_attention_equals_xla():
  images = jax.random.uniform(jax.random.key(3), (2, 80, 80, 3))
  xla = teacher(attention_impl="xla")
  blocked = teacher(attention_impl="blocked", attention_block_q=8, attention_block_k=6)
  np.testing.assert_allclose(blocked(images).tokens, xla(images).tokens, rtol=0, atol=2e-5)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the switch is a CPU's")
@pytest.mark.parametrize("threshold,blocked", [(26, True), (27, False)])
def test_default_switches_to_blocked_from_the_configured_token_count(threshold, blocked):
  """None: 'blocked' on this CPU from blocked_attention_tokens on (26 tokens here), where
  its loop over key blocks shows in the program."""
  model = teacher(blocked_attention_tokens=threshold)
  program = str(jax.make_jaxpr(lambda x: model(x).tokens)(jnp.zeros((1, 80, 80, 3))))
  assert ("scan" in program) == blocked


@pytest.mark.parametrize(
  "field,value,message",
  [
    ("attention_impl", "flash", "expected None, 'xla', 'cudnn' or 'blocked'"),
    ("blocked_attention_tokens", -1, "expected an integer >= 0"),
    ("attention_block_q", 0, "expected a positive integer"),
    ("attention_block_k", 2.5, "expected a positive integer"),
  ],
)
def test_bad_attention_settings_are_refused(field, value, message):
  with pytest.raises(UserError, match=message):
    models.vit_config("Ti/16", **{field: value})


def test_cross_attention_is_refused():
  q, k, v, _ = draw((1, 10, 2, 8), seed=3)
  with pytest.raises(ValueError, match="self-attention"):
    blocked_attention(q[:, :1], k, v)


# Packed sequences: segments of 5, 1, 13 and 18 tokens (37), across block boundaries.
SEGMENTS = np.repeat(np.arange(4), (5, 1, 13, 18)).astype(np.int32)


def per_segment(fn, *arrays):
  """`fn` of each segment's tokens alone, pasted back in place (float64)."""
  out = [np.zeros(np.shape(arrays[0]), np.float64) for _ in range(len(fn(*arrays)))]
  for s in np.unique(SEGMENTS):
    where = SEGMENTS == s
    for o, part in zip(out, fn(*(np.asarray(a)[:, where] for a in arrays))):
      o[:, where] = part
  return out


@pytest.mark.parametrize("impl", ["blocked", "xla"])
def test_packed_attention_is_each_segment_alone(impl):
  """Block-diagonal by segment: values and gradients equal each segment's attention run
  alone (the float64 references on the cut-out tokens)."""
  q, k, v, g = draw((2, 37, 3, 8), seed=5)
  ids = jnp.asarray(np.broadcast_to(SEGMENTS, (2, 37)))
  attend = lambda q, k, v: attention.attend(q, k, v, impl, 1 << 30, (8, 16), segment_ids=ids)
  (want,) = per_segment(lambda *a: [reference(*a)], q, k, v)
  np.testing.assert_allclose(attend(q, k, v), want, rtol=0, atol=1e-5)
  grads = jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v) * g), (0, 1, 2))(q, k, v)
  for got, expect in zip(grads, per_segment(reference_grads, q, k, v, g)):
    np.testing.assert_allclose(got, expect, rtol=0, atol=2e-6 * np.abs(expect).max() * np.sqrt(37))
  # and the segments did matter: the unpacked attention differs
  assert np.abs(np.asarray(blocked_attention(q, k, v, block_q=8, block_k=16)) - want).max() > 1e-2


def test_packed_attention_on_cudnn_is_refused_by_name():
  q, k, v, _ = draw((1, 8, 1, 4), seed=6)
  with pytest.raises(UserError, match="attention_impl='cudnn' with packed sequences"):
    attention.attend(q, k, v, "cudnn", 1 << 30, (8, 8), segment_ids=jnp.zeros((1, 8), jnp.int32))
