"""What the README's "Extending" section promises, done in a few lines each: a new stage
(one runner, one table line), a new student architecture (one module, one table line), and
`train.fit` called in-process on a toy module (its docstring is the contract)."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import linearizer
from configs import demo
from linearizer import data, models, stages, train
from linearizer.errors import NonFiniteError
from linearizer.models import common


# ---------------------------------------------------------------------------------------
# A stage: one runner and one table line.
# ---------------------------------------------------------------------------------------
def count_images(run):
  """A toy stage: counts the training images and writes DIR/count_images/count.json."""
  out = os.path.join(run.dir, "count_images")
  os.makedirs(out, exist_ok=True)
  result = {"images": len(run.train_source), "classes": run.classes}
  with open(os.path.join(out, "count.json"), "w", encoding="utf-8") as f:
    json.dump(result, f)
  return result


def test_a_new_stage_is_one_runner_and_one_table_line(monkeypatch, tmp_path, capsys):
  line = stages.Stage(count_images, stages.no_check, "count_images/count.json")
  monkeypatch.setitem(stages.STAGES, "count_images", line)
  config = demo.get_config("smoke")
  with config.unlocked():
    config.stages = ("count_images",)
  result = stages.run(config, str(tmp_path))
  assert result == {"images": 1797 - 359, "classes": 10}  # digits: 359 held out for eval
  assert json.load(open(tmp_path / "count_images" / "count.json")) == result
  assert f"count_images     {tmp_path / 'count_images' / 'count.json'}" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------
# A student architecture: one module and one table line.
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ToyConfig:
  """The fields every student config has (stages set them), plus its own."""

  width: int
  depth: int
  patch: int
  image_size: int = 16
  num_classes: int = 0
  drop_path: float = 0.0
  mean: tuple = (0.5, 0.5, 0.5)
  std: tuple = (0.5, 0.5, 0.5)


class Toy(nnx.Module):
  """CLS *first* (unlike Adventurer): consumers must read the roles, not positions."""

  roles = common.TokenRoles(cls=0, patches=(1, None))

  def __init__(self, cfg: ToyConfig, *, rngs: nnx.Rngs):
    self.cfg, d, p = cfg, cfg.width, cfg.patch
    self.patch_embed = nnx.Conv(3, d, (p, p), strides=(p, p), padding="VALID", rngs=rngs)
    self.cls_token = nnx.Param(jnp.zeros((1, 1, d)))
    self.mask_token = nnx.Param(jnp.zeros((1, 1, d)))
    self.blocks = nnx.List([nnx.Linear(d, d, rngs=rngs) for _ in range(cfg.depth)])
    self.norm = nnx.LayerNorm(d, rngs=rngs)
    self.head = nnx.Linear(d, cfg.num_classes, rngs=rngs) if cfg.num_classes else None

  def __call__(self, images, *, mask=None, train=False):
    del train
    x = self.patch_embed(images)
    x = x.reshape(x.shape[0], -1, x.shape[-1])
    if mask is not None:
      x = jnp.where(mask[..., None], self.mask_token[...], x)
    x = jnp.concatenate(
      [jnp.broadcast_to(self.cls_token[...], (x.shape[0], 1, x.shape[2])), x], axis=1
    )
    blocks = []
    for block in self.blocks:  # a token-mixing MLP: each token sees the mean of all
      x = x + jax.nn.gelu(block(x + x.mean(axis=1, keepdims=True)))
      blocks.append(x)
    out = common.ModelOutput(
      logits=None, tokens=self.norm(x), blocks=tuple(blocks), roles=self.roles
    )
    return out.replace(logits=self.head(self.pool(out))) if self.head else out

  def pool(self, out):
    """What the head reads (and the scorecard's kNN and probe): the final CLS token."""
    return out.cls[:, 0]


def toy_variant(variant, **overrides):
  return ToyConfig(**{"width": 16, "depth": 2, "patch": int(variant.split("/")[1]), **overrides})


def test_a_new_student_architecture_is_one_module_and_one_table_line(monkeypatch, tmp_path):
  monkeypatch.setitem(models.ARCHITECTURES, "toy", models.Architecture(ToyConfig, Toy, toy_variant))
  config = demo.get_config("smoke")
  with config.unlocked():
    config.stages = ("train_teacher", "distill", "finetune")
    config.student.kind, config.student.variant, config.student.overrides = "toy", "Toy/4", {}
  stages.run(config, str(tmp_path))
  rows = [json.loads(line) for line in open(tmp_path / "distill" / "metrics.jsonl")]
  rows = [r for r in rows if "loss" in r]  # not the scorecard's
  assert rows[-1]["step"] == 4 and all(np.isfinite(rows[-1][k]) for k in ("am", "mp", "loss"))
  assert json.load(open(tmp_path / "export" / "model.json"))["kind"] == "toy"
  student = linearizer.load_student(str(tmp_path / "export"))
  assert isinstance(student, Toy) and student.cfg.num_classes == 10
  assert student(jnp.zeros((2, 16, 16, 3))).logits.shape == (2, 10)


# ---------------------------------------------------------------------------------------
# train.fit in-process, on a toy module.
# ---------------------------------------------------------------------------------------
LR, N, D = 0.1, 8, 3
X = np.random.default_rng(0).normal(size=(N, D)).astype(np.float32)
Y = (X @ np.array([1.0, -2.0, 0.5]) + 0.3).astype(np.float32)


def least_squares_step(graphdef, tx):
  def step(state, batch, rng):
    del rng

    def loss_fn(params):
      model = nnx.merge(graphdef, params, state.rest)
      pred = model(batch.image.reshape(N, D))[:, 0]
      return jnp.mean((pred - batch.label) ** 2) * batch.image[0, 0, 0, 0] ** 0  # NaN passes

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    new = train.apply_update(state, grads, tx, 0.0)
    return new, {"loss": loss, "grad_norm": optax.global_norm(grads)}

  return step


def fit_toy(directory, steps, *, poison_at=None, hook=None):
  module = nnx.Linear(D, 1, kernel_init=nnx.initializers.zeros_init(), rngs=nnx.Rngs(0))
  tx = optax.sgd(LR)

  def batches(start):
    for step in range(start, 10**6):
      image = X.reshape(N, 1, 1, D) * (np.nan if step == poison_at else 1.0)
      yield data.Batch(image.astype(np.float32), Y)

  mesh = jax.make_mesh((1, 1), ("data", "fsdp"), devices=jax.devices()[:1])
  settings = train.LoopSettings(
    str(directory), steps=steps, batch_size=N, mesh=mesh, log_every=2, checkpoint_every=3
  )
  hooks = (train.Hook(2, hook),) if hook else ()
  step = least_squares_step(nnx.graphdef(module), tx)
  return train.fit(settings, module, step, tx, batches, hooks=hooks)


def gradient_descent(steps):
  """The same iteration in float64 NumPy: the independent expectation."""
  w, b = np.zeros(D), 0.0
  for _ in range(steps):
    r = X @ w + b - Y
    w, b = w - LR * 2 * X.T @ r / N, b - LR * 2 * r.mean()
  return w, b


def test_fit_trains_resumes_and_stops_as_its_docstring_says(tmp_path):
  seen = []

  def hook(step, module):  # what it returns is logged; on odd calls nothing
    seen.append((step, np.array(module.bias[...][0])))
    return {"probe": 100.0 + step} if step % 4 == 0 else None

  model = fit_toy(tmp_path / "once", 10, hook=hook)
  w, b = gradient_descent(10)
  np.testing.assert_allclose(model.kernel[...][:, 0], w, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(model.bias[...][0], b, rtol=1e-5, atol=1e-6)
  # every 2 steps before the last, then once with the final weights
  assert [step for step, _ in seen] == [2, 4, 6, 8, 10]
  np.testing.assert_allclose(seen[0][1], gradient_descent(2)[1], rtol=1e-5, atol=1e-6)
  assert seen[-1][1] == model.bias[...][0]
  rows = [json.loads(line) for line in open(tmp_path / "once" / "metrics.jsonl")]
  assert [r["step"] for r in rows if "loss" in r] == [2, 4, 6, 8, 10]
  assert [(r["step"], r["probe"]) for r in rows if "probe" in r] == [(4, 104.0), (8, 108.0)]
  # Six steps, then the same directory asked for ten: resumes at 6, ends where one run does.
  fit_toy(tmp_path / "twice", 6)
  again = fit_toy(tmp_path / "twice", 10)
  np.testing.assert_array_equal(again.kernel[...], model.kernel[...])
  # A non-finite loss stops the run naming the step; the checkpoints before it are kept.
  with pytest.raises(NonFiniteError, match="at step 5"):
    fit_toy(tmp_path / "nan", 10, poison_at=4)
  assert sorted(os.listdir(tmp_path / "nan" / "ckpt")) == ["3"]
