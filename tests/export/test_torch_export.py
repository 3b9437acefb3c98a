"""Tests of the PyTorch export: linearizer/export/to_torch.py (`--format torch`) and the
pure-torch Adventurer it is read by, linearizer/export/torch_adventurer.py.

Oracles: the JAX student (the export reloaded with `load_student`, or the in-memory model
that was saved) for the torch module's outputs; `kernels.ssd_reference`, the sequential
scan, for the torch chunked SSD; the exported parameters themselves for the round trip
through `convert.load` (bitwise); Adventurer's state-dict names as method.md §5 lists them
(wangf3014/Adventurer's `models_mamba.py`), with shapes written out here from the config,
for the layout.

Tolerance: 1e-4 absolute on float32 logits and tokens of size ~1 (measured ~5e-6: the same
maths in another op order).

Tiny models get seeded random parameters through `saved.from_params` (no init compiles),
depth 4: outputs are compared under the flip patterns `released` (blocks 2, 3), `alternate`
(1, 3) and `none`; which blocks each of the four flips is checked over 8 blocks without
running them (`pairs` first differs from `released` at block 6).
"""

import ast
import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
import kernels  # noqa: E402
from helpers import ROOT, random_model  # noqa: E402
from linearizer import convert, models, serving  # noqa: E402
from linearizer.errors import UserError  # noqa: E402
from linearizer.export import to_torch as torch_export  # noqa: E402
from linearizer.export import torch_adventurer  # noqa: E402
from linearizer.models import saved  # noqa: E402
from linearizer.models.adventurer import FLIP_PATTERNS  # noqa: E402

TOL = 1e-4
TINY = dict(image_size=32, width=32, depth=4, headdim=16, d_state=16, chunk_size=8)
NORM = dict(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))  # not the defaults: must travel


def student(flip_pattern, num_classes=5, seed=0):
  cfg = models.adventurer_config("Ti/8", flip_pattern=flip_pattern, num_classes=num_classes)
  return random_model(dataclasses.replace(cfg, **TINY, **NORM), seed)


@nnx.jit
def jax_forward(model, images):
  out = model(images)
  return out.logits if out.logits is not None else out.tokens


def images(hw, batch=2, seed=1):
  return np.random.default_rng(seed).normal(size=(batch, *hw, 3)).astype(np.float32)


def torch_forward(model, x):
  with torch.no_grad():
    return model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()  # NHWC -> NCHW


def params_of(model) -> dict:
  return {
    ".".join(map(str, k)): np.asarray(v.get_value())
    for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
  }


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """A student exported as a run exports it, and its .pth: (export dir, .pth path)."""
  out = tmp_path_factory.mktemp("torch_export")
  serving.export_student(student("released"), out / "export")
  return out / "export", pathlib.Path(torch_export.to_torch(out / "export", out / "student.pth"))


@pytest.fixture(scope="module")
def reference(exported):
  """The JAX student the export holds, as a user loads it."""
  return serving.load_student(exported[0])


# ---------------------------------------------------------------------------------------
# The torch module computes what the JAX student computes
# ---------------------------------------------------------------------------------------
def test_torch_ssd_matches_the_sequential_scan():
  """Several chunks, a ragged last one, a sequence shorter than one chunk."""
  rng = np.random.default_rng(0)
  b, length, heads, p, s = 2, 11, 3, 4, 5
  x, bm, cm = (
    rng.normal(size=shape).astype(np.float32)
    for shape in [(b, length, heads, p)] + [(b, length, s)] * 2
  )
  dt = rng.uniform(0.01, 0.5, (b, length, heads)).astype(np.float32)
  a = -rng.uniform(1, 16, heads).astype(np.float32)
  d = rng.normal(size=heads).astype(np.float32)
  want = kernels.ssd(x, dt, a, bm[:, :, None], cm[:, :, None], d, impl="reference")
  t = lambda v: torch.from_numpy(v)
  for chunk in (4, 11, 64):
    got = torch_adventurer.ssd(t(x), t(dt), t(a), t(bm), t(cm), t(d), chunk)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-5, err_msg=f"chunk_size={chunk}")


def test_exported_student_matches_jax_at_its_size_and_another(exported, reference):
  model = torch_adventurer.load(exported[1])
  assert not model.training
  for hw in ((32, 32), (48, 48)):  # 48: pos_embed resampled 4x4 -> 6x6, CLS slot kept
    x = images(hw)
    want = np.asarray(jax_forward(reference, x))
    assert want.shape == (2, 5)
    np.testing.assert_allclose(torch_forward(model, x), want, atol=TOL, err_msg=str(hw))


def test_no_flip_a_non_square_grid_and_many_chunks_match_jax(exported, reference):
  """The exported weights with flip_pattern 'none', in both frameworks (no new export), on a
  3x5 grid (resampled from 4x4): 17 tokens, in torch chunks of 5 (states carried across
  chunks, a ragged last one)."""
  params = {k: v.get_value() for k, v in nnx.to_flat_state(nnx.state(reference, nnx.Param))}
  jax_model = saved.from_params(dataclasses.replace(reference.cfg, flip_pattern="none"), params)
  cfg = torch_adventurer.load(exported[1]).cfg
  ported = torch_adventurer.load(
    exported[1], dataclasses.replace(cfg, flip_pattern="none", chunk_size=5)
  )
  x = images((24, 40))
  np.testing.assert_allclose(
    torch_forward(ported, x), np.asarray(jax_forward(jax_model, x)), atol=TOL
  )


