"""The benchmark's arithmetic: device peaks, FLOP and byte counts of the SSD, MFU,
roofline fractions, speed-ups, the paper's figures.

Pure functions of numbers and of bench.json's rows (unit-tested without timing anything);
the row modules (forward, steps, segment, ssd) and `runner` call them, `report` prints and
draws what they give.
"""

import math

# Dense bf16 peak FLOP/s and HBM bytes/s by device kind (substring of `device.device_kind`,
# first match wins, so the more specific names come first). Vendor datasheet figures.
PEAK_BF16 = [
  ("H200", 989e12),
  ("H100", 989e12),
  ("A100", 312e12),
  ("L4", 121e12),
  ("TPU v6", 918e12),
  ("TPU v5 lite", 197e12),
  ("TPU v5e", 197e12),
  ("TPU v5p", 459e12),
  ("TPU v5", 459e12),
  ("TPU v4", 275e12),
]
PEAK_BYTES_PER_S = [
  ("H200", 4.8e12),
  ("H100", 3.35e12),
  ("A100", 2.0e12),
  ("L4", 0.3e12),
  ("TPU v6", 1.64e12),
  ("TPU v5 lite", 0.82e12),
  ("TPU v5e", 0.82e12),
  ("TPU v5p", 2.76e12),
  ("TPU v5", 2.76e12),
  ("TPU v4", 1.2e12),
]

# The paper's figures (method.md §7), drawn beside ours and kept in bench.json.
PAPER_SPEEDUP = {448: 2.1}  # Adventurer-B vs CLIP ViT-B/16 at 448²: 199 vs 95 img/s
PAPER_FLOP_RATIO = {224: 0.9, 512: 1.0, 1024: 1.6, 2048: 3.8}  # ViT-B / Adventurer-B FLOPs
# UperNet, Adventurer-B vs CLIP ViT-B/16 (method.md §7): ADE20K 2.74×, Cityscapes 4.21×. The
# paper names the datasets, not the input size; placed at their usual sides, ADE20K's 512²
# crop and Cityscapes' 1024-pixel short side (our reading, said in docs/segmentation.md).
PAPER_SEGMENT_SPEEDUP = {512: 2.74, 1024: 4.21}


# ---------------------------------------------------------------------------------------
# Pure helpers (unit-tested).
# ---------------------------------------------------------------------------------------
def lookup(table, device_kind):
  """The value of the first entry whose name is part of `device_kind`, else None."""
  for name, value in table:
    if name.lower() in (device_kind or "").lower():
      return value
  return None


def peak_flops(device_kind, dtype, override=0.0):
  """Peak FLOP/s for MFU: the user's value, else the bf16 table (None for float32 or CPU)."""
  if override:
    return float(override)
  return lookup(PEAK_BF16, device_kind) if dtype == "bfloat16" else None


def mfu(flops_per_item, items_per_s, peak):
  """Model FLOP utilisation in percent; None when a figure is unknown."""
  if not (flops_per_item and items_per_s and peak):
    return None
  return 100.0 * flops_per_item * items_per_s / peak


def flops_from_cost(cost):
  """FLOPs of a compiled program; cost_analysis() is a dict in jax 0.10 (a list before)."""
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  value = (cost or {}).get("flops")
  return float(value) if value is not None and value > 0 else None


def ssd_flops(batch, length, heads, headdim, d_state, chunk, groups=1):
  """Matmul FLOPs of the chunked SSD forward (kernels/xla.py), padded to whole chunks.

  With Lp = ceil(L/Q)·Q tokens, per batch element:
    C·Bᵀ within chunks            2·G·Lp·Q·N
    (C·Bᵀ ⊙ decay) · (Δx)          2·H·Lp·Q·P
    chunk end states Bᵀ·(Δx)       2·H·Lp·N·P
    state read-out C·state         2·H·Lp·N·P
  The elementwise work (decays, exps, D skip) is O(H·Lp·Q) and left out: it does not run
  on the matrix units. The backward takes each matmul's two operand gradients, twice the
  forward, so forward+backward is 3× the forward.
  """
  q = min(chunk, length)
  lp = math.ceil(length / q) * q
  per_seq = 2 * lp * (groups * q * d_state + heads * q * headdim + 2 * heads * d_state * headdim)
  return float(batch * per_seq)


