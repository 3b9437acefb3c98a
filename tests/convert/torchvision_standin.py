"""An import-only stand-in for torchvision, for timm in this environment.

timm imports torchvision at module level (its data transforms, `FrozenBatchNorm2d`, a few
layers), and this environment's torch (2.13+cpu) has no torchvision build, so timm is
installed without its dependencies (requirements-test-nodeps.txt) and the stand-in answers
those imports with modules whose every name is an inert class. No Vision Transformer code
path calls them: the tests run timm's own model classes, untouched. Where a real
torchvision is importable, `import_with_standin` imports plainly.
"""

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types


def _attribute(name):
  """Any public name: an inert class (dunder names stay missing, as Python expects)."""
  if name.startswith("__"):
    raise AttributeError(name)
  return _Inert(name, (), {"__init__": lambda self, *a, **k: None})


class _Inert(type):
  """A class whose every attribute is another inert class (enums, nested namespaces)."""

  def __getattr__(cls, name):
    return _attribute(name)


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
  def find_spec(self, name, path, target=None):
    if name == "torchvision" or name.startswith("torchvision."):
      return importlib.machinery.ModuleSpec(name, self, is_package=True)
    return None

  def create_module(self, spec):
    module = types.ModuleType(spec.name)
    module.__path__ = []
    module.__getattr__ = _attribute
    return module

  def exec_module(self, module):
    pass


def import_with_standin(*names: str) -> list:
  """Imports `names` (None for one not installed) with the stand-in in front of the import
  system, then takes it away again, its modules too: later imports of torchvision, in any
  test, find none. Unless torchvision is installed: then plain imports."""
  finder = None
  if importlib.util.find_spec("torchvision") is None:
    finder = _Finder()
    sys.meta_path.insert(0, finder)
  try:
    return [importlib.import_module(n) if importlib.util.find_spec(n) else None for n in names]
  finally:
    if finder is not None:
      sys.meta_path.remove(finder)
      for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