def test_each_flip_pattern_flips_the_blocks_the_jax_model_flips():
  flipped = {  # method.md §5, over 8 blocks
    "alternate": [1, 3, 5, 7],  # i % 2 == 1, the paper
    "pairs": [2, 3, 6, 7],  # (i // 2) % 2 == 1
    "released": [2, 3],  # i // 2 == 1, the code as published
    "none": [],
  }
  assert set(flipped) == set(FLIP_PATTERNS)
  for pattern, blocks in flipped.items():
    cfg = torch_adventurer.AdventurerConfig(32, 8, 8, headdim=16, flip_pattern=pattern)
    layers = torch_adventurer.Adventurer(cfg).layers
    assert [i for i, layer in enumerate(layers) if layer.flip] == blocks, pattern
    assert [i for i in range(8) if FLIP_PATTERNS[pattern](i)] == blocks, pattern  # JAX's


def test_a_student_without_head_gives_its_final_tokens(tmp_path):
  model = student("alternate", num_classes=0, seed=2)
  saved.save(model, tmp_path / "model")  # to_torch reads what saved.save writes, too
  ported = torch_adventurer.load(torch_export.to_torch(tmp_path / "model", tmp_path / "s.pth"))
  assert ported.cfg.flip_pattern == "alternate" and ported.head is None
  x = images((32, 32))
  want = np.asarray(jax_forward(model, x))
  assert want.shape == (2, 17, 32)  # [16 patches, cls]
  np.testing.assert_allclose(torch_forward(ported, x), want, atol=TOL)


# ---------------------------------------------------------------------------------------
# The file: Adventurer's layout, our config beside it, read back bitwise
# ---------------------------------------------------------------------------------------
def adventurer_shapes(width, depth, patch, grid, classes, d_state, headdim, expand, hidden):
  """Adventurer's state dict (models_mamba.Adventurer with rms_norm=True), name -> shape."""
  inner, heads = expand * width, expand * width // headdim
  conv = inner + 2 * d_state
  shapes = {
    "patch_embed.proj.weight": (width, 3, patch, patch),
    "patch_embed.proj.bias": (width,),
    "cls_token": (1, 1, width),
    "pos_embed": (1, grid * grid + 1, width),
    "norm_f.weight": (width,),
    "head.weight": (classes, width),
    "head.bias": (classes,),
  }
  for i in range(depth):
    o, m = f"layers.{i}.", f"layers.{i}.mixer."
    shapes |= {
      o + "norm.weight": (width,),
      o + "norm_mlp.weight": (width,),
      m + "in_proj.weight": (2 * inner + 2 * d_state + heads, width),  # [z, x, B, C, dt]
      m + "conv1d.weight": (conv, 1, 4),
      m + "conv1d.bias": (conv,),
      m + "dt_bias": (heads,),
      m + "A_log": (heads,),
      m + "D": (heads,),
      m + "norm.weight": (inner,),
      m + "out_proj.weight": (width, inner),
      o + "mlp.w1.weight": (hidden, width),
      o + "mlp.w1.bias": (hidden,),
      o + "mlp.w2.weight": (hidden, width),
      o + "mlp.w2.bias": (hidden,),
      o + "mlp.w3.weight": (width, hidden),
      o + "mlp.w3.bias": (width,),
    }
  return shapes


def test_the_file_is_in_adventurers_layout(exported):
  directory, path = exported
  checkpoint = torch.load(path, weights_only=True)
  assert set(checkpoint) == {"model", "linearizer"}
  shapes = {k: tuple(v.shape) for k, v in checkpoint["model"].items()}
  want = adventurer_shapes(32, 4, 8, 4, 5, d_state=16, headdim=16, expand=2, hidden=80)
  assert shapes == want  # no mask_token: Adventurer's model would refuse it, strictly
  assert all(v.dtype == torch.float32 for v in checkpoint["model"].values())
  module = torch_adventurer.Adventurer(torch_adventurer.load(path).cfg)
  assert {k: tuple(v.shape) for k, v in module.state_dict().items()} == want
  ours = checkpoint["linearizer"]
  assert set(ours["params"]) == {"mask_token"}
  meta = json.loads((directory / "model.json").read_text())["config"]
  assert ours["config"] == {k: meta[k] for k in torch_export.CONFIG_FIELDS}
  assert set(torch_export.CONFIG_FIELDS) == {
    f.name for f in dataclasses.fields(torch_adventurer.AdventurerConfig)
  } - {"chunk_size"}  # how the torch scan runs, not what it computes


