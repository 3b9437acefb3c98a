"""The model table: every architecture, registered once, with its config and variants.

One entry serves `build` (a variant string), `from_config` (what checkpoints and exports
store), `models.saved` (the `kind` in model.json) and `convert` (the config a reader
infers). A new architecture is one module (a frozen config dataclass that validates itself
in `__post_init__`, and an nnx module whose `__call__` returns a `ModelOutput` with its
`roles`) and one `register` line.
"""

import dataclasses
import typing
from typing import Callable, NamedTuple

import jax
from flax import nnx

from linearizer.errors import UserError
from linearizer.models.adventurer import Adventurer, AdventurerConfig, adventurer_config
from linearizer.models.common import ModelOutput, TokenRoles, resample_pos_embed
from linearizer.models.vit import ViT, ViTConfig, vit_config

__all__ = [
  "Adventurer",
  "AdventurerConfig",
  "adventurer_config",
  "ModelOutput",
  "TokenRoles",
  "resample_pos_embed",
  "ViT",
  "ViTConfig",
  "vit_config",
  "Architecture",
  "ARCHITECTURES",
  "register",
  "build",
  "from_config",
  "kind_of",
  "config_from_dict",
  "RUN_TIME_FIELDS",
]

# Config fields that say how a model runs, not what it computes (up to rounding): a loaded
# model always takes the config's value. image_size resamples the position embedding.
RUN_TIME_FIELDS = (
  "dtype",
  "attention_impl",
  "blocked_attention_tokens",
  "attention_block_q",
  "attention_block_k",
  "ssd_impl",
  "ssd_interpret",
  "chunk_size",
  "drop_path",
  "remat",
  "image_size",
)


class Architecture(NamedTuple):
  config: type  # frozen dataclass of the model's fields
  module: type  # nnx module taking (config, rngs=...)
  variant: Callable  # (variant string, **overrides) -> config, e.g. 'B/16'


ARCHITECTURES: dict = {}


def register(kind: str, config: type, module: type, variant: Callable) -> None:
  """Adds an architecture to the table under `kind` (the name configs and model.json use)."""
  ARCHITECTURES[kind] = Architecture(config, module, variant)


register("vit", ViTConfig, ViT, vit_config)
register("adventurer", AdventurerConfig, Adventurer, adventurer_config)


def _architecture(kind: str) -> Architecture:
  if kind not in ARCHITECTURES:
    raise UserError(f"Unknown model kind {kind!r}; expected one of {sorted(ARCHITECTURES)}.")
  return ARCHITECTURES[kind]


def build(kind: str, variant: str, *, seed: int = 0, **overrides) -> nnx.Module:
  """`build('vit', 'B/16', num_classes=1000)` or `build('adventurer', 'Ti/16')`.

  Args:
    kind: an architecture of the table ('vit', 'adventurer', or one registered since).
    variant: its size and patch, e.g. 'B/16'.
    seed: the initialisation seed.
    **overrides: config fields replacing the variant's.
  Returns:
    The freshly initialised nnx module.
  """
  arch = _architecture(kind)
  return arch.module(arch.variant(variant, **overrides), rngs=nnx.Rngs(seed))


def kind_of(obj) -> str:
  """The table's name for a model or a model config."""
  for kind, arch in ARCHITECTURES.items():
    if isinstance(obj, (arch.config, arch.module)):
      return kind
  raise UserError(
    f"{type(obj).__name__} is not a registered architecture; known: {sorted(ARCHITECTURES)}."
  )


def num_params(model: nnx.Module) -> int:
  """The model's parameter count (every nnx.Param: buffers such as RoPE tables do not count)."""
  return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def from_config(cfg, *, seed: int = 0) -> nnx.Module:
  """A model from its config dataclass (what checkpoints and exports store)."""
  return ARCHITECTURES[kind_of(cfg)].module(cfg, rngs=nnx.Rngs(seed))


def config_from_dict(kind: str, fields: dict):
  """The config dataclass of `kind` from its JSON form (JSON turned tuples into lists)."""
  cls = _architecture(kind).config
  hints = typing.get_type_hints(cls)
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise UserError(f"Unknown {kind} config fields {unknown}; its fields are {sorted(known)}.")
  return cls(
    **{k: tuple(v) if hints[k] is tuple and isinstance(v, list) else v for k, v in fields.items()}
  )
