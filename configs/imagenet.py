"""The paper's setups on ImageNet-1k (method.md §7–8): distill, then fine-tune, then eval.

  python main.py --config configs/imagenet.py:setup=clip_b16_to_B,data_dir=/data/tfds \\
      --config.teacher.init=hf:/ckpt/clip-vit-base-patch16 --workdir /runs/clip_b16_to_B

setup, named after its teacher as the paper runs them (method.md §7; every student size is
distilled from CLIP ViT-B/16, and L also from CLIP ViT-L/14):
  clip_b16_to_S  CLIP ViT-B/16 -> Adventurer-S/16   paper 83.1
  clip_b16_to_B  CLIP ViT-B/16 -> Adventurer-B/16   paper 84.3 (the main result)
  clip_b16_to_L  CLIP ViT-B/16 -> Adventurer-L/16   paper 85.0
  clip_l14_to_L  CLIP ViT-L/14 -> Adventurer-L/16   paper 85.2
  dinov3_b16_to_B  DINOv3 ViT-B/16 -> Adventurer-B/16  (no paper figure: a RoPE teacher)
For the clip setups `teacher.init` must be OpenAI's CLIP image tower of that size: a `transformers` folder of
openai/clip-vit-base-patch16 (or clip-vit-large-patch14) as `hf:<folder>`, OpenAI's
`ViT-B-16.pt` / `ViT-L-14.pt` as `openai_clip:<file>`, or a directory written from either by
`python -m linearizer.convert`. dinov3_b16_to_B distils DINOv3's ViT-B/16 (Siméoni et al.
2025, arXiv:2508.10104; RoPE, four storage tokens, no position table) with the CLIP setups'
settings: `hf:<folder>` of facebook/dinov3-vitb16-pretrain-lvd1689m, `dinov3:<file>` of
its torch-hub `.pth`, `timm:<file>` of vit_base_patch16_dinov3 (its Hub folder, with
config.json), or a converted directory. Data: tfds `imagenet2012` prepared under data_dir
(array_record; no TensorFlow needed to read it).

res: the fine-tuning resolution. With res=224 (the default) eval also reports @448, the
224-trained student with its position embeddings resampled (results.json marks it
`resampled_from: 224`); the paper's 85.0 @448² comes from fine-tuning at 448², which is
`res=448` (distillation stays at 224; fine-tuning starts from the embeddings resampled once).
Eval centre-crops 0.875 at 224 and 1.0 above it, as Adventurer evaluates.

The paper gives no recipe; these are method.md §8's defaults: distillation AdamW lr
1.5e-4 × batch/256, wd 0.05, cosine with warm-up, RRC 0.2–1 + flip, drop path 0.1, bf16
matmuls; fine-tuning Adventurer's recipe (lr 5e-4 × batch/512, RandAugment m9-mstd0.5,
mixup 0.8, cutmix 1.0, label smoothing 0.1, min lr 1e-5, 5 warm-up epochs, no gradient
clipping). docs/method-fidelity.md lists every default and its source.
"""

from configs import common

IMAGENET_TRAIN = 1_281_167
SETUPS = {
  # name: (teacher variant, student variant, fine-tune drop path)
  "clip_b16_to_S": ("B/16", "S/16", 0.1),
  "clip_b16_to_B": ("B/16", "B/16", 0.2),
  "clip_b16_to_L": ("B/16", "L/16", 0.4),
  "clip_l14_to_L": ("L/14", "L/16", 0.4),
  "dinov3_b16_to_B": ("B/16", "B/16", 0.2),
}


def epochs(n, batch):
  return n * IMAGENET_TRAIN // batch


def get_config(arg=None):
  arg = common.parse_arg(
    arg,
    setup="clip_b16_to_B",
    data_dir="",
    batch=1024,
    distill_epochs=300,
    finetune_epochs=100,
    res=224,
    smoke=False,
  )
  if arg.res not in (224, 448):
    raise ValueError(f"res={arg.res!r}; expected 224 or 448 (the paper's fine-tuning sizes).")
  if arg.setup not in SETUPS:
    raise ValueError(f"Unknown setup {arg.setup!r}; expected one of {sorted(SETUPS)}.")
  t_variant, s_variant, ft_drop = SETUPS[arg.setup]
  c = common.base()
  c.stages = ("distill", "finetune", "eval")
  c.data = common.data(
    "tfds:imagenet2012", 224, data_dir=arg.data_dir, workers=16, num_classes=1000
  )
  c.teacher.variant = t_variant
  # CLIP: QuickGELU, eps 1e-5, ln_pre, CLIP's statistics; DINOv3's file says all of its own
  style = {} if arg.setup.startswith("dinov3") else dict(style="clip")
  c.teacher.overrides = dict(**style, dtype="bfloat16")
  c.student.variant = s_variant
  c.student.overrides = dict(dtype="bfloat16")
  b = arg.batch
  c.distill = common.distill_stage(
    steps=epochs(arg.distill_epochs, b),
    batch_size=b,
    lr=1.5e-4 * b / 256,
    warmup_steps=epochs(10, b),
    drop_path=0.1,
    loss=common.distill_loss(),
  )
  c.finetune = common.stage(
    steps=epochs(arg.finetune_epochs, b),
    batch_size=b,
    lr=5e-4 * b / 512,
    warmup_steps=epochs(5, b),
    min_lr=1e-5,
    clip_norm=0.0,  # Adventurer's --clip-grad is None; distillation keeps our 1.0
    drop_path=ft_drop,
    loss=common.supervised_loss(),
    augment=dict(crop_scale=(0.08, 1.0), randaugment=True, image_size=arg.res),
  )
  c.eval.resolutions = (224, 448)
  c.eval.crop_fractions = ((448, 1.0),)
  c.eval.speed_resolutions = (224, 448)
  c.checkpoint.every_steps = 2000
  c.log_every = 100
  if arg.smoke:
    common.smoke(c)
  return c.lock()
