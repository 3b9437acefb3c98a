"""The blocks of the tool stages (segment, bench, visualize, ablation), declared as
configs/common.py declares the training ones: each field once, with its default and a
comment, and a builder that refuses a key its block does not declare (configs/fields.py).
The experiment files that run them are configs/segment.py, bench.py, visualize.py and
ablation.py.
"""

import ml_collections

from configs import common
from configs.fields import build
from linearizer.schema import (
  COUNT,
  DECAY,
  FINISHED,
  NON_NEGATIVE,
  POSITIVE,
  POSITIVE_FRACTION,
  POSITIVE_INT,
  Field,
  Range,
  interval,
  ordered_pair,
  pair,
)

SIZE = pair(POSITIVE_INT)  # (h, w)
# (long, short) to resize to, or () for as the image is
SCALE = Range("() or two integers >= 1", lambda v: tuple(v) == () or SIZE.ok(v))
RATIO_RANGE = ordered_pair(POSITIVE)
COUNT_RANGE = ordered_pair(POSITIVE_INT)
FRACTION_RANGE = ordered_pair(POSITIVE_FRACTION)
LAYER = interval(-1, None, integer=True)  # -1: the last
QUERY = pair(interval(-1, None, integer=True))  # (row, col); -1: the centre
ASPECT = interval(1, None)  # a largest aspect ratio (1: square)


def segment(**given) -> ml_collections.ConfigDict:
  """The `segment` stage (linearizer/segmentation/stage.py): every backbone fine-tuned with
  the same head, data and budget. Defaults: mmseg's ViT-B UperNet on ADE20K
  (configs/mae/upernet_mae-base_fp16_8x2_512x512_160k_ade20k.py), method.md §9."""
  declared = dict(
    # 'teacher', 'distill', 'finetune', 'train_student' (this run's stages), 'scratch' (a
    # fresh student: the from-scratch baseline) or 'name=fmt:path' / 'name=<model dir>'
    backbones=("teacher", "distill", "scratch"),
    steps=Field(160_000, POSITIVE_INT),  # mmseg: 160k iterations
    drop_path=Field(
      0.1, DECAY
    ),  # every backbone's stochastic depth (mmseg MAE: drop_path_rate=0.1)
    batch_size=Field(16, POSITIVE_INT),  # mmseg: 8 GPUs × 2
    # mmseg MAE: AdamW lr 1e-4, wd 0.05, layer decay 0.65, poly (power 1, eta_min 0) after
    # a 1500-iteration linear warm-up
    optim=common.optim(
      lr=1e-4,
      min_lr=0.0,
      weight_decay=0.05,
      layer_decay=0.65,
      warmup_steps=1500,
      schedule="poly",
      clip_norm=0.0,
    ),
    head=dict(  # the segmentation head
      kind="upernet",  # 'upernet' (the paper's) or 'linear' (a 1×1 probe)
      channels=Field(768, COUNT),  # mmseg MAE UPerHead channels
      out_indices=(),  # () = blocks 4, 6, 8, 12 of 12, scaled to the backbone's depth
      pool_scales=(1, 2, 3, 6),  # PPM grids
      aux_channels=Field(256, POSITIVE_INT),  # the auxiliary FCNHead's width
      aux_weight=Field(0.4, NON_NEGATIVE),  # its loss weight; 0 = no auxiliary head
      dropout=Field(0.1, DECAY),  # before each classifier
      groups=Field(
        32, POSITIVE_INT
      ),  # GroupNorm groups (batch-free: see linearizer/models/segmenter.py)
    ),
    data=dict(  # the segmentation data
      # digitscenes (MNIST canvases, built in), segfolder:<root>, ade20k:<root>,
      # cityscapes:<root>, tfds:scene_parse150, tfds:cityscapes
      source="digitscenes",
      data_dir=Field(
        "", None, FINISHED
      ),  # tfds: where the dataset is prepared ('' = tfds's default)
      num_classes=Field(0, COUNT),  # 0 = the dataset's own (segfolder: scanned from its masks)
      canvas=Field(128, POSITIVE_INT),  # digitscenes: the canvas side
      train_scenes=Field(2000, POSITIVE_INT),  # digitscenes: scenes per split
      test_scenes=Field(200, POSITIVE_INT),  # digitscenes: eval scenes
      digit_count=Field((2, 4), COUNT_RANGE, absent=(2, 4)),  # digitscenes: (fewest, most) digits
      # digitscenes: a digit's side as a fraction of the canvas's (low, high)
      digit_side=Field((0.25, 0.5), FRACTION_RANGE, absent=(0.25, 0.5)),
      crop=Field((512, 512), SIZE),  # training crop (h, w)
      scale=Field(
        (2048, 512), SCALE
      ),  # RandomResize target (long, short), × a ratio in ratio_range
      ratio_range=Field((0.5, 2.0), RATIO_RANGE),  # the RandomResize ratio range
      cat_max_ratio=Field(
        0.75, POSITIVE_FRACTION
      ),  # RandomCrop: no class above this share of a crop (10 tries)
      flip=True,  # random horizontal flips
      photometric=True,  # PhotoMetricDistortion
      workers=Field(0, COUNT, FINISHED),  # grain worker processes
    ),
    eval=dict(  # evaluation
      mode="slide",  # 'whole' image, or 'slide' windows of `crop` every `stride`
      crop=Field((512, 512), SIZE),  # mmseg ADE20K test: slide, crop 512, stride 341
      stride=Field((341, 341), SIZE),  # the slide windows' step (h, w)
      scale=Field(
        (2048, 512), SCALE
      ),  # test Resize (long, short), keep ratio; () = as the image is
      limit=Field(0, COUNT),  # at most this many eval images (0 = all)
      figure_images=Field(4, COUNT),  # rows of predictions.png
      speed_repeats=Field(5, POSITIVE_INT),  # timed forwards for img/s (median)
    ),
  )
  return build("segment", declared, given)