def ssd_bytes(batch, length, heads, headdim, d_state, itemsize, groups=1, backward=False):
  """The HBM traffic a fused SSD kernel cannot avoid: read its inputs once, write y once.

  Inputs: x (b·L·H·P) and B, C (b·L·G·N each) in the compute dtype, Δ (b·L·H) in float32.
  Output: y (b·L·H·P). The backward reads the inputs and dy again and writes one gradient
  per input, so forward+backward moves 3× the inputs and 2× the output.
  """
  inputs = batch * length * ((heads * headdim + 2 * groups * d_state) * itemsize + 4 * heads)
  output = batch * length * heads * headdim * itemsize
  return float(3 * inputs + 2 * output if backward else inputs + output)


def roofline_fraction(flops, nbytes, seconds, peak, bandwidth):
  """Measured time against the roofline bound max(flops/peak, bytes/bandwidth), in percent."""
  bounds = [f / p for f, p in ((flops, peak), (nbytes, bandwidth)) if f and p]
  if not bounds or not seconds:
    return None
  return 100.0 * max(bounds) / seconds


def matmul_fractions(rows, matmul_flop_per_s):
  """Each timed row's FLOP/s as a percentage of the device's measured matmul rate
  (`matmul_pct`): the ceiling a program of matmuls can reach here, datasheet or not."""
  for r in rows:
    rate = None
    if r.get("flops_per_image") and r.get("img_per_s"):
      rate = r["flops_per_image"] * r["img_per_s"]
    elif r.get("tflop_per_s"):
      rate = r["tflop_per_s"] * 1e12
    if rate and matmul_flop_per_s:
      r["matmul_pct"] = 100.0 * rate / matmul_flop_per_s


def speedups(rows, kind: str = "forward", paper: dict = PAPER_SPEEDUP):
  """Per resolution: student vs the fastest teacher of any implementation and attention
  (a PyTorch peer's too), and the teacher/student FLOP ratio, over the rows of `kind` (forward, segment); `paper` the paper's speed-ups by
  resolution. Returns a list sorted by resolution."""
  fwd = [r for r in rows if r["kind"] == kind and r.get("img_per_s")]
  out = []
  for res in sorted({r["resolution"] for r in fwd}):
    teachers = [r for r in fwd if r["resolution"] == res and r["role"] == "teacher"]
    students = [r for r in fwd if r["resolution"] == res and r["role"] == "student"]
    if not teachers or not students:
      continue
    best = max(teachers, key=lambda r: r["img_per_s"])
    student = students[0]
    t_flops = next((r["flops_per_image"] for r in teachers if r.get("flops_per_image")), None)
    s_flops = student.get("flops_per_image")
    out.append(
      dict(
        resolution=res,
        teacher_img_per_s=best["img_per_s"],
        teacher_attention=best["attention_impl"],
        teacher_model=best.get("model"),
        student_img_per_s=student["img_per_s"],
        speedup=student["img_per_s"] / best["img_per_s"],
        flop_ratio=t_flops / s_flops if t_flops and s_flops else None,
        teacher_mfu=best.get("mfu"),
        student_mfu=student.get("mfu"),
        paper_speedup=paper.get(res),
        paper_flop_ratio=PAPER_FLOP_RATIO.get(res) if kind == "forward" else None,
      )
    )
  return out


def attention_speedups(rows):
  """Per resolution and ViT attention impl: its time against the fastest impl's (≥ 1)."""
  fwd = [
    r for r in rows if r["kind"] == "forward" and r["role"] == "teacher" and r.get("img_per_s")
  ]
  for res in {r["resolution"] for r in fwd}:
    same = [r for r in fwd if r["resolution"] == res]
    best = max(r["img_per_s"] for r in same)
    for r in same:
      r["slowdown_vs_fastest_attention"] = best / r["img_per_s"]
