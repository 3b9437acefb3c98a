"""Segmentation with the distilled student (method.md §9).

  python main.py --config configs/segment.py --workdir /tmp/segment

The default is the CPU demo: a ViT teacher trained and an Adventurer student distilled on
MNIST as in configs/demo.py, but at *equal patch size* (both read 7×7-pixel patches), then
the `segment` stage fine-tunes three backbones with the same UperNet head and budget on
`digitscenes` (canvases of MNIST digits, per-pixel labels: background + 10 digits): the
teacher, the distilled student and the same student from random weights. `:canvas=N` sets
the canvas side (28, the backbones' own resolution, by default; training and eval on whole
canvases).

  :smoke                  seconds, for the tests
  :setup=ade20k_b16       mmseg's ViT-B/16 UperNet on ADE20K (160k iterations, 512² crops)
  :setup=cityscapes_b16   the same on Cityscapes (80k iterations, 512×1024 crops)

The two setups need `segment.data.source=ade20k:<root>` / `cityscapes:<root>` and
`teacher.init` / `student.init`-style backbones named in `segment.backbones`, e.g.
`'segment.backbones=("clip_b16=timm:/ckpt/vit_base_patch16_clip_224.openai.pth",
"adventurer_b16=/runs/imagenet/distill/model")'`.
"""

from configs import common, demo, tool_blocks


def demo_segment(s, side: int, smoke: bool) -> None:
  """digitscenes canvases of `side` pixels, a small head and a CPU budget."""
  # The backbones' own resolution (MNIST's 28²), one digit of 0.7-1.0 of the canvas, trained
  # on whole canvases: the MNIST-trained teacher's patch tokens tell digits apart at the
  # size it learnt them and not on larger canvases (a linear probe of its last block: 66%
  # at 28², 35% at 42², chance at 56²), where every backbone ended near 13% mIoU
  # (docs/results/segmentation.md). A narrow rescale range (mmseg's 0.5-2.0 left every
  # backbone near 10% mIoU at this budget), no photometric jitter.
  s.data.canvas, s.data.crop, s.data.scale = side, (side, side), (side, side)
  s.data.digit_count, s.data.digit_side = (1, 1), (0.7, 1.0)
  s.data.train_scenes, s.data.test_scenes = 2000, 100
  s.data.ratio_range, s.data.photometric = (0.8, 1.25), False
  s.eval.mode, s.eval.scale, s.eval.figure_images = "whole", (), 4
  s.eval.crop, s.eval.stride = (side, side), (side // 2,) * 2
  s.head.channels, s.head.aux_channels, s.head.groups = 32, 16, 8
  s.steps, s.batch_size, s.drop_path = 1000, 8, 0.0
  s.optim.lr, s.optim.warmup_steps, s.optim.layer_decay = 1e-3, 30, 0.9
  if smoke:
    s.backbones = ("teacher", "distill")
    s.data.canvas, s.data.crop, s.data.scale = 32, (24, 24), (32, 32)
    s.data.train_scenes, s.data.test_scenes = 32, 4
    s.eval.crop, s.eval.stride, s.eval.figure_images = (24, 24), (16, 16), 2
    s.eval.speed_repeats = 1
    s.head.pool_scales = (1, 2)
    s.steps, s.batch_size, s.optim.warmup_steps = 4, 4, 1


def setup(c, name: str) -> None:
  """The standard ViT-B UperNet recipes (method.md §9), each number beside its source."""
  s = c.segment
  if name == "ade20k_b16":
    # mmseg configs/mae/upernet_mae-base_fp16_8x2_512x512_160k_ade20k.py
    s.data.source = "ade20k:/data/ADEChallengeData2016"
    s.steps = 160_000  # max_iters=160000
    s.batch_size = 16  # 8 GPUs × samples_per_gpu=2
    s.data.crop, s.data.scale = (512, 512), (2048, 512)  # crop_size; img_scale
    s.eval.mode, s.eval.crop, s.eval.stride = "slide", (512, 512), (341, 341)  # test_cfg
    s.eval.scale = (2048, 512)
    s.head.channels = 768  # decode_head channels=768
  elif name == "cityscapes_b16":
    # mmseg has no plain-ViT UperNet Cityscapes config: the data settings are
    # configs/_base_/datasets/cityscapes.py's, the length its schedule_80k's, and the
    # optimiser stays the ADE20K MAE one above (schedule_80k's SGD is for CNNs)
    s.data.source = "cityscapes:/data/cityscapes"
    s.steps = 80_000  # schedule_80k: max_iters=80000
    s.batch_size = 8  # the cityscapes configs' 4 GPUs × samples_per_gpu=2
    s.data.crop, s.data.scale = (512, 1024), (2048, 1024)  # crop_size; img_scale
    # slide windows of the crop with the ADE20K setup's 2/3 overlap (our choice)
    s.eval.mode, s.eval.crop, s.eval.stride = "slide", (512, 1024), (341, 683)
    s.eval.scale = (2048, 1024)
    s.head.channels = 768
  else:
    raise ValueError(f"setup={name!r}; expected 'ade20k_b16' or 'cityscapes_b16'.")
  # mmseg MAE: AdamW lr 1e-4, betas (0.9, 0.999), wd 0.05, layer_decay_rate 0.65, poly
  # power 1 with a 1500-iteration linear warm-up (the tool_blocks.segment defaults)
  c.stages = ("segment",)
  s.backbones = ()  # name yours: '<name>=fmt:path' or '<name>=<model dir>' (refused empty)
  c.checkpoint.every_steps = 4000  # mmseg checkpoint interval=16000; resumes cost less here
  c.log_every = 50


def get_config(arg=None):
  arg = common.parse_arg(arg, smoke=False, canvas=28, setup="")
  c = demo.get_config("smoke" if arg.smoke else None).unlock()
  c.stages = ("train_teacher", "distill", "segment")
  if not arg.smoke:
    c.student.variant = "Ti/7"  # the teacher's patch: the speed table compares equal grids
    c.student.overrides = dict(c.student.overrides, chunk_size=16)
  c.segment = tool_blocks.segment(backbones=("teacher", "distill", "scratch"))
  if arg.setup:  # mmseg's numbers (tool_blocks.segment's defaults), then the dataset's
    setup(c, arg.setup)
  else:
    demo_segment(c.segment, arg.canvas, arg.smoke)
  return c.lock()
