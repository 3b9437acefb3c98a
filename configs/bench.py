"""The benchmark: teacher (ViT) vs student (Adventurer) speed, memory, FLOPs; SSD kernels.

  python main.py --config configs/bench.py --workdir /tmp/bench
  python main.py --config configs/bench.py:teacher=B/16,student=B/16,resolutions=224+448 \
      --workdir /tmp/bench

Empty / 0 settings mean "the default for this backend" (linearizer.bench.settings):
B/16 vs Adventurer-B/16, bf16, batch 32, resolutions up to 2048² on an accelerator;
Ti/16 vs Adventurer-Ti/16, float32, batch 1, up to 1024² on CPU (about 5 minutes on 2 cores).
Args: smoke, teacher, student, resolutions (joined by '+'), batch, dtype, chunk_size,
ssd_lengths (joined by '+'), peak_flops, parts (joined by '+': forward, train_step, ssd;
`parts=ssd` times the SSD kernels alone). `:smoke` runs tiny models in seconds (tests).
"""
import ml_collections

from configs import common


def sizes(text):
  return tuple(int(v) for v in text.split("+") if v)


def get_config(arg=None):
  arg = common.parse_arg(arg, smoke=False, teacher="", student="", resolutions="", batch=0,
                         dtype="", chunk_size=0, ssd_lengths="", peak_flops=0.0,
                         parts="forward+train_step+ssd")
  c = ml_collections.ConfigDict(dict(seed=0, stages=("bench",)))
  c.bench = ml_collections.ConfigDict(dict(
      parts=tuple(arg.parts.split("+")),  # forward, train_step, ssd (e.g. parts=ssd: kernels)
      teacher=arg.teacher,          # ViT variant; '' = B/16 on accelerators, Ti/16 on CPU
      student=arg.student,          # Adventurer variant; likewise
      teacher_overrides={},         # ViTConfig fields, e.g. style='clip'
      student_overrides={},         # AdventurerConfig fields
      resolutions=sizes(arg.resolutions),  # () = 224…1024 (…2048 on accelerators)
      batch=arg.batch,              # forward batch; 0 = 32 on accelerators, 1 on CPU
      dtype=arg.dtype,              # '' = bfloat16 on accelerators, float32 on CPU
      repeats=0,                    # timed calls per measurement (median); 0 = 10; 5 on CPU
      chunk_size=arg.chunk_size,    # student SSD chunk; 0 = 256 on accelerators, 64 on CPU
      attention_impls=(),           # ViT attention impls; () = xla (+ cudnn on GPU)
      train_resolution=224,         # the distillation train step's resolution
      train_batch=0,                # 0 = 64 on accelerators, 2 on CPU
      max_batch=None,               # search the largest batch that fits; None = accelerators only
      max_batch_limit=4096,
      peak_flops=arg.peak_flops,    # FLOP/s for MFU; 0 = the table in linearizer/bench.py
      ssd=dict(batch=0, heads=24, headdim=64, d_state=64,  # batch 0 = 8, 1 on CPU
               lengths=sizes(arg.ssd_lengths)),  # () = 198…16386 (≤ 4098 on CPU)
  ))
  if arg.smoke:
    b = c.bench
    b.teacher, b.student = b.teacher or "Ti/16", b.student or "Ti/16"
    b.teacher_overrides = dict(width=32, depth=2, num_heads=2, mlp_dim=64)
    b.student_overrides = dict(width=32, depth=2, headdim=16, d_state=16)
    b.resolutions = b.resolutions or (32, 64)
    b.batch, b.repeats, b.chunk_size = b.batch or 2, 2, b.chunk_size or 16
    b.train_resolution, b.train_batch = 32, 2
    b.ssd.update(batch=1, heads=2, headdim=16, d_state=16, lengths=b.ssd.lengths or (66,))
  return c.lock()