def test_round_trip_through_convert_is_bitwise(exported, reference, capsys):
  capsys.readouterr()
  loaded = convert.load(exported[1], "adventurer")
  assert "is a guess" not in capsys.readouterr().out  # the file says which blocks flip
  want, got = params_of(reference), params_of(loaded)
  assert got.keys() == want.keys()
  for name in want:  # mask_token included: it travels in our entry
    assert got[name].dtype == want[name].dtype, name
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
  run_time = set(models.RUN_TIME_FIELDS) - {"image_size"}
  same = lambda cfg: {k: v for k, v in dataclasses.asdict(cfg).items() if k not in run_time}
  assert same(loaded.cfg) == same(reference.cfg)  # flip_pattern, mean, std from our entry


def test_adventurers_own_checkpoints_still_guess_the_flip_pattern(exported, tmp_path, capsys):
  """A file without our entry reads as before: flip 'released' with a warning."""
  _, path = exported
  torch.save({"model": torch.load(path, weights_only=True)["model"]}, tmp_path / "theirs.pth")
  capsys.readouterr()
  loaded = convert.load(tmp_path / "theirs.pth", "adventurer")
  assert "flip_pattern='released' is a guess" in capsys.readouterr().out
  assert loaded.cfg.mean == (0.485, 0.456, 0.406)  # the default: ImageNet's


def test_torch_adventurer_imports_torch_and_the_standard_library_only():
  tree = ast.parse((ROOT / "linearizer" / "export" / "torch_adventurer.py").read_text())
  names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
  names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
  tops = {name.split(".")[0] for name in names}
  assert tops - {"torch"} <= sys.stdlib_module_names, tops


# ---------------------------------------------------------------------------------------
# Bad input: one message naming the path and what was expected, nothing written
# ---------------------------------------------------------------------------------------
def test_what_is_not_an_exported_adventurer_is_refused(tmp_path):
  (tmp_path / "file").write_text("x")
  (tmp_path / "empty").mkdir()
  (tmp_path / "garbled").mkdir()
  (tmp_path / "garbled" / "model.json").write_text("{not json")
  vit = random_model(models.vit_config("Ti/8", image_size=16, depth=1, num_classes=3))
  saved.save(vit, tmp_path / "vit")
  cases = {
    "missing": "is not a directory",
    "file": "is not a directory",
    "empty": "holds no model.json",
    "garbled": "is not JSON",
    "vit": "describes a 'vit' model",
  }
  for name, phrase in cases.items():
    with pytest.raises(UserError, match=phrase) as e:
      torch_export.to_torch(tmp_path / name, tmp_path / "out.pth")
    assert str(tmp_path / name) in str(e.value) and "expected an exported student" in str(e.value)
    assert not (tmp_path / "out.pth").exists()
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".out.pth")]  # no temp file left


def test_without_torch_the_export_says_how_to_install_it(exported, tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
  with pytest.raises(UserError, match=r"pip install 'linearizer\[torch\]'"):
    torch_export.to_torch(exported[0], tmp_path / "s.pth")
  assert not os.listdir(tmp_path)


# ---------------------------------------------------------------------------------------
# The file alone runs where there is no JAX
# ---------------------------------------------------------------------------------------
RUN_THERE = """
import importlib.util, json, sys
import torch
import torch_adventurer
assert importlib.util.find_spec("jax") is None, "jax is importable"
assert importlib.util.find_spec("linearizer") is None, "linearizer is importable"
model = torch_adventurer.load(sys.argv[1])
with torch.no_grad():
  logits = model(torch.load(sys.argv[2], weights_only=True))
print(json.dumps({"torch": torch.__version__, "logits": logits.tolist()}))
"""


@pytest.mark.slow
def test_the_module_runs_in_a_fresh_environment_without_jax(exported, reference, tmp_path):
  path = exported[1]
  subprocess.run([sys.executable, "-m", "venv", str(tmp_path / "venv")], check=True, timeout=300)
  python = str(tmp_path / "venv" / "bin" / "python")
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
  pip = subprocess.run(
    [python, "-m", "pip", "install", "torch==2.13.0"],
    env=env,
    capture_output=True,
    text=True,
    timeout=1200,
  )
  assert pip.returncode == 0, pip.stdout[-2000:] + pip.stderr[-2000:]
  there = tmp_path / "there"
  there.mkdir()
  (there / "torch_adventurer.py").write_bytes(
    (ROOT / "linearizer" / "export" / "torch_adventurer.py").read_bytes()
  )
  (there / "run.py").write_text(RUN_THERE)
  x = images((48, 48))
  torch.save(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), there / "images.pt")
  proc = subprocess.run(
    [python, "run.py", str(path), "images.pt"],
    cwd=there,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["torch"].startswith("2.13.0")
  want = np.asarray(jax_forward(reference, x))
  np.testing.assert_allclose(np.asarray(result["logits"]), want, atol=TOL)


def test_a_model_json_with_the_table_chunk_reads_as_the_default_chunk():
  """JAX's chunk_size=0 ("the measured table's") means the torch module's own default."""
  fields = dataclasses.asdict(models.adventurer_config("Ti/16", chunk_size=0))
  assert torch_adventurer.AdventurerConfig.from_dict(fields).chunk_size == 256
  with pytest.raises(ValueError, match="chunk_size"):
    torch_adventurer.AdventurerConfig(width=32, depth=1, patch=8, chunk_size=0)
