"""The import graph runs one way (design.md "Layout"): an AST walk over every module.

A module imports from lower tiers, or from its own tier without a cycle; no function-level
imports between our own modules; the library never imports `configs/`; configs import only
`configs.*`; `kernels/` imports nothing of ours.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
OURS = ("linearizer", "kernels", "configs", "main")
TIERS = {
  "main": 0,
  "linearizer.stages": 1,
  "linearizer.ablation": 2,
  "linearizer.evaluate": 2,
  "linearizer.segment": 2,
  "linearizer.bench": 2,
  "linearizer.visualize": 2,
  "linearizer.distill": 3,
  "linearizer.scorecard": 3,
  "linearizer.supervised": 3,
  "linearizer.train": 4,
  "linearizer.workdir": 4,
  "linearizer.teacher_init": 4,
  "linearizer.teacher_cache": 4,
  "linearizer.export": 4,
  "linearizer.losses": 5,
  "linearizer.bench_results": 5,
  "linearizer.bench_torch": 5,
  "linearizer.optim": 5,
  "linearizer.data": 5,
  "linearizer.segdata": 5,
  "linearizer.sharding": 5,
  "linearizer.checkpoint": 5,
  "linearizer.metrics": 5,
  "linearizer.plots": 5,
  "linearizer.preemption": 5,
  "linearizer.convert": 5,
  "linearizer.models": 5,
  "linearizer.onnx_export": 5,
  "linearizer.torch_export": 5,
  "linearizer.errors": 6,
  "linearizer.cpu_malloc": 6,
  "linearizer.torch_adventurer": 6,
  "kernels": 6,
  "linearizer": 6,
}


PACKAGES = ("linearizer.convert", "linearizer.models", "kernels")  # a tier for all inside


def module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {
  module_name(p): p
  for p in [
    ROOT / "main.py",
    *ROOT.glob("configs/*.py"),
    *ROOT.glob("linearizer/**/*.py"),
    *ROOT.glob("kernels/*.py"),
  ]
}


def tier(module: str) -> int:
  """The tier of a module: its own entry, or its package's (convert/*, models/*, kernels/*)."""
  package = next((p for p in PACKAGES if module.startswith(p + ".")), module)
  assert package in TIERS, f"{module} has no tier: add it to TIERS (and to design.md)"
  return TIERS[package]


def resolve(name: str) -> str:
  """The module an import names: `from linearizer import data` names linearizer.data."""
  return name if name in MODULES else name.rpartition(".")[0] or name


def imports(path: pathlib.Path):
  """[(imported module, line, at module level)] for every import of our own modules."""
  tree = ast.parse(path.read_text())
  top = {id(n) for n in tree.body}
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
        found.append((resolve(name), node.lineno, id(node) in top))
  return found


GRAPH = {m: imports(p) for m, p in MODULES.items()}


def test_every_library_module_has_a_tier():
  """A new module is placed in the table above (and in design.md) when it is added."""
  for module in MODULES:
    if module.startswith(("linearizer", "kernels")):
      tier(module)


# The one lazy import, and why: `linearizer.load_student` is resolved on first use (PEP 562)
# so that `import linearizer.cpu_malloc`, which main.py runs before JAX loads, stays light.
# And the benchmark's PyTorch peers, imported only where torch is installed (an extra).
LAZY = {("linearizer", "linearizer.export"), ("linearizer.bench", "linearizer.bench_torch")}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_run_down(module):
  for target, line, at_top in GRAPH[module]:
    if (module, target) in LAZY:
      continue
    where = f"{MODULES[module].relative_to(ROOT)}:{line} imports {target}"
    assert at_top, f"{where} inside a function (imports between our modules are top-level)"
    if module.startswith("configs"):
      assert target.startswith("configs"), f"{where}: configs import only configs.*"
      continue
    assert not target.startswith("configs"), f"{where}: the library never imports configs/"
    if module.startswith("kernels"):
      assert target.startswith("kernels"), f"{where}: kernels/ is standalone"
    assert tier(target) >= tier(module), f"{where}: tier {tier(module)} -> {tier(target)} (up)"


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


def test_the_walk_sees_a_violation(tmp_path):
  """The checks above can fail: a function-level import and an upward one are found."""
  bad = tmp_path / "bad.py"
  bad.write_text(
    "import importlib\nfrom linearizer import stages\n\ndef f():\n  from linearizer import data\n"
    "  return importlib.import_module('linearizer.train')\n"
  )
  found = imports(bad)
  assert ("linearizer.stages", 2, True) in found and ("linearizer.data", 5, False) in found
  assert ("linearizer.train", 6, False) in found
  assert tier("linearizer.stages") < tier("linearizer.distill")
