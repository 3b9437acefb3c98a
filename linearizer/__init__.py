"""linearizer: distill a frozen ViT teacher into a linear-time Adventurer (Mamba-2) student.

`linearizer.load_student(dir)` and `linearizer.load_segmenter(dir)` are the one-line entries
for notebooks. It is resolved on first
use (PEP 562), so that importing `linearizer.cpu_malloc` (which main.py runs before JAX is
loaded) does not load JAX and the whole library first (tests/test_layout.py allows this one
lazy import by name).
"""

import importlib

__all__ = ["load_student", "load_segmenter"]


def __getattr__(name):
  if name in __all__:
    return getattr(importlib.import_module("linearizer.serving"), name)
  raise AttributeError(f"module 'linearizer' has no attribute {name!r}")
