"""The benchmark tool: teacher (ViT) vs student (Adventurer) speed, memory and FLOPs.

  python main.py --config configs/bench.py[:teacher=B/16,resolutions=224+448] --workdir DIR

Measures, on whatever device JAX runs on:
  forward     inference throughput and latency of each model at each resolution (the ViT once
              per attention implementation JAX offers), FLOPs per image from XLA's cost
              analysis, MFU, memory;
  train_step  the real distillation step (teacher frozen, student trained) at the training
              resolution, jitted by sharding.jit_step on a one-device mesh;
  supervised_step  a supervised training step (forward, backward, AdamW) of each model (the
              ViT once per attention implementation) at batch 128 or the largest that fits:
              the protocol the paper's speed and memory table most likely follows;
  max_batch   on accelerators, the largest power-of-two batch that fits per model/resolution;
  segment     backbone + UperNet head forward (no auxiliary head), teacher vs student at
              equal patch size, at segmentation resolutions (512² … 2048²): where the
              paper's 2.74× (ADE20K) and 4.21× (Cityscapes) come from;
  ssd         forward and forward+backward of every `kernels.ssd` impl, with the FLOPs and
              bytes the chunked algorithm must do and the fraction of the device's roofline.

Beside them, in the same run: the device's own matmul rate (a large square matmul in the
run's dtype), against which every row's FLOP/s is also given (`matmul_pct`: MFU on a CPU,
which has no datasheet peak here); and, where torch and transformers are installed, the
PyTorch peers (`bench_torch.py`: Hugging Face's ViT with SDPA attention, our PyTorch
Adventurer) as forward rows, so that the speed-up is against the fastest ViT of any
implementation.

Every timing: compile first (its time reported apart), one warm-up call, then the median of
`repeats` calls, each ended by `jax.block_until_ready`. Writes DIR/bench/bench.json,
DIR/bench/bench.png and prints a table.
"""

import dataclasses
import importlib
import importlib.util
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

import kernels
from linearizer import data, models, optim, sharding, supervised, train
from linearizer.bench import results
from linearizer.distillation import distill, teacher_cache
from linearizer.errors import UserError, log, main_process
from linearizer.metrics import time_compiled
from linearizer.models.segmenter import Segmenter, SegmenterConfig


# ---------------------------------------------------------------------------------------
# Timing.
# ---------------------------------------------------------------------------------------
def compile_fn(jitted, args):
  """(compiled, seconds to lower and compile, FLOPs, compiled memory in bytes)."""
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  seconds = time.perf_counter() - start
  mem = compiled.memory_analysis()
  nbytes = None
  if mem is not None:  # what this program holds at once: arguments, outputs, scratch
    nbytes = int(
      mem.argument_size_in_bytes
      + mem.output_size_in_bytes
      + mem.temp_size_in_bytes
      - mem.alias_size_in_bytes
    )
  return compiled, seconds, results.flops_from_cost(compiled.cost_analysis()), nbytes


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
PARTS = ("forward", "train_step", "supervised_step", "segment", "ssd")  # config.bench.parts


