"""How a config block is declared and built: its fields once, each with its default and a
comment, and a builder that refuses any key the block does not declare.

A block is a dict literal of `field=default,  # what it means` lines, in one place; a field
with a range or a change rule is `field=Field(default, RANGE, change),  # what it means`
(linearizer/schema.py: the ranges, FINISHED and STOPPED, and the checks the library runs).
`build(name, declared, given)` checks `given` against it and returns the ConfigDict.
"""

import difflib

import ml_collections

from linearizer.schema import Field, register


class _Marker:
  def __init__(self, what):
    self.what = what

  def __repr__(self):
    return self.what


REQUIRED = _Marker("REQUIRED")  # a field with no default: the builder's caller must give it
ABSENT = _Marker("ABSENT")  # declared, but the block has it only when the caller gives it


def is_block(value) -> bool:
  return isinstance(value, (dict, ml_collections.ConfigDict))


def refuse_undeclared(name: str, declared, given, free=(), path="") -> None:
  """Raises TypeError for a key of `given` that `declared` lacks, naming the nearest one.

  A dict given for a field whose default is a non-empty block is checked against that
  block's fields too, unless the field is in `free` (a mapping with keys of its own).
  """
  for key, value in given.items():
    if key not in declared:
      close = difflib.get_close_matches(key, list(declared), n=1)
      hint = f"; did you mean {path + close[0]!r}?" if close else "."
      raise TypeError(
        f"{name}(): no field {path + key!r}{hint} Declared{' in ' + path[:-1] if path else ''}: "
        f"{', '.join(declared)}."
      )
    default = declared[key]
    if key not in free and is_block(default) and len(default) and is_block(value):
      refuse_undeclared(name, default, value, free, f"{path}{key}.")


def unwrap(name: str, declared: dict, top: bool = False) -> dict:
  """`declared` with every Field replaced by its default (nested blocks too), each Field's
  range and change rule registered (linearizer.schema; `top`: a config's top-level block)."""
  out = {}
  for key, value in declared.items():
    if isinstance(value, Field):
      register(key, value, name, top)
      value = value.default
    out[key] = unwrap(name, value) if isinstance(value, dict) else value
  return out


def build(name: str, declared: dict, given: dict, free=(), top=False) -> ml_collections.ConfigDict:
  """The block `declared` with the fields in `given` replaced (a dict given for a nested
  block updates only the fields it names); an undeclared key or a missing REQUIRED field
  raises TypeError. `top`: the block is a whole config (its fields' change rules cover
  everything under them)."""
  declared = unwrap(name, declared, top)
  refuse_undeclared(name, declared, given, free)
  missing = [k for k, v in declared.items() if v is REQUIRED and k not in given]
  if missing:
    raise TypeError(f"{name}(): missing required field(s) {', '.join(map(repr, missing))}.")
  # Declared order; a field without a default takes its given value in its place.
  no_default = {k for k, v in declared.items() if v is REQUIRED or v is ABSENT}
  c = ml_collections.ConfigDict(
    {
      k: given[k] if k in no_default else v
      for k, v in declared.items()
      if k in given or v is not ABSENT
    }
  )
  c.update({k: v for k, v in given.items() if k not in no_default})
  return c
