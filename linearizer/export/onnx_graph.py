"""The ONNX graph of an exported student (`to_onnx`): a builder of nodes and initializers
named by the part of the model they belong to, and one function per part that follows
`models/adventurer.py`, `models/mamba2.py` and the chunked scan of `kernels/xla.py` line for
line, with the chunking fixed at the export resolution.
"""

import math
from typing import Optional

import jax.numpy as jnp
import numpy as np

import kernels
from linearizer.models import common
from linearizer.models.adventurer import FLIP_PATTERNS

EPS = 1e-5  # every RMSNorm of the student (Block, Mamba2's gated norm, the final norm)


# ---------------------------------------------------------------------------------------
# The graph builder: nodes and initializers, named by the part of the model they belong to.
# ---------------------------------------------------------------------------------------
class Graph:
  """One ONNX graph under construction. `g(op, *inputs, **attributes)` adds a node and
  returns its output's name; `g.const` / `g.ints` add initializers (small ones shared)."""

  def __init__(self, onnx):
    self.onnx = onnx
    self.nodes, self.initializers, self.scope = [], [], ""
    self._shared = {}

  def __call__(self, op: str, *inputs: str, **attributes) -> str:
    name = f"{self.scope}{op}_{len(self.nodes)}"
    self.nodes.append(self.onnx.helper.make_node(op, list(inputs), [name], name, **attributes))
    return name

  def const(self, value, dtype=np.float32, name: Optional[str] = None) -> str:
    array = np.asarray(value, dtype)
    key = (array.dtype.str, array.shape, array.tobytes()) if array.size <= 64 else None
    if key is not None and key in self._shared:
      return self._shared[key]
    name = name or f"const_{len(self.initializers)}"
    self.initializers.append(self.onnx.numpy_helper.from_array(array, name))
    if key is not None:
      self._shared[key] = name
    return name

  def ints(self, *values: int) -> str:
    return self.const(values, np.int64)

  def finish(self, size: int, output: tuple):
    """The graph, input `images` (batch, size, size, 3) and `output` = (name, node, dims)."""
    helper, f32 = self.onnx.helper, self.onnx.TensorProto.FLOAT
    name, node, dims = output
    self.nodes.append(helper.make_node("Identity", [node], [name], "output"))
    return helper.make_graph(
      self.nodes,
      "adventurer",
      [helper.make_tensor_value_info("images", f32, ["batch", size, size, 3])],
      [helper.make_tensor_value_info(name, f32, ["batch", *dims])],
      self.initializers,
    )

  # Ops the student repeats, each as the JAX code computes it.
  def linear(self, x: str, kernel: np.ndarray, bias: Optional[np.ndarray] = None) -> str:
    y = self("MatMul", x, self.const(kernel))
    return y if bias is None else self("Add", y, self.const(bias))

  def silu(self, x: str) -> str:
    return self("Mul", x, self("Sigmoid", x))

  def rms_norm(self, x: str, scale: np.ndarray) -> str:
    """x / sqrt(mean(x², last axis) + eps) · scale (nnx.RMSNorm, Mamba2.gated_norm)."""
    mean_sq = self("ReduceMean", self("Mul", x, x), self.ints(-1), keepdims=1)
    norm = self("Sqrt", self("Add", mean_sq, self.const(EPS)))
    return self("Mul", self("Div", x, norm), self.const(scale))

  def slice(self, x: str, start: int, stop: int, axis: int) -> str:
    return self("Slice", x, self.ints(start), self.ints(stop), self.ints(axis))

  def unsqueeze(self, x: str, axis: int) -> str:
    return self("Unsqueeze", x, self.ints(axis))

  def pad_axis(self, x: str, rank: int, axis: int, before: int, after: int) -> str:
    """Zeros before / after `x` along `axis` (of a rank-`rank` tensor)."""
    pads = [0] * (2 * rank)
    pads[axis], pads[rank + axis] = before, after
    return self("Pad", x, self.ints(*pads))


