"""Attention that never holds the whole score matrix: blocked, with an online softmax.

XLA's attention writes every head's (T, T) scores to memory and reads them back for the
softmax and for `P V`: at 1024² (4,097 tokens) that is 800 MB a layer for ViT-B, and the
teacher runs far below the matmul rate. This computes the same softmax(q kᵀ / √d) v a tile
of (query block × key block) at a time, keeping a running max and sum per query (the
online softmax of Milakov & Gimelshein 2018; Rabe & Staats 2021, "Self-attention does not
need O(n²) memory"), in plain JAX so it runs on every backend. The backward is
FlashAttention-2's (Dao 2023, Algorithm 2): it keeps q, k, v, the output and the
log-sum-exp per query and recomputes each tile's probabilities, so training memory grows
with T, not T². Same math as the plain attention, so its FLOPs (for MFU) are the same.
"""

import functools

import jax
import jax.numpy as jnp

import kernels
from linearizer.errors import UserError


def _blocks(x, block, mode="constant"):
  """(B, T, H, D) -> (n, B, block, H, D), T padded up to n * block (zeros; `mode='edge'`
  repeats the last token: the segment ids, so a padded query has its keys)."""
  b, t, *rest = x.shape
  n = -(-t // block)
  x = jnp.pad(x, [(0, 0), (0, n * block - t)] + [(0, 0)] * len(rest), mode=mode)
  return jnp.moveaxis(x.reshape(b, n, block, *rest), 1, 0)


def _unblocks(x, t):
  """(n, B, block, ...) -> (B, T, ...): the inverse of `_blocks`, padding dropped."""
  x = jnp.moveaxis(x, 0, 1)
  return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :t]


def _scores(q, k, scale, valid, seg_q, seg_k):
  """A tile's logits in f32, (B, H, bq, bk); padded keys, and keys of another segment than
  the query's (a packed sequence's other images), get -inf (probability 0)."""
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  keep = valid[None, None, None, :] & (seg_q[:, None, :, None] == seg_k[:, None, None, :])
  return jnp.where(keep, s, -jnp.inf)


def _forward(q, k, v, seg, block_q, block_k):
  """Returns the output (B, T, H, D) and the log-sum-exp of each query's logits (B, T, H)."""
  t, d = q.shape[1], q.shape[-1]
  scale = jnp.float32(d**-0.5)
  kb, vb, sb = _blocks(k, block_k), _blocks(v, block_k), _blocks(seg, block_k, "edge")
  valid = (jnp.arange(kb.shape[0] * block_k) < t).reshape(kb.shape[0], block_k)

  def one_query_block(block):
    qi, seg_q = block

    def step(carry, tile):
      m, total, acc = carry  # running max and sum (B, H, bq), unnormalised output (B, H, bq, D)
      kj, vj, ok, seg_k = tile
      s = _scores(qi, kj, scale, ok, seg_q, seg_k)
      m_new = jnp.maximum(m, s.max(-1))
      # a tile with no key for a query (all of another segment) leaves its max at -inf:
      # subtract 0 there instead, so exp(-inf - -inf) never makes a NaN
      shift = jnp.where(jnp.isneginf(m_new), 0.0, m_new)
      p = jnp.exp(s - shift[..., None])
      rescale = jnp.exp(m - shift)
      pv = jnp.einsum("bhqk,bkhd->bhqd", p.astype(v.dtype), vj, preferred_element_type=jnp.float32)
      return (m_new, total * rescale + p.sum(-1), acc * rescale[..., None] + pv), None

    b, bq, h, _ = qi.shape
    init = (
      jnp.full((b, h, bq), -jnp.inf, jnp.float32),
      jnp.zeros((b, h, bq), jnp.float32),
      jnp.zeros((b, h, bq, d), jnp.float32),
    )
    (m, total, acc), _ = jax.lax.scan(step, init, (kb, vb, valid, sb))
    out = jnp.einsum("bhqd->bqhd", acc / total[..., None])
    return out.astype(q.dtype), jnp.einsum("bhq->bqh", m + jnp.log(total))

  out, lse = jax.lax.map(one_query_block, (_blocks(q, block_q), _blocks(seg, block_q, "edge")))
  return _unblocks(out, t), _unblocks(lse, t)


