"""The teacher cache's files (`teacher_cache`): raw arrays on disk, their sizes, the JSON
beside them, and the digests and fields that tell one cache's setup from another's.
"""

import dataclasses
import hashlib
import json
import math
import os
from typing import Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

from linearizer import data, files


# ---------------------------------------------------------------------------------------
# The arrays on disk.
# ---------------------------------------------------------------------------------------
def open_arrays(directory: str, leaves: list, dtype, rows: int, mode: str) -> dict:
  """{'leaves': a memory map per teacher output, 'checks': the views' pixel sums}."""
  arrays = [
    np.memmap(os.path.join(directory, f"leaf{i}.bin"), dtype, mode, shape=(rows, *shape))
    for i, shape in enumerate(leaves)
  ]
  checks = np.memmap(os.path.join(directory, "checks.bin"), np.float64, mode, shape=(rows,))
  return {"leaves": arrays, "checks": checks}


def file_sizes(leaves: list, dtype, rows: int) -> dict:
  """{file name: the bytes it must have} of a cache of `rows` rows."""
  sizes = {
    f"leaf{i}.bin": rows * math.prod(shape) * np.dtype(dtype).itemsize
    for i, shape in enumerate(leaves)
  }
  return {**sizes, "checks.bin": rows * 8}


def digests(arrays: dict, lo: int, hi: int) -> list:
  """One blake2b digest per file (each output, then the pixel sums) of rows lo:hi: what a
  written batch is checked against when the cache is read (the standard library's hash)."""
  return [
    hashlib.blake2b(np.ascontiguousarray(a[lo:hi]).tobytes(), digest_size=16).hexdigest()
    for a in (*arrays["leaves"], arrays["checks"])
  ]


def damage(directory: str, leaves: list, dtype, rows: int, written: list) -> Optional[str]:
  """None if every file of the cache in `directory` has its size and every written batch
  (`written`: [lo, hi, digests] records) its digests; else what is wrong, naming the file."""
  sizes = file_sizes(leaves, dtype, rows)
  for name, size in sizes.items():
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
      return f"{path} is missing"
    if os.path.getsize(path) != size:
      return f"{path} has {os.path.getsize(path):,} bytes, not the {size:,} its shapes make"
  covered = sorted((lo, hi) for lo, hi, _ in written)
  if [lo for lo, _ in covered] != [0] + [hi for _, hi in covered[:-1]] or covered[-1][1] < rows:
    return f"{directory}/progress.json does not checksum every row (written by older code?)"
  arrays = open_arrays(directory, leaves, dtype, rows, "r")
  for lo, hi, expected in written:
    for name, got, want in zip(sizes, digests(arrays, lo, hi), expected):
      if got != want:
        return f"{os.path.join(directory, name)} rows {lo}-{hi - 1} do not match their checksum"
  return None


def size_of(leaves: list, dtype, rows: int) -> int:
  """Bytes the cache takes: every output and pixel sum, for every row."""
  return sum(file_sizes(leaves, dtype, rows).values())


def read_json(path: str) -> Optional[dict]:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def write_json(path: str, value: dict) -> None:
  files.write_json(path, value)  # a stop mid-write leaves the previous record


def parameters_digest(params) -> str:
  """A hash of the teacher's weights: a cache of another teacher is never read."""
  digest = hashlib.blake2b(digest_size=16)
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    array = np.asarray(jax.device_get(leaf))
    digest.update(f"{jax.tree_util.keystr(path)}{array.shape}{array.dtype}".encode())
    digest.update(np.ascontiguousarray(array).tobytes())
  return digest.hexdigest()


# Teacher config fields that change how fast its tokens come, never what they are.
SPEED_FIELDS = (
  "attention_impl",
  "blocked_attention_tokens",
  "attention_block_q",
  "attention_block_k",
  "drop_path",
  "num_classes",
  "head_bias",
  "map_heads",  # the pooling head's, as num_classes: the tokens never pass through it
  "fc_norm",
)
# Fields the ViT gained with the RoPE teachers: left out at their plain-ViT defaults, so a
# cache written before them (its fingerprint lacks them) still matches its teacher.
LATER_FIELDS = (
  "rope",
  "rope_temperature",
  "rope_offset",
  "rope_grid",
  "pos_embed",
  "qkv_bias",
  "mlp",
  "mlp_norm",
  "attn_norm",
  "final_norm",
  "image_mean",
  "image_std",
)


def teacher_fields(cfg) -> dict:
  """The teacher config's fields its tokens depend on (its weights are hashed apart)."""
  defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
  return {
    k: v
    for k, v in dataclasses.asdict(cfg).items()
    if k not in SPEED_FIELDS and not (k in LATER_FIELDS and v == defaults[k])
  }


def source_digest(source) -> str:
  """Which examples a source holds: its name and, down a chain of `data.Part`s (a labelled
  subset, a held-out split), their indices, hashed (another subset of the same size and
  name is another cache)."""
  digest = hashlib.blake2b(source.name.encode(), digest_size=16)
  while isinstance(source, data.Part):
    digest.update(np.ascontiguousarray(source.index, np.int64).tobytes())
    source = source.source
  return digest.hexdigest()


def differences(cached: dict, now: dict) -> list:
  """'field: cached … vs now …' for every fingerprint field that differs."""
  return [
    f"{k}: cached {cached.get(k)!r} vs now {now.get(k)!r}"
    for k in sorted(set(cached) | set(now))
    if cached.get(k) != now.get(k)
  ]


def across_processes(value, reduce):
  """`reduce` (np.all, np.min, np.max) of every process's `value`: multi-host runs decide
  together."""
  if jax.process_count() == 1:
    return value
  return reduce(multihost_utils.process_allgather(np.asarray(value))).item()


def all_processes(flag: bool) -> bool:
  return bool(across_processes(flag, np.all))
