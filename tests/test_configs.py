"""The experiment configs: the paper's setups (configs/imagenet.py) as the paper ran them
(method.md §7), and builders that refuse what they do not declare (configs/fields.py)."""

import ml_collections
import pytest

from configs import ablation, bench, common, custom, demo, imagenet, segment, tool_blocks, visualize
from linearizer import evaluate

# method.md §7: every student from CLIP ViT-B/16, L also from CLIP ViT-L/14.
PAPER = {
  "clip_b16_to_S": ("B/16", "S/16"),
  "clip_b16_to_B": ("B/16", "B/16"),
  "clip_b16_to_L": ("B/16", "L/16"),
  "clip_l14_to_L": ("L/14", "L/16"),
}


@pytest.mark.parametrize("setup", sorted(PAPER))
def test_every_setup_has_the_papers_clip_teacher(setup):
  c = imagenet.get_config(f"setup={setup}")
  assert (c.teacher.variant, c.student.variant) == PAPER[setup]
  assert c.teacher.overrides.style == "clip"  # QuickGELU, eps 1e-5, ln_pre, CLIP statistics


def test_the_setups_are_the_papers_and_dinov3():
  assert set(imagenet.SETUPS) == set(PAPER) | {"dinov3_b16_to_B"}
  c, clip = imagenet.get_config("setup=dinov3_b16_to_B"), imagenet.get_config("setup=clip_b16_to_B")
  assert (c.teacher.variant, c.student.variant) == ("B/16", "B/16")
  assert "style" not in c.teacher.overrides  # the file's own (RoPE, registers, eps)
  assert c.distill.to_dict() == clip.distill.to_dict()  # the CLIP setups' distillation


@pytest.mark.parametrize("res", [224, 448])
def test_fine_tuning_resolution_and_eval_crop(res):
  """res=448 fine-tunes at 448 (the paper's 85.0 @448²); eval crops 0.875 at 224, 1.0 above
  it, as Adventurer evaluates."""
  c = imagenet.get_config(f"setup=clip_b16_to_L,res={res}")
  assert c.finetune.augment.image_size == res and c.data.image_size == 224  # distil at 224
  assert evaluate.crop_fraction(c, 224) == 0.875 and evaluate.crop_fraction(c, 448) == 1.0
  with pytest.raises(ValueError, match="res=384"):
    imagenet.get_config("res=384")
  smoke = imagenet.get_config(f"res={res},smoke")
  assert "image_size" not in smoke.finetune.augment


def test_fine_tuning_follows_adventurers_recipe():
  """Adventurer's --clip-grad default is None: no clipping when fine-tuning; distillation
  keeps the project's 1.0 (docs/method-fidelity.md)."""
  c = imagenet.get_config("setup=clip_b16_to_B")
  assert c.finetune.optim.clip_norm == 0 and c.distill.optim.clip_norm == 1.0
  assert c.finetune.augment.randaugment and c.finetune.optim.min_lr == 1e-5
  assert c.finetune.optim.lr == 5e-4 * c.finetune.batch_size / 512


def test_custom_data_without_eval_data_holds_some_out():
  """configs/custom.py used to evaluate on its training folder when eval_data was not given."""
  c = custom.get_config("teacher=/ckpt/t,data=/data/imgs")
  assert c.data.source == "folder:/data/imgs" and c.data.eval_source == ""
  assert 0 < c.data.test_fraction < 1
  c = custom.get_config("teacher=/ckpt/t,data=/data/imgs,eval_data=/data/val")
  assert c.data.eval_source == "folder:/data/val"


def test_the_console_marks_a_resampled_number():
  """The @448 line says which models ran away from their training size."""
  acc = lambda top1, resampled: dict(top1=top1, crop_fraction=1.0, resampled_from=resampled)
  rows = {"teacher": {"@448": acc(0.8, 224)}, "student": {"@448": acc(0.85, None)}}
  line = evaluate.other_size(rows, 448)
  assert line == "top-1 @448 (crop 1.0): teacher 80.00 (trained at 224, resampled), student 85.00"


