"""The benchmark tool: teacher (ViT) vs student (Adventurer) speed, memory and FLOPs.

  python main.py --config configs/bench.py[:teacher=B/16,resolutions=224+448] --workdir DIR

Measures, on whatever device JAX runs on:
  forward     inference throughput and latency of each model at each resolution (the ViT once
              per attention implementation JAX offers), FLOPs per image from XLA's cost
              analysis, MFU, memory;
  train_step  the real distillation step (teacher frozen, student trained) at the training
              resolution, jitted by sharding.jit_step on a one-device mesh;
  max_batch   on accelerators, the largest power-of-two batch that fits per model/resolution;
  ssd         forward and forward+backward of every `kernels.ssd` impl, with the FLOPs and
              bytes the chunked algorithm must do and the fraction of the device's roofline.

Every timing: compile first (its time reported apart), one warm-up call, then the median of
`repeats` calls, each ended by `jax.block_until_ready`. Writes DIR/bench/bench.json,
DIR/bench/bench.png and prints a table.
"""
import json
import math
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import kernels
from configs import common
from linearizer import models, sharding, train

# Dense bf16 peak FLOP/s and HBM bytes/s by device kind (substring of `device.device_kind`,
# first match wins, so the more specific names come first). Vendor datasheet figures.
PEAK_BF16 = [("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L4", 121e12),
             ("TPU v6", 918e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12),
             ("TPU v5p", 459e12), ("TPU v5", 459e12), ("TPU v4", 275e12)]
PEAK_BYTES_PER_S = [("H200", 4.8e12), ("H100", 3.35e12), ("A100", 2.0e12), ("L4", 0.3e12),
                    ("TPU v6", 1.64e12), ("TPU v5 lite", 0.82e12), ("TPU v5e", 0.82e12),
                    ("TPU v5p", 2.76e12), ("TPU v5", 2.76e12), ("TPU v4", 1.2e12)]

# The paper's figures (method.md §7), drawn beside ours and kept in bench.json.
PAPER_SPEEDUP = {448: 2.1}   # Adventurer-B vs CLIP ViT-B/16 at 448²: 199 vs 95 img/s
PAPER_FLOP_RATIO = {224: 0.9, 512: 1.0, 1024: 1.6, 2048: 3.8}  # ViT-B / Adventurer-B FLOPs


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


def speedups(rows):
  """Per resolution: student vs the fastest teacher attention, and the teacher/student FLOP
  ratio. `rows` are forward rows; returns a list sorted by resolution."""
  fwd = [r for r in rows if r["kind"] == "forward" and r.get("img_per_s")]
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
    out.append(dict(
        resolution=res, teacher_img_per_s=best["img_per_s"],
        teacher_attention=best["attention_impl"], student_img_per_s=student["img_per_s"],
        speedup=student["img_per_s"] / best["img_per_s"],
        flop_ratio=t_flops / s_flops if t_flops and s_flops else None,
        teacher_mfu=best.get("mfu"), student_mfu=student.get("mfu"),
        paper_speedup=PAPER_SPEEDUP.get(res), paper_flop_ratio=PAPER_FLOP_RATIO.get(res)))
  return out


def attention_speedups(rows):
  """Per resolution and ViT attention impl: its time against the fastest impl's (≥ 1)."""
  fwd = [r for r in rows if r["kind"] == "forward" and r["role"] == "teacher"
         and r.get("img_per_s")]
  for res in {r["resolution"] for r in fwd}:
    same = [r for r in fwd if r["resolution"] == res]
    best = max(r["img_per_s"] for r in same)
    for r in same:
      r["slowdown_vs_fastest_attention"] = best / r["img_per_s"]


