"""The ablation's rows: what each variant sets (`VARIANTS`), and the tables they fill
(`PAPER`, with the paper's ImageNet numbers where it has them). The paper's own rows
(supervised, mp, am, am_unmasked, am_mp, the scope rows) are ablation.py's docstring.

Beyond the paper (opt-in through `ablation.variants`), AM + MP with an option on:

  kd_soft        soft logit distillation in fine-tuning (finetune.loss.kd = 'soft')
  kd_hard        hard logit distillation in fine-tuning (finetune.loss.kd = 'hard')
  teacher_cache  the teacher-feature cache (distill.teacher_cache = 'write'): the teacher
                 runs on teacher_cache_views views per example once, epochs cycle them
  teacher_cache_views8  the same with 8 views per example: more than the budget's epochs,
                 so no view repeats (what is left of the cache's cost is its views' draw)
  teacher_init   a student of the teacher's shape (teacher_fit.fitting_overrides) that
                 starts from its weights (distill.student_init = 'teacher')
  teacher_shape  the same student from its own random init: teacher_init's baseline

Cost-matched baselines (opt-in), trained from scratch on the labels:

  supervised_matched  as many steps as give AM + MP's training FLOPs (its distillation,
                 the teacher's forwards included, and fine-tuning; linearizer/costs.py)
  supervised_tokens   the student at half its patch: 4x the tokens, its inference FLOPs
                 with it (Patch Scaling's argument: more tokens, no teacher)

The simpler recipes of 2026, each on the same student and budget (opt-in too):

  final          the final patch tokens regressed through a linear map, alone (GTR's one
                 loss: w_am = w_mp = 0, distill.loss.w_final = 1)
  blocks         AM's tokens at AM's levels regressed through a map per level, alone
                 (FitNets / ViT-AdaLA's block alignment: w_blocks = 1)
  mixer_out      each AM level's mixer branch regressed onto the teacher's attention
                 branch through a map per level, alone (ViT-AdaLA's attention alignment,
                 Copy-the-Same's attention-output distillation: w_mixer = 1)
  final_am       final + AM (AdaLA's two alignments, with AM's maps for the blocks)
  mlp_init       a teacher-shaped student starting from the teacher's norms, embeddings
                 and MLPs, the mixer random (student_init = 'teacher_mlp'), AM + MP
  mlp_final      the same start with the final-token loss alone (the best single loss of
                 the first 2026 rows, docs/results/ablation.md)
"""

import os

