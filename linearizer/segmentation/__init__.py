"""Dense prediction with the student (method.md §7): segmentation sources and digit scenes,
mmseg's augmentation, the segment stage (fine-tuning a UperNet-style head on each backbone),
metrics, sliding-window inference and the `predict` CLI (`python -m linearizer.segment`).
"""
