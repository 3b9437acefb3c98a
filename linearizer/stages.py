"""The stages a config can run, in order, and where their outputs go.

`STAGES` is the table: a stage is a runner `fn(run) -> results or None`, the check that
refuses its settings before anything runs, the outputs it leaves under the workdir, and the
builder of its jitted step. Training stages (train_teacher, distill, finetune, train_student)
end by writing `DIR/<stage>/model` and are skipped when the command runs again; later ones
pick up what earlier ones wrote (teacher → distill → finetune). A stage interrupted half-way
resumes from its last checkpoint. Adding a stage is one runner and one table line.
"""

import functools
import os
from typing import Callable, NamedTuple, Optional

import jax

from linearizer import (
  ablation,
  data,
  evaluate,
  plots,
  preemption,
  resolve,
  schema,
  serving,
  supervised,
  train,
  visualize,
  workdir,
)
from linearizer.bench import runner as bench
from linearizer.distillation import scorecard
from linearizer.distillation import stage as distill_stage
from linearizer.errors import UserError
from linearizer.log import log, main_process
from linearizer.segmentation import stage as segment


class Run:
  """What the runners share: the config, the workdir, and the data sources (read once)."""

  def __init__(self, config, run_dir: str):
    self.config, self.dir = config, run_dir

  def _data(self):
    if "data" not in self.config:
      raise UserError("This stage needs a `data` block in the config.")
    return self.config.data

  @functools.cached_property
  def train_source(self):
    return data.train_source(self._data())

  @functools.cached_property
  def eval_source(self):
    return data.eval_source(self._data())

  @functools.cached_property
  def classes(self) -> int:
    return data.num_classes(self.config.data, self.train_source)

  def teacher(self):
    return resolve.teacher(self.config, self.dir, self.classes)


# ---------------------------------------------------------------------------------------
# Runners.
# ---------------------------------------------------------------------------------------
def run_train_teacher(run: Run):
  supervised.run_supervised("train_teacher", run.config, run.dir, run.teacher(), run.train_source)


def run_distill(run: Run):
  teacher, dcfg, directory = (
    run.teacher(),
    run.config.distill,
    workdir.stage_dir(run.dir, "distill"),
  )
  hooks = []
  if main_process():  # teacher vs student maps of one validation image; the scorecard
    maps = visualize.maps_hook(
      run.config, teacher, run.eval_source, os.path.join(directory, "maps")
    )
    hooks.append(train.Hook(dcfg.visualize_every, maps))
    if dcfg.scorecard_every:
      score = scorecard.hook(run.config, teacher, run.train_source, run.eval_source)
      hooks.append(train.Hook(dcfg.scorecard_every, score))
  distill_stage.run_distill(run.config, run.dir, teacher, run.train_source, hooks=hooks)
  if main_process():
    scorecard.plot(
      os.path.join(directory, "metrics.jsonl"), os.path.join(directory, "scorecard.png")
    )


def run_finetune(run: Run):
  student = resolve.pretrained_student(run.config, run.dir, run.classes)
  teacher = run.teacher() if run.config.finetune.loss.kd else None  # logit distillation's
  supervised.run_supervised("finetune", run.config, run.dir, student, run.train_source, teacher)


def run_train_student(run: Run):
  t = run.teacher()  # the student reads images normalised as the teacher's
  student = resolve.new_student(
    run.config, run.classes, (t.cfg.mean, t.cfg.std), drop_path=run.config.train_student.drop_path
  )
  teacher = t if run.config.train_student.loss.kd else None  # logit distillation's
  supervised.run_supervised(
    "train_student", run.config, run.dir, student, run.train_source, teacher
  )


def no_check(config) -> None:
  """A stage with nothing to refuse before the run."""


def check_kd(stage: str) -> Callable:
  return lambda config: supervised.check_kd(config, stage)


class Stage(NamedTuple):
  """A stage: how it runs, what it refuses up front, what it leaves, and its step."""

  run: Callable  # fn(Run) -> results or None
  check: Callable  # fn(config): raises UserError on what the stage would refuse half-way
  outputs: str  # what it writes under the workdir (the summary prints it)
  # fn(config, classes) -> {name: program.Program}: its steps, abstract, to compile alone (aot)
  steps: Optional[Callable] = None
  # what of `outputs` holds trained state or results a later command reuses (paths under
  # the workdir): a workdir with any of them belongs to its config (workdir.claim)
  state: tuple = ()


def trained(stage: str) -> tuple:
  return (f"{stage}/model", f"{stage}/ckpt")


TRAINED = "{ckpt,model,metrics.jsonl,tb}"
STAGES = {
  "train_teacher": Stage(
    run_train_teacher,
    check_kd("train_teacher"),
    f"train_teacher/{TRAINED}",
    functools.partial(supervised.programs, stage="train_teacher"),
    trained("train_teacher"),
  ),
  "distill": Stage(
    run_distill,
    distill_stage.check_config,
    "distill/{ckpt,model,metrics.jsonl,tb,maps,scorecard.png}",
    distill_stage.programs,
    (*trained("distill"), "distill/teacher_cache"),
  ),
  "finetune": Stage(
    run_finetune,
    check_kd("finetune"),
    f"finetune/{TRAINED}",
    functools.partial(supervised.programs, stage="finetune"),
    trained("finetune"),
  ),
  "train_student": Stage(
    run_train_student,
    check_kd("train_student"),
    f"train_student/{TRAINED}",
    functools.partial(supervised.programs, stage="train_student"),
    trained("train_student"),
  ),
  "eval": Stage(
    lambda r: evaluate.run_eval(r.config, r.dir, r.eval_source, r.classes, r.train_source),
    evaluate.check_config,
    "eval/results.json",
  ),
  "segment": Stage(
    lambda r: segment.run_segment(r.config, r.dir),
    segment.check_config,
    "segment/{results.json,<backbone>/{ckpt,results.json,predictions.png,metrics.jsonl,tb}}",
    segment.programs,
    ("segment",),
  ),
  "bench": Stage(lambda r: bench.run(r.config, r.dir), no_check, "bench/{bench.json,bench.png}"),
  "visualize": Stage(
    lambda r: visualize.run(r.config, r.dir), visualize.check_config, "visualize/maps_*.png"
  ),
  "ablation": Stage(
    lambda r: ablation.run(r.config, r.dir, r.train_source, r.eval_source, r.classes),
    ablation.check_config,
    "ablation/{ablation.json,.md,.png}",
    state=("ablation",),
  ),
}