def settings(config):
  """The bench settings with every 'auto' (empty/0) value resolved for this backend."""
  b = config.bench
  accel = jax.default_backend() != "cpu"
  unknown = set(b.parts) - set(PARTS)
  if unknown:
    raise UserError(f"bench.parts: unknown {sorted(unknown)}; expected some of {PARTS}.")
  s = dict(
    accel=accel,
    parts=tuple(b.parts),
    teacher=b.teacher or ("B/16" if accel else "Ti/16"),
    student=b.student or ("B/16" if accel else "Ti/16"),
    resolutions=tuple(b.resolutions)
    or ((224, 448, 512, 768, 1024, 1536, 2048) if accel else (224, 448, 512, 768, 1024)),
    batch=b.batch or (32 if accel else 1),
    dtype=b.dtype or ("bfloat16" if accel else "float32"),
    repeats=b.repeats or (10 if accel else 5),
    # 0: the student takes kernels.CHUNK_TABLE's chunk for each sequence length.
    chunk_size=b.chunk_size,
    attention=tuple(b.attention_impls)
    or (("xla", "cudnn", "blocked") if jax.default_backend() == "gpu" else ("xla", "blocked")),
    matmul_size=b.matmul_size or (8192 if accel else 2048),
    pytorch=b.pytorch,
    train_resolution=b.train_resolution,
    train_batch=b.train_batch or (64 if accel else 2),
    supervised_batch=b.supervised.batch or (128 if accel else 2),
    supervised_resolutions=tuple(b.supervised.resolutions) or ((224, 448) if accel else (224,)),
    max_batch=accel if b.max_batch is None else bool(b.max_batch),
    max_batch_limit=b.max_batch_limit,
    segment_resolutions=tuple(b.segment.resolutions)
    or ((512, 768, 1024, 2048) if accel else (512, 768)),
    segment_batch=b.segment.batch or (8 if accel else 1),
    ssd_batch=b.ssd.batch or (8 if accel else 1),
    ssd_lengths=tuple(b.ssd.lengths) or ((198, 1026, 4098, 16386) if accel else (198, 1026, 4098)),
    peak_override=b.peak_flops,
  )
  return s


def build_pair(config, s, attention_impl, num_classes=0):
  """The teacher (`bench.teacher_kind`) and student (`bench.student_kind`) at their variants."""
  b = config.bench
  teacher = models.build(
    b.teacher_kind,
    s["teacher"],
    seed=0,
    attention_impl=attention_impl,
    dtype=s["dtype"],
    num_classes=num_classes,
    **dict(b.teacher_overrides),
  )
  student = models.build(
    b.student_kind,
    s["student"],
    seed=1,
    dtype=s["dtype"],
    chunk_size=s["chunk_size"],
    num_classes=num_classes,
    **dict(b.student_overrides),
  )
  return teacher, student