# ---------------------------------------------------------------------------------------
# The student (models/adventurer.py), its mixer (models/mamba2.py), the scan (kernels/xla.py)
# ---------------------------------------------------------------------------------------
def student_graph(g: Graph, cfg, params: dict, size: int) -> tuple:
  """Adds the whole model; returns (output name, last node, output dims after batch)."""
  side, d = size // cfg.patch, cfg.width
  n = side * side
  g.scope = "embed/"
  x = g("Transpose", "images", perm=[0, 3, 1, 2])  # NHWC -> NCHW for Conv
  kernel = params["patch_embed.kernel"].transpose(3, 2, 0, 1)  # HWIO -> OIHW
  x = g(
    "Conv",
    x,
    g.const(kernel, name="patch_embed.kernel"),
    g.const(params["patch_embed.bias"]),
    kernel_shape=[cfg.patch] * 2,
    strides=[cfg.patch] * 2,
  )
  x = g("Transpose", g("Reshape", x, g.ints(-1, d, n)), perm=[0, 2, 1])  # (b, n, d), raster
  # The position embedding at the export's grid, by the code load_student runs.
  grid = common.patch_grid((cfg.image_size, cfg.image_size), cfg.patch)
  pos = common.resample_pos_embed(jnp.asarray(params["pos_embed"]), grid, (side, side), "last")
  pos = np.asarray(pos, np.float32)
  patches = g("Add", x, g.const(pos[:, :n], name="pos_embed"))
  batch = g("Shape", x, start=0, end=1)
  cls = g.const(params["cls_token"] + pos[:, n:], name="cls_token")
  cls = g("Expand", cls, g("Concat", batch, g.ints(1, d), axis=0))
  h = g("Concat", patches, cls, axis=1)  # [p_1 … p_n, cls]
  flip = FLIP_PATTERNS[cfg.flip_pattern]
  for i in range(cfg.depth):
    g.scope = f"layers.{i}/"
    h = _block(g, cfg, _prefixed(params, f"layers.{i}."), h, n, flip(i))
  g.scope = "head/"
  tokens = g.rms_norm(h, params["norm_f.scale"])
  if not cfg.num_classes:
    return ("tokens", tokens, [n + 1, d])
  cls = g("Gather", tokens, g.const(n, np.int64), axis=1)  # (b, d): CLS, the last token
  return ("logits", g.linear(cls, params["head.kernel"], params["head.bias"]), [cfg.num_classes])


def _prefixed(params: dict, prefix: str) -> dict:
  return {k[len(prefix) :]: v for k, v in params.items() if k.startswith(prefix)}


def _block(g: Graph, cfg, p: dict, h: str, n: int, flip: bool) -> str:
  """Block.__call__: the mixer over [heading average, (flipped) tokens], then SwiGLU."""
  # Patches reversed, CLS kept last: `flip_patches`, its own inverse.
  order = g.const([*range(n - 1, -1, -1), n], np.int64) if flip else None
  flipped = lambda t: g("Gather", t, order, axis=1) if flip else t
  t = flipped(g.rms_norm(h, p["norm.scale"]))
  u = g("Concat", g("ReduceMean", t, g.ints(1), keepdims=1), t, axis=1)  # (b, n + 2, d)
  t = g.slice(_mixer(g, cfg, _prefixed(p, "mixer."), u, n + 2), 1, n + 2, 1)
  h = g("Add", h, flipped(t))
  m = g.rms_norm(h, p["norm_mlp.scale"])
  hidden = g(
    "Mul",
    g.silu(g.linear(m, p["mlp.w1.kernel"], p["mlp.w1.bias"])),
    g.linear(m, p["mlp.w2.kernel"], p["mlp.w2.bias"]),
  )
  return g("Add", h, g.linear(hidden, p["mlp.w3.kernel"], p["mlp.w3.bias"]))


def _mixer(g: Graph, cfg, p: dict, u: str, length: int) -> str:
  """Mamba2.__call__ on (b, length, d): in_proj, causal conv, SSD, gated norm, out_proj."""
  e, s = cfg.expand * cfg.width, cfg.d_state
  # in_proj's [z, xBC, dt] columns as three matmuls: the same dot products, no Split.
  w = p["in_proj.kernel"]
  z = g.linear(u, w[:, :e])
  xbc = g.silu(_causal_conv(g, g.linear(u, w[:, e : 2 * e + 2 * s]), p, length))
  dt = g("Softplus", g.linear(u, w[:, 2 * e + 2 * s :], p["dt_bias"]))
  x, b, c = (g.slice(xbc, lo, hi, 2) for lo, hi in ((0, e), (e, e + s), (e + s, e + 2 * s)))
  y = _ssd(g, cfg, x, dt, -np.exp(p["A_log"]), b, c, p["D"], length)
  gated = g("Mul", y, g.silu(z))  # ngroups = 1: one norm over all e channels
  return g.linear(g.rms_norm(gated, p["norm_weight"]), p["out_proj.kernel"])


def _causal_conv(g: Graph, xbc: str, p: dict, length: int) -> str:
  """Mamba2.causal_conv: out_t = b + Σ_k w_k · x_{t-K+1+k}, on the zero-padded sequence."""
  w = p["conv_weight"]  # (K, channels)
  k = w.shape[0]
  padded = g.pad_axis(xbc, 3, 1, k - 1, 0)
  out = None
  for i in range(k):
    term = g("Mul", g.slice(padded, i, i + length, 1), g.const(w[i]))
    out = term if out is None else g("Add", out, term)
  return g("Add", out, g.const(p["conv_bias"]))


