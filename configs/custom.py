"""Your own teacher checkpoint and your own image folder.

  python -m linearizer.convert --format timm --input vit_b16.pth --output /ckpt/teacher
  python main.py --config configs/custom.py:teacher=/ckpt/teacher,data=/data/my_images \\
      --workdir /runs/mine

teacher: a converted directory, or 'fmt:path' read directly (fmt: hf, timm, openai_clip,
big_vision, dinov2, dinov3, adventurer): any teacher of docs/formats.md, the RoPE ones
(DINOv3, Perception Encoder, EVA-02, SigLIP 2) included. A bare timm file whose tensors fit
several families (a CLIP tower's fit Perception Encoder's) is converted first, named:
python -m linearizer.convert --format timm --arch <timm model name> ... data: a folder with one sub-folder per class (JPEG/PNG), or
'npz:<file>'; eval_data: the held-out set in the same form (default: a fixed 20% of `data`,
held out and never trained on; data.test_fraction).
The student is fine-tuned on the labels of `data`; drop 'finetune' from the stages for
distillation alone.
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(
    arg,
    teacher="",
    data="",
    eval_data="",
    student="S/16",
    size=224,
    batch=128,
    distill_steps=20000,
    finetune_steps=5000,
    smoke=False,
  )
  if not arg.smoke and not (arg.teacher and arg.data):
    raise ValueError(
      "configs/custom.py needs both args: "
      "configs/custom.py:teacher=<checkpoint>,data=<image folder>"
    )
  c = common.base()
  c.stages = ("distill", "finetune", "eval")
  source = arg.data if ":" in arg.data else f"folder:{arg.data}"
  eval_source = (
    arg.eval_data if ":" in arg.eval_data or not arg.eval_data else (f"folder:{arg.eval_data}")
  )
  c.data = common.data(source, arg.size, eval_source=eval_source)
  c.teacher.init = arg.teacher
  c.student.variant = arg.student
  b = arg.batch
  c.distill = common.distill_stage(
    steps=arg.distill_steps,
    batch_size=b,
    lr=1.5e-4 * b / 256,
    warmup_steps=arg.distill_steps // 20,
    drop_path=0.1,
    loss=common.distill_loss(),
  )
  c.finetune = common.stage(
    steps=arg.finetune_steps,
    batch_size=b,
    lr=5e-4 * b / 512,
    warmup_steps=arg.finetune_steps // 20,
    min_lr=1e-5,
    drop_path=0.1,
    loss=common.supervised_loss(),
    augment=dict(crop_scale=(0.08, 1.0), randaugment=True),
  )
  if arg.smoke:
    common.smoke(c)
  return c.lock()