def _backward(q, k, v, seg, out, lse, dout, block_q, block_k):
  """dq, dk, dv by FlashAttention-2's backward: an outer loop over key blocks (each
  block's dk, dv accumulate over the query blocks) and dq accumulated across them."""
  t, d = q.shape[1], q.shape[-1]
  scale = jnp.float32(d**-0.5)
  f32 = jnp.float32
  delta = jnp.einsum("bthd,bthd->bth", dout.astype(f32), out.astype(f32))  # rowsum(dO ∘ O)
  qb, dob = _blocks(q, block_q), _blocks(dout, block_q)
  # Per query block, laid out (B, H, bq) as the tiles use them: transposed once, not per tile.
  lseb, deltab = (jnp.einsum("nbqh->nbhq", _blocks(a, block_q)) for a in (lse, delta))
  kb, vb, sb, sqb = (
    _blocks(k, block_k),
    _blocks(v, block_k),
    _blocks(seg, block_k, "edge"),
    _blocks(seg, block_q, "edge"),
  )
  valid = (jnp.arange(kb.shape[0] * block_k) < t).reshape(kb.shape[0], block_k)

  def one_key_block(dq, tile):
    kj, vj, ok, seg_k = tile

    def step(carry, i):
      dq, dk, dv = carry
      qi, doi = qb[i], dob[i]
      p = jnp.exp(_scores(qi, kj, scale, ok, sqb[i], seg_k) - lseb[i][..., None])
      dv += jnp.einsum("bhqk,bqhd->bkhd", p.astype(dout.dtype), doi, preferred_element_type=f32)
      dp = jnp.einsum("bqhd,bkhd->bhqk", doi, vj, preferred_element_type=f32)
      ds = p * (dp - deltab[i][..., None]) * scale
      dq = dq.at[i].add(
        jnp.einsum("bhqk,bkhd->bqhd", ds.astype(k.dtype), kj, preferred_element_type=f32)
      )
      dk += jnp.einsum("bhqk,bqhd->bkhd", ds.astype(q.dtype), qi, preferred_element_type=f32)
      return (dq, dk, dv), None

    zeros = jnp.zeros(kj.shape, f32)
    (dq, dk, dv), _ = jax.lax.scan(step, (dq, zeros, zeros), jnp.arange(qb.shape[0]))
    return dq, (dk, dv)

  dq, (dk, dv) = jax.lax.scan(one_key_block, jnp.zeros(qb.shape, f32), (kb, vb, valid, sb))
  return (
    _unblocks(dq, t).astype(q.dtype),
    _unblocks(dk, t).astype(k.dtype),
    _unblocks(dv, t).astype(v.dtype),
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attention(q, k, v, seg, block_q, block_k):
  return _forward(q, k, v, seg, block_q, block_k)[0]


def _attention_fwd(q, k, v, seg, block_q, block_k):
  out, lse = _forward(q, k, v, seg, block_q, block_k)
  return out, (q, k, v, seg, out, lse)


def _attention_bwd(block_q, block_k, residuals, dout):
  return (*_backward(*residuals, dout, block_q, block_k), None)  # (seg: integers)


_attention.defvjp(_attention_fwd, _attention_bwd)


def blocked_attention(q, k, v, *, block_q: int = 512, block_k: int = 256, segment_ids=None):
  """softmax(q kᵀ / √d) v over all tokens, one (block_q × block_k) tile at a time.

  Args:
    q, k, v: (batch, tokens, heads, head_dim), as `jax.nn.dot_product_attention` takes them;
      self-attention only (the same shape for all three).
    block_q, block_k: tokens per query and key block (a block longer than the sequence is
      cut to it); the tokens need not be a multiple (the pad is masked).
    segment_ids: (batch, tokens) integers, or None: a packed sequence, each token attending
      only to the tokens of its own id (block-diagonal attention).

  Returns:
    (batch, tokens, heads, head_dim) in q's dtype; logits and sums in f32, as XLA's.
  """
  if not q.shape == k.shape == v.shape:
    raise ValueError(
      f"blocked_attention is self-attention: q, k, v of one shape, got {q.shape}, {k.shape}, "
      f"{v.shape}"
    )
  t = q.shape[1]
  seg = (
    jnp.zeros(q.shape[:2], jnp.int32) if segment_ids is None else kernels.segment_runs(segment_ids)
  )
  return _attention(q, k, v, seg, min(block_q, t), min(block_k, t))


def attend(q, k, v, impl, blocked_from: int, blocks: tuple, segment_ids=None):
  """The teacher's attention by `ViTConfig.attention_impl`: 'blocked' here; 'xla' or
  'cudnn' through `jax.nn.dot_product_attention`; None, 'blocked' on a CPU from
  `blocked_from` tokens on (where it was measured to win) and JAX's own choice elsewhere
  (GPU and TPU keep it until measured there); the platform is the target's
  (`kernels.target_platform`: the mesh in context, else the default backend).

  Args:
    q, k, v: (batch, tokens, heads, head_dim).
    impl: None, 'xla', 'cudnn' or 'blocked'.
    blocked_from: the token count from which None means 'blocked' on a CPU.
    blocks: (query, key) tokens per tile of 'blocked'.
    segment_ids: (batch, tokens) integers or None: block-diagonal attention over a packed
      sequence ('blocked' and 'xla'; 'cudnn' is refused with it until a GPU has tested it).

  Returns:
    (batch, tokens, heads, head_dim).
  """
  if impl is None and q.shape[1] >= blocked_from and kernels.target_platform() == "cpu":
    impl = "blocked"
  if impl == "blocked":
    return blocked_attention(q, k, v, block_q=blocks[0], block_k=blocks[1], segment_ids=segment_ids)
  if segment_ids is None:
    return jax.nn.dot_product_attention(q, k, v, implementation=impl)
  if impl == "cudnn":
    raise UserError(
      "attention_impl='cudnn' with packed sequences (segment_ids) has not been tested on a "
      "GPU; use attention_impl='xla' or 'blocked'."
    )
  runs = kernels.segment_runs(segment_ids)
  mask = runs[:, None, :, None] == runs[:, None, None, :]  # (B, 1, T, T)
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl)
