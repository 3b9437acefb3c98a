"""The teacher-feature cache: its rows are the teacher's outputs for the views they name, a
cached step is the uncached step, the schedule cycles through the stored views, and a cache
of another setup, a missing one or one that does not fit is refused."""

import dataclasses
import json
import os
import pathlib
import shutil
import types

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import common
from linearizer import data, models, optim, sharding, train
from linearizer.distillation import cache_files, distill, teacher_cache
from linearizer.errors import UserError

SIZE, PATCH = 16, 4
STUDENT = dict(image_size=SIZE, width=32, depth=2, headdim=16, d_state=16, chunk_size=16)
TEACHER = dict(image_size=SIZE, width=32, depth=2, num_heads=2, mlp_dim=64)
EXAMPLES, VIEWS, BATCH = 10, 3, 4


def stage_config(**loss):
  return ml_collections.ConfigDict(
    dict(
      steps=5,
      optim=common.optim(lr=1e-3, warmup_steps=1),
      loss=common.distill_loss(num_stages=2, **loss),
      teacher_input="resample",
    )
  )


@pytest.fixture(scope="module")
def setup():
  teacher = models.build("vit", f"Ti/{PATCH}", seed=3, **TEACHER)
  student = models.build("adventurer", f"Ti/{PATCH}", seed=4, **STUDENT)
  digits = data.get_source("digits", "train")
  source = data.Part(digits, np.arange(EXAMPLES), "digits[:10]")
  dcfg = common.data("digits", SIZE, crop_scale=(0.3, 1.0))
  return types.SimpleNamespace(
    teacher=teacher, student=student, source=source, data=dcfg, config=stage_config()
  )


def new_cache(setup, directory, dtype="float32", seed=0, views=VIEWS, fingerprint=None):
  s = setup
  v = teacher_cache.Views(
    s.source,
    s.data,
    seed=seed,
    views=views,
    mean=s.student.cfg.mean,
    std=s.student.cfg.std,
    process_index=0,
    process_count=1,
  )
  return teacher_cache.TeacherCache(
    str(directory),
    v,
    distill.make_teacher_targets(s.teacher, s.student.cfg, s.config),
    nnx.state(s.teacher, nnx.Param),
    fingerprint or {"seed": seed, "image_size": SIZE},
    dtype,
    SIZE,
    local_batch=BATCH,
  )


def write(cache, setup, mode="write", trained_views=10**6):
  return teacher_cache.prepare(
    mode,
    cache,
    trained_views=trained_views,
    teacher_params=nnx.state(setup.teacher, nnx.Param),
    mesh=sharding.make_mesh(),
    rules=(),
    fsdp_min_size=2**18,
    workers=0,
  )


@pytest.fixture(scope="module")
def written(setup, tmp_path_factory):
  directory = tmp_path_factory.mktemp("cache")
  cache = write(new_cache(setup, directory), setup)
  return cache, directory


def test_rows_are_the_teacher_outputs_of_their_views(setup, written):
  """Every row, read back, equals the teacher run now on the view the row names."""
  cache, _ = written
  targets = jax.jit(distill.make_teacher_targets(setup.teacher, setup.student.cfg, setup.config))
  arrays = teacher_cache.open_arrays(
    cache.directory, cache.leaves, np.float32, len(cache.views), "r"
  )
  params = nnx.state(setup.teacher, nnx.Param)
  # (Run on one image, not in its write batch of 4: f32 rounding differs by batch.)
  for k in (0, 1, 2, 7, len(cache.views) - 1):  # first, other views, the padded last batch
    image, _, check = cache.views.view(k)
    expected = jax.tree.leaves(targets(params, image[None]))
    for stored, want in zip(arrays["leaves"], expected, strict=True):
      np.testing.assert_allclose(stored[k], np.asarray(want)[0], rtol=1e-5, atol=1e-5)
    assert arrays["checks"][k] == check
  # Three views of one example are three different augmentations.
  first = [cache.views.view(k)[0] for k in range(VIEWS)]
  assert not np.allclose(first[0], first[1]) and not np.allclose(first[1], first[2])


