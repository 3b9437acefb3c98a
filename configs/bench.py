"""The benchmark: teacher (ViT) vs student (Adventurer) speed, memory, FLOPs; SSD kernels.

  python main.py --config configs/bench.py --workdir /tmp/bench
  python main.py --config configs/bench.py:teacher=B/16,student=B/16,resolutions=224+448 \
      --workdir /tmp/bench

Empty / 0 settings mean "the default for this backend" (linearizer/bench/settings.py):
B/16 vs Adventurer-B/16, bf16, batch 32, resolutions up to 2048² on an accelerator;
Ti/16 vs Adventurer-Ti/16, float32, batch 1, up to 1024² on CPU (about 5 minutes on 2 cores).
Args: smoke, teacher, student, resolutions (joined by '+'), batch, dtype, chunk_size,
ssd_lengths (joined by '+'), peak_flops, parts (joined by '+': forward, train_step,
supervised_step, segment, ssd, packed;
`parts=ssd` times the SSD kernels alone; `packed`, images of their own sizes padded vs
packed, is opt-in: `parts=forward+packed`). `:smoke` runs tiny models in seconds (tests).
"""

import ml_collections

from configs import common, tool_blocks


def sizes(text):
  return tuple(int(v) for v in text.split("+") if v)


def get_config(arg=None):
  arg = common.parse_arg(
    arg,
    smoke=False,
    teacher="",
    student="",
    resolutions="",
    batch=0,
    dtype="",
    chunk_size=0,
    ssd_lengths="",
    peak_flops=0.0,
    parts="forward+train_step+supervised_step+segment+ssd",
  )
  c = ml_collections.ConfigDict(dict(seed=0, stages=("bench",)))
  c.bench = tool_blocks.bench(
    parts=tuple(arg.parts.split("+")),  # e.g. parts=ssd: the kernels alone
    teacher=arg.teacher,
    student=arg.student,
    resolutions=sizes(arg.resolutions),
    batch=arg.batch,
    dtype=arg.dtype,
    chunk_size=arg.chunk_size,
    peak_flops=arg.peak_flops,
  )
  c.bench.ssd.lengths = sizes(arg.ssd_lengths)
  if arg.smoke:
    b = c.bench
    b.teacher, b.student = b.teacher or "Ti/16", b.student or "Ti/16"
    b.teacher_overrides = dict(width=32, depth=2, num_heads=2, mlp_dim=64)
    b.student_overrides = dict(width=32, depth=2, headdim=16, d_state=16)
    b.resolutions = b.resolutions or (32, 64)
    b.batch, b.repeats, b.chunk_size = b.batch or 2, 2, b.chunk_size or 16
    b.matmul_size = 256
    b.train_resolution, b.train_batch = 32, 2
    b.supervised.update(batch=2, resolutions=(32, 64), num_classes=10)
    b.segment.update(batch=1, resolutions=(32, 64), num_classes=5)
    b.ssd.update(batch=1, heads=2, headdim=16, d_state=16, lengths=b.ssd.lengths or (66,))
    b.packed.update(workload_images=6, median_side=32, row_tokens=64, row_images=4)
  return c.lock()
