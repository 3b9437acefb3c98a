"""The import graph runs one way (design.md "Layout"): an AST walk over every module, held to
a handful of package rules rather than a row per module.

Layers, top to bottom; a module imports from its own layer without a cycle or from below:
  main.py and the compile-only tool (aot) · stages · stage runners and feature packages ·
  train, workdir, resolve ·
  models, convert, data and the root's leaves · errors, log, cpu_malloc, kernels.
And: kernels import nothing of ours; models, convert and data import only the root's leaves
and each other; distillation and segmentation never import bench, export or each other;
only main.py and aot import stages; a run imports no converter framework (torch, onnx: a test); the resolver imports no feature package; no function-level imports
between our modules; the library never imports `configs/`; configs import only `configs.*`
and `linearizer.schema` (the vocabulary of a field's range and change rule, a leaf).
"""

import ast
import pathlib
import re
import subprocess
import sys

import pytest

from helpers import ROOT

OURS = ("linearizer", "kernels", "configs", "main")

FEATURES = ("bench", "distillation", "export", "segmentation")
RUNNERS = ("ablation", "costs", "evaluate", "segment", "supervised", "visualize")
LOOP = ("resolve", "train", "workdir")
LOW = ("cpu_malloc", "errors", "log")
# The layer of each top-level name under linearizer/ (a package counts with all inside it);
# a root module not named here is one of the root's leaves (optim, sharding, checkpoint, ...).
LAYERS = {
  "main": 0,
  "linearizer.aot": 0,  # compiles the stages' steps (`Stage.steps`) for a TPU topology
  "linearizer.stages": 1,
  **{f"linearizer.{n}": 2 for n in FEATURES + RUNNERS},
  **{f"linearizer.{n}": 3 for n in LOOP},
  **{f"linearizer.{n}": 5 for n in LOW},
  "linearizer": 5,  # the package's __init__: load_student/load_segmenter, resolved lazily
  "kernels": 5,
}
LEAF = 4
ISOLATED = {  # package -> packages it must never import
  "linearizer.distillation": ("linearizer.bench", "linearizer.export", "linearizer.segmentation"),
  "linearizer.segmentation": ("linearizer.bench", "linearizer.export", "linearizer.distillation"),
  "linearizer.resolve": tuple(f"linearizer.{n}" for n in FEATURES),
}
BASE = ("linearizer.models", "linearizer.convert", "linearizer.data")


def module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {
  module_name(p): p
  for p in [
    ROOT / "main.py",
    *ROOT.glob("configs/**/*.py"),
    *ROOT.glob("linearizer/**/*.py"),
    *ROOT.glob("kernels/*.py"),
  ]
}


def top(module: str) -> str:
  """The unit a module belongs to: `linearizer.distillation.losses` -> linearizer.distillation."""
  parts = module.split(".")
  return ".".join(parts[:2]) if parts[0] == "linearizer" else parts[0]


def layer(module: str) -> int:
  return LAYERS.get(top(module), LEAF)


def is_leaf(module: str) -> bool:
  """One of the root's leaf modules (a root module the layers above do not name)."""
  unit = top(module)
  return unit not in LAYERS and unit.startswith("linearizer.") and unit not in BASE


def resolve(name: str) -> str:
  """The module an import names: `from linearizer import data` names linearizer.data."""
  return name if name in MODULES else name.rpartition(".")[0] or name


def imports(path: pathlib.Path):
  """[(imported module, line, at module level)] for every import of our own modules."""
  tree = ast.parse(path.read_text())
  top_level = {id(n) for n in tree.body}
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      assert not node.level, f"{path}:{node.lineno}: relative import (write it absolute)"
      names = [f"{node.module}.{a.name}" for a in node.names]
    elif (  # importlib.import_module("linearizer.x"): an import all the same
      isinstance(node, ast.Call)
      and isinstance(node.func, ast.Attribute)
      and node.func.attr == "import_module"
      and node.args
      and isinstance(node.args[0], ast.Constant)
    ):
      names = [node.args[0].value]
    else:
      continue
    for name in names:
      if name.split(".")[0] in OURS:
        found.append((resolve(name), node.lineno, id(node) in top_level))
  return found


GRAPH = {m: imports(p) for m, p in MODULES.items()}

# The lazy imports, and why: `linearizer.load_student` is resolved on first use (PEP 562) so
# that `import linearizer.cpu_malloc`, which main.py runs before JAX loads, stays light; the
# benchmark's PyTorch peers are imported only where torch is installed (an extra).
LAZY = {
  ("linearizer", "linearizer.serving"),
  ("linearizer.bench.forward", "linearizer.bench.torch_peers"),
}


