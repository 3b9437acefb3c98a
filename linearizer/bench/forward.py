"""The forward rows (part `forward`): inference throughput and latency of each model at each
resolution (the ViT once per attention impl JAX offers), FLOPs per image, MFU, memory; the
largest batch that fits (accelerators); and, where torch and transformers are installed, the
PyTorch peers (`torch_peers`: Hugging Face's ViT with SDPA attention, our PyTorch
Adventurer), so that the speed-up is against the fastest ViT of any implementation.
"""

import dataclasses
import importlib
import importlib.util

import jax
import jax.numpy as jnp
from flax import nnx

from linearizer import models
from linearizer.bench import results
from linearizer.bench.rows import each_model, failed_row, fill_teacher_flops
from linearizer.bench.settings import Settings
from linearizer.bench.timing import is_oom, timed, timed_row
from linearizer.log import log


def forward_fn(model):
  """A jitted `(state, images) -> tokens`: the whole backbone, no head."""
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda st, images: nnx.merge(graphdef, st)(images).tokens)
  return fn, state


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


def pytorch_rows(config, s: Settings, base, peers):
  """Forward rows of the PyTorch peers at every resolution: HF ViT (role teacher, so that the
  speed-up is against it when it is the fastest ViT) and our PyTorch Adventurer (role peer)."""
  b, rows = config.bench, []
  models_ = []
  if b.teacher_kind == "vit":
    cfg = models.vit_config(s.teacher, **dict(b.teacher_overrides))
    models_.append(("vit", cfg, cfg.patch, f"ViT-{s.teacher} (PyTorch)", "teacher", "sdpa"))
  if b.student_kind == "adventurer":
    arch = models.ARCHITECTURES["adventurer"]
    cfg = arch.variant(s.student, **dict(b.student_overrides))
    name = f"Adventurer-{s.student} (PyTorch)"
    models_.append(("adventurer", dataclasses.asdict(cfg), cfg.patch, name, "peer", None))
  for kind, cfg, patch, name, role, attn in models_:
    meta = dict(base, model=name, role=role, variant=name.split("-", 1)[1].split()[0])
    meta.update(attention_impl=attn, library=f"torch {peers.torch.__version__}")
    for res in s.resolutions:
      at_res = cfg
      if kind == "adventurer":  # the table's chunk at this length, as the JAX student's xla
        # scan takes it (a Pallas kernel caps its own chunk, so on a GPU they may differ)
        at_res = dict(cfg, chunk_size=s.chunk_at((res // patch) ** 2 + 2))
      try:
        seconds = peers.forward_seconds(kind, at_res, res, s.batch, s.dtype, s.repeats)
      except Exception as err:  # recorded, not fatal (as the JAX rows)
        rows.append(failed_row(meta, "forward", res, err, name, detail=False))
        continue
      # No FLOPs (the same math as the JAX model's: filled from its row) and no memory
      # figures: JAX's device statistics say nothing of torch's.
      row = timed_row(
        meta,
        None,
        batch=s.batch,
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


def forward_rows(config, s: Settings, base, peak, peers) -> list:
  """Every forward row (and max_batch row), the PyTorch peers' after the JAX models' where
  `peers` (`pytorch_peers`) is given; with the FLOPs XLA cannot count filled and each
  attention impl's slowdown against the fastest."""
  rows = []
  for model, name, attn, meta in each_model(config, s, base):
    for res in s.resolutions:
      try:
        row = measure_forward(model, res, s.batch, s.repeats, meta, peak)
      except Exception as err:  # e.g. cuDNN refusing a shape, or memory
        rows.append(failed_row(meta, "forward", res, err, f"{name} {attn or ''}", batch=s.batch))
        continue
      rows.append(row)
      log(
        f"[bench] {name:<18} {attn or '':<6} @{res:<5} {row['img_per_s']:10.2f} img/s "
        f"{row['latency_ms']:10.1f} ms  (compile {row['compile_s']:.1f} s)"
      )
      if s.max_batch:
        rows.append(
          dict(
            meta,
            kind="max_batch",
            resolution=res,
            batch=largest_batch(model, res, s.batch, s.max_batch_limit),
          )
        )
  if peers is not None:
    rows.extend(pytorch_rows(config, s, base, peers))
  fill_teacher_flops(rows, "forward", peak)
  fill_teacher_flops(rows, "forward", peak, roles=("student", "peer"))
  results.attention_speedups(rows)
  return rows
