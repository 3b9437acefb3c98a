"""python -m linearizer.export --format onnx|torch --input DIR --output FILE"""

from linearizer.export.cli import main

main()
