"""The benchmark stage (`configs/bench.py`): speed, FLOPs and memory of teacher and student
across resolutions, the SSD kernels, the training steps and segmentation, against PyTorch
peers where torch is installed; written to bench.json and bench.png.
"""
