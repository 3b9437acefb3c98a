"""What the student learned, as pictures: similarity maps, attention, SSD mixing matrices.

For a few images and each of K levels (method.md §2; the paper's "stages") it draws the teacher's and each
student's cosine-similarity maps — for one query patch as a heat map over the image, and
whole, with the AM distance between teacher and student. For one layer it draws the
teacher's attention (averaged over heads) next to each student's implicit SSD mixing
matrix (method.md §6): y_t = Σ_{s≤t} M_ts x_s + D x_t with

  M_ts = (C_t · B_s) · exp(A Σ_{r=s+1..t} Δ_r) · Δ_s,

the attention-like form of the Mamba-2 scan. Both are shown patch-to-patch in raster
order: the student's flipped layers read the patches backwards, which is undone here (a
flipped layer's matrix is then upper-triangular).
"""

import glob
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import kernels
from linearizer import data, files, plots, resolve
from linearizer.distillation import distill, losses, scorecard
from linearizer.errors import UserError
from linearizer.log import log
from linearizer.models import common

plt = plots.plt


# ---------------------------------------------------------------------------------------
# The matrices.
# ---------------------------------------------------------------------------------------
def grid_of(model, images=None) -> tuple:
  """The model's patch grid on `images` (NHWC), else at its configured image size."""
  size = (model.cfg.image_size,) * 2 if images is None else images.shape[1:3]
  return common.patch_grid(size, model.cfg.patch)


def has_scan(model) -> bool:
  """Whether the model's blocks are Mamba-2 mixers (whose SSD matrix can be drawn)."""
  layers = getattr(model, "layers", None)
  return bool(layers) and hasattr(layers[0], "mixer")


def _layer_inputs(model, images, layer, blocks=None):
  """The residual stream entering block `layer` (`blocks`: the model's own, if at hand)."""
  if layer == 0:
    return model.embed(images)
  return (model(images).blocks if blocks is None else blocks)[layer - 1]


def student_mixing(student, images, layer, blocks=None):
  """Head-averaged |M| of student layer `layer`, patch-to-patch in raster order: (b, N, N).

  The scanned sequence is [heading mean, patches (reversed in a flipped layer), cls].
  """
  block = student.layers[layer]
  h = _layer_inputs(student, images, layer, blocks)
  inputs, _ = block.mixer.ssd_inputs(block.mixer_input(h))
  m = jnp.mean(
    jnp.abs(kernels.ssd_matrix(inputs["dt"], inputs["A"], inputs["B"], inputs["C"])), axis=1
  )
  n = m.shape[-1] - 2
  order = np.arange(n)[::-1] + 1 if block.flip else np.arange(n) + 1  # raster -> position
  return m[:, order][:, :, order]


def teacher_attention(teacher, images, layer, blocks=None):
  """Head-averaged softmax attention of ViT block `layer`, patches only: (b, N, N)."""
  block = teacher.blocks[layer]
  x = block.norm1(_layer_inputs(teacher, images, layer, blocks))
  # q and k as the block sees them: rotated by the teacher's RoPE where it has one
  q, k, _ = block.attn.qkv_heads(x, teacher.rotary(grid_of(teacher, images)))
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / np.sqrt(q.shape[-1])
  patches = slice(*teacher.roles.patches)
  return jnp.mean(jax.nn.softmax(logits, axis=-1), axis=1)[:, patches, patches]


def level_tokens(teacher, student, t_images, s_images, num_levels):
  """Per level, (teacher, student) tokens as [cls, patches in raster order] on the
  student's grid, exactly as activation matching sees them (scope 'all')."""
  return scorecard.level_pairs_of(
    teacher(t_images),
    student(s_images),
    grid_of(teacher, t_images),
    grid_of(student, s_images),
    num_levels,
  )


