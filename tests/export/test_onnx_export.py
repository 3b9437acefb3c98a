"""Tests of linearizer.export.to_onnx: the exported student as an ONNX file, run by ONNX Runtime.

Oracle: `load_student(dir)` of the same directory, jitted, on random images made here. Tiny
random students (as in test_checkpoint_export.py), parameters drawn at 0.3 so that every
part moves the output (decays well inside (0, 1), gates open and shut). Cases: with and
without a head; the export's own resolution and a resampled one; several SSD chunks with a
padded last chunk, several without padding, and one chunk; batch 3 and batch 1 on the same
file (the batch is symbolic).

Tolerance: max |onnx - jax| <= 1e-4 absolute on outputs of size ~1 (observed <= 1e-6: the
same float32 math, summed in another order).
"""

import dataclasses
import functools
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from flax import nnx

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from helpers import assert_clean_error, normal_model  # noqa: E402
from linearizer import models, serving  # noqa: E402
from linearizer.errors import UserError  # noqa: E402
from linearizer.export import cli as export_cli  # noqa: E402
from linearizer.export import onnx_graph  # noqa: E402
from linearizer.export import to_onnx as onnx_export  # noqa: E402
from linearizer.models import saved  # noqa: E402

TOL = 1e-4
TINY = dict(image_size=16, width=32, depth=2, headdim=16, d_state=16)  # patch 8: 2 x 2 grid


def tiny_student(num_classes=5, seed=0, **overrides):
  cfg = models.adventurer_config("Ti/8", num_classes=num_classes, **{**TINY, **overrides})
  return normal_model(cfg, 0.3, seed)


@nnx.jit
def jax_output(model, images):
  out = model(images)
  return out.logits if out.logits is not None else out.tokens


def images(batch, size, seed=1):
  return np.random.default_rng(seed).normal(size=(batch, size, size, 3)).astype(np.float32)


def session(path):
  options = ort.SessionOptions()
  options.log_severity_level = 3  # no notes about initializers it folded
  return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


# Students on disk. "head": chunk 4, so the 6 tokens at 16²
# (4 patches, CLS, heading token) are 2 chunks, the last one padded, and the 11 at 24² are 3.
# "tokens": no head, chunk 16: one chunk at both sizes. "pairs": depth 4 with the flip
# pattern whose flips are consecutive blocks, chunk 3: 2 chunks, no padding.
STUDENTS = {
  "head": dict(chunk_size=4),
  "tokens": dict(num_classes=0, chunk_size=16),
  "pairs": dict(depth=4, flip_pattern="pairs", chunk_size=3),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  root = tmp_path_factory.mktemp("students")
  dirs = {}
  for name, overrides in STUDENTS.items():
    model = tiny_student(**overrides)
    # What export_student writes beside serve.jaxexport, which to_onnx does not read (and
    # which costs a jax.export per student).
    dirs[name] = saved.save(model, root / name)
  return dirs


@functools.cache
def loaded(directory):
  return serving.load_student(directory)


@pytest.mark.parametrize(
  "name, size", [("head", 16), ("head", 24), ("tokens", 16), ("tokens", 24), ("pairs", 16)]
)
def test_onnx_runtime_matches_load_student(exported, tmp_path, name, size):
  path = tmp_path / "student.onnx"
  assert onnx_export.to_onnx(str(exported[name]), str(path), image_size=size) == str(path)
  model = loaded(exported[name])
  x = images(3, size)
  want = np.asarray(jax_output(model, x))
  run = session(path)
  (got,) = run.run(None, {"images": x})
  (one,) = run.run(None, {"images": x[:1]})  # the same file at another batch size
  assert got.shape == want.shape and one.shape == (1, *want.shape[1:])
  worst = max(np.max(np.abs(got - want)), np.max(np.abs(one - want[:1])))
  print(f"{name} @{size}: max |onnx - jax| = {worst:.2e}")
  assert worst <= TOL


# Which blocks each pattern flips at depth 8 (models/adventurer.py, method.md §5): four sets.
FLIPS_AT_DEPTH_8 = {
  "alternate": {1, 3, 5, 7},  # i % 2 == 1
  "pairs": {2, 3, 6, 7},  # (i // 2) % 2 == 1
  "released": {2, 3},  # i // 2 == 1
  "none": set(),
}


def test_each_flip_pattern_flips_its_blocks():
  """The graph reverses the patch order (a Gather on the token axis) in the blocks the
  pattern names, and the model does too. Graphs only: the parity test runs "pairs" (and
  "alternate"), and building a depth-8 graph per pattern through files costs seconds."""
  cfg = models.adventurer_config("Ti/8", **{**TINY, "depth": 8})
  abstract = nnx.eval_shape(lambda: models.from_config(cfg))
  params = {
    ".".join(map(str, k)): np.zeros(v.shape, np.float32)
    for k, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))
  }
  assert set(FLIPS_AT_DEPTH_8) == set(models.adventurer.FLIP_PATTERNS)
  for pattern, flips in FLIPS_AT_DEPTH_8.items():
    model = dataclasses.replace(cfg, flip_pattern=pattern)
    layers = models.adventurer.FLIP_PATTERNS[pattern]
    assert {i for i in range(8) if layers(i)} == flips  # what each Block's `flip` is set from
    graph = onnx_graph.Graph(onnx)
    onnx_graph.student_graph(graph, model, params, 16)
    scopes = [n.name.split("/")[0] for n in graph.nodes if n.op_type == "Gather"]
    assert {int(s.removeprefix("layers.")) for s in scopes if s.startswith("layers.")} == flips
  assert [b.flip for b in abstract.layers] == [i in FLIPS_AT_DEPTH_8["alternate"] for i in range(8)]


