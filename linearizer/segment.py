"""`python -m linearizer.segment predict ...`, and the metrics users import from here
(`confusion_matrix`, `segmentation_scores`); the feature lives in `linearizer.segmentation`."""

from linearizer.segmentation.stage import confusion_matrix, main, segmentation_scores

__all__ = ["confusion_matrix", "main", "segmentation_scores"]

if __name__ == "__main__":
  main()