def problems(module: str, target: str, line: int, at_top: bool) -> list:
  """What is wrong with `module` importing `target` (empty: nothing)."""
  path = MODULES[module]
  where = f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{line} imports {target}"
  if (module, target) in LAZY:
    return []
  if module.startswith("configs"):
    ok = target.startswith("configs") or target == "linearizer.schema"
    return [] if ok else [f"{where}: configs import only configs.* and linearizer.schema"]
  found = (
    [] if at_top else [f"{where} inside a function (imports between our modules are top-level)"]
  )
  if target.startswith("configs"):
    return found + [f"{where}: the library never imports configs/"]
  if module.startswith("kernels") and not target.startswith("kernels"):
    found.append(f"{where}: kernels/ is standalone")
  if top(target) == top(module):
    return found
  if layer(target) < layer(module):
    found.append(f"{where}: layer {layer(module)} -> {layer(target)} (up)")
  if target.startswith("linearizer.stages") and module not in ("main", "linearizer.aot"):
    found.append(f"{where}: only main.py (and aot, which compiles them) runs the stages")
  if top(target) in ISOLATED.get(top(module), ()):
    found.append(f"{where}: {top(module)} never imports {top(target)}")
  if top(module) in BASE and not (top(target) in BASE or is_leaf(target) or layer(target) > LEAF):
    found.append(f"{where}: {top(module)} imports only the root's leaves, models, convert, data")
  return found


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_follow_the_rules(module):
  found = [
    p for target, line, at_top in GRAPH[module] for p in problems(module, target, line, at_top)
  ]
  assert not found, "\n".join(found)


def test_no_cycles():
  edges = {m: {t for t, _, _ in GRAPH[m] if t in MODULES and t != m} for m in MODULES}
  state = {}

  def visit(m, path):
    state[m] = "open"
    for t in sorted(edges[m]):
      assert state.get(t) != "open", "import cycle: " + " -> ".join([*path, m, t])
      if t not in state:
        visit(t, [*path, m])
    state[m] = "done"

  for m in sorted(MODULES):
    if m not in state:
      visit(m, [])


def test_no_module_over_400_lines():
  """Long modules are split along their concerns; a Pallas kernel file may keep its forward
  and backward together (its docstring says why)."""
  exempt = {"kernels.pallas_tpu", "kernels.pallas_gpu"}
  long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > 400}
  assert not {m: n for m, n in long.items() if m not in exempt}, long


def test_the_rules_see_violations(tmp_path):
  """The checks above can fail: a function-level import, an upward one, a feature importing a
  sibling it must not, and a base package importing a feature are all found."""
  bad = tmp_path / "bad.py"
  bad.write_text(
    "import importlib\nfrom linearizer import stages\n\ndef f():\n  from linearizer import data\n"
    "  return importlib.import_module('linearizer.train')\n"
  )
  found = imports(bad)
  assert ("linearizer.stages", 2, True) in found and ("linearizer.data", 5, False) in found
  assert ("linearizer.train", 6, False) in found
  MODULES["linearizer.distillation.x"] = MODULES["linearizer.data"] = bad
  try:
    assert problems("linearizer.distillation.x", "linearizer.segmentation.stage", 1, True)
    assert problems("linearizer.distillation.x", "linearizer.stages", 1, True)
    assert problems("linearizer.data", "linearizer.train", 1, True)  # up
    assert problems("linearizer.data", "linearizer.distillation.losses", 1, True)
    assert problems("linearizer.data", "linearizer.optim", 1, False)  # inside a function
    assert not problems("linearizer.data", "linearizer.optim", 1, True)
  finally:
    del MODULES["linearizer.distillation.x"]
    MODULES["linearizer.data"] = ROOT / "linearizer" / "data" / "__init__.py"


def test_a_run_imports_no_converter_framework():
  """Importing the stages (every run does) loads neither torch, transformers, timm nor onnx:
  the JAX export a run writes needs none of them; only `python -m linearizer.export` does."""
  code = (
    "import sys, linearizer.stages\n"
    "print(' '.join(m for m in ('torch', 'transformers', 'timm', 'onnx', 'open_clip') "
    "if m in sys.modules))"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == ""


def test_only_the_resolver_finds_a_runs_models():
  """A run's models by role (its teacher, its students, a stage's model) are found in
  linearizer/resolve.py alone: no other module loads a checkpoint itself or reads a stage's
  model directory to load it (a named checkpoint goes through `resolve.load_model`)."""
  loads = re.compile(
    r"(?<![\w.`])(convert\.load\(|saved\.restore(_segmenter)?\(|load\w*\([^)\n]*model_dir\()"
  )
  owners = ("linearizer.resolve", "linearizer.serving", "linearizer.convert", "linearizer.models")
  found = [
    f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
    for module, path in MODULES.items()
    if module.startswith("linearizer") and not module.startswith(owners)
    for n, line in enumerate(path.read_text().splitlines(), 1)
    if loads.search(line)
  ]
  assert not found, "\n".join(found)
  assert loads.search("x = load_model(workdir.model_dir(run_dir, 'distill'), o)")


def test_tests_import_helpers_or_their_own_folder():
  """tests/ mirrors the packages, and pytest puts each test file's folder on sys.path (no
  __init__.py): a test module imports helpers.py or a module of its own folder, never one of
  another folder, and no two modules under tests/ share a name (conftest.py aside)."""
  tests = ROOT / "tests"
  files = [p for p in tests.rglob("*.py") if "adventurer_standins" not in p.parts]
  ours = [p for p in files if p.name != "conftest.py"]
  folder = {p.stem: p.parent for p in ours}
  assert len(folder) == len(ours), sorted(p.name for p in ours)
  found = []
  for path in files:
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and not node.level:
        names = [node.module]
      else:
        continue
      for name in names:
        top = name.split(".")[0]
        if top in folder and top != "helpers" and folder[top] != path.parent:
          found.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {name}")
  assert not found, "\n".join(found)
