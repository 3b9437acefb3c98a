"""A few distillation and supervised steps of tiny models on a chosen mesh; results to .npz.

Run by tests/test_sharding.py as a subprocess, so it can give JAX simulated CPU devices
(the flag must be set before JAX is imported) and start several processes:

  python tests/sharded_run.py --devices 8 --mesh 1x1 --mesh 8x1 --mesh 2x4 --out r.npz
  python tests/sharded_run.py --devices 4 --mesh 1x-1:distill --mesh 2x4 --out r.npz \
      --coordinator localhost:PORT --num_processes 2 --process_id I    # I = 0 and 1

Every process builds the same models from fixed seeds and the same fixed global batch, and
feeds only its own rows of it (process i of P takes rows [i·B/P, (i+1)·B/P)). The `packed`
kind distils on a packed batch: 40 images of 16 sizes (sides 8 to 32) in B rows. For each mesh
`DxF` (data × fsdp; `1x1` uses one device only) the .npz gets `<mesh>/mesh` (its resolved
shape) and, per step kind (`distill`, `supervised`): `<mesh>/<kind>/loss` (one value per
step) and `<mesh>/<kind>/{params,opt_state,ema}/<path>` (the trained parameters, optimizer
state and EMA after the last step). Process 0 writes the file.
"""

import argparse
import os
import sys
import time


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--devices", type=int, default=8, help="simulated CPU devices per process")
  p.add_argument(
    "--mesh",
    action="append",
    required=True,
    help="DATAxFSDP[:KIND,...], e.g. 8x1, 2x4:distill or 1x-1 (-1: all the "
    "remaining devices); 1x1 runs on one device; repeatable",
  )
  p.add_argument("--out", required=True, help=".npz written by process 0")
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--batch", type=int, default=16, help="global batch size")
  p.add_argument("--kinds", default="distill,supervised,packed", help="for meshes that name none")
  p.add_argument("--fsdp_min_size", type=int, default=1024)
  p.add_argument("--coordinator", default=None, help="host:port of jax.distributed")
  p.add_argument("--num_processes", type=int, default=1)
  p.add_argument("--process_id", type=int, default=0)
  return p.parse_args(argv)


ARGS = parse_args()
# Before JAX is imported: the number of simulated host devices is read once, at start-up.
# (The fast-compile flags come from tests/conftest.py through the environment; every mesh
# compiles under the same flags, so comparisons stay fair.)
FLAGS = {"--xla_force_host_platform_device_count": str(ARGS.devices)}
os.environ["XLA_FLAGS"] = " ".join(
  [f for f in os.environ.get("XLA_FLAGS", "").split() if f.split("=")[0] not in FLAGS]
  + [f"{k}={v}" for k, v in FLAGS.items()]
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from configs import common  # noqa: E402
from linearizer import data, models, optim, sharding, supervised, train  # noqa: E402
from linearizer.distillation import distill, packed_step  # noqa: E402
from linearizer.models import packing  # noqa: E402

TEACHER = dict(image_size=32, width=48, depth=2, num_heads=3, mlp_dim=96)
STUDENT = dict(
  image_size=32, width=64, depth=2, headdim=16, chunk_size=16, drop_path=0.1, num_classes=10
)


def make_config(kind, steps, batch):
  """One stage's settings; a large lr so three steps move parameters beyond rounding noise."""
  distils = kind in ("distill", "packed")
  loss = common.distill_loss(num_stages=2) if distils else common.supervised_loss()
  make = common.distill_stage if distils else common.stage
  return make(steps=steps, batch_size=batch, lr=1e-3, loss=loss, warmup_steps=0, ema_decay=0.9)


def make_batch(size):
  rng = np.random.default_rng(1234)
  return data.Batch(
    rng.standard_normal((size, 32, 32, 3)).astype(np.float32),
    rng.integers(0, 10, size).astype(np.int32),
  )


def make_packed_batch(rows, teacher, student):
  """40 images of random sides in {8, 16, 24, 32}, packed for both models into `rows` rows."""
  rng = np.random.default_rng(4321)
  sides = rng.choice([8, 16, 24, 32], size=(40, 2))
  images = [rng.standard_normal((h, w, 3)).astype(np.float32) for h, w in sides]
  views = packed_step.views(teacher, student, sequence_length=40, max_images=4)
  (t, s), _ = packing.pack_views(images, views, max_images=4, rows=rows)
  return packed_step.PackedBatch(t, s)


def to_numpy(tree):
  """Host copies of (possibly multi-process) global arrays, whole on every process."""

  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))

  return jax.tree.map(get, tree)