# A value standing for student.overrides with the teacher's shape put in (teacher_init's).
TEACHER_SHAPE = "the teacher's shape"
# A value standing for the steps that give a student trained from scratch AM + MP's
# training FLOPs (distillation with the teacher's forwards, then fine-tuning).
MATCHED_STEPS = "AM + MP's training FLOPs"
# A value standing for the student's variant at half its patch (4x the tokens).
HALF_PATCH = "half the student's patch"
# The rows trained from scratch on the labels (train_student), the rest distilled first.
FROM_SCRATCH = ("supervised", "supervised_matched", "supervised_tokens")
# variant -> (row label, {config path: value} overrides)
VARIANTS = {
  "supervised": ("supervised", {}),
  "supervised_matched": (
    "supervised, AM + MP's training FLOPs",
    {"train_student.steps": MATCHED_STEPS},
  ),
  "supervised_tokens": ("supervised, half the patch (4x tokens)", {"student.variant": HALF_PATCH}),
  "mp": ("MP only", {"distill.loss.w_am": 0.0}),
  "am": ("AM only", {"distill.loss.w_mp": 0.0}),
  "am_unmasked": ("AM only, unmasked", {"distill.loss.w_mp": 0.0, "distill.loss.mask_ratio": 0.0}),
  "am_mp": ("AM + MP", {}),
  "scope_cls": ("CLS only", {"distill.loss.scope": "cls"}),
  "scope_visible": ("visible", {"distill.loss.scope": "visible"}),
  "scope_all": ("all tokens", {"distill.loss.scope": "all"}),
  "kd_soft": ("+ soft KD in fine-tuning", {"finetune.loss.kd": "soft"}),
  "kd_hard": ("+ hard KD in fine-tuning", {"finetune.loss.kd": "hard"}),
  "teacher_cache": ("+ teacher-feature cache", {"distill.teacher_cache": "write"}),
  "teacher_cache_views8": (
    "+ teacher-feature cache, 8 views",
    {"distill.teacher_cache": "write", "distill.teacher_cache_views": 8},
  ),
  "teacher_init": (
    "teacher-shaped student, from the teacher",
    {"student.overrides": TEACHER_SHAPE, "distill.student_init": "teacher"},
  ),
  "teacher_shape": ("teacher-shaped student, random init", {"student.overrides": TEACHER_SHAPE}),
  "final": (
    "final tokens only (GTR)",
    {"distill.loss.w_am": 0.0, "distill.loss.w_mp": 0.0, "distill.loss.w_final": 1.0},
  ),
  "blocks": (
    "block regression only (FitNets)",
    {"distill.loss.w_am": 0.0, "distill.loss.w_mp": 0.0, "distill.loss.w_blocks": 1.0},
  ),
  "mixer_out": (
    "mixer outputs only (AdaLA stage 1)",
    {"distill.loss.w_am": 0.0, "distill.loss.w_mp": 0.0, "distill.loss.w_mixer": 1.0},
  ),
  "final_am": ("final tokens + AM", {"distill.loss.w_mp": 0.0, "distill.loss.w_final": 1.0}),
  "mlp_init": (
    "teacher-shaped student, MLPs from the teacher",
    {"student.overrides": TEACHER_SHAPE, "distill.student_init": "teacher_mlp"},
  ),
  "mlp_final": (
    "teacher-shaped student, MLPs from the teacher, final tokens only",
    {
      "student.overrides": TEACHER_SHAPE,
      "distill.student_init": "teacher_mlp",
      "distill.loss.w_am": 0.0,
      "distill.loss.w_mp": 0.0,
      "distill.loss.w_final": 1.0,
    },
  ),
}
# The paper's two tables (ImageNet-1k top-1, CLIP ViT-B/16 → Adventurer-B): (row, variant, %)
PAPER = {
  "objective": [
    ("supervised", "supervised", 82.6),
    ("MP only", "mp", 83.6),
    ("AM only", "am", 83.8),
    ("AM only, unmasked", "am_unmasked", None),
    ("AM + MP", "am_mp", 84.3),
  ],
  "AM scope": [
    ("CLS only", "scope_cls", 83.7),
    ("visible", "scope_visible", 84.3),
    ("all tokens", "scope_all", 83.4),
  ],
  "beyond the paper (AM + MP, then)": [
    ("+ soft KD in fine-tuning", "kd_soft", None),
    ("+ hard KD in fine-tuning", "kd_hard", None),
    ("+ teacher-feature cache", "teacher_cache", None),
    ("+ teacher-feature cache, 8 views", "teacher_cache_views8", None),
    ("teacher-shaped student, random init", "teacher_shape", None),
    ("teacher-shaped student, from the teacher", "teacher_init", None),
  ],
  "cost-matched baselines": [
    ("supervised, AM + MP's training FLOPs", "supervised_matched", None),
    ("supervised, half the patch (4x tokens)", "supervised_tokens", None),
  ],
  "newer recipes (2026)": [
    ("final tokens only (GTR)", "final", None),
    ("block regression only (FitNets)", "blocks", None),
    ("mixer outputs only (AdaLA stage 1)", "mixer_out", None),
    ("final tokens + AM", "final_am", None),
    ("teacher-shaped student, MLPs from the teacher", "mlp_init", None),
    ("teacher-shaped student, MLPs from the teacher, final tokens only", "mlp_final", None),
  ],
}


# The rows' runs on disk: workdir/ablation/<variant>/seed<k>/.
def scope_row(scope):
  """The scope row of AM + MP's own AM scope: the AM + MP runs themselves."""
  return f"scope_{scope}"


def runs_of(config, variant):
  """The variant whose runs give this row: the config's own scope row is AM + MP's."""
  return "am_mp" if variant == scope_row(config.distill.loss.scope) else variant


def out_dir(root):
  return os.path.join(root, "ablation")


def variant_dir(root, variant, seed_index):
  return os.path.join(out_dir(root), variant, f"seed{seed_index}")


def dense_path(root, variant, k) -> str:
  """Where run (variant, seed k)'s dense-toy results are (ablation.dense_miou)."""
  return os.path.join(variant_dir(root, variant, k), "dense", "results.json")
