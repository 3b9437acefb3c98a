"""Config pieces every experiment shares, and every field a stage reads, declared once.

Defaults follow method.md §8 (distillation) and Adventurer's fine-tuning recipe. Configs
import only this module (and each other), never the library; the library reads these
fields and never writes into a config.
"""

import ml_collections

AM_SCOPES = ("visible", "cls", "all")  # distill_loss.scope: the tokens AM compares


def optim(**overrides) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(
    dict(
      lr=1.5e-4,  # peak; method.md §8 scales it 1.5e-4 × batch / 256 (MAE; the paper gives none)
      min_lr=1e-6,  # where the schedule ends
      warmup_steps=0,  # linear, from 0; the schedule then ends at the stage's `steps`
      schedule="cosine",  # after the warm-up: 'cosine', or 'poly' (mmseg's PolyLR)
      power=1.0,  # the 'poly' schedule's exponent
      weight_decay=0.05,  # AdamW's decoupled weight decay
      b1=0.9,  # AdamW's moment decays
      b2=0.999,
      clip_norm=1.0,  # 0 disables gradient clipping
      ema_decay=0.0,  # 0 disables the EMA of the student
      layer_decay=1.0,  # layer-wise lr decay for fine-tuning (BEiT); 1 disables it
      grad_accum=1,  # micro-batches per step (memory only; same global batch)
      # No weight decay on these (regex on parameter paths; method.md §6).
      no_decay=(
        r"bias$",
        r"A_log$",
        r"/D$",
        r"norm",
        r"scale$",
        r"pos_embed$",
        r"cls_token$",
        r"mask_token$",
      ),
    )
  )
  c.update(overrides)
  return c


def distill_loss(**overrides) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(
    dict(
      w_am=1.0,  # weight of activation matching
      w_mp=1.0,  # weight of masked prediction (λ)
      mask_ratio=0.75,  # fraction of the student's patches masked (MP; AM's visible scope)
      num_stages=4,  # K: AM's depth levels (the paper's "stages")
      scope="visible",  # AM tokens: visible | cls | all (AM_SCOPES)
      beta=1.0,  # Smooth-L1 β
      # AM's tokens: 'raw' residual streams (the paper), 'centered' (each token set's mean
      # subtracted), 'next_ln' (through the next block's pre-norm); both sides alike
      am_features="raw",
    )
  )
  c.update(overrides)
  return c


def supervised_loss(**overrides) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(
    dict(
      label_smoothing=0.1,
      mixup_alpha=0.8,  # Beta(α, α) of Mixup; 0 turns it off
      cutmix_alpha=1.0,  # Beta(α, α) of CutMix; 0 turns it off
      switch_prob=0.5,  # chance of CutMix rather than Mixup when both are on
      # Logit distillation (finetune / train_student): '' off (the paper), 'soft' (KL at
      # kd_temperature) or 'hard' (CE on the teacher's top-1, DeiT's hard variant), on the
      # student's own head: loss = (1 - kd_weight) * CE + kd_weight * KD
      kd="",
      kd_weight=0.5,  # DeiT's α
      kd_temperature=1.0,  # τ of soft KD (DeiT's 1.0); the term is scaled by τ²
      kd_teacher="",  # '' = the run's teacher; else a classifier's 'fmt:path' or model dir
    )
  )
  c.update(overrides)
  return c


def mesh(**overrides) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(
    dict(
      data=-1,  # -1: all remaining devices
      fsdp=1,  # devices that split large parameters and optimizer moments
      fsdp_min_size=2**18,  # arrays at least this large are split over `fsdp`
      rules=(),  # (regex, PartitionSpec tuple) pairs tried first
    )
  )
  c.update(overrides)
  return c


