"""The formats that leave JAX, from an exported student (a run's `DIR/export`):

  python -m linearizer.export --format onnx --input DIR --output student.onnx [--image_size N]
  python -m linearizer.export --format torch --input DIR --output student.pth

Only this CLI imports the converters (`to_onnx`, `to_torch`): a run's own export
(`linearizer.serving`) needs neither onnx nor torch.
"""

import argparse
import os
from typing import Optional, Sequence

from linearizer import files
from linearizer.errors import UserError, one_line_errors
from linearizer.export.to_onnx import to_onnx
from linearizer.export.to_torch import to_torch


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="python -m linearizer.export",
    description="Write an exported student (a run's DIR/export) in a format that leaves JAX.",
  )
  parser.add_argument("--format", required=True, choices=("onnx", "torch"))
  parser.add_argument("--input", required=True, help="an export directory (DIR/export)")
  parser.add_argument("--output", required=True, help="the file to write (.onnx or .pth)")
  parser.add_argument(
    "--image_size", type=int, default=None, help="onnx: the input side (default: the model's)"
  )
  parser.add_argument("--opset", type=int, default=None, help="onnx: the opset to target")
  return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
  """The CLI; bad input prints one `error: ...` and exits 2 (see linearizer.errors)."""
  args = _parser().parse_args(argv)
  with one_line_errors():
    read = [os.path.join(d, f) for d, _, names in os.walk(args.input) for f in names]
    files.check_outputs([(args.output, args.input)], inputs=[args.input, *read])
    if args.format == "onnx":
      written = to_onnx(args.input, args.output, image_size=args.image_size, opset=args.opset)
    else:
      if args.image_size is not None or args.opset is not None:
        raise UserError("--image_size and --opset are onnx options; a .pth has no input size.")
      written = to_torch(args.input, args.output)
  print(f"{args.format}: {args.input} -> {written}")


if __name__ == "__main__":
  main()