def is_sharded(sharding_):
  return any(axis is not None for axis in sharding_.spec)


def run(kind, mesh, batch, args):
  """`args.steps` steps of `kind` on `mesh`; (losses, final state as {path: array})."""
  config = make_config(kind, args.steps, args.batch)
  student = models.build("adventurer", "Ti/8", seed=1, **STUDENT)
  tx = optim.make_optimizer(config.optim, config.steps)
  shard = lambda tree: sharding.tree_shardings(tree, mesh, fsdp_min_size=args.fsdp_min_size)
  if kind in ("distill", "packed"):
    teacher = models.build("vit", "Ti/8", seed=2, **TEACHER)
    module = distill.Distiller(student, teacher.cfg.width, rngs=nnx.Rngs(3))
    if kind == "packed":
      step = packed_step.make_packed_distill_step(module, teacher, tx, config)
      batch = make_packed_batch(args.batch, teacher, student)
    else:
      step = distill.make_distill_step(module, teacher, tx, config)
    teacher_params = nnx.state(teacher)
    teacher_shardings = shard(teacher_params)
    teacher_params = sharding.put(teacher_params, teacher_shardings)
    extra, extra_shardings = (teacher_params,), (teacher_shardings,)
  else:
    module = student
    step = supervised.make_supervised_step(module, tx, config)
    extra, extra_shardings = (), ()
  _, state = train.init_state(module, tx, ema=bool(config.optim.ema_decay))
  state_shardings = shard(state)
  if mesh.shape["fsdp"] > 1:  # FSDP must really split parameters and their moments
    split = [
      optim.path_str(p)
      for p, s in jax.tree_util.tree_leaves_with_path(state_shardings)
      if is_sharded(s)
    ]
    assert any(p.startswith("params/") for p in split), split
    assert any(p.startswith("opt_state/") for p in split), split
  state = sharding.put(state, state_shardings)
  step = sharding.jit_step(step, mesh, state_shardings, extra_shardings)

  p, i = jax.process_count(), jax.process_index()
  rows = args.batch // p
  mine = slice(i * rows, (i + 1) * rows)  # this process's rows (distillation ignores labels)
  local = jax.tree.map(lambda x: x[mine], batch)
  global_ = sharding.global_batch(local, mesh)
  rng = jax.random.key(7)
  losses, t0 = [], time.perf_counter()
  compile_s = None
  for _ in range(args.steps):
    state, metrics = step(state, *extra, global_, rng)
    losses.append(float(to_numpy(metrics["loss"])))
    assert np.isfinite(losses[-1]), (kind, losses)
    compile_s = compile_s or time.perf_counter() - t0
  assert jax.tree.all(
    jax.tree.map(  # the step kept the state's shardings
      lambda x, s: x.sharding.is_equivalent_to(s, x.ndim), state, state_shardings
    )
  )
  print(f"  {kind}: first step {compile_s:.1f}s, all {time.perf_counter() - t0:.1f}s", flush=True)
  params = to_numpy({"params": state.params, "opt_state": state.opt_state, "ema": state.ema})
  flat = {optim.path_str(k): v for k, v in jax.tree_util.tree_leaves_with_path(params)}
  return np.asarray(losses), flat


def main(args):
  if args.coordinator:
    assert sharding.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    assert jax.process_count() == args.num_processes, jax.process_count()
  if args.batch % jax.process_count():
    raise ValueError(f"--batch {args.batch} is not divisible by {jax.process_count()} processes")
  batch = make_batch(args.batch)
  results = {}
  for spec in args.mesh:
    spec, _, kinds = spec.partition(":")
    data, fsdp = (int(v) for v in spec.split("x"))
    devices = jax.devices()[:1] if data * fsdp == 1 else None
    mesh = sharding.make_mesh(data, fsdp, devices=devices)
    results[f"{spec}/mesh"] = np.asarray([mesh.shape["data"], mesh.shape["fsdp"]])
    for kind in (kinds or args.kinds).split(","):
      losses, params = run(kind, mesh, batch, args)
      results[f"{spec}/{kind}/loss"] = losses
      results.update({f"{spec}/{kind}/{k}": v for k, v in params.items()})
      print(f"process {jax.process_index()} mesh {spec} {kind}: loss {losses.tolist()}", flush=True)
  if jax.process_index() == 0:
    tmp = args.out + ".tmp.npz"
    np.savez(tmp, **results)
    os.replace(tmp, args.out)
  if args.coordinator:
    jax.distributed.shutdown()


if __name__ == "__main__":
  main(ARGS)
