"""Tests of linearizer.checkpoint (Orbax train-state checkpoints), linearizer.serving (the
saved student and its jax.export serving function) and linearizer.metrics (metrics.jsonl,
TensorBoard events, the progress line).

Oracles: a restored state is bitwise the state that was saved (each save distinguishable by
its step and a per-save offset on every parameter); the exported student and the serving
function reproduce the logits of the in-memory model; files on disk are read back with
json / os, independently of the writers.

The tiny model gets seeded random parameters through `saved.from_params` rather than
`models.build`: the random initialisers compile one CPU program each (≈10 s), which these
tests do not need. Forwards are jitted once and shared (eager NNX forwards cost ≈9 s).

Tolerances: checkpoint and load_student round trips are exact; the serialised function
against the model: <= 1e-5 absolute (float32 logits of size ~0.1; a different compilation
may reorder float reductions).
"""

import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import common
from helpers import normal_model
from linearizer import checkpoint, metrics, models, optim, serving, train
from linearizer.errors import UserError
from linearizer.models import saved

SERVE_TOL = 1e-5
NUM_CLASSES = 5
TINY = dict(image_size=16, width=32, depth=2, headdim=16, d_state=16, chunk_size=16)


def tiny_student(num_classes=NUM_CLASSES, seed=0):
  return normal_model(models.adventurer_config("Ti/8", num_classes=num_classes, **TINY), 0.1, seed)


@pytest.fixture(scope="module")
def student():
  return tiny_student()


@nnx.jit
def logits_of(model, images):
  return model(images).logits


def images(batch, seed=0):
  return np.random.default_rng(seed).normal(size=(batch, 16, 16, 3)).astype(np.float32)


# ---------------------------------------------------------------------------------------
# checkpoint.Checkpointer
# ---------------------------------------------------------------------------------------
def fresh_state(module):
  tx = optim.make_optimizer(common.optim(), 10)
  return train.init_state(module, tx, ema=True)[1]


def state_at(state, step):
  """A state distinguishable per step: step counter and every parameter shifted by step."""
  shift = lambda x: x + jnp.asarray(step, x.dtype)
  return state.replace(
    step=jnp.asarray(step, jnp.int32),
    params=jax.tree.map(shift, state.params),
    ema=jax.tree.map(lambda x: shift(shift(x)), state.ema),
  )


def assert_trees_equal(a, b):
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb
  assert len(la) == len(lb) > 0
  for x, y in zip(la, lb):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def base_state(student):
  return fresh_state(student)


