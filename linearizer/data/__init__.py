"""Input pipelines on grain: sources, augmentations, deterministic per-process batches.

Modules:
  datasets    classification sources by name (`tfds:`, `folder:`, `npz:`, `mnist`, `digits`),
              their fixed train / test split, and the sources a data config names
              (`datasets`, not `sources`: `data.sources(cfg)` is one of its functions).
  transforms  per-example transforms: crops, RandAugment, `Transform`; `override`.
  pipeline    `Batch`, the one training stream (`stream`, which segmentation shares),
              classification's `train_batches`, and `eval_batches`.

Every example is a pure function of (seed, global example index): the order comes from
grain's per-epoch shuffle and each augmentation draws from its own seeded generator, so a
run resumed at step s reads exactly the batches an uninterrupted run would, and the batch
of a step is the same whatever the number of processes.

The public names of the three are re-exported here, so `from linearizer import data` then
`data.get_source(...)`, `data.train_batches(...)` reads as before the split; a test that
replaces one replaces it in the module that looks it up (e.g. `transforms.rand_augment`).
"""

from linearizer.data.datasets import (
  IMAGE_SUFFIXES,
  SPLITS,
  TEST_FRACTION,
  ArraySource,
  FolderSource,
  Part,
  Subset,
  TfdsSource,
  check_labels,
  eval_source,
  folder_classes,
  get_source,
  mnist,
  num_classes,
  read_image,
  rgb8,
  sources,
  split_index,
  train_source,
  unreadable_files,
  upright,
)
from linearizer.data.pipeline import (
  Batch,
  eval_batches,
  iterate,
  stack,
  stream,
  train_batches,
)
from linearizer.data.transforms import (
  RANDAUG_OPS,
  Transform,
  center_crop,
  override,
  rand_augment,
  random_resized_crop,
)

__all__ = [
  "IMAGE_SUFFIXES",
  "RANDAUG_OPS",
  "SPLITS",
  "TEST_FRACTION",
  "ArraySource",
  "Batch",
  "FolderSource",
  "Part",
  "Subset",
  "TfdsSource",
  "Transform",
  "center_crop",
  "check_labels",
  "eval_batches",
  "eval_source",
  "folder_classes",
  "get_source",
  "iterate",
  "mnist",
  "num_classes",
  "override",
  "rand_augment",
  "random_resized_crop",
  "read_image",
  "rgb8",
  "upright",
  "sources",
  "split_index",
  "stack",
  "stream",
  "train_batches",
  "train_source",
  "unreadable_files",
]