# ---------------------------------------------------------------------------------------
# The dispatcher.
# ---------------------------------------------------------------------------------------
def check_numbers(config) -> None:
  """Refuses values outside their declared ranges (linearizer.schema: counts, fractions,
  rates, seeds, ordered pairs) before anything is written, and a global batch that does
  not split evenly over the devices (the mesh's data × fsdp axes)."""
  schema.check(config)
  devices = jax.device_count()
  batched = [s for s in workdir.TRAIN_STAGES if s in config]
  batched += ["segment"] if "segment" in config.stages else []
  uneven = [
    f"{stage}.batch_size={config[stage].batch_size}"
    for stage in batched
    if config[stage].batch_size % devices
  ]
  if uneven:
    raise UserError(
      f"{', '.join(uneven)} does not split over the {devices} devices (the mesh's data × "
      f"fsdp axes): use a multiple of {devices}."
    )


def check_config(config) -> None:
  """Refuses, with one message each, unknown stages and what a configured stage would
  refuse half-way (its own `check`), before any stage runs."""
  unknown = [s for s in config.stages if s not in STAGES]
  if unknown:
    raise UserError(f"Unknown stages {unknown}; expected some of {tuple(STAGES)}.")
  check_numbers(config)
  if "data" in config and config.data.get("packing"):
    raise UserError(
      "data.packing=True: no stage trains on packed batches yet (the packing pipeline is in "
      "progress, issue 43); the packed distillation step compiles with python -m "
      "linearizer.aot --config.stages=\"('distill',)\" --config.data.packing=True."
    )
  for stage in config.stages:
    STAGES[stage].check(config)
  # A training block's loss.kd is refused wherever the block is configured, so a later run
  # that adds the stage (--config.stages) does not meet it half-way.
  for stage in ("train_teacher", *supervised.KD_STAGES):
    if stage in config:
      supervised.check_kd(config, stage)


def run(config, run_dir: str, *, restart: bool = False):
  """Runs the config's stages in order in `run_dir`, skipping those already finished.

  Args:
    config: an experiment config (configs/*.py `get_config`).
    run_dir: the workdir. One that holds a run of another config is refused (UserError);
      `restart` moves its contents to `<run_dir>.old-<time>` first.
    restart: as above.
  Returns:
    The results of the last stage that returns some (eval, ablation, bench, visualize).
  """
  check_config(config)
  state = [path for stage in STAGES.values() for path in stage.state]
  workdir.claim(config, run_dir, state, restart)  # refuses a live run's workdir, --restart or not
  with workdir.locked(run_dir):
    return _run_stages(config, run_dir)


def _run_stages(config, run_dir: str):
  if main_process():
    workdir.remove_partial_saves(run_dir)
  run = Run(config, run_dir)
  results = None
  for stage in config.stages:
    if stage in workdir.TRAIN_STAGES and workdir.finished(run_dir, stage):
      log(f"[{stage}] already finished: reusing {workdir.model_dir(run_dir, stage)}")
      continue
    if preemption.requested():
      raise preemption.Stopped(f"before [{stage}]")
    log(f"[{stage}] starting in {workdir.stage_dir(run_dir, stage)}")
    out = STAGES[stage].run(run)
    results = results if out is None else out
  exported = export_final_student(run_dir)
  if main_process():
    summary(run_dir, config, exported)
  return results


def summary(run_dir: str, config, exported: Optional[str]) -> None:
  """Where everything went."""
  curves = plots.training_curves(
    run_dir, workdir.TRAIN_STAGES, os.path.join(run_dir, "plots", "training.png")
  )
  log("\nOutputs:")
  log(f"  {'config':<16} {os.path.join(run_dir, 'config.json')}")
  for stage in (s for s in STAGES if s in config.stages):  # the table's order
    log(f"  {stage:<16} {os.path.join(run_dir, STAGES[stage].outputs)}")
  if curves:
    log(f"  {'plots':<16} {curves}")
  skipped = data.unreadable_files()
  if skipped:  # (read by this process; data.workers > 0 reads in workers of their own)
    log(f"  {'unreadable':<16} {len(skipped)} image file(s) skipped, each named above")
  if exported:
    log(f"  {'export':<16} {exported}  (linearizer.load_student(dir), serve.jaxexport)")


def export_final_student(run_dir: str) -> Optional[str]:
  """run_dir/export: the fine-tuned student, else the distilled one; made again when the
  stage it should hold differs from the one it records (a later stage finished since)."""
  out = os.path.join(run_dir, "export")
  final = resolve.final_student(run_dir)
  if final is None:
    return None
  stage, model_dir = final
  if serving.exported_from(out) != stage and main_process():
    serving.export_student(resolve.restore(model_dir), out, source=stage)
    log(f"[export] the {stage} student is in {out}")
  return out