def measure_matmul(n: int, dtype: str, calls: int, meta: dict) -> dict:
  """The device's matmul rate: an (n, n) @ (n, n) product in `dtype`, 2n³ FLOPs a call.
  A ceiling, so the fastest of `calls` calls after three warm-ups (a CPU's first calls
  run at half speed while its clock rises)."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(dtype))
  compiled, compile_s, _, _ = compile_fn(jax.jit(jnp.matmul), (a, a))
  for _ in range(3):
    jax.block_until_ready(compiled(a, a))
  times = []
  for _ in range(calls):
    start = time.perf_counter()
    jax.block_until_ready(compiled(a, a))
    times.append(time.perf_counter() - start)
  seconds = min(times)
  return dict(meta, kind="matmul", n=n, ms=1e3 * seconds, flop_per_s=2 * n**3 / seconds)


def pytorch_peers(wanted: bool):
  """`linearizer.bench.torch_peers` where torch and transformers are installed and `wanted`; else
  None. Imported only then: torch is an optional extra."""
  if not wanted:
    return None
  missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
  if missing:
    log(f"[bench] no PyTorch rows: {' and '.join(missing)} not installed (requirements-torch.txt)")
    return None
  return importlib.import_module("linearizer.bench.torch_peers")


def pytorch_rows(config, s, base, peers):
  """Forward rows of the PyTorch peers at every resolution: HF ViT (role teacher, so that the
  speed-up is against it when it is the fastest ViT) and our PyTorch Adventurer (role peer)."""
  b, rows = config.bench, []
  models_ = []
  if b.teacher_kind == "vit":
    cfg = models.vit_config(s["teacher"], **dict(b.teacher_overrides))
    models_.append(("vit", cfg, cfg.patch, f"ViT-{s['teacher']} (PyTorch)", "teacher", "sdpa"))
  if b.student_kind == "adventurer":
    arch = models.ARCHITECTURES["adventurer"]
    cfg = arch.variant(s["student"], **dict(b.student_overrides))
    name = f"Adventurer-{s['student']} (PyTorch)"
    models_.append(("adventurer", dataclasses.asdict(cfg), cfg.patch, name, "peer", None))
  for kind, cfg, patch, name, role, attn in models_:
    meta = dict(base, model=name, role=role, variant=name.split("-", 1)[1].split()[0])
    meta.update(attention_impl=attn, library=f"torch {peers.torch.__version__}")
    for res in s["resolutions"]:
      at_res = cfg
      if kind == "adventurer":  # the table's chunk at this length, as the JAX student's xla
        # scan takes it (a Pallas kernel caps its own chunk, so on a GPU they may differ)
        at_res = dict(cfg, chunk_size=chunk_at(s, (res // patch) ** 2 + 2))
      try:
        seconds = peers.forward_seconds(kind, at_res, res, s["batch"], s["dtype"], s["repeats"])
      except Exception as err:  # recorded, not fatal (as the JAX rows)
        rows.append(dict(meta, kind="forward", resolution=res, error=f"{type(err).__name__}"))
        log(f"[bench] {name} @{res}: failed ({type(err).__name__}: {str(err)[:200]})")
        continue
      # No FLOPs (the same math as the JAX model's: filled from its row) and no memory
      # figures: JAX's device statistics say nothing of torch's.
      row = timed_row(
        meta,
        None,
        batch=s["batch"],
        seconds=seconds,
        compile_s=None,
        flops=None,
        nbytes=None,
        kind="forward",
        resolution=res,
        tokens=(res // patch) ** 2,
      )
      rows.append(dict(row, peak_bytes=None))
      log(f"[bench] {name:<18} {attn or '':<6} @{res:<5} {rows[-1]['img_per_s']:10.2f} img/s")
  return rows


def timed(jitted, args, repeats, carry=None) -> dict:
  """Compiles, then times (`metrics.time_compiled`): the timing fields of `timed_row`."""
  compiled, compile_s, flops, nbytes = compile_fn(jitted, args)
  seconds = time_compiled(compiled, args, repeats, carry=carry)
  return dict(seconds=seconds, compile_s=compile_s, flops=flops, nbytes=nbytes)


# The steps donate their state: every call gets the state the previous one returned.
CARRY_STATE = lambda args, out: (out[0],) + tuple(args[1:])


def timed_row(meta, peak, *, batch, seconds, compile_s, flops, nbytes, **fields):
  """A timing row: `fields`, then latency, img/s, FLOPs per image, MFU and memory."""
  per_image = flops / batch if flops else None
  return dict(
    meta,
    **fields,
    batch=batch,
    compile_s=compile_s,
    latency_ms=1e3 * seconds,
    img_per_s=batch / seconds,
    flops_per_image=per_image,
    mfu=results.mfu(per_image, batch / seconds, peak),
    compiled_bytes=nbytes,
    peak_bytes=device_peak_bytes(),
  )


def measure_forward(model, res, batch, repeats, meta, peak):
  """One forward row: latency, throughput, FLOPs per image, MFU, memory."""
  fn, state = forward_fn(model)
  images = jnp.zeros((batch, res, res, 3), jnp.float32)
  return timed_row(
    meta,
    peak,
    batch=batch,
    **timed(fn, (state, images), repeats),
    kind="forward",
    resolution=res,
    tokens=(res // model.cfg.patch) ** 2,
  )


def largest_batch(model, res, start, limit):
  """The largest power-of-two batch whose forward compiles and runs (accelerators only)."""
  fn, state = forward_fn(model)
  best, batch = None, start
  while batch <= limit:
    try:
      images = jnp.zeros((batch, res, res, 3), jnp.float32)
      jax.block_until_ready(fn(state, images))
    except Exception as err:
      if is_oom(err):
        break
      raise
    best, batch = batch, batch * 2
  return best


def measure_train_step(config, s, meta, peak) -> list:
  """The real distillation step at the training resolution, teacher frozen and student
  trained: as the paper runs it (the teacher's forward in the step) and from the
  teacher-feature cache (its outputs read with the batch, in the cache's dtype)."""
  # The teacher attention a run picks by default (None: JAX's choice, or 'blocked' on a CPU
  # from ViTConfig.blocked_attention_tokens on).
  teacher, student = build_pair(config, s, None)
  distiller = distill.Distiller(student, teacher.cfg.width, rngs=nnx.Rngs(2))
  # The config's distillation settings; AM compares at most one level per block of the
  # shallower model (smoke), on a copy: the config itself is never written.
  stage = ml_collections.ConfigDict(config.bench.distill.to_dict())
  stage.loss.num_stages = min(stage.loss.num_stages, teacher.cfg.depth, student.cfg.depth)
  tx = optim.make_optimizer(stage.optim, stage.steps)
  mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
  teacher_params = nnx.state(teacher, nnx.Param)
  teacher_sh = sharding.tree_shardings(teacher_params, mesh)
  teacher_params = sharding.put(teacher_params, teacher_sh)
  res, batch = s["train_resolution"], s["train_batch"]
  images = np.zeros((batch, res, res, 3), np.float32)
  labels = np.zeros(batch, np.int32)
  targets = jax.jit(distill.make_teacher_targets(teacher, student.cfg, stage))
  stored = jax.tree.map(
    lambda x: np.asarray(x).astype(teacher_cache.DTYPES[stage.teacher_cache_dtype]),
    targets(teacher_params, jnp.asarray(images)),
  )
  _, initial = train.init_state(distiller, tx, ema=False)
  state_sh = sharding.tree_shardings(initial, mesh)
  rows = []
  for teacher_mode in ("forward", "cached"):
    cached = teacher_mode == "cached"
    step = distill.make_distill_step(distiller, teacher, tx, stage, cached=cached)
    # Each mode's own copy: the step donates its state (and the distiller's arrays with it).
    state = sharding.put(jax.tree.map(jnp.array, initial), state_sh)
    if cached:
      local = teacher_cache.CachedBatch(images, labels, stored)
      args = (state, sharding.global_batch(local, mesh), jax.random.key(0))
      jitted = sharding.jit_step(step, mesh, state_sh)
    else:
      local = data.Batch(images, labels)
      args = (state, teacher_params, sharding.global_batch(local, mesh), jax.random.key(0))
      jitted = sharding.jit_step(step, mesh, state_sh, (teacher_sh,))
    row = timed_row(
      meta,
      peak,
      batch=batch,
      **timed(jitted, args, s["repeats"], carry=CARRY_STATE),
      kind="train_step",
      model=f"distill {s['teacher']} -> {s['student']}"
      + (f", teacher cached ({stage.teacher_cache_dtype})" if cached else ""),
      role="pair",
      variant=s["student"],
      attention_impl=None,
      resolution=res,
      teacher=teacher_mode,
    )
    log(
      f"[bench] {row['model']} @{res} batch {batch}: {row['img_per_s']:.2f} img/s "
      f"(compile {row['compile_s']:.1f} s)"
    )
    rows.append(row)
  return rows


def time_supervised_step(model, stage, res, batch, repeats):
  """`timed` of the real supervised step (`supervised.make_supervised_step`) on a
  one-device mesh."""
  tx = optim.make_optimizer(stage.optim, stage.steps)
  step = supervised.make_supervised_step(model, tx, stage)
  _, state = train.init_state(model, tx, ema=False)
  # The step donates its state: copies, so that the model's own arrays survive for the
  # next resolution.
  state = jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else x, state)
  mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
  state_sh = sharding.tree_shardings(state, mesh)
  state = sharding.put(state, state_sh)
  images = np.zeros((batch, res, res, 3), np.float32)
  batch_arr = sharding.global_batch(data.Batch(images, np.zeros(batch, np.int32)), mesh)
  args = (state, batch_arr, jax.random.key(0))
  return timed(sharding.jit_step(step, mesh, state_sh), args, repeats, carry=CARRY_STATE)


def measure_supervised_step(model, res, s, stage, meta, peak):
  """One supervised-step row at `supervised_batch`, halved on accelerators until it fits."""
  batch = s["supervised_batch"]
  while True:
    try:
      timing = time_supervised_step(model, stage, res, batch, s["repeats"])
      break
    except Exception as err:
      if not (s["accel"] and is_oom(err) and batch > 1):
        raise
      batch //= 2
  return timed_row(meta, peak, batch=batch, **timing, kind="supervised_step", resolution=res)


def ssd_inputs(batch, length, heads, headdim, d_state, dtype):
  keys = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(keys[0], (batch, length, heads, headdim), dtype)
  dt = jax.nn.softplus(jax.random.normal(keys[1], (batch, length, heads))) * 0.1
  A = -jnp.linspace(1.0, 16.0, heads)
  B = jax.random.normal(keys[2], (batch, length, 1, d_state), dtype)
  C = jax.random.normal(keys[3], (batch, length, 1, d_state), dtype)
  return x, dt, A, B, C, jnp.ones((heads,))


def chunk_at(s, length: int) -> int:
  """The SSD chunk at `length` tokens: `bench.chunk_size`, or 0's, the measured table's."""
  return s["chunk_size"] or kernels.chunk_for(length)


def ssd_row(impl, mode, args, shape, s, meta, peak, bandwidth):
  """One SSD timing; a Pallas impl raises ValueError (at trace time) for shapes it refuses."""
  chunk = chunk_at(s, shape[1])
  run_chunk = kernels.chunk_run(impl, chunk, shape[1])  # pallas_gpu caps its own
  fwd = lambda *a: kernels.ssd(*a, chunk_size=chunk, impl=impl)
  # Forward+backward: the gradient of a scalar of y with respect to every input.
  fn = (
    fwd
    if mode == "fwd"
    else jax.grad(lambda *a: jnp.sum(fwd(*a).astype(jnp.float32)), argnums=tuple(range(len(args))))
  )
  compiled, compile_s, xla_flops, _ = compile_fn(jax.jit(fn), args)
  seconds = time_compiled(compiled, args, s["repeats"])
  backward = mode == "fwd+bwd"
  # The FLOPs of the chunk the impl runs, so rooflines compare.
  flops = results.ssd_flops(*shape, run_chunk) * (3 if backward else 1)
  nbytes = results.ssd_bytes(*shape, args[0].dtype.itemsize, backward=backward)
  return dict(
    meta,
    chunk_size=run_chunk,
    compile_s=compile_s,
    ms=1e3 * seconds,
    flops=flops,
    xla_flops=xla_flops,
    bytes=nbytes,
    tflop_per_s=flops / seconds / 1e12,
    gb_per_s=nbytes / seconds / 1e9,
    roofline_pct=results.roofline_fraction(flops, nbytes, seconds, peak, bandwidth),
  )


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
          row = dict(
            meta,
            kind="ssd",
            impl=impl,
            mode=mode,
            batch=shape[0],
            length=length,
            heads=c.heads,
            headdim=c.headdim,
            d_state=c.d_state,
          )
          rows.append(ssd_row(impl, mode, args, shape, s, row, peak, bandwidth))
          log(f"[bench] ssd {impl:<9} {mode:<7} L={length:<6} {rows[-1]['ms']:9.2f} ms")
    except ValueError as err:  # a Pallas kernel refusing these shapes, at trace time
      rows.append(dict(meta, kind="ssd", impl=impl, skipped=str(err)))
      log(f"[bench] ssd {impl}: skipped ({err})")
  return rows


def segmenter_forward(backbone, num_classes: int, channels: int):
  """A jitted `(state, images) -> logits` of `backbone` + UperNet (`channels` wide; 0 = the
  backbone's width, as mmseg's ViT-B configs use 768), and its state."""
  head = SegmenterConfig(
    num_classes=num_classes, channels=channels or backbone.cfg.width, aux_channels=0
  )
  graphdef, state = nnx.split(Segmenter(backbone, head, rngs=nnx.Rngs(0)))
  return jax.jit(lambda st, images: nnx.merge(graphdef, st)(images)[0]), state


def segment_rows(config, s, base, peak):
  """Backbone + UperNet forward rows: the ViT once per attention impl, the student once."""
  seg, rows, batch = config.bench.segment, [], s["segment_batch"]
  for impl in s["attention"]:
    teacher, student = build_pair(config, s, impl)
    pairs = [(teacher, "teacher", f"ViT-{s['teacher']}", impl)]
    if impl == s["attention"][0]:
      pairs.append((student, "student", f"Adventurer-{s['student']}", None))
    for model, role, name, attn in pairs:
      meta = dict(base, model=name, role=role, variant=name.split("-", 1)[1], attention_impl=attn)
      fn, state = segmenter_forward(model, seg.num_classes, seg.channels)
      for res in s["segment_resolutions"]:
        images = jnp.zeros((batch, res, res, 3), jnp.float32)
        try:
          row = timed_row(
            meta,
            peak,
            batch=batch,
            **timed(fn, (state, images), s["repeats"]),
            kind="segment",
            resolution=res,
            tokens=(res // model.cfg.patch) ** 2,
          )
        except Exception as err:  # recorded, not fatal (as the forward rows)
          rows.append(
            dict(meta, kind="segment", resolution=res, error=f"{type(err).__name__}: {err}"[:300])
          )
          log(f"[bench] segment {name} {attn or ''} @{res}: failed ({type(err).__name__})")
          continue
        rows.append(row)
        log(
          f"[bench] segment {name:<18} {attn or '':<6} @{res:<5} {row['img_per_s']:10.2f} img/s "
          f"(compile {row['compile_s']:.1f} s)"
        )
  return rows


def fill_teacher_flops(rows, kind, peak, roles=("teacher",)):
  """XLA counts no FLOPs inside custom calls (cuDNN attention) and a loop's body once (the
  blocked attention), and a PyTorch peer has none: every impl does the same math, so such
  a row of `roles` takes the FLOPs of another row of the same roles at its resolution."""
  timed = [r for r in rows if r["kind"] == kind and r["role"] in roles and "img_per_s" in r]
  for r in timed:
    if r.get("attention_impl") == "blocked":
      r["flops_per_image"] = r["mfu"] = None
  for res in {r["resolution"] for r in timed}:
    same = [r for r in timed if r["resolution"] == res]
    flops = next((r["flops_per_image"] for r in same if r.get("flops_per_image")), None)
    for r in same:
      if r["flops_per_image"] is None and flops:
        r["flops_per_image"], r["mfu"] = flops, results.mfu(flops, r["img_per_s"], peak)


def supervised_rows(config, s, base, peak):
  """The supervised step of the ViT under each attention impl and of the student once."""
  stage = config.bench.supervised
  rows = []
  for impl in s["attention"]:
    teacher, student = build_pair(config, s, impl, num_classes=stage.num_classes)
    pairs = [(teacher, "teacher", f"ViT-{s['teacher']}", impl)]
    if impl == s["attention"][0]:
      pairs.append((student, "student", f"Adventurer-{s['student']}", None))
    for model, role, name, attn in pairs:
      meta = dict(base, model=name, role=role, variant=name.split("-", 1)[1], attention_impl=attn)
      for res in s["supervised_resolutions"]:
        try:
          row = measure_supervised_step(model, res, s, stage, meta, peak)
        except Exception as err:  # recorded, not fatal (as the forward rows)
          rows.append(
            dict(
              meta,
              kind="supervised_step",
              resolution=res,
              error=f"{type(err).__name__}: {str(err)[:300]}",
            )
          )
          log(f"[bench] supervised step {name} {attn or ''} @{res}: failed ({type(err).__name__})")
          continue
        rows.append(row)
        log(
          f"[bench] supervised step {name:<18} {attn or '':<6} @{res:<5} batch {row['batch']}: "
          f"{row['img_per_s']:.2f} img/s (compile {row['compile_s']:.1f} s)"
        )
  return rows


def run(config, workdir):
  """Runs every measurement; writes workdir/bench/{bench.json,bench.png}; prints a table."""
  s = settings(config)
  device = jax.devices()[0]
  kind = device.device_kind
  peak = results.peak_flops(kind, s["dtype"], s["peak_override"])
  bandwidth = results.lookup(results.PEAK_BYTES_PER_S, kind)
  base = dict(
    device_kind=kind, backend=jax.default_backend(), jax_version=jax.__version__, dtype=s["dtype"]
  )
  out_dir = os.path.join(workdir, "bench")  # the stage's own folder, like every stage
  os.makedirs(out_dir, exist_ok=True)
  start = time.perf_counter()
  rows = [measure_matmul(s["matmul_size"], s["dtype"], max(10, s["repeats"]), base)]
  log(f"[bench] matmul {s['matmul_size']}² {s['dtype']}: {rows[0]['flop_per_s'] / 1e9:.0f} GFLOP/s")
  peers = pytorch_peers(s["pytorch"])

  if "forward" in s["parts"]:
    for impl in s["attention"]:
      teacher, student = build_pair(config, s, impl)
      pairs = [(teacher, "teacher", f"ViT-{s['teacher']}", impl)]
      if impl == s["attention"][0]:  # the student has no attention: measure it once
        pairs.append((student, "student", f"Adventurer-{s['student']}", None))
      for model, role, name, attn in pairs:
        meta = dict(base, model=name, role=role, variant=name.split("-", 1)[1], attention_impl=attn)
        for res in s["resolutions"]:
          try:
            row = measure_forward(model, res, s["batch"], s["repeats"], meta, peak)
          except Exception as err:
            # A failure (e.g. cuDNN refusing a shape, or memory) is recorded, not fatal.
            rows.append(
              dict(
                meta,
                kind="forward",
                resolution=res,
                batch=s["batch"],
                error=f"{type(err).__name__}: {str(err)[:300]}",
              )
            )
            log(f"[bench] {name} {attn or ''} @{res}: failed ({type(err).__name__})")
            continue
          rows.append(row)
          log(
            f"[bench] {name:<18} {attn or '':<6} @{res:<5} {row['img_per_s']:10.2f} img/s "
            f"{row['latency_ms']:10.1f} ms  (compile {row['compile_s']:.1f} s)"
          )
          if s["max_batch"]:
            rows.append(
              dict(
                meta,
                kind="max_batch",
                resolution=res,
                batch=largest_batch(model, res, s["batch"], s["max_batch_limit"]),
              )
            )
    if peers is not None:
      rows.extend(pytorch_rows(config, s, base, peers))
    fill_teacher_flops(rows, "forward", peak)
    fill_teacher_flops(rows, "forward", peak, roles=("student", "peer"))
    results.attention_speedups(rows)

  if "train_step" in s["parts"]:
    rows += measure_train_step(config, s, base, peak)
  if "supervised_step" in s["parts"]:
    rows.extend(supervised_rows(config, s, base, peak))
    fill_teacher_flops(rows, "supervised_step", peak)
  if "segment" in s["parts"]:
    rows.extend(segment_rows(config, s, base, peak))
    fill_teacher_flops(rows, "segment", peak)
  if "ssd" in s["parts"]:
    rows.extend(measure_ssd(config, s, base, peak, bandwidth))
  results.matmul_fractions(rows, rows[0]["flop_per_s"])

  result = dict(
    meta=dict(
      base,
      peak_flops=peak,
      peak_bytes_per_s=bandwidth,
      matmul_flop_per_s=rows[0]["flop_per_s"],
      pytorch_threads=peers.threads() if peers else None,
      settings=s,
      wall_s=time.perf_counter() - start,
      paper=dict(speedup=results.PAPER_SPEEDUP, flop_ratio=results.PAPER_FLOP_RATIO),
    ),
    rows=rows,
    speedups=results.speedups(rows),
    segment_speedups=results.speedups(rows, "segment", results.PAPER_SEGMENT_SPEEDUP),
  )
  if main_process():
    with open(os.path.join(out_dir, "bench.json"), "w", encoding="utf-8") as f:
      json.dump(result, f, indent=2, default=str)
    results.plot(result, os.path.join(out_dir, "bench.png"))
    if result["segment_speedups"]:
      results.plot_segment(result, os.path.join(out_dir, "bench_segment.png"))
    log(results.table(result))
    log(f"[bench] wrote {out_dir}/bench.json and bench.png ({result['meta']['wall_s']:.0f} s)")
  return result