def analyse(teacher, students, images, *, num_levels=4, layer=-1, teacher_input="resample"):
  """Everything the figures draw, as NumPy arrays, for `images` normalised for the first
  student (re-normalised here for the teacher when its statistics differ, and resized for
  it with `teacher_input='resize'`, as distillation feeds it).

  students: {name: Adventurer}. Returns dict(grid, maps={name: [(b, n, n)] per stage},
  am={name: [(b,)] per stage}, mixing={name: (b, N, N)}, layer=(teacher, student) indices).
  """
  first = next(iter(students.values()))
  t_images = teacher_images(images, first.cfg, teacher.cfg, teacher_input)
  t_out = teacher(t_images)  # once, for every student
  t_blocks = t_out.blocks
  depth = first.cfg.depth
  s_layer = layer % depth
  t_layer = round((s_layer + 1) * len(teacher.blocks) / depth) - 1  # same relative depth
  out = dict(
    grid=grid_of(first),
    maps={},
    am={},
    mixing={},
    layer=(t_layer, s_layer),
    mixing_grid={"teacher": grid_of(teacher, t_images)},
  )
  out["mixing"]["teacher"] = np.asarray(teacher_attention(teacher, t_images, t_layer, t_blocks))
  for name, student in students.items():
    s_out = student(images)
    s_blocks = s_out.blocks
    pairs = scorecard.level_pairs_of(
      t_out, s_out, grid_of(teacher, t_images), grid_of(student, images), num_levels
    )
    out["maps"].setdefault("teacher", [np.asarray(losses.cosine_similarities(t)) for t, _ in pairs])
    out["maps"][name] = [np.asarray(losses.cosine_similarities(s)) for _, s in pairs]
    out["am"][name] = [
      np.asarray(jax.vmap(lambda a, b: losses.activation_matching([a[None]], [b[None]])[0])(t, s))
      for t, s in pairs
    ]
    if has_scan(student):  # other architectures: similarity maps only
      out["mixing"][name] = np.asarray(student_mixing(student, images, s_layer, s_blocks))
      out["mixing_grid"][name] = grid_of(student)
  return out


def teacher_images(images, student_cfg, teacher_cfg, teacher_input="resample"):
  """Images normalised for the student, as the teacher sees them in training."""
  return distill.teacher_view(jnp.asarray(images), student_cfg, teacher_cfg, teacher_input)


