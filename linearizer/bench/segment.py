"""The segmentation rows (part `segment`): backbone + UperNet head forward (no auxiliary
head), teacher vs student at equal patch size, at segmentation resolutions (512² … 2048²):
where the paper's 2.74× (ADE20K) and 4.21× (Cityscapes) come from.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from linearizer.bench.rows import each_model, failed_row
from linearizer.bench.settings import Settings
from linearizer.bench.timing import timed, timed_row
from linearizer.log import log
from linearizer.models.segmenter import Segmenter, SegmenterConfig


def segmenter_forward(backbone, num_classes: int, channels: int):
  """A jitted `(state, images) -> logits` of `backbone` + UperNet (`channels` wide; 0 = the
  backbone's width, as mmseg's ViT-B configs use 768), and its state."""
  head = SegmenterConfig(
    num_classes=num_classes, channels=channels or backbone.cfg.width, aux_channels=0
  )
  graphdef, state = nnx.split(Segmenter(backbone, head, rngs=nnx.Rngs(0)))
  return jax.jit(lambda st, images: nnx.merge(graphdef, st)(images)[0]), state


def segment_rows(config, s: Settings, base, peak):
  """Backbone + UperNet forward rows: the ViT once per attention impl, the student once."""
  seg, rows, batch = config.bench.segment, [], s.segment_batch
  for model, name, attn, meta in each_model(config, s, base):
    fn, state = segmenter_forward(model, seg.num_classes, seg.channels)
    for res in s.segment_resolutions:
      images = jnp.zeros((batch, res, res, 3), jnp.float32)
      try:
        row = timed_row(
          meta,
          peak,
          batch=batch,
          **timed(fn, (state, images), s.repeats),
          kind="segment",
          resolution=res,
          tokens=(res // model.cfg.patch) ** 2,
        )
      except Exception as err:  # recorded, not fatal (as the forward rows)
        rows.append(failed_row(meta, "segment", res, err, f"segment {name} {attn or ''}"))
        continue
      rows.append(row)
      log(
        f"[bench] segment {name:<18} {attn or '':<6} @{res:<5} {row['img_per_s']:10.2f} img/s "
        f"(compile {row['compile_s']:.1f} s)"
      )
  return rows
