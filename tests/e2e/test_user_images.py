"""Images and label maps as users have them (reliability classes 3 and 4), through main.py
and `predict` as a process: one `error:` line, exit 2, the user's files byte-identical.

- a photo stored sideways with an EXIF orientation is read upright, as its mask was drawn;
- two images with one stem, grey-level "masks" and 0/255 binary masks are refused by name
  before any stage trains, instead of training a head on values that are not class ids.
"""

import numpy as np
import pytest
from PIL import Image

from helpers import assert_clean_error, run_main, sideways_jpeg, tree_digest
from linearizer import data
from linearizer.errors import UserError
from linearizer.segmentation import sources


def dataset(root, masks, images=None):
  (root / "images").mkdir(parents=True)
  (root / "masks").mkdir(parents=True)
  for i, mask in enumerate(masks):
    Image.fromarray(mask.astype(np.uint8), "L").save(root / "masks" / f"s{i}.png")
    image = np.full((*mask.shape, 3), 40 * i, np.uint8) if images is None else images[i]
    Image.fromarray(image).save(root / "images" / f"s{i}.png")


def test_a_sideways_photo_is_read_upright_with_its_mask(tmp_path):
  upright = np.zeros((12, 20, 3), np.uint8)
  upright[:, :10] = 255  # the left half white: which way up it is shows
  sideways_jpeg(tmp_path / "photo.jpg", upright)
  with Image.open(tmp_path / "photo.jpg") as im:
    assert im.size == (12, 20)  # stored 12 wide, 20 high
  got = data.read_image(tmp_path / "photo.jpg")
  assert got.shape == (12, 20, 3)
  assert got[:, :8].min() > 200 and got[:, 12:].max() < 50
  # in a dataset: the mask drawn on the upright picture (20 wide) pairs with it
  dataset(tmp_path / "d", [np.zeros((12, 20)), np.ones((12, 20))])
  (tmp_path / "d" / "images" / "s0.png").unlink()
  sideways_jpeg(tmp_path / "d" / "images" / "s0.jpg", upright)
  src = sources.SegFolder(str(tmp_path / "d"), "train", num_classes=2)
  for k in range(len(src)):
    image, label = src[k]
    assert image.shape[:2] == label.shape == (12, 20)


def label_dataset(root, case):
  ones = np.ones((16, 16))
  if case == "grey levels":
    masks = [0 * ones, 128 * ones, 128 * ones, 0 * ones]
  elif case == "binary 0/255":
    masks = [np.where(np.arange(16) < 4, 0, 255) * ones for _ in range(4)]
  else:
    masks = [ones % 2 * i for i in range(4)]
  dataset(root, masks)
  if case == "one stem twice":
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "images" / "s0.jpg")


def test_two_images_with_one_stem_are_refused_before_any_stage(tmp_path):
  root = tmp_path / "data"
  label_dataset(root, "one stem twice")
  before = tree_digest(root)
  proc = run_main(
    tmp_path / "run",
    f"--config.segment.data.source=segfolder:{root}",
    config="configs/segment.py:smoke",
    code=2,
  )
  assert_clean_error(proc, "s0.png", "s0.jpg", "one stem")
  assert tree_digest(root) == before
  assert not (tmp_path / "run" / "train_teacher").exists()


@pytest.mark.parametrize(
  "case, phrases",
  [
    ("grey levels", ["[0, 128]", "grey levels", "129-class head"]),
    ("binary 0/255", ["255 (ignore) covers", "0/255 binary mask"]),
  ],
)
def test_label_maps_that_are_not_class_ids_are_refused(tmp_path, case, phrases):
  """(The same check main.py runs before any stage: the source is opened by the stage's
  check, as in the test above.)"""
  root = tmp_path / "data"
  label_dataset(root, case)
  before = tree_digest(root)
  with pytest.raises(UserError) as err:
    sources.SegFolder(str(root), "train")
  for phrase in phrases:
    assert phrase in str(err.value)
  assert "\n" not in str(err.value) and tree_digest(root) == before
