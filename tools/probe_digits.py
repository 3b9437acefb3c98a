"""Does a backbone's patch tokens tell the digits of `digitscenes` apart, canvas by canvas?

A linear probe (scikit-learn's logistic regression) of one block's patch tokens: each patch
whose pixels are mostly one digit's ink is labelled with that digit; the probe is fitted on
train scenes and scored on test scenes. Why the segmentation demo's canvas is 28²
(docs/results/segmentation.md, "Choosing the dense toy"):

  python tools/probe_digits.py /tmp/segment/train_teacher/model
  python tools/probe_digits.py MODEL --canvas 28 42 56 --blocks 1 3
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.linear_model import LogisticRegression

from linearizer import resolve
from linearizer.segmentation import scenes

# (digit count, digit side as a fraction of the canvas) per canvas: digits of about 20-28 px
LAYOUTS = {28: ((1, 1), (0.7, 1.0)), 42: ((1, 2), (0.5, 0.67)), 56: ((2, 3), (0.4, 0.5))}


def patch_examples(model, source, block: int, min_ink: int):
  """(tokens (n, D), digit labels (n,)) of the patches with at least `min_ink` ink pixels."""
  p = model.cfg.patch
  mean, std = np.asarray(model.cfg.mean), np.asarray(model.cfg.std)
  forward = jax.jit(lambda x: model(x).blocks[block])
  xs, ys = [], []
  for i in range(len(source)):
    image, label = source[i]
    g = image.shape[0] // p
    tokens = model.roles.patches_of(forward(jnp.asarray((image / 255 - mean) / std)[None]))
    tokens = np.asarray(tokens)[0].reshape(g * g, -1)
    cells = label[: g * p, : g * p].reshape(g, p, g, p).transpose(0, 2, 1, 3).reshape(g * g, -1)
    for token, cell in zip(tokens, cells):
      ink = cell[cell > 0]
      if len(ink) >= min_ink:
        xs.append(token)
        ys.append(np.bincount(ink).argmax())
  return np.asarray(xs), np.asarray(ys)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("model", help="a model directory or 'fmt:path' (linearizer.load)")
  parser.add_argument("--canvas", type=int, nargs="+", default=sorted(LAYOUTS))
  parser.add_argument("--blocks", type=int, nargs="+", default=[-1])
  parser.add_argument("--scenes", type=int, default=400, help="train scenes (test: a quarter)")
  parser.add_argument("--min-ink", type=int, default=10)
  args = parser.parse_args()
  model = resolve.load_model(args.model)
  for canvas in args.canvas:
    count, side = LAYOUTS.get(canvas, ((1, 2), (0.5, 0.67)))
    train = scenes.DigitScenes("train", canvas, args.scenes, 0, count, side)
    test = scenes.DigitScenes("test", canvas, max(1, args.scenes // 4), 0, count, side)
    for block in args.blocks:
      x, y = patch_examples(model, train, block, args.min_ink)
      x_test, y_test = patch_examples(model, test, block, args.min_ink)
      probe = LogisticRegression(max_iter=3000).fit(x, y)
      chance = np.bincount(y_test).max() / len(y_test)
      print(
        f"canvas {canvas}² ({count[0]}-{count[1]} digits of {side[0]}-{side[1]} of it), block "
        f"{block}: probe {100 * probe.score(x_test, y_test):.1f}% on {len(y_test)} test "
        f"patches (majority class {100 * chance:.1f}%)"
      )


if __name__ == "__main__":
  main()
