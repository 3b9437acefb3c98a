"""`python -m linearizer.segment predict ...`, and the metrics users import from here
(`confusion_matrix`, `segmentation_scores`); the feature lives in `linearizer.segmentation`."""

from linearizer.segmentation.cli import main
from linearizer.segmentation.metrics import confusion_matrix, segmentation_scores

__all__ = ["confusion_matrix", "main", "segmentation_scores"]

if __name__ == "__main__":
  main()