def parse_arg(arg, **defaults) -> ml_collections.ConfigDict:
  """big_vision-style config args: 'smoke,variant=B/16' -> {smoke: True, variant: 'B/16'}.

  Every key must be one of `defaults`; values take the type of their default.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"Unknown config arg {key!r}; expected some of {sorted(defaults)}.")
    default = defaults[key]
    if not sep:
      value = True
    elif isinstance(default, bool):
      value = value.lower() in ("1", "true", "yes")
    elif default is not None:
      value = type(default)(value)
    out[key] = value
  return out


def stage(
  *,
  steps,
  batch_size,
  lr,
  loss,
  warmup_steps=0,
  drop_path=0.0,
  ema_decay=0.0,
  augment=None,
  num_labels=0,
  visualize_every=0,
  **optim_overrides,
) -> ml_collections.ConfigDict:
  """One training stage: its length, batch, optimiser, loss settings and augmentation.

  num_labels: train on a fixed random subset of this many examples (0 = all of them).
  visualize_every: (distill) also draw the teacher/student maps every this many steps;
    they are always drawn at the end, into <workdir>/distill/maps/.
  """
  return ml_collections.ConfigDict(
    dict(
      steps=steps,  # the stage's length; the lr schedule ends here
      batch_size=batch_size,  # global batch, split over every device and process
      drop_path=drop_path,  # stochastic depth of the trained model
      num_labels=num_labels,  # train on this many labelled examples (0 = all)
      visualize_every=visualize_every,  # distill: draw the maps every this many steps
      optim=optim(lr=lr, warmup_steps=warmup_steps, ema_decay=ema_decay, **optim_overrides),
      loss=loss,  # distill_loss() or supervised_loss()
      augment=augment or {},  # data fields this stage trains with (e.g. randaugment=True)
    )
  )


def distill_stage(
  *,
  student_init="",
  teacher_init_partial=False,
  teacher_input="resample",
  diagnose_images=8,
  scorecard_every=0,
  teacher_cache="off",
  teacher_cache_views=2,
  teacher_cache_dir="",
  teacher_cache_dtype="bfloat16",
  **stage_args,
) -> ml_collections.ConfigDict:
  """The `distill` stage: `stage(...)`, the student it starts from, what the teacher sees.

  student_init: '' a fresh student of student.kind / student.variant (the paper); a
    converted directory or 'fmt:path' (e.g. the public supervised Adventurer,
    'adventurer:/ckpt/adventurer_base_patch16_224.pth'), loaded with student.overrides and
    its head dropped; 'teacher' a fresh student with what has a counterpart copied from the
    teacher (linearizer/teacher_init.py: patch and position embeddings, norms, attention
    V/K/Q/O into x/B/C/out_proj, the MLP into the SwiGLU; the table of what was copied is
    logged), which needs a student of the teacher's width and depth and, for the mixer and
    MLP, `student.overrides` that fit (ngroups = heads, d_state = head dim, ...).
    Distinct from student.init, the student fine-tuning starts from.
  teacher_init_partial: with student_init='teacher', copy what fits and leave the rest
    random instead of refusing a pair whose shapes differ (the refusal names them).
  teacher_input: when the teacher's patch grid differs from the student's (ViT-L/14 vs a
    patch-16 student), 'resample' feeds the teacher the student's images and resamples its
    tokens bicubically to the student's grid (method.md §4); 'resize' feeds it the images
    resized to student grid × teacher patch (196² for L/14 at 224²), so each of its patches
    covers one student patch (its position embeddings resampled to that size).
  diagnose_images: at the start, log the teacher's off-diagonal token cosines per AM level
    (mean ± std, each `am_features` mode) on this many training images; 0 skips it.
  scorecard_every: measure the representation scorecard (the `scorecard` block) every this
    many steps and at the end, into metrics.jsonl / TensorBoard and distill/scorecard.png;
    0 = never during distillation (the eval stage still reports it).
  teacher_cache: the teacher-feature cache (linearizer/teacher_cache.py): 'off' (the
    paper: fresh views every epoch, the teacher runs every step); 'write' (draw
    `teacher_cache_views` views per example once, store the teacher's outputs for them,
    then train cycling through them without the teacher); 'read' (train from a cache
    already written, e.g. into a shared `teacher_cache_dir`); 'auto' ('write' where the
    stage reads more views than the cache holds and it fits on the disk, else 'off').
  teacher_cache_views: views stored per example (epoch e trains on view e mod V).
  teacher_cache_dir: where the cache goes, on local disk ('' = <workdir>/distill/
    teacher_cache); a cache there from another teacher, resolution or augmentation is
    refused with the differing fields named.
  teacher_cache_dtype: 'bfloat16' (half the disk) or 'float32' (the step's losses exactly
    as without a cache).
  """
  c = stage(**stage_args)
  c.student_init = student_init
  c.teacher_init_partial = teacher_init_partial
  c.teacher_input = teacher_input
  c.diagnose_images = diagnose_images
  c.scorecard_every = scorecard_every
  c.teacher_cache = teacher_cache
  c.teacher_cache_views = teacher_cache_views
  c.teacher_cache_dir = teacher_cache_dir
  c.teacher_cache_dtype = teacher_cache_dtype
  return c


def data(source, image_size, **overrides) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(
    dict(
      source=source,  # tfds:<name>, folder:<path>, npz:<path>, mnist or digits
      eval_source="",  # '' = the test split of a built-in source / tfds 'validation'
      data_dir="",  # tfds data_dir
      num_classes=0,  # 0 = from the data
      image_size=image_size,  # the square side models train and evaluate at
      crop_scale=(0.2, 1.0),  # random-resized-crop area range in training
      crop_fraction=0.875,  # eval: resize to size / crop_fraction, then center crop
      flip=True,  # random horizontal flips in training
      randaugment=False,  # RandAugment in training, as timm's rand-m9-mstd0.5-inc1
      workers=0,  # grain worker processes (0 = in the main process)
      eval_limit=0,  # evaluate on at most this many images (0 = all)
      # without an eval_source, this share of a source with no splits of its own (npz:,
      # folder:, mnist, digits) is held out for eval and never trained on
      test_fraction=0.2,
    )
  )
  c.update(overrides)
  return c


def base(**overrides) -> ml_collections.ConfigDict:
  """The fields every experiment config has, with their defaults."""
  c = ml_collections.ConfigDict(
    dict(
      seed=0,  # model init (teacher seed, student seed + 1, ...), data order, masks
      label_seed=-1,  # which `num_labels` examples a stage trains on; -1 = `seed`
      stages=("distill", "finetune", "eval"),
      # kind: an architecture of linearizer.models (the model table); variant: '<size>/<patch>';
      # init: 'fmt:path' (linearizer.convert) or a model directory; overrides: config fields.
      teacher=dict(kind="vit", variant="B/16", init="", overrides={}),
      student=dict(kind="adventurer", variant="B/16", init="", overrides={}),
      mesh=mesh(),
      checkpoint=dict(
        every_steps=1000,  # train-state checkpoints this often (and at a stop)
        keep=2,  # the newest ones kept
      ),
      log_every=50,  # metrics.jsonl / TensorBoard / progress line every this many steps
      nan_policy="stop",  # a non-finite loss or gradient: 'stop' the run, or 'skip' the step
      eval=dict(
        batch_size=256,  # eval batch (per process)
        resolutions=(),  # extra eval resolutions beside data.image_size
        # (size, fraction) pairs: the centre-crop fraction at those eval sizes; the others use
        # data.crop_fraction (Adventurer evaluates above 224 with 1.0)
        crop_fractions=(),
        speed_resolutions=(),  # img/s measured here; () = data.image_size
        speed_batch=32,  # the batch img/s is measured with
        # more classifiers to evaluate beside the run's, each 'name=fmt:path' (or
        # 'name=<model dir>'), e.g. a fine-tuned CLIP ViT-B/16 as the paper's baseline row
        extra_models=(),
      ),
      # The representation scorecard (linearizer/scorecard.py): during distillation every
      # distill.scorecard_every steps, and for every model in the eval stage.
      scorecard=dict(
        eval=True,  # the eval stage adds knn, probe, outliers (and cka, am_distance) per model
        train_images=1000,  # kNN / probe fit on this many training images (0 = all)
        eval_images=1000,  # every measure on this many eval images (0 = all)
        num_levels=4,  # CKA / AM distance at K level ends as AM's (at most the depth)
        knn_k=20,  # neighbours per kNN vote (cosine; DINO's protocol uses 20)
        probe_l2=1.0,  # ridge penalty of the linear probe on standardised features
        outlier_multiple=3.0,  # a token is an outlier above this × its image's median norm
      ),
    )
  )
  c.update(overrides)
  return c


def smoke(c):
  """Shrinks any experiment to seconds on a CPU: tiny models, `digits`, a few steps.

  Every stage and code path is kept; a tiny teacher is trained first when the config
  would otherwise load one.
  """
  c.data = data("digits", 16, crop_scale=(0.6, 1.0), flip=False, crop_fraction=1.0)
  if not c.teacher.init or "train_teacher" in c.stages:
    c.teacher.init = ""
    c.stages = tuple(dict.fromkeys(("train_teacher",) + tuple(c.stages)))
  c.teacher.variant, c.student.variant = "Ti/4", "Ti/4"
  c.teacher.overrides = dict(width=32, depth=2, num_heads=2, mlp_dim=64)
  c.student.overrides = dict(width=32, depth=2, headdim=16, d_state=16, chunk_size=16)
  for name in ("train_teacher", "distill", "finetune", "train_student"):
    if name not in c:
      make = distill_stage if name == "distill" else stage
      c[name] = make(
        steps=4,
        batch_size=16,
        lr=1e-3,
        loss=distill_loss() if name == "distill" else supervised_loss(),
      )
    c[name].steps = 4
    if "image_size" in c[name].augment:  # a stage at its own resolution: at the smoke one
      del c[name].augment["image_size"]
    c[name].optim.warmup_steps = 1
    c[name].batch_size = 16
  c.distill.loss.num_stages = 2
  c.checkpoint.every_steps = 2
  c.log_every = 2
  c.eval.batch_size = 64
  c.eval.resolutions = ()
  c.eval.crop_fractions = ()
  c.eval.speed_resolutions = (16, 32)
  c.eval.speed_batch = 8
  c.scorecard.train_images = c.scorecard.eval_images = 200


def segment(**overrides) -> ml_collections.ConfigDict:
  """The `segment` stage (linearizer/segment.py): every backbone fine-tuned with the same
  head, data and budget. Defaults: mmseg's ViT-B UperNet on ADE20K
  (configs/mae/upernet_mae-base_fp16_8x2_512x512_160k_ade20k.py), method.md §9."""
  c = ml_collections.ConfigDict(
    dict(
      # 'teacher', 'distill', 'finetune', 'train_student' (this run's stages), 'scratch' (a
      # fresh student: the from-scratch baseline) or 'name=fmt:path' / 'name=<model dir>'
      backbones=("teacher", "distill", "scratch"),
      steps=160_000,  # mmseg: 160k iterations
      drop_path=0.1,  # every backbone's stochastic depth (mmseg MAE: drop_path_rate=0.1)
      batch_size=16,  # mmseg: 8 GPUs × 2
      # mmseg MAE: AdamW lr 1e-4, wd 0.05, layer decay 0.65, poly (power 1, eta_min 0) after
      # a 1500-iteration linear warm-up
      optim=optim(
        lr=1e-4,
        min_lr=0.0,
        weight_decay=0.05,
        layer_decay=0.65,
        warmup_steps=1500,
        schedule="poly",
        clip_norm=0.0,
      ),
      head=dict(
        kind="upernet",  # 'upernet' (the paper's) or 'linear' (a 1×1 probe)
        channels=768,  # mmseg MAE UPerHead channels
        out_indices=(),  # () = blocks 4, 6, 8, 12 of 12, scaled to the backbone's depth
        pool_scales=(1, 2, 3, 6),  # PPM grids
        aux_channels=256,  # the auxiliary FCNHead's width
        aux_weight=0.4,  # its loss weight; 0 = no auxiliary head
        dropout=0.1,  # before each classifier
        groups=32,  # GroupNorm groups (batch-free: see linearizer/models/segmenter.py)
      ),
      data=dict(
        # digitscenes (MNIST canvases, built in), segfolder:<root>, ade20k:<root>,
        # cityscapes:<root>, tfds:scene_parse150, tfds:cityscapes
        source="digitscenes",
        data_dir="",  # tfds: where the dataset is prepared ('' = tfds's default)
        num_classes=0,  # 0 = the dataset's own (segfolder: scanned from its masks)
        canvas=128,  # digitscenes: the canvas side
        train_scenes=2000,  # digitscenes: scenes per split
        test_scenes=200,
        crop=(512, 512),  # training crop (h, w)
        scale=(2048, 512),  # RandomResize target (long, short), × a ratio in ratio_range
        ratio_range=(0.5, 2.0),
        cat_max_ratio=0.75,  # RandomCrop: no class above this share of a crop (10 tries)
        flip=True,
        photometric=True,  # PhotoMetricDistortion
        workers=0,  # grain worker processes
      ),
      eval=dict(
        mode="slide",  # 'whole' image, or 'slide' windows of `crop` every `stride`
        crop=(512, 512),  # mmseg ADE20K test: slide, crop 512, stride 341
        stride=(341, 341),
        scale=(2048, 512),  # test Resize (long, short), keep ratio; () = as the image is
        limit=0,  # at most this many eval images (0 = all)
        figure_images=4,  # rows of predictions.png
        speed_repeats=5,  # timed forwards for img/s (median)
      ),
    )
  )
  c.update(overrides)
  return c


def ablation(**overrides) -> ml_collections.ConfigDict:
  """The `ablation` stage (linearizer/ablation.py)."""
  c = ml_collections.ConfigDict(
    dict(
      seeds=3,  # runs per variant: seed, seed + 1, ...
      variants=(
        "supervised",
        "mp",
        "am",
        "am_unmasked",
        "am_mp",
        "scope_cls",
        "scope_visible",
        "scope_all",
      ),
      workers=1,  # runs at once, one process each (single-host only)
    )
  )
  c.update(overrides)
  return c


def bench(**overrides) -> ml_collections.ConfigDict:
  """The `bench` stage (linearizer/bench.py). Empty / 0 = the default for this backend."""
  c = ml_collections.ConfigDict(
    dict(
      parts=("forward", "train_step", "supervised_step", "segment", "ssd"),  # what to measure
      teacher_kind="vit",  # architectures of linearizer.models
      student_kind="adventurer",
      teacher="",  # teacher variant; '' = B/16 on accelerators, Ti/16 on CPU
      student="",  # student variant; likewise
      teacher_overrides={},  # teacher config fields, e.g. style='clip'
      student_overrides={},  # student config fields
      resolutions=(),  # () = 224…1024 (…2048 on accelerators)
      batch=0,  # forward batch; 0 = 32 on accelerators, 1 on CPU
      dtype="",  # '' = bfloat16 on accelerators, float32 on CPU
      repeats=0,  # timed calls per measurement (median); 0 = 10; 5 on CPU
      chunk_size=0,  # student SSD chunk; 0 = kernels.CHUNK_TABLE's for each length
      attention_impls=(),  # ViT attention impls; () = xla and blocked (+ cudnn on GPU)
      matmul_size=0,  # side of the square matmul timed as the device's rate; 0 = 8192 on
      # accelerators, 2048 on CPU
      pytorch=True,  # PyTorch peer rows (HF ViT with SDPA, PyTorch Adventurer) where torch
      # and transformers are installed; False: never
      train_resolution=224,  # the distillation train step's resolution
      train_batch=0,  # 0 = 64 on accelerators, 2 on CPU
      max_batch=None,  # search the largest batch that fits; None = accelerators only
      max_batch_limit=4096,  # ... up to this batch
      peak_flops=0.0,  # FLOP/s for MFU; 0 = the table in linearizer/bench_results.py
      # The SSD kernels alone, at the student's scan shapes.
      ssd=dict(
        batch=0,  # 0 = 8 on accelerators, 1 on CPU
        heads=24,
        headdim=64,
        d_state=64,
        lengths=(),  # () = 198…16386 (≤ 4098 on CPU)
      ),
      # A supervised training step (forward + backward + AdamW) of every model: what the
      # paper's speed table most likely reports (docs/benchmarks.md).
      supervised=dict(
        batch=0,  # 0 = 128 on accelerators (halved until it fits), 2 on CPU
        resolutions=(),  # () = 224 and 448 on accelerators, 224 on CPU
        num_classes=1000,
        steps=1000,
        optim=optim(),
        loss=supervised_loss(),
      ),
      # Backbone + UperNet forward at segmentation sizes (teacher vs student).
      segment=dict(
        resolutions=(),  # () = 512…2048 on accelerators, 512 and 768 on CPU
        batch=0,  # 0 = 8 on accelerators, 1 on CPU
        num_classes=150,  # ADE20K's
        channels=0,  # UperNet's width; 0 = the backbone's (768 for B, as mmseg's ViT-B)
      ),
      # The distillation settings the train step runs with (its schedule length too).
      distill=dict(
        steps=1000,
        optim=optim(lr=1e-4),
        loss=distill_loss(),
        teacher_input="resample",
        teacher_cache_dtype="bfloat16",  # the cached step's teacher outputs, as stored
      ),
    )
  )
  c.update(overrides)
  return c


def visualize(**overrides) -> ml_collections.ConfigDict:
  """The `visualize` stage (linearizer/visualize.py)."""
  c = ml_collections.ConfigDict(
    dict(
      num_images=2,  # images drawn
      am_images=0,  # measure the AM distance on this many images (0 = those drawn)
      num_stages=4,  # K levels of activation matching (method.md §2)
      layer=-1,  # student layer of the mixing matrix (teacher: same relative depth)
      query=(-1, -1),  # (row, col) of the query patch on the student grid; -1 = centre
      # stage -> label: the students drawn, where the run has them
      students={"distill": "distilled", "finetune": "fine-tuned", "train_student": "from scratch"},
    )
  )
  c.update(overrides)
  return c


def visualize_run(**overrides) -> ml_collections.ConfigDict:
  """A config that draws a finished run (configs/visualize.py): its own top-level fields."""
  c = ml_collections.ConfigDict(
    dict(
      seed=0,
      stages=("visualize",),
      # the finished run's workdir (required)
      run_dir="",
      # '' = the run's teacher; or 'fmt:path' (linearizer.convert) / a model directory
      teacher_init="",
      # image files (comma-separated, globs, a folder), a data source, or '' = the run's eval data
      images="",
      visualize=visualize(),
    )
  )
  c.update(overrides)
  return c
