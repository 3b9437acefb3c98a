"""The benchmark's settings (linearizer/bench/settings.py): the config's flags, and every
empty / 0 value resolved once, for this backend; and the row a failed measurement writes.
"""

import dataclasses

import jax
import pytest

from configs import bench as bench_config
from linearizer import stages
from linearizer.bench import rows as bench_rows
from linearizer.bench.settings import Settings
from linearizer.errors import UserError


def test_config_args():
  c = bench_config.get_config("teacher=B/16,student=S/16,resolutions=224+448,batch=4")
  assert (c.bench.teacher, c.bench.student, c.bench.batch) == ("B/16", "S/16", 4)
  assert tuple(c.bench.resolutions) == (224, 448) and tuple(c.stages) == ("bench",)
  with pytest.raises(ValueError, match="Unknown config arg"):
    bench_config.get_config("resolution=224")


def test_settings_resolve_the_backend_defaults_once():
  s = Settings.from_config(bench_config.get_config("teacher=B/16,batch=4,parts=ssd"))
  assert (s.teacher, s.batch, s.parts) == ("B/16", 4, ("ssd",))
  if jax.default_backend() == "cpu":  # the CPU's defaults for what the config leaves empty
    assert (s.accel, s.student, s.dtype, s.repeats, s.max_batch) == (
      False,
      "Ti/16",
      "float32",
      5,
      False,
    )
    assert s.attention == ("xla", "blocked") and s.resolutions == (224, 448, 512, 768, 1024)
  # bench.json's meta.settings: the fields, in order, as the settings dict had them.
  assert list(dataclasses.asdict(s))[:3] == ["accel", "parts", "teacher"]
  with pytest.raises(dataclasses.FrozenInstanceError):
    s.batch = 8
  assert s.chunk_at(198) > 0 and dataclasses.replace(s, chunk_size=32).chunk_at(198) == 32
  with pytest.raises(UserError, match="kernels"):
    Settings.from_config(bench_config.get_config("parts=kernels"))


def test_failed_row_records_the_error_not_the_timings():
  meta = dict(model="ViT-Ti/16", role="teacher")
  err = MemoryError("x" * 400)
  row = bench_rows.failed_row(meta, "forward", 64, err, "ViT-Ti/16 xla", batch=2)
  assert row == dict(
    meta, kind="forward", resolution=64, batch=2, error="MemoryError: " + "x" * 300
  )
  brief = bench_rows.failed_row(meta, "forward", 64, err, "ViT-Ti/16 (PyTorch)", detail=False)
  assert brief["error"] == "MemoryError" and "img_per_s" not in brief


def test_a_config_without_a_data_block_passes_the_stage_checks():
  """The bench config has no `data` block; the packing check must not need one."""
  stages.check_config(bench_config.get_config("smoke,parts=packed"))
