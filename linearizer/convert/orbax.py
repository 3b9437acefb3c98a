"""orbax: a directory written by `linearizer.models.saved.save` (or this package's CLI)."""

import dataclasses
import pathlib

from flax import nnx

from linearizer import models
from linearizer.convert.common import SAME, Spec, templates
from linearizer.models import saved


def read(path: pathlib.Path) -> Spec:
  kind, cfg = saved.load_config(path)
  abstract = nnx.eval_shape(lambda: models.from_config(cfg))
  table = {t: ((t,), SAME) for t, _, _ in templates(abstract)}
  fields = dataclasses.asdict(cfg)
  # model.json determines every field; only run-time ones (models.RUN_TIME_FIELDS) may change.
  return Spec(kind, fields, table, saved.read_params(path), fixed=tuple(fields))
