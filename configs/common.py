"""Config pieces every experiment shares, and every field a stage reads, declared once.

Each builder declares its block's fields in one dict literal, `field=default,  # meaning`,
and refuses a key it does not declare (configs/fields.py); the tool stages' blocks
(segment, bench, visualize, ablation) are in configs/tool_blocks.py. Defaults follow
method.md §8 (distillation) and Adventurer's fine-tuning recipe. Configs import only
configs.* (and ml_collections), never the library; the library reads these fields and never
writes into a config.
"""

import difflib

import ml_collections

from configs.fields import ABSENT, REQUIRED, build, refuse_undeclared
from linearizer.schema import (
  COUNT,
  DECAY,
  FINISHED,
  FRACTION,
  NON_NEGATIVE,
  POSITIVE,
  POSITIVE_FRACTION,
  POSITIVE_INT,
  SEED,
  STOPPED,
  Field,
  interval,
  ordered_pair,
)

CROP_SCALE = ordered_pair(POSITIVE_FRACTION)  # a random-resized crop's area range
OPEN_FRACTION = interval(0, 1, lo_open=True, hi_open=True)  # a share that leaves both sides some
LABEL_SEED = interval(-1, None, integer=True)  # -1: the run's seed

AM_SCOPES = ("visible", "cls", "all")  # distill_loss.scope: the tokens AM compares


