"""Teacher (ViT) and student (Adventurer) models, built from short variant strings."""
from flax import nnx

from linearizer.models.adventurer import Adventurer, AdventurerConfig, adventurer_config
from linearizer.models.common import ModelOutput, resample_pos_embed
from linearizer.models.vit import ViT, ViTConfig, vit_config

__all__ = ["Adventurer", "AdventurerConfig", "adventurer_config", "ModelOutput",
           "resample_pos_embed", "ViT", "ViTConfig", "vit_config", "build", "from_config"]


def build(kind: str, variant: str, *, seed: int = 0, **overrides):
  """`build('vit', 'B/16', num_classes=1000)` or `build('adventurer', 'Ti/16')`."""
  if kind == "vit":
    return ViT(vit_config(variant, **overrides), rngs=nnx.Rngs(seed))
  if kind == "adventurer":
    return Adventurer(adventurer_config(variant, **overrides), rngs=nnx.Rngs(seed))
  raise ValueError(f"Unknown model kind {kind!r}; expected 'vit' or 'adventurer'.")


def from_config(cfg, *, seed: int = 0):
  """A model from its config dataclass (what checkpoints and exports store)."""
  cls = ViT if isinstance(cfg, ViTConfig) else Adventurer
  return cls(cfg, rngs=nnx.Rngs(seed))
