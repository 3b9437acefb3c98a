"""What the measured rows share: the models they measure (teacher and student, the ViT once
per attention impl), the row recording a failed measurement, and the FLOPs one row lends
another where XLA cannot count them.
"""

from linearizer import models
from linearizer.bench import results
from linearizer.bench.settings import Settings
from linearizer.log import log


def build_pair(config, s: Settings, attention_impl, num_classes=0):
  """The teacher (`bench.teacher_kind`) and student (`bench.student_kind`) at their variants."""
  b = config.bench
  teacher = models.build(
    b.teacher_kind,
    s.teacher,
    seed=0,
    attention_impl=attention_impl,
    dtype=s.dtype,
    num_classes=num_classes,
    **dict(b.teacher_overrides),
  )
  student = models.build(
    b.student_kind,
    s.student,
    seed=1,
    dtype=s.dtype,
    chunk_size=s.chunk_size,
    num_classes=num_classes,
    **dict(b.student_overrides),
  )
  return teacher, student


def each_model(config, s: Settings, base: dict, num_classes=0):
  """(model, name, attention impl, row meta) of the ViT under each attention impl, and of the
  student once, with the first impl's pair (it has no attention), built as they are used."""
  for impl in s.attention:
    teacher, student = build_pair(config, s, impl, num_classes=num_classes)
    pairs = [(teacher, "teacher", f"ViT-{s.teacher}", impl)]
    if impl == s.attention[0]:
      pairs.append((student, "student", f"Adventurer-{s.student}", None))
    for model, role, name, attn in pairs:
      meta = dict(base, model=name, role=role, variant=name.split("-", 1)[1], attention_impl=attn)
      yield model, name, attn, meta


def failed_row(meta, kind, resolution, err, what, *, detail=True, **fields):
  """The row recording that a measurement failed (e.g. out of memory, or a shape cuDNN
  refuses): recorded, not fatal. Logs `[bench] {what} @{resolution}: failed (...)`.
  `detail`: the row's error is the exception's type and its message's first 300
  characters; else its type alone (the log line then has the message's first 200)."""
  name = type(err).__name__
  if detail:
    log(f"[bench] {what} @{resolution}: failed ({name})")
    error = f"{name}: {str(err)[:300]}"
  else:
    log(f"[bench] {what} @{resolution}: failed ({name}: {str(err)[:200]})")
    error = name
  return dict(meta, kind=kind, resolution=resolution, **fields, error=error)


def fill_teacher_flops(rows, kind, peak, roles=("teacher",)):
  """XLA counts no FLOPs inside custom calls (cuDNN attention) and a loop's body once (the
  blocked attention), and a PyTorch peer has none: every impl does the same math, so such
  a row of `roles` takes the FLOPs of another row of the same roles at its resolution."""
  timed = [r for r in rows if r["kind"] == kind and r["role"] in roles and "img_per_s" in r]
  for r in timed:
    if r.get("attention_impl") == "blocked":
      r["flops_per_image"] = r["mfu"] = None
  for res in {r["resolution"] for r in timed}:
    same = [r for r in timed if r["resolution"] == res]
    flops = next((r["flops_per_image"] for r in same if r.get("flops_per_image")), None)
    for r in same:
      if r["flops_per_image"] is None and flops:
        r["flops_per_image"], r["mfu"] = flops, results.mfu(flops, r["img_per_s"], peak)