def test_metadata_and_signature(exported, tmp_path):
  path = tmp_path / "student.onnx"
  onnx_export.to_onnx(str(exported["head"]), str(path), image_size=24, opset=19)
  proto = onnx.load(str(path))
  meta = {p.key: p.value for p in proto.metadata_props}
  _, cfg = saved.load_config(exported["head"])
  assert json.loads(meta["mean"]) == list(cfg.mean) and json.loads(meta["std"]) == list(cfg.std)
  assert (meta["image_size"], meta["patch"], meta["num_classes"]) == ("24", "8", "5")
  assert meta["input_layout"] == "NHWC" and meta["model_kind"] == "adventurer"
  assert json.loads(meta["model_config"]) == json.loads(json.dumps(dataclasses.asdict(cfg)))
  assert meta["source_directory"] == str(exported["head"].absolute())
  assert [o.version for o in proto.opset_import] == [19]
  run = session(path)
  assert run.get_modelmeta().custom_metadata_map == meta  # what a runtime user reads
  (inp,), (out,) = run.get_inputs(), run.get_outputs()
  assert (inp.name, inp.shape, out.name, out.shape) == (
    "images",
    ["batch", 24, 24, 3],
    "logits",
    ["batch", 5],
  )


def test_missing_onnx_names_the_extra(exported, tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` now fails
  with pytest.raises(UserError, match=r"pip install 'linearizer\[onnx\]'"):
    onnx_export.to_onnx(str(exported["head"]), str(tmp_path / "s.onnx"))


# ---------------------------------------------------------------------------------------
# Bad input through the CLI: one `error:` line, exit 2, nothing written.
# ---------------------------------------------------------------------------------------
def cli(*args):
  return ["--format", "onnx", *map(str, args)]


def test_bad_input_in_a_process(exported, tmp_path):
  """One process (each start imports JAX: seconds); the other refusals go through the same
  `main` in-process below."""
  out = tmp_path / "student.onnx"
  cmd = [sys.executable, "-m", "linearizer.export", *cli("--input", exported["head"])]
  cmd += ["--output", str(out), "--image_size", "20"]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr
  assert_clean_error(proc, "image_size=20", "8px patches", "multiple of 8", "e.g. 16")
  assert not os.listdir(tmp_path)  # no .onnx, no temporary file


def vit_directory(directory):
  cfg = models.vit_config("Ti/8", width=32, depth=1, num_heads=2, mlp_dim=64, image_size=16)
  abstract = nnx.state(nnx.eval_shape(lambda: models.from_config(cfg)), nnx.Param)
  params = {path: np.zeros(v.shape, v.dtype) for path, v in nnx.to_flat_state(abstract)}
  saved.save(saved.from_params(cfg, params), directory)


@pytest.mark.parametrize(
  "case, phrases",
  [
    ("missing", ["no/such", "does not exist"]),
    ("a file", ["a_file", "is not a directory", "exported student"]),
    ("no model.json", ["has no model.json", "exported student"]),
    ("not JSON", ["model.json cannot be read", "exported student"]),
    ("a teacher", ["'vit' model", "Adventurer student"]),
    ("smaller than a patch", ["image_size=4", "multiple of 8"]),
    ("too large for memory", ["--image_size 800000", "needs at least", "free memory"]),
    ("opset too low", ["opset=17", f"opset >= {onnx_export.MIN_OPSET}"]),
    ("opset too high", ["opset=999"]),
    ("output is a directory", ["is a directory"]),
  ],
)
def test_bad_input_in_process(exported, tmp_path, capsys, case, phrases):
  """The other refusals, through the same `main` (in-process: no start-up each)."""
  source, out = exported["head"], tmp_path / "student.onnx"
  if case == "missing":
    source = tmp_path / "no/such"
  elif case == "a file":
    source = tmp_path / "a_file"
    source.write_text("not a student")
  elif case == "no model.json":
    source = tmp_path / "empty"
    source.mkdir()
  elif case == "not JSON":
    source = tmp_path / "damaged"
    shutil.copytree(exported["tokens"], source)
    (source / "model.json").write_text("{kind: adventurer")
  elif case == "a teacher":
    source = tmp_path / "vit"
    vit_directory(source)
  elif case == "output is a directory":
    out = tmp_path / "out"
    out.mkdir()
  extra = {
    "smaller than a patch": ["--image_size", 4],
    "too large for memory": ["--image_size", 800000],  # before: an abort in XLA's allocator
    "opset too low": ["--opset", 17],
    "opset too high": ["--opset", 999],
  }.get(case, [])
  before = sorted(os.listdir(tmp_path))
  with pytest.raises(SystemExit) as exit_:
    export_cli.main(cli("--input", source, "--output", out, *extra))
  err = capsys.readouterr().err
  assert exit_.value.code == 2
  assert sum(line.startswith("error: ") for line in err.splitlines()) == 1, err
  for phrase in phrases:
    assert phrase in err, err
  assert sorted(os.listdir(tmp_path)) == before  # nothing written


# ---------------------------------------------------------------------------------------
# The file without this codebase: a fresh environment with ONNX Runtime and NumPy only.
# ---------------------------------------------------------------------------------------
RUN_WITHOUT_JAX = textwrap.dedent(
  """
  import importlib.util, json, sys
  import numpy as np, onnxruntime as ort
  assert importlib.util.find_spec("jax") is None, "jax is importable here"
  assert importlib.util.find_spec("linearizer") is None, "linearizer is importable here"
  model, images, out = sys.argv[1:]
  run = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
  meta = run.get_modelmeta().custom_metadata_map
  x = np.load(images)
  assert x.shape[1:] == (int(meta["image_size"]),) * 2 + (3,), (x.shape, meta)
  np.save(out, run.run(None, {"images": x})[0])
  print("ran", json.loads(meta["mean"]), x.shape)
  """
)


@pytest.mark.slow
def test_the_file_runs_where_there_is_no_jax(exported, tmp_path):
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
  python = str(venv / "bin" / "python")
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
  env["PYTHONNOUSERSITE"] = "1"
  pins = [f"onnxruntime=={ort.__version__}", f"numpy=={np.__version__}"]
  pip = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", *pins]
  subprocess.run(pip, check=True, timeout=900, env=env, cwd=tmp_path)
  proc = subprocess.run([python, "-c", "import jax"], capture_output=True, text=True, env=env)
  assert proc.returncode != 0 and "No module named 'jax'" in proc.stderr
  path, x = tmp_path / "student.onnx", images(2, 24)
  onnx_export.to_onnx(str(exported["head"]), str(path), image_size=24)
  np.save(tmp_path / "images.npy", x)
  cmd = [python, "-c", RUN_WITHOUT_JAX, str(path), "images.npy", "logits.npy"]
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
  assert proc.returncode == 0 and proc.stdout.startswith("ran"), proc.stderr
  want = np.asarray(jax_output(loaded(exported["head"]), x))
  assert np.max(np.abs(np.load(tmp_path / "logits.npy") - want)) <= TOL