def ablation(**given) -> ml_collections.ConfigDict:
  """The `ablation` stage (linearizer/ablation.py)."""
  declared = dict(
    # runs per variant: seed, seed + 1, ... (more seeds or variants on a finished ablation
    # train only the runs not there: each run's result stands for its own config)
    seeds=Field(3, POSITIVE_INT, FINISHED),
    variants=Field(
      (
        "supervised",
        "mp",
        "am",
        "am_unmasked",
        "am_mp",
        "scope_cls",
        "scope_visible",
        "scope_all",
      ),
      None,
      FINISHED,
    ),
    workers=Field(1, COUNT, FINISHED),  # runs at once, one process each (single-host only)
    # give each row its training and inference GFLOPs (XLA's count of each stage's step,
    # compiled on this host: linearizer/costs.py), as the summary's two extra columns
    gflops=Field(False, None, FINISHED),
    # the dense column: each run's final student also fine-tuned and scored on the
    # `segment` block's data with its head and budget (mIoU, the paper's second column);
    # rows already run keep their top-1 and only add it
    dense=Field(False, None, FINISHED),
  )
  return build("ablation", declared, given)


def bench(**given) -> ml_collections.ConfigDict:
  """The `bench` stage (linearizer/bench/). Empty / 0 = the default for this backend."""
  declared = dict(
    parts=("forward", "train_step", "supervised_step", "segment", "ssd"),  # what to measure
    teacher_kind="vit",  # an architecture of linearizer.models
    student_kind="adventurer",  # likewise
    teacher="",  # teacher variant; '' = B/16 on accelerators, Ti/16 on CPU
    student="",  # student variant; likewise
    teacher_overrides={},  # teacher config fields, e.g. style='clip'
    student_overrides={},  # student config fields
    resolutions=(),  # () = 224…1024 (…2048 on accelerators)
    batch=Field(0, COUNT),  # forward batch; 0 = 32 on accelerators, 1 on CPU
    dtype="",  # '' = bfloat16 on accelerators, float32 on CPU
    repeats=Field(0, COUNT),  # timed calls per measurement (median); 0 = 10; 5 on CPU
    chunk_size=Field(0, COUNT),  # student SSD chunk; 0 = kernels.CHUNK_TABLE's for each length
    attention_impls=(),  # ViT attention impls; () = xla and blocked (+ cudnn on GPU)
    # side of the square matmul timed as the device's rate; 0 = 8192 on accelerators, 2048
    # on CPU
    matmul_size=Field(0, COUNT),
    # PyTorch peer rows (HF ViT with SDPA, PyTorch Adventurer) where torch and transformers
    # are installed; False: never
    pytorch=True,
    train_resolution=Field(224, POSITIVE_INT),  # the distillation train step's resolution
    train_batch=Field(0, COUNT),  # 0 = 64 on accelerators, 2 on CPU
    max_batch=None,  # search the largest batch that fits; None = accelerators only
    max_batch_limit=Field(4096, POSITIVE_INT),  # ... up to this batch
    peak_flops=Field(
      0.0, NON_NEGATIVE
    ),  # FLOP/s for MFU; 0 = the table in linearizer/bench/results.py
    # The SSD kernels alone, at the student's scan shapes.
    ssd=dict(
      batch=Field(0, COUNT),  # 0 = 8 on accelerators, 1 on CPU
      heads=Field(24, POSITIVE_INT),  # SSD heads (Adventurer-B/16's)
      headdim=Field(64, POSITIVE_INT),  # per head
      d_state=Field(64, POSITIVE_INT),  # the state size
      lengths=(),  # () = 198…16386 (≤ 4098 on CPU)
    ),
    # A supervised training step (forward + backward + AdamW) of every model: what the
    # paper's speed table most likely reports (docs/benchmarks.md).
    supervised=dict(
      batch=Field(0, COUNT),  # 0 = 128 on accelerators (halved until it fits), 2 on CPU
      resolutions=(),  # () = 224 and 448 on accelerators, 224 on CPU
      num_classes=Field(1000, COUNT),  # the head's classes
      steps=Field(1000, POSITIVE_INT),  # the schedule's length
      optim=common.optim(),  # optim()'s fields
      loss=common.supervised_loss(),  # supervised_loss()'s fields
    ),
    # Backbone + UperNet forward at segmentation sizes (teacher vs student).
    segment=dict(
      resolutions=(),  # () = 512…2048 on accelerators, 512 and 768 on CPU
      batch=Field(0, COUNT),  # 0 = 8 on accelerators, 1 on CPU
      num_classes=Field(150, COUNT),  # ADE20K's
      channels=Field(0, COUNT),  # UperNet's width; 0 = the backbone's (768 for B, as mmseg's ViT-B)
    ),
    # Images of their own sizes (part `packed`, opt-in): one padded square batch against
    # packed rows (docs/packing.md has the workload)
    packed=dict(
      workload_images=Field(16, POSITIVE_INT),  # images in the workload
      median_side=Field(224, POSITIVE_INT),  # their median side, before the scale draw
      side_scale=Field((0.5, 2.0), RATIO_RANGE),  # sides drawn log-uniformly in this × median
      max_aspect=Field(2.0, ASPECT),  # aspect ratios log-uniform in [1/max_aspect, max_aspect]
      row_tokens=Field(1024, POSITIVE_INT),  # tokens per packed row
      row_images=Field(8, POSITIVE_INT),  # images per packed row at most
    ),
    # The distillation settings the train step runs with (its schedule length too).
    distill=dict(
      steps=Field(1000, POSITIVE_INT),  # the schedule's length
      optim=common.optim(lr=1e-4),  # optim()'s fields
      loss=common.distill_loss(),  # distill_loss()'s fields
      teacher_input="resample",  # as distill_stage()'s
      teacher_cache_dtype="bfloat16",  # the cached step's teacher outputs, as stored
    ),
  )
  return build("bench", declared, given)


