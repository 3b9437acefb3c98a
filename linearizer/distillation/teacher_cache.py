"""The teacher-feature cache: distillation epochs without the teacher (`distill.teacher_cache`).

AM's maps and MP's targets depend only on the teacher's tokens at the K level ends for a
given augmented view. Without a cache every epoch draws fresh views and the teacher runs on
each. With one, `distill.teacher_cache_views` views per example are drawn once, the
teacher's outputs for them are written to local disk, and training cycles through those
views (epoch e reads view e mod V of every example) without running the teacher: the view
and its features always match, as in big_vision's "consistent teacher" (Beyer et al. 2022,
"Knowledge distillation: a good teacher is patient and consistent").

On disk, per process (`process<p>of<P>/`, each holding the examples p, p + P, ...):
  meta.json     the fingerprint of what the cache was written for (teacher weights, image
                size, augmentation, seed, views, ...) and the arrays' shapes
  progress.json the number of write batches done (a stopped write resumes there)
  leaf<i>.bin   one raw array per output of `distill.make_teacher_targets`, a row per view
  checks.bin    each view's pixel sum: a view re-drawn differently (another Pillow) is caught
A view is (example j, view v): its augmentation draws from `np.random.default_rng([seed, j,
v])`, so the cache stores the augmentation's parameters as the seed they come from and
training re-draws the identical image.
"""

import json
import os
import shutil
import time
from typing import Callable, Iterator, Optional

import grain
import jax
import jax.numpy as jnp
import numpy as np
import PIL
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

from linearizer import data, files, preemption, sharding, train, workdir
from linearizer.distillation.cache_files import (
  across_processes,
  all_processes,
  damage,
  differences,
  digests,
  open_arrays,
  parameters_digest,
  read_json,
  size_of,
  source_digest,
  teacher_fields,
  write_json,
)
from linearizer.distillation.cache_views import (
  CachedBatch,
  ReadExample,
  Views,
  WriteExample,
  stack_read,
  stack_written,
)
from linearizer.errors import UserError
from linearizer.log import log, main_process
from linearizer.memory import human

MODES = ("off", "write", "read", "auto")  # distill.teacher_cache (configs/common.py)
DTYPES = {"bfloat16": jnp.bfloat16, "float32": np.float32}  # distill.teacher_cache_dtype
PROGRESS_EVERY = 20  # write batches between progress records (and progress lines)


def check_config(dcfg) -> None:
  """Refuses a cache setting that cannot work, before any stage runs."""
  if dcfg.teacher_cache not in MODES:
    raise UserError(f"distill.teacher_cache={dcfg.teacher_cache!r}; expected one of {MODES}.")
  views = dcfg.teacher_cache_views
  if not isinstance(views, int) or views < 1:
    raise UserError(f"distill.teacher_cache_views={views!r}; expected a positive integer.")
  if dcfg.teacher_cache != "off" and dcfg.loss.get("w_mixer", 0.0):
    raise UserError(
      f"distill.teacher_cache={dcfg.teacher_cache!r} with distill.loss.w_mixer="
      f"{dcfg.loss.w_mixer}: the cache stores the teacher's levels and final tokens, not its "
      "attention branches (mixer_out's targets); set distill.teacher_cache='off'."
    )
  if dcfg.teacher_cache_dtype not in DTYPES:
    raise UserError(
      f"distill.teacher_cache_dtype={dcfg.teacher_cache_dtype!r}; expected one of {tuple(DTYPES)}."
    )


