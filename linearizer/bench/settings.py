"""The benchmark's settings: `config.bench` read once, every 'auto' value resolved.

`config.bench` leaves most values empty / 0, meaning "the default for this backend"
(configs/tool_blocks.py's `bench`); `Settings.from_config` is the one place those defaults
live. The rest of the package reads typed fields of the frozen result, never the config's
keys (bar the blocks it passes on whole: the models' overrides, ssd's shape, the supervised
and distillation stages, segment's head).
"""

import dataclasses

import jax

import kernels
from linearizer.errors import UserError

PARTS = ("forward", "train_step", "supervised_step", "segment", "ssd", "packed")  # bench.parts


@dataclasses.dataclass(frozen=True)
class Settings:
  """The resolved `config.bench`; bench.json's meta.settings is `dataclasses.asdict` of it
  (so the field names and their order are that file's keys)."""

  accel: bool  # an accelerator (not the CPU) runs the measurements
  parts: tuple[str, ...]  # which of PARTS to measure
  teacher: str  # the teacher's variant, e.g. "B/16"
  student: str  # the student's variant
  resolutions: tuple[int, ...]  # the forward rows' resolutions
  batch: int  # the forward rows' batch
  dtype: str  # the models' and the matmul's dtype
  repeats: int  # timed calls per measurement (the median is kept)
  chunk_size: int  # the student's SSD chunk; 0 = kernels.CHUNK_TABLE's for each length
  attention: tuple[str, ...]  # the ViT's attention impls, the first also the student's pass
  matmul_size: int  # the side of the square matmul timed as the device's rate
  pytorch: bool  # PyTorch peer rows where torch and transformers are installed
  train_resolution: int  # the distillation step's resolution
  train_batch: int  # ... and batch
  supervised_batch: int  # the supervised step's batch (halved on accelerators until it fits)
  supervised_resolutions: tuple[int, ...]  # ... and resolutions
  max_batch: bool  # search the largest forward batch that fits
  max_batch_limit: int  # ... up to this batch
  segment_resolutions: tuple[int, ...]  # backbone + UperNet rows' resolutions
  segment_batch: int  # ... and batch
  ssd_batch: int  # the SSD kernel rows' batch
  ssd_lengths: tuple[int, ...]  # ... and sequence lengths
  peak_override: float  # the device's peak FLOP/s for MFU; 0 = results.PEAK_BF16's

  @classmethod
  def from_config(cls, config) -> "Settings":
    """`config.bench` with every 'auto' (empty / 0) value resolved for this backend."""
    b = config.bench
    accel = jax.default_backend() != "cpu"
    unknown = set(b.parts) - set(PARTS)
    if unknown:
      raise UserError(f"bench.parts: unknown {sorted(unknown)}; expected some of {PARTS}.")
    return cls(
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
      ssd_lengths=tuple(b.ssd.lengths)
      or ((198, 1026, 4098, 16386) if accel else (198, 1026, 4098)),
      peak_override=b.peak_flops,
    )

  def chunk_at(self, length: int) -> int:
    """The SSD chunk at `length` tokens: `chunk_size`, or 0's, the measured table's."""
    return self.chunk_size or kernels.chunk_for(length)
