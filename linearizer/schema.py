"""What a config field may hold and when it may change: declared beside the field's default
in configs/ (`configs/fields.py` builds every block), checked here by the library.

A declaration is `name=Field(default, RANGE, change),  # meaning` in a block's dict literal.
`check(config)` refuses, before anything is written, a value outside its range (one
`error:` line naming the field, the value and the range); `may_change` tells the workdir's
one-config guard which fields may differ from a run already there:

  FINISHED  changes no trained weight (what to run, evaluation, scoring, logging, plots,
            checkpoint cadence, sharding, worker counts): may differ on any run
  STOPPED   how a stage trains from where it is (its learning rate, clipping, the NaN
            policy): may differ while that stage has not finished, so a stopped run resumes
            with it (the advice printed after a divergence can be followed)

Fields are registered by their name: one name means one thing, with one range, in every
block that has it (a second declaration that differs is a mistake in configs/, refused).
This module imports nothing of ours but errors, so configs/ may import it.
"""

import math
import numbers
from typing import Any, Callable, NamedTuple, Optional

from linearizer.errors import UserError

FINISHED = "finished"
STOPPED = "stopped"


class Range(NamedTuple):
  """What values a field takes, in words (for the error) and as a test."""

  text: str
  ok: Callable[[Any], bool]


def _number(v) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool) and not math.isnan(v)


def _int(v) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def interval(lo, hi, *, lo_open=False, hi_open=False, integer=False, text="") -> Range:
  """Numbers between lo and hi (None: unbounded), ends open or closed, integers or not."""
  left = "(" if lo_open or lo is None else "["
  right = ")" if hi_open or hi is None else "]"
  kind = "an integer" if integer else "a number"
  text = (
    text or f"{kind} in {left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"
  )

  def ok(v):
    if not (_int(v) if integer else _number(v)):
      return False
    above = lo is None or (v > lo if lo_open else v >= lo)
    below = hi is None or (v < hi if hi_open else v <= hi)
    return above and below

  return Range(text, ok)


POSITIVE = interval(0, None, lo_open=True, text="a positive number")
NON_NEGATIVE = interval(0, None, text="a number >= 0")
FRACTION = interval(0, 1)  # a share or a probability
DECAY = interval(0, 1, hi_open=True)  # a decay, a momentum, a drop rate: 1 would never move
POSITIVE_FRACTION = interval(0, 1, lo_open=True)
COUNT = interval(0, None, integer=True, text="an integer >= 0")  # 0: off, all, the default
POSITIVE_INT = interval(1, None, integer=True, text="a positive integer")
SEED = COUNT
ALL_OR_COUNT = Range("-1 (all) or an integer >= 1", lambda v: _int(v) and (v == -1 or v >= 1))


def ordered_pair(inner: Range) -> Range:
  """A (low, high) pair, low <= high, each in `inner`."""
  return Range(
    f"an ordered pair (low, high), low <= high, each {inner.text}",
    lambda v: (
      isinstance(v, (tuple, list)) and len(v) == 2 and all(map(inner.ok, v)) and v[0] <= v[1]
    ),
  )


def pair(inner: Range) -> Range:
  """Two values, each in `inner` (an (h, w) size, a (long, short) scale)."""
  return Range(
    f"two values, each {inner.text}",
    lambda v: isinstance(v, (tuple, list)) and len(v) == 2 and all(map(inner.ok, v)),
  )


def each(inner: Range) -> Range:
  """A tuple whose every entry is in `inner` (empty allowed)."""
  return Range(
    f"a tuple of values each {inner.text}",
    lambda v: isinstance(v, (tuple, list)) and all(map(inner.ok, v)),
  )


# `Field.absent` when a field has been there from the start.
ALWAYS = "(declared from the start)"


class Field(NamedTuple):
  """A declared field: its default, its range (None: any value of its type), when it may
  change on a run already in a workdir ('' never, STOPPED, FINISHED), and for a field added
  later, the value a config saved before it existed behaved as (`absent`): a workdir of
  such a config is not refused for lacking it while the new value is that one."""

  default: Any
  range: Optional[Range] = None
  change: str = ""
  absent: Any = ALWAYS


SCHEMA: dict = {}  # field name -> Field (its default left out: blocks differ there)
TOP: dict = {}  # a top-level field's name -> its change rule (a block's covers its fields)


def register(name: str, field: Field, where: str, top: bool = False) -> None:
  """Records `field`'s range and change rule under `name` (and, for a field at the top of
  a config, its change rule for everything under it); a different second declaration of
  the same name raises (one name, one meaning)."""
  rule = field._replace(default=None)
  known = SCHEMA.setdefault(name, rule)
  if known != rule:
    raise TypeError(
      f"{where}(): field {name!r} is declared elsewhere with another range or change rule "
      f"({known.range and known.range.text!r}, {known.change!r}): one name, one meaning."
    )
  if top:
    TOP[name] = field.change


def _leaves(tree, path=""):
  if isinstance(tree, dict) or hasattr(tree, "items") and not isinstance(tree, (str, bytes)):
    for key, value in tree.items():
      yield from _leaves(value, f"{path}{key}.")
  else:
    yield path.rstrip("."), tree


def check(config) -> None:
  """Raises one UserError naming every field whose value is outside its declared range."""
  wrong = []
  for path, value in _leaves(config):
    rule = SCHEMA.get(path.rpartition(".")[2])
    if rule is not None and rule.range is not None and not rule.range.ok(value):
      wrong.append(f"{path}={value!r}: expected {rule.range.text}")
  if wrong:
    raise UserError("; ".join(wrong) + ".")


def absent_as(path: str) -> Any:
  """What field `path` was before it was declared (`Field.absent`), or ALWAYS."""
  return SCHEMA.get(path.rpartition(".")[2], Field(None)).absent


def may_change(path: str, when: str) -> bool:
  """Whether field `path` may differ on a run that is `when` (FINISHED: the stage it
  belongs to is done; STOPPED: it stopped before its end). A field may change if it, or the
  top-level block it is in, is declared so; a FINISHED field may change on a stopped run."""
  allowed = {FINISHED: (FINISHED,), STOPPED: (FINISHED, STOPPED)}[when]
  own = SCHEMA.get(path.rpartition(".")[2], Field(None)).change
  return own in allowed or TOP.get(path.partition(".")[0], "") in allowed