# ---------------------------------------------------------------------------------------
# Timing.
# ---------------------------------------------------------------------------------------
def time_compiled(compiled, args, repeats, carry=None):
  """Median seconds of `compiled(*args)` after one warm-up call.

  carry(args, out) -> next args, for steps that donate their state.
  """
  out = jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(repeats):
    if carry is not None:
      args = carry(args, out)
    start = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def compile_fn(jitted, args):
  """(compiled, seconds to lower and compile, FLOPs, compiled memory in bytes)."""
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  seconds = time.perf_counter() - start
  mem = compiled.memory_analysis()
  nbytes = None
  if mem is not None:  # what this program holds at once: arguments, outputs, scratch
    nbytes = int(mem.argument_size_in_bytes + mem.output_size_in_bytes
                 + mem.temp_size_in_bytes - mem.alias_size_in_bytes)
  return compiled, seconds, flops_from_cost(compiled.cost_analysis()), nbytes


def device_peak_bytes():
  """The device's peak bytes in use so far (process-wide, never reset); None on CPU."""
  stats = jax.devices()[0].memory_stats()
  return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def forward_fn(model):
  """A jitted `(state, images) -> tokens`: the whole backbone, no head."""
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda st, images: nnx.merge(graphdef, st)(images).tokens)
  return fn, state


def is_oom(err):
  text = str(err)
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


# ---------------------------------------------------------------------------------------
# The measurements.
# ---------------------------------------------------------------------------------------
PARTS = ("forward", "train_step", "ssd")  # what a run measures (config.bench.parts)


def settings(config):
  """The bench settings with every 'auto' (empty/0) value resolved for this backend."""
  b = config.bench
  accel = jax.default_backend() != "cpu"
  unknown = set(b.get("parts", PARTS)) - set(PARTS)
  if unknown:
    raise ValueError(f"bench.parts: unknown {sorted(unknown)}; expected some of {PARTS}.")
  s = dict(
      accel=accel,
      parts=tuple(b.get("parts", PARTS)),
      teacher=b.teacher or ("B/16" if accel else "Ti/16"),
      student=b.student or ("B/16" if accel else "Ti/16"),
      resolutions=tuple(b.resolutions) or ((224, 448, 512, 768, 1024, 1536, 2048) if accel
                                           else (224, 448, 512, 768, 1024)),
      batch=b.batch or (32 if accel else 1),
      dtype=b.dtype or ("bfloat16" if accel else "float32"),
      repeats=b.repeats or (10 if accel else 5),
      # The kernels' author measured chunk 64 fastest for the XLA scan on CPU.
      chunk_size=b.chunk_size or (256 if accel else 64),
      attention=tuple(b.attention_impls) or (("xla", "cudnn") if jax.default_backend() == "gpu"
                                             else ("xla",)),
      train_resolution=b.train_resolution,
      train_batch=b.train_batch or (64 if accel else 2),
      max_batch=accel if b.max_batch is None else bool(b.max_batch),
      max_batch_limit=b.max_batch_limit,
      ssd_batch=b.ssd.batch or (8 if accel else 1),
      ssd_lengths=tuple(b.ssd.lengths) or ((198, 1026, 4098, 16386) if accel
                                           else (198, 1026, 4098)),
      peak_override=b.peak_flops)
  return s


def build_pair(config, s, attention_impl):
  teacher = models.build("vit", s["teacher"], seed=0, attention_impl=attention_impl,
                         dtype=s["dtype"], **dict(config.bench.teacher_overrides))
  student = models.build("adventurer", s["student"], seed=1, dtype=s["dtype"],
                         chunk_size=s["chunk_size"], **dict(config.bench.student_overrides))
  return teacher, student


