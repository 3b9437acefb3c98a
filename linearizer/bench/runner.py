"""The benchmark tool's entry: `run` reads the settings, measures the parts the config
names, and writes the report. Teacher (ViT) vs student (Adventurer) speed, memory and FLOPs.

  python main.py --config configs/bench.py[:teacher=B/16,resolutions=224+448] --workdir DIR

Measures, on whatever device JAX runs on (each part its own module):
  forward     inference throughput and latency of each model at each resolution (the ViT once
              per attention implementation JAX offers), FLOPs per image from XLA's cost
              analysis, MFU, memory (`forward`);
  train_step  the real distillation step (teacher frozen, student trained) at the training
              resolution, jitted by sharding.jit_step on a one-device mesh (`steps`);
  supervised_step  a supervised training step (forward, backward, AdamW) of each model (the
              ViT once per attention implementation) at batch 128 or the largest that fits:
              the protocol the paper's speed and memory table most likely follows (`steps`);
  max_batch   on accelerators, the largest power-of-two batch that fits per model/resolution
              (`forward`);
  segment     backbone + UperNet head forward (no auxiliary head), teacher vs student at
              equal patch size, at segmentation resolutions (512² … 2048²): where the
              paper's 2.74× (ADE20K) and 4.21× (Cityscapes) come from (`segment`);
  ssd         forward and forward+backward of every `kernels.ssd` impl, with the FLOPs and
              bytes the chunked algorithm must do and the fraction of the device's roofline
              (`ssd`);
  packed      a workload of images of their own sizes as one padded square batch and as
              packed rows, each model: img/s and the share of tokens that are padding
              (`packed`; opt-in: parts=packed).

Beside them, in the same run: the device's own matmul rate (a large square matmul in the
run's dtype), against which every row's FLOP/s is also given (`matmul_pct`: MFU on a CPU,
which has no datasheet peak here); and, where torch and transformers are installed, the
PyTorch peers (`torch_peers`: Hugging Face's ViT with SDPA attention, our PyTorch
Adventurer) as forward rows, so that the speed-up is against the fastest ViT of any
implementation. The settings are `settings.Settings`; the timing protocol is `timing`'s;
`report` writes DIR/bench/bench.json, DIR/bench/bench.png and prints a table.
"""

import dataclasses
import os
import time

import jax

from linearizer.bench import forward, packed, report, results, segment, ssd, steps
from linearizer.bench.rows import fill_teacher_flops
from linearizer.bench.settings import Settings
from linearizer.bench.timing import measure_matmul
from linearizer.log import log


def run(config, workdir):
  """Runs every measurement; writes workdir/bench/{bench.json,bench.png}; prints a table."""
  s = Settings.from_config(config)
  device = jax.devices()[0]
  kind = device.device_kind
  peak = results.peak_flops(kind, s.dtype, s.peak_override)
  bandwidth = results.lookup(results.PEAK_BYTES_PER_S, kind)
  base = dict(
    device_kind=kind, backend=jax.default_backend(), jax_version=jax.__version__, dtype=s.dtype
  )
  out_dir = os.path.join(workdir, "bench")  # the stage's own folder, like every stage
  os.makedirs(out_dir, exist_ok=True)
  start = time.perf_counter()
  rows = [measure_matmul(s.matmul_size, s.dtype, max(10, s.repeats), base)]
  log(f"[bench] matmul {s.matmul_size}² {s.dtype}: {rows[0]['flop_per_s'] / 1e9:.0f} GFLOP/s")
  peers = forward.pytorch_peers(s.pytorch)

  if "forward" in s.parts:
    rows.extend(forward.forward_rows(config, s, base, peak, peers))
  if "train_step" in s.parts:
    rows.extend(steps.measure_train_step(config, s, base, peak))
  if "supervised_step" in s.parts:
    rows.extend(steps.supervised_rows(config, s, base, peak))
    fill_teacher_flops(rows, "supervised_step", peak)
  if "segment" in s.parts:
    rows.extend(segment.segment_rows(config, s, base, peak))
    fill_teacher_flops(rows, "segment", peak)
  if "ssd" in s.parts:
    rows.extend(ssd.measure_ssd(config, s, base, peak, bandwidth))
  if "packed" in s.parts:
    rows.extend(packed.packed_rows(config, s, base, peak))
  results.matmul_fractions(rows, rows[0]["flop_per_s"])

  result = dict(
    meta=dict(
      base,
      peak_flops=peak,
      peak_bytes_per_s=bandwidth,
      matmul_flop_per_s=rows[0]["flop_per_s"],
      pytorch_threads=peers.threads() if peers else None,
      settings=dataclasses.asdict(s),
      wall_s=time.perf_counter() - start,
      paper=dict(speedup=results.PAPER_SPEEDUP, flop_ratio=results.PAPER_FLOP_RATIO),
    ),
    rows=rows,
    speedups=results.speedups(rows),
    segment_speedups=results.speedups(rows, "segment", results.PAPER_SEGMENT_SPEEDUP),
  )
  report.write(result, out_dir)
  return result