def test_bfloat16_rows_round_the_float32_ones(setup, written, tmp_path):
  cache32, _ = written
  cache16 = write(new_cache(setup, tmp_path, dtype="bfloat16"), setup)
  a32 = teacher_cache.open_arrays(cache32.directory, cache32.leaves, np.float32, 30, "r")
  a16 = teacher_cache.open_arrays(
    cache16.directory, cache16.leaves, teacher_cache.DTYPES["bfloat16"], 30, "r"
  )
  for x32, x16 in zip(a32["leaves"], a16["leaves"], strict=True):
    np.testing.assert_array_equal(np.asarray(x16), np.asarray(x32).astype(x16.dtype))
  assert cache16.bytes < 0.51 * cache32.bytes + 8 * 30


def test_schedule_cycles_through_the_stored_views(setup, written):
  """Epoch e visits every example once, in a shuffled order, at view e mod V; a stream
  started at step s yields what the stream from 0 yields from step s (resume)."""
  cache, _ = written
  stream = cache.batches(seed=0, workers=0)
  batches = [b for _, b in zip(range(EXAMPLES * 2 * VIEWS // BATCH), stream(0))]
  images = np.concatenate([b.image for b in batches])
  views = [cache.views.view(k)[0] for k in range(len(cache.views))]
  rows = [next(k for k, v in enumerate(views) if np.array_equal(v, im)) for im in images]
  for epoch in range(len(rows) // EXAMPLES):
    epoch_rows = rows[epoch * EXAMPLES : (epoch + 1) * EXAMPLES]
    assert sorted(epoch_rows) == [j * VIEWS + epoch % VIEWS for j in range(EXAMPLES)]
  assert rows[:EXAMPLES] != sorted(rows[:EXAMPLES])  # shuffled
  resumed = next(stream(3))
  np.testing.assert_array_equal(resumed.image, batches[3].image)
  for a, b in zip(jax.tree.leaves(resumed.teacher), jax.tree.leaves(batches[3].teacher)):
    np.testing.assert_array_equal(a, b)


def test_a_cached_step_is_the_uncached_step(setup, written):
  """Same state, same view, same rng: the step from the cache gives the same losses and
  parameters as the step that runs the teacher."""
  cache, _ = written
  s = setup
  batch = next(cache.batches(seed=0, workers=0)(0))
  distiller = distill.Distiller(s.student, s.teacher.cfg.width, rngs=nnx.Rngs(5))
  tx = optim.make_optimizer(s.config.optim, s.config.steps)
  _, state = train.init_state(distiller, tx, ema=False)
  plain = jax.jit(distill.make_distill_step(distiller, s.teacher, tx, s.config))
  cached = jax.jit(distill.make_distill_step(distiller, s.teacher, tx, s.config, cached=True))
  rng = jax.random.key(1)
  after_plain, m_plain = plain(
    state, nnx.state(s.teacher, nnx.Param), data.Batch(batch.image, batch.label), rng
  )
  after_cached, m_cached = cached(state, batch, rng)
  for k in ("loss", "am", "mp", "grad_norm"):
    np.testing.assert_allclose(float(m_cached[k]), float(m_plain[k]), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(after_cached.params), jax.tree.leaves(after_plain.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def assert_same_files(cache, other):
  """The same bytes in every file; the same rows recorded, each checksummed (written in
  batches of another size, the checksums' row ranges differ)."""
  for name in sorted(os.listdir(cache.directory)):
    with (
      open(os.path.join(cache.directory, name), "rb") as f,
      open(os.path.join(other.directory, name), "rb") as g,
    ):
      if name == "progress.json":
        assert json.load(f)["rows"] == json.load(g)["rows"]
      else:
        assert f.read() == g.read(), name
  other.verify()


@pytest.mark.parametrize("batch", [BATCH, 3])
def test_a_stopped_write_resumes_where_it_stopped(setup, written, tmp_path, batch):
  """Also with another batch size (a run on more or fewer devices): progress is in rows."""
  cache, directory = written
  copy = tmp_path / "copy"
  shutil.copytree(directory, copy)
  part = new_cache(setup, copy)
  part.local_batch, part.write_batches = batch, -(-len(part.views) // batch)
  arrays = teacher_cache.open_arrays(part.directory, part.leaves, np.float32, 30, "r+")
  done = 2 * BATCH  # rows written before the stop: those after them never reached the disk
  for a in arrays["leaves"]:
    a[done:] = 0
    a.flush()
  with open(os.path.join(part.directory, "progress.json")) as f:
    record = json.load(f)  # as the stopped write left it: the batches before the stop
  with open(os.path.join(part.directory, "progress.json"), "w") as f:
    json.dump({"rows": done, "digests": [d for d in record["digests"] if d[1] <= done]}, f)
  assert not part.complete()
  write(part, setup)
  assert part.complete()
  assert_same_files(cache, part)


def test_a_signal_stops_the_write_with_its_rows_kept(setup, written, tmp_path, monkeypatch):
  """Ctrl-C / SIGTERM while the cache is written: it stops at the next progress record,
  with the rows so far on disk, and the same command finishes it."""
  cache, _ = written
  monkeypatch.setattr(teacher_cache, "PROGRESS_EVERY", 2)
  monkeypatch.setattr(teacher_cache.preemption, "requested", lambda: True)
  part = new_cache(setup, tmp_path / "c")
  with pytest.raises(teacher_cache.preemption.Stopped):
    write(part, setup)
  assert part.progress() == 2 * BATCH and not part.complete()
  monkeypatch.setattr(teacher_cache.preemption, "requested", lambda: False)
  write(part, setup)
  assert_same_files(cache, part)


def test_write_batches_past_this_process_end_store_nothing(setup, written, tmp_path):
  """Every process runs as many write batches as the one with most rows (they are
  collective): the extra ones on a process with fewer rows write nothing."""
  cache, _ = written
  part = new_cache(setup, tmp_path / "c")
  part.write_batches += 2
  write(part, setup)
  assert_same_files(cache, part)


def test_the_fingerprint_names_the_teacher_fields_and_the_examples(setup):
  cfg = setup.teacher.cfg
  fields = teacher_cache.teacher_fields(cfg)
  assert fields["pos_interpolation"] == "bicubic" and "attention_impl" not in fields
  changed = dataclasses.replace(cfg, pos_interpolation="bicubic_offset")
  assert teacher_cache.differences(fields, teacher_cache.teacher_fields(changed))
  faster = dataclasses.replace(cfg, attention_impl="blocked")
  assert teacher_cache.teacher_fields(faster) == fields
  # The RoPE teachers' fields: absent at a plain ViT's defaults (a cache written before
  # them still matches), fingerprinted once set.
  assert not set(cache_files.LATER_FIELDS) & set(fields)
  rotary = dataclasses.replace(cfg, rope="dinov3", pos_embed=False)
  differ = teacher_cache.differences(fields, teacher_cache.teacher_fields(rotary))
  assert {line.split(":")[0] for line in differ} == {"rope", "pos_embed"}
  digits = data.get_source("digits", "train")
  a, b = data.Subset(digits, 100, seed=0), data.Subset(digits, 100, seed=1)
  assert a.name == b.name  # the name alone would take one for the other
  assert teacher_cache.source_digest(a) != teacher_cache.source_digest(b)
  assert teacher_cache.source_digest(a) == teacher_cache.source_digest(data.Subset(digits, 100))


def test_a_cache_of_another_setup_is_refused_naming_what_differs(setup, written):
  _, directory = written
  other = new_cache(setup, directory, seed=1, fingerprint={"seed": 1, "image_size": 24})
  with pytest.raises(UserError, match="another setup") as err:
    write(other, setup, mode="auto")
  assert "image_size: cached 16 vs now 24" in str(err.value)
  assert "seed: cached 0 vs now 1" in str(err.value)
  retrained = models.build("vit", f"Ti/{PATCH}", seed=9, **TEACHER)
  s = types.SimpleNamespace(**{**vars(setup), "teacher": retrained})
  with pytest.raises(UserError, match="teacher_weights: cached"):
    write(new_cache(s, directory), s, mode="read")


def test_read_refuses_a_missing_cache_and_auto_uses_one_only_where_it_pays(setup, tmp_path):
  with pytest.raises(UserError, match="teacher_cache='read'.*not there"):
    write(new_cache(setup, tmp_path / "none"), setup, mode="read")
  # The stage reads no more views than the cache would hold: nothing saved, nothing written.
  assert write(new_cache(setup, tmp_path / "small"), setup, "auto", trained_views=30) is None
  assert not (tmp_path / "small").exists()
  assert write(new_cache(setup, tmp_path / "big"), setup, "auto", trained_views=31) is not None


def test_a_cache_that_does_not_fit_is_refused_or_skipped(setup, tmp_path, monkeypatch):
  full = types.SimpleNamespace(total=10**9, used=10**9, free=1000)
  monkeypatch.setattr(teacher_cache.shutil, "disk_usage", lambda path: full)
  cache = new_cache(setup, tmp_path / "c")
  with pytest.raises(UserError, match=r"needs .* more .* only 1000.0 B is free"):
    write(cache, setup, mode="write")
  assert write(cache, setup, mode="auto") is None
  assert not (tmp_path / "c").exists()


@pytest.mark.parametrize(
  "field,value,phrase",
  [
    ("teacher_cache", "always", "expected one of ('off', 'write', 'read', 'auto')"),
    ("teacher_cache_views", 0, "positive integer"),
    ("teacher_cache_dtype", "float16", "'bfloat16', 'float32'"),
  ],
)
def test_bad_settings_are_refused(field, value, phrase):
  dcfg = common.distill_stage(steps=1, batch_size=1, lr=1e-3, loss=common.distill_loss())
  dcfg[field] = value
  with pytest.raises(UserError, match=f"distill.{field}=") as err:
    teacher_cache.check_config(dcfg)
  assert phrase in str(err.value)


@pytest.mark.parametrize(
  "harm, phrase",
  [
    ("a flipped bit", r"leaf0\.bin rows 0-3 do not match their checksum"),
    ("a short file", r"checks\.bin has 232 bytes, not the 240"),
    ("no meta.json", r"meta\.json is missing"),
    ("no checksums", r"does not checksum every row"),
  ],
)
def test_a_damaged_cache_is_refused_naming_the_file(setup, written, tmp_path, harm, phrase):
  """A cache proves itself before training reads it: its record of what it was written
  for, each file's size against the shapes, each written batch against its checksums. The
  damaged files are left as they are (the message says how to write the cache anew)."""
  _, directory = written
  copy = tmp_path / "copy"
  shutil.copytree(directory, copy)
  part = new_cache(setup, copy)
  d = pathlib.Path(part.directory)
  if harm == "a flipped bit":
    with open(d / "leaf0.bin", "r+b") as f:
      f.seek(5)
      byte = f.read(1)
      f.seek(5)
      f.write(bytes([byte[0] ^ 1]))
  elif harm == "a short file":
    os.truncate(d / "checks.bin", 232)
  elif harm == "no meta.json":
    (d / "meta.json").unlink()
  else:
    (d / "progress.json").write_text(json.dumps({"rows": 30}))
  before = {p: p.read_bytes() for p in d.iterdir()}
  with pytest.raises(UserError, match=phrase) as err:
    write(part, setup, mode="read")
  assert "\n" not in str(err.value)
  assert {p: p.read_bytes() for p in d.iterdir()} == before
  assert write(new_cache(setup, directory), setup, mode="read") is not None  # the intact one