def save_steps(directory, state, steps, keep=2):
  ckpt = checkpoint.Checkpointer(directory, keep=keep)
  for s in steps:
    assert ckpt.save(s, state_at(state, s), {"step": s, "epoch": s // 2, "tag": f"s{s}"})
  ckpt.wait()
  ckpt.close()


def test_restore_latest_is_identical_to_saved(tmp_path, base_state):
  save_steps(tmp_path / "ckpt", base_state, [1, 2, 3], keep=3)
  ckpt = checkpoint.Checkpointer(tmp_path / "ckpt", keep=3)  # a new process resuming
  assert ckpt.latest_step() == 3
  restored, data_state = ckpt.restore_latest(base_state)
  ckpt.close()
  assert data_state == {"step": 3, "epoch": 1, "tag": "s3"}
  expected = state_at(base_state, 3)
  assert int(restored.step) == 3
  assert_trees_equal(restored.params, expected.params)
  assert_trees_equal(restored.ema, expected.ema)
  assert_trees_equal(restored.opt_state, expected.opt_state)
  # The unsaved part (RNG streams) comes from the state passed in.
  assert restored.rest is base_state.rest
  # Not the initial parameters: the restore really read the files.
  first = jax.tree.leaves(base_state.params)[0]
  assert not np.array_equal(np.asarray(jax.tree.leaves(restored.params)[0]), np.asarray(first))


def test_keep_two_keeps_only_the_last_two(tmp_path, base_state):
  save_steps(tmp_path / "ckpt", base_state, [2, 4, 6, 8], keep=2)
  steps = sorted(int(d) for d in os.listdir(tmp_path / "ckpt") if d.isdigit())
  assert steps == [6, 8]
  ckpt = checkpoint.Checkpointer(tmp_path / "ckpt", keep=2)
  assert ckpt.latest_step() == 8
  ckpt.close()


def garble(directory):
  """Overwrites every file under `directory` with garbage, truncated to half its size."""
  count = 0
  rng = np.random.default_rng(0)
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      size = os.path.getsize(path)
      with open(path, "wb") as f:
        f.write(rng.integers(0, 256, max(1, size // 2), dtype=np.uint8).tobytes())
      count += 1
  assert count > 0


def truncate_data(directory):
  """Truncates the array data files (OCDBT `d/` chunks) to half, metadata left intact."""
  count = 0
  for root, _, files in os.walk(directory):
    if os.path.basename(root) == "d":
      for name in files:
        path = os.path.join(root, name)
        with open(path, "r+b") as f:
          f.truncate(os.path.getsize(path) // 2)
        count += 1
  assert count > 0


# Orbax's asyncio loop closes before tensorstore's callbacks of the failed read arrive: noise.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("corrupt", [garble, truncate_data])
def test_corrupted_latest_falls_back_to_previous(tmp_path, base_state, caplog, corrupt):
  save_steps(tmp_path / "ckpt", base_state, [5, 10], keep=2)
  corrupt(tmp_path / "ckpt" / "10" / "state")
  ckpt = checkpoint.Checkpointer(tmp_path / "ckpt", keep=2)
  with caplog.at_level(logging.WARNING, logger="linearizer"):  # errors.warn: ours
    restored, data_state = ckpt.restore_latest(base_state)
  ours = [r for r in caplog.records if r.name == "linearizer"]
  assert any("step 10" in r.getMessage() for r in ours), [r.getMessage() for r in ours]
  assert data_state["step"] == 5
  assert int(restored.step) == 5
  assert_trees_equal(restored.params, state_at(base_state, 5).params)
  # The resumed run checkpoints again, also at the corrupted checkpoint's step (as the final
  # forced save of a stage does), and the next resume reads its own checkpoint.
  assert ckpt.save(8, state_at(base_state, 8), {"step": 8})
  assert ckpt.save(10, state_at(base_state, 10), {"step": 10}, force=True)
  ckpt.wait()
  ckpt.close()
  ckpt = checkpoint.Checkpointer(tmp_path / "ckpt", keep=2)
  restored, data_state = ckpt.restore_latest(base_state)
  ckpt.close()
  assert data_state == {"step": 10}
  assert_trees_equal(restored.params, state_at(base_state, 10).params)


def test_relative_directory(tmp_path, base_state, monkeypatch):
  """`--workdir runs/x` is relative; Orbax itself accepts only absolute paths."""
  monkeypatch.chdir(tmp_path)
  save_steps("runs/x/ckpt", base_state, [3])
  assert os.listdir(tmp_path / "runs" / "x" / "ckpt") == ["3"]
  ckpt = checkpoint.Checkpointer("runs/x/ckpt")
  restored, data_state = ckpt.restore_latest(base_state)
  ckpt.close()
  assert data_state["step"] == 3
  assert_trees_equal(restored.params, state_at(base_state, 3).params)


def test_no_checkpoints_gives_none(tmp_path, base_state):
  ckpt = checkpoint.Checkpointer(tmp_path / "empty", keep=2)
  assert ckpt.restore_latest(base_state) == (None, None)
  assert ckpt.latest_step() is None
  ckpt.close()


# ---------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------
def test_export_round_trips(tmp_path, student):
  out = tmp_path / "export"
  serving.export_student(student, out)
  assert (out / "model.json").is_file()
  assert (out / serving.SERVE_FILE).is_file()
  x = images(8)  # one compiled forward for the references; served as batches of 3 and 5
  expected = np.asarray(logits_of(student, x))
  assert expected.shape == (8, NUM_CLASSES)
  assert np.abs(expected).max() > 1e-3  # a meaningful comparison, not all zeros

  loaded = serving.load_student(out)
  assert loaded.cfg == student.cfg
  np.testing.assert_array_equal(np.asarray(logits_of(loaded, x)), expected)

  serve = serving.load_serving(out)
  for rows in (slice(0, 3), slice(3, 8)):
    got = np.asarray(serve(x[rows]))
    assert got.shape == expected[rows].shape
    np.testing.assert_allclose(got, expected[rows], atol=SERVE_TOL, rtol=0)


def test_export_holds_each_platforms_kernel(tmp_path, student):
  """The portable file lowers for every platform with the XLA scan (a Pallas call has no
  CPU lowering); the TPU's own file holds the Mosaic kernel, as a TPU run would choose it
  (compiled for a v5e chip in tests/test_aot.py), and `load_serving` picks it on a TPU."""
  out = tmp_path / "export"
  serving.export_student(student, out)

  def read(name):
    return jax.export.deserialize(bytearray((out / name).read_bytes()))

  portable, tpu = read(serving.SERVE_FILE), read(serving.PLATFORM_FILES["tpu"])
  assert portable.platforms == ("cpu", "cuda", "tpu") and tpu.platforms == ("tpu",)
  assert "tpu_custom_call" not in portable.mlir_module()
  assert "tpu_custom_call" in tpu.mlir_module()
  assert "triton" not in portable.mlir_module()  # CUDA serves the XLA scan
  assert sorted(os.listdir(out)) == [
    "model.json",
    "params",
    "serve.jaxexport",
    "serve.tpu.jaxexport",
  ]


def test_failed_export_leaves_previous_export_intact(tmp_path, student, monkeypatch):
  out = tmp_path / "export"
  serving.export_student(student, out)
  before = {p: (out / p).read_bytes() for p in ("model.json", serving.SERVE_FILE)}
  other = tiny_student(seed=1)

  def fail(*args, **kwargs):
    raise RuntimeError("cannot export")

  monkeypatch.setattr(jax.export, "export", fail)
  with pytest.raises(RuntimeError, match="cannot export"):
    serving.export_student(other, out)
  monkeypatch.undo()
  assert {p: (out / p).read_bytes() for p in before} == before
  # The parameters on disk are still the first student's.
  params = saved.read_params(out)
  first = {
    ".".join(map(str, k)): np.asarray(v)
    for k, v in nnx.to_flat_state(nnx.state(student, nnx.Param))
  }
  assert params.keys() == first.keys()
  for k in params:
    np.testing.assert_array_equal(params[k], first[k])
  assert sorted(os.listdir(tmp_path)) == ["export"]


def test_saved_refuses_non_empty_dir(tmp_path, student):
  target = tmp_path / "model"
  target.mkdir()
  (target / "precious.txt").write_text("keep me")
  with pytest.raises(FileExistsError, match="not empty") as e:
    saved.save(student, target)
  assert isinstance(e.value, UserError)  # the CLIs report it in one line
  assert (target / "precious.txt").read_text() == "keep me"
  assert sorted(os.listdir(target)) == ["precious.txt"]
  # An empty directory is fine, and overwrite=True replaces a non-empty one.
  empty = tmp_path / "empty"
  empty.mkdir()
  saved.save(student, empty)
  assert (empty / "model.json").is_file()
  saved.save(student, target, overwrite=True)
  assert not (target / "precious.txt").exists()
  assert (target / "model.json").is_file()
  # Nothing temporary is left beside them.
  assert sorted(os.listdir(tmp_path)) == ["empty", "model"]


# ---------------------------------------------------------------------------------------
# metrics.MetricWriter
# ---------------------------------------------------------------------------------------
def test_metric_writer(tmp_path, capsys):
  writer = metrics.MetricWriter(
    str(tmp_path / "run"), stage="distill", total_steps=100, batch_size=32
  )
  first = writer.write(10, {"loss": np.float32(1.5), "lr": jnp.asarray(1e-3)})
  second = writer.write(20, {"loss": jnp.asarray(0.75, jnp.bfloat16), "lr": 2e-3})
  writer.close()
  lines = capsys.readouterr().out.strip().splitlines()

  records = [
    json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
  ]
  assert [r["step"] for r in records] == [10, 20]
  assert records[0]["loss"] == 1.5 and records[1]["loss"] == 0.75
  assert records[0]["lr"] == pytest.approx(1e-3) and records[1]["lr"] == pytest.approx(2e-3)
  for r in records:
    assert all(isinstance(v, float) for k, v in r.items() if k != "step")
  assert "img_per_s" not in records[0]
  assert records[1]["img_per_s"] > 0
  assert first["loss"] == 1.5 and second["img_per_s"] == records[1]["img_per_s"]

  events = [f for f in os.listdir(tmp_path / "run" / "tb") if f.startswith("events.out.tfevents")]
  assert events
  assert os.path.getsize(tmp_path / "run" / "tb" / events[0]) > 0

  assert len(lines) == 2
  assert "step 10/100" in lines[0] and "ETA" not in lines[0]
  assert "step 20/100" in lines[1]
  assert "img/s" in lines[1] and "ETA" in lines[1]
  assert "loss=0.75" in lines[1]
  # ETA = remaining images / speed.
  eta_s = (100 - 20) * 32 / second["img_per_s"]
  assert f"ETA {int(eta_s // 60)}m{int(eta_s % 60):02d}s" in lines[1]


def test_metric_writer_appends(tmp_path, capsys):
  """A resumed run appends to metrics.jsonl instead of truncating it."""
  for step in (1, 2):
    w = metrics.MetricWriter(str(tmp_path), stage="finetune", total_steps=2, batch_size=4)
    w.write(step, {"loss": float(step)})
    w.close()
  capsys.readouterr()
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert records == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}]


def test_saving_a_step_twice_keeps_the_first(tmp_path, base_state):
  """A stop right after a periodic save, or a resumed finished stage, saves the step again."""
  state = base_state
  ckpt = checkpoint.Checkpointer(tmp_path / "ckpt")
  assert ckpt.save(2, state, {"step": 2}, force=True)
  ckpt.wait()
  assert not ckpt.save(2, state, {"step": 99}, force=True)
  ckpt.wait()
  _, data_state = ckpt.restore_latest(state)
  assert data_state == {"step": 2}
  ckpt.close()


@pytest.mark.parametrize(
  "field,value,phrase",
  [
    ("depth", 3, "missing"),
    ("width", 48, "config"),
    ("num_classes", 4, "head"),
    ("image_size", 32, "pos_embed"),
  ],
)
def test_an_edited_model_json_is_named_before_orbax_reads(tmp_path, student, field, value, phrase):
  """load_student on a model.json that no longer matches its parameters: one message
  naming the differing parameters (Orbax's own errors came as dozens of tracebacks)."""
  out = tmp_path / "export"
  serving.export_student(student, out)
  meta = json.loads((out / "model.json").read_text())
  meta["config"][field] = value
  (out / "model.json").write_text(json.dumps(meta))
  with pytest.raises(UserError, match="does not describe the parameters saved") as err:
    serving.load_student(out)
  assert phrase in str(err.value)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_damaged_saved_model_is_one_message(tmp_path, student):
  """A finished stage's model/params truncated: which directory, and how to rebuild it."""
  out = tmp_path / "model"
  saved.save(student, out)
  truncate_data(out / "params")
  for load in (saved.restore, saved.read_params):
    with pytest.raises(UserError, match="the saved model is damaged") as err:
      load(out)
    assert str(out / "params") in str(err.value) and "delete that directory" in str(err.value)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_every_checkpoint_unreadable_says_starting_over_and_saves_again(
  tmp_path, base_state, caplog
):
  """No readable checkpoint: said ('starting over'), the bad ones moved aside, and the
  restarted run's saves of those steps are written (Orbax skipped them before)."""
  save_steps(tmp_path / "ckpt", base_state, [5, 10], keep=2)
  for step in (5, 10):
    garble(tmp_path / "ckpt" / str(step) / "state")
  ckpt = checkpoint.Checkpointer(tmp_path / "ckpt", keep=2)
  with caplog.at_level(logging.WARNING, logger="linearizer"):
    assert ckpt.restore_latest(base_state) == (None, None)
  assert any("starting over from step 0" in r.getMessage() for r in caplog.records)
  assert sorted(p.name.split(".")[0] for p in (tmp_path / "ckpt").glob("*.unreadable-*")) == [
    "10",
    "5",
  ]
  assert ckpt.save(5, state_at(base_state, 5), {"step": 5}, force=True)
  ckpt.wait()
  ckpt.close()
  ckpt = checkpoint.Checkpointer(tmp_path / "ckpt", keep=2)
  restored, data_state = ckpt.restore_latest(base_state)
  ckpt.close()
  assert data_state == {"step": 5}
  assert_trees_equal(restored.params, state_at(base_state, 5).params)
