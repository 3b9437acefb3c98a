"""`python -m linearizer.segmentation predict ...`, as `python -m linearizer.segment predict`."""

from linearizer.segmentation.cli import main

if __name__ == "__main__":
  main()