def measure_forward(model, res, batch, repeats, meta, peak):
  """One forward row: latency, throughput, FLOPs per image, MFU, memory."""
  fn, state = forward_fn(model)
  images = jnp.zeros((batch, res, res, 3), jnp.float32)
  compiled, compile_s, flops, nbytes = compile_fn(fn, (state, images))
  seconds = time_compiled(compiled, (state, images), repeats)
  per_image = flops / batch if flops else None
  img_s = batch / seconds
  return dict(meta, kind="forward", resolution=res, tokens=(res // model.cfg.patch) ** 2,
              batch=batch, compile_s=compile_s, latency_ms=1e3 * seconds, img_per_s=img_s,
              flops_per_image=per_image, mfu=mfu(per_image, img_s, peak),
              compiled_bytes=nbytes, peak_bytes=device_peak_bytes())


def largest_batch(model, res, start, limit):
  """The largest power-of-two batch whose forward compiles and runs (accelerators only)."""
  fn, state = forward_fn(model)
  best, batch = None, start
  while batch <= limit:
    try:
      images = jnp.zeros((batch, res, res, 3), jnp.float32)
      jax.block_until_ready(fn(state, images))
    except Exception as err:  # pylint: disable=broad-except
      if is_oom(err):
        break
      raise
    best, batch = batch, batch * 2
  return best


def measure_train_step(config, s, meta, peak):
  """The real distillation step at the training resolution: teacher frozen, student trained."""
  teacher, student = build_pair(config, s, s["attention"][-1])
  distiller = train.Distiller(student, teacher.cfg.width, rngs=nnx.Rngs(2))
  # AM compares 4 stages, or one per block for models shallower than that (smoke).
  stages = min(4, teacher.cfg.depth, student.cfg.depth)
  stage = common.stage(steps=1000, batch_size=s["train_batch"], lr=1e-4,
                       loss=common.distill_loss(num_stages=stages))
  tx = train.make_optimizer(stage.optim)
  step = train.make_distill_step(distiller, teacher, tx, stage)
  _, state = train.init_state(distiller, tx, ema=False)
  mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
  state_sh = sharding.tree_shardings(state, mesh)
  teacher_params = nnx.state(teacher, nnx.Param)
  teacher_sh = sharding.tree_shardings(teacher_params, mesh)
  state = sharding.put(state, state_sh)
  teacher_params = sharding.put(teacher_params, teacher_sh)
  res, batch = s["train_resolution"], s["train_batch"]
  images = np.zeros((batch, res, res, 3), np.float32)
  batch_arr = sharding.global_batch({"image": images}, mesh)
  rng = jax.random.key(0)
  jitted = sharding.jit_step(step, mesh, state_sh, (teacher_sh,))
  args = (state, teacher_params, batch_arr, rng)
  compiled, compile_s, flops, nbytes = compile_fn(jitted, args)
  # The step donates its state: every call gets the state the previous one returned.
  carry = lambda a, out: (out[0],) + tuple(a[1:])
  seconds = time_compiled(compiled, args, s["repeats"], carry=carry)
  per_image = flops / batch if flops else None
  return dict(meta, kind="train_step", model=f"distill {s['teacher']} -> {s['student']}",
              role="pair", variant=s["student"], attention_impl=s["attention"][-1],
              resolution=res, batch=batch, compile_s=compile_s, latency_ms=1e3 * seconds,
              img_per_s=batch / seconds, flops_per_image=per_image,
              mfu=mfu(per_image, batch / seconds, peak), compiled_bytes=nbytes,
              peak_bytes=device_peak_bytes())


def ssd_inputs(batch, length, heads, headdim, d_state, dtype):
  keys = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(keys[0], (batch, length, heads, headdim), dtype)
  dt = jax.nn.softplus(jax.random.normal(keys[1], (batch, length, heads))) * 0.1
  A = -jnp.linspace(1.0, 16.0, heads)
  B = jax.random.normal(keys[2], (batch, length, 1, d_state), dtype)
  C = jax.random.normal(keys[3], (batch, length, 1, d_state), dtype)
  return x, dt, A, B, C, jnp.ones((heads,))


def ssd_row(impl, mode, args, shape, s, meta, peak, bandwidth):
  """One SSD timing; a Pallas impl raises ValueError (at trace time) for shapes it refuses."""
  fwd = lambda *a: kernels.ssd(*a, chunk_size=s["chunk_size"], impl=impl)
  # Forward+backward: the gradient of a scalar of y with respect to every input.
  fn = fwd if mode == "fwd" else jax.grad(
      lambda *a: jnp.sum(fwd(*a).astype(jnp.float32)), argnums=tuple(range(len(args))))
  compiled, compile_s, xla_flops, _ = compile_fn(jax.jit(fn), args)
  seconds = time_compiled(compiled, args, s["repeats"])
  backward = mode == "fwd+bwd"
  flops = ssd_flops(*shape, s["chunk_size"]) * (3 if backward else 1)
  nbytes = ssd_bytes(*shape, args[0].dtype.itemsize, backward=backward)
  return dict(meta, compile_s=compile_s, ms=1e3 * seconds, flops=flops, xla_flops=xla_flops,
              bytes=nbytes, tflop_per_s=flops / seconds / 1e12, gb_per_s=nbytes / seconds / 1e9,
              roofline_pct=roofline_fraction(flops, nbytes, seconds, peak, bandwidth))


def measure_ssd(config, s, meta, peak, bandwidth):
  """Forward and forward+backward of every kernels.ssd impl at each sequence length."""
  c = config.bench.ssd
  rows = []
  for impl in kernels.IMPLS:
    if impl.startswith("pallas_") and impl != f"pallas_{kernels.platform_name()}":
      rows.append(dict(meta, kind="ssd", impl=impl, skipped=f"needs a {impl[7:].upper()}"))
      continue
    try:
      for length in s["ssd_lengths"]:
        shape = (s["ssd_batch"], length, c.heads, c.headdim, c.d_state)
        args = ssd_inputs(*shape, jnp.dtype(s["dtype"]))
        for mode in ("fwd", "fwd+bwd"):
          row = dict(meta, kind="ssd", impl=impl, mode=mode, batch=shape[0], length=length,
                     heads=c.heads, headdim=c.headdim, d_state=c.d_state,
                     chunk_size=s["chunk_size"])
          rows.append(ssd_row(impl, mode, args, shape, s, row, peak, bandwidth))
          print(f"[bench] ssd {impl:<9} {mode:<7} L={length:<6} {rows[-1]['ms']:9.2f} ms",
                flush=True)
    except ValueError as err:  # a Pallas kernel refusing these shapes, at trace time
      rows.append(dict(meta, kind="ssd", impl=impl, skipped=str(err)))
      print(f"[bench] ssd {impl}: skipped ({err})", flush=True)
  return rows


def run(config, workdir):
  """Runs every measurement; writes workdir/bench/{bench.json,bench.png}; prints a table."""
  s = settings(config)
  device = jax.devices()[0]
  kind = device.device_kind
  peak = peak_flops(kind, s["dtype"], s["peak_override"])
  bandwidth = lookup(PEAK_BYTES_PER_S, kind)
  base = dict(device_kind=kind, backend=jax.default_backend(), jax_version=jax.__version__,
              dtype=s["dtype"])
  out_dir = os.path.join(workdir, "bench")  # the stage's own folder, like every stage
  os.makedirs(out_dir, exist_ok=True)
  start = time.perf_counter()
  rows = []

  if "forward" in s["parts"]:
    for impl in s["attention"]:
      teacher, student = build_pair(config, s, impl)
      pairs = [(teacher, "teacher", f"ViT-{s['teacher']}", impl)]
      if impl == s["attention"][0]:  # the student has no attention: measure it once
        pairs.append((student, "student", f"Adventurer-{s['student']}", None))
      for model, role, name, attn in pairs:
        meta = dict(base, model=name, role=role, variant=name.split("-", 1)[1],
                    attention_impl=attn)
        for res in s["resolutions"]:
          try:
            row = measure_forward(model, res, s["batch"], s["repeats"], meta, peak)
          except Exception as err:  # pylint: disable=broad-except
            # A failure (e.g. cuDNN refusing a shape, or memory) is recorded, not fatal.
            rows.append(dict(meta, kind="forward", resolution=res, batch=s["batch"],
                             error=f"{type(err).__name__}: {str(err)[:300]}"))
            print(f"[bench] {name} {attn or ''} @{res}: failed ({type(err).__name__})", flush=True)
            continue
          rows.append(row)
          print(f"[bench] {name:<18} {attn or '':<6} @{res:<5} {row['img_per_s']:10.2f} img/s "
                f"{row['latency_ms']:10.1f} ms  (compile {row['compile_s']:.1f} s)", flush=True)
          if s["max_batch"]:
            rows.append(dict(meta, kind="max_batch", resolution=res, batch=largest_batch(
                model, res, s["batch"], s["max_batch_limit"])))
    # XLA counts no FLOPs inside custom calls (cuDNN attention): every impl does the same
    # math, so the teacher's FLOPs come from the first impl that reports them.
    for res in s["resolutions"]:
      same = [r for r in rows if r["kind"] == "forward" and r["role"] == "teacher"
              and r["resolution"] == res and "img_per_s" in r]
      flops = next((r["flops_per_image"] for r in same if r.get("flops_per_image")), None)
      for r in same:
        if r["flops_per_image"] is None and flops:
          r["flops_per_image"], r["mfu"] = flops, mfu(flops, r["img_per_s"], peak)
    attention_speedups(rows)

  if "train_step" in s["parts"]:
    rows.append(measure_train_step(config, s, base, peak))
    r = rows[-1]
    print(f"[bench] distill train step @{r['resolution']} batch {r['batch']}: "
          f"{r['img_per_s']:.2f} img/s (compile {r['compile_s']:.1f} s)", flush=True)
  if "ssd" in s["parts"]:
    rows.extend(measure_ssd(config, s, base, peak, bandwidth))

  result = dict(meta=dict(base, peak_flops=peak, peak_bytes_per_s=bandwidth,
                          settings=s,
                          wall_s=time.perf_counter() - start,
                          paper=dict(speedup=PAPER_SPEEDUP, flop_ratio=PAPER_FLOP_RATIO)),
                rows=rows, speedups=speedups(rows))
  if jax.process_index() == 0:
    with open(os.path.join(out_dir, "bench.json"), "w", encoding="utf-8") as f:
      json.dump(result, f, indent=2, default=str)
    plot(result, os.path.join(out_dir, "bench.png"))
    print(table(result), flush=True)
    print(f"[bench] wrote {out_dir}/bench.json and bench.png "
          f"({result['meta']['wall_s']:.0f} s)", flush=True)
  return result


# ---------------------------------------------------------------------------------------
# Output.
# ---------------------------------------------------------------------------------------
def fmt(value, spec):
  """`value` formatted by `spec`, or a '-' of the same width when it is None."""
  if value is None:
    return format("-", spec.split(".")[0].rstrip("fegd"))
  return format(value, spec)


def table(result):
  """The printed summary: forward rows, speedups, the train step and the SSD rows."""
  rows = result["rows"]
  lines = [f"device {result['meta']['device_kind']} ({result['meta']['backend']}), "
           f"{result['meta']['dtype']}, jax {result['meta']['jax_version']}", ""]
  head = (f"{'model':<20} {'attn':<6} {'res':>5} {'batch':>5} {'img/s':>10} {'ms/batch':>10} "
          f"{'GFLOP/img':>10} {'MFU%':>6} {'compile s':>9}")
  lines += [head, "-" * len(head)]
  for r in rows:
    if r["kind"] == "forward" and "img_per_s" in r:
      flops = r["flops_per_image"] / 1e9 if r["flops_per_image"] else None
      lines.append(f"{r['model']:<20} {r['attention_impl'] or '':<6} {r['resolution']:>5} "
                   f"{r['batch']:>5} {r['img_per_s']:>10.2f} {r['latency_ms']:>10.1f} "
                   f"{fmt(flops, '>10.4g')} {fmt(r['mfu'], '>6.1f')} {r['compile_s']:>9.1f}")
  lines += ["", f"{'res':>5} {'speedup':>8} {'FLOP ratio':>10} {'paper speedup':>14} "
            f"{'paper FLOP ratio':>17}   (speedup: student img/s over the fastest teacher's)"]
  for sp in result["speedups"]:
    lines.append(f"{sp['resolution']:>5} {sp['speedup']:>7.2f}x {fmt(sp['flop_ratio'], '>10.2f')} "
                 f"{fmt(sp['paper_speedup'], '>14.1f')} {fmt(sp['paper_flop_ratio'], '>17.1f')}")
  for r in rows:
    if r["kind"] == "train_step":
      lines += ["", f"distill train step ({r['model']}) @{r['resolution']}, batch {r['batch']}: "
                f"{r['img_per_s']:.2f} img/s, {r['latency_ms']:.0f} ms/step, "
                f"{fmt(r['flops_per_image'] and r['flops_per_image'] / 1e9, '.4g')} GFLOP/img, "
                f"MFU {fmt(r['mfu'], '.1f')}"]
  lines += ["", f"{'ssd impl':<11} {'mode':<8} {'L':>6} {'ms':>10} {'TFLOP/s':>8} {'GB/s':>8} "
            f"{'roofline%':>9}"]
  for r in rows:
    if r["kind"] == "ssd":
      if "skipped" in r:
        lines.append(f"{r['impl']:<11} skipped: {r['skipped']}")
      else:
        lines.append(f"{r['impl']:<11} {r['mode']:<8} {r['length']:>6} {r['ms']:>10.2f} "
                     f"{r['tflop_per_s']:>8.3f} {r['gb_per_s']:>8.2f} "
                     f"{fmt(r['roofline_pct'], '>9.1f')}")
  return "\n".join(lines)


def plot(result, path):
  """Left: throughput vs resolution per model (log). Right: speedup, FLOP ratio, paper."""
  from linearizer.plots import plt  # pylint: disable=import-outside-toplevel

  fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
  fwd = [r for r in result["rows"] if r["kind"] == "forward" and "img_per_s" in r]
  for key in dict.fromkeys((r["model"], r["attention_impl"]) for r in fwd):
    pts = sorted((r["resolution"], r["img_per_s"]) for r in fwd
                 if (r["model"], r["attention_impl"]) == key)
    label = key[0] + (f" ({key[1]} attention)" if key[1] else "")
    left.plot(*zip(*pts), marker="o", label=label)
  left.set(xlabel="resolution (px)", ylabel="images / s", yscale="log",
           title=f"Inference throughput, {result['meta']['device_kind']}")
  left.legend(fontsize=8)
  left.grid(alpha=0.3)

  sp = result["speedups"]
  if sp:
    right.plot([x["resolution"] for x in sp], [x["speedup"] for x in sp], marker="o",
               label="measured speedup (student / fastest teacher)")
    ratio = [(x["resolution"], x["flop_ratio"]) for x in sp if x["flop_ratio"]]
    if ratio:
      right.plot(*zip(*ratio), linestyle="--", label="measured FLOP ratio (teacher / student)")
  right.scatter(list(PAPER_FLOP_RATIO), list(PAPER_FLOP_RATIO.values()), marker="s",
                color="gray", label="paper: FLOP ratio ViT-B / Adventurer-B")
  right.scatter(list(PAPER_SPEEDUP), list(PAPER_SPEEDUP.values()), marker="*", s=150,
                color="red", label="paper: 2.1× Adventurer-B vs CLIP ViT-B/16 @448²")
  right.axhline(1.0, color="black", linewidth=0.5)
  right.set(xlabel="resolution (px)", ylabel="× faster", title="Student / teacher")
  right.legend(fontsize=8)
  right.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