def _ssd(g: Graph, cfg, x, dt, a, b, c, skip, length: int) -> str:
  """kernels/xla.py's chunked SSD with ngroups = 1 and the chunking fixed at `length`.

  Shapes: x (batch, L, H·P), dt (batch, L, H), b, c (batch, L, S); returns (batch, L, H·P).
  Within a chunk, the masked (Q × Q) matmul; across chunks, each chunk's end state passed on
  by one (chunks × chunks) matmul of decays (each a masked cumulative sum from zero, as
  `kernels.reference._segsum`: no differences of long sums), in place of xla's scan.
  """
  hd, p, s = cfg.expand * cfg.width // cfg.headdim, cfg.headdim, cfg.d_state
  q = min(cfg.chunk_size or kernels.chunk_for(length, "onnxruntime"), length)
  nc = math.ceil(length / q)
  x_in, pad = x, nc * q - length
  if pad:  # padded tokens have dt = 0: decay 1, input 0, so they change nothing
    x, dt, b, c = (g.pad_axis(v, 3, 1, 0, pad) for v in (x, dt, b, c))
  xc = g("Transpose", g("Reshape", x, g.ints(-1, nc, q, hd, p)), perm=[0, 1, 3, 2, 4])
  bc, cc = (g("Reshape", v, g.ints(-1, nc, q, s)) for v in (b, c))  # (b, nc, Q, S)
  dtc = g("Transpose", g("Reshape", dt, g.ints(-1, nc, q, hd)), perm=[0, 1, 3, 2])  # b nc H Q
  a_cum = g("CumSum", g("Mul", dtc, g.const(a.reshape(hd, 1))), g.const(-1, np.int64))
  xdt = g("Mul", xc, g.unsqueeze(dtc, -1))  # dt_s x_s: (b, nc, H, Q, P)

  # 1. Within a chunk: y_l = Σ_{s<=l} (C_l · B_s) exp(cum_l - cum_s) dt_s x_s.
  cb = g("MatMul", cc, g("Transpose", bc, perm=[0, 1, 3, 2]))  # (b, nc, Q, Q)
  seg = g("Sub", g.unsqueeze(a_cum, -1), g.unsqueeze(a_cum, -2))
  decay = _masked_exp(g, seg, np.tril(np.ones((q, q), bool)))  # mask before exp (xla.py)
  y = g("MatMul", g("Mul", g.unsqueeze(cb, 2), decay), xdt)  # (b, nc, H, Q, P)
  if nc > 1:
    # 2. Each chunk's own end state Σ_s exp(cum_end - cum_s) dt_s x_s ⊗ B_s: (b nc H P S).
    last = g.slice(a_cum, q - 1, q, -1)  # the chunk's total log-decay: (b, nc, H, 1)
    own = g("Mul", xdt, g.unsqueeze(g("Exp", g("Sub", last, a_cum)), -1))
    own = g("MatMul", g("Transpose", own, perm=[0, 1, 2, 4, 3]), g.unsqueeze(bc, 2))
    own = g("Reshape", g("Transpose", own, perm=[0, 2, 1, 3, 4]), g.ints(-1, hd, nc, p * s))
    # 3. The state at the end of chunk t: Σ_{u<=t} exp(Σ_{u<r<=t} a_r) own_u; chunk t
    # starts from the end of chunk t - 1 (zero for the first).
    rows = g("Transpose", last, perm=[0, 2, 1, 3])  # [.., r, 0] = a_r: (b, H, nc, 1)
    below = g.const(np.tril(np.ones((nc, nc), bool), -1), np.bool_)
    sums = g("CumSum", g("Where", below, rows, g.const(0.0)), g.const(-2, np.int64))
    ends = g("MatMul", _masked_exp(g, sums, np.tril(np.ones((nc, nc), bool))), own)
    starts = g.pad_axis(g.slice(ends, 0, nc - 1, 2), 4, 2, 1, 0)  # (b, H, nc, P·S)
    starts = g("Reshape", starts, g.ints(-1, hd, nc, p, s))
    starts = g("Transpose", starts, perm=[0, 2, 1, 4, 3])  # (b, nc, H, S, P)
    carried = g("MatMul", g.unsqueeze(cc, 2), starts)  # C_l · state_start: (b, nc, H, Q, P)
    y = g("Add", y, g("Mul", carried, g.unsqueeze(g("Exp", a_cum), -1)))
  y = g("Reshape", g("Transpose", y, perm=[0, 1, 3, 2, 4]), g.ints(-1, nc * q, hd * p))
  if pad:
    y = g.slice(y, 0, length, 1)
  return g("Add", y, g("Mul", x_in, g.const(np.repeat(skip, p))))  # + D x


def _masked_exp(g: Graph, values: str, keep: np.ndarray) -> str:
  """exp(values) where `keep`, exactly 0 elsewhere (exp(-inf))."""
  return g("Exp", g("Where", g.const(keep, np.bool_), values, g.const(-np.inf)))
