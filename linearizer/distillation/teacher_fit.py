"""Whether a student can start from its teacher's weights (`distill.student_init='teacher'`):
decided from the two configs alone, so a run is refused before any stage runs. The copy
itself is `teacher_init.py`.
"""

from typing import NamedTuple

from linearizer import models
from linearizer.errors import UserError
from linearizer.models.adventurer import AdventurerConfig
from linearizer.models.vit import ViTConfig

PARTIAL_FLAG = "--config.distill.teacher_init_partial=true"


class Misfit(NamedTuple):
  """Why part of the mapping cannot be copied: shapes the student's config gives otherwise."""

  part: str  # "width" | "depth" | "mixer" | "mlp": what it blocks (see `_blocked`)
  params: str  # the student parameters left at their own init, for the message
  reason: str  # e.g. "student width 64 ≠ teacher width 96"


def fitting_overrides(teacher_cfg: ViTConfig) -> dict:
  """The student fields under which every mapped teacher weight fits, for the message."""
  hd = teacher_cfg.width // teacher_cfg.num_heads
  return dict(
    width=teacher_cfg.width,
    depth=teacher_cfg.depth,
    expand=1,
    headdim=hd,
    ngroups=teacher_cfg.num_heads,
    d_state=hd,
    mlp_ratio=_mlp_ratio(teacher_cfg.mlp_dim, teacher_cfg.width),
  )


def _mlp_ratio(hidden: int, width: int) -> float:
  """A ratio with int(width · ratio) == hidden (the student builds int(width · ratio))."""
  ratio = hidden / width
  return ratio if int(width * ratio) == hidden else (hidden + 0.5) / width


def misfits(student_cfg: AdventurerConfig, teacher_cfg: ViTConfig) -> list:
  """Every `Misfit` of this student for this teacher (empty: everything mapped fits)."""
  s, t = student_cfg, teacher_cfg
  found = []
  if s.width != t.width:
    found.append(
      Misfit(
        "width",
        "patch_embed, cls_token, pos_embed, layers.*, norm_f",
        f"student width {s.width} ≠ teacher width {t.width}",
      )
    )
  if s.depth != t.depth:
    found.append(Misfit("depth", "layers.*", f"student depth {s.depth} ≠ teacher depth {t.depth}"))
  mixer = _mixer_misfits(s, t)
  if mixer:
    found.append(
      Misfit(
        "mixer", "layers.{i}.mixer.{in_proj, conv_weight, conv_bias, out_proj}", ", ".join(mixer)
      )
    )
  hidden = int(s.width * s.mlp_ratio)
  if hidden != t.mlp_dim:
    found.append(
      Misfit(
        "mlp",
        "layers.{i}.mlp.{w1, w2, w3}",
        f"student MLP hidden int(width*mlp_ratio) {hidden} ≠ teacher mlp_dim {t.mlp_dim}",
      )
    )
  return found


def _mixer_misfits(s: AdventurerConfig, t: ViTConfig) -> list:
  """Why x ← V, B ← K, C ← Q, out_proj ← O do not fit (empty: they do)."""
  hd = t.width // t.num_heads
  checks = (
    (
      s.expand * s.width == t.width,
      f"student expand*width {s.expand * s.width} ≠ teacher width {t.width} (x ← V)",
    ),
    (
      s.ngroups == t.num_heads,
      f"student ngroups {s.ngroups} ≠ teacher num_heads {t.num_heads} (a B/C group per head)",
    ),
    (s.d_state == hd, f"student d_state {s.d_state} ≠ teacher head dim {hd} (B ← K, C ← Q)"),
    (hd % s.headdim == 0, f"student headdim {s.headdim} does not divide teacher head dim {hd}"),
  )
  return [reason for fits, reason in checks if not fits]


def check_kinds(student_cfg, teacher_cfg=None) -> None:
  """Refuses a pair this mapping does not know: an Adventurer student, a ViT teacher (None:
  the teacher is not known yet)."""
  if teacher_cfg is not None and not isinstance(teacher_cfg, ViTConfig):
    raise UserError(
      f"distill.student_init='teacher' maps a ViT teacher (kind 'vit'); this teacher is a "
      f"{models.kind_of(teacher_cfg)!r} model."
    )
  if not isinstance(student_cfg, AdventurerConfig):
    raise UserError(
      f"distill.student_init='teacher' builds an Adventurer student (kind 'adventurer'); "
      f"this student is a {models.kind_of(student_cfg)!r} model."
    )


def check_fit(student_cfg, teacher_cfg, *, allow_partial: bool, mixer: bool = True) -> list:
  """The pair's misfits, or one UserError naming them unless `allow_partial`.

  Args:
    student_cfg: the student's AdventurerConfig.
    teacher_cfg: the teacher's ViTConfig.
    allow_partial: copy what fits and keep the rest at the student's own init.
    mixer: whether attention is copied into the mixer (False: `student_init='teacher_mlp'`,
      where the mixer's shape need not fit).
  Returns:
    The `Misfit`s (empty when everything fits).
  Raises:
    UserError: a pair of other kinds; or misfits, and not `allow_partial`.
  """
  check_kinds(student_cfg, teacher_cfg)
  found = [m for m in misfits(student_cfg, teacher_cfg) if mixer or m.part != "mixer"]
  if found and not allow_partial:
    fit = ", ".join(f"{k}={v!r}" for k, v in fitting_overrides(teacher_cfg).items())
    init = "teacher" if mixer else "teacher_mlp"
    raise UserError(
      f"distill.student_init={init!r}: these student parameters cannot take the teacher's "
      "weights: "
      + "; ".join(f"{m.params} ({m.reason})" for m in found)
      + " (no narrower copy is made: the teacher's leading channels or an SVD of its weights "
      "do not compute what the teacher computes, so the student would start from another "
      f"function). A student they all fit: student.overrides = dict({fit}) (the student's "
      f"patch may differ). Or copy what fits and keep the rest at the student's own init: "
      f"{PARTIAL_FLAG}."
    )
  return found
