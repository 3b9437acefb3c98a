"""`python -m linearizer.segment predict` (also `python -m linearizer.segmentation predict`):
segment your own images with a finished model.

  python -m linearizer.segment predict --model DIR/segment/distill/model --input <image or
      folder> --output <folder> [--mode slide --crop 512 --stride 341] [--scale 2048,512]
      [--max_pixels N]

Images are read as a viewer shows them (their EXIF orientation applied), and one past PIL's
pixel limit is refused by name (`--max_pixels` raises the limit for images you trust).

writes `<name>.png` (the label map: a class id per pixel, 255 nowhere) and
`<name>_overlay.png` (the classes' colours over the image) for every image.
"""

import argparse

from PIL import Image

from linearizer.errors import UserError, one_line_errors
from linearizer.segmentation.inference import check_windows, predict_folder


def main(argv=None) -> None:
  """The CLI; bad input prints one `error: ...` line and exits 2."""
  parser = argparse.ArgumentParser(prog="python -m linearizer.segment")
  commands = parser.add_subparsers(dest="command", required=True)
  p = commands.add_parser("predict", help="label maps and overlays of your own images")
  p.add_argument("--model", required=True, help="a segment stage's DIR/segment/<name>/model")
  p.add_argument("--input", required=True, help="an image, or a folder of them")
  p.add_argument("--output", required=True, help="the folder to write")
  p.add_argument("--mode", default="whole", choices=("whole", "slide"))
  p.add_argument("--crop", type=int, default=512, help="slide: the window side")
  p.add_argument("--stride", type=int, default=341, help="slide: the step between windows")
  p.add_argument("--scale", default="", help="resize to fit (long,short) first, e.g. 2048,512")
  p.add_argument(
    "--max_pixels",
    type=int,
    default=0,
    help="read images of up to this many pixels (default: PIL's decompression-bomb limit)",
  )
  args = parser.parse_args(argv)
  with one_line_errors():
    try:
      scale = tuple(int(v) for v in args.scale.split(",")) if args.scale else ()
    except ValueError:
      scale = None
    if scale is None or (scale and (len(scale) != 2 or min(scale) < 1)):
      raise UserError(f"--scale {args.scale!r}: expected two positive integers, e.g. 2048,512.")
    if args.max_pixels < 0:
      raise UserError(f"--max_pixels {args.max_pixels}: expected a positive pixel count.")
    if args.max_pixels:
      Image.MAX_IMAGE_PIXELS = args.max_pixels
    if args.mode == "slide":
      check_windows((args.crop,) * 2, (args.stride,) * 2)
    ecfg = argparse.Namespace(
      mode=args.mode, crop=(args.crop,) * 2, stride=(args.stride,) * 2, scale=scale
    )
    written = predict_folder(args.model, args.input, args.output, ecfg)
  print(f"{len(written)} label map(s) and overlay(s) in {args.output}")
