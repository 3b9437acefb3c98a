"""Dense prediction with the student (method.md §7), one concern a module:

sources    segmentation datasets on disk and in tfds (SegFolder, ADE20K, Cityscapes,
           TfdsSegmentation), their splits and the ignore label.
scenes     DigitScenes, the built-in dataset of MNIST digit canvases.
augment    mmseg's train augmentation (resize, crop, flip, photometric distortion, pad).
pipeline   `seg_source` (a source by name), the training batches (the data package's one
           stream with `SegTransform`) and the eval items.
metrics    `confusion_matrix`, `segmentation_scores`, `all_processes_sum`.
step       the fine-tuning step (pixel cross-entropy, main + auxiliary head).
inference  sliding-window / whole-image inference, evaluation, `predict_folder`.
stage      the `segment` stage: every backbone fine-tuned, scored and exported.
cli        `python -m linearizer.segment predict` (or `python -m linearizer.segmentation`).
"""