# ---------------------------------------------------------------------------------------
# The builders declare their fields and refuse any other (configs/fields.py).
# ---------------------------------------------------------------------------------------
STAGE = dict(steps=1, batch_size=2, lr=1e-3)
TYPOS = {  # builder: (a call with one misspelt key, the key, the declared field it names)
  "optim": (lambda: common.optim(clip_nrom=0.0), "clip_nrom", "clip_norm"),
  "distill_loss": (lambda: common.distill_loss(mask_ration=0.5), "mask_ration", "mask_ratio"),
  "supervised_loss": (lambda: common.supervised_loss(mixup=0.0), "mixup", "mixup_alpha"),
  "mesh": (lambda: common.mesh(fsdb=2), "fsdb", "fsdp"),
  "model": (lambda: common.model(kind="vit", varient="S/16"), "varient", "variant"),
  "data": (lambda: common.data("digits", 16, flipp=False), "flipp", "flip"),
  "base": (lambda: common.base(log_evry=5), "log_evry", "log_every"),
  "base.teacher": (lambda: common.base(teacher=dict(int="x")), "teacher.int", "teacher.init"),
  "stage": (
    lambda: common.stage(**STAGE, loss=common.supervised_loss(), clip_nrom=0.0),
    "clip_nrom",
    "clip_norm",
  ),
  "distill_stage": (
    lambda: common.distill_stage(**STAGE, loss=common.distill_loss(), teacher_cach="read"),
    "teacher_cach",
    "teacher_cache",
  ),
  "segment": (lambda: tool_blocks.segment(backbone=()), "backbone", "backbones"),
  "segment.head": (lambda: tool_blocks.segment(head=dict(knd="linear")), "head.knd", "head.kind"),
  "ablation": (lambda: tool_blocks.ablation(seed=1), "seed", "seeds"),
  "bench": (lambda: tool_blocks.bench(resolution=(224,)), "resolution", "resolutions"),
  "visualize": (lambda: tool_blocks.visualize(num_image=1), "num_image", "num_images"),
  "visualize_run": (lambda: tool_blocks.visualize_run(rundir="/r"), "rundir", "run_dir"),
}


@pytest.mark.parametrize("builder", sorted(TYPOS))
def test_a_builder_refuses_an_undeclared_key_and_names_the_nearest(builder):
  call, key, nearest = TYPOS[builder]
  name = builder.partition(".")[0]
  with pytest.raises(TypeError, match=f"^{name}\\(\\): no field '{key}'; did you mean '{nearest}'"):
    call()


def test_a_stage_takes_optims_fields_and_only_those():
  c = common.stage(**STAGE, loss=common.supervised_loss(), clip_norm=0.0, min_lr=1e-5)
  assert (c.optim.clip_norm, c.optim.min_lr, c.optim.lr) == (0.0, 1e-5, 1e-3)
  assert "clip_norm" not in c and "min_lr" not in c
  with pytest.raises(TypeError, match="stage\\(\\): missing required field\\(s\\) 'lr'"):
    common.stage(steps=1, batch_size=2, loss=common.supervised_loss())
  with pytest.raises(TypeError, match="'loss'"):
    common.stage(**STAGE)
  with pytest.raises(ValueError, match="Did you mean 'seeds'"):
    common.parse_arg("seed=2", seeds=3)


def test_open_mappings_take_any_key_and_given_blocks_only_their_fields():
  """`overrides`, `augment` and visualize's `students` are mappings of the caller's own."""
  assert tool_blocks.visualize(students=dict(mine="mine")).students.mine == "mine"
  assert common.model(kind="vit", overrides=dict(width=8)).overrides.width == 8
  assert common.base(data=common.data("digits", 16)).data.image_size == 16
  assert "data" not in common.base()  # declared, but absent unless given


# Every config and arg its docstring, the README and the tests use (or a representative).
EXPERIMENTS = [
  (demo, [None, "smoke"]),
  (imagenet, [None, "smoke", "res=448", "setup=clip_l14_to_L"]),
  (custom, ["smoke", "teacher=/ckpt/t,data=/data/imgs"]),
  (segment, [None, "smoke", "setup=ade20k_b16", "setup=cityscapes_b16"]),
  (bench, [None, "smoke", "smoke,parts=ssd"]),
  (visualize, [None, "smoke"]),
  (ablation, [None, "smoke"]),
]
OPEN = {"augment", "overrides", "students", "teacher_overrides", "student_overrides"}


def fields(block):
  """The nested field names of a block (open mappings as leaves)."""
  return {
    k: fields(v) if isinstance(v, ml_collections.ConfigDict) and k not in OPEN else None
    for k, v in block.items()
  }


@pytest.mark.parametrize(
  "module,arg", [(m, a) for m, args in EXPERIMENTS for a in args], ids=lambda v: str(v)
)
def test_experiment_configs_have_exactly_the_declared_fields(module, arg):
  """A field set after its builder ran (`c.distill.visualize_evry = 0` in a config file)
  would add a key the library never reads: every block has exactly its builder's fields."""
  stage_ = common.stage(**STAGE, loss=None)
  blocks = dict(
    common.base(),
    data=common.data("digits", 16),
    train_teacher=stage_,
    finetune=stage_,
    train_student=stage_,
    distill=common.distill_stage(**STAGE, loss=None),
    segment=tool_blocks.segment(),
    bench=tool_blocks.bench(),
    ablation=tool_blocks.ablation(),
    visualize=tool_blocks.visualize(),
  )
  top_level = set(common.base()) | set(tool_blocks.visualize_run())
  losses = (fields(common.distill_loss()), fields(common.supervised_loss()))
  c = module.get_config(arg)
  for key, value in c.items():
    assert key in top_level or key in blocks, f"{module.__name__}:{arg}: {key}"
    want = blocks.get(key)
    if isinstance(want, ml_collections.ConfigDict):
      got = fields(value)
      if "loss" in got and "steps" in got and key != "segment":  # a training stage
        assert fields(value.loss) in losses, f"{key}.loss"
        got["loss"] = None
      assert got == fields(want), f"{module.__name__}:{arg}: {key}"
