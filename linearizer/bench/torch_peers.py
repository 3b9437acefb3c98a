"""The benchmark's PyTorch peers: the fastest ViT most users can run outside JAX (Hugging
Face `ViTModel` with SDPA attention, no pooler) and our pure-PyTorch Adventurer
(`torch_adventurer.py`, what `--format torch` exports), both at random weights.

Timed as `timing` times JAX: one warm-up call, then the median of `repeats` calls, each
ended by a device synchronise, under `torch.inference_mode`. torch uses its default thread
count (one per core). Needs torch (and transformers for the ViT): `linearizer/bench/forward.py`
imports this module only when they are installed.
"""

import time

import torch
import transformers

from linearizer.export import torch_adventurer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def device() -> str:
  return "cuda" if torch.cuda.is_available() else "cpu"


def hf_vit(cfg, resolution: int):
  """transformers' ViTModel of our ViTConfig's shape at `resolution` (timm style: GELU,
  LayerNorm eps as ours), SDPA attention."""
  hf = transformers.ViTConfig(
    hidden_size=cfg.width,
    num_hidden_layers=cfg.depth,
    num_attention_heads=cfg.num_heads,
    intermediate_size=cfg.mlp_dim,
    image_size=resolution,
    patch_size=cfg.patch,
    layer_norm_eps=cfg.eps,
    attn_implementation="sdpa",
  )
  return transformers.ViTModel(hf, add_pooling_layer=False).eval()


def adventurer(cfg_fields: dict, resolution: int):
  """Our PyTorch Adventurer with the JAX student's fields, no head."""
  fields = dict(cfg_fields, image_size=resolution, num_classes=0)
  return torch_adventurer.Adventurer(torch_adventurer.AdventurerConfig.from_dict(fields)).eval()


def seconds_per_call(fn, x, repeats: int) -> float:
  """The median wall time of `fn(x)` over `repeats` calls after one warm-up."""
  sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
  with torch.inference_mode():
    fn(x)
    sync()
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      fn(x)
      sync()
      times.append(time.perf_counter() - start)
  return sorted(times)[len(times) // 2]


def forward_seconds(kind: str, cfg, resolution: int, batch: int, dtype: str, repeats: int):
  """Seconds per forward of a PyTorch peer (`kind` 'vit': `cfg` our ViTConfig; 'adventurer':
  `cfg` the student's config fields) on a (batch, 3, res, res) input."""
  dev, dt = device(), DTYPES[dtype]
  model = hf_vit(cfg, resolution) if kind == "vit" else adventurer(cfg, resolution)
  model = model.to(dev, dt)
  x = torch.zeros(batch, 3, resolution, resolution, device=dev, dtype=dt)
  fn = (lambda x: model(pixel_values=x).last_hidden_state) if kind == "vit" else model
  return seconds_per_call(fn, x, repeats)


def threads() -> int:
  return torch.get_num_threads()