# ---------------------------------------------------------------------------------------
# The figures.
# ---------------------------------------------------------------------------------------
def _heat(ax, pixels, row, grid, title):
  """A map row over the patch grid, upsampled onto the image."""
  ax.imshow(pixels)
  heat = np.kron(
    row.reshape(grid), np.ones((pixels.shape[0] // grid[0], pixels.shape[1] // grid[1]))
  )
  ax.imshow(
    heat,
    cmap="inferno",
    alpha=0.6,
    vmin=-1,
    vmax=1,
    extent=(0, pixels.shape[1], pixels.shape[0], 0),
  )
  ax.set_title(title, fontsize=8)


def _matrix(ax, m, title, **kw):
  ax.imshow(m, cmap="viridis", **kw)
  ax.set_title(title, fontsize=8)


def draw(result, pixels, index, query, path):
  """One PNG for image `index`: a row per stage (query heat maps, then whole maps), then a
  row with the teacher's attention and the students' mixing matrices for one layer."""
  names = list(result["maps"])  # teacher first
  grid = result["grid"]
  q = 1 + query[0] * grid[1] + query[1]  # the query patch's row in [cls, patches]
  k = len(result["maps"]["teacher"])
  cols = 1 + 2 * len(names)
  fig, axes = plt.subplots(k + 1, cols, figsize=(1.9 * cols, 1.9 * (k + 1)), squeeze=False)
  for ax in axes.flat:
    ax.axis("off")
  for s in range(k):
    axes[s, 0].imshow(pixels)
    axes[s, 0].scatter(
      [(query[1] + 0.5) * pixels.shape[1] / grid[1]],
      [(query[0] + 0.5) * pixels.shape[0] / grid[0]],
      c="cyan",
      s=25,
      marker="x",
    )
    axes[s, 0].set_title(f"stage {s + 1}: query", fontsize=8)
    for i, name in enumerate(names):
      m = result["maps"][name][s][index]
      am = "" if name == "teacher" else f"\nAM {result['am'][name][s][index]:.3f}"
      _heat(axes[s, 1 + i], pixels, m[q, 1:], grid, f"{name}{am}")
      _matrix(axes[s, 1 + len(names) + i], m, f"{name} map{am}", vmin=-1, vmax=1)
  t_layer, s_layer = result["layer"]
  for i, name in enumerate(names):
    if name not in result["mixing"]:  # a student without an SSD scan
      continue
    m, g = result["mixing"][name][index], result["mixing_grid"][name]
    row = m[int((query[0] + 0.5) * g[0] / grid[0]) * g[1] + int((query[1] + 0.5) * g[1] / grid[1])]
    what = (
      f"teacher attention\nlayer {t_layer + 1}"
      if name == "teacher"
      else f"{name} |M|\nlayer {s_layer + 1}"
    )
    _heat(axes[k, 1 + i], pixels, row / max(row.max(), 1e-12), g, what)
    _matrix(axes[k, 1 + len(names) + i], np.log10(m + 1e-6), what + " (log10)")
  axes[k, 0].imshow(pixels)
  axes[k, 0].set_title("query row", fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def to_pixels(images, cfg):
  """Normalised NHWC images -> displayable [0, 1] HWC arrays."""
  x = np.asarray(images) * np.asarray(cfg.std) + np.asarray(cfg.mean)
  return np.clip(x, 0, 1)


def figures(
  teacher,
  students,
  images,
  directory,
  *,
  num_levels=4,
  layer=-1,
  query=None,
  prefix="maps",
  teacher_input="resample",
):
  """Draws one PNG per image into `directory`; returns (paths, AM distances per student).

  query: (row, col) of the query patch on the student grid; None = the centre patch.
  teacher_input: what the teacher is fed (distill.teacher_input of the run).
  """
  grid = grid_of(next(iter(students.values())))
  query = tuple(query) if query is not None and min(query) >= 0 else (grid[0] // 2, grid[1] // 2)
  if not (query[0] < grid[0] and query[1] < grid[1]):
    raise UserError(f"visualize.query={query} is outside the {grid} patch grid.")
  result = analyse(
    teacher, students, images, num_levels=num_levels, layer=layer, teacher_input=teacher_input
  )
  pixels = to_pixels(images, next(iter(students.values())).cfg)
  paths = [
    draw(result, pixels[i], i, query, os.path.join(directory, f"{prefix}_{i}.png"))
    for i in range(len(images))
  ]
  am = {name: [float(np.mean(a)) for a in per_level] for name, per_level in result["am"].items()}
  return paths, am


# ---------------------------------------------------------------------------------------
# The `visualize` stage: the models of a finished run, on a few images.
# ---------------------------------------------------------------------------------------
def load_images(spec, num, cfg, run_config):
  """`num` images normalised for `cfg` (a student config): image files (comma-separated
  paths, globs or folders), a data source (mnist, digits, npz:, folder:, tfds:), or '' for
  the run's own evaluation data."""
  dcfg = data.override(run_config.data, image_size=cfg.image_size)
  kind = spec.partition(":")[0]
  if not spec or kind in ("mnist", "digits", "npz", "folder", "tfds"):
    # '': the run's own evaluation source, as its eval stage reads it.
    source = data.get_source(spec, "test") if spec else data.eval_source(run_config.data)
    batch = next(data.eval_batches(source, dcfg, batch_size=num, mean=cfg.mean, std=cfg.std))
    return np.asarray(batch.image[: min(num, len(source))])
  files = []
  for part in spec.split(","):
    found = (
      sorted(glob.glob(os.path.join(part, "*"))) if os.path.isdir(part) else sorted(glob.glob(part))
    )
    if not found:
      raise UserError(
        f"visualize: images={part!r} is no image file, folder or glob, nor "
        "a data source (mnist, digits, npz:, folder:, tfds:)."
      )
    files += found
  transform = data.Transform(dcfg, train=False, mean=cfg.mean, std=cfg.std)
  return np.stack([transform(data.read_image(f), None) for f in files[:num]])


def mean_am_distances(
  teacher, students, images, num_levels, batch_size=50, teacher_input="resample"
):
  """{name: [AM distance per stage]}: L_AM over all tokens (method.md §2), averaged over
  `images` (normalised for the students)."""
  first = next(iter(students.values()))
  totals = {name: np.zeros(num_levels) for name in students}
  for i in range(0, len(images), batch_size):
    s_images = jnp.asarray(images[i : i + batch_size])
    t_images = teacher_images(s_images, first.cfg, teacher.cfg, teacher_input)
    t_out = teacher(t_images)
    for name, student in students.items():
      pairs = scorecard.level_pairs_of(
        t_out, student(s_images), grid_of(teacher, t_images), grid_of(student, s_images), num_levels
      )
      totals[name] += len(s_images) * np.array(
        [float(losses.activation_matching([t], [s])[0]) for t, s in pairs]
      )
  return {name: (total / len(images)).tolist() for name, total in totals.items()}


def check_config(config) -> None:
  """A visualize config names the finished run it draws."""
  if not config.get("run_dir"):
    raise UserError("visualize: set --config.run_dir to the --workdir of a finished run.")


def maps_hook(config, teacher, eval_source, directory):
  """`hook(step, distiller)` drawing teacher vs student maps of one fixed validation image
  into `directory` (distillation's `fit` calls it as the maps converge)."""
  num_levels = config.distill.loss.num_stages

  def draw(step, distiller):
    s = distiller.student.cfg  # one image, normalised as the student reads it
    batch = next(data.eval_batches(eval_source, config.data, batch_size=1, mean=s.mean, std=s.std))
    paths, am = figures(
      teacher,
      {"student": distiller.student},
      batch.image,
      directory,
      num_levels=num_levels,
      prefix=f"step_{step:06d}",
      teacher_input=config.distill.teacher_input,
    )
    log(
      f"[distill] maps at step {step}: {paths[0]} (AM distance per stage "
      + " ".join(f"{v:.3f}" for v in am["student"])
      + ")"
    )

  return draw


def run(config, out_dir):
  """Draws the teacher and students of the run in `config.run_dir` into out_dir/visualize."""
  check_config(config)
  run_dir = config.run_dir
  path = os.path.join(run_dir, "config.json")
  if not os.path.isfile(path):
    raise UserError(
      f"visualize: run_dir={run_dir!r} is not a run's workdir "
      f"(no config.json); expected the --workdir of a finished run."
    )
  with open(path, encoding="utf-8") as f:
    run_config = ml_collections.ConfigDict(json.load(f))
  vcfg = config.visualize
  teacher, students = resolve.drawn_models(run_config, run_dir, config.teacher_init, vcfg.students)
  if teacher is None:
    raise UserError(f"visualize: no teacher in {run_dir}; set --config.teacher_init.")
  if not students:
    raise UserError(
      f"visualize: none of the stages {list(vcfg.students)} has finished in "
      f"{run_dir}; nothing to draw."
    )
  images = load_images(
    config.images, vcfg.num_images, next(iter(students.values())).cfg, run_config
  )
  out = os.path.join(out_dir, "visualize")
  # The teacher fed as the run fed it (a run without a distill block: the default, resample).
  teacher_input = run_config.get("distill", {}).get("teacher_input", "resample")
  paths, am = figures(
    teacher,
    students,
    images,
    out,
    num_levels=vcfg.num_stages,
    layer=vcfg.layer,
    query=vcfg.query,
    teacher_input=teacher_input,
  )
  if vcfg.am_images:  # the AM distance measured on more images than are drawn
    many = load_images(config.images, vcfg.am_images, next(iter(students.values())).cfg, run_config)
    am = mean_am_distances(teacher, students, many, vcfg.num_stages, teacher_input=teacher_input)
  am_images = len(many) if vcfg.am_images else len(images)
  files.write_json(os.path.join(out, "am_distance.json"), dict(am, images=am_images))
  for name, per_level in am.items():
    log(
      f"[visualize] AM distance to the teacher, {name}: " + " ".join(f"{v:.4f}" for v in per_level)
    )
  for p in paths:
    log(f"[visualize] wrote {p}")
  return dict(paths=paths, am=am)