def visualize(**given) -> ml_collections.ConfigDict:
  """The `visualize` stage (linearizer/visualize.py)."""
  declared = dict(
    num_images=Field(2, POSITIVE_INT),  # images drawn
    am_images=Field(0, COUNT),  # measure the AM distance on this many images (0 = those drawn)
    num_stages=Field(4, POSITIVE_INT),  # K levels of activation matching (method.md §2)
    layer=Field(-1, LAYER),  # student layer of the mixing matrix (teacher: same relative depth)
    query=Field((-1, -1), QUERY),  # (row, col) of the query patch on the student grid; -1 = centre
    # stage -> label: the students drawn, where the run has them
    students={"distill": "distilled", "finetune": "fine-tuned", "train_student": "from scratch"},
  )
  return build("visualize", declared, given, free=("students",))


def visualize_run(**given) -> ml_collections.ConfigDict:
  """A config that draws a finished run (configs/visualize.py): its own top-level fields."""
  declared = dict(
    seed=0,  # the images drawn from the run's eval data, when `images` is ''
    stages=("visualize",),  # this config's one stage
    run_dir="",  # the finished run's workdir (required)
    # '' = the run's teacher; or 'fmt:path' (linearizer.convert) / a model directory
    teacher_init="",
    # image files (comma-separated, globs, a folder), a data source, or '' = the run's eval data
    images="",
    visualize=visualize(),  # visualize()'s fields
  )
  return build("visualize_run", declared, given, free=("students",), top=True)