# ---------------------------------------------------------------------------------------
# The cache of one distillation stage.
# ---------------------------------------------------------------------------------------
class TeacherCache:
  """This process's cache: written by `write`, read through `batches`.

  Args:
    directory: the cache's directory (this process's `process<p>of<P>/` is made in it).
    views: this process's views (`Views`).
    targets: `(teacher_params, images) -> tree` (`distill.make_teacher_targets`).
    teacher_params: the teacher's nnx.Param state (hashed into the fingerprint).
    fingerprint: what else the cache depends on ({field: JSON value}).
    dtype: 'bfloat16' or 'float32'.
    image_size: the views' side.
    local_batch: rows per write batch and per training batch on this process.
  """

  def __init__(
    self, directory, views, targets, teacher_params, fingerprint, dtype, image_size, local_batch
  ):
    p, n = jax.process_index(), jax.process_count()
    self.directory = os.path.join(directory, f"process{p}of{n}")
    self.views, self.targets, self.dtype = views, targets, DTYPES[dtype]
    self.shape, self.local_batch = (image_size, image_size, 3), local_batch
    example = jax.ShapeDtypeStruct((1, *self.shape), np.float32)
    out = jax.eval_shape(targets, teacher_params, example)
    self.treedef = jax.tree.structure(out)
    self.leaves = [list(x.shape[1:]) for x in jax.tree.leaves(out)]
    self.fingerprint = {
      **fingerprint,
      "teacher_weights": parameters_digest(teacher_params),
      "views": len(views),
      "dtype": dtype,
      "outputs": self.leaves,
      "process": f"{p} of {n}",
      "pillow": PIL.__version__,
      "numpy": np.__version__,
    }
    # Every process runs the same number of write steps (they are collective).
    self.write_batches = across_processes(-(-len(views) // local_batch), np.max)

  @property
  def bytes(self) -> int:
    return size_of(self.leaves, self.dtype, len(self.views))

  def check_fingerprint(self) -> None:
    """Refuses a cache written for another setup, naming what differs, and one whose
    record of what it was written for is missing."""
    meta = read_json(os.path.join(self.directory, "meta.json"))
    now = json.loads(json.dumps(self.fingerprint))
    differ = differences(meta["fingerprint"], now) if meta is not None else []
    if meta is None and os.path.isdir(self.directory) and os.listdir(self.directory):
      differ = ["its meta.json is missing, so what it was written for cannot be checked"]
    # Every process decides together: local disks differ, and one refusing alone would
    # leave the others waiting in the next collective.
    if not all_processes(not differ):
      where = "; ".join(differ) or "on another process: see its log"
      raise UserError(
        f"The teacher cache in {self.directory} was written for another setup ({where}): "
        "delete it, or set distill.teacher_cache_dir to another directory."
      )

  def progress(self) -> int:
    """Rows written (0 for no cache): in rows, so a run with another batch size resumes."""
    return self._record().get("rows", 0)

  def written(self) -> list:
    """[lo, hi, digests] of every batch written (progress.json)."""
    return self._record().get("digests", [])

  def _record(self) -> dict:
    return read_json(os.path.join(self.directory, "progress.json")) or {}

  def verify(self) -> None:
    """Refuses a damaged cache, naming the file (every process decides together): file
    sizes against the shapes, then every written batch against its checksums."""
    began = time.time()
    wrong = damage(self.directory, self.leaves, self.dtype, len(self.views), self.written())
    if not all_processes(wrong is None):
      raise UserError(
        f"The teacher cache is damaged: {wrong or 'on another process: see its log'}. "
        f"Delete {self.directory} and run again to write it anew (distill.teacher_cache="
        "'write' or 'auto'), or set distill.teacher_cache='off'."
      )
    if main_process():
      secs = time.time() - began
      log(
        f"[distill] teacher cache verified: {human(self.bytes)} in {secs:.1f} s "
        f"({secs / max(self.bytes / 2**30, 1e-9):.1f} s per GiB)"
      )

  def complete(self) -> bool:
    return self.progress() >= len(self.views)

  def fits(self) -> tuple:
    """(whether the rest of the cache fits on the disk, what it needs, what is free)."""
    parent = self.directory
    while not os.path.exists(parent):
      parent = os.path.dirname(parent)
    done = self.progress() * self.bytes / max(1, len(self.views))
    need = max(0.0, self.bytes - done)
    free = shutil.disk_usage(parent).free
    return need <= free, need, free

  def write(self, teacher_params, mesh, rules, fsdp_min_size: int, workers: int) -> None:
    """Runs the teacher over every view not yet written (a stopped write resumes)."""
    os.makedirs(self.directory, exist_ok=True)
    meta = os.path.join(self.directory, "meta.json")
    if not os.path.exists(meta):
      write_json(meta, {"fingerprint": self.fingerprint})
    # Write batches are collective: every process starts at the same one.
    start = across_processes(self.progress(), np.min) // self.local_batch
    arrays = open_arrays(
      self.directory, self.leaves, self.dtype, len(self.views), "r+" if start else "w+"
    )
    params_sh = sharding.tree_shardings(teacher_params, mesh, rules, fsdp_min_size)
    batch_sh = NamedSharding(mesh, sharding.BATCH)
    forward = jax.jit(
      sharding.on_mesh(self.targets, mesh),
      in_shardings=(params_sh, batch_sh),
      out_shardings=batch_sh,
    )
    params = sharding.put(teacher_params, params_sh)
    b = self.local_batch
    written = [d for d in self.written() if d[1] <= start * b]  # batches kept on resume
    kept = written[-1][1] if written else 0
    if kept < start * b:  # rows kept past the last whole batch of another batch size
      written.append([kept, start * b, digests(arrays, kept, start * b)])
    rows = grain.MapDataset.range(start * b, self.write_batches * b)
    stream = data.iterate(
      rows.map(WriteExample(self.views, self.shape)).batch(b, batch_fn=stack_written), workers
    )
    began, total = time.time(), self.write_batches - start
    for i in range(start, self.write_batches):
      images, checks = next(stream)
      out = forward(params, sharding.global_batch(images, mesh))
      if jax.process_count() > 1:
        out = multihost_utils.global_array_to_host_local_array(out, mesh, sharding.BATCH)
      # A process with fewer rows than the others stores nothing past its end.
      lo, hi = min(i * b, len(self.views)), min((i + 1) * b, len(self.views))
      for array, leaf in zip(arrays["leaves"], jax.tree.leaves(out)):
        array[lo:hi] = np.asarray(leaf)[: hi - lo].astype(self.dtype)
      arrays["checks"][lo:hi] = checks[: hi - lo]
      if hi > lo:
        written.append([lo, hi, digests(arrays, lo, hi)])
      done = i + 1
      if done % PROGRESS_EVERY == 0 or done == self.write_batches:
        for array in (*arrays["leaves"], arrays["checks"]):
          array.flush()
        record = {"rows": hi, "digests": written}
        write_json(os.path.join(self.directory, "progress.json"), record)
        if main_process():
          speed = (done - start) * b * jax.process_count() / (time.time() - began)
          secs = (self.write_batches - done) * b * jax.process_count() / speed
          log(
            f"[distill] teacher cache: batch {done}/{self.write_batches} "
            f"({done - start} of {total} this run) | {speed:.1f} img/s | "
            f"ETA {int(secs // 60)}m{int(secs % 60):02d}s"
          )
        if done < self.write_batches and preemption.requested():
          raise preemption.Stopped(f"[distill] writing the teacher cache ({hi} rows kept)")

  def batches(self, seed: int, workers: int) -> Callable[[int], Iterator[CachedBatch]]:
    """`start_step -> iterator` of this process's training batches from the cache."""
    order = grain.MapDataset.range(len(self.views.examples)).shuffle(seed=seed).repeat()
    example = ReadExample(self.views, order, self.directory, self.leaves, self.dtype)
    b = self.local_batch

    def from_step(start: int) -> Iterator[CachedBatch]:
      ds = grain.MapDataset.range(start * b, 2**62).map(example).batch(b, batch_fn=stack_read)
      for images, labels, leaves in data.iterate(ds, workers):
        yield CachedBatch(images, labels, jax.tree.unflatten(self.treedef, leaves))

    return from_step


def prepare(
  mode: str,
  cache: TeacherCache,
  *,
  trained_views: int,
  teacher_params,
  mesh,
  rules,
  fsdp_min_size: int,
  workers: int,
) -> Optional[TeacherCache]:
  """The cache the stage trains from after writing what is missing, or None (no cache).

  mode: 'write' (write what is missing, then train from it), 'read' (train from a complete
    cache; the teacher never runs) or 'auto' (as 'write' where it pays and fits on the
    disk: the stage reads more views than the cache holds; else None, saying why).
  trained_views: the views the stage reads in all (steps × global batch).
  """
  cache.check_fingerprint()
  complete = all_processes(cache.complete())
  total = len(cache.views) * jax.process_count()
  if main_process():
    log(
      f"[distill] teacher cache ({mode}): {total} views "
      f"({len(cache.views.examples)} examples × {cache.views.views} on this process), "
      f"{human(cache.bytes / max(1, len(cache.views)))} each → {human(cache.bytes)} per process "
      f"in {cache.directory}" + (" (complete)" if complete else "")
    )
  if complete:
    cache.verify()
    return cache
  if mode == "read":
    raise UserError(
      f"distill.teacher_cache='read', but the cache in {cache.directory} is "
      + ("incomplete" if cache.progress() else "not there")
      + ": write it first (distill.teacher_cache='write' or 'auto')."
    )
  if mode == "auto" and trained_views <= total:
    log(
      f"[distill] teacher cache (auto): the stage reads {trained_views} views, no more than "
      f"the {total} a cache would hold, so it would save no teacher forward: not used."
    )
    return None
  fits, need, free = cache.fits()
  if not all_processes(fits):
    if mode == "auto":
      log(f"[distill] teacher cache (auto): needs {human(need)}, {human(free)} free: not used.")
      return None
    raise UserError(
      f"The teacher cache needs {human(need)} more in {cache.directory}, but only "
      f"{human(free)} is free: lower distill.teacher_cache_views, "
      + ("use distill.teacher_cache_dtype='bfloat16', " if cache.dtype == np.float32 else "")
      + "point distill.teacher_cache_dir at a larger disk, or set distill.teacher_cache='off'."
    )
  cache.write(teacher_params, mesh, rules, fsdp_min_size, workers)
  return cache


# ---------------------------------------------------------------------------------------
# The distill stage's cache.
# ---------------------------------------------------------------------------------------
def for_stage(config, run_dir: str, teacher, student, source, targets, levels):
  """The stage's teacher-feature cache (`distill.teacher_cache`), written where it is
  missing, or None when the teacher runs every step (`off`, or `auto` where a cache would
  not pay or fit). `targets` is the teacher's function the cache stores
  (`distill.make_teacher_targets`), `levels` AM's block pairs (`losses.level_pairs`)."""
  dcfg = config.distill
  # 'auto' decides once: a resumed stage keeps the stream it started with, even where the
  # disk has changed since (a 'write' that no longer fits is then refused, not skipped).
  decision = os.path.join(workdir.stage_dir(run_dir, "distill"), "teacher_cache.json")
  mode = dcfg.teacher_cache
  if mode == "auto" and os.path.exists(decision):
    with open(decision, encoding="utf-8") as f:
      mode = "write" if json.load(f)["used"] else "off"
    log(f"[distill] teacher cache (auto): resuming as the stage began: {mode}")
  if mode == "off":
    return None
  data_cfg, train_source = (
    train.stage_data(config, "distill"),
    train.stage_source(config, "distill", source),
  )
  views = Views(
    train_source,
    data_cfg,
    seed=config.seed,
    views=dcfg.teacher_cache_views,
    mean=student.cfg.mean,
    std=student.cfg.std,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  # Everything the cached views and outputs depend on besides the teacher's weights (hashed
  # by the cache): a cache written for anything else is refused, the fields named.
  fingerprint = dict(
    teacher=teacher_fields(teacher.cfg),
    source=train_source.name,
    source_examples=source_digest(train_source),
    examples=len(train_source),
    **{k: data_cfg[k] for k in ("image_size", "crop_scale", "flip", "randaugment")},
    student_patch=student.cfg.patch,
    student_norm=[list(student.cfg.mean), list(student.cfg.std)],
    teacher_input=dcfg.teacher_input,
    am_features=dcfg.loss.am_features,
    teacher_blocks=[i for i, _ in levels],
    seed=config.seed,
  )
  params = nnx.state(teacher, nnx.Param)
  directory = dcfg.teacher_cache_dir or os.path.join(
    workdir.stage_dir(run_dir, "distill"), "teacher_cache"
  )
  cache = TeacherCache(
    directory,
    views,
    targets,
    params,
    json.loads(json.dumps(fingerprint)),  # tuples as lists: as meta.json reads back
    dcfg.teacher_cache_dtype,
    data_cfg.image_size,
    local_batch=dcfg.batch_size // jax.process_count(),
  )
  prepared = prepare(
    mode,
    cache,
    trained_views=dcfg.steps * dcfg.batch_size,
    teacher_params=params,
    mesh=sharding.make_mesh(config.mesh.data, config.mesh.fsdp),
    rules=[tuple(r) for r in config.mesh.rules],
    fsdp_min_size=config.mesh.fsdp_min_size,
    workers=config.data.workers,
  )
  if main_process() and not os.path.exists(decision):
    files.write_json(
      decision, {"used": prepared is not None, "directory": cache.directory}, indent=None
    )
  return prepared