def optim(**given) -> ml_collections.ConfigDict:
  declared = dict(
    lr=Field(
      1.5e-4, POSITIVE, STOPPED
    ),  # peak; method.md §8 scales it 1.5e-4 × batch / 256 (MAE; the paper gives none)
    min_lr=Field(1e-6, NON_NEGATIVE, STOPPED),  # where the schedule ends
    warmup_steps=Field(0, COUNT),  # linear, from 0; the schedule then ends at the stage's `steps`
    schedule="cosine",  # after the warm-up: 'cosine', or 'poly' (mmseg's PolyLR)
    power=Field(1.0, POSITIVE),  # the 'poly' schedule's exponent
    weight_decay=Field(0.05, NON_NEGATIVE),  # AdamW's decoupled weight decay
    b1=Field(0.9, DECAY),  # AdamW's moment decays
    b2=Field(0.999, DECAY),  # (b1 the first moment's, b2 the second's)
    clip_norm=Field(1.0, NON_NEGATIVE, STOPPED),  # 0 disables gradient clipping
    ema_decay=Field(0.0, DECAY),  # 0 disables the EMA of the student
    layer_decay=Field(
      1.0, POSITIVE_FRACTION
    ),  # layer-wise lr decay for fine-tuning (BEiT); 1 disables it
    grad_accum=Field(
      1, POSITIVE_INT, STOPPED
    ),  # micro-batches per step (memory only; same global batch)
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
  return build("optim", declared, given)


def distill_loss(**given) -> ml_collections.ConfigDict:
  declared = dict(
    w_am=Field(1.0, NON_NEGATIVE),  # weight of activation matching
    w_mp=Field(1.0, NON_NEGATIVE),  # weight of masked prediction (λ)
    mask_ratio=Field(
      0.75, DECAY
    ),  # fraction of the student's patches masked (MP; AM's visible scope)
    num_stages=Field(4, POSITIVE_INT),  # K: AM's depth levels (the paper's "stages")
    scope="visible",  # AM tokens: visible | cls | all (AM_SCOPES)
    beta=Field(1.0, POSITIVE),  # Smooth-L1 β
    # AM's tokens: 'raw' residual streams (the paper), 'centered' (each token set's mean
    # subtracted), 'next_ln' (through the next block's pre-norm); both sides alike
    am_features="raw",
    # The simpler recipes of 2026 (docs/method-fidelity.md, "Newer losses"), off in the paper:
    # `final` regresses the student's final patch tokens, through a linear map, onto the
    # teacher's final-block ones (GTR's one loss; ViT-AdaLA's final alignment); `blocks`
    # regresses AM's tokens at AM's levels through a map per level (FitNets; AdaLA's
    # block-level alignment), so AM's projection-free maps can be told from plain regression
    # (absent=: the value a config saved before the field existed behaved as: its workdir
    # still resumes; linearizer.schema.Field)
    w_final=Field(0.0, NON_NEGATIVE, absent=0.0),
    w_blocks=Field(0.0, NON_NEGATIVE, absent=0.0),
    # `mixer_out`: at AM's levels, the student's mixer branch through a map per level onto
    # the teacher's attention branch (ModelOutput.mixers; ViT-AdaLA's attention alignment,
    # Copy-the-Same's attention-output distillation), each model on its own stream
    w_mixer=Field(0.0, NON_NEGATIVE, absent=0.0),
    # their targets (and mixer_out's): 'ln' (each token's parameter-free LayerNorm, as
    # MP's) or 'raw'
    final_target=Field("ln", absent="ln"),
    # what `final` reads of the student: 'full' a second forward of the unmasked image (the
    # alignment papers' student sees the whole image; counted in the train GFLOPs) or
    # 'masked' the masked forward AM and MP read (no extra cost)
    final_view=Field("full", absent="full"),
  )
  return build("distill_loss", declared, given)


def supervised_loss(**given) -> ml_collections.ConfigDict:
  declared = dict(
    label_smoothing=Field(0.1, DECAY),  # of the cross-entropy targets
    mixup_alpha=Field(0.8, NON_NEGATIVE),  # Beta(α, α) of Mixup; 0 turns it off
    cutmix_alpha=Field(1.0, NON_NEGATIVE),  # Beta(α, α) of CutMix; 0 turns it off
    switch_prob=Field(0.5, FRACTION),  # chance of CutMix rather than Mixup when both are on
    # Logit distillation (finetune / train_student): '' off (the paper), 'soft' (KL at
    # kd_temperature) or 'hard' (CE on the teacher's top-1, DeiT's hard variant), on the
    # student's own head: loss = (1 - kd_weight) * CE + kd_weight * KD
    kd="",
    kd_weight=Field(0.5, FRACTION),  # DeiT's α
    kd_temperature=Field(1.0, POSITIVE),  # τ of soft KD (DeiT's 1.0); the term is scaled by τ²
    kd_teacher="",  # '' = the run's teacher; else a classifier's 'fmt:path' or model dir
  )
  return build("supervised_loss", declared, given)


def mesh(**given) -> ml_collections.ConfigDict:
  declared = dict(
    data=-1,  # -1: all remaining devices
    fsdp=Field(1, POSITIVE_INT),  # devices that split large parameters and optimizer moments
    fsdp_min_size=Field(2**18, COUNT),  # arrays at least this large are split over `fsdp`
    rules=(),  # (regex, PartitionSpec tuple) pairs tried first
  )
  return build("mesh", declared, given)


def parse_arg(arg, **defaults) -> ml_collections.ConfigDict:
  """big_vision-style config args: 'smoke,variant=B/16' -> {smoke: True, variant: 'B/16'}.

  Every key must be one of `defaults`; values take the type of their default.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if key not in defaults:
      close = difflib.get_close_matches(key, list(defaults), n=1)
      hint = f" Did you mean {close[0]!r}?" if close else ""
      raise ValueError(f"Unknown config arg {key!r}; expected some of {sorted(defaults)}.{hint}")
    default = defaults[key]
    if not sep:
      value = True
    elif isinstance(default, bool):
      value = value.lower() in ("1", "true", "yes")
    elif default is not None:
      value = type(default)(value)
    out[key] = value
  return out


def _stage(name: str, extra: dict, given: dict) -> ml_collections.ConfigDict:
  """A training stage's block, `extra` (its own fields) after the ones every stage has.

  `optim` is given by its fields (lr is required), among the stage's own: lr=..., ....
  """
  declared = dict(
    steps=Field(REQUIRED, POSITIVE_INT),  # the stage's length; the lr schedule ends here
    batch_size=Field(REQUIRED, POSITIVE_INT),  # global batch, split over every device and process
    drop_path=Field(0.0, DECAY),  # stochastic depth of the trained model
    num_labels=Field(
      0, COUNT
    ),  # train on a fixed random subset of this many examples (0 = all of them)
    # distill: also draw the teacher/student maps every this many steps (0 = never); they
    # are always drawn at the end, into <workdir>/distill/maps/
    visualize_every=Field(0, COUNT, FINISHED),
    optim=optim(),  # optim(); its fields are given among the stage's (lr required)
    loss=REQUIRED,  # distill_loss() or supervised_loss()
    augment={},  # data fields this stage trains with (e.g. randaugment=True)
    **extra,
  )
  own = {k: v for k, v in declared.items() if k != "optim"}
  refuse_undeclared(name, {**own, **declared["optim"]}, given)
  if "lr" not in given:
    raise TypeError(f"{name}(): missing required field(s) 'lr' (the stage's optim.lr).")
  to_optim = {k: v for k, v in given.items() if k not in own}
  return build(
    name, declared, {k: v for k, v in given.items() if k in own} | {"optim": optim(**to_optim)}
  )


def stage(**given) -> ml_collections.ConfigDict:
  """One training stage: its length, batch, optimiser, loss settings and augmentation."""
  return _stage("stage", {}, given)


def distill_stage(**given) -> ml_collections.ConfigDict:
  """The `distill` stage: `stage(...)`'s fields, the student it starts from, what the
  teacher sees and its feature cache."""
  declared = dict(
    # '' a fresh student of student.kind / student.variant (the paper); a converted
    # directory or 'fmt:path' (e.g. the public supervised Adventurer,
    # 'adventurer:/ckpt/adventurer_base_patch16_224.pth'), loaded with student.overrides
    # and its head dropped; 'teacher' a fresh student with what has a counterpart copied
    # from the teacher (linearizer/teacher_init.py: patch and position embeddings, norms,
    # attention V/K/Q/O into x/B/C/out_proj, the MLP into the SwiGLU; the table of what was
    # copied is logged), which needs a student of the teacher's width and depth and, for the
    # mixer and MLP, `student.overrides` that fit (ngroups = heads, d_state = head dim, ...);
    # 'teacher_mlp' the same without the attention → mixer copy (norms, embeddings, MLPs:
    # "Copy the Same, Distill the Difference"'s recipe), so the mixer's shape need not fit.
    # Distinct from student.init, the student fine-tuning starts from.
    student_init="",
    # with student_init='teacher', copy what fits and leave the rest random instead of
    # refusing a pair whose shapes differ (the refusal names them)
    teacher_init_partial=False,
    # when the teacher's patch grid differs from the student's (ViT-L/14 vs a patch-16
    # student), 'resample' feeds the teacher the student's images and resamples its tokens
    # bicubically to the student's grid (method.md §4); 'resize' feeds it the images resized
    # to student grid × teacher patch (196² for L/14 at 224²), so each of its patches covers
    # one student patch (its position embeddings resampled to that size)
    teacher_input="resample",
    # at the start, log the teacher's off-diagonal token cosines per AM level (mean ± std,
    # each `am_features` mode) on this many training images; 0 skips it
    diagnose_images=Field(8, COUNT, FINISHED),
    # measure the representation scorecard (the `scorecard` block) every this many steps
    # and at the end, into metrics.jsonl / TensorBoard and distill/scorecard.png; 0 = never
    # during distillation (the eval stage still reports it)
    scorecard_every=Field(0, COUNT, FINISHED),
    # the teacher-feature cache (linearizer/teacher_cache.py): 'off' (the paper: fresh views
    # every epoch, the teacher runs every step); 'write' (draw `teacher_cache_views` views
    # per example once, store the teacher's outputs for them, then train cycling through
    # them without the teacher); 'read' (train from a cache already written, e.g. into a
    # shared `teacher_cache_dir`); 'auto' ('write' where the stage reads more views than the
    # cache holds and it fits on the disk, else 'off')
    teacher_cache="off",
    teacher_cache_views=Field(
      2, POSITIVE_INT
    ),  # views stored per example (epoch e trains on view e mod V)
    # where the cache goes, on local disk ('' = <workdir>/distill/teacher_cache); a cache
    # there from another teacher, resolution or augmentation is refused with the differing
    # fields named
    teacher_cache_dir="",
    # 'bfloat16' (half the disk) or 'float32' (the step's losses exactly as without a cache)
    teacher_cache_dtype="bfloat16",
  )
  return _stage("distill_stage", declared, given)


def model(**given) -> ml_collections.ConfigDict:
  """A model: `teacher` and `student`."""
  declared = dict(
    kind=REQUIRED,  # an architecture of linearizer.models (the model table)
    variant="B/16",  # '<size>/<patch>'
    init="",  # '' = a fresh model; else 'fmt:path' (linearizer.convert) or a model directory
    overrides={},  # the model's config fields (width, depth, dtype, ...)
  )
  return build("model", declared, given)


def data(source, image_size, **given) -> ml_collections.ConfigDict:
  declared = dict(
    source=REQUIRED,  # tfds:<name>, folder:<path>, npz:<path>, mnist or digits
    eval_source=Field(
      "", None, FINISHED
    ),  # '' = the test split of a built-in source / tfds 'validation'
    data_dir=Field("", None, FINISHED),  # tfds data_dir
    num_classes=Field(0, COUNT),  # 0 = from the data
    image_size=Field(REQUIRED, POSITIVE_INT),  # the square side models train and evaluate at
    crop_scale=Field((0.2, 1.0), CROP_SCALE),  # random-resized-crop area range in training
    crop_fraction=Field(
      0.875, POSITIVE_FRACTION
    ),  # eval: resize to size / crop_fraction, then center crop
    flip=True,  # random horizontal flips in training
    randaugment=False,  # RandAugment in training, as timm's rand-m9-mstd0.5-inc1
    workers=Field(0, COUNT, FINISHED),  # grain worker processes (0 = in the main process)
    eval_limit=Field(0, COUNT, FINISHED),  # evaluate on at most this many images (0 = all)
    # without an eval_source, this share of a source with no splits of its own (npz:,
    # folder:, mnist, digits) is held out for eval and never trained on
    test_fraction=Field(0.2, OPEN_FRACTION),
    # Packed batches (issue 43, in progress; docs/packing.md): images of their own sizes,
    # several to a row of `sequence_length` patches (of the finest patch among the stage's
    # models; each model adds its CLS/registers per image), at most `max_images` a row, each
    # image resized to at most `max_patches` patches. Only the compile-only tool
    # (python -m linearizer.aot) reads them yet: the stages refuse packing=True by name.
    packing=Field(False, absent=False),
    max_patches=Field(256, POSITIVE_INT, absent=256),
    sequence_length=Field(1024, POSITIVE_INT, absent=1024),
    max_images=Field(8, POSITIVE_INT, absent=8),
  )
  return build("data", declared, dict(source=source, image_size=image_size, **given))


def base(**given) -> ml_collections.ConfigDict:
  """The fields every experiment config has, with their defaults."""
  declared = dict(
    seed=Field(0, SEED),  # model init (teacher seed, student seed + 1, ...), data order, masks
    label_seed=Field(-1, LABEL_SEED),  # which `num_labels` examples a stage trains on; -1 = `seed`
    stages=Field(("distill", "finetune", "eval"), None, FINISHED),  # the stages run, in this order
    teacher=model(kind="vit"),  # the ViT distilled from
    student=model(kind="adventurer"),  # the Mamba-2 model distilled into
    mesh=Field(mesh(), None, FINISHED),  # how the devices split the work
    checkpoint=Field(
      dict(
        every_steps=Field(1000, POSITIVE_INT),  # train-state checkpoints this often (and at a stop)
        keep=Field(2, POSITIVE_INT),  # the newest ones kept
      ),
      None,
      FINISHED,
    ),
    log_every=Field(
      50, POSITIVE_INT, FINISHED
    ),  # metrics.jsonl / TensorBoard / progress line every this many steps
    nan_policy=Field(
      "stop", None, FINISHED
    ),  # a non-finite loss or gradient: 'stop' the run, or 'skip' the step
    eval=Field(
      dict(
        batch_size=Field(256, POSITIVE_INT),  # eval batch (per process)
        resolutions=(),  # extra eval resolutions beside data.image_size
        # (size, fraction) pairs: the centre-crop fraction at those eval sizes; the others use
        # data.crop_fraction (Adventurer evaluates above 224 with 1.0)
        crop_fractions=(),
        speed_resolutions=(),  # img/s measured here; () = data.image_size
        speed_batch=Field(32, POSITIVE_INT),  # the batch img/s is measured with
        # more classifiers to evaluate beside the run's, each 'name=fmt:path' (or
        # 'name=<model dir>'), e.g. a fine-tuned CLIP ViT-B/16 as the paper's baseline row
        extra_models=(),
      ),
      None,
      FINISHED,
    ),
    # The representation scorecard (linearizer/scorecard.py): during distillation every
    # distill.scorecard_every steps, and for every model in the eval stage.
    scorecard=Field(
      dict(
        eval=Field(
          True, None, FINISHED
        ),  # the eval stage adds knn, probe, outliers (and cka, am_distance) per model
        train_images=Field(1000, COUNT),  # kNN / probe fit on this many training images (0 = all)
        eval_images=Field(1000, COUNT),  # every measure on this many eval images (0 = all)
        num_levels=Field(
          4, POSITIVE_INT
        ),  # CKA / AM distance at K level ends as AM's (at most the depth)
        knn_k=Field(20, POSITIVE_INT),  # neighbours per kNN vote (cosine; DINO's protocol uses 20)
        probe_l2=Field(
          1.0, NON_NEGATIVE
        ),  # ridge penalty of the linear probe on standardised features
        outlier_multiple=Field(
          3.0, POSITIVE
        ),  # a token is an outlier above this × its image's median norm
      ),
      None,
      FINISHED,
    ),
    data=ABSENT,  # data(...): every experiment sets its own
    # the tool stages' blocks (configs/tool_blocks.py), where an experiment has them: they
    # change no trained weight
    bench=Field(ABSENT, None, FINISHED),
    visualize=Field(ABSENT, None, FINISHED),
  )
  return build("base", declared, given, top=True)


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
